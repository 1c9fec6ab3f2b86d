"""A full disk during an install: a clean, reported failure, and the old model keeps serving.

The agent's state directory is a small real file system (tmpfs; an ext4 loop file system where
tmpfs cannot be mounted), filled up before the install, so every write the install makes can
hit ENOSPC for real: extraction, the pointer, the event the failure is reported with.
"""

from __future__ import annotations

import numpy as np
import pytest
from device_fixtures import write_config
from edgekit import TrustedKeys
from edgekit.agent import Agent
from edgekit.agent.daemon import AgentDaemon
from edgekit.bundle import read_bundle
from edgekit.errors import InstallError
from small_fs import fill, small_filesystem
from watcher import watcher

__all__ = ["watcher"]


@pytest.fixture
def small_state(tmp_path, key):
    with small_filesystem(tmp_path / "fs", 1024) as (mount, kind):
        print(f"state_dir on {kind}")
        yield write_config(tmp_path / "pi.toml", key, mount / "state"), mount


def pages(size: int) -> int:
    return -(-size // 4096) * 4096


@pytest.mark.parametrize("room", ["none", "half-the-bundle", "the-bundle-not-the-pointer"])
def test_an_install_on_a_full_disk_fails_cleanly_and_the_old_model_serves(
    small_state, bundles, models, key, room
):
    config, mount = small_state
    x = models.x_test[:1]
    extracted = read_bundle(bundles.v2, TrustedKeys([key.public]))
    need = pages(len(extracted.manifest_bytes)) + pages(len(extracted.signature))
    need += sum(pages(len(data)) for data in extracted.members.values())
    leave = {"none": 0, "half-the-bundle": need // 2, "the-bundle-not-the-pointer": need}[room]
    with Agent.from_config(config, background=False) as agent:
        agent.install(bundles.v1)
        before = agent.predict(x)[0]
        pointer = (agent.store.state_dir / "installed.json").read_bytes()
        filler = fill(mount, leave)
        with pytest.raises(InstallError, match="No space left on device; free some space"):
            agent.install(bundles.v2)
        assert agent.status().version == "1.0.0"
        np.testing.assert_array_equal(agent.predict(x)[0], before)
        assert (agent.store.state_dir / "installed.json").read_bytes() == pointer
        assert not [p for p in agent.store.bundles.iterdir() if p.name.startswith(".")]
    with Agent.from_config(config, background=False) as rebooted:  # and after a reboot
        assert rebooted.status().version == "1.0.0"
        np.testing.assert_array_equal(rebooted.predict(x)[0], before)
        filler.unlink()  # space is back: the same install now goes through
        assert rebooted.install(bundles.v2).version == "2.0.0"
        kinds = [e["kind"] for e in rebooted.events.peek()]
        assert "installed" in kinds


def test_a_download_onto_a_full_disk_is_reported_failed_and_the_old_model_serves(
    mosquitto, watcher, bundles, key, models, small_state
):
    """The daemon's side: the chunks of a new bundle cannot be stored; the device says why on
    its state topic (so a rollout aborts), gives the partial download's space back, keeps
    serving, and installs the bundle once space is back and the fleet asks again."""
    config, mount = small_state
    agent = Agent.from_config(config, background=False, broker=mosquitto.url, telemetry_interval=3600)
    daemon = AgentDaemon(agent, upload_interval=0.2).start()
    try:
        watcher.publish_bundle(bundles.v1, key)
        watcher.desire(key, bundles.v1, seq=1)
        watcher.wait_for(watcher.serving("1.0.0"))
        filler = fill(mount)
        watcher.publish_bundle(bundles.v3, key)
        watcher.desire(key, bundles.v3, seq=2)
        watcher.wait_for(lambda _: watcher.states()[-1].status == "failed")
        failed = watcher.states()[-1]
        assert "No space left on device; free some space" in (failed.error or "")
        assert failed.bundle_version == "1.0.0"
        assert agent.predict(models.x_test[:1])[0].shape == (1, 10)
        assert not list((agent.store.state_dir / "downloads").iterdir())
        filler.unlink()
        watcher.desire(key, bundles.v3, seq=3)
        watcher.wait_for(watcher.serving("3.0.0"))
    finally:
        daemon.stop()
        agent.close()
