"""The embedded broker of `edgekit fleet up` (amqtt in a child process) carries the whole
protocol: real `edgekit push` and `edgekit-agent run` processes, a 30 MB bundle in retained
128 KiB chunks, QoS 1 telemetry, the will, clearing, and retained messages across a restart."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
from edgekit.bundle import create_bundle
from edgekit.errors import BrokerError
from edgekit.fleet.embedded import EmbeddedBroker
from edgekit.keys import load_signing_key
from edgekit.mqtt import MqttClient
from edgekit.topics import Topics
from edgekit.transfer import clear_bundle, publish_bundle
from edgekit.trust import TrustedKeys
from helpers import free_port
from mqtt_helpers import Inbox
from test_push import push_and_wait
from watcher import Watcher

TOPICS = Topics()


def big_bundle(digits_models, home: Path, out: Path, megabytes: int = 30) -> Path:
    """A real bundle of about ``megabytes`` MB: the digits model and a large model card."""
    card = out.parent / "model_card.md"
    card.write_bytes(os.urandom(megabytes * 1024 * 1024 // 2).hex().encode())
    create_bundle(
        digits_models.fp32,
        name="digits",
        version="1.0.0",
        key=load_signing_key(home),
        output=out,
        model_card=card,
    )
    return out


def retained_under(url: str, topic_filter: str, probe_topic: str) -> list[str]:
    """Topics of the retained messages matching ``topic_filter`` now: subscribe, then publish a
    probe on the same connection; the broker sends retained messages before routing it."""
    with MqttClient(url) as client:
        inbox = Inbox()
        client.subscribe(topic_filter, inbox)
        client.publish(probe_topic, b"probe", qos=1).wait(10)
        found = inbox.wait_topic(probe_topic)
        assert found.payload == b"probe"
        return [m.topic for m in inbox.messages if m.retain]


def test_a_30_mb_push_reaches_a_real_agent_and_the_broker_keeps_it_across_a_restart(
    embedded, agents, digits_models, edgekit_home, tmp_path
):
    bundle = big_bundle(digits_models, edgekit_home, tmp_path / "big.ekb")
    assert bundle.stat().st_size > 30 * 1024 * 1024
    watcher = Watcher(embedded.url)
    try:
        agents.start("cam-1")
        watcher.wait_for(lambda _: watcher.states("cam-1"))
        started = time.monotonic()
        outcome = push_and_wait(bundle, embedded.url)
        print(f"30 MB push --wait through the embedded broker: {time.monotonic() - started:.1f} s")
        assert outcome["phase"] == "done" and outcome["devices"]["cam-1"]["version"] == "1.0.0"
        # QoS 1 telemetry from the agent, naming the bundle it serves.
        watcher.wait_for(
            lambda _: any(r["bundle"]["version"] == "1.0.0" for r in watcher.records("telemetry", "cam-1"))
        )
        # A device that vanishes without a word is marked offline by its will.
        agents.processes.pop("cam-1").kill()
        watcher.wait_for(lambda _: watcher.states("cam-1")[-1].status == "offline")
    finally:
        watcher.close()

    embedded.stop()
    embedded.start()
    watcher = Watcher(embedded.url)
    try:
        # Retained state survived the restart (data_dir), and so did the desired state and the
        # chunks: a device that joins now gets the 30 MB model from the broker alone.
        watcher.wait_for(
            lambda _: watcher.states("cam-1") and watcher.states("cam-1")[-1].status == "offline"
        )
        agents.start("cam-2")
        watcher.wait_for(watcher.serving("1.0.0", "cam-2"), timeout=120)
    finally:
        watcher.close()


def test_cleared_retained_messages_stay_cleared_across_a_restart(embedded, digits_models, tmp_path):
    from edgekit import SigningKey

    key = SigningKey.generate()
    path = tmp_path / "small.ekb"
    create_bundle(digits_models.fp32, name="digits", version="1.0.0", key=key, output=path, chunk_size=1024)
    from edgekit.bundle import read_bundle

    bundle = read_bundle(path, TrustedKeys([key.public]))
    count = len(bundle.manifest.chunks.sha256)
    mine = f"edgekit/bundles/{bundle.bundle_id}/#"
    probe = f"edgekit/bundles/{bundle.bundle_id}/probe"
    with MqttClient(embedded.url) as client:
        publish_bundle(client, bundle)
    assert len(retained_under(embedded.url, mine, probe)) == count + 1  # manifest and chunks
    with MqttClient(embedded.url) as client:
        clear_bundle(client, bundle.bundle_id, count)
    assert retained_under(embedded.url, mine, probe) == []
    embedded.stop()
    with sqlite3.connect(embedded.data_dir / "retained.sqlite") as db:  # type: ignore[operator]
        assert db.execute("SELECT count(*) FROM retained").fetchone() == (0,)
    embedded.start()
    assert retained_under(embedded.url, mine, probe) == []


def test_clients_find_out_it_speaks_3_1_1_and_a_client_pinned_to_mqtt5_is_told_why(embedded):
    assert "protocol" not in embedded.url
    with MqttClient(embedded.url) as client:
        assert client.protocol == "3.1.1"
        client.publish("edgekit/x", b"1", qos=1).wait(10)
    # amqtt itself would wait for the rest of a misread MQTT 5 CONNECT until the client gives up;
    # the embedded broker answers "unacceptable protocol version" at once.
    with pytest.raises(BrokerError, match=r"Unsupported protocol version \(MQTT 5\); leave the protocol out"):
        MqttClient(f"{embedded.url}?protocol=5", reconnect_min=0.2, reconnect_max=0.5).connect(timeout=3)


def test_a_taken_port_is_one_line_and_stop_and_start_again_work(embedded, tmp_path):
    with pytest.raises(BrokerError, match=f"port {embedded.port} on 127.0.0.1 is already in use") as info:
        EmbeddedBroker(port=embedded.port).start()
    assert "\n" not in str(info.value)
    memory_only = EmbeddedBroker(port=free_port())
    with memory_only:
        assert memory_only.running and memory_only.pid
        with MqttClient(memory_only.url) as client:
            client.publish("edgekit/t", b"kept in memory", retain=True).wait(10)
    assert not memory_only.running
    memory_only.stop()  # idempotent
    with memory_only:  # no data_dir: nothing survives a restart
        assert retained_under(memory_only.url, "edgekit/t/#", "edgekit/t/probe") == []


def test_retained_messages_reach_only_the_clients_that_subscribed_to_them(embedded):
    """amqtt 0.11.4 sent every new client the retained messages matching anybody's filters (here
    the ingest's ``edgekit/devices/+/state``): a ``nothing/here`` subscriber got device states."""
    ingest = MqttClient(embedded.url).connect()
    try:
        ingest.subscribe(TOPICS.all_devices_filter("state"), Inbox())
        with MqttClient(embedded.url) as device:
            device.publish(TOPICS.device_state("z"), b'{"status": "online"}', retain=True).wait(10)
        for topic_filter in ("nothing/here", TOPICS.device_telemetry("z"), "edgekit/fleets/#"):
            with MqttClient(embedded.url) as client:
                inbox = Inbox()
                client.subscribe(topic_filter, inbox)
                # Retained messages (and any leak) are sent before the broker routes this probe back.
                probe = f"probe/{len(topic_filter)}"
                client.subscribe(probe, inbox)
                client.publish(probe, b"probe", qos=1).wait(10)
                inbox.wait_topic(probe)
                assert inbox.topics() == [probe], topic_filter
                assert client.unroutable == 0, topic_filter
        # A subscriber to the device's own topics gets its state once, not twice.
        assert retained_under(embedded.url, "edgekit/devices/z/#", "edgekit/devices/z/probe") == [
            TOPICS.device_state("z")
        ]
    finally:
        ingest.close()
