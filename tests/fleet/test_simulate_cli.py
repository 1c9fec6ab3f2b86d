"""`edgekit fleet simulate`: twenty real agents in two processes, updated by `edgekit push --wait`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from test_push import BIN, edgekit, push_and_wait

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "agent"))
from test_daemon import Watcher

DEVICES = 20


def test_twenty_simulated_devices_serve_a_push_and_stop_cleanly(
    mosquitto, edgekit_home, digits_models, tmp_path
):
    assert edgekit("keys", "init").returncode == 0
    command = [
        str(BIN / "edgekit"),
        "fleet",
        "simulate",
        "--devices",
        str(DEVICES),
        "--fleet",
        "lab",
        "--broker",
        mosquitto.url,
        "--state-dir",
        str(tmp_path / "sim"),
        "--processes",
        "2",
        "--json",
    ]
    simulate = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher = Watcher(mosquitto.url)
    try:
        assert simulate.stdout is not None
        ready = json.loads(simulate.stdout.readline())
        assert ready["event"] == "ready" and ready["connected"] == DEVICES and ready["provisioned"] == DEVICES
        devices = ready["devices"]
        assert len(set(devices)) == DEVICES
        # Provisioned like `edgekit device add`: a config and a state directory per device.
        assert all((tmp_path / "sim" / f"{d}.toml").exists() for d in devices)
        watcher.wait_for(lambda _: all(watcher.states(d) for d in devices))
        outcome = push_and_wait(digits_models.fp32, mosquitto.url, "--version", "1.0.0")
        assert outcome["phase"] == "done" and outcome["failed"] == {}
        assert {d: s["version"] for d, s in outcome["devices"].items()} == dict.fromkeys(devices, "1.0.0")
        assert all((tmp_path / "sim" / d / "installed.json").exists() for d in devices)
        simulate.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = simulate.communicate(timeout=120)
    finally:
        watcher.close()
        if simulate.poll() is None:
            simulate.kill()
            simulate.wait()
    assert simulate.returncode == 0, err
    stopped = json.loads(out.splitlines()[-1])
    assert stopped["event"] == "stopped"
    assert {s["device"]: s["version"] for s in stopped["devices"]} == dict.fromkeys(devices, "1.0.0")
    assert not any(s["xnnpack"] for s in stopped["devices"])  # lightweight: the built-in kernels
    assert "Traceback" not in err


def simulate_two_and_stop(broker: str, state_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`fleet simulate` of two devices that stop as soon as they started."""
    assert edgekit("keys", "init").returncode == 0
    return edgekit(
        "fleet", "simulate", "--devices", "2", "--fleet", "lab", "--broker", broker,
        "--state-dir", str(state_dir), "--duration", "0", *extra,
    )  # fmt: skip


def test_simulated_devices_run_xnnpack_when_asked(mosquitto, edgekit_home, tmp_path):
    result = simulate_two_and_stop(mosquitto.url, tmp_path / "sim", "--xnnpack", "--json")
    assert result.returncode == 0, result.stderr
    stopped = json.loads(result.stdout.splitlines()[-1])
    assert [s["xnnpack"] for s in stopped["devices"]] == [True, True]


def test_simulate_refuses_an_unknown_drift_device_with_one_line(mosquitto, edgekit_home, tmp_path):
    result = simulate_two_and_stop(mosquitto.url, tmp_path / "sim", "--drift-device", "nobody")
    assert result.returncode != 0
    assert "--drift-device nobody is not one of the simulated devices" in result.stderr
    assert "Traceback" not in result.stderr
