"""Fuzz targets: every decoder of the wire protocol, the bundle reader and the agent's state
files, each a function of raw bytes that lets through only the error its decoder documents
(and fails on anything else: a crash, another exception, a decoded value that breaks the
decoder's promises).

Model files count as input too: a bundle carries one, and `edgekit bundle create` reads the
owner's (``tflite_model``: every reader in edgekit.tflite).

The same targets run under hypothesis in the normal suite (tests/sdk/test_fuzz.py, fast) and
under atheris/libFuzzer for a set time (`make fuzz`, FUZZ_SECONDS; fuzz/run.py), seeded with the
real messages :func:`seeds` writes.
"""

from __future__ import annotations

import functools
import json
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgekit import SigningKey, TrustedKeys
from edgekit.agent.install import POINTER_FILE, BundleStore
from edgekit.agent.outbox import Outbox
from edgekit.agent.telemetry import Event, TelemetryRecord
from edgekit.baseline import Baseline
from edgekit.bundle import Bundle, create_bundle, read_bundle
from edgekit.capture import (
    CaptureKey,
    new_capture_policy,
    open_record,
    parse_chunk,
    seal_record,
    sign_capture_policy,
    split_chunks,
    verify_capture_policy,
)
from edgekit.desired import new_desired_state, sign_desired_state, verify_desired_state
from edgekit.errors import (
    BundleError,
    CaptureError,
    DataError,
    DesiredStateError,
    MessageError,
    ModelFormatError,
    TopicError,
    TrustMetadataError,
)
from edgekit.manifest import Manifest
from edgekit.reports import DeviceStateReport, decode_json_message
from edgekit.roles import DeviceTrust, sign_trust_upgrade, verify_trust_upgrade
from edgekit.tflite import constant_tensors, inspect_tflite
from edgekit.topics import Topics
from edgekit.transfer import ChunkAssembler, ChunkResult, manifest_message, verify_manifest_message
from mqtt_helpers import mqtt_packet

NOW = 1_800_000_000
#: The owner's capture key the capture targets open records with.
OWNER = CaptureKey.generate()


@dataclass
class Context:
    """What the targets decode against: a trusted key, a real signed bundle of many chunks."""

    key: SigningKey
    trusted: TrustedKeys
    bundle: Bundle
    bundle_bytes: bytes
    workdir: Path

    @classmethod
    def create(cls, model: Path, data: Path | None, workdir: Path) -> Context:
        """From a .tflite model and (for the drift baseline) a DATA file."""
        key = SigningKey.generate()
        path = workdir / "seed.ekb"
        create_bundle(
            model, name="digits", version="1.0.0", key=key, output=path, chunk_size=1024, baseline=data
        )
        trusted = TrustedKeys([key.public])
        return cls(key, trusted, read_bundle(path, trusted), path.read_bytes(), workdir)

    def chunks(self) -> list[bytes]:
        payload = b"".join(self.bundle.members[f.name] for f in self.bundle.manifest.files)
        size = self.bundle.manifest.chunks.chunk_size
        return [payload[i : i + size] for i in range(0, len(payload), size)]


# -- wire messages ----------------------------------------------------------------------------------


def desired_envelope(ctx: Context, data: bytes) -> None:
    try:
        state = verify_desired_state(data, ctx.trusted, fleet="lab", now=NOW)
    except DesiredStateError as exc:
        assert getattr(exc, "reason", None), "every refusal names its reason"
        return
    assert state.fleet == "lab" and state.expires_at > NOW


def capture_policy(ctx: Context, data: bytes) -> None:
    try:
        policy = verify_capture_policy(data, ctx.trusted, fleet="lab", now=NOW)
    except CaptureError as exc:
        assert getattr(exc, "reason", None), "every refusal names its reason"
        return
    assert policy.fleet == "lab" and policy.expires_at > NOW


def capture_record(ctx: Context, data: bytes) -> None:
    try:
        record = open_record(data, OWNER)
    except CaptureError as exc:
        assert getattr(exc, "reason", None), "every refusal names its reason"
        return
    assert record.header.fleet and record.trigger


def capture_chunk(ctx: Context, data: bytes) -> None:
    try:
        chunk = parse_chunk(data)
    except CaptureError:
        return
    assert 0 <= chunk.part < chunk.parts


@functools.lru_cache(maxsize=1)
def _trust_fleet() -> tuple[dict[str, bytes], bytes]:
    """A real TUF repository of fleet ``lab`` (metadata files) and a trust upgrade for its root."""
    from trust_sim import TrustSim

    sim = TrustSim("lab")
    sim.authorise("1.0.0")
    sim.desire("1.0.0")
    return sim.files(), sign_trust_upgrade("lab", sim.root1, _UPGRADE_KEY)


_UPGRADE_KEY = SigningKey.generate()


def trust_metadata(ctx: Context, data: bytes) -> None:
    """``data`` as the broker's timestamp, snapshot or desired (first byte picks) on top of a
    real set: a device lets out only TrustMetadataError, and applies only the authorised bundle."""
    from trust_sim import Retained, digest

    files, _ = _trust_fleet()
    role = ("timestamp", "snapshot", "desired", "targets")[data[0] % 4] if data else "timestamp"
    device = DeviceTrust("lab", "cam-1", files["root/1"])
    try:
        report = device.refresh(Retained({**files, role: data[1:]}))
    except TrustMetadataError as exc:
        assert getattr(exc, "reason", None), "every refusal names its reason"
        return
    assert report.desired is None or report.desired.bundle_sha256 == digest("1.0.0")


def trust_upgrade(ctx: Context, data: bytes) -> None:
    try:
        root = verify_trust_upgrade(data, TrustedKeys([_UPGRADE_KEY.public]), "lab")
    except TrustMetadataError as exc:
        assert getattr(exc, "reason", None), "every refusal names its reason"
        return
    assert root == _trust_fleet()[0]["root/1"], "only the signed root comes out"


def state_report(ctx: Context, data: bytes) -> None:
    try:
        report = DeviceStateReport.from_json(data)
    except MessageError:
        return
    assert DeviceStateReport.from_json(report.to_json()).status == report.status


def _record(data: bytes, schema: str, decode: Callable[[object], object]) -> None:
    try:
        doc = decode_json_message(data, schema, 1, schema)
        record = decode(doc)
    except (MessageError, DataError):
        return
    # A decoded record is plain, finite JSON again.
    json.dumps(record.to_dict(), allow_nan=False)  # type: ignore[attr-defined]


def telemetry_record(ctx: Context, data: bytes) -> None:
    _record(data, "edgekit.telemetry", TelemetryRecord.from_dict)


def event_record(ctx: Context, data: bytes) -> None:
    _record(data, "edgekit.event", Event.from_dict)


def manifest(ctx: Context, data: bytes) -> None:
    try:
        decoded = Manifest.from_json(data)
    except BundleError:
        return
    assert Manifest.from_json(decoded.to_json()) == decoded


def manifest_msg(ctx: Context, data: bytes) -> None:
    try:
        verified = verify_manifest_message(data, ctx.trusted, ctx.bundle.bundle_id)
    except BundleError:
        return
    assert verified.manifest_bytes == ctx.bundle.manifest_bytes  # only the real one passes


def chunk_assembly(ctx: Context, data: bytes) -> None:
    """Read ``data`` as a stream of (op, index, length) records: op even = the real chunk at
    index, op odd = ``length`` junk bytes at index. The assembler must store only real chunks,
    never change its file's size, and rebuild the exact bundle once it has them all."""
    chunks = ctx.chunks()
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
        verified = verify_manifest_message(manifest_message(ctx.bundle), ctx.trusted, ctx.bundle.bundle_id)
        assembler = ChunkAssembler(Path(tmp), verified)
        part = Path(tmp) / "bundle.ekb.part"
        size = part.stat().st_size
        try:
            for at in range(0, len(data) - 4, 5):
                op, index, length = struct.unpack_from(">BHH", data, at)
                index -= 16  # negative indexes too
                if op % 2 == 0 and 0 <= index < len(chunks):
                    payload = chunks[index]
                else:
                    payload = data[at : at + length % 2048] if op % 4 == 1 else bytes(length)
                result = assembler.add(index, payload)
                assert result in (ChunkResult.STORED, ChunkResult.DUPLICATE, *ChunkResult.BAD)
                if result == ChunkResult.STORED:
                    assert payload == chunks[index]
            assert part.stat().st_size == size
            if assembler.complete:
                assert assembler.finish(ctx.trusted).bundle_id == ctx.bundle.bundle_id
        finally:
            assembler.close()


def topic(ctx: Context, data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    for prefix in ("edgekit", "acme/edgekit"):
        try:
            parts = Topics(prefix).parse(text)
        except TopicError:
            continue
        assert parts.kind and text.startswith(prefix + "/")


def _reference_packets(stream: bytes) -> list[tuple[int, bytes]]:
    """Whole packets at the start of ``stream``, parsed the plain way (byte by byte)."""
    packets, pos = [], 0
    while pos < len(stream):
        length, shift, index = 0, 0, pos + 1
        while True:
            if index >= len(stream):
                return packets
            byte = stream[index]
            index += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        if index + length > len(stream):
            return packets
        packets.append((stream[pos], stream[index : index + length]))
        pos = index + length
    return packets


def mqtt_stream(ctx: Context, data: bytes) -> None:
    """A broker's byte stream, cut in pieces where the first byte says: the packet reader finds
    exactly the packets a plain byte-by-byte parse finds, however the reads fall, or refuses the
    stream with MalformedPacketError (a remaining length over four bytes). With a
    ``max_packet_size`` it returns the same packets up to the first one over the limit, and
    refuses that one with PacketTooLargeError (on its fixed header alone)."""
    from edgekit.mqtt.framing import MalformedPacketError, PacketReader, PacketTooLargeError

    step = 1 + (data[0] % 64) if data else 1
    stream = data[1:]
    reader, found = PacketReader(), []
    try:
        for start in range(0, len(stream), step):
            buffer, packets = reader.feed(stream[start : start + step])
            found += [(header, bytes(buffer[a:b])) for header, a, b in packets]
    except MalformedPacketError:
        return
    reference = _reference_packets(stream)
    assert found == reference
    limit = 2 + (data[0] >> 2) * 16 if data else 2  # 2 to 1010 bytes
    bounded, taken, refused = PacketReader(max_packet_size=limit), [], False
    try:
        for start in range(0, len(stream), step):
            buffer, packets = bounded.feed(stream[start : start + step])
            taken += [(header, bytes(buffer[a:b])) for header, a, b in packets]
    except PacketTooLargeError:
        refused = True
    assert taken == reference[: len(taken)]
    assert all(_packet_size(body) <= limit for _, body in taken)
    if not refused:
        assert taken == reference


def _packet_size(body: bytes) -> int:
    """A packet's size in all: its first byte, its remaining length's bytes, its body."""
    n = len(body)
    return 1 + (1 if n < 1 << 7 else 2 if n < 1 << 14 else 3 if n < 1 << 21 else 4) + n


def bundle_file(ctx: Context, data: bytes) -> None:
    try:
        bundle = read_bundle(data, ctx.trusted)
    except BundleError:
        return
    assert bundle.bundle_id == ctx.bundle.bundle_id  # nothing but the signed bundle reads


def baseline(ctx: Context, data: bytes) -> None:
    try:
        Baseline.from_json(data)
    except BundleError:
        return


def tflite_model(ctx: Context, data: bytes) -> None:
    """Every reader of a model file: ModelFormatError on a malformed one, nothing else."""
    try:
        info = inspect_tflite(data)
        constants = list(constant_tensors(data))
    except ModelFormatError:
        return
    assert info.subgraphs >= 1
    assert all(len(raw) >= 0 and spec.index >= 0 for spec, raw in constants)


def model_without_subgraphs() -> bytes:
    """A well-formed .tflite FlatBuffer whose Model table has a version and nothing else."""
    vtable = struct.pack("<HHH", 6, 8, 4) + b"\0\0"  # 1 field (version) at offset 4 of an 8-byte table
    table = struct.pack("<iI", 8, 3)  # soffset back to the vtable; version 3
    return struct.pack("<I", 16) + b"TFL3" + vtable + table


# -- the agent's state files ---------------------------------------------------------------------------


def pointer_file(ctx: Context, data: bytes) -> None:
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
        (Path(tmp) / POINTER_FILE).write_bytes(data)
        store = BundleStore(Path(tmp), ctx.trusted, max_bundle_size=1 << 20)
        pointer = store.pointer()
        assert all(v is None or isinstance(v, str) for k, v in pointer.items() if k != "damaged")
        assert store.recover() is None  # no bundle on disk: nothing to serve, and no crash


def outbox_files(ctx: Context, data: bytes) -> None:
    """``data`` split in two: the counter file and a queued record."""
    half = len(data) // 2
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
        directory = Path(tmp) / "box"
        directory.mkdir()
        (directory / "meta.json").write_bytes(data[:half])
        (directory / f"{1:016d}.json").write_bytes(data[half:])
        box = Outbox(directory, 10)
        records = box.peek()
        assert all(isinstance(r, dict) and r.get("seq") == 1 for r in records)
        assert box.put({"x": 1})["seq"] >= 2


TARGETS: dict[str, Callable[[Context, bytes], None]] = {
    "desired_envelope": desired_envelope,
    "state_report": state_report,
    "capture_policy": capture_policy,
    "capture_record": capture_record,
    "capture_chunk": capture_chunk,
    "telemetry_record": telemetry_record,
    "event_record": event_record,
    "manifest": manifest,
    "manifest_message": manifest_msg,
    "chunk_assembly": chunk_assembly,
    "topic": topic,
    "mqtt_stream": mqtt_stream,
    "bundle_file": bundle_file,
    "baseline": baseline,
    "tflite_model": tflite_model,
    "pointer_file": pointer_file,
    "outbox_files": outbox_files,
    "trust_metadata": trust_metadata,
    "trust_upgrade": trust_upgrade,
}


def seeds(ctx: Context) -> dict[str, list[bytes]]:
    """Real inputs for every target: where a fuzzer starts mutating."""
    b = ctx.bundle
    state = new_desired_state(
        "lab",
        bundle_sha256=b.bundle_id,
        bundle_name="digits",
        bundle_version="1.0.0",
        seq=3,
        now=NOW - 10,
    )
    report = DeviceStateReport(
        "cam-1",
        "lab",
        "downloading",
        bundle_id=b.bundle_id,
        target_seq=3,
        progress=0.5,
        time=NOW,
        trust_root=2,
        trust_expires=float(NOW + 3600),
    )
    record = TelemetryRecord(
        device="cam-1",
        fleet="lab",
        window_start=NOW - 60.0,
        window_end=float(NOW),
        count=120,
        errors=1,
        latency_ms={"p50": 1.0, "p95": 2.0, "p99": 3.5},
        throughput=2.0,
        drift={"drifted": False, "complete": True, "samples": 12, "scores": {"x": {"psi": 0.1, "ks": 0.2}}},
        bundle={"name": "digits", "version": "1.0.0", "bundle_id": b.bundle_id},
        cpu_percent=3.5,
        memory_rss_bytes=40_000_000,
        temperature_c=51.2,
        runtime="ai_edge_litert",
        seq=7,
    )
    event = Event("cam-1", "installed", "installed digits@1.0.0", {"name": "digits"}, time=float(NOW), seq=2)
    ops = b"".join(struct.pack(">BHH", 0, i + 16, 0) for i in range(len(ctx.chunks())))
    pointer = {"schema": "edgekit.agent.installed", "schema_version": 1, "current": "a", "previous": None}
    policy = new_capture_policy("lab", seq=4, recipient=OWNER.public_raw, triggers=("sample",), now=NOW - 10)
    import numpy as np

    sealed = seal_record(
        policy,
        device="cam-1",
        seq=9,
        time=float(NOW),
        trigger="sample",
        bundle={"name": "digits", "version": "1.0.0"},
        outputs=[[0.25, 0.75]],
        input_array=np.arange(64, dtype=np.uint8).reshape(8, 8, 1),
    )
    return {
        "capture_policy": [sign_capture_policy(policy, ctx.key)],
        "capture_record": [sealed],
        "capture_chunk": split_chunks(sealed, 100)[:2],
        "desired_envelope": [sign_desired_state(state, ctx.key)],
        "state_report": [report.to_json()],
        "telemetry_record": [json.dumps(record.to_dict()).encode()],
        "event_record": [json.dumps(event.to_dict()).encode()],
        "manifest": [b.manifest_bytes],
        "manifest_message": [manifest_message(b)],
        "chunk_assembly": [ops, ops[::-1]],
        "topic": [
            t.encode() for t in (Topics().bundle_chunk(b.bundle_id, 3), Topics().device_state("cam-1"))
        ],
        "mqtt_stream": [
            bytes([7]) + mqtt_packet(0x30, b"\x00\x03a/b" + bytes(200)) + mqtt_packet(0x90, b"\x00\x01\x00")
        ],
        "bundle_file": [ctx.bundle_bytes],
        "baseline": [b.members["baseline.json"]] if "baseline.json" in b.members else [b"{}"],
        "tflite_model": [b.members["model.tflite"], model_without_subgraphs()],
        "pointer_file": [json.dumps(pointer).encode()],
        "outbox_files": [b'{"next_seq": 2, "dropped_total": 0}' + json.dumps({"seq": 1}).encode()],
        "trust_metadata": [
            bytes([i]) + _trust_fleet()[0][r] for i, r in enumerate(("timestamp", "snapshot", "desired"))
        ],
        "trust_upgrade": [_trust_fleet()[1]],
    }
