"""`edgekit push` end to end: real agent processes, a real Mosquitto, the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from edgekit.keys import load_own_public_key
from helpers import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "agent"))
from test_daemon import Watcher

BIN = Path(sys.executable).parent
DEVICES = [f"cam-{i}" for i in range(1, 6)]


def edgekit(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "edgekit"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"} if env is None else env,
    )


def control_of(home: Path, url: str | None = None) -> Any:
    """The control plane `edgekit push` uses with EDGEKIT_HOME=home (its registry, by default
    the SQLite database under home), trusting home's signing key when there is one."""
    from edgekit import TrustedKeys
    from edgekit.fleet.control import ControlPlane

    trusted = TrustedKeys([load_own_public_key(home)]) if (home / "keys").is_dir() else None
    return ControlPlane.open(url or f"sqlite:///{home / 'registry.db'}", trusted)


def catalogued(home: Path, name: str, version: str, out: Path) -> Path:
    """The catalog's copy of name@version, written to ``out``."""
    with control_of(home) as control:
        out.write_bytes(control.catalog.data(name, version))
    return out


def push_and_wait(target: Path, broker: str, *extra: str) -> dict:
    """`edgekit push TARGET --fleet lab --wait --json`; its outcome, after asserting it succeeded."""
    result = edgekit(
        "push",
        str(target),
        "--fleet",
        "lab",
        "--wait",
        "--timeout",
        "120",
        "--broker",
        broker,
        "--json",
        *extra,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class Fleet:
    """Agent processes (`edgekit-agent run`), each with its own config and state directory."""

    def __init__(self, root: Path, broker: str, home: Path) -> None:
        self.root = root
        self.broker = broker
        self.pem = load_own_public_key(home).pem().decode()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def config(self, device: str) -> Path:
        path = self.root / f"{device}.toml"
        path.write_text(
            "\n".join(
                [
                    f'device = "{device}"',
                    'fleet = "lab"',
                    f'state_dir = "{self.root / device}"',
                    f'broker = "{self.broker}"',
                    "threads = 1",
                    f"trusted_keys = '''\n{self.pem}'''",
                    "[telemetry]",
                    "interval = 0.5",
                ]
            )
            + "\n"
        )
        return path

    def start(self, device: str) -> None:
        log = open(self.root / f"{device}.log", "wb")  # noqa: SIM115 - closed with the process
        self.processes[device] = subprocess.Popen(
            [str(BIN / "edgekit-agent"), "--log-level", "info", "run", "--config", str(self.config(device))],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        for process in self.processes.values():
            process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            process.wait(timeout=30)


@pytest.fixture
def fleet(mosquitto, edgekit_home, tmp_path) -> Iterator[Fleet]:
    assert edgekit("keys", "init").returncode == 0
    f = Fleet(tmp_path, mosquitto.url, edgekit_home)
    yield f
    f.stop()


def all_serving(watcher: Watcher, devices: list[str], version: str):
    return lambda _: all(watcher.serving(version, d)(_) for d in devices)


def test_one_push_updates_five_agents_and_a_late_joiner_gets_it_from_the_broker(
    fleet, mosquitto, digits_models
):
    watcher = Watcher(mosquitto.url)
    try:
        for device in DEVICES:
            fleet.start(device)
        watcher.wait_for(lambda _: all(watcher.states(d) for d in DEVICES))  # every agent said hello
        outcome = push_and_wait(digits_models.fp32, mosquitto.url, "--version", "1.0.0")
        assert outcome["phase"] == "done" and outcome["failed"] == {}
        assert {d: s["version"] for d, s in outcome["devices"].items()} == dict.fromkeys(DEVICES, "1.0.0")
        # The workstation is gone; a device that joins now gets the model from the broker alone.
        fleet.start("cam-late")
        watcher.wait_for(watcher.serving("1.0.0", "cam-late"), timeout=60)
    finally:
        watcher.close()


def test_canary_rollout_goes_through_and_a_bad_canary_aborts(
    fleet, mosquitto, digits_models, tmp_path, edgekit_home
):
    watcher = Watcher(mosquitto.url)
    devices = DEVICES[:3]
    try:
        for device in devices:
            fleet.start(device)
        watcher.wait_for(lambda _: all(watcher.states(d) for d in devices))
        first = edgekit(
            "push",
            str(digits_models.fp32),
            "--fleet",
            "lab",
            "--name",
            "digits",
            "--version",
            "1.0.0",
            "--wait",
            "--broker",
            mosquitto.url,
        )
        assert first.returncode == 0, first.stderr
        second = edgekit(
            "push",
            str(digits_models.int8),
            "--fleet",
            "lab",
            "--name",
            "digits",
            "--version",
            "2.0.0",
            "--canary",
            "1",
            "--soak",
            "1",
            "--wait",
            "--broker",
            mosquitto.url,
            "--json",
        )
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stdout)["canaries"] == ["cam-1"]
        watcher.wait_for(all_serving(watcher, devices, "2.0.0"))

        # A bundle whose health check cannot pass: the canary refuses it and the rollout aborts.
        from edgekit.keys import load_signing_key
        from helpers import make_unhealthy

        key = load_signing_key(edgekit_home)
        good = catalogued(edgekit_home, "digits", "1.0.0", tmp_path / "good.ekb")
        bad = tmp_path / "bad.ekb"
        make_unhealthy(good, key, bad)
        third = edgekit(
            "push",
            str(bad),
            "--fleet",
            "lab",
            "--canary",
            "1",
            "--soak",
            "1",
            "--wait",
            "--broker",
            mosquitto.url,
        )
        assert third.returncode == 15, third.stderr
        assert "aborted" in third.stderr and "cam-1 failed to install" in third.stderr
        assert "Traceback" not in third.stderr and len(third.stderr.strip().splitlines()) == 1
        # Nobody runs the bad bundle; the fleet keeps serving 2.0.0.
        assert all(watcher.states(d)[-1].bundle_version == "2.0.0" for d in devices)
        status = json.loads(edgekit("rollout", "status", "--fleet", "lab", "--json").stdout)
        assert status["phase"] == "aborted"
        # And the operator can roll the fleet back to 1.0.0.
        back = edgekit(
            "fleet", "rollback", "--fleet", "lab", "--to", "1.0.0", "--wait", "--broker", mosquitto.url
        )
        assert back.returncode == 0, back.stderr
        watcher.wait_for(all_serving(watcher, devices, "1.0.0"))
    finally:
        watcher.close()


def test_push_refuses_bad_targets_with_one_line(fleet, mosquitto, tmp_path):
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"nope")
    result = edgekit("push", str(junk), "--fleet", "lab", "--broker", mosquitto.url)
    assert (
        result.returncode == 6 and "not a TFLite model" in result.stderr and "Traceback" not in result.stderr
    )
    result = edgekit("push", "no-such-bundle", "--fleet", "lab", "--broker", mosquitto.url)
    assert result.returncode == 4 and "no bundle named 'no-such-bundle'" in result.stderr
    other = tmp_path / "model.onnx"
    other.write_bytes(b"x")
    result = edgekit("push", str(other), "--fleet", "lab", "--broker", mosquitto.url)
    assert result.returncode == 6 and ".ekb bundle, a .tflite model" in result.stderr


def test_push_over_a_secured_broker_to_devices_provisioned_with_device_add(
    mosquitto, edgekit_home, tmp_path, digits_models
):
    """Device accounts and a client certificate from `edgekit device add`, the broker config
    from `edgekit broker mosquitto-config`, the operator account for `edgekit push`."""
    assert edgekit("keys", "init").returncode == 0
    tls_port = free_port()
    configs = tmp_path / "configs"
    plain = edgekit(
        "device",
        "add",
        "cam-1",
        "--fleet",
        "lab",
        "--broker",
        mosquitto.url,
        "--state-dir",
        str(tmp_path / "cam-1"),
        "-o",
        str(configs / "cam-1.toml"),
        "--json",
    )
    assert plain.returncode == 0, plain.stderr
    assert "password" not in plain.stdout
    secure = edgekit(
        "device",
        "add",
        "cam-2",
        "--fleet",
        "lab",
        "--tls",
        "--broker",
        f"mqtts://127.0.0.1:{tls_port}",
        "--state-dir",
        str(tmp_path / "cam-2"),
        "-o",
        str(configs / "cam-2.toml"),
    )
    assert secure.returncode == 0, secure.stderr
    assert oct((configs / "cam-2.toml").stat().st_mode & 0o777) == "0o600"
    written = edgekit(
        "broker",
        "mosquitto-config",
        "--port",
        str(mosquitto.port),
        "--host",
        "127.0.0.1",
        "--tls-port",
        str(tls_port),
        "--user",
        "root",
        "--no-persistence",
        "-o",
        str(mosquitto.directory),
    )
    assert written.returncode == 0, written.stderr
    mosquitto.stop()
    mosquitto.start()

    agents = []
    try:
        for device in ("cam-1", "cam-2"):
            agents.append(
                subprocess.Popen(
                    [str(BIN / "edgekit-agent"), "run", "--config", str(configs / f"{device}.toml")],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        outcome = push_and_wait(digits_models.fp32, mosquitto.url, "--name", "digits", "--version", "1.0.0")
        assert {d: s["version"] for d, s in outcome["devices"].items()} == {
            "cam-1": "1.0.0",
            "cam-2": "1.0.0",
        }
        # Without the operator's account, nobody may tell the fleet anything.
        (edgekit_home / "broker" / "operator.json").rename(tmp_path / "operator.json")
        refused = edgekit("push", "digits", "--fleet", "lab", "--broker", mosquitto.url)
        assert refused.returncode == 12 and "Traceback" not in refused.stderr
    finally:
        for agent in agents:
            agent.send_signal(signal.SIGTERM)
        for agent in agents:
            agent.wait(timeout=30)


def test_a_rollout_left_running_is_resumed_and_another_aborted(fleet, mosquitto, digits_models):
    """push without --wait leaves the canary phase to `rollout resume`; `rollout abort` sends the
    canary back. The third push ships a Keras model, converted with defaults on the way."""
    watcher = Watcher(mosquitto.url)
    devices = DEVICES[:3]
    try:
        for device in devices:
            fleet.start(device)
        watcher.wait_for(lambda _: all(watcher.states(d) for d in devices))
        push_and_wait(digits_models.fp32, mosquitto.url, "--name", "digits", "--version", "1.0.0")
        started = edgekit(
            "push",
            str(digits_models.int8),
            "--fleet",
            "lab",
            "--name",
            "digits",
            "--version",
            "2.0.0",
            "--canary",
            "1",
            "--soak",
            "1",
            "--broker",
            mosquitto.url,
        )
        assert started.returncode == 0, started.stderr
        assert (
            json.loads(edgekit("rollout", "status", "--fleet", "lab", "--json").stdout)["phase"] == "canary"
        )
        resumed = edgekit(
            "rollout", "resume", "--fleet", "lab", "--timeout", "120", "--broker", mosquitto.url
        )
        assert resumed.returncode == 0, resumed.stderr
        watcher.wait_for(all_serving(watcher, devices, "2.0.0"))
        # One implementation with the dashboard's "Resume now": the same audit entry.
        audit = json.loads(edgekit("fleet", "audit", "--json").stdout)
        resumes = [(e["action"], e["target"], e["result"]) for e in audit if e["action"] == "rollout-resume"]
        assert resumes == [("rollout-resume", "digits@2.0.0", "ok")]

        keras = edgekit(
            "push",
            str(digits_models.keras_path),
            "--fleet",
            "lab",
            "--name",
            "digits",
            "--canary",
            "1",
            "--soak",
            "3600",
            "--broker",
            mosquitto.url,
        )
        assert keras.returncode == 0, keras.stderr
        watcher.wait_for(watcher.serving("2.0.1", "cam-1"))  # the next patch version, on the canary only
        aborted = edgekit("rollout", "abort", "--fleet", "lab", "--broker", mosquitto.url, "--json")
        assert aborted.returncode == 0, aborted.stderr
        outcome = json.loads(aborted.stdout)  # the same shape as `push --json`
        assert (outcome["fleet"], outcome["bundle"], outcome["phase"]) == ("lab", "digits@2.0.1", "aborted")
        assert outcome["reason"].startswith("aborted by") and outcome["canaries"] == ["cam-1"]
        again = edgekit("rollout", "resume", "--fleet", "lab", "--broker", mosquitto.url, "--json")
        assert again.returncode == 0 and json.loads(again.stdout)["phase"] == "aborted", again.stderr
        watcher.wait_for(watcher.serving("2.0.0", "cam-1"))
        assert all(watcher.states(d)[-1].bundle_version == "2.0.0" for d in devices)
        assert (
            json.loads(edgekit("rollout", "status", "--fleet", "lab", "--json").stdout)["phase"] == "aborted"
        )
    finally:
        watcher.close()


def test_a_will_saying_only_offline_keeps_what_the_device_served(mosquitto, edgekit_home):
    """The MQTT will is fixed at connect time and names no bundle; the workstation's view of the
    device must keep the bundle it last reported, or a finished rollout would look unfinished."""
    from edgekit import SigningKey
    from edgekit.fleet.push import FleetLink
    from edgekit.mqtt import MqttClient
    from edgekit.reports import DeviceStateReport

    serving = DeviceStateReport(
        "cam-1", "lab", "serving", bundle_id="a" * 64, bundle_name="digits", bundle_version="1.0.0"
    )
    will = DeviceStateReport("cam-1", "lab", "offline")
    with MqttClient(mosquitto.url, client_id="op").connect(timeout=10) as client:
        link = FleetLink(client, "lab", SigningKey.generate(), control_of(edgekit_home))
        for report in (serving, will):
            client.publish("edgekit/devices/cam-1/state", report.to_json(), retain=True).wait(10)
        while not (link.states.get("cam-1") and link.states["cam-1"].status == "offline"):
            assert link.wait_change(10)
        (report,) = link.reports()
        assert report.online is False and report.bundle_id == "a" * 64


def test_discovery_ends_once_the_devices_the_fleet_record_knows_have_reported(mosquitto, edgekit_home):
    """push collects retained device states before it starts; when the fleet record names the
    devices, hearing from all of them ends the wait (here a 60 s settle never elapses)."""
    from edgekit import SigningKey
    from edgekit.fleet.push import FleetLink
    from edgekit.mqtt import MqttClient
    from edgekit.reports import DeviceStateReport

    key = SigningKey.generate()
    names = [f"cam-{i}" for i in range(3)]
    with MqttClient(mosquitto.url, client_id="op").connect(timeout=10) as client:
        for name in names:
            report = DeviceStateReport(name, "lab", "idle")
            client.publish(f"edgekit/devices/{name}/state", report.to_json(), retain=True).wait(10)
        link = FleetLink(client, "lab", key, control_of(edgekit_home))
        assert link.discover() == names  # no record yet: until a second passes without news
        link.desire("b" * 64, "digits", "1.0.0")  # the record now names the devices heard from
        assert control_of(edgekit_home).record("lab").devices == names
    with MqttClient(mosquitto.url, client_id="op2").connect(timeout=10) as client:
        link = FleetLink(client, "lab", key, control_of(edgekit_home))
        assert link.discover(settle=60, limit=120) == names


def test_canary_telemetry_in_the_agents_own_format_is_counted(mosquitto, edgekit_home):
    """The rollout judges canaries on the telemetry they send: records exactly as the agent
    writes them must be counted for the bundle being rolled out, and others ignored."""
    from edgekit import SigningKey
    from edgekit.agent.telemetry import TelemetryRecord
    from edgekit.fleet.push import FleetLink
    from edgekit.mqtt import MqttClient
    from edgekit.reports import DeviceStateReport

    new, old = "n" * 64, "o" * 64
    with MqttClient(mosquitto.url, client_id="op").connect(timeout=10) as client:
        link = FleetLink(client, "lab", SigningKey.generate(), control_of(edgekit_home))
        link.watch_telemetry_of(new)
        state = DeviceStateReport("cam-1", "lab", "serving", bundle_id=new, bundle_version="2.0.0")
        client.publish("edgekit/devices/cam-1/state", state.to_json(), retain=True).wait(10)
        for bundle_id, errors in ((old, 50), (new, 3), (new, 2)):
            record = TelemetryRecord(
                device="cam-1",
                fleet="lab",
                window_start=0.0,
                window_end=1.0,
                count=100,
                errors=errors,
                latency_ms={"p50": 1.0, "p95": 2.0 + errors, "p99": 9.0},
                throughput=100.0,
                drift={"drifted": False},
                bundle={"name": "digits", "version": "x", "bundle_id": bundle_id},
                cpu_percent=None,
                memory_rss_bytes=None,
                temperature_c=None,
            )
            client.publish("edgekit/devices/cam-1/telemetry", json.dumps(record.to_dict()).encode()).wait(10)
        while not (link.reports() and link.reports()[0].count >= 200):
            assert link.wait_change(10)
        (report,) = link.reports()
        assert (report.count, report.errors, report.p95_ms) == (200, 5, 5.0)


def test_canary_telemetry_the_strict_decoder_refuses_is_dropped_and_counted(mosquitto, edgekit_home):
    """push reads telemetry with the telemetry decoder (edgekit.reports), not by hand: NaN,
    numbers sent as strings, negative counts and records of another fleet do not reach the
    rollout's verdict; the malformed ones are counted as rejected."""
    from edgekit import SigningKey
    from edgekit.fleet.push import FleetLink
    from edgekit.mqtt import MqttClient
    from edgekit.reports import TelemetryRecord

    new = "n" * 64
    good = TelemetryRecord(
        device="cam-1",
        fleet="lab",
        window_start=0.0,
        window_end=1.0,
        count=100,
        errors=1,
        latency_ms={"p50": 1.0, "p95": 2.0, "p99": 9.0},
        throughput=100.0,
        drift={"drifted": False},
        bundle={"name": "digits", "version": "x", "bundle_id": new},
        cpu_percent=None,
        memory_rss_bytes=None,
        temperature_c=None,
    ).to_dict()
    malformed = [
        json.dumps({**good, "count": "100"}).encode(),
        json.dumps({**good, "errors": -3}).encode(),
        json.dumps({**good, "latency_ms": {"p95": float("nan")}}).encode(),  # json.dumps writes NaN
        json.dumps({**good, "latency_ms": {"p95": float("inf")}}).encode(),
        json.dumps({**good, "drift": {"drifted": False, "severity": "apocalyptic"}}).encode(),
        b"not json",
    ]
    with MqttClient(mosquitto.url, client_id="op").connect(timeout=10) as client:
        link = FleetLink(client, "lab", SigningKey.generate(), control_of(edgekit_home))
        link.watch_telemetry_of(new)
        for payload in [
            *malformed,
            json.dumps({**good, "fleet": "other"}).encode(),
            json.dumps(good).encode(),
        ]:
            client.publish("edgekit/devices/cam-1/telemetry", payload, qos=1).wait(10)
        while not link._windows.get("cam-1"):
            assert link.wait_change(10)
        window = link._windows["cam-1"]
        assert (window.count, window.errors, window.p95_ms) == (100, 1, 2.0)
        assert link.rejected == len(malformed)
