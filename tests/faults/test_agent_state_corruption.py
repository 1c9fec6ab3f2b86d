"""Every file the agent keeps in ``state_dir``, damaged (emptied, cut short, garbage, the wrong
JSON), is detected at the next start and recovered from, and the device goes on serving.

The files (agent/install.py, agent/outbox.py, agent/daemon.py, edgekit/transfer.py):
``installed.json`` (the pointer), ``bundles/NAME/*`` (installed bundles), ``outbox/*/NNN.json``
and ``outbox/*/meta.json`` (queued reports and their counters), ``desired.json`` (the last
desired state applied: the replay floor), ``downloads/DIGEST/*`` (a partial or finished
download: ``manifest.json``, ``manifest.sig``, ``bundle.ekb.part``, ``bundle.ekb``).
``lock`` holds nothing (flock only).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from edgekit import TrustedKeys, create_bundle
from edgekit.agent import Agent
from edgekit.agent.daemon import AgentDaemon
from edgekit.agent.outbox import Outbox
from edgekit.bundle import read_bundle
from edgekit.mqtt import MqttClient
from edgekit.runtime import Model, dequantize, quantize
from edgekit.tflite import inspect_tflite
from edgekit.transfer import (
    BUNDLE_FILE,
    PART_FILE,
    ChunkAssembler,
    fetch_bundle,
    publish_bundle,
    verify_manifest_message,
)
from edgekit.transfer import manifest_message as manifest_message_of
from watcher import watcher

__all__ = ["watcher"]

DAMAGE = {
    "emptied": lambda data: b"",
    "cut-short": lambda data: data[: len(data) // 2],
    "garbage": lambda data: bytes(range(256)) * 4,
    "json-list": lambda data: b"[1, 2, 3]",
    "json-null": lambda data: b"null",
}


def damage(path: Path, how: str) -> None:
    path.write_bytes(DAMAGE[how](path.read_bytes()))


def bare_output(model_path: Path, x: np.ndarray) -> np.ndarray:
    content = model_path.read_bytes()
    info = inspect_tflite(content)
    (spec,), (out,) = info.inputs, info.outputs
    return dequantize(Model(content, threads=1).run([quantize(x.reshape(spec.shape), spec)])[0], out)


def kinds(agent: Agent) -> list[str]:
    return [e["kind"] for e in agent.events.peek()]


# -- the pointer and the installed bundles -------------------------------------------------------


@pytest.mark.parametrize("how", [*DAMAGE, "names-a-missing-directory"])
def test_a_damaged_pointer_is_detected_and_a_verified_bundle_serves(config_path, bundles, models, how):
    with Agent.from_config(config_path, background=False) as agent:
        agent.install(bundles.v1)
        agent.install(bundles.v2)
        pointer = agent.store.state_dir / "installed.json"
        previous = agent.store.pointer()["previous"]
    if how == "names-a-missing-directory":
        doc = json.loads(pointer.read_bytes())
        doc["current"] = "digits-9.9.9-000000000000"
        pointer.write_text(json.dumps(doc))
    else:
        damage(pointer, how)
    outputs = {"1.0.0": models.fp32, "2.0.0": models.int8}
    x = models.x_test[0]
    with Agent.from_config(config_path, background=False) as agent:
        status = agent.status()
        assert status.serving
        np.testing.assert_allclose(
            agent.predict(x)[0], bare_output(outputs[status.version], x), rtol=0, atol=1e-6
        )
        assert set(kinds(agent)) & {"store_damaged", "verify_failed"}
        if how == "names-a-missing-directory":
            assert agent.store.pointer()["current"] == previous
        assert json.loads(pointer.read_bytes())["current"] == agent.store.pointer()["current"]
        assert agent.install(bundles.v3).version == "3.0.0"  # and the store works on


@pytest.mark.parametrize(
    ("member", "how"),
    [("model.tflite", "cut-short"), ("manifest.json", "garbage"), ("manifest.sig", "emptied")],
)
def test_a_damaged_installed_bundle_falls_back_to_the_previous_one(config_path, bundles, models, member, how):
    with Agent.from_config(config_path, background=False) as agent:
        agent.install(bundles.v1)
        agent.install(bundles.v2)
        current = agent.store.bundles / agent.store.pointer()["current"]
    damage(current / member, how)
    with Agent.from_config(config_path, background=False) as agent:
        assert agent.status().version == "1.0.0"
        np.testing.assert_allclose(
            agent.predict(models.x_test[0])[0], bare_output(models.fp32, models.x_test[0]), atol=1e-6
        )
        assert kinds(agent)[-2:] == ["verify_failed", "recovered"]
        assert not current.exists()


# -- the outboxes ---------------------------------------------------------------------------------


def test_damaged_queued_records_are_dropped_and_counted_and_the_queue_goes_on(tmp_path):
    box = Outbox(tmp_path / "box", 100)
    for i in range(6):
        box.put({"i": i})
    for seq, how in ((3, "garbage"), (4, "emptied"), (5, "json-list"), (6, "cut-short")):
        damage(tmp_path / "box" / f"{seq:016d}.json", how)
    (tmp_path / "box" / ".0000000000000007.json.x1.tmp").write_bytes(b"{")  # a torn atomic write
    box = Outbox(tmp_path / "box", 100)  # a restart
    assert [r["seq"] for r in box.peek()] == [1, 2]
    assert len(box) == 2 and box.dropped_total == 4
    record = box.put({"i": 6})
    assert (record["seq"], record["dropped"], record["dropped_total"]) == (7, 4, 4)
    assert sorted(p.name for p in (tmp_path / "box").iterdir()) == [
        f"{1:016d}.json",
        f"{2:016d}.json",
        f"{7:016d}.json",
        "meta.json",
    ]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_outbox_counter_never_reuses_a_seq(tmp_path, how):
    box = Outbox(tmp_path / "box", 100)
    for i in range(3):
        box.put({"i": i})
    box.ack(3)  # all delivered: no record file is left to number on from
    damage(tmp_path / "box" / "meta.json", how)
    again = Outbox(tmp_path / "box", 100)
    assert again.put({"i": 3})["seq"] > 3
    assert Outbox(tmp_path / "box", 100).put({"i": 4})["seq"] > again.next_seq - 2  # and it sticks


# -- the desired state's replay floor ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["emptied", "garbage", "json-list"])
def test_a_damaged_desired_state_file_is_reported_and_the_device_carries_on(
    mosquitto, watcher, make_config, bundles, key, how
):
    config = make_config("pi-01", broker=mosquitto.url, telemetry_interval=3600)
    watcher.publish_bundle(bundles.v1, key)
    watcher.publish_bundle(bundles.v3, key)
    watcher.desire(key, bundles.v1, seq=4)
    agent = Agent.from_config(config, background=False)
    daemon = AgentDaemon(agent, upload_interval=0.2).start()
    watcher.wait_for(watcher.serving("1.0.0"))
    daemon.stop()
    agent.close()
    damage(Path(agent.config.state_dir) / "desired.json", how)
    agent = Agent.from_config(config, background=False)
    daemon = AgentDaemon(agent, upload_interval=0.2).start()
    try:
        damaged = watcher.wait_for(
            lambda _: [e for e in watcher.records("events") if e["kind"] == "store_damaged"]
        )
        assert "desired.json is damaged" in damaged[0]["message"]
        assert agent.status().version == "1.0.0"
        watcher.desire(key, bundles.v3, seq=5)
        watcher.wait_for(watcher.serving("3.0.0"))
        assert daemon.last_seq == 5
    finally:
        daemon.stop()
        agent.close()


@pytest.mark.parametrize("how", ["emptied", "garbage", "json-list"])
def test_a_damaged_deployment_file_is_reported_and_the_deployment_resumes_from_the_broker(
    mosquitto, watcher, make_config, bundles, key, how
):
    """deployment.json names a download in progress (the agent stopped mid-fetch), then is
    damaged: the agent says so and takes the deployment up again from the retained desired
    state it applied (desired.json), ending with the bundle served."""
    from edgekit.transfer import start_upload

    config = make_config("pi-01", broker=mosquitto.url, telemetry_interval=3600, download_stall_timeout=3600)
    start_upload(watcher.client, read_bundle(bundles.v1, TrustedKeys([key.public])))  # manifest only
    watcher.desire(key, bundles.v1, seq=3)
    agent = Agent.from_config(config, background=False)
    daemon = AgentDaemon(agent, upload_interval=0.2).start()
    watcher.wait_for(lambda _: any(s.status == "downloading" for s in watcher.states()))
    daemon.stop()
    agent.close()
    damage(Path(agent.config.state_dir) / "deployment.json", how)
    watcher.publish_bundle(bundles.v1, key)
    agent = Agent.from_config(config, background=False)
    daemon = AgentDaemon(agent, upload_interval=0.2).start()
    try:
        damaged = watcher.wait_for(
            lambda _: [e for e in watcher.records("events") if e["kind"] == "store_damaged"]
        )
        assert "deployment.json is damaged" in damaged[0]["message"]
        watcher.wait_for(watcher.serving("1.0.0"))
    finally:
        daemon.stop()
        agent.close()


# -- partial and finished downloads -----------------------------------------------------------------


@pytest.fixture
def chunked(models, key, tmp_path):
    """A bundle of many small chunks, published (retained) on the test's broker."""
    path = tmp_path / "chunked.ekb"
    create_bundle(models.fp32, name="digits", version="5.0.0", key=key, output=path, chunk_size=1024)
    return read_bundle(path, TrustedKeys([key.public])), path


@pytest.mark.parametrize(
    ("victim", "how"),
    [
        ("manifest.json", "garbage"),
        ("manifest.json", "emptied"),
        ("manifest.sig", "garbage"),
        (PART_FILE, "cut-short"),
        (PART_FILE, "garbage"),
        (PART_FILE, "emptied"),
        (BUNDLE_FILE, "cut-short"),
        (BUNDLE_FILE, "garbage"),
    ],
)
def test_a_damaged_download_is_resumed_or_started_over(mosquitto, chunked, key, tmp_path, victim, how):
    bundle, path = chunked
    trusted = TrustedKeys([key.public])
    directory = tmp_path / "downloads" / bundle.bundle_id
    verified = verify_manifest_message(manifest_message_of(bundle), trusted, bundle.bundle_id)
    if victim == BUNDLE_FILE:  # a finished download, waiting to be installed
        with MqttClient(mosquitto.url).connect() as client:
            publish_bundle(client, bundle)
            fetch_bundle(client, bundle.bundle_id, trusted, directory, timeout=30)
    else:  # half of the chunks stored when the device went down
        assembler = ChunkAssembler(directory, verified)
        payload = b"".join(bundle.members[f.name] for f in bundle.manifest.files)
        size = bundle.manifest.chunks.chunk_size
        for index in range(assembler.chunk_count // 2):
            assembler.add(index, payload[index * size : (index + 1) * size])
        assembler.close()
    damage(directory / victim, how)
    with MqttClient(mosquitto.url).connect() as client:
        publish_bundle(client, bundle)
        fetched = fetch_bundle(client, bundle.bundle_id, trusted, directory, timeout=30)
    assert fetched.bundle_id == bundle.bundle_id
    assert (directory / BUNDLE_FILE).read_bytes() == path.read_bytes()
