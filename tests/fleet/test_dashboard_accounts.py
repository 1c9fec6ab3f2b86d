"""The dashboard acts: accounts with roles, sessions, CSRF, the acknowledge action and the audit
log, through the API, the CLI, and in headless Chromium by clicking."""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cdp import Browser
from edgekit.errors import ConfigError
from edgekit.fleet.accounts import Accounts
from edgekit.fleet.alerts import AlertStore, Evaluator
from edgekit.fleet.api import ApiContext
from edgekit.fleet.control import ControlPlane, FleetRecord
from edgekit.fleet.dashboard import check_bind, create_app
from edgekit.fleet.registry.models import Account
from edgekit.mqtt import MqttClient
from edgekit.topics import Topics
from sqlalchemy import select
from starlette.testclient import TestClient
from test_dashboard import save_rollout, serving
from test_fleet_cli import edgekit

NOW = datetime.now(timezone.utc)
SCREENSHOTS = os.environ.get("EDGEKIT_SCREENSHOTS")
OPERATOR, VIEWER = ("olga", "operator-pass-1"), ("victor", "viewer-pass-22")


@pytest.fixture
def shop(registry, tmp_path):
    """The populated registry with an operator, a viewer and two open alerts."""
    accounts = Accounts(registry)
    accounts.add(OPERATOR[0], "operator", OPERATOR[1])
    accounts.add(VIEWER[0], "viewer", VIEWER[1])
    AlertStore(registry, tmp_path).set_rule("offline", ["offline_after=0"], NOW)
    Evaluator(registry, tmp_path).tick()
    return registry


def audit_log(registry):
    return ControlPlane(registry).audit_log()


def signed_in(app, who: tuple[str, str]) -> tuple[TestClient, str]:
    client = TestClient(app)
    response = client.post("/api/login", json={"name": who[0], "password": who[1]})
    assert response.status_code == 200, response.text
    session = client.get("/api/session").json()
    assert session["user"] == who[0] and session["csrf"]
    return client, session["csrf"]


def test_operators_act_viewers_read_and_every_refusal_is_audited(shop):
    app = create_app(shop)
    (alert,) = [a for a in AlertStore(shop, None).alerts(open_only=True) if a.rule == "offline"]
    anonymous = TestClient(app)
    assert anonymous.get("/", follow_redirects=False).headers["location"] == "/login"
    assert anonymous.get("/api/devices").status_code == 401
    assert anonymous.get("/login").status_code == 200
    assert anonymous.post("/api/login", json={"name": OPERATOR[0], "password": "wrong"}).status_code == 401

    viewer, viewer_csrf = signed_in(app, VIEWER)
    assert viewer.get("/api/devices").status_code == 200
    refused = viewer.post(f"/api/alerts/{alert.id}/ack", headers={"X-CSRF-Token": viewer_csrf})
    assert refused.status_code == 403 and "viewer" in refused.json()["error"]

    operator, csrf = signed_in(app, OPERATOR)
    assert operator.post(f"/api/alerts/{alert.id}/ack").status_code == 403  # no CSRF token: a forged form
    assert (
        operator.post(f"/api/alerts/{alert.id}/ack", headers={"X-CSRF-Token": viewer_csrf}).status_code == 403
    )
    done = operator.post(f"/api/alerts/{alert.id}/ack", headers={"X-CSRF-Token": csrf})
    assert done.status_code == 200 and done.json()["acked_by"] == OPERATOR[0]

    log = [(e.actor, e.action, e.result) for e in reversed(audit_log(shop))]
    assert log == [
        (OPERATOR[0], "sign-in", "refused"),
        (VIEWER[0], "sign-in", "ok"),
        (VIEWER[0], "alert-ack", "refused"),
        (OPERATOR[0], "sign-in", "ok"),
        (OPERATOR[0], "alert-ack", "refused"),
        (OPERATOR[0], "alert-ack", "refused"),
        (OPERATOR[0], "alert-ack", "ok"),
    ]
    assert "CSRF" in audit_log(shop)[1].detail
    assert operator.get("/api/audit").json()[0]["target"] == f"alert {alert.id}: cam-2 is offline"

    # Passwords are kept as scrypt hashes only; a removed account's session ends at once.
    with shop.session() as session:
        hashes = list(session.execute(select(Account.password_hash)).scalars())
    assert all(h.startswith("scrypt$") and OPERATOR[1] not in h and VIEWER[1] not in h for h in hashes)
    Accounts(shop).remove(VIEWER[0])
    assert viewer.get("/api/devices").status_code == 401


def test_the_token_keeps_working_for_scripts_and_metrics(shop):
    app = create_app(shop, token="s3cret-token")
    bearer = {"Authorization": "Bearer s3cret-token"}
    client = TestClient(app)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer).status_code == 200
    (alert, *_) = AlertStore(shop, None).alerts(open_only=True)
    done = client.post(f"/api/alerts/{alert.id}/ack", headers=bearer)  # a script: no CSRF needed
    assert done.status_code == 200 and done.json()["acked_by"] == "token"
    browser = TestClient(app)
    assert browser.get("/?token=s3cret-token").status_code == 200  # a browser with ?token= reads
    assert browser.post(f"/api/alerts/{alert.id}/ack").status_code == 403


def test_binding_beyond_localhost_needs_a_token_or_accounts():
    check_bind("0.0.0.0", None, accounts=True)
    with pytest.raises(ConfigError, match="add an account"):
        check_bind("0.0.0.0", None, accounts=False)


@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_acknowledging_from_the_cli_is_audited(shop, registry_url):
    (alert, *_) = AlertStore(shop, None).alerts(open_only=True)
    assert edgekit("alerts", "ack", str(alert.id), "--registry", registry_url).returncode == 0
    missing = edgekit("alerts", "ack", "999", "--registry", registry_url)
    assert missing.returncode == 2 and "no alert 999" in missing.stderr and "Traceback" not in missing.stderr
    log = json.loads(edgekit("fleet", "audit", "--json", "--registry", registry_url).stdout)
    assert [(e["action"], e["result"]) for e in log[:2]] == [("alert-ack", "failed"), ("alert-ack", "ok")]
    assert log[1]["target"] == f"alert {alert.id}: {alert.summary}"


@pytest.fixture
def served(shop) -> Iterator[str]:
    with serving(create_app(shop)) as url:
        yield url


@pytest.fixture
def browser() -> Iterator[Browser]:
    b = Browser()
    yield b
    b.close()


def sign_in(browser: Browser, base: str, who: tuple[str, str]) -> None:
    browser.goto(base + "/login")
    fill(browser, who)
    browser.wait_for(
        "location.pathname === '/' && document.querySelector('#who').textContent.includes('signed in')"
    )


@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_an_operator_acknowledges_an_alert_by_clicking_and_a_viewer_sees_no_button(served, browser, shop):
    browser.goto(served + "/")  # redirected to the sign-in page
    browser.wait_for("location.pathname === '/login'")
    fill(browser, (OPERATOR[0], "not the password"))
    browser.wait_for("document.getElementById('login-error').textContent === 'wrong name or password'")

    sign_in(browser, served, VIEWER)
    browser.wait_for("document.querySelectorAll('#alerts tr[data-alert]').length === 3")
    assert browser.evaluate("document.querySelectorAll('button.ack').length") == 0
    browser.evaluate("document.getElementById('sign-out').click()")
    browser.wait_for("location.pathname === '/login'")

    sign_in(browser, served, OPERATOR)
    browser.wait_for("document.querySelector('#alerts tr.rule-offline button.ack') !== null")
    browser.evaluate("document.querySelector('#alerts tr.rule-offline button.ack').click()")
    (question,) = browser.dialogs
    assert question.startswith("Acknowledge alert ") and '"cam-2 is offline"' in question
    assert "stays open until the problem clears" in question
    browser.wait_for("document.querySelector('#alerts tr.rule-offline').textContent.includes('by olga')")
    browser.wait_for("document.querySelector('#audit tbody').textContent.includes('alert-ack')")
    (alert,) = [a for a in AlertStore(shop, None).alerts(open_only=True) if a.rule == "offline"]
    assert alert.acked_by == OPERATOR[0]
    assert browser.evaluate("document.querySelectorAll('#alerts tr.rule-offline button.ack').length") == 0
    if SCREENSHOTS:  # EDGEKIT_SCREENSHOTS=docs/images refreshes the pictures of docs/fleet.md
        browser.screenshot(Path(SCREENSHOTS) / "dashboard-overview.png", height=1000)
        browser.goto(served + "/devices/cam-1")
        browser.wait_for("document.querySelectorAll('canvas').length >= 3")
        browser.screenshot(Path(SCREENSHOTS) / "dashboard-device.png", height=1100)


def fill(browser: Browser, who: tuple[str, str]) -> None:
    browser.evaluate(
        f"document.getElementById('name').value = {json.dumps(who[0])};"
        f"document.getElementById('password').value = {json.dumps(who[1])};"
        "document.getElementById('sign-in').click()"
    )


def retained_desired_state(broker: str, topic: str) -> dict:
    """The signed desired state retained on ``topic``, decoded (its signature is the agents'
    business; here: what it names)."""
    told = threading.Event()
    desired: list[bytes] = []

    def got(message) -> None:
        desired.append(message.payload)
        told.set()

    client = MqttClient(broker).connect()
    try:
        client.subscribe(topic, got)
        assert told.wait(10), f"no desired state on {topic}"
    finally:
        client.close()
    return dict(json.loads(base64.b64decode(json.loads(desired[-1])["payload"])))


@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_an_operator_aborts_a_rollout_by_clicking_through_the_code_of_rollout_abort(
    shop, browser, mosquitto, edgekit_home
):
    """The Abort button does what `edgekit rollout abort` does: the canary is told (a signed,
    retained desired state) to go back to the previous bundle, and the saved rollout says
    aborted."""

    assert edgekit("keys", "init").returncode == 0
    save_rollout(shop)  # digits@1.1.0 to fleet shop, soaking on canary cam-1
    history = [{"id": "b" * 64, "label": "digits@1.0.0"}, {"id": "a" * 64, "label": "digits@1.1.0"}]
    control = ControlPlane(shop, actor="ann")
    control.save_record(FleetRecord("shop", bundle_id="a" * 64, label="digits@1.1.0", history=history))
    control.next_seq("shop", above=3)
    with serving(create_app(shop, api=ApiContext(shop, mosquitto.url, edgekit_home))) as base:
        sign_in(browser, base, OPERATOR)
        browser.goto(base + "/rollouts")
        browser.wait_for("document.querySelector('button.abort') !== null")
        browser.evaluate("document.querySelector('button.abort').click()")
        (question,) = browser.dialogs
        assert question.startswith("Stop the rollout of digits@1.1.0 to fleet shop?")
        assert "(cam-1) are sent back to the previous version" in question
        browser.wait_for("document.querySelector('section.rollout').classList.contains('phase-aborted')")
        assert "aborted by olga" in browser.evaluate("document.querySelector('section.rollout').textContent")
        assert browser.evaluate("document.querySelectorAll('button.abort').length") == 0

    assert control.rollout("shop").phase == "aborted"
    state = retained_desired_state(mosquitto.url, Topics().device_desired("cam-1"))
    assert (state["bundle"]["name"], state["bundle"]["sha256"]) == ("digits", "b" * 64)  # back to 1.0.0
    (entry, *_) = audit_log(shop)
    assert (entry.actor, entry.action, entry.result) == (OPERATOR[0], "rollout-abort", "ok")


@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_an_operator_rolls_a_fleet_back_by_clicking_through_the_code_of_fleet_rollback(
    shop, registry_url, browser, mosquitto, edgekit_home, digits_models
):
    assert edgekit("keys", "init").returncode == 0
    for version in ("1.0.0", "1.1.0"):
        pushed = edgekit(
            "push",
            str(digits_models.fp32),
            "--fleet",
            "shop",
            "--version",
            version,
            "--broker",
            mosquitto.url,
            "--registry",
            registry_url,
        )
        assert pushed.returncode == 0, pushed.stderr
    before, current = ControlPlane(shop).record("shop").history[-2:]
    assert before["label"].endswith("@1.0.0") and current["label"].endswith("@1.1.0")
    with serving(create_app(shop, api=ApiContext(shop, mosquitto.url, edgekit_home))) as base:
        sign_in(browser, base, OPERATOR)
        browser.goto(base + "/fleets/shop")
        browser.wait_for("document.querySelector('button.rollback') !== null")
        assert browser.evaluate("document.querySelector('button.rollback').textContent") == (
            f"Roll the fleet back to {before['label']}"
        )
        browser.evaluate("document.querySelector('button.rollback').click()")
        (question,) = browser.dialogs
        assert question.startswith(f"Send every device of fleet shop back to {before['label']}?")
        browser.wait_for("document.getElementById('fleet-actions').textContent.includes('told to go back')")

    state = retained_desired_state(mosquitto.url, Topics().fleet_desired("shop"))
    assert state["bundle"]["sha256"] == before["id"]  # the whole fleet: back to 1.0.0
    (kept,) = [d for d in ControlPlane(shop).desired_states() if d.fleet == "shop" and not d.device]
    assert (kept.seq, kept.bundle_id) == (state["seq"], before["id"])  # for the expiry rule
    (entry, *_) = audit_log(shop)
    assert (entry.actor, entry.action, entry.result, entry.target) == (
        OPERATOR[0],
        "rollback",
        "ok",
        before["label"],
    )
