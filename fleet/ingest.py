"""Ingest: move what devices say over MQTT (state, telemetry, events) into the registry.

:class:`Ingest` subscribes, through :class:`edgekit.mqtt.MqttClient`, to every device's
``state``, ``telemetry`` and ``events`` topics, decodes each message with the wire decoders of
:mod:`edgekit.reports`, and writes them to the :class:`~edgekit.fleet.registry.Registry` in
batches (``batch_size`` messages, or ``max_delay`` seconds after the first one waiting,
whichever comes first), one transaction per batch.

- **Bad input never stops it.** A message that is oversized, not JSON, of another schema or
  version, has a field of the wrong type or range, names another device than its topic, or
  arrives on a topic that is not a device's, is counted by ``(kind, reason)`` in
  :attr:`IngestStats.rejected` (and ``edgekit_messages_rejected_total``), logged, acknowledged
  and dropped. A row the database itself refuses (it passed the decoders, so this should not
  happen) is isolated by writing the batch row by row, and counted as ``db_refused``.
- **Nothing counted twice.** Telemetry and events are keyed by (device, seq) in the registry:
  QoS 1 redelivery, a device's replay after an outage, or a batch retried after a database
  error are duplicates, stored once and counted once (``duplicates`` is counted apart).
- **Acknowledged after the commit.** The client runs with ``manual_ack``: a QoS 1 message is
  acknowledged to the broker only once the transaction holding it committed, and the broker
  keeps at most ``receive_maximum`` unacknowledged messages in flight, which bounds memory
  when the database is slow or down.
- **Survives the broker and the database.** The client reconnects by itself. A database error
  (connection refused, server restarted, disk locked) keeps the batch and retries it with
  backoff; new messages wait behind it. What was delivered to this process is never lost while
  it lives. The loss window is what the broker held for this client but had not delivered when
  the connection dropped or the process died: with a clean session (``session_expiry=0``, the
  default) the broker discards it; with ``session_expiry`` > 0 and a fixed ``client_id`` the
  broker keeps it (and the unacknowledged messages) and delivers it on reconnect.
- **Scale out.** With ``shared_group`` the telemetry and events filters become MQTT 5 shared
  subscriptions (``$share/GROUP/...``): the broker hands each message to ONE member of the
  group, so N processes split the load. The broker never sends retained messages to a shared
  subscription, and device state is retained (each device's last word, which a new ingest
  must see), so state is never shared: only the worker with ``owns_state=True`` subscribes to
  it, plainly, and gets every device's retained state on each (re)connect. State messages are
  few (they change when a device installs or goes offline), and one owner keeps them in order.

Threads: the MQTT client's dispatcher decodes and queues; one writer thread commits batches and
sends the acknowledgements. :meth:`Ingest.stop` disconnects, then writes what it holds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple, Optional, Union

from edgekit.bench import BenchReport, board_class
from edgekit.errors import ConfigError, MessageError, TopicError
from edgekit.mqtt import Message, MqttClient
from edgekit.reports import DeviceStateReport, Event, TelemetryRecord
from edgekit.topics import DEVICE_BENCH, DEVICE_EVENTS, DEVICE_STATE, DEVICE_TELEMETRY, Topics
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from .registry import (
    BatchResult,
    BenchRow,
    DeviceState,
    EventRow,
    Registry,
    ShadowRow,
    TelemetryRow,
    WriteResult,
)

__all__ = ["Ingest", "IngestStats", "ingest_client"]

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 2000
DEFAULT_MAX_DELAY = 0.2
#: Unacknowledged QoS 1 messages the broker may have in flight to one ingest client.
DEFAULT_RECEIVE_MAXIMUM = 20000
_UTC = timezone.utc
_KINDS = {
    DEVICE_STATE: "state",
    DEVICE_TELEMETRY: "telemetry",
    DEVICE_EVENTS: "events",
    DEVICE_BENCH: "bench",
}


class ShadowTelemetry(NamedTuple):
    """A telemetry window that carries a shadow-evaluation window (docs/shadow.md)."""

    telemetry: TelemetryRow
    shadow: ShadowRow


Item = Union[DeviceState, TelemetryRow, EventRow, ShadowTelemetry, BenchRow]
#: A decoded message waiting for its batch: the row, the message (to ack), the device's fleet.
Pending = tuple[Item, Message, Optional[str]]


@dataclass
class IngestStats:
    """Counters of one ingest process. ``rejected`` is keyed by (kind, reason)."""

    received: int = 0
    states: int = 0
    telemetry: int = 0
    telemetry_duplicates: int = 0
    events: int = 0
    event_duplicates: int = 0
    bench: int = 0  # bench reports stored (docs/bench.md)
    batches: int = 0
    db_errors: int = 0
    rejected: dict[tuple[str, str], int] = field(default_factory=dict)

    def copy(self) -> IngestStats:
        return IngestStats(**{**self.__dict__, "rejected": dict(self.rejected)})

    def minus(self, other: IngestStats) -> IngestStats:
        """The counts added since ``other`` (an earlier copy)."""
        diff = IngestStats(**{k: v - getattr(other, k) for k, v in self.__dict__.items() if k != "rejected"})
        diff.rejected = {
            key: n - other.rejected.get(key, 0)
            for key, n in self.rejected.items()
            if n != other.rejected.get(key, 0)
        }
        return diff

    def add(self, other: IngestStats) -> None:
        for key, value in other.__dict__.items():
            if key != "rejected":
                setattr(self, key, getattr(self, key) + value)
        for reason, n in other.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + n

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


def ingest_client(
    broker: str,
    *,
    client_id: Optional[str] = None,
    session_expiry: int = 0,
    receive_maximum: int = DEFAULT_RECEIVE_MAXIMUM,
    protocol: Optional[str] = None,
    username: Optional[str] = None,
    password: Optional[str] = None,
    fast_read: bool = True,
) -> MqttClient:
    """The MQTT client ingest needs: manual acknowledgements, a wide in-flight window (MQTT 5;
    ``protocol`` None follows the URL's ``?protocol=``, else negotiates), and edgekit's own read
    side (``fast_read``; BENCHMARKS.md measures ingest with and without it)."""
    if session_expiry and not client_id:
        raise ConfigError("a persistent ingest session (session_expiry > 0) needs a fixed client_id")
    return MqttClient(
        broker,
        client_id=client_id,
        protocol=protocol,
        username=username,
        password=password,
        manual_ack=True,
        session_expiry=session_expiry,
        receive_maximum=receive_maximum,
        fast_read=fast_read,
    )


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, _UTC)


class Ingest:
    """One ingest worker: ``start()`` subscribes and returns; ``stop()`` flushes and returns.

    ``client`` is an unconnected :func:`ingest_client`. Counts are in :meth:`snapshot`; the
    service (:mod:`edgekit.fleet.service`) sends their increases to the process that serves
    ``/metrics``.
    """

    def __init__(
        self,
        registry: Registry,
        client: MqttClient,
        *,
        topics: Optional[Topics] = None,
        shared_group: Optional[str] = None,
        owns_state: bool = True,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_delay: float = DEFAULT_MAX_DELAY,
        retry_min: float = 0.2,
        retry_max: float = 10.0,
    ) -> None:
        if batch_size < 1 or max_delay <= 0:
            raise ConfigError("ingest batch_size must be >= 1 and max_delay > 0")
        if shared_group is not None:
            if client.protocol != "5":
                raise ConfigError("shared subscriptions need MQTT 5; drop --workers or use protocol 5")
            if not shared_group or any(c in shared_group for c in "/+#"):
                raise ConfigError(f"invalid shared subscription group {shared_group!r}: no '/', '+' or '#'")
        if not client.manual_ack:
            log.warning("ingest client acknowledges on delivery; use ingest_client() to ack after commit")
        self.registry = registry
        self.client = client
        self.topics = topics or Topics()
        self.shared_group = shared_group
        self.owns_state = owns_state
        self.batch_size = batch_size
        self.max_delay = max_delay
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.stats = IngestStats()
        self._routes: dict[str, tuple[str, str]] = {}
        self._lock = threading.Condition()
        self._pending: list[Pending] = []
        self._first_at = 0.0
        self._stopping = False
        self._writer: Optional[threading.Thread] = None
        #: Set after each committed batch (tests and benchmarks wait on it).
        self.committed = threading.Condition()

    # -- lifecycle ----------------------------------------------------------------------------

    def filters(self) -> list[str]:
        """The subscription filters this worker uses."""
        share = f"$share/{self.shared_group}/" if self.shared_group else ""
        found = [share + self.topics.all_devices_filter(leaf) for leaf in ("telemetry", "events", "bench")]
        if self.owns_state:
            found.insert(0, self.topics.all_devices_filter("state"))
        return found

    def start(self, connect_timeout: Optional[float] = None) -> Ingest:
        """Subscribe and connect; with ``connect_timeout``, BrokerError if not connected in time."""
        self._writer = threading.Thread(target=self._write_loop, name="edgekit-ingest-writer", daemon=True)
        self._writer.start()
        for topic_filter in self.filters():
            self.client.subscribe(topic_filter, self._on_message, qos=1)
        self.client.connect(timeout=connect_timeout)
        log.info("ingest subscribed to %s", ", ".join(self.filters()))
        return self

    def stop(self, timeout: float = 30.0) -> IngestStats:
        """Disconnect (messages already delivered are still taken), write everything held, and
        return the final counts. Idempotent."""
        self.client.close()
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._writer is not None:
            self._writer.join(timeout)
            if self._writer.is_alive():
                log.error(
                    "ingest could not write its last %d messages within %gs", len(self._pending), timeout
                )
        return self.stats.copy()

    def __enter__(self) -> Ingest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> IngestStats:
        """A consistent copy of the counters."""
        with self._lock:
            return self.stats.copy()

    def wait_for(self, predicate: Callable[[IngestStats], bool], timeout: float = 30.0) -> bool:
        """Block until ``predicate(stats)`` holds after a commit or a database error; False on
        timeout."""
        deadline = time.monotonic() + timeout
        with self.committed:
            while not predicate(self.stats):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.committed.wait(remaining)
        return True

    # -- decoding (dispatcher thread) ---------------------------------------------------------

    def _reject(self, message: Message, kind: str, reason: str, why: str) -> None:
        with self._lock:
            self.stats.rejected[(kind, reason)] = self.stats.rejected.get((kind, reason), 0) + 1
        log.warning("dropped a %s message on %s (%s): %s", kind, message.topic, reason, why)
        self.client.ack(message)

    def _route(self, topic: str) -> tuple[str, str]:
        """(kind, device) of a device topic, remembered (a fleet repeats its topics);
        TopicError or KeyError if it is not one ingest reads."""
        found = self._routes.get(topic)
        if found is None:
            parts = self.topics.parse(topic)
            found = (_KINDS[parts.kind], parts.device or "")
            if len(self._routes) >= 100_000:
                self._routes.clear()
            self._routes[topic] = found
        return found

    def _on_message(self, message: Message) -> None:
        self.stats.received += 1  # written by this (dispatcher) thread only
        try:
            kind, device = self._route(message.topic)
        except (TopicError, KeyError) as exc:
            self._reject(message, "unknown", "unknown_topic", str(exc))
            return
        fleet: Optional[str] = None
        try:
            item: Item
            if kind == "telemetry":
                record = TelemetryRecord.from_json(message.payload)
                if record.device != device:
                    raise _mismatch(record.device, device)
                item, fleet = _telemetry_row(record), record.fleet
                if record.shadow is not None:
                    item = ShadowTelemetry(item, _shadow_row(record, record.shadow))
            elif kind == "bench":
                report = BenchReport.from_json(message.payload)
                if report.device != device:
                    raise _mismatch(report.device, device)
                item, fleet = _bench_row(report), report.fleet
            elif kind == "events":
                event = Event.from_json(message.payload)
                if event.device != device:
                    raise _mismatch(event.device, device)
                bundle = event.bundle or {}
                item = EventRow(
                    device=event.device,
                    seq=event.seq,
                    at=_utc(event.time),
                    kind=event.kind,
                    message=event.message,
                    bundle_id=bundle.get("bundle_id"),
                )
            else:
                if not message.payload:
                    self.client.ack(message)  # a cleared retained state: nothing to record
                    return
                state = DeviceStateReport.from_json(message.payload)
                if state.device != device:
                    raise _mismatch(state.device, device)
                item = _device_state(state)
        except MessageError as exc:
            self._reject(message, kind, exc.reason, str(exc))
            return
        with self._lock:
            pending = self._pending
            pending.append((item, message, fleet))
            if len(pending) == 1:  # the writer starts the batch's clock
                self._first_at = time.monotonic()
                self._lock.notify_all()
            elif len(pending) >= self.batch_size:
                self._lock.notify_all()

    # -- writing (writer thread) --------------------------------------------------------------

    def _take(self) -> Optional[list[Pending]]:
        with self._lock:
            while True:
                if self._pending:
                    due = self._first_at + self.max_delay - time.monotonic()
                    if self._stopping or len(self._pending) >= self.batch_size or due <= 0:
                        batch, self._pending = self._pending, []
                        return batch
                    self._lock.wait(due)
                elif self._stopping:
                    return None
                else:
                    self._lock.wait()

    def _write_loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._write(batch)
            except Exception:  # counted and logged; the loop must outlive any one batch
                self._db_error()
                log.exception("ingest lost a batch of %d messages to an unexpected error", len(batch))

    def _write(self, batch: list[Pending]) -> None:
        states = [i for i, _, _ in batch if isinstance(i, DeviceState)]
        telemetry = [i for i, _, _ in batch if isinstance(i, TelemetryRow)]
        shadows = [i.shadow for i, _, _ in batch if isinstance(i, ShadowTelemetry)]
        telemetry += [i.telemetry for i, _, _ in batch if isinstance(i, ShadowTelemetry)]
        events = [i for i, _, _ in batch if isinstance(i, EventRow)]
        bench = [i for i, _, _ in batch if isinstance(i, BenchRow)]
        fleets = {_device_of(i): f for i, _, f in batch if f is not None and not isinstance(i, BenchRow)}
        delay = self.retry_min
        foreign: dict[int, str] = {}  # id(bench row) -> why it is refused
        while True:
            try:
                foreign = self._foreign_bench(bench, states, fleets)
                kept = [b for b in bench if id(b) not in foreign]
                result = self.registry.write_batch(states, telemetry, events, fleets, shadows, kept)
                break
            except (OperationalError, InterfaceError) as exc:
                # The database is away (restarting, unreachable, locked): keep the batch, retry.
                self._db_error()
                if self._stopping and delay >= self.retry_max:
                    log.error("ingest gives up on %d messages at stop: the database is away", len(batch))
                    return
                log.warning("registry write failed (%s); retrying in %.1fs", _short(exc), delay)
                time.sleep(delay)
                delay = min(delay * 2, self.retry_max)
            except (DBAPIError, SQLAlchemyError) as exc:
                # A row the database refuses (should not pass the decoders): isolate it.
                self._db_error()
                log.warning("registry refused a batch (%s); writing it row by row", _short(exc))
                result = self._write_one_by_one([p for p in batch if id(p[0]) not in foreign], fleets)
                break
        for item, message, _ in batch:
            if id(item) in foreign:
                self._reject(message, "bench", "other_fleet", foreign[id(item)])
        self.client.ack_many([message for item, message, _ in batch if id(item) not in foreign])
        self._count(result)

    def _foreign_bench(
        self, bench: list[BenchRow], states: list[DeviceState], fleets: dict[str, str]
    ) -> dict[int, str]:
        """The bench reports (by id) not filed under their device's fleet in the registry (or in
        this batch's states, written first): a device of fleet A may not add rows to fleet B, as
        shadow windows are only read for a fleet's own devices."""
        if not bench:
            return {}
        known = self.registry.device_fleets(b.device for b in bench)
        for device, claimed in fleets.items():  # telemetry registers a device it is the first of
            known.setdefault(device, claimed)
        known.update({s.device: s.fleet for s in states})
        refused: dict[int, str] = {}
        for row in bench:
            registered = known.get(row.device)
            if registered is None:
                refused[id(row)] = f"device {row.device!r} is not in the registry yet (no state heard)"
            elif registered != row.fleet:
                refused[id(row)] = (
                    f"device {row.device!r} of fleet {registered!r} sent a bench report for fleet {row.fleet!r}"
                )
        return refused

    def _db_error(self) -> None:
        with self._lock:
            self.stats.db_errors += 1
        with self.committed:  # waiters watch errors too (tests, the service's health)
            self.committed.notify_all()

    def _write_one_by_one(self, batch: list[Pending], fleets: dict[str, str]) -> BatchResult:
        total = BatchResult(0, WriteResult(0, 0), WriteResult(0, 0))
        for item, message, _ in batch:
            try:
                if isinstance(item, DeviceState):
                    one = self.registry.write_batch(states=[item])
                elif isinstance(item, TelemetryRow):
                    one = self.registry.write_batch(telemetry=[item], fleets=fleets)
                elif isinstance(item, ShadowTelemetry):
                    one = self.registry.write_batch(
                        telemetry=[item.telemetry], fleets=fleets, shadows=[item.shadow]
                    )
                elif isinstance(item, BenchRow):
                    one = self.registry.write_batch(bench=[item])
                else:
                    one = self.registry.write_batch(events=[item])
            except SQLAlchemyError as exc:
                self._reject(message, _kind_of(item), "db_refused", _short(exc))
                continue
            total = BatchResult(
                total.states + one.states,
                _sum(total.telemetry, one.telemetry),
                _sum(total.events, one.events),
                total.bench + one.bench,
            )
        return total

    def _count(self, result: BatchResult) -> None:
        with self._lock:
            stats = self.stats
            stats.batches += 1
            stats.states += result.states
            stats.telemetry += result.telemetry.inserted
            stats.telemetry_duplicates += result.telemetry.duplicates
            stats.events += result.events.inserted
            stats.event_duplicates += result.events.duplicates
            stats.bench += result.bench
        with self.committed:
            self.committed.notify_all()


# -- message -> registry row ---------------------------------------------------------------------


def _is_telemetry(item: Item) -> bool:
    return isinstance(item, (TelemetryRow, ShadowTelemetry))


def _device_of(item: Item) -> str:
    return item.telemetry.device if isinstance(item, ShadowTelemetry) else item.device


def _shadow_row(record: TelemetryRecord, shadow: dict[str, Any]) -> ShadowRow:
    """The shadow section (checked by the decoder) as a registry row."""
    candidate = shadow["candidate"]
    serving, trying = shadow["serving_latency_ms"], shadow["candidate_latency_ms"]
    error = shadow.get("error")
    return ShadowRow(
        record.device,
        record.seq,
        _utc(record.window_end),
        candidate["bundle_id"][:64],
        f"{candidate['name']}@{candidate['version']}"[:140],
        record.bundle.get("version") if record.bundle else None,
        shadow["state"],
        shadow.get("sample_rate"),
        shadow["compared"],
        shadow["dropped"],
        shadow.get("classified", 0),
        shadow.get("agreed", 0),
        shadow.get("abs_error_mean"),
        shadow.get("abs_error_max"),
        serving.get("p50"),
        serving.get("p95"),
        trying.get("p50"),
        trying.get("p95"),
        error[:1000] if isinstance(error, str) else None,
        shadow.get("severity"),
        shadow.get("peak_memory_bytes"),
    )


def _kind_of(item: Item) -> str:
    if isinstance(item, DeviceState):
        return "state"
    if isinstance(item, BenchRow):
        return "bench"
    return "telemetry" if _is_telemetry(item) else "events"


def _sum(a: WriteResult, b: WriteResult) -> WriteResult:
    return WriteResult(a.inserted + b.inserted, a.duplicates + b.duplicates)


_NO_ACCURACY: dict[str, float] = {}


def _telemetry_row(record: TelemetryRecord) -> TelemetryRow:
    latency = record.latency_ms
    memory = record.memory_rss_bytes
    bundle = record.bundle
    accuracy = record.drift.get("accuracy") or _NO_ACCURACY  # checked by the decoder
    return TelemetryRow(  # positional, in TelemetryRow's order: thousands a second
        record.device,
        record.seq,
        _utc(record.window_start),
        _utc(record.window_end),
        record.count,
        record.errors,
        latency.get("p50"),
        latency.get("p95"),
        latency.get("p99"),
        record.drift_score,
        record.drift.get("drifted", False),
        bundle.get("version") if bundle else None,
        record.dropped,
        record.cpu_percent,
        None if memory is None else round(memory / 2**20, 3),
        record.temperature_c,
        record.drift_severity,
        accuracy.get("estimate"),
        accuracy.get("low"),
        accuracy.get("high"),
        record.memory_used_percent,
        record.disk_used_percent,
        record.drift_threshold,
    )


def _mib(n: Optional[int]) -> Optional[float]:
    return None if n is None else round(n / 2**20, 3)


def _bench_row(report: BenchReport) -> BenchRow:
    """A bench report (checked by the decoder) as a registry row."""
    board, candidate, checked = report.board, report.candidate, report.correctness or {}
    return BenchRow(
        report.device,
        report.seq,
        report.fleet,
        _utc(report.time),
        report.bench_seq,
        candidate["bundle_id"],
        f"{candidate['name']}@{candidate['version']}"[:140],
        board_class(board)[:700],
        board["model"],
        board["cpu"],
        board["machine"],
        board["cores"],
        board["runtime"],
        board["xnnpack"],
        report.state,
        report.error,
        report.load_ms,
        _mib(report.peak_rss_bytes),
        _mib(report.added_rss_bytes),
        json.dumps(report.by_threads, separators=(",", ":")),
        checked.get("samples"),
        checked.get("agreed"),
        checked.get("max_abs_error"),
        report.temperature_c,
        report.throttled,
    )


def _device_state(report: DeviceStateReport) -> DeviceState:
    detail = report.error
    if report.status == "downloading" and report.progress is not None:
        detail = f"downloading {report.progress:.0%}"
    return DeviceState(
        device=report.device,
        fleet=report.fleet,
        online=report.online,
        status=report.status,
        at=_utc(report.time) if report.time else datetime.now(timezone.utc),
        bundle_id=report.bundle_id,
        bundle_name=report.bundle_name,
        bundle_version=report.bundle_version,
        detail=detail,
        trust_root=report.trust_root,
        trust_expires=None if report.trust_expires is None else _utc(report.trust_expires),
    )


def _mismatch(named: str, topic_device: Optional[str]) -> MessageError:
    error = MessageError(f"the message names device {named!r} but came on the topic of {topic_device!r}")
    error.reason = "device_mismatch"
    return error


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
