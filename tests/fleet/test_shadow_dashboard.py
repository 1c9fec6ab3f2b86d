"""The dashboard's shadow view: each fleet's candidate per device and in total, in an owner's
words, and the operator's Promote and Stop buttons (the code of `edgekit shadow promote|stop`),
on a real registry with shadow windows written as ingest writes them, in headless Chromium."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from edgekit.fleet.api import ApiContext
from edgekit.fleet.control import ControlPlane
from edgekit.fleet.dashboard import create_app
from edgekit.fleet.registry import ShadowRow
from edgekit.topics import Topics
from starlette.testclient import TestClient
from test_dashboard import chromium_dom, serving
from test_dashboard_accounts import (  # noqa: F401 - shop and browser are fixtures
    OPERATOR,
    VIEWER,
    browser,
    retained_desired_state,
    shop,
    sign_in,
    signed_in,
)
from test_fleet_cli import edgekit

NOW = datetime.now(timezone.utc).replace(microsecond=0)
CANDIDATE = "c" * 64


def window(device: str, seq: int, **extra: object) -> ShadowRow:
    fields: dict[str, object] = {
        "device": device, "seq": seq, "window_end": NOW - timedelta(minutes=10 - seq),
        "candidate_id": CANDIDATE, "candidate_label": "digits@2.0.0", "serving_version": "1.1.0",
        "state": "running", "sample_rate": 0.1, "compared": 600, "dropped": 0, "classified": 600,
        "agreed": 582, "abs_error_mean": 0.01, "abs_error_max": 0.25, "serving_p50_ms": 1.0,
        "serving_p95_ms": 2.0, "candidate_p50_ms": 1.1, "candidate_p95_ms": 2.4, "error": None,
        "candidate_severity": "ok",
    }  # fmt: skip
    fields.update(extra)
    return ShadowRow(**fields)  # type: ignore[arg-type]


def tried(registry, cam1_agreed: int = 582) -> None:
    """Fleet shop tried digits@2.0.0: cam-1 agreed on ``cam1_agreed`` of 1,200 inputs over two
    windows (12 skipped); on cam-2 the candidate failed (written as ingest writes windows)."""
    failed = {"state": "failed", "compared": 40, "classified": 40, "agreed": 40, "candidate_severity": None}
    registry.write_batch(
        shadows=[
            window("cam-1", 1, agreed=cam1_agreed // 2, dropped=12),
            window("cam-1", 2, agreed=cam1_agreed - cam1_agreed // 2, candidate_severity="inputs changed"),
            window("cam-2", 1, error="it returned NaN or infinity", **failed),
        ]
    )


def test_the_view_says_per_device_and_in_total_what_the_new_model_measured(registry):
    client = TestClient(create_app(registry))
    assert client.get("/api/shadow").json() == []
    tried(registry, cam1_agreed=1164)
    (view,) = client.get("/api/shadow").json()
    assert view["fleet"] == "shop" and view["candidate"] == "digits@2.0.0"
    assert view["headline"] == (
        "digits@2.0.0 tried beside the serving model on 2 device(s) of fleet shop; 1 still trying it; "
        "it failed on cam-2"
    )
    cam1, cam2 = view["devices"]
    assert cam1["words"] == [
        "The new model agreed with the current one on 97% of 1,200 inputs (96–98%).",
        "The new model answers within 2.4 ms, the current one within 2.0 ms on the same inputs "
        "(95% of answers): 1.20× as long. Half of its answers come within 1.1 ms, the current one's "
        "within 1.0 ms.",
        "12 inputs were skipped because the device was busy (serving comes first).",
    ]
    assert cam1["severity_words"].startswith("this device's inputs differ from the data the new model")
    assert (cam1["state_words"], cam1["compared"], cam1["abs_error_max"]) == (
        "trying the new model",
        1200,
        0.25,
    )
    assert cam2["state_words"].startswith("the new model failed here and was unloaded")
    assert cam2["error"] == "it returned NaN or infinity" and cam2["severity_words"] == "not judged yet"
    total = view["total"]
    assert (total["compared"], total["dropped"], total["agreed"]) == (1240, 12, 1204)
    assert total["words"][0] == "The new model agreed with the current one on 97% of 1,240 inputs (96–98%)."
    assert (total["serving_p50_ms"], total["serving_p95_ms"]) == (1.0, 2.0)
    assert (total["candidate_p50_ms"], total["candidate_p95_ms"]) == (1.1, 2.4)
    assert "Half of its answers come within 1.1 ms, the current one's within 1.0 ms." in total["words"][1]


def test_a_viewer_may_not_promote_or_stop(shop):  # noqa: F811 - the fixture imported above
    tried(shop)
    viewer, csrf = signed_in(create_app(shop), VIEWER)
    assert viewer.get("/api/shadow").status_code == 200  # a viewer reads
    for action in ("promote", "stop"):
        refused = viewer.post(f"/api/shadow/shop/{action}", json={}, headers={"X-CSRF-Token": csrf})
        assert refused.status_code == 403
        assert refused.json()["error"] == f"{VIEWER[0]} is a viewer; only an operator can do this"
    log = [(e.actor, e.action, e.result) for e in ControlPlane(shop).audit_log()[:2]]
    assert log == [(VIEWER[0], "shadow-stop", "refused"), (VIEWER[0], "shadow-promote", "refused")]
    operator, csrf = signed_in(create_app(shop), OPERATOR)
    bad = operator.post("/api/shadow/shop/promote", json={"min_agreement": 7}, headers={"X-CSRF-Token": csrf})
    assert bad.status_code == 400 and "min_agreement must be a number from 0 to 1" in bad.json()["error"]


@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_the_page_renders_the_sentences_in_headless_chromium(registry):
    tried(registry, cam1_agreed=1164)
    with serving(create_app(registry)) as url:
        page = chromium_dom(url + "/shadow")
    assert "digits@2.0.0 tried beside the serving model on 2 device(s) of fleet shop" in page
    assert "The new model agreed with the current one on 97% of 1,200 inputs (96–98%)." in page
    assert "Why it failed: it returned NaN or infinity" in page and 'data-state="failed"' in page
    assert "agreement 97.1% (96.0%–97.9%)" in page
    # Half and 95% of the answers within, per model: in cam-1's row and in the total.
    assert "current model: half / 95% of answers within" in page
    assert page.count("<td>1.0 ms / 2.0 ms</td><td>1.1 ms / 2.4 ms</td>") == 3, page  # cam-1, cam-2, total
    assert "button" not in page.split('id="shadows"')[1]  # nobody signed in: no buttons


@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_an_operator_is_told_why_promote_was_refused_and_stops_the_shadow_by_clicking(
    shop,  # noqa: F811 - the fixture imported above
    registry_url,
    browser,  # noqa: F811 - the fixture imported above
    mosquitto,
    edgekit_home,
    digits_models,
):
    assert edgekit("keys", "init").returncode == 0
    pushed = edgekit("push", str(digits_models.fp32), "--fleet", "shop", "--version", "1.1.0",
                     "--broker", mosquitto.url, "--registry", registry_url)  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    tried(shop, cam1_agreed=900)  # 75%
    with serving(create_app(shop, api=ApiContext(shop, mosquitto.url, edgekit_home))) as base:
        sign_in(browser, base, OPERATOR)
        browser.goto(base + "/shadow")
        browser.wait_for("document.querySelector('section.shadow button.promote') !== null")
        assert browser.evaluate("document.querySelector('button.promote').textContent") == (
            "Switch fleet shop to digits@2.0.0"
        )
        browser.evaluate("document.querySelector('button.promote').click()")
        browser.wait_for("document.querySelector('ul.refusal') !== null")
        assert browser.dialogs[-1].startswith("Switch fleet shop to digits@2.0.0?")
        reasons = browser.evaluate(
            "[...document.querySelectorAll('ul.refusal li')].map((li) => li.textContent)"
        )
        assert reasons == [
            "cam-1: agreement 75.0% is below 98.0% (900 of 1200 inputs)",
            "cam-2: the candidate failed there (it returned NaN or infinity)",
        ]
        assert "was not rolled out: nothing changed" in browser.evaluate(
            "document.querySelector('.shadow-result').textContent"
        )
        if os.environ.get("EDGEKIT_SCREENSHOTS"):  # =docs/images refreshes the picture in docs/fleet.md
            browser.screenshot(Path(os.environ["EDGEKIT_SCREENSHOTS"]) / "dashboard-shadow.png", height=900)
        browser.evaluate("document.querySelector('button.stop').click()")
        assert browser.dialogs[-1].startswith("Stop trying digits@2.0.0 on fleet shop?")
        browser.wait_for("document.querySelector('.shadow-result').textContent.includes('told to stop')")
    state = retained_desired_state(mosquitto.url, Topics().fleet_desired("shop"))
    assert "shadow" not in state and state["bundle"]["version"] == "1.1.0"
    log = [(e.actor, e.action, e.result) for e in ControlPlane(shop).audit_log()[:2]]
    assert log == [(OPERATOR[0], "shadow-stop", "ok"), (OPERATOR[0], "shadow-promote", "failed")]


def test_a_tiny_models_latency_is_shown_in_microseconds_not_as_zero():
    from edgekit.fleet.dashboard.shadow import speed_words

    figures = {
        "serving_p50_ms": 0.003, "serving_p95_ms": 0.004, "candidate_p50_ms": 0.005,
        "candidate_p95_ms": 0.006, "latency_ratio": 1.5,
    }  # fmt: skip
    assert speed_words(figures) == (
        "The new model answers within 0.006 ms, the current one within 0.004 ms on the same inputs "
        "(95% of answers): 1.50× as long. Half of its answers come within 0.005 ms, the current "
        "one's within 0.003 ms."
    )
