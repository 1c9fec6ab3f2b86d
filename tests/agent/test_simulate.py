"""Many real agents in one process (`edgekit.agent.simulate`) against a real Mosquitto."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from edgekit.agent.simulate import SimulatedFleet
from edgekit.agent_config import AgentConfig
from edgekit.errors import EdgekitError
from test_daemon import Watcher

DEVICES = [f"sim-{i}" for i in range(4)]


@pytest.fixture
def configs(mosquitto, make_config) -> list[AgentConfig]:
    return [
        AgentConfig.load(
            make_config(
                device,
                broker=mosquitto.url,
                telemetry_interval=0.3,
                drift_sample_rate=1.0,
                drift_window=50,
            ),
            device=device,
        )
        for device in DEVICES
    ]


@pytest.fixture
def watcher(mosquitto) -> Iterator[Watcher]:
    w = Watcher(mosquitto.url)
    yield w
    w.close()


def test_simulated_devices_install_a_pushed_bundle_and_a_shifted_one_reports_drift(
    configs, watcher, bundles, key, models
):
    simulated = SimulatedFleet(configs, predict_rate=100, inputs=models.x_test, drift_devices=["sim-3"])
    with simulated:
        assert simulated.wait_connected(30) == len(DEVICES)
        watcher.publish_bundle(bundles.v1, key)
        watcher.desire(key, bundles.v1, seq=1)
        assert simulated.wait_serving(timeout=60)
        # Each device is a device of its own: its own state directory, state topic and telemetry.
        assert len({c.state_dir for c in configs}) == len(DEVICES)
        for device in DEVICES:
            watcher.wait_for(watcher.serving("1.0.0", device))

        def drifted(device: str) -> bool:
            return any(r["drift"]["drifted"] for r in watcher.records("telemetry", device))

        watcher.wait_for(lambda _: drifted("sim-3"))
        watcher.wait_for(lambda _: all(watcher.records("telemetry", d) for d in DEVICES[:3]))
        summary = {s.device: s for s in simulated.summary()}
    assert all(s.serving and s.version == "1.0.0" and s.predictions > 0 for s in summary.values())
    assert [d for d, s in summary.items() if s.drifting_inputs] == ["sim-3"]
    # Stopped cleanly: every device said it went offline, still naming what it serves.
    for device in DEVICES:
        watcher.wait_for(lambda _, d=device: watcher.states(d)[-1].status == "offline")
        assert watcher.states(device)[-1].bundle_version == "1.0.0"


def test_a_drift_device_that_is_not_simulated_is_refused(configs):
    with pytest.raises(EdgekitError, match="--drift-device pi-99"):
        SimulatedFleet(configs, drift_devices=["pi-99"])
