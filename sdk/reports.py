"""What a device says about itself: its retained state, telemetry records and events.

These are the device-to-fleet half of the wire protocol, as plain versioned data. The agent
builds and publishes them; the fleet (ingest, ``edgekit push --wait``) decodes them here, with
one defensive decoder per message, so neither side depends on the other's internals.

- A :class:`DeviceStateReport` (``edgekit.state`` v1, retained on ``.../state``) says what a
  device serves and what it is doing: ``serving``, ``idle`` (nothing installed),
  ``downloading`` (with ``progress`` 0..1), ``verifying``, ``installing``, ``failed`` (with the
  bundle and the reason; the previous bundle keeps serving), and ``offline`` (the MQTT will).
- A :class:`TelemetryRecord` (``edgekit.telemetry`` v1, QoS 1 on ``.../telemetry``) covers one
  window of ``predict()`` calls: counts, latency percentiles, throughput, drift scores, the
  serving bundle, CPU, memory and temperature. ``seq`` only grows per device; ``dropped``
  counts records the device's outbox had to discard.
- An :class:`Event` (``edgekit.event`` v1, on ``.../events``) is one install, refusal,
  health-check failure, rollback or recovery, with its own ``seq``.

Decoding never trusts the bytes: a size cap before parsing, then the schema and version, then
every field's type and range (so a value a database column cannot hold never gets that far).
Unknown fields are ignored, so a newer agent may add some within a schema version. Every
refusal is a :class:`~edgekit.errors.MessageError` whose ``reason`` is one stable word:
``oversized``, ``not_json``, ``wrong_schema``, ``wrong_version``, ``bad_field``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

from .schema import ID, MAX_SEQ, Fields, check_schema, decode_json, is_finite, is_number

__all__ = [
    "DRIFT_SEVERITIES",
    "EVENT_SCHEMA",
    "MAX_REPORT_SIZE",
    "STATE_SCHEMA",
    "STATUSES",
    "TELEMETRY_SCHEMA",
    "DeviceStateReport",
    "Event",
    "TelemetryRecord",
    "decode_json_message",
]

STATE_SCHEMA = "edgekit.state"
STATE_SCHEMA_VERSION = 1
TELEMETRY_SCHEMA = "edgekit.telemetry"
EVENT_SCHEMA = "edgekit.event"
SCHEMA_VERSION = 1  # of telemetry records and events
#: A telemetry window's drift severity, in the words an owner sees (see docs/agent.md, "Drift").
DRIFT_SEVERITIES = ("ok", "inputs changed", "model affected")
STATUSES = ("serving", "idle", "downloading", "verifying", "installing", "failed", "offline")
#: Device messages larger than this are refused before parsing.
MAX_REPORT_SIZE = 256 * 1024
#: Longest short text field (names, versions, ids, event kinds): what the registry stores.
MAX_NAME = 64
MAX_KIND = 32
#: Longest free text (event messages, errors).
MAX_TEXT = 4096


def decode_json_message(payload: bytes, schema: str, version: int, what: str) -> dict[str, Any]:
    """A JSON object of ``schema`` at ``version``, or MessageError: the one defensive decoder
    every device-to-fleet message goes through (:func:`edgekit.schema.decode_json`, capped at
    :data:`MAX_REPORT_SIZE`)."""
    return decode_json(payload, schema, version, what, limit=MAX_REPORT_SIZE)


def _bundle(fields: Fields) -> Optional[Dict[str, str]]:
    value = fields.doc.get("bundle")
    if value is None:
        return None
    if type(value) is dict:
        for key, text in value.items():  # a plain loop: this runs for every telemetry record
            if type(key) is not str or type(text) is not str or len(text) > MAX_NAME or "\0" in text:
                break
        else:
            return value
    raise fields.bad("bundle", f"an object of strings of at most {MAX_NAME} characters, or null")


# -- state ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceStateReport:
    device: str
    fleet: str
    status: str
    bundle_id: Optional[str] = None  # what it serves
    bundle_name: Optional[str] = None
    bundle_version: Optional[str] = None
    target_id: Optional[str] = None  # what it was told to serve (downloading/installing/failed)
    target_seq: Optional[int] = None
    progress: Optional[float] = None
    error: Optional[str] = None
    agent_version: Optional[str] = None
    time: float = 0.0
    #: Under the TUF key hierarchy: the root version the device trusts, and when the timestamp
    #: it last verified expires (unix seconds); None on single-key devices and older agents.
    trust_root: Optional[int] = None
    trust_expires: Optional[float] = None

    @property
    def online(self) -> bool:
        return self.status != "offline"

    def to_json(self) -> bytes:
        doc = {"schema": STATE_SCHEMA, "schema_version": STATE_SCHEMA_VERSION, **self.__dict__}
        doc["time"] = self.time or time.time()
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> DeviceStateReport:
        doc = decode_json_message(payload, STATE_SCHEMA, STATE_SCHEMA_VERSION, "device state")
        f = Fields(doc, "device state")
        progress = doc.get("progress")
        if progress is not None:
            progress = f.number("progress", low=0, top=1)
        return cls(
            device=f.id("device"),
            fleet=f.id("fleet"),
            status=f.one_of("status", STATUSES),
            bundle_id=f.text("bundle_id", MAX_NAME),
            bundle_name=f.text("bundle_name", MAX_NAME),
            bundle_version=f.text("bundle_version", MAX_NAME),
            target_id=f.text("target_id", MAX_NAME),
            target_seq=f.optional_integer("target_seq", top=MAX_SEQ),
            progress=progress,
            error=f.text("error", MAX_TEXT),
            agent_version=f.text("agent_version", MAX_NAME),
            time=f.time("time", 0.0),
            trust_root=f.optional_integer("trust_root", top=MAX_SEQ),
            trust_expires=None if doc.get("trust_expires") is None else f.time("trust_expires"),
        )


# -- telemetry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TelemetryRecord:
    """One window of serving statistics. ``seq``/``dropped`` are 0 until the outbox assigns them."""

    device: str
    fleet: str
    window_start: float  # unix seconds
    window_end: float
    count: int
    errors: int
    latency_ms: Dict[str, Optional[float]]  # p50, p95, p99
    throughput: float  # predictions per second over the window
    # {"drifted": bool, "complete": bool, "samples": n, "scores": {feature: {psi, ks}},
    #  "severity": one of DRIFT_SEVERITIES or null, "windows": drift windows completed (the
    #  verdict is new when it grows), "summary": str, "signals": {name: bool},
    #  "calibrated": bool, "accuracy": {estimate, low, high, reference, method} or null}
    # (severity and after: since edgekit 0.2; records of older agents lack them)
    drift: Dict[str, Any]
    bundle: Optional[Dict[str, str]]  # name, version, bundle_id of the serving bundle
    cpu_percent: Optional[float]  # this process, over the window (100 = one core)
    memory_rss_bytes: Optional[int]
    temperature_c: Optional[float]
    runtime: Optional[str] = None
    # The board, where the OS says: RAM in use (MemTotal - MemAvailable) and the state
    # directory's filesystem in use, in percent (since edgekit 0.2; older agents send none).
    memory_used_percent: Optional[float] = None
    disk_used_percent: Optional[float] = None
    seq: int = 0
    dropped: int = 0
    dropped_total: int = 0
    # The shadow evaluation's window (docs/shadow.md), statistics only: candidate {name,
    # version, bundle_id}, state, sample_rate, compared, dropped, classified, agreed, agreement,
    # abs_error_mean/max, serving_/candidate_latency_ms {p50, p95}, error, severity (the
    # candidate's drift severity on the device's inputs, or null), peak_memory_bytes (the
    # agent's peak RSS with both models loaded, sampled; null from older agents). None: no shadow
    # (and from agents before edgekit 0.3).
    shadow: Optional[Dict[str, Any]] = None

    def to_dict(self) -> dict[str, Any]:
        return {"schema": TELEMETRY_SCHEMA, "schema_version": SCHEMA_VERSION, **asdict(self)}

    @property
    def drift_score(self) -> Optional[float]:
        """The worst PSI over the features, or None when nothing was scored."""
        worst: Optional[float] = None
        for score in (self.drift.get("scores") or {}).values():
            psi: Any = score.get("psi") if isinstance(score, dict) else score
            if is_number(psi) and math.isfinite(psi) and (worst is None or psi > worst):
                worst = float(psi)
        return worst

    @property
    def drift_threshold(self) -> Optional[float]:
        """The PSI above which the window's worst feature (the one :attr:`drift_score` reports)
        counts as drifted: its ``psi_limit`` (the threshold, or the sampling-noise floor when
        that is higher), else the window's ``psi_threshold``; None from older agents."""
        worst: Optional[float] = None
        limit: Any = self.drift.get("psi_threshold")
        for score in (self.drift.get("scores") or {}).values():
            psi: Any = score.get("psi") if isinstance(score, dict) else score
            if is_number(psi) and math.isfinite(psi) and (worst is None or psi > worst):
                worst = float(psi)
                if isinstance(score, dict) and is_number(score.get("psi_limit")):
                    limit = score["psi_limit"]
        if not is_number(limit) or not math.isfinite(limit) or limit <= 0:
            return None
        return float(limit)

    @property
    def drift_severity(self) -> Optional[str]:
        """The window's drift severity (one of :data:`DRIFT_SEVERITIES`), or None when the
        window was not judged (first window still filling, no baseline, an older agent)."""
        severity: Optional[str] = self.drift.get("severity")
        return severity

    @classmethod
    def from_json(cls, payload: bytes) -> TelemetryRecord:
        """Decode and validate the bytes of one telemetry message; MessageError if bad."""
        doc = decode_json_message(payload, TELEMETRY_SCHEMA, SCHEMA_VERSION, "telemetry")
        return cls._from_doc(doc, finite=True)  # the strict decoder let no NaN or infinity in

    @classmethod
    def from_dict(cls, doc: Any) -> TelemetryRecord:
        """Validate a telemetry record given as a dict (from anywhere); MessageError if bad."""
        return cls._from_doc(check_schema(doc, TELEMETRY_SCHEMA, SCHEMA_VERSION, "telemetry"), finite=False)

    @classmethod
    def _from_doc(cls, doc: dict[str, Any], finite: bool) -> TelemetryRecord:
        f = Fields(doc, "telemetry")
        latency = doc.get("latency_ms")
        if type(latency) is not dict:
            raise f.bad("latency_ms", "an object of p50, p95, p99 numbers or nulls")
        latency = {k: latency.get(k) for k in ("p50", "p95", "p99")}
        for value in latency.values():
            if value is not None and (not is_number(value) or not math.isfinite(value)):
                raise f.bad("latency_ms", "an object of p50, p95, p99 numbers or nulls")
        drift = doc.get("drift")
        if (
            type(drift) is not dict
            or type(drift.get("drifted", False)) is not bool
            or type(drift.get("scores", {})) is not dict
        ):
            raise f.bad("drift", "an object with a boolean 'drifted' and an object 'scores'")
        if not finite and not is_finite(drift):
            raise f.bad("drift", "finite numbers (no NaN or infinity)")
        _check_drift_verdict(Fields(drift, "telemetry drift"))
        return cls(
            device=f.id("device"),
            fleet=f.id("fleet"),
            window_start=f.time("window_start"),
            window_end=f.time("window_end"),
            count=f.integer("count"),
            errors=f.integer("errors"),
            latency_ms=latency,
            throughput=f.number("throughput", 0.0, low=0),
            drift=drift,
            bundle=_bundle(f),
            cpu_percent=f.optional_number("cpu_percent"),
            memory_rss_bytes=f.optional_integer("memory_rss_bytes", top=MAX_SEQ),
            temperature_c=f.optional_number("temperature_c"),
            runtime=f.text("runtime", MAX_NAME),
            memory_used_percent=_percent(f, "memory_used_percent"),
            disk_used_percent=_percent(f, "disk_used_percent"),
            seq=f.integer("seq", 0, top=MAX_SEQ),
            dropped=f.integer("dropped", 0),
            dropped_total=f.integer("dropped_total", 0, top=MAX_SEQ),
            shadow=_shadow(doc.get("shadow"), finite),
        )


def _shadow(shadow: Any, finite: bool) -> Optional[Dict[str, Any]]:
    if shadow is None:
        return None
    if type(shadow) is not dict:
        raise Fields({}, "telemetry").bad("shadow", "an object or null")
    if not finite and not is_finite(shadow):
        raise Fields({}, "telemetry").bad("shadow", "finite numbers (no NaN or infinity)")
    f = Fields(shadow, "telemetry shadow")
    f.integer("compared")
    f.integer("dropped")
    agreed, classified = f.integer("agreed", 0), f.integer("classified", 0)
    if agreed > classified:
        raise f.bad("agreed", "at most 'classified'")
    f.one_of("state", ("running", "failed", "stopped", "expired"))
    f.optional_integer("peak_memory_bytes", top=MAX_SEQ)  # since edgekit 0.3 (both models loaded)
    f.text("error", 1000)
    if shadow.get("severity") is not None:
        f.one_of("severity", DRIFT_SEVERITIES)
    candidate = shadow.get("candidate")
    if type(candidate) is not dict or not all(
        type(candidate.get(k)) is str for k in ("name", "version", "bundle_id")
    ):
        raise f.bad("candidate", "an object of name, version and bundle_id")
    for key in ("serving_latency_ms", "candidate_latency_ms"):
        latency = shadow.get(key)
        if type(latency) is not dict or not all(
            v is None or (is_number(v) and v >= 0) for v in (latency.get("p50"), latency.get("p95"))
        ):
            raise f.bad(key, "an object of p50, p95 numbers or nulls")
    for key in ("agreement", "abs_error_mean", "abs_error_max", "sample_rate"):
        value = shadow.get(key)
        if value is not None and not is_number(value):
            raise f.bad(key, "a number or null")
    return shadow


def _percent(f: Fields, key: str) -> Optional[float]:
    value = f.optional_number(key)
    if value is not None and not 0 <= value <= 100:
        raise f.bad(key, "a percentage from 0 to 100, or null")
    return value


def _check_drift_verdict(f: Fields) -> None:
    """The severity fields of a record's ``drift``, when present (older agents send none)."""
    drift = f.doc
    severity = drift.get("severity")
    if severity is not None and severity not in DRIFT_SEVERITIES:
        raise f.bad("severity", f"one of {', '.join(DRIFT_SEVERITIES)}, or null")
    f.text("summary", MAX_TEXT)
    signals = drift.get("signals", {})
    if type(signals) is not dict or any(type(v) is not bool for v in signals.values()):
        raise f.bad("signals", "an object of booleans")
    f.boolean("calibrated", False)
    accuracy = drift.get("accuracy")
    if accuracy is None:
        return
    if type(accuracy) is not dict or not all(
        is_number(accuracy.get(k)) and 0 <= accuracy[k] <= 1 for k in ("estimate", "low", "high", "reference")
    ):
        raise f.bad("accuracy", "an object of estimate, low, high, reference from 0 to 1, or null")


# -- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """Something that happened to the device's installed model, for the fleet to see."""

    device: str
    kind: str  # installed, install_refused, install_failed, rolled_back, recovered, ...
    message: str
    bundle: Optional[Dict[str, str]] = None
    time: float = field(default_factory=time.time)
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"schema": EVENT_SCHEMA, "schema_version": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, payload: bytes) -> Event:
        """Decode and validate the bytes of one event message; MessageError if bad."""
        return cls.from_dict(decode_json_message(payload, EVENT_SCHEMA, SCHEMA_VERSION, "event"))

    @classmethod
    def from_dict(cls, doc: Any) -> Event:
        f = Fields(check_schema(doc, EVENT_SCHEMA, SCHEMA_VERSION, "event"), "event")
        kind = f.required_text("kind", MAX_KIND)
        if not ID.match(kind):
            raise f.bad("kind", f"a word of at most {MAX_KIND} letters, digits, '.', '_', '-'")
        return cls(
            device=f.id("device"),
            kind=kind,
            message=f.required_text("message", MAX_TEXT),
            bundle=_bundle(f),
            time=f.time("time"),
            seq=f.integer("seq", 0, top=MAX_SEQ),
        )
