"""The dashboard: JSON API, Prometheus metrics, token, and the pages in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import uvicorn
from edgekit import ConfigError
from edgekit.fleet.control import ControlPlane
from edgekit.fleet.dashboard import FleetMetrics, check_bind, create_app
from edgekit.fleet.registry import TelemetryRow
from edgekit.fleet.rollout import Rollout, RolloutPolicy
from helpers import free_port
from starlette.testclient import TestClient


def test_json_api(registry):
    client = TestClient(create_app(registry))
    fleets = {f["fleet"]: f for f in client.get("/api/fleets").json()}
    assert fleets["shop"] == {
        "fleet": "shop",
        "devices": 2,
        "online": 1,
        "offline": 1,
        "drifted": 1,
        "model_affected": 0,
        "inputs_changed": 0,
        "versions": {"1.1.0": 1, "1.0.0": 1},
    }
    assert fleets["lobby"]["model_affected"] == 1
    devices = {d["device"]: d for d in client.get("/api/devices?fleet=shop").json()}
    assert set(devices) == {"cam-1", "cam-2"}
    assert devices["cam-1"]["drifted"] is True and devices["cam-1"]["latency_p95_ms"] == pytest.approx(4.9)
    assert devices["cam-2"]["online"] is False
    door = client.get("/api/devices/door-1").json()
    assert door["drift_severity"] == "model affected"
    assert door["accuracy"] == {"estimate": 0.61, "low": 0.52, "high": 0.7}
    assert door["drift_text"] == "model affected: estimated accuracy 61% (52-70%)"
    (window,) = client.get("/api/devices/door-1/telemetry?hours=1").json()
    assert window["drift_severity"] == "model affected" and window["accuracy"]["estimate"] == 0.61
    one = client.get("/api/devices/cam-1").json()
    assert one["events"][0]["message"] == "installed digits@1.1.0"
    series = client.get("/api/devices/cam-1/telemetry?hours=1").json()
    assert [r["seq"] for r in series] == list(range(30))
    assert {"cpu_percent", "memory_mb", "temperature_c"} <= set(series[0])
    # Per 5 minutes of the last hour: cam-1 reported (with 1.1.0); cam-2 sent no telemetry.
    history = client.get("/api/fleets/shop/history?hours=1").json()
    assert history["bucket_s"] == 300 and 6 <= len(history["points"]) <= 7
    assert all(p["reporting"] == 1 and p["versions"] == {"1.1.0": 1} for p in history["points"])
    assert all(b["t"] - a["t"] == 300 for a, b in zip(history["points"], history["points"][1:]))
    assert client.get("/api/fleets/nowhere/history").json()["points"] == []
    assert client.get("/api/devices/nope").status_code == 404
    assert client.get("/api/events?device=cam-1&limit=x").status_code == 200
    # When cam-1's drift began: the start of its first drifted window after the last calm one.
    assert devices["cam-1"]["drifted_since"] == series[-1]["window_start"]  # only the last window drifted
    assert (
        devices["cam-2"]["drifted_since"] is None
        and one["drifted_since"] == devices["cam-1"]["drifted_since"]
    )
    assert client.get("/api/alerts?open=1").json() == []


def opened(registry, home) -> None:
    """One round of the alert evaluator, alerting on offline devices at once."""
    from edgekit.fleet.alerts import AlertStore, Evaluator

    AlertStore(registry, home).set_rule("offline", ["offline_after=0"], datetime.now(timezone.utc))
    Evaluator(registry, home).tick()


def test_open_alerts_are_listed(registry, tmp_path):
    opened(registry, tmp_path)
    client = TestClient(create_app(registry))
    alerts = {(a["rule"], a["device"]): a for a in client.get("/api/alerts?open=1").json()}
    # cam-2 offline for an hour; door-1's model is affected; cam-1's agent predates severities
    # and is judged by its drift flag.
    assert set(alerts) == {("offline", "cam-2"), ("drift", "door-1"), ("drift", "cam-1")}
    assert alerts["offline", "cam-2"]["summary"] == "cam-2 is offline"
    assert alerts["drift", "door-1"]["summary"] == "door-1: its model is likely making more mistakes"


def test_prometheus_metrics_with_a_cardinality_cap(registry):
    metrics = FleetMetrics(registry, device_series_cap=1)
    metrics.ingested.inc(30)
    metrics.rejected.labels(kind="telemetry", reason="malformed").inc()
    text = TestClient(create_app(registry, metrics)).get("/metrics").text
    assert "edgekit_telemetry_ingested_total 30.0" in text
    assert 'edgekit_messages_rejected_total{kind="telemetry",reason="malformed"} 1.0' in text
    assert 'edgekit_devices{fleet="shop",state="offline"} 1.0' in text
    assert 'edgekit_devices{fleet="shop",state="drifted"} 1.0' in text
    # Only one device keeps per-device series: the one whose model is affected comes first.
    assert text.count("edgekit_device_drift_score{") == 1
    assert 'edgekit_device_drift_score{device="door-1",fleet="lobby"}' in text
    assert 'edgekit_device_estimated_accuracy{device="door-1",fleet="lobby"} 0.61' in text
    # Without it, the drifted one (an agent without severities) is kept before a calm one.
    two = TestClient(create_app(registry, FleetMetrics(registry, device_series_cap=2))).get("/metrics").text
    assert 'edgekit_device_drift_score{device="cam-1",fleet="shop"}' in two
    assert "edgekit_device_series_capped 2.0" in text
    assert 'edgekit_devices{fleet="lobby",state="model_affected"} 1.0' in text


def test_a_token_is_required_when_set(registry):
    client = TestClient(create_app(registry, token="s3cret"))
    assert client.get("/api/devices").status_code == 401
    assert client.get("/api/devices", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/devices", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/?token=s3cret").status_code == 200
    assert client.get("/api/devices").status_code == 200  # the cookie set by ?token= carries on


def test_binding_beyond_localhost_needs_a_token():
    for host in ("127.0.0.1", "localhost", "::1"):
        check_bind(host, None)
    check_bind("0.0.0.0", "s3cret")
    with pytest.raises(ConfigError, match="set a token"):
        check_bind("0.0.0.0", None)


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` under uvicorn on a free port; its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    started = threading.Event()
    while not started.is_set() and thread.is_alive():
        started.wait(0.02)
        if server.started:
            started.set()
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def served(registry, tmp_path) -> Iterator[str]:
    with serving(create_app(registry)) as url:
        yield url


def save_rollout(registry) -> None:
    """A rollout of digits@1.1.0 to fleet shop, started by ann, soaking on canary cam-1 (which
    serves it), in the control plane."""
    now = time.time()
    rollout = Rollout(
        fleet="shop",
        bundle_id="a" * 64,
        label="digits@1.1.0",
        previous_bundle_id="b" * 64,
        devices=("cam-1", "cam-2"),
        canaries=("cam-1",),
        phase="soak",
        phase_since=now - 120,
        started_at=now - 3600,
        baseline_p95_ms={"cam-1": 4.0},
        policy=asdict(RolloutPolicy(canary=1, soak_s=600)),
    )
    ControlPlane(registry, actor="ann").save_rollout(rollout, new=True)


def test_the_rollout_view_puts_each_abort_criterion_beside_what_the_canaries_measure(registry):
    client = TestClient(create_app(registry))
    assert client.get("/api/rollouts").json() == []  # none yet
    save_rollout(registry)
    (view,) = client.get("/api/rollouts").json()
    assert (view["fleet"], view["label"], view["phase_words"], view["started_by"]) == (
        "shop",
        "digits@1.1.0",
        "the canaries serve it; watching them",
        "ann",
    )
    cam1, cam2 = view["devices"]
    assert cam1["canary"] and cam1["serving"] and cam1["state"] == "serves digits@1.1.0"
    assert (cam1["predictions"], cam1["error_rate"], cam1["baseline_p95_ms"]) == (1500, 0.0, 4.0)
    assert cam1["p95_ms"] == pytest.approx(4.9)
    assert (cam2["canary"], cam2["state"]) == (False, "offline")
    assert [c["limit"] for c in view["criteria"]][:2] == [
        "at most 5.0%",
        "at most 50% above the canary's p95 before the rollout",
    ]


def chromium_dom(url: str) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is not installed; `make test` installs it (apt-get install chromium)"
    result = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=8000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_pages_render_in_headless_chromium(served, registry, tmp_path):
    overview = chromium_dom(served + "/")
    assert 'data-device="cam-1"' in overview and 'data-device="door-1"' in overview
    assert 'class="is-offline"' in overview  # the offline device stands out
    assert "is-drifted" in overview and "drifted 0.29" in overview  # an agent without severities
    assert "is-affected" in overview and "model affected: estimated accuracy 61% (52-70%)" in overview
    assert "1 model affected" in overview
    # Drift in words, with when it began; a calm device says so.
    assert re.search(r"drifted 0\.29 since \d", overview)
    assert "inputs no longer look like the training data" in overview
    assert "No open alerts" in overview
    assert "installed digits@1.1.0" in overview
    device = chromium_dom(served + "/devices/cam-1")
    assert "cam-1 (shop)" in device
    # uPlot drew both charts: a canvas each, with the series legend.
    assert device.count("<canvas") >= 4 and "p95" in device and "drift score" in device
    assert "CPU %" in device and "memory MB" in device and "temperature °C" in device
    # The drift threshold is drawn on the drift chart (a dashed series of its own).
    assert re.search(r'id="drift-chart"[^>]*data-threshold="0.25"', device) and ">threshold<" in device
    door = chromium_dom(served + "/devices/door-1")
    assert "model affected: estimated accuracy 61% (52-70%)" in door
    assert "estimated accuracy" in door
    # One telemetry point: the time axis still covers the last 24 hours, not years.
    now = datetime.now(timezone.utc)
    registry.add_telemetry(
        [TelemetryRow("door-1", 1, now - timedelta(minutes=1), now, 5, 0, 1.0, 2.0, 3.0, drift_score=0.01)]
    )
    door = chromium_dom(served + "/devices/door-1")
    start, end = (
        int(v) for v in re.search(r'id="latency-chart"[^>]*data-from="(\d+)" data-to="(\d+)"', door).groups()
    )
    assert 24 * 3600 <= end - start <= 24 * 3600 + 600
    assert "inputs look like the training data" in door
    week = chromium_dom(served + "/devices/door-1?hours=168")
    start, end = (
        int(v) for v in re.search(r'id="latency-chart"[^>]*data-from="(\d+)" data-to="(\d+)"', week).groups()
    )
    assert 168 * 3600 <= end - start <= 168 * 3600 + 600

    fleet = chromium_dom(served + "/fleets/shop")
    assert 'data-versions="1.1.0"' in fleet and "version 1.1.0" in fleet and "reporting" in fleet
    assert 'href="/fleets/shop"' in overview

    save_rollout(registry)
    rollouts = chromium_dom(served + "/rollouts")
    assert "digits@1.1.0 to fleet shop: the canaries serve it; watching them" in rollouts
    assert "cam-1: 0.0% of 1500 predictions" in rollouts and "cam-1: 4.9 ms (4.0 ms before)" in rollouts
    assert 'data-device="cam-2"' in rollouts and "offline" in rollouts

    opened(registry, tmp_path)
    overview = chromium_dom(served + "/")
    assert "cam-2 is offline" in overview and 'href="/devices/cam-2"' in overview
