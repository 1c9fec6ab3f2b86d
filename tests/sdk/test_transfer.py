"""Bundles over a real Mosquitto: retained chunks, late joiners, corruption, outages, clearing."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import random
import tarfile
import threading
from pathlib import Path

import pytest
from edgekit import BundleError, SignatureError, SigningKey, TrustedKeys, UntrustedKeyError, read_bundle
from edgekit.bundle import Bundle, create_bundle
from edgekit.errors import BrokerError, DownloadCancelledError, DownloadStalledError
from edgekit.mqtt import MqttClient
from edgekit.topics import Topics
from edgekit.transfer import (
    EXACT_WINDOW,
    ChunkAssembler,
    ChunkResult,
    bundle_messages,
    clear_bundle,
    fetch_bundle,
    fetch_staged_bundle,
    manifest_message,
    publish_bundle,
    start_upload,
    verify_manifest_message,
)
from mqtt_helpers import Inbox

CHUNK = 1024


@pytest.fixture(scope="module")
def bundle_file(digits_models, key: SigningKey, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("transfer") / "digits.ekb"
    create_bundle(
        digits_models.fp32,
        name="digits",
        version="1.0.0",
        key=key,
        output=out,
        baseline=digits_models.data_npz,
        chunk_size=CHUNK,
    )
    return out


@pytest.fixture(scope="module")
def bundle(bundle_file: Path, trusted: TrustedKeys) -> Bundle:
    found = read_bundle(bundle_file, trusted)
    assert len(found.manifest.chunks.sha256) >= 8, "the test bundle must span several chunks"
    return found


def chunks_of(bundle: Bundle) -> list[bytes]:
    return [data for topic, data in bundle_messages(bundle, Topics()) if "/chunks/" in topic]


def verified(bundle: Bundle, trusted: TrustedKeys):  # type: ignore[no-untyped-def]
    return verify_manifest_message(manifest_message(bundle), trusted, bundle.bundle_id)


# -- the assembler, pure ------------------------------------------------------------------------


def test_assembler_rebuilds_a_bundle_identical_to_the_original(
    bundle: Bundle, bundle_file: Path, trusted: TrustedKeys, tmp_path: Path
) -> None:
    assembler = ChunkAssembler(tmp_path / "dl", verified(bundle, trusted))
    for index, data in reversed(list(enumerate(chunks_of(bundle)))):
        assert assembler.add(index, data) == ChunkResult.STORED
    assert assembler.complete and assembler.received_bytes == bundle.manifest.chunks.total_size
    rebuilt = assembler.finish(trusted)
    assert rebuilt.members == bundle.members and rebuilt.signer == bundle.signer
    assert (tmp_path / "dl" / "bundle.ekb").read_bytes() == bundle_file.read_bytes()
    assert not (tmp_path / "dl" / "bundle.ekb.part").exists()


def test_assembler_resumes_after_a_restart(bundle: Bundle, trusted: TrustedKeys, tmp_path: Path) -> None:
    chunks = chunks_of(bundle)
    first = ChunkAssembler(tmp_path, verified(bundle, trusted))
    for index in range(0, len(chunks), 2):
        first.add(index, chunks[index])
    first.close()  # the device reboots
    again = ChunkAssembler.resume(tmp_path, trusted, bundle.bundle_id)
    assert again.missing == list(range(1, len(chunks), 2))
    assert again.add(0, chunks[0]) == ChunkResult.DUPLICATE
    for index in again.missing:
        again.add(index, chunks[index])
    assert again.finish(trusted).members == bundle.members


def test_torn_chunk_on_disk_is_fetched_again_after_restart(
    bundle: Bundle, trusted: TrustedKeys, tmp_path: Path
) -> None:
    chunks = chunks_of(bundle)
    first = ChunkAssembler(tmp_path, verified(bundle, trusted))
    for index, data in enumerate(chunks):
        first.add(index, data)
    first.close()
    part = tmp_path / "bundle.ekb.part"
    where = part.read_bytes().find(chunks[2][:64])
    assert where > 0
    with open(part, "r+b") as handle:  # power loss tore chunk 2 on disk
        handle.seek(where + 10)
        handle.write(b"\0\1\2")
    again = ChunkAssembler.resume(tmp_path, trusted, bundle.bundle_id)
    assert again.missing == [2]


def test_bad_chunks_are_dropped_and_reported(bundle: Bundle, trusted: TrustedKeys, tmp_path: Path) -> None:
    chunks = chunks_of(bundle)
    assembler = ChunkAssembler(tmp_path, verified(bundle, trusted))
    flipped = bytes([chunks[3][0] ^ 1]) + chunks[3][1:]
    assert assembler.add(3, flipped) == ChunkResult.BAD_HASH
    assert assembler.add(3, chunks[3] + b"more") == ChunkResult.BAD_SIZE
    assert assembler.add(len(chunks), chunks[0]) == ChunkResult.BAD_INDEX
    assert assembler.add(-1, chunks[0]) == ChunkResult.BAD_INDEX
    assert assembler.bad == {3} and assembler.rejected == 4
    assert 3 in assembler.missing
    assert assembler.add(3, chunks[3]) == ChunkResult.STORED
    assert assembler.bad == set()
    with pytest.raises(BundleError, match="incomplete"):
        assembler.finish(trusted)


def test_assembler_never_stores_more_than_the_manifest_declares(
    bundle: Bundle, bundle_file: Path, trusted: TrustedKeys, tmp_path: Path
) -> None:
    part = tmp_path / "bundle.ekb.part"
    part.write_bytes(b"\xff" * (bundle_file.stat().st_size + 5 * CHUNK))
    assembler = ChunkAssembler(tmp_path, verified(bundle, trusted))
    last = len(chunks_of(bundle)) - 1
    assert assembler.add(last, chunks_of(bundle)[last] + b"x" * CHUNK) == ChunkResult.BAD_SIZE
    assert part.stat().st_size == bundle_file.stat().st_size


def test_files_layout_is_the_installed_layout_in_any_chunk_order(
    bundle: Bundle, trusted: TrustedKeys, tmp_path: Path
) -> None:
    chunks = chunks_of(bundle)
    order = list(range(len(chunks)))
    random.Random(7).shuffle(order)
    assembler = ChunkAssembler(tmp_path / "dl", verified(bundle, trusted), ChunkAssembler.FILES)
    for index in order:
        assert assembler.add(index, chunks[index]) == ChunkResult.STORED
    staged = assembler.finish_staged()
    assert staged.bundle_id == bundle.bundle_id and staged.directory == tmp_path / "dl"
    files = {p.name: p.read_bytes() for p in staged.directory.iterdir()}
    assert files == {
        "manifest.json": bundle.manifest_bytes,
        "manifest.sig": bundle.signature,
        **bundle.members,
    }


def test_files_layout_resumes_after_a_restart_and_holds_every_member(
    bundle: Bundle, trusted: TrustedKeys, tmp_path: Path
) -> None:
    chunks = chunks_of(bundle)
    first = ChunkAssembler(tmp_path, verified(bundle, trusted), ChunkAssembler.FILES)
    for index in range(1, len(chunks), 2):
        first.add(index, chunks[index])
    first.close()  # the device reboots
    again = ChunkAssembler.resume(tmp_path, trusted, bundle.bundle_id, ChunkAssembler.FILES)
    assert again.missing == list(range(0, len(chunks), 2))
    for index in reversed(again.missing):
        assert again.add(index, chunks[index]) == ChunkResult.STORED
    staged = again.finish_staged()
    assert {e.name: (staged.directory / e.name).read_bytes() for e in bundle.manifest.files} == bundle.members


def test_a_member_contradicting_its_signed_hash_is_refused_before_it_can_be_published(
    bundle: Bundle, key: SigningKey, trusted: TrustedKeys
) -> None:
    # A signer's bug, not an attack: the signed chunk plan covers the payload, a member hash
    # does not. Devices check chunks only (the members are the payload those chunks cut), so
    # the workstation refuses such a bundle: every push target goes through read_bundle.
    doc = json.loads(bundle.manifest_bytes)
    doc["files"][0]["sha256"] = "0" * 64
    manifest_bytes = json.dumps(doc).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in (
            ("manifest.json", manifest_bytes),
            ("manifest.sig", key.sign(manifest_bytes)),
            *bundle.members.items(),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with pytest.raises(BundleError, match="does not match its SHA-256"):
        read_bundle(buffer.getvalue(), trusted)


def test_manifest_message_for_another_digest_is_refused(bundle: Bundle, trusted: TrustedKeys) -> None:
    other = hashlib.sha256(b"another bundle").hexdigest()
    with pytest.raises(BundleError, match="mix-and-match"):
        verify_manifest_message(manifest_message(bundle), trusted, other)


def test_manifest_message_signed_by_an_untrusted_key_is_refused(bundle: Bundle) -> None:
    stranger = TrustedKeys([SigningKey.generate().public])
    with pytest.raises(UntrustedKeyError):
        verify_manifest_message(manifest_message(bundle), stranger, bundle.bundle_id)


def test_manifest_message_with_a_forged_signature_is_refused(bundle: Bundle, trusted: TrustedKeys) -> None:
    doc = json.loads(manifest_message(bundle))
    doc["signature"] = "A" * 86 + "=="
    with pytest.raises(SignatureError):
        verify_manifest_message(json.dumps(doc).encode(), trusted, bundle.bundle_id)


@pytest.mark.parametrize("payload", [b"", b"{", b"[]", b'{"schema":"edgekit.bundle-manifest"}', b"\xff" * 10])
def test_malformed_manifest_message_is_refused(bundle: Bundle, trusted: TrustedKeys, payload: bytes) -> None:
    with pytest.raises(BundleError, match="malformed"):
        verify_manifest_message(payload, trusted, bundle.bundle_id)


def test_download_directory_of_another_bundle_is_not_reused(
    bundle: Bundle, trusted: TrustedKeys, tmp_path: Path
) -> None:
    ChunkAssembler(tmp_path, verified(bundle, trusted)).close()
    (tmp_path / "manifest.json").write_bytes(b"{}")
    with pytest.raises(BundleError, match="another bundle"):
        ChunkAssembler(tmp_path, verified(bundle, trusted))


# -- over a real broker ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_late_joiner_gets_the_bundle_from_the_broker_alone(
    mosquitto, bundle: Bundle, bundle_file: Path, trusted: TrustedKeys, tmp_path: Path, protocol: str
) -> None:
    with MqttClient(mosquitto.url, protocol=protocol) as workstation:
        digest = publish_bundle(workstation, bundle)
    # The workstation is gone; only the broker's retained messages remain.
    progress: list[int] = []
    with MqttClient(mosquitto.url, protocol=protocol) as device:
        got = fetch_bundle(
            device, digest, trusted, tmp_path / digest, timeout=30, progress=lambda n, _t: progress.append(n)
        )
    assert got.members == bundle.members
    assert (tmp_path / digest / "bundle.ekb").read_bytes() == bundle_file.read_bytes()
    assert progress[-1] == bundle.manifest.chunks.total_size


def test_finished_download_is_reverified_not_fetched_again(
    mosquitto, bundle: Bundle, trusted: TrustedKeys, tmp_path: Path
) -> None:
    with MqttClient(mosquitto.url) as workstation:
        digest = publish_bundle(workstation, bundle)
    with MqttClient(mosquitto.url) as device:
        fetch_bundle(device, digest, trusted, tmp_path, timeout=30)
    mosquitto.stop()  # no broker: the device restarts and finds its finished download
    offline = MqttClient(mosquitto.url)  # never connects
    assert fetch_bundle(offline, digest, trusted, tmp_path, timeout=1).members == bundle.members
    stored = tmp_path / "bundle.ekb"
    data = bytearray(stored.read_bytes())
    data[-20000] ^= 1  # bit rot in the stored bundle: it is discarded and fetched again
    stored.write_bytes(bytes(data))
    with pytest.raises(BrokerError, match="did not arrive"):
        fetch_bundle(offline, digest, trusted, tmp_path, timeout=0.5)
    assert not stored.exists()


def test_corrupted_retained_chunk_is_detected_and_refetched(
    mosquitto, bundle: Bundle, trusted: TrustedKeys, tmp_path: Path
) -> None:
    topics = Topics()
    with MqttClient(mosquitto.url) as workstation:
        digest = publish_bundle(workstation, bundle)
        good = chunks_of(bundle)[3]
        workstation.publish(
            topics.bundle_chunk(digest, 3), bytes([good[0] ^ 0xFF]) + good[1:], retain=True
        ).wait(5)
    with MqttClient(mosquitto.url) as device, pytest.raises(BundleError, match="chunk 3 .* corrupt"):
        fetch_bundle(device, digest, trusted, tmp_path, timeout=30, max_refetch=2)
    # The good chunks were kept: once the operator republishes, the device fetches only chunk 3.
    assert ChunkAssembler.resume(tmp_path, trusted, digest).missing == [3]
    with MqttClient(mosquitto.url) as workstation:
        publish_bundle(workstation, bundle)
    with MqttClient(mosquitto.url) as device:
        assert fetch_bundle(device, digest, trusted, tmp_path, timeout=30).members == bundle.members


def test_unknown_bundle_times_out_with_a_broker_error(
    mosquitto, trusted: TrustedKeys, tmp_path: Path
) -> None:
    missing = hashlib.sha256(b"never published").hexdigest()
    with MqttClient(mosquitto.url) as device, pytest.raises(BrokerError, match="its manifest missing"):
        fetch_bundle(device, missing, trusted, tmp_path, timeout=0.5)


def test_a_download_whose_chunks_never_come_stalls_after_the_inactivity_timeout(
    mosquitto, bundle: Bundle, trusted: TrustedKeys, tmp_path: Path
) -> None:
    with MqttClient(mosquitto.url) as workstation:
        start_upload(workstation, bundle)  # the manifest only: an upload cut short
    count = len(bundle.manifest.chunks.sha256)
    with MqttClient(mosquitto.url) as device, pytest.raises(DownloadStalledError) as info:
        fetch_bundle(device, bundle.bundle_id, trusted, tmp_path, timeout=600, stall_timeout=1.0)
    message = str(info.value)
    assert f"the download of bundle digits@1.0.0 ({bundle.bundle_id[:12]}) stalled" in message
    assert f"{count} of {count} chunks still missing" in message and "publish the bundle again" in message


def test_a_broker_that_sends_retained_messages_to_exact_topics_only_still_delivers(
    rabbitmq, digits_models, key: SigningKey, trusted: TrustedKeys, tmp_path: Path
) -> None:
    """RabbitMQ's MQTT plugin sends no retained message to `.../chunks/+`: the device asks
    for the chunks by their exact topics, never holding more than EXACT_WINDOW of them."""
    card = tmp_path / "card.md"
    card.write_bytes(random.Random(7).randbytes(64 * 1024).hex().encode())
    path = tmp_path / "carded.ekb"
    create_bundle(
        digits_models.fp32,
        name="digits",
        version="1.0.0",
        key=key,
        output=path,
        model_card=card,
        chunk_size=CHUNK,
    )
    bundle = read_bundle(path, trusted)
    count = len(bundle.manifest.chunks.sha256)
    assert count > 2 * EXACT_WINDOW, "the window must move for this test to mean anything"
    with MqttClient(rabbitmq.url) as workstation:
        publish_bundle(workstation, bundle)
    held: list[int] = []
    with MqttClient(rabbitmq.url) as device:

        def progress(_received: int, _total: int) -> None:
            held.append(sum("/chunks/" in f and "+" not in f for f in device._subscriptions))

        fetched = fetch_bundle(
            device, bundle.bundle_id, trusted, tmp_path / "dl", timeout=120, progress=progress
        )
        assert fetched.members == bundle.members
        assert [f for f in device._subscriptions if bundle.bundle_id in f] == []  # all let go
        clear_bundle(device, bundle.bundle_id, count)  # RabbitMQ keeps retained messages on disk
    assert 0 < max(held) <= EXACT_WINDOW


def test_download_survives_a_broker_restart(
    mosquitto, bundle: Bundle, trusted: TrustedKeys, tmp_path: Path
) -> None:
    # A production broker persists retained messages; so does this one for this test.
    mosquitto.extra_config = f"persistence true\npersistence_location {mosquitto.directory}/\n"
    mosquitto.write_config()
    mosquitto.stop()
    mosquitto.start()
    messages = list(bundle_messages(bundle, Topics()))
    chunks, manifest = messages[:-1], messages[-1]
    first, rest = chunks[: len(chunks) // 2], chunks[len(chunks) // 2 :]
    # The upload is cut in half by the outage: the device holds the first half when it happens.
    with MqttClient(mosquitto.url) as workstation:
        for topic, data in [manifest, *first]:
            workstation.publish(topic, data, retain=True).wait(5)
    have_first = threading.Event()
    first_bytes = sum(len(data) for _, data in first)
    result: dict[str, object] = {}
    device = MqttClient(mosquitto.url, reconnect_min=0.1, reconnect_max=0.5)

    def progress(received: int, _total: int) -> None:
        if received == first_bytes:
            have_first.set()

    def run() -> None:
        try:
            result["bundle"] = fetch_bundle(
                device, bundle.bundle_id, trusted, tmp_path, timeout=60, progress=progress
            )
        except Exception as exc:
            result["error"] = exc

    with device.connect():
        thread = threading.Thread(target=run)
        thread.start()
        assert have_first.wait(30)
        assert mosquitto.process is not None
        mosquitto.process.terminate()  # clean shutdown: Mosquitto saves its retained messages
        mosquitto.process.wait(10)
        mosquitto.process = None
        mosquitto.start()
        with MqttClient(mosquitto.url) as workstation:
            for topic, data in rest:
                workstation.publish(topic, data, retain=True).wait(5)
        thread.join(60)
        assert device.connections >= 2
    assert "error" not in result, result.get("error")
    assert isinstance(result["bundle"], Bundle) and result["bundle"].members == bundle.members


def test_cleared_bundle_is_gone_from_the_broker(mosquitto, bundle: Bundle) -> None:
    topics = Topics()
    with MqttClient(mosquitto.url) as workstation:
        digest = publish_bundle(workstation, bundle)
        clear_bundle(workstation, digest, len(bundle.manifest.chunks.sha256))
        workstation.publish("edgekit/marker", b"after", retain=True).wait(5)
    inbox = Inbox()
    with MqttClient(mosquitto.url) as late:
        late.subscribe(f"{topics.prefix}/bundles/{digest}/#", inbox)
        late.subscribe("edgekit/marker", inbox)
        inbox.wait_topic("edgekit/marker")
    assert inbox.topics() == ["edgekit/marker"]


# -- endless data: nothing a broker (or whoever publishes to it) sends grows a download --------------


def test_a_manifest_declaring_more_than_the_device_accepts_is_refused_before_any_chunk(
    mosquitto, bundle: Bundle, trusted: TrustedKeys, tmp_path: Path
) -> None:
    limit = bundle.manifest.chunks.total_size - 1
    with pytest.raises(BundleError, match="over the .*-byte limit"):
        verify_manifest_message(manifest_message(bundle), trusted, bundle.bundle_id, max_size=limit)
    with MqttClient(mosquitto.url) as workstation:
        digest = publish_bundle(workstation, bundle)
    with MqttClient(mosquitto.url) as device, pytest.raises(BundleError, match="over the"):
        fetch_bundle(device, digest, trusted, tmp_path, timeout=30, max_size=limit)
    assert not (tmp_path / "bundle.ekb.part").exists()  # not one chunk was stored


def test_endless_junk_on_the_chunk_topics_neither_grows_the_download_nor_stops_it(
    mosquitto, bundle: Bundle, bundle_file: Path, trusted: TrustedKeys, tmp_path: Path
) -> None:
    """Retained junk on hundreds of chunk indexes the plan does not have, an oversized copy of a
    real chunk, and duplicates: dropped and counted; the real bundle is still assembled, and
    the download file never holds more than the signed plan declares."""
    topics = Topics()
    with MqttClient(mosquitto.url) as attacker:
        digest = publish_bundle(attacker, bundle)
        count = len(bundle.manifest.chunks.sha256)
        junk = [
            attacker.publish(topics.bundle_chunk(digest, count + i), b"x" * 4096, retain=True)
            for i in range(300)
        ]
        for delivery in junk:
            delivery.wait(10)
    seen = Inbox()
    with MqttClient(mosquitto.url) as device:
        device.subscribe(topics.bundle_chunks_filter(digest), seen)
        seen.wait_topic(topics.bundle_chunk(digest, count + 299))
        fetched = fetch_bundle(device, digest, trusted, tmp_path, timeout=30)
    assert fetched.members == bundle.members
    assert (tmp_path / "bundle.ekb").read_bytes() == bundle_file.read_bytes()


def test_an_oversized_retained_chunk_is_refused_a_bounded_number_of_times(
    mosquitto, bundle: Bundle, bundle_file: Path, trusted: TrustedKeys, tmp_path: Path
) -> None:
    """A chunk replaced by an endless (here 1 MiB for 1 KiB) payload: never stored, re-fetched
    at most max_refetch times, then the fetch fails with the reason; the partial download
    stays exactly the size of the signed plan's file."""
    topics = Topics()
    with MqttClient(mosquitto.url) as attacker:
        digest = publish_bundle(attacker, bundle)
        attacker.publish(topics.bundle_chunk(digest, 2), b"\0" * (1024 * 1024), retain=True).wait(10)
    with MqttClient(mosquitto.url) as device, pytest.raises(BundleError, match="chunk 2 .* 3 times"):
        fetch_bundle(device, digest, trusted, tmp_path, timeout=30, max_refetch=2)
    resumed = ChunkAssembler.resume(tmp_path, trusted, digest)
    assert resumed.missing == [2]
    resumed.close()
    assert (tmp_path / "bundle.ekb.part").stat().st_size == bundle_file.stat().st_size


def publish_half(url: str, bundle: Bundle) -> int:
    """The manifest and the first half of the chunks, retained (an upload cut short)."""
    messages = list(bundle_messages(bundle, Topics()))
    half = (len(messages) - 1) // 2
    with MqttClient(url) as workstation:
        for topic, data in [*messages[:half], messages[-1]]:
            workstation.publish(topic, data, retain=True).wait(10)
    return half


def test_a_cancelled_download_stops_and_keeps_what_it_stored(
    mosquitto, bundle: Bundle, trusted: TrustedKeys, tmp_path: Path
) -> None:
    """What a newer desired state or stopping the agent does: the fetch raises
    DownloadCancelledError within a tick of the event, and a later fetch resumes from there."""
    half = publish_half(mosquitto.url, bundle)
    cancel, stored = threading.Event(), threading.Event()
    outcome: list[BaseException] = []
    progress = lambda received, total: stored.set() if received >= half * CHUNK else None  # noqa: E731

    def fetch() -> None:
        try:
            fetch_bundle(
                device, bundle.bundle_id, trusted, tmp_path, timeout=None, progress=progress, cancel=cancel
            )
        except BaseException as exc:
            outcome.append(exc)

    with MqttClient(mosquitto.url) as device:
        thread = threading.Thread(target=fetch)
        thread.start()
        assert stored.wait(30)
        cancel.set()
        # No overall limit and the default 120 s inactivity timeout: only the cancel ends it.
        thread.join(30)
        assert not thread.is_alive()
    assert outcome and isinstance(outcome[0], DownloadCancelledError), outcome
    assert "was cancelled" in str(outcome[0])
    assert (
        len(ChunkAssembler.resume(tmp_path, trusted, bundle.bundle_id).missing)
        == len(chunks_of(bundle)) - half
    )


def open_files_under(directory: Path) -> list[str]:
    """The descriptors of this process open on files under ``directory`` (from /proc/self/fd)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor listdir itself used, closed since
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


@pytest.mark.parametrize(
    "way_out", ["complete", "complete-staged", "stalled", "cancelled", "timeout", "corrupt"]
)
def test_every_way_out_of_a_fetch_closes_the_files_it_opened(
    way_out: str, mosquitto, bundle: Bundle, trusted: TrustedKeys, tmp_path: Path
) -> None:
    if way_out.startswith("complete"):
        with MqttClient(mosquitto.url) as workstation:
            publish_bundle(workstation, bundle)
    elif way_out == "corrupt":
        with MqttClient(mosquitto.url) as workstation:
            publish_bundle(workstation, bundle)
            good = chunks_of(bundle)[1]
            workstation.publish(
                Topics().bundle_chunk(bundle.bundle_id, 1), bytes([good[0] ^ 0xFF]) + good[1:], retain=True
            ).wait(5)
    else:
        publish_half(mosquitto.url, bundle)
    cancel = threading.Event()
    expected: dict[str, type[BaseException]] = {
        "stalled": DownloadStalledError,
        "cancelled": DownloadCancelledError,
        "timeout": BrokerError,
        "corrupt": BundleError,
    }
    with MqttClient(mosquitto.url) as device:
        device.wait_connected(10)
        gc.collect()  # what earlier tests left for the collector closes now, not during the fetch
        before = set(os.listdir("/proc/self/fd"))
        fetch = fetch_staged_bundle if way_out == "complete-staged" else fetch_bundle
        try:
            fetch(
                device,
                bundle.bundle_id,
                trusted,
                tmp_path / "download",
                timeout=2.0 if way_out == "timeout" else None,
                stall_timeout=1.0 if way_out == "stalled" else 600.0,
                max_refetch=0,
                cancel=cancel,
                progress=lambda received, total: cancel.set() if way_out == "cancelled" else None,
            )
        except BaseException as exc:
            assert isinstance(exc, expected[way_out]), exc
        else:
            assert way_out.startswith("complete")
        assert open_files_under(tmp_path) == []
        assert set(os.listdir("/proc/self/fd")) - before == set()  # nothing opened stays open
