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
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

import orjson

from .errors import MessageError

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
_MAX_COUNT = 2**31 - 1  # counts fit a 32-bit column
_MAX_SEQ = 2**63 - 1
_MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: every database's timestamps hold it
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _refuse(reason: str, message: str) -> MessageError:
    error = MessageError(message)
    error.reason = reason
    return error


def decode_json_message(payload: bytes, schema: str, version: int, what: str) -> dict[str, Any]:
    """A JSON object of ``schema`` at ``version``, or MessageError: the one defensive decoder
    every device-to-fleet message goes through. Strict JSON in UTF-8 (RFC 8259, parsed by
    orjson): NaN, Infinity, numbers too large for a double and lone surrogates are refused as
    ``not_json``, so every float of a decoded message is finite without walking it again."""
    if len(payload) > MAX_REPORT_SIZE:
        raise _refuse("oversized", f"{what} is {len(payload)} bytes, over the {MAX_REPORT_SIZE}-byte limit")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise _refuse("not_json", f"{what} is not JSON ({exc})") from None
    return _check_schema(doc, schema, version, what)


def _check_schema(doc: Any, schema: str, version: int, what: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        raise _refuse("wrong_schema", f"{what} is not an {schema} message")
    if doc.get("schema_version") != version:
        raise _refuse("wrong_version", f"{what} has unsupported schema_version {doc.get('schema_version')!r}")
    return doc


# -- field checks: each returns the value or raises MessageError(reason="bad_field") ------------


def _finite(value: object, depth: int = 0) -> bool:
    """No NaN or infinity anywhere inside (JSON from the wire may carry them), nesting bounded."""
    if isinstance(value, float):
        return math.isfinite(value)
    if depth > 32:
        return False
    if isinstance(value, dict):
        return all(_finite(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v, depth + 1) for v in value)
    return True


def _bad(what: str, key: str, expected: str) -> MessageError:
    return _refuse("bad_field", f"{what} field {key!r} must be {expected}")


def _id(doc: dict[str, Any], key: str, what: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not _ID.match(value):
        raise _bad(what, key, "an id (1-64 letters, digits, '.', '_', '-')")
    return value


def _text(doc: dict[str, Any], key: str, what: str, limit: int) -> Optional[str]:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit or "\0" in value:
        raise _bad(what, key, f"a string of at most {limit} characters")
    return value


def _int(
    doc: dict[str, Any], key: str, what: str, default: Optional[int] = None, top: int = _MAX_COUNT
) -> int:
    value = doc.get(key, default)
    # type() is: JSON gives exact ints (a bool is not one), and this runs per field per message.
    if type(value) is not int or not 0 <= value <= top:
        raise _bad(what, key, f"an integer from 0 to {top}")
    return value


def _number(value: Any) -> bool:
    return type(value) is float or type(value) is int


def _opt_float(doc: dict[str, Any], key: str, what: str) -> Optional[float]:
    value = doc.get(key)
    if value is None:
        return None
    if not _number(value) or not math.isfinite(value):
        raise _bad(what, key, "a finite number or null")
    return float(value)


def _time(doc: dict[str, Any], key: str, what: str, default: Optional[float] = None) -> float:
    value: Any = doc.get(key, default)
    if not _number(value) or not 0 <= value <= _MAX_TIME:
        raise _bad(what, key, "a unix time in seconds")
    return float(value)


def _bundle(doc: dict[str, Any], what: str) -> Optional[Dict[str, str]]:
    value = doc.get("bundle")
    if value is None:
        return None
    if type(value) is dict:
        for key, text in value.items():  # a plain loop: this runs for every telemetry record
            if type(key) is not str or type(text) is not str or len(text) > MAX_NAME or "\0" in text:
                break
        else:
            return value
    raise _bad(what, "bundle", f"an object of strings of at most {MAX_NAME} characters, or null")


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

    @property
    def online(self) -> bool:
        return self.status != "offline"

    def to_json(self) -> bytes:
        doc = {"schema": STATE_SCHEMA, "schema_version": STATE_SCHEMA_VERSION, **self.__dict__}
        doc["time"] = self.time or time.time()
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> DeviceStateReport:
        what = "device state"
        doc = decode_json_message(payload, STATE_SCHEMA, STATE_SCHEMA_VERSION, what)
        status = doc.get("status")
        if status not in STATUSES:
            raise _refuse("bad_field", f"device state has an unknown status {status!r}")
        progress = doc.get("progress")
        if progress is not None and (not _number(progress) or not 0 <= progress <= 1):
            raise _bad(what, "progress", "a number from 0 to 1")
        seq = doc.get("target_seq")
        if seq is not None:
            seq = _int(doc, "target_seq", what, top=_MAX_SEQ)
        return cls(
            device=_id(doc, "device", what),
            fleet=_id(doc, "fleet", what),
            status=status,
            bundle_id=_text(doc, "bundle_id", what, MAX_NAME),
            bundle_name=_text(doc, "bundle_name", what, MAX_NAME),
            bundle_version=_text(doc, "bundle_version", what, MAX_NAME),
            target_id=_text(doc, "target_id", what, MAX_NAME),
            target_seq=seq,
            progress=None if progress is None else float(progress),
            error=_text(doc, "error", what, MAX_TEXT),
            agent_version=_text(doc, "agent_version", what, MAX_NAME),
            time=_time(doc, "time", what, 0.0),
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
    seq: int = 0
    dropped: int = 0
    dropped_total: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"schema": TELEMETRY_SCHEMA, "schema_version": SCHEMA_VERSION, **asdict(self)}

    @property
    def drift_score(self) -> Optional[float]:
        """The worst PSI over the features, or None when nothing was scored."""
        worst: Optional[float] = None
        for score in (self.drift.get("scores") or {}).values():
            psi: Any = score.get("psi") if isinstance(score, dict) else score
            if _number(psi) and math.isfinite(psi) and (worst is None or psi > worst):
                worst = float(psi)
        return worst

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
        return cls._from_doc(_check_schema(doc, TELEMETRY_SCHEMA, SCHEMA_VERSION, "telemetry"), finite=False)

    @classmethod
    def _from_doc(cls, doc: dict[str, Any], finite: bool) -> TelemetryRecord:
        what = "telemetry"
        latency = doc.get("latency_ms")
        if type(latency) is not dict:
            raise _bad(what, "latency_ms", "an object of p50, p95, p99 numbers or nulls")
        latency = {k: latency.get(k) for k in ("p50", "p95", "p99")}
        for value in latency.values():
            if value is not None and (not _number(value) or not math.isfinite(value)):
                raise _bad(what, "latency_ms", "an object of p50, p95, p99 numbers or nulls")
        drift = doc.get("drift")
        if (
            type(drift) is not dict
            or type(drift.get("drifted", False)) is not bool
            or type(drift.get("scores", {})) is not dict
        ):
            raise _bad(what, "drift", "an object with a boolean 'drifted' and an object 'scores'")
        if not finite and not _finite(drift):
            raise _bad(what, "drift", "finite numbers (no NaN or infinity)")
        _check_drift_verdict(drift, what)
        throughput: Any = doc.get("throughput", 0.0)
        if not _number(throughput) or not math.isfinite(throughput) or throughput < 0:
            raise _bad(what, "throughput", "a non-negative number")
        memory = doc.get("memory_rss_bytes")
        return cls(
            device=_id(doc, "device", what),
            fleet=_id(doc, "fleet", what),
            window_start=_time(doc, "window_start", what),
            window_end=_time(doc, "window_end", what),
            count=_int(doc, "count", what),
            errors=_int(doc, "errors", what),
            latency_ms=latency,
            throughput=float(throughput),
            drift=drift,
            bundle=_bundle(doc, what),
            cpu_percent=_opt_float(doc, "cpu_percent", what),
            memory_rss_bytes=None if memory is None else _int(doc, "memory_rss_bytes", what, top=_MAX_SEQ),
            temperature_c=_opt_float(doc, "temperature_c", what),
            runtime=_text(doc, "runtime", what, MAX_NAME),
            seq=_int(doc, "seq", what, 0, top=_MAX_SEQ),
            dropped=_int(doc, "dropped", what, 0),
            dropped_total=_int(doc, "dropped_total", what, 0, top=_MAX_SEQ),
        )


def _check_drift_verdict(drift: dict[str, Any], what: str) -> None:
    """The severity fields of a record's ``drift``, when present (older agents send none)."""
    severity = drift.get("severity")
    if severity is not None and severity not in DRIFT_SEVERITIES:
        raise _bad(what, "drift.severity", f"one of {', '.join(DRIFT_SEVERITIES)}, or null")
    summary = drift.get("summary")
    if summary is not None and (type(summary) is not str or len(summary) > MAX_TEXT):
        raise _bad(what, "drift.summary", f"a string of at most {MAX_TEXT} characters")
    signals = drift.get("signals", {})
    if type(signals) is not dict or any(type(v) is not bool for v in signals.values()):
        raise _bad(what, "drift.signals", "an object of booleans")
    if type(drift.get("calibrated", False)) is not bool:
        raise _bad(what, "drift.calibrated", "a boolean")
    accuracy = drift.get("accuracy")
    if accuracy is None:
        return
    if type(accuracy) is not dict or not all(
        _number(accuracy.get(k)) and 0 <= accuracy[k] <= 1 for k in ("estimate", "low", "high", "reference")
    ):
        raise _bad(what, "drift.accuracy", "an object of estimate, low, high, reference from 0 to 1, or null")


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
        what = "event"
        doc = _check_schema(doc, EVENT_SCHEMA, SCHEMA_VERSION, what)
        kind = doc.get("kind")
        if not isinstance(kind, str) or not _ID.match(kind) or len(kind) > MAX_KIND:
            raise _bad(what, "kind", f"a word of at most {MAX_KIND} letters, digits, '.', '_', '-'")
        message = doc.get("message")
        if not isinstance(message, str) or len(message) > MAX_TEXT or "\0" in message:
            raise _bad(what, "message", f"a string of at most {MAX_TEXT} characters")
        return cls(
            device=_id(doc, "device", what),
            kind=kind,
            message=message,
            bundle=_bundle(doc, what),
            time=_time(doc, "time", what),
            seq=_int(doc, "seq", what, 0, top=_MAX_SEQ),
        )
