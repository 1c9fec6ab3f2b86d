"""The fleet registry: devices, fleets, telemetry history and events (and the control plane's
tables, :mod:`edgekit.fleet.control`), on SQLite or PostgreSQL (psycopg 3) through SQLAlchemy 2,
with the schema kept by Alembic.

Writers are idempotent where the wire can repeat itself: telemetry and events are keyed by
(device, seq), so a QoS 1 redelivery, a replay after an outage or a second ingest worker seeing
the same message never counts twice.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple

from alembic import command
from alembic.config import Config
from edgekit.errors import ConfigError
from edgekit.reports import DRIFT_SEVERITIES
from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Engine,
    Float,
    bindparam,
    case,
    cast,
    create_engine,
    delete,
    distinct,
    event,
    extract,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from .models import BenchResult, Device, Event, Fleet, ShadowWindow, Telemetry

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_MIGRATION_LOCK = 0x65646765_6B697400  # "edgekit\0": the advisory lock key schema changes take


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def normalize_url(url: str) -> str:
    """Accept ``sqlite:///path``, a bare path, and ``postgresql://`` (meaning psycopg 3)."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser()}"
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


class TelemetryRow(NamedTuple):
    """One telemetry window (a named tuple: ingest builds thousands a second)."""

    device: str
    seq: int
    window_start: datetime
    window_end: datetime
    count: int  # type: ignore[assignment]  # a column, shadowing tuple.count
    errors: int
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    drift_score: float | None = None
    drifted: bool = False
    bundle_version: str | None = None
    dropped: int = 0
    cpu_percent: float | None = None
    memory_mb: float | None = None
    temperature_c: float | None = None
    drift_severity: str | None = None  # ok / inputs changed / model affected; None: not judged
    accuracy_estimate: float | None = None
    accuracy_low: float | None = None
    accuracy_high: float | None = None
    memory_used_percent: float | None = None  # the board's RAM in use
    disk_used_percent: float | None = None  # the state directory's filesystem in use
    drift_threshold: float | None = None  # the drift score above which the window counts as drifted


class ShadowRow(NamedTuple):
    """One shadow-evaluation window (the telemetry record's ``shadow`` section)."""

    device: str
    seq: int
    window_end: datetime
    candidate_id: str
    candidate_label: str
    serving_version: str | None
    state: str
    sample_rate: float | None
    compared: int
    dropped: int
    classified: int
    agreed: int
    abs_error_mean: float | None = None
    abs_error_max: float | None = None
    serving_p50_ms: float | None = None
    serving_p95_ms: float | None = None
    candidate_p50_ms: float | None = None
    candidate_p95_ms: float | None = None
    error: str | None = None
    candidate_severity: str | None = None
    peak_memory_bytes: int | None = None


class BenchRow(NamedTuple):
    """One bench report (edgekit.bench.BenchReport) as stored."""

    device: str
    seq: int
    fleet: str
    at: datetime
    bench_seq: int
    candidate_id: str
    candidate_label: str
    board_class: str
    board_model: str | None
    board_cpu: str | None
    machine: str | None
    cores: int
    runtime: str
    xnnpack: bool
    state: str
    error: str | None
    load_ms: float | None
    peak_rss_mb: float | None
    added_rss_mb: float | None
    by_threads: str  # JSON
    hc_samples: int | None
    hc_agreed: int | None
    hc_max_error: float | None
    temperature_c: float | None
    throttled: str | None


class EventRow(NamedTuple):
    device: str
    seq: int
    at: datetime
    kind: str
    message: str
    bundle_id: str | None = None


@dataclass(frozen=True)
class DeviceState:
    """What a device last said about itself on its retained state topic (or its will)."""

    device: str
    fleet: str
    online: bool
    status: str
    at: datetime
    bundle_id: str | None = None
    bundle_name: str | None = None
    bundle_version: str | None = None
    detail: str | None = None
    #: Under the TUF key hierarchy: the root version it trusts, and when the timestamp it applied
    #: expires (None: a single-key device, an older agent, or a will, which keep what was stored).
    trust_root: int | None = None
    trust_expires: datetime | None = None


@dataclass(frozen=True)
class WriteResult:
    inserted: int
    duplicates: int


@dataclass(frozen=True)
class BatchResult:
    """What :meth:`Registry.write_batch` stored: states applied, telemetry and events written."""

    states: int
    telemetry: WriteResult
    events: WriteResult
    bench: int = 0  # bench reports stored (new ones)


class Registry:
    """One registry database. Thread-safe: each call opens its own session."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = normalize_url(url)
        if not self.url.startswith(("sqlite:", "postgresql+psycopg:")):
            raise ConfigError(
                f"registry URL {url!r}: only SQLite and PostgreSQL are supported "
                "(sqlite:///PATH or postgresql://USER@HOST/DB)"
            )
        try:
            self.engine: Engine = create_engine(self.url, pool_pre_ping=True)
        except (ArgumentError, ImportError) as exc:
            raise ConfigError(
                f"invalid registry URL {url!r} ({exc}); use sqlite:///PATH or postgresql://..."
            ) from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._bulk: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        if migrate:
            self.migrate()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        try:
            with self._migration_lock(), self.engine.begin() as connection:
                if self.dialect == "postgresql":  # held to the end of this transaction
                    connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
        except OperationalError as exc:
            raise ConfigError(f"cannot open the registry at {self.url}: {exc.orig}") from None

    @contextmanager
    def _migration_lock(self) -> Iterator[None]:
        """Two processes opening a new database at once (two operators' first push, two
        ``fleet serve``) take turns: the second finds the schema at head and does nothing.
        PostgreSQL: a transaction advisory lock (taken in :meth:`migrate`); a SQLite file: a
        ``flock`` beside it."""
        database = self.engine.url.database
        if self.dialect != "sqlite" or not database or database == ":memory:":
            yield
            return
        path = Path(database).with_name(Path(database).name + ".migrate.lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:  # a folder we cannot write: SQLite itself will say so, better
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        return self._sessions()

    # -- writes ---------------------------------------------------------------------------

    def _insert(self, model: Any) -> Any:
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(model)

    def _bulk_insert(
        self,
        session: Session,
        model: Any,
        fields: Sequence[str],
        rows: Sequence[tuple[Any, ...]],
        **fixed: Any,
    ) -> int:
        """INSERT .. ON CONFLICT (device, seq) DO NOTHING for many rows with the driver's
        executemany: no RETURNING, no per-row ORM or Core work (ingest's hot path). Values go
        through each column's bind processor, so they are stored exactly as SQLAlchemy would
        store them. Returns how many rows were new (the driver's row count)."""
        key = (model.__tablename__, tuple(fields), tuple(sorted(fixed)))
        prepared = self._bulk.get(key)
        if prepared is None:
            columns = [*fields, *sorted(fixed)]
            table = model.__table__
            mark = "?" if self.dialect == "sqlite" else "%s"
            one = f"({', '.join([mark] * len(columns))})"
            head = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES "
            tail = " ON CONFLICT (device, seq) DO NOTHING"
            dialect = self.engine.dialect
            processors = [_bind_processor(table.c[c].type, dialect) for c in columns]
            converting = tuple((i, p) for i, p in enumerate(processors) if p is not None)
            prepared = (head, one, tail, converting)
            self._bulk[key] = prepared
        head, one, tail, converting = prepared
        extra = tuple(fixed[c] for c in sorted(fixed))
        params = []
        for row in rows:
            values = [*row, *extra]
            for index, process in converting:
                value = values[index]
                if value is not None:
                    values[index] = process(value)
            params.append(tuple(values))
        connection = session.connection()
        if self.dialect == "sqlite":  # sqlite3's executemany is a loop in C: the fastest there is
            return int(connection.exec_driver_sql(head + one + tail, params).rowcount)
        # PostgreSQL: COPY into a session-local temporary table, then one INSERT .. SELECT ..
        # ON CONFLICT DO NOTHING (a duplicate within the batch is skipped like any other).
        table = model.__tablename__
        names = ", ".join([*fields, *sorted(fixed)])
        cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(
                f"CREATE TEMPORARY TABLE IF NOT EXISTS _ingest_{table} "
                f"(LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            with cursor.copy(f"COPY _ingest_{table} ({names}) FROM STDIN") as copy:
                for row in params:
                    copy.write_row(row)
            cursor.execute(
                f"INSERT INTO {table} ({names}) SELECT {names} FROM _ingest_{table} "
                "ON CONFLICT (device, seq) DO NOTHING"
            )
            return int(cursor.rowcount)
        finally:
            cursor.close()

    def ensure_fleets(self, session: Session, names: Iterable[str], now: datetime) -> None:
        rows = [{"name": name, "created_at": now} for name in set(names)]
        if rows:
            session.execute(self._insert(Fleet).on_conflict_do_nothing(index_elements=["name"]), rows)

    def record_states(self, states: Sequence[DeviceState]) -> None:
        """Upsert devices from their state messages; the newest message per device wins."""
        if not states:
            return
        with self.session() as session, session.begin():
            self._record_states(session, states)

    def _record_states(self, session: Session, states: Sequence[DeviceState]) -> int:
        latest: dict[str, DeviceState] = {}
        for state in states:
            latest[state.device] = state
        if not latest:
            return 0
        self.ensure_fleets(session, (s.fleet for s in latest.values()), _utc(states[-1].at))
        for state in latest.values():
            at = _utc(state.at)
            values: dict[str, Any] = {
                "fleet": state.fleet,
                "online": state.online,
                "status": state.status,
                "detail": state.detail,
            }
            if state.bundle_id is not None:
                values.update(
                    bundle_id=state.bundle_id,
                    bundle_name=state.bundle_name,
                    bundle_version=state.bundle_version,
                )
            if state.trust_root is not None:
                values["trust_root"] = state.trust_root
            if state.trust_expires is not None:
                values["trust_expires"] = _utc(state.trust_expires)
            statement = self._insert(Device).values(
                id=state.device, last_seq=-1, drifted=False, last_seen=at, first_seen=at, **values
            )
            # last_seen never goes back: an MQTT will carries the time its device connected.
            newer = case(
                (Device.last_seen.is_(None), statement.excluded.last_seen),
                (Device.last_seen < statement.excluded.last_seen, statement.excluded.last_seen),
                else_=Device.last_seen,
            )
            session.execute(
                statement.on_conflict_do_update(index_elements=["id"], set_={**values, "last_seen": newer})
            )
        return len(latest)

    def add_telemetry(
        self, rows: Sequence[TelemetryRow], fleets: dict[str, str] | None = None
    ) -> WriteResult:
        """Insert telemetry windows; (device, seq) already present are skipped and counted.

        ``fleets`` maps a device to its fleet, so telemetry of a device never seen before
        (its state not yet received) registers it."""
        if not rows:
            return WriteResult(0, 0)
        with self.session() as session, session.begin():
            return self._add_telemetry(session, rows, fleets)

    def _add_telemetry(
        self, session: Session, rows: Sequence[TelemetryRow], fleets: dict[str, str] | None
    ) -> WriteResult:
        if not rows:
            return WriteResult(0, 0)
        # The newest window per device may be a duplicate; then the device has it already.
        inserted = self._bulk_insert(session, Telemetry, TelemetryRow._fields, rows, resolution_s=0)
        newest: dict[str, TelemetryRow] = {}
        for row in rows:
            if row.device not in newest or row.seq > newest[row.device].seq:
                newest[row.device] = row
        if newest:
            self._advance_devices(session, newest, fleets)
        return WriteResult(inserted, len(rows) - inserted)

    def _advance_devices(
        self, session: Session, newest: dict[str, TelemetryRow], fleets: dict[str, str] | None
    ) -> None:
        """Point each device at its newest telemetry window: one executemany UPDATE that only
        moves forward (seq above last_seq; last_seen never back); unknown devices are created
        first when their fleet is known."""
        known = set(session.execute(select(Device.id).where(Device.id.in_(list(newest)))).scalars())
        for device, row in newest.items():
            if device in known:
                continue
            fleet = (fleets or {}).get(device)
            if fleet is None:
                continue  # telemetry before any state message: the state will create it
            self.ensure_fleets(session, [fleet], _utc(row.window_end))
            session.add(
                Device(
                    id=device,
                    fleet=fleet,
                    online=True,
                    status="serving",
                    last_seq=-1,
                    drifted=False,
                    first_seen=_utc(row.window_end),
                )
            )
            known.add(device)
        session.flush()
        seen = bindparam("_seen", type_=Device.last_seen.type)
        statement = (
            update(Device)
            .where(Device.id == bindparam("_id"), Device.last_seq < bindparam("_seq"))
            .values(
                last_seq=bindparam("_seq"),
                # A window without predictions has no latency: keep the last one measured.
                latency_p95_ms=func.coalesce(
                    bindparam("_p95", type_=Device.latency_p95_ms.type), Device.latency_p95_ms
                ),
                drift_score=bindparam("_drift"),
                drifted=bindparam("_drifted"),
                drift_severity=bindparam("_severity"),
                accuracy_estimate=bindparam("_accuracy"),
                accuracy_low=bindparam("_accuracy_low"),
                accuracy_high=bindparam("_accuracy_high"),
                last_seen=case(
                    (or_(Device.last_seen.is_(None), Device.last_seen < seen), seen), else_=Device.last_seen
                ),
            )
        )
        params = [
            {
                "_id": device,
                "_seq": row.seq,
                "_p95": row.latency_p95_ms,
                "_drift": row.drift_score,
                "_drifted": row.drifted,
                "_severity": row.drift_severity,
                "_accuracy": row.accuracy_estimate,
                "_accuracy_low": row.accuracy_low,
                "_accuracy_high": row.accuracy_high,
                "_seen": _utc(row.window_end),
            }
            for device, row in newest.items()
            if device in known
        ]
        if params:
            session.connection().execute(statement, params)

    def add_events(self, rows: Sequence[EventRow]) -> WriteResult:
        if not rows:
            return WriteResult(0, 0)
        with self.session() as session, session.begin():
            return self._add_events(session, rows)

    def _add_events(self, session: Session, rows: Sequence[EventRow]) -> WriteResult:
        if not rows:
            return WriteResult(0, 0)
        inserted = self._bulk_insert(session, Event, EventRow._fields, rows)
        return WriteResult(inserted, len(rows) - inserted)

    def write_batch(
        self,
        states: Sequence[DeviceState] = (),
        telemetry: Sequence[TelemetryRow] = (),
        events: Sequence[EventRow] = (),
        fleets: dict[str, str] | None = None,
        shadows: Sequence[ShadowRow] = (),
        bench: Sequence[BenchRow] = (),
    ) -> BatchResult:
        """States, then telemetry (and the shadow windows some carry), then events, in ONE
        transaction: all of it or none.

        Idempotent, so a batch whose commit failed (or whose outcome is unknown) may be written
        again: rows already present count as duplicates, never twice."""
        with self.session() as session, session.begin():
            applied = self._record_states(session, states)
            written = self._add_telemetry(session, telemetry, fleets)
            if shadows:
                self._bulk_insert(session, ShadowWindow, ShadowRow._fields, shadows)
            logged = self._add_events(session, events)
            benched = self._bulk_insert(session, BenchResult, BenchRow._fields, bench) if bench else 0
        return BatchResult(applied, written, logged, benched)

    def apply_retention(self, now: datetime, keep_raw: timedelta, bucket: timedelta) -> int:
        """Fold raw telemetry older than ``keep_raw`` into one row per device and ``bucket``.

        A folded row keeps the sum of counts and errors and the worst p95/p99, drift, drift
        severity and estimated accuracy of the windows it replaces; its seq is the last of them, so later duplicates still dedupe.
        Returns how many raw rows were folded.
        """
        horizon = _utc(now) - keep_raw
        seconds = int(bucket.total_seconds())
        with self.session() as session, session.begin():
            old = (
                session.execute(
                    select(Telemetry).where(Telemetry.window_end < horizon, Telemetry.resolution_s == 0)
                )
                .scalars()
                .all()
            )
            groups: dict[tuple[str, int], list[Telemetry]] = {}
            for row in old:
                start = int(_utc(row.window_start).timestamp()) // seconds * seconds
                groups.setdefault((row.device, start), []).append(row)
            for (device, start), rows in groups.items():
                rows.sort(key=lambda r: r.seq)
                folded = Telemetry(
                    device=device,
                    seq=rows[-1].seq,
                    window_start=datetime.fromtimestamp(start, tz=timezone.utc),
                    window_end=datetime.fromtimestamp(start + seconds, tz=timezone.utc),
                    count=sum(r.count for r in rows),
                    errors=sum(r.errors for r in rows),
                    latency_p50_ms=_max(r.latency_p50_ms for r in rows),
                    latency_p95_ms=_max(r.latency_p95_ms for r in rows),
                    latency_p99_ms=_max(r.latency_p99_ms for r in rows),
                    drift_score=_max(r.drift_score for r in rows),
                    drifted=any(r.drifted for r in rows),
                    bundle_version=rows[-1].bundle_version,
                    dropped=sum(r.dropped for r in rows),
                    cpu_percent=_max(r.cpu_percent for r in rows),
                    memory_mb=_max(r.memory_mb for r in rows),
                    temperature_c=_max(r.temperature_c for r in rows),
                    drift_severity=_worst_severity(r.drift_severity for r in rows),
                    accuracy_estimate=_min(r.accuracy_estimate for r in rows),
                    accuracy_low=_min(r.accuracy_low for r in rows),
                    accuracy_high=_min(r.accuracy_high for r in rows),
                    memory_used_percent=_max(r.memory_used_percent for r in rows),
                    disk_used_percent=_max(r.disk_used_percent for r in rows),
                    drift_threshold=_min(r.drift_threshold for r in rows),
                    resolution_s=seconds,
                )
                for row in rows:
                    session.delete(row)
                session.flush()
                session.add(folded)
        return len(old)

    # -- reads ----------------------------------------------------------------------------

    def devices(self, fleet: str | None = None) -> list[Device]:
        with self.session() as session:
            query = select(Device).order_by(Device.fleet, Device.id)
            if fleet is not None:
                query = query.where(Device.fleet == fleet)
            return list(session.execute(query).scalars())

    def device_fleets(self, devices: Iterable[str]) -> dict[str, str]:
        """The fleet the registry has for each of ``devices`` it knows (ingest scopes bench
        reports by it: a device reports only into its own fleet)."""
        wanted = sorted(set(devices))
        if not wanted:
            return {}
        with self.session() as session:
            rows = session.execute(select(Device.id, Device.fleet).where(Device.id.in_(wanted)))
            return {device: fleet for device, fleet in rows}

    def telemetry(self, device: str, since: datetime | None = None, limit: int = 1000) -> list[Telemetry]:
        with self.session() as session:
            query = select(Telemetry).where(Telemetry.device == device)
            if since is not None:
                query = query.where(Telemetry.window_end >= _utc(since))
            query = query.order_by(Telemetry.window_end.desc()).limit(limit)
            return list(reversed(list(session.execute(query).scalars())))

    def telemetry_count(self, device: str | None = None) -> int:
        with self.session() as session:
            query = select(func.count()).select_from(Telemetry)
            if device is not None:
                query = query.where(Telemetry.device == device)
            return int(session.execute(query).scalar_one())

    def events(self, device: str | None = None, limit: int = 100) -> list[Event]:
        with self.session() as session:
            query = select(Event).order_by(Event.at.desc(), Event.seq.desc()).limit(limit)
            if device is not None:
                query = query.where(Event.device == device)
            return list(session.execute(query).scalars())

    def fleet_history(self, fleet: str, since: datetime, bucket_s: int) -> list[dict[str, Any]]:
        """Per ``bucket_s`` seconds since ``since``: how many of ``fleet``'s devices reported,
        and how many ran each version (from their telemetry), oldest first."""
        bucket = cast(extract("epoch", Telemetry.window_end), BigInteger) // bucket_s
        reporting = func.count(distinct(Telemetry.device))
        where = (Device.fleet == fleet, Telemetry.window_end >= _utc(since))
        with self.session() as session:
            versions = session.execute(
                select(bucket, Telemetry.bundle_version, reporting)
                .join(Device, Device.id == Telemetry.device)
                .where(*where)
                .group_by(bucket, Telemetry.bundle_version)
            ).all()
            totals = dict(
                session.execute(
                    select(bucket, reporting)
                    .join(Device, Device.id == Telemetry.device)
                    .where(*where)
                    .group_by(bucket)
                ).all()
            )
        points: dict[int, dict[str, Any]] = {}
        for number, version, n in versions:
            point = points.setdefault(
                int(number), {"t": int(number) * bucket_s, "reporting": int(totals[number]), "versions": {}}
            )
            point["versions"][version or "unknown"] = int(n)
        return [points[k] for k in sorted(points)]

    def drifted_since(self, device: str) -> datetime | None:
        """When the device's current run of drifted telemetry windows began (None: its newest
        window is not drifted, or it has none)."""
        with self.session() as session:
            calm = session.execute(
                select(func.max(Telemetry.window_end)).where(
                    Telemetry.device == device, Telemetry.drifted.is_(False)
                )
            ).scalar_one()
            query = select(func.min(Telemetry.window_start)).where(
                Telemetry.device == device, Telemetry.drifted.is_(True)
            )
            if calm is not None:
                query = query.where(Telemetry.window_end > calm)
            since = session.execute(query).scalar_one()
        return _utc(since) if since is not None else None

    def shadow_windows(self, fleet: str, candidate_id: str | None = None) -> list[ShadowWindow]:
        """The shadow windows of ``fleet``'s devices for ``candidate_id`` (default: the candidate
        of the newest window reported), oldest first."""
        with self.session() as session:
            in_fleet = select(Device.id).where(Device.fleet == fleet)
            if candidate_id is None:
                candidate_id = session.scalars(
                    select(ShadowWindow.candidate_id)
                    .where(ShadowWindow.device.in_(in_fleet))
                    .order_by(ShadowWindow.window_end.desc())
                    .limit(1)
                ).first()
                if candidate_id is None:
                    return []
            query = (
                select(ShadowWindow)
                .where(ShadowWindow.device.in_(in_fleet), ShadowWindow.candidate_id == candidate_id)
                .order_by(ShadowWindow.window_end, ShadowWindow.device)
            )
            return list(session.scalars(query))

    def bench_results(self, fleet: str, bench_seq: int | None = None) -> list[BenchResult]:
        """The bench reports of ``fleet`` for ``bench_seq`` (default: the newest benchmark
        reported), by board class, candidate and device."""
        with self.session() as session:
            if bench_seq is None:
                bench_seq = session.execute(
                    select(func.max(BenchResult.bench_seq)).where(BenchResult.fleet == fleet)
                ).scalar_one()
                if bench_seq is None:
                    return []
            query = (
                select(BenchResult)
                .where(BenchResult.fleet == fleet, BenchResult.bench_seq == bench_seq)
                .order_by(BenchResult.board_class, BenchResult.candidate_label, BenchResult.device)
            )
            return list(session.scalars(query))

    def delete_device(self, device: str) -> None:
        with self.session() as session, session.begin():
            for model in (Telemetry, Event, ShadowWindow, BenchResult):
                session.execute(delete(model).where(model.device == device))
            session.execute(delete(Device).where(Device.id == device))


def _max(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _min(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _worst_severity(values: Iterable[str | None]) -> str | None:
    present = [v for v in values if v in DRIFT_SEVERITIES]
    return max(present, key=DRIFT_SEVERITIES.index) if present else None


def _sqlite_datetime(value: datetime) -> str:
    """What SQLAlchemy's SQLite DateTime stores (its wall-clock fields, microseconds always),
    without its per-value formatting dict: ``2026-12-01 06:04:10.000000``."""
    text = value.isoformat(" ")  # positional: keyword parsing costs more than the formatting
    if text[19:20] == ".":
        return text[:26]  # the offset (if any) cut off
    return value.isoformat(" ", "microseconds")[:26]  # microsecond 0 is left out above


def _bind_processor(column_type: Any, dialect: Any) -> Any:
    """The function a value goes through before the driver gets it (None: as it is).

    SQLAlchemy's own, except on SQLite for the types ingest writes thousands of a second, where
    the same stored value is produced more cheaply (tests/fleet/test_registry.py compares them):
    DateTime as :func:`_sqlite_datetime`, Boolean as 0/1, Float as the number it is."""
    if dialect.name == "sqlite":
        if isinstance(column_type, DateTime):
            return _sqlite_datetime
        if isinstance(column_type, Boolean):
            return int
        if isinstance(column_type, Float):
            return None
    return column_type.dialect_impl(dialect).bind_processor(dialect)


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
