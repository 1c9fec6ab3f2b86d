"""The dashboard: JSON API, Prometheus metrics, token, and the pages in headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator

import pytest
import uvicorn
from edgekit import ConfigError
from edgekit.fleet.dashboard import FleetMetrics, check_bind, create_app
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
    assert client.get("/api/devices/nope").status_code == 404
    assert client.get("/api/events?device=cam-1&limit=x").status_code == 200


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


@pytest.fixture
def served(registry) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(registry), host="127.0.0.1", port=port, log_level="warning")
    )
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
def test_pages_render_in_headless_chromium(served):
    overview = chromium_dom(served + "/")
    assert 'data-device="cam-1"' in overview and 'data-device="door-1"' in overview
    assert 'class="is-offline"' in overview  # the offline device stands out
    assert "is-drifted" in overview and "drifted 0.29" in overview  # an agent without severities
    assert "is-affected" in overview and "model affected: estimated accuracy 61% (52-70%)" in overview
    assert "1 model affected" in overview
    assert "installed digits@1.1.0" in overview
    device = chromium_dom(served + "/devices/cam-1")
    assert "cam-1 (shop)" in device
    # uPlot drew both charts: a canvas each, with the series legend.
    assert device.count("<canvas") >= 2 and "p95" in device and "drift score" in device
    door = chromium_dom(served + "/devices/door-1")
    assert "model affected: estimated accuracy 61% (52-70%)" in door
    assert door.count("<canvas") >= 3 and "estimated accuracy" in door
