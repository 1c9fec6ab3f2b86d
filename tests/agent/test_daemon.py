"""The agent's MQTT side against a real Mosquitto: desired state in, bundles fetched, reports out."""

from __future__ import annotations

import pytest
from edgekit import TrustedKeys
from edgekit.agent import Agent
from edgekit.agent.daemon import AgentDaemon
from edgekit.bundle import read_bundle
from edgekit.desired import new_desired_state, sign_desired_state
from edgekit.mqtt import Message
from watcher import TOPICS, Watcher, watcher

__all__ = ["Watcher", "watcher"]  # tests/fleet/test_push.py imports Watcher from here


def test_a_signed_desired_state_installs_the_bundle_from_the_broker(watcher, device, bundles, key, models):
    watcher.publish_bundle(bundles.v1, key)
    watcher.desire(key, bundles.v1, seq=1)
    watcher.wait_for(watcher.serving("1.0.0"))
    statuses = [s.status for s in watcher.states()]
    assert "downloading" in statuses and "installing" in statuses
    assert device.agent.predict(models.x_test[:1])[0].shape == (1, 10)
    events = watcher.wait_for(lambda _: [e for e in watcher.records("events") if e["kind"] == "installed"])
    assert events[0]["device"] == "pi-01"


def test_newer_documents_upgrade_and_roll_back_older_ones_are_ignored(watcher, device, bundles, key):
    for path in (bundles.v1, bundles.v2):
        watcher.publish_bundle(path, key)
    watcher.desire(key, bundles.v1, seq=5)
    watcher.wait_for(watcher.serving("1.0.0"))
    watcher.desire(key, bundles.v2, seq=6)
    watcher.wait_for(watcher.serving("2.0.0"))
    # An operator's rollback: a newer document naming the older bundle.
    watcher.desire(key, bundles.v1, seq=7)
    watcher.wait_for(watcher.serving("1.0.0"))
    # A replay of an old document changes nothing, and is counted as refused.
    watcher.desire(key, bundles.v2, seq=6)
    watcher.wait_for(lambda _: device.refused >= 1)
    assert device.agent.status().version == "1.0.0"


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("untrusted", "does not trust"),
        ("expired", "expired"),
        ("other-fleet", "not this device's fleet"),
        ("other-device", "for device"),
    ],
)
def test_refused_desired_states_leave_the_device_serving(
    watcher, device, bundles, key, other_key, how, reason
):
    watcher.publish_bundle(bundles.v1, key)
    watcher.publish_bundle(bundles.v3, key)
    watcher.desire(key, bundles.v1, seq=1)
    watcher.wait_for(watcher.serving("1.0.0"))
    if how == "untrusted":
        state = new_desired_state(
            "lab",
            bundle_sha256=read_bundle(bundles.v3, TrustedKeys([key.public])).bundle_id,
            bundle_name="digits",
            bundle_version="3.0.0",
            seq=2,
        )
        watcher.client.publish(
            TOPICS.fleet_desired("lab"), sign_desired_state(state, other_key), retain=True
        ).wait(10)
    elif how == "expired":
        watcher.desire(key, bundles.v3, seq=2, now=1_000_000, ttl=60)
    elif how == "other-fleet":
        # Published (by a compromised operator account) on this fleet's topic, for another fleet.
        bundle = read_bundle(bundles.v3, TrustedKeys([key.public]))
        state = new_desired_state(
            "other", bundle_sha256=bundle.bundle_id, bundle_name="digits", bundle_version="3.0.0", seq=2
        )
        watcher.client.publish(TOPICS.fleet_desired("lab"), sign_desired_state(state, key), retain=True).wait(
            10
        )
    else:
        bundle = read_bundle(bundles.v3, TrustedKeys([key.public]))
        state = new_desired_state(
            "lab",
            bundle_sha256=bundle.bundle_id,
            bundle_name="digits",
            bundle_version="3.0.0",
            seq=2,
            device="pi-99",
        )
        watcher.client.publish(
            TOPICS.device_desired("pi-01"), sign_desired_state(state, key), retain=True
        ).wait(10)
    refused = watcher.wait_for(
        lambda _: [e for e in watcher.records("events") if e["kind"] == "desired_refused"]
    )
    assert reason in refused[0]["message"]
    assert device.agent.status().version == "1.0.0"


def test_a_failed_health_check_is_reported_and_the_old_model_serves(watcher, device, bundles, key, models):
    watcher.publish_bundle(bundles.v1, key)
    watcher.publish_bundle(bundles.unhealthy, key)
    watcher.desire(key, bundles.v1, seq=1)
    watcher.wait_for(watcher.serving("1.0.0"))
    watcher.desire(key, bundles.unhealthy, seq=2)
    watcher.wait_for(lambda _: watcher.states() and watcher.states()[-1].status == "failed")
    failed = watcher.states()[-1]
    assert "health check failed" in (failed.error or "") and failed.bundle_version == "1.0.0"
    assert device.agent.predict(models.x_test[:1])[0].shape == (1, 10)


def test_telemetry_queued_during_an_outage_arrives_in_order_without_gaps(
    mosquitto, watcher, device, bundles, key
):
    watcher.publish_bundle(bundles.v1, key)
    watcher.desire(key, bundles.v1, seq=1)
    watcher.wait_for(watcher.serving("1.0.0"))
    device.agent.flush_telemetry()
    watcher.wait_for(lambda _: watcher.records("telemetry"))
    watcher.close()
    mosquitto.stop()
    for _ in range(5):
        device.agent.flush_telemetry()
    mosquitto.start()  # persistence is off: retained bundles are gone, queued reports are not
    again = Watcher(mosquitto.url)
    try:
        got = again.wait_for(lambda _: len(again.records("telemetry")) >= 5)
        seqs = [r["seq"] for r in again.records("telemetry")]
        assert seqs == sorted(seqs) and seqs[-5:] == list(range(seqs[-5], seqs[-5] + 5))
        assert got
        # The device said it is back.
        again.wait_for(lambda _: again.states() and again.states()[-1].status == "serving")
    finally:
        again.close()


def test_a_download_cut_by_a_broker_restart_resumes_where_it_stopped(
    mosquitto, watcher, device, key, models, tmp_path
):
    """Half of a bundle's chunks are on the broker when it dies (kill -9, no persistence); once
    it is back and the bundle is published again, the device finishes from its stored half."""
    from edgekit import create_bundle
    from edgekit.transfer import bundle_messages

    padded = tmp_path / "padded.tflite"  # bytes after the flatbuffer are ignored by the runtime
    padded.write_bytes(models.fp32.read_bytes() + bytes(range(256)) * 4096)  # +1 MiB
    path = tmp_path / "big.ekb"
    create_bundle(padded, name="digits", version="4.0.0", key=key, output=path, chunk_size=16 * 1024)
    bundle = read_bundle(path, TrustedKeys([key.public]))
    messages = list(bundle_messages(bundle, TOPICS))
    chunks, manifest = messages[:-1], messages[-1]
    half = len(chunks) // 2
    for topic, data in [*chunks[:half], manifest]:
        watcher.client.publish(topic, data, retain=True).wait(10)
    watcher.desire(key, path, seq=1)

    def stored_half(_: list[Message]) -> bool:
        states = [s for s in watcher.states() if s.status == "downloading" and s.progress]
        return bool(states) and states[-1].progress >= (half - 1) / len(chunks)

    watcher.wait_for(stored_half)
    watcher.close()
    mosquitto.stop()
    mosquitto.start()
    again = Watcher(mosquitto.url)
    try:
        again.publish_bundle(path, key)
        again.desire(key, path, seq=1)  # the broker lost its retained messages with it
        again.wait_for(again.serving("4.0.0"), timeout=60)
        resumed = [s.progress for s in again.states() if s.status == "downloading" and s.progress is not None]
        assert resumed and resumed[0] >= (half - 1) / len(chunks)  # it did not start over
        assert device.agent.status().version == "4.0.0"
    finally:
        again.close()


def test_an_install_cut_by_a_restart_goes_on_when_the_agent_starts_again(
    mosquitto, watcher, make_config, bundles, key
):
    """The desired state was applied (its seq saved) but the bundle never arrived before the
    agent stopped; started again, the agent sees the same document and carries on with it."""
    config = make_config("pi-01", broker=mosquitto.url, telemetry_interval=3600)
    watcher.desire(key, bundles.v1, seq=1)  # the bundle is not on the broker yet
    agent = Agent.from_config(config, background=False)
    first = AgentDaemon(agent, fetch_timeout=1.0).start()
    watcher.wait_for(lambda _: any(s.status == "downloading" for s in watcher.states()))
    first.stop()
    agent.close()
    watcher.publish_bundle(bundles.v1, key)
    agent = Agent.from_config(config, background=False)
    second = AgentDaemon(agent).start()
    try:
        watcher.wait_for(watcher.serving("1.0.0"))
        assert second.refused == 0
    finally:
        second.stop()
        agent.close()


def test_a_download_that_stalls_is_reported_failed_naming_the_device_and_the_bundle(
    mosquitto, watcher, make_config, bundles, key
):
    """Only the manifest is on the broker (an upload cut short): after the inactivity timeout
    the device says so in its state and events, and a push of the whole bundle gets it going."""
    from edgekit.transfer import start_upload

    bundle = read_bundle(bundles.v1, TrustedKeys([key.public]))
    start_upload(watcher.client, bundle)
    config = make_config("pi-01", broker=mosquitto.url, telemetry_interval=3600, download_stall_timeout=1)
    agent = Agent.from_config(config, background=False)
    daemon = AgentDaemon(agent, upload_interval=0.2).start()
    try:
        watcher.desire(key, bundles.v1, seq=1)
        failed = watcher.wait_for(lambda _: [s for s in watcher.states() if s.status == "failed"])
        error = failed[0].error  # type: ignore[index]
        assert error.startswith(
            f"device pi-01: the download of bundle digits@1.0.0 ({bundle.bundle_id[:12]}) stalled"
        )
        stalled = watcher.wait_for(
            lambda _: [e for e in watcher.records("events") if e["kind"] == "download_stalled"]
        )
        assert stalled[0]["bundle"]["bundle_id"] == bundle.bundle_id  # type: ignore[index]
        watcher.publish_bundle(bundles.v1, key)
        watcher.desire(key, bundles.v1, seq=2)
        watcher.wait_for(watcher.serving("1.0.0"))
    finally:
        daemon.stop()
        agent.close()


def stuck_bundle(watcher: Watcher, path, key) -> str:  # type: ignore[no-untyped-def]
    """Publish only a bundle's manifest (an upload cut short): a device fetching it waits."""
    from edgekit.transfer import start_upload

    bundle = read_bundle(path, TrustedKeys([key.public]))
    start_upload(watcher.client, bundle)
    return bundle.bundle_id


def test_a_newer_desired_state_preempts_a_download_in_progress(mosquitto, watcher, make_config, bundles, key):
    # The inactivity timeout is an hour: only the preemption can end the first download.
    config = make_config("pi-01", broker=mosquitto.url, telemetry_interval=3600, download_stall_timeout=3600)
    agent = Agent.from_config(config, background=False)
    daemon = AgentDaemon(agent, upload_interval=0.2).start()
    try:
        stuck = stuck_bundle(watcher, bundles.v3, key)
        watcher.desire(key, bundles.v3, seq=1)
        # A second progress report comes once the manifest arrived and the download began.
        watcher.wait_for(
            lambda _: (
                len([s for s in watcher.states() if s.status == "downloading" and s.target_id == stuck]) >= 2
            )
        )
        assert (daemon.state_dir / "downloads" / stuck).is_dir()
        watcher.publish_bundle(bundles.v2, key)
        watcher.desire(key, bundles.v2, seq=2)
        watcher.wait_for(watcher.serving("2.0.0"), timeout=60)
        assert not (daemon.state_dir / "downloads" / stuck).exists()  # its space given back
        assert daemon.agent.status().version == "2.0.0"
    finally:
        daemon.stop()
        agent.close()


def test_stop_cancels_a_download_in_progress_and_the_next_start_resumes_it(
    mosquitto, watcher, make_config, bundles, key
):
    import json

    config = make_config("pi-01", broker=mosquitto.url, telemetry_interval=3600, download_stall_timeout=3600)
    agent = Agent.from_config(config, background=False)
    daemon = AgentDaemon(agent, upload_interval=0.2).start()
    stuck = stuck_bundle(watcher, bundles.v1, key)
    watcher.desire(key, bundles.v1, seq=1)
    watcher.wait_for(lambda _: any(s.status == "downloading" for s in watcher.states()))
    workers = list(daemon._threads)
    # The download would wait an hour for its chunks: stop() ends it (generous bound; the
    # cancel itself takes a tick of the fetch loop, 0.2 s).
    daemon.stop(timeout=30)
    assert not any(thread.is_alive() for thread in workers)
    agent.close()
    record = json.loads((daemon.state_dir / "deployment.json").read_text())
    assert (record["state"], record["bundle_id"]) == ("fetching", stuck)  # kept, to resume
    watcher.publish_bundle(bundles.v1, key)
    agent = Agent.from_config(config, background=False)
    again = AgentDaemon(agent, upload_interval=0.2).start()
    try:
        watcher.wait_for(watcher.serving("1.0.0"), timeout=60)
    finally:
        again.stop()
        agent.close()
