"""`edgekit fleet serve` end to end: a real agent process, a real Mosquitto, the real CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_fleet_cli import BIN, edgekit
from test_push import Fleet, fleet, push_and_wait  # noqa: F401 - fleet is a fixture


class Served:
    """A running `edgekit fleet serve --json` (or `fleet up`): its URLs, and its final counts
    once stopped."""

    def __init__(self, args: list[str], log: Path, command: str = "serve", new_session: bool = False) -> None:
        """``new_session``: in a process group of its own, so a test can kill it with its workers."""
        self.log = log
        self.process = subprocess.Popen(
            [
                str(BIN / "edgekit"),
                "--log-level",
                "info",
                "fleet",
                command,
                "--http-port",
                "0",
                "--json",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),
            text=True,
            start_new_session=new_session,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # printed once every worker is connected
        assert line, f"fleet serve exited: {log.read_text()[-3000:]}"
        self.urls = json.loads(line)

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.urls["dashboard"] + path, timeout=10) as response:
            return response.read().decode()

    def stop(self) -> dict:
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=90)
        assert self.process.returncode == 0, self.log.read_text()[-3000:]
        return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def serve(mosquitto, tmp_path) -> Iterator:
    started: list[Served] = []

    def start(*args: str, new_session: bool = False) -> Served:
        served = Served(
            ["--broker", mosquitto.url, *args],
            tmp_path / f"serve-{len(started)}.log",
            new_session=new_session,
        )
        started.append(served)
        return served

    yield start
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait(10)


def wait_until(check, served: Served, what: str, timeout: float = 120.0):
    """Poll the dashboard's JSON API until ``check()`` holds; each poll is an HTTP round trip
    to the service, and the loop is bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)  # polling an HTTP API: there is no event to wait on from outside the process
    raise AssertionError(f"{what} never happened; serve log: {served.log.read_text()[-3000:]}")


def status(registry_url: str) -> list[dict]:
    result = edgekit("fleet", "status", "--registry", registry_url, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_an_agents_state_telemetry_and_events_reach_the_registry(
    serve,
    fleet: Fleet,  # noqa: F811 - the fixture imported above
    mosquitto,
    registry_url,
    digits_models,
):
    served = serve("--registry", registry_url, "--workers", "2")
    fleet.start("cam-1")
    push_and_wait(digits_models.fp32, mosquitto.url, "--version", "1.0.0")

    def serving_with_telemetry():
        devices = json.loads(served.get("api/devices"))
        if not devices or devices[0]["version"] != "1.0.0" or not devices[0]["online"]:
            return False
        return json.loads(served.get("api/devices/cam-1/telemetry"))

    wait_until(serving_with_telemetry, served, "cam-1 serving 1.0.0 with telemetry")
    (cam,) = status(registry_url)
    assert (cam["device"], cam["fleet"], cam["status"], cam["drifted"]) == ("cam-1", "lab", "serving", False)
    events = json.loads(edgekit("fleet", "events", "--registry", registry_url, "--json").stdout)
    assert any(e["device"] == "cam-1" and "1.0.0" in e["message"] for e in events), events
    (inventory,) = json.loads(edgekit("fleet", "devices", "--registry", registry_url, "--json").stdout)
    assert inventory["bundle"] and inventory["version"] == "1.0.0" and len(inventory["bundle_id"]) == 64
    assert inventory["first_seen"] <= inventory["last_seen"] and inventory["online"] is True
    assert json.loads(served.get("api/devices"))[0]["device"] == "cam-1"
    metrics = served.get("metrics")
    assert (
        "edgekit_telemetry_ingested_total" in metrics
        and 'edgekit_devices{fleet="lab",state="online"} 1.0' in metrics
    )

    fleet.stop()  # the agent says "offline" on its way out
    wait_until(lambda: not json.loads(served.get("api/devices"))[0]["online"], served, "cam-1 offline")
    final = served.stop()
    assert final["stopped"] and final["telemetry"] >= 1 and final["events"] >= 1 and final["rejected"] == 0


def test_serve_refuses_bad_setups_with_one_line(mosquitto, tmp_path):
    registry = f"sqlite:///{tmp_path / 'r.db'}"
    wide = edgekit("fleet", "serve", "--broker", mosquitto.url, "--registry", registry, "--host", "0.0.0.0")
    assert wide.returncode == 2 and "set a token" in wide.stderr and "Traceback" not in wide.stderr
    gone = edgekit("fleet", "serve", "--broker", "mqtt://127.0.0.1:1", "--registry", registry)
    assert gone.returncode == 12 and "could not connect" in gone.stderr and "Traceback" not in gone.stderr


def test_fleet_up_runs_broker_ingest_controller_and_dashboard_from_one_command(
    fleet: Fleet,  # noqa: F811 - the fixture imported above
    edgekit_home,
    tmp_path,
    digits_models,
):
    from helpers import free_port

    # --embedded: these agents have no broker accounts (fleet up's Mosquitto, with accounts and
    # ACLs, is tested in tests/fleet/test_broker_matrix.py).
    up = Served(["--port", str(free_port()), "--embedded"], tmp_path / "up.log", command="up")
    try:
        assert up.urls["embedded_broker"] is True and up.urls["broker_kind"] == "embedded"
        assert up.urls["broker_acl"] is False and "protocol" not in up.urls["broker"]
        assert up.urls["registry"] == f"sqlite:///{edgekit_home / 'registry.db'}"  # the default
        fleet.broker = up.urls["broker"]  # the agent talks to the embedded broker
        fleet.start("cam-1")
        push_and_wait(digits_models.fp32, up.urls["broker"], "--version", "1.0.0")

        def serving_with_telemetry():
            devices = json.loads(up.get("api/devices"))
            if not devices or devices[0]["version"] != "1.0.0":
                return False
            return json.loads(up.get("api/devices/cam-1/telemetry"))

        wait_until(serving_with_telemetry, up, "cam-1 serving 1.0.0 with telemetry, through fleet up")
        assert status(up.urls["registry"])[0]["online"] is True
    finally:
        fleet.stop()
        final = up.stop()
    assert final["stopped"] and final["telemetry"] >= 1 and final["rejected"] == 0
