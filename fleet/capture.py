"""Capture, the fleet side: set the signed policy, keep what devices send (ciphertext only), and
turn it into a dataset on the owner's workstation (docs/capture.md).

- :func:`set_policy` / :func:`turn_off`: sign a :class:`~edgekit.capture.CapturePolicy` with the
  fleet's key, numbered from the fleet's desired-state counter (so numbers only grow, whoever sets
  it), publish it retained on ``fleets/{fleet}/capture`` and keep a copy in the registry for
  ``capture policy show``. Audited (``capture-policy``).
- :class:`CaptureSink`: subscribed to every device's ``capture`` topic; reassembles a record's
  chunks, checks its clear header (the device of the topic, a known fleet), stores it keyed by
  (device, seq) (a record sent again is stored once), then acknowledges it on
  ``devices/{device}/capture_ack`` so the device deletes it. It never sees plaintext.
- :func:`pull`: opens the records with the owner's private capture key into a dataset folder;
  a record that does not open (wrong key, tampered, truncated) is refused with one line, the rest
  are kept. :func:`purge`: deletes stored records; with devices, asks them to drop what they hold.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
from edgekit.atomic import atomic_write
from edgekit.capture import (
    CaptureAck,
    CapturedRecord,
    CaptureKey,
    CapturePolicy,
    decode_capture_policy,
    join_chunks,
    new_capture_policy,
    open_record,
    parse_chunk,
    record_header,
    sign_capture_policy,
)
from edgekit.errors import CaptureError, TopicError
from edgekit.keys import SigningKey
from edgekit.mqtt import Message, MqttClient
from edgekit.topics import DEVICE_CAPTURE, Topics, check_fleet_id
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from .control import ControlPlane
from .registry import Registry
from .registry.models import CapturePolicyRow, CaptureRecordRow, ControlMeta, Device

__all__ = [
    "CaptureSink",
    "KeptPolicy",
    "PullResult",
    "current_policy",
    "policy_history",
    "pull",
    "purge",
    "set_policy",
    "turn_off",
]

log = logging.getLogger(__name__)

#: Partial records (chunks still missing) held in memory at most; the oldest is forgotten first
#: (its device sends it again when no acknowledgement comes).
MAX_PARTIAL = 256


def _meta_key(fleet: str) -> str:
    return f"capture-policy:{fleet}"


def _seen_seq(control: ControlPlane, client: MqttClient, topics: Topics, fleet: str, wait: float) -> int:
    """The highest policy number the broker (its retained policy) or the registry knows: the next
    one must be above it, whoever set that one (another operator, another registry)."""
    seen = threading.Event()
    found: list[int] = []

    def on_policy(message: Message) -> None:
        with contextlib.suppress(CaptureError):  # not a policy we can read: no floor from it
            found.append(decode_capture_policy(message.payload).seq)
        seen.set()

    topic = topics.fleet_capture(fleet)
    client.subscribe(topic, on_policy, qos=1, timeout=10.0)
    seen.wait(wait)  # a retained policy arrives at once after the SUBACK, if there is one
    client.unsubscribe(topic)
    kept = current_policy(control, fleet)
    return max([*found, kept.seq if kept is not None else 0])


def publish_policy(
    control: ControlPlane, client: MqttClient, topics: Topics, policy: CapturePolicy, key: SigningKey
) -> bytes:
    envelope = sign_capture_policy(policy, key)
    client.publish(topics.fleet_capture(policy.fleet), envelope, qos=1, retain=True).wait(30.0)
    with control.registry.session() as session:
        row = session.get(ControlMeta, _meta_key(policy.fleet))
        text = base64.b64encode(envelope).decode("ascii")
        if row is None:
            session.add(ControlMeta(key=_meta_key(policy.fleet), value=text))
        else:
            row.value = text
        if session.get(CapturePolicyRow, (policy.fleet, policy.seq)) is None:
            session.add(
                CapturePolicyRow(
                    fleet=policy.fleet,
                    seq=policy.seq,
                    enabled=policy.enabled,
                    note=policy.note,
                    signer=key.key_id,
                    issued_at=datetime.fromtimestamp(policy.issued_at, timezone.utc),
                    document=policy.to_json().decode("utf-8"),
                    envelope=text,
                )
            )
        session.commit()
    return envelope


def set_policy(
    control: ControlPlane,
    client: MqttClient,
    key: SigningKey,
    fleet: str,
    recipient: bytes,
    *,
    topics: Optional[Topics] = None,
    **options: Any,
) -> CapturePolicy:
    """Sign and publish a capture policy for ``fleet`` (options: those of
    :func:`edgekit.capture.new_capture_policy`); audited."""
    with _audited(control, "capture-policy", fleet) as note:
        above = _seen_seq(control, client, topics or Topics(), fleet, wait=1.0)
        policy = new_capture_policy(fleet, seq=control.next_seq(fleet, above), recipient=recipient, **options)
        publish_policy(control, client, topics or Topics(), policy, key)
        note.append(policy.describe() + (f"; note: {policy.note}" if policy.note else ""))
    return policy


def turn_off(
    control: ControlPlane, client: MqttClient, key: SigningKey, fleet: str, *, topics: Optional[Topics] = None
) -> CapturePolicy:
    """A newer signed policy with capture off: devices stop at once (an older "on" cannot be replayed)."""
    with _audited(control, "capture-off", fleet) as note:
        above = _seen_seq(control, client, topics or Topics(), fleet, wait=1.0)
        policy = new_capture_policy(fleet, seq=control.next_seq(fleet, above), enabled=False)
        publish_policy(control, client, topics or Topics(), policy, key)
        note.append(policy.describe())
    return policy


def current_policy(control: ControlPlane, fleet: str) -> Optional[CapturePolicy]:
    """The policy set last for ``fleet`` (as kept in the registry), or None."""
    with control.registry.session() as session:
        row = session.get(ControlMeta, _meta_key(fleet))
    if row is None:
        return None
    return decode_capture_policy(base64.b64decode(row.value))


@dataclass(frozen=True)
class KeptPolicy:
    """A capture policy as the registry keeps it: the policy, who signed it, when."""

    policy: CapturePolicy
    signer: str  # key id of the signing key
    issued_at: datetime


def policy_history(control: ControlPlane, fleet: str) -> dict[int, KeptPolicy]:
    """Every capture policy signed for ``fleet`` that the registry kept, by number. (A policy set
    before the registry kept them all, the latest, comes from ``capture policy show``'s copy.)"""
    kept: dict[int, KeptPolicy] = {}
    with control.registry.session() as session:
        rows = list(session.scalars(select(CapturePolicyRow).where(CapturePolicyRow.fleet == fleet)))
        meta = session.get(ControlMeta, _meta_key(fleet))
    for row in rows:
        with contextlib.suppress(CaptureError):
            kept[row.seq] = KeptPolicy(
                decode_capture_policy(base64.b64decode(row.envelope)), row.signer, row.issued_at
            )
    if meta is not None:
        with contextlib.suppress(CaptureError, ValueError):
            from edgekit.capture import POLICY
            from edgekit.envelope import open_envelope

            envelope = base64.b64decode(meta.value)
            latest = decode_capture_policy(envelope)
            if latest.seq not in kept:
                kept[latest.seq] = KeptPolicy(
                    latest,
                    open_envelope(envelope, POLICY).signer,
                    datetime.fromtimestamp(latest.issued_at, timezone.utc),
                )
    return dict(sorted(kept.items()))


class _audited:
    """Audit an action with a detail line the block fills in (or the error it ended with)."""

    def __init__(self, control: ControlPlane, action: str, fleet: str) -> None:
        self.control, self.action, self.fleet = control, action, fleet
        self.note: list[str] = []

    def __enter__(self) -> list[str]:
        return self.note

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if exc is None:
            self.control.audit(self.action, fleet=self.fleet, detail="; ".join(self.note) or None)
        else:
            self.control.audit(self.action, fleet=self.fleet, result="failed", detail=str(exc)[:500])


# -- receiving -------------------------------------------------------------------------------------


@dataclass
class SinkStats:
    stored: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


class CaptureSink:
    """Stores the sealed records devices send, and acknowledges them. ``client`` is an operator
    connection (not yet connected, or connected: :meth:`start` subscribes either way)."""

    def __init__(self, registry: Registry, client: MqttClient, topics: Optional[Topics] = None) -> None:
        self.registry = registry
        self.client = client
        self.topics = topics or Topics()
        self.stats = SinkStats()
        self._partial: dict[tuple[str, int], dict[int, bytes]] = {}
        self._lock = threading.Condition()

    def start(self, connect_timeout: Optional[float] = 10.0) -> CaptureSink:
        connected = self.client.connected
        self.client.subscribe(
            self.topics.all_devices_filter("capture"),
            self._on_chunk,
            qos=1,
            timeout=10.0 if connected else None,
        )
        if not connected:
            self.client.connect(timeout=connect_timeout)
        return self

    def stop(self) -> None:
        self.client.close()

    def wait_for(self, stored: int, timeout: float = 30.0) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: self.stats.stored + self.stats.duplicates >= stored, timeout)

    def _reject(self, reason: str, why: str) -> None:
        with self._lock:
            self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        log.warning("dropped a capture message (%s): %s", reason, why)

    def _on_chunk(self, message: Message) -> None:
        try:
            parts = self.topics.parse(message.topic)
            if parts.kind != DEVICE_CAPTURE:
                raise TopicError(f"{message.topic} is not a capture topic")
            chunk = parse_chunk(message.payload)
        except (TopicError, CaptureError) as exc:
            self._reject(getattr(exc, "reason", "unknown_topic"), str(exc))
            return
        if chunk.device != parts.device:
            self._reject("device_mismatch", f"a chunk of {chunk.device} came on the topic of {parts.device}")
            return
        slot = (chunk.device, chunk.seq)
        held = self._partial.setdefault(slot, {})
        held[chunk.part] = chunk.data
        if len(self._partial) > MAX_PARTIAL:
            self._partial.pop(next(iter(self._partial)))
        if len(held) < chunk.parts:
            return
        self._partial.pop(slot, None)
        record = join_chunks([held[i] for i in range(chunk.parts)])
        try:
            self._store(chunk.device, chunk.seq, record)
        except CaptureError as exc:
            self._reject(getattr(exc, "reason", "malformed"), str(exc))
            return
        except SQLAlchemyError as exc:  # not acknowledged: the device sends it again later
            self._reject("db_error", str(exc).splitlines()[0][:200])
            return
        ack = CaptureAck(chunk.device, (chunk.seq,))
        self.client.publish(self.topics.device_capture_ack(chunk.device), ack.to_json(), qos=1)

    def _store(self, device: str, seq: int, record: bytes) -> None:
        head = record_header(record)
        if head.device != device or head.seq != seq:
            raise CaptureError(f"record {seq} of {device} names device {head.device} seq {head.seq}")
        with self.registry.session() as session:
            known = session.get(Device, device)
            if known is not None and known.fleet != head.fleet:
                raise CaptureError(
                    f"device {device} is in fleet {known.fleet}, but its record names {head.fleet}"
                )
            if session.get(CaptureRecordRow, (device, seq)) is not None:
                with self._lock:
                    self.stats.duplicates += 1
                    self._lock.notify_all()
                return
            session.add(
                CaptureRecordRow(
                    device=device,
                    seq=seq,
                    fleet=head.fleet,
                    key_id=head.key_id,
                    size=len(record),
                    received_at=datetime.now(timezone.utc),
                    data=record,
                )
            )
            try:
                session.commit()
            except IntegrityError:  # stored by another process just now
                session.rollback()
        with self._lock:
            self.stats.stored += 1
            self._lock.notify_all()


# -- the dataset -----------------------------------------------------------------------------------


@dataclass
class PullResult:
    directory: str
    written: int = 0
    already: int = 0
    skipped: int = 0  # filtered out by --trigger
    refused: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def stored_records(
    registry: Registry, fleet: str, since: Optional[datetime] = None, device: Optional[str] = None
) -> Iterable[CaptureRecordRow]:
    query = select(CaptureRecordRow).where(CaptureRecordRow.fleet == fleet)
    if since is not None:
        query = query.where(CaptureRecordRow.received_at >= since)
    if device is not None:
        query = query.where(CaptureRecordRow.device == device)
    with registry.session() as session:
        return list(
            session.scalars(
                query.order_by(CaptureRecordRow.received_at, CaptureRecordRow.device, CaptureRecordRow.seq)
            )
        )


def _image(array: np.ndarray) -> Optional[np.ndarray]:
    """The array as an 8-bit image (H, W[, C]) if it is image-shaped, else None."""
    a = array[0] if array.ndim == 4 and array.shape[0] == 1 else array
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or min(a.shape[:2]) < 2:
        return None
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating) and a.size and float(a.min()) >= 0.0 and float(a.max()) <= 1.0:
        return (a * 255.0 + 0.5).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating) and a.size and float(a.min()) >= 0 and float(a.max()) <= 255.0:
        return a.astype(np.uint8)
    return None


def _write_record(directory: Path, record: CapturedRecord) -> dict[str, Any]:
    head = record.header
    rid = f"{head.device}-{head.seq}"
    line: dict[str, Any] = {
        "id": rid,
        "device": head.device,
        "seq": head.seq,
        "time": datetime.fromtimestamp(record.time, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "trigger": record.trigger,
        "bundle": record.bundle,
        "outputs": record.outputs,
        "top_class": record.top_class,
        "top_score": record.top_score,
        "policy_seq": record.policy_seq,
        "input": None,
        "image": None,
    }
    if record.input_bytes is not None and record.input_dtype and record.input_shape is not None:
        try:
            shape: tuple[int, ...] = tuple(record.input_shape)
            array: np.ndarray = np.frombuffer(record.input_bytes, dtype=np.dtype(record.input_dtype)).reshape(
                shape
            )
        except (TypeError, ValueError):
            raise CaptureError(
                f"record {head.seq} of device {head.device}: its input does not match its shape"
            ) from None
        sample = array[0] if array.ndim > 1 and array.shape[0] == 1 else array  # one sample, no batch axis
        name = f"inputs/{rid}.npy"
        (directory / "inputs").mkdir(exist_ok=True)
        np.save(directory / name, sample, allow_pickle=False)
        line["input"] = name
        picture = _image(array)
        if picture is not None:
            from PIL import Image

            (directory / "images").mkdir(exist_ok=True)
            line["image"] = f"images/{rid}.png"
            Image.fromarray(picture).save(directory / line["image"])
    return line


def pull(
    control: ControlPlane,
    key: CaptureKey,
    fleet: str,
    directory: Path,
    *,
    since: Optional[datetime] = None,
    device: Optional[str] = None,
    trigger: Optional[str] = None,
) -> PullResult:
    """Open the fleet's stored records into ``directory`` (created; records already there are
    kept and not written again). Audited (``capture-pull``)."""
    check_fleet_id(fleet)  # before anything is written
    directory = Path(directory)
    result = PullResult(str(directory))
    with _audited(control, "capture-pull", fleet) as note:
        directory.mkdir(parents=True, exist_ok=True)
        index = directory / "records.jsonl"
        lines: list[dict[str, Any]] = []
        if index.exists():
            lines = [json.loads(t) for t in index.read_text().splitlines() if t.strip()]
        have = {line["id"] for line in lines}
        for row in stored_records(control.registry, fleet, since, device):
            rid = f"{row.device}-{row.seq}"
            if rid in have:
                result.already += 1
                continue
            try:
                record = open_record(bytes(row.data), key)
                if trigger is not None and record.trigger != trigger:
                    result.skipped += 1
                    continue
                lines.append(_write_record(directory, record))
            except CaptureError as exc:
                result.refused.append(str(exc))
                continue
            except (ValueError, TypeError, RecursionError) as exc:  # opened, but not what a device writes
                result.refused.append(f"record {row.seq} of device {row.device} is malformed inside: {exc}")
                continue
            have.add(rid)
            result.written += 1
        atomic_write(index, "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines).encode())
        _write_labels_template(directory, lines)
        _write_readme(directory, fleet, policy_history(control, fleet), lines)
        note.append(f"{result.written} records into {directory}, {len(result.refused)} refused")
    return result


def _write_labels_template(directory: Path, lines: list[dict[str, Any]]) -> None:
    rows = ["id,label"] + [
        f"{line['id']},{line['top_class'] if line['top_class'] is not None else ''}" for line in lines
    ]
    atomic_write(directory / "labels-template.csv", ("\n".join(rows) + "\n").encode())


def _policy_lines(history: dict[int, KeptPolicy], lines: list[dict[str, Any]]) -> list[str]:
    """Each policy the records were collected under (its number, what it allowed, who signed it
    and when, its note), with how many records it collected; then the fleet's policy now."""
    counts: dict[int, int] = {}
    for line in lines:
        seq = line.get("policy_seq")
        if isinstance(seq, int):
            counts[seq] = counts.get(seq, 0) + 1
    text = []
    for seq in sorted(counts):
        kept = history.get(seq)
        head = f"- **Policy {seq}** ({counts[seq]} record{'s' if counts[seq] != 1 else ''})"
        if kept is None:
            text.append(
                f"{head}: not kept in this fleet's registry (signed elsewhere, or before it kept them)."
            )
            continue
        text.append(
            f"{head}, signed {kept.issued_at:%Y-%m-%d %H:%M} UTC by key {kept.signer[:16]}: "
            f"{kept.policy.describe()}."
        )
        if kept.policy.note:
            text.append(f"  Why, for whom (the policy's note): {kept.policy.note}")
    if not counts:
        text.append("- (no records yet)")
    if history:
        latest = history[max(history)].policy
        now = "capture is off" if not latest.enabled else latest.describe()
        text += ["", f"The fleet's policy now (policy {latest.seq}): {now}."]
    return text


def _write_readme(
    directory: Path, fleet: str, history: dict[int, KeptPolicy], lines: list[dict[str, Any]]
) -> None:
    devices = sorted({line["device"] for line in lines})
    triggers = sorted({line["trigger"] for line in lines})
    text = [
        f"# Field data captured on fleet {fleet}",
        "",
        f"{len(lines)} records from {len(devices)} device(s) ({', '.join(devices) or 'none'}); triggers: "
        f"{', '.join(triggers) or 'none'}.",
        "",
        "Collected under the owner's signed capture policies (each record's `policy_seq` in `records.jsonl`):",
        "",
        *_policy_lines(history, lines),
    ]
    text += [
        "",
        "- `records.jsonl`: one line per record: device, time, bundle, trigger, the model's outputs and top class.",
        "- `inputs/ID.npy`: the input the model saw (one sample, no batch axis); `images/ID.png` when it is an image.",
        "- `labels.csv` (yours to write, `id,label`): copy `labels-template.csv` to `labels.csv`; it holds the model's",
        "  guess for each record as its label: look at each image and correct the wrong ones (an integer class). Leave a",
        "  label blank to leave that record out (they are counted when the folder is read). With `labels.csv`, this folder",
        "  is a DATA argument of `edgekit convert --eval/--calibration/--train`; without it, for `--calibration` and",
        "  `--baseline` only.",
        "",
        "This data was captured from your devices' inputs: keep it as your privacy notice says, and delete it",
        f"(`edgekit capture purge --fleet {fleet}` for the copies on the fleet) when it is no longer needed.",
        "",
    ]
    atomic_write(directory / "README.md", "\n".join(text).encode())


def purge(
    control: ControlPlane,
    fleet: str,
    *,
    before: Optional[datetime] = None,
    client: Optional[MqttClient] = None,
    devices: Iterable[str] = (),
    topics: Optional[Topics] = None,
) -> int:
    """Delete the fleet's stored records (received before ``before``, else all); with ``client``
    and ``devices``, ask those devices to delete what they still hold. Audited (``capture-purge``)."""
    check_fleet_id(fleet)
    topics = topics or Topics()
    with _audited(control, "capture-purge", fleet) as note:
        query = delete(CaptureRecordRow).where(CaptureRecordRow.fleet == fleet)
        if before is not None:
            query = query.where(CaptureRecordRow.received_at < before)
        with control.registry.session() as session:
            deleted = int(session.execute(query).rowcount or 0)  # type: ignore[attr-defined]
            session.commit()
        note.append(
            f"deleted {deleted} stored records"
            + (f" received before {before:%Y-%m-%d %H:%M}" if before else "")
        )
        asked = []
        for device in devices:
            if client is None:
                break
            purge = CaptureAck(device, drop_all=True).to_json()
            client.publish(topics.device_capture_ack(device), purge, qos=1).wait(30.0)
            asked.append(device)
        if asked:
            note.append(f"asked {', '.join(asked)} to delete what they hold")
    return deleted
