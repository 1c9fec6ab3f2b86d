"""Registry tables (SQLAlchemy 2). The schema itself is created by the Alembic migrations in
``migrations/``; these classes must match them (a test compares the two)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Fleet(Base):
    __tablename__ = "fleets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    fleet: Mapped[str] = mapped_column(ForeignKey("fleets.name"), index=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(32), default="unknown")
    bundle_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    bundle_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    bundle_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_seen: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    first_seen: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_seq: Mapped[int] = mapped_column(BigInteger, default=-1)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    drift_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    drifted: Mapped[bool] = mapped_column(Boolean, default=False)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The newest judged window's drift severity (ok / inputs changed / model affected; None
    # before any) and the accuracy the device estimated without labels (None if uncalibrated).
    drift_severity: Mapped[str | None] = mapped_column(String(16), nullable=True)
    accuracy_estimate: Mapped[float | None] = mapped_column(Float, nullable=True)
    accuracy_low: Mapped[float | None] = mapped_column(Float, nullable=True)
    accuracy_high: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Under the TUF key hierarchy: the root version the device trusts and when the timestamp it
    # applied expires (None on single-key devices and older agents).
    trust_root: Mapped[int | None] = mapped_column(Integer, nullable=True)
    trust_expires: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class CatalogEntry(Base):
    """One signed bundle of the catalog, its bytes included: every operator and every
    ``fleet serve`` sharing the database ships and rolls back to the same bundles."""

    __tablename__ = "catalog"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_catalog_name_version"),)

    bundle_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    added_by: Mapped[str] = mapped_column(String(128))
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class FleetRecordRow(Base):
    """What a fleet was last told: the desired-state sequence counter and the bundle history."""

    __tablename__ = "fleet_records"

    fleet: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    bundle_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    label: Mapped[str | None] = mapped_column(String(140), nullable=True)
    history: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    devices: Mapped[list[str]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DesiredRecord(Base):
    """The newest signed desired state published to a fleet (``device`` empty) or to one device:
    when it expires, so the service can warn before devices would refuse it."""

    __tablename__ = "desired_states"

    fleet: Mapped[str] = mapped_column(String(64), primary_key=True)
    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    bundle_id: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(140))
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RolloutRow(Base):
    """One rollout (the newest per fleet is the current one); ``doc`` is the state machine's
    :class:`edgekit.fleet.rollout.Rollout` as JSON."""

    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(String(64), index=True)
    label: Mapped[str] = mapped_column(String(140))
    phase: Mapped[str] = mapped_column(String(16))
    started_by: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    doc: Mapped[str] = mapped_column(Text)


class FleetDriver(Base):
    """Who holds a fleet's driving lock (the lock itself is an advisory lock or a file lock)."""

    __tablename__ = "fleet_drivers"

    fleet: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    since: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditEntry(Base):
    """Who did what to which fleet, and how it went."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    fleet: Mapped[str | None] = mapped_column(String(64), nullable=True)
    target: Mapped[str | None] = mapped_column(String(200), nullable=True)
    result: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


class ProvisionedDevice(Base):
    """A device someone provisioned (``edgekit device add``): who, when, for which fleet. Its
    broker password stays in the provisioning machine's ``$EDGEKIT_HOME/broker`` (0600)."""

    __tablename__ = "provisioned_devices"

    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    fleet: Mapped[str] = mapped_column(String(64))
    username: Mapped[str] = mapped_column(String(64))
    tls: Mapped[bool] = mapped_column(Boolean)
    added_by: Mapped[str] = mapped_column(String(128))
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Account(Base):
    """An operator (may act) or viewer (may look) of the fleet service's API and dashboard."""

    __tablename__ = "accounts"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiSession(Base):
    """A signed-in session: the SHA-256 of its bearer token (the token itself is never stored)."""

    __tablename__ = "api_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    account: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ControlMeta(Base):
    __tablename__ = "control_meta"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Telemetry(Base):
    """One telemetry window of one device. (device, seq) is unique: QoS 1 redelivery of the same
    record is ignored, never counted twice."""

    __tablename__ = "telemetry"

    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    window_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    window_end: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    count: Mapped[int] = mapped_column(Integer)
    errors: Mapped[int] = mapped_column(Integer)
    latency_p50_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_p99_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    drift_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    drifted: Mapped[bool] = mapped_column(Boolean, default=False)
    bundle_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    dropped: Mapped[int] = mapped_column(Integer, default=0)
    cpu_percent: Mapped[float | None] = mapped_column(Float, nullable=True)
    memory_mb: Mapped[float | None] = mapped_column(Float, nullable=True)
    temperature_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    drift_severity: Mapped[str | None] = mapped_column(String(16), nullable=True)
    accuracy_estimate: Mapped[float | None] = mapped_column(Float, nullable=True)
    accuracy_low: Mapped[float | None] = mapped_column(Float, nullable=True)
    accuracy_high: Mapped[float | None] = mapped_column(Float, nullable=True)
    memory_used_percent: Mapped[float | None] = mapped_column(Float, nullable=True)
    disk_used_percent: Mapped[float | None] = mapped_column(Float, nullable=True)
    drift_threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Rows older than the retention horizon are folded into coarser rows: resolution_s says
    # how many seconds one row covers (0 for an original window).
    resolution_s: Mapped[int] = mapped_column(Integer, default=0)


Index("ix_telemetry_device_end", Telemetry.device, Telemetry.window_end)


class ShadowWindow(Base):
    """One shadow-evaluation window of one device (docs/shadow.md): the telemetry record's
    ``shadow`` section, keyed like the record it came in ((device, seq): a redelivery is
    ignored). Statistics only: no input or output is ever stored."""

    __tablename__ = "shadow_windows"

    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    window_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    candidate_id: Mapped[str] = mapped_column(String(64), index=True)
    candidate_label: Mapped[str] = mapped_column(String(140))
    serving_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    sample_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    compared: Mapped[int] = mapped_column(Integer)
    dropped: Mapped[int] = mapped_column(Integer)
    classified: Mapped[int] = mapped_column(Integer)
    agreed: Mapped[int] = mapped_column(Integer)
    abs_error_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    abs_error_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    serving_p50_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    serving_p95_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    candidate_p50_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    candidate_p95_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The candidate's drift severity on the device's inputs (ok, inputs changed, model affected).
    candidate_severity: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # The agent's peak resident memory with both models loaded during the window (bytes).
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class BenchResult(Base):
    """What one device measured of one candidate in an on-fleet benchmark (docs/bench.md),
    keyed by the device's report number ((device, seq): a redelivery is ignored). ``by_threads``
    is the report's JSON list of per-thread-count figures."""

    __tablename__ = "bench_results"

    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    fleet: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    bench_seq: Mapped[int] = mapped_column(BigInteger)
    candidate_id: Mapped[str] = mapped_column(String(64))
    candidate_label: Mapped[str] = mapped_column(String(140))
    board_class: Mapped[str] = mapped_column(String(700))
    board_model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    board_cpu: Mapped[str | None] = mapped_column(String(200), nullable=True)
    machine: Mapped[str | None] = mapped_column(String(200), nullable=True)
    cores: Mapped[int] = mapped_column(Integer)
    runtime: Mapped[str] = mapped_column(String(32))
    xnnpack: Mapped[bool] = mapped_column(Boolean)
    state: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    load_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    peak_rss_mb: Mapped[float | None] = mapped_column(Float, nullable=True)
    added_rss_mb: Mapped[float | None] = mapped_column(Float, nullable=True)
    by_threads: Mapped[str] = mapped_column(Text)
    hc_samples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    hc_agreed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    hc_max_error: Mapped[float | None] = mapped_column(Float, nullable=True)
    temperature_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    throttled: Mapped[str | None] = mapped_column(String(32), nullable=True)


Index("ix_bench_results_fleet_bench_seq", BenchResult.fleet, BenchResult.bench_seq)


class Event(Base):
    __tablename__ = "events"

    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    bundle_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    message: Mapped[str] = mapped_column(Text)


# -- alerts (edgekit.fleet.alerts): rules, channels, alerts and the deliveries still to make ---------


class AlertRule(Base):
    """The owner's settings of one alert rule (only those changed from the defaults)."""

    __tablename__ = "alert_rules"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    settings: Mapped[dict[str, object]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AlertChannel(Base):
    """Where alerts go. Secrets (SMTP password, webhook URL) are not here: they are in a mode
    0600 file under EDGEKIT_HOME, keyed by ``name``."""

    __tablename__ = "alert_channels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    failing_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Alert(Base):
    """One condition of one device (or fleet, or channel): pending until it has held long
    enough, then open, then resolved once it has cleared long enough."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rule: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(128))
    origin: Mapped[str | None] = mapped_column(String(160), nullable=True)
    fleet: Mapped[str | None] = mapped_column(String(64), nullable=True)
    device: Mapped[str | None] = mapped_column(String(64), nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    since: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    opened_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    clearing_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    acked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    acked_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    summary: Mapped[str] = mapped_column(Text)
    facts: Mapped[dict[str, Any]] = mapped_column(JSON)


Index("ix_alerts_rule_subject_state", Alert.rule, Alert.subject, Alert.state)


class AlertDelivery(Base):
    """One message to one channel, kept until sent (or given up): what survives a restart."""

    __tablename__ = "alert_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    channel_id: Mapped[int] = mapped_column(ForeignKey("alert_channels.id", ondelete="CASCADE"), index=True)
    alert_id: Mapped[int | None] = mapped_column(ForeignKey("alerts.id"), nullable=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    message: Mapped[dict[str, Any]] = mapped_column(JSON)


Index("ix_alert_deliveries_state_next", AlertDelivery.state, AlertDelivery.next_attempt_at)


class AlertLease(Base):
    """Who evaluates alerts: one holder at a time, however many services share the registry."""

    __tablename__ = "alert_lease"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(64), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class CapturePolicyRow(Base):
    """Every capture policy signed for a fleet (docs/capture.md), kept for good: a dataset's
    README names the policies its records were collected under, even after newer ones."""

    __tablename__ = "capture_policies"

    fleet: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean)
    note: Mapped[str] = mapped_column(Text, default="")
    signer: Mapped[str] = mapped_column(String(64))  # key id of the signing key
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    document: Mapped[str] = mapped_column(Text)  # the policy as signed (JSON): triggers, limits
    envelope: Mapped[str] = mapped_column(Text)  # the signed envelope, base64


class CaptureRecordRow(Base):
    """One sealed capture record from a device (docs/capture.md): ciphertext only; the fleet
    cannot open it. Keyed by (device, seq): a record sent again is stored once."""

    __tablename__ = "capture_records"

    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    fleet: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
