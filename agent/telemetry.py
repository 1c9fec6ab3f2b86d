"""Telemetry records and events: what the agent reports, as plain versioned data.

A :class:`TelemetryRecord` covers one window of ``predict()`` calls: how many, how many
failed, latency percentiles, throughput, the drift scores, the serving bundle, and the
process's CPU and memory use and the board's temperature where the kernel exposes it. An
:class:`Event` is one install, refusal, health-check failure, rollback or recovery. Both are
queued in an :class:`~edgekit.agent.outbox.Outbox` on disk until delivered; the outbox adds
``seq`` (only grows, per device) and the ``dropped`` counts.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from edgekit.errors import DataError

__all__ = [
    "EVENT_SCHEMA",
    "TELEMETRY_SCHEMA",
    "Event",
    "LatencyRecorder",
    "SystemSampler",
    "TelemetryRecord",
]

TELEMETRY_SCHEMA = "edgekit.telemetry"
EVENT_SCHEMA = "edgekit.event"
SCHEMA_VERSION = 1

# Latencies are folded into log-spaced bins (2% wide, 1 µs .. 1000 s) once this many are held,
# so a window of any length costs bounded memory; percentiles are then accurate to 2%.
LATENCY_CAP = 8192
_EDGES = np.exp(np.arange(math.log(1e-6), math.log(1e3), math.log(1.02)))


_NUMBER = "number"
_COUNT = "count"
# What each field of a record may hold once decoded (None allowed where listed).
_TELEMETRY_FIELDS: dict[str, tuple[object, ...]] = {
    "device": (str,),
    "fleet": (str,),
    "window_start": (_NUMBER,),
    "window_end": (_NUMBER,),
    "count": (_COUNT,),
    "errors": (_COUNT,),
    "latency_ms": (dict,),
    "throughput": (_NUMBER,),
    "drift": (dict,),
    "bundle": (dict, None),
    "cpu_percent": (_NUMBER, None),
    "memory_rss_bytes": (_COUNT, None),
    "temperature_c": (_NUMBER, None),
    "runtime": (str, None),
    "seq": (_COUNT,),
    "dropped": (_COUNT,),
    "dropped_total": (_COUNT,),
}
_EVENT_FIELDS: dict[str, tuple[object, ...]] = {
    "device": (str,),
    "kind": (str,),
    "message": (str,),
    "bundle": (dict, None),
    "time": (_NUMBER,),
    "seq": (_COUNT,),
}


def _fits(value: object, kinds: tuple[object, ...]) -> bool:
    for kind in kinds:
        if kind is None and value is None:
            return True
        if isinstance(value, bool):
            continue
        if kind == _NUMBER and isinstance(value, (int, float)) and math.isfinite(value):
            return True
        if kind == _COUNT and isinstance(value, int) and value >= 0:
            return True
        if isinstance(kind, type) and isinstance(value, kind):
            return True
    return False


def _finite(value: object, depth: int = 0) -> bool:
    """No NaN or infinity anywhere inside (JSON from the wire may carry them)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if depth > 32:
        return False
    if isinstance(value, dict):
        return all(_finite(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v, depth + 1) for v in value)
    return True


def _check_fields(doc: dict[str, Any], fields: dict[str, tuple[object, ...]], what: str) -> None:
    if not _finite(doc):
        raise DataError(f"malformed {what}: a number is not finite (NaN or infinity)")
    for name, value in doc.items():
        kinds = fields.get(name)
        if kinds is None:
            raise DataError(f"malformed {what}: unknown field {name!r}")
        if not _fits(value, kinds):
            raise DataError(f"malformed {what}: field {name!r} holds {type(value).__name__} {value!r:.40}")


def _schema_check(doc: Any, schema: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        raise DataError(f"not an {schema} record")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{schema} record has unsupported schema_version {doc.get('schema_version')!r}")
    return doc


@dataclass(frozen=True)
class TelemetryRecord:
    """One window of serving statistics. ``seq``/``dropped`` are 0 until the outbox assigns them."""

    device: str
    fleet: str
    window_start: float  # unix seconds
    window_end: float
    count: int
    errors: int
    latency_ms: dict[str, float | None]  # p50, p95, p99
    throughput: float  # predictions per second over the window
    drift: dict[str, Any]  # {"drifted": bool, "complete": bool, "samples": n, "scores": {feature: psi/ks}}
    bundle: dict[str, str] | None  # name, version, bundle_id of the serving bundle
    cpu_percent: float | None  # this process, over the window (100 = one core)
    memory_rss_bytes: int | None
    temperature_c: float | None
    runtime: str | None = None
    seq: int = 0
    dropped: int = 0
    dropped_total: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"schema": TELEMETRY_SCHEMA, "schema_version": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, doc: Any) -> TelemetryRecord:
        """Decode a record (``to_dict()``'s output, e.g. parsed from the wire); DataError for
        anything else: wrong schema, unknown or missing fields, a field of the wrong type, a
        count below zero, a number that is not finite."""
        doc = dict(_schema_check(doc, TELEMETRY_SCHEMA))
        doc.pop("schema")
        doc.pop("schema_version")
        _check_fields(doc, _TELEMETRY_FIELDS, "telemetry record")
        try:
            return cls(**doc)
        except TypeError as exc:
            raise DataError(f"malformed telemetry record: {exc}") from None


@dataclass(frozen=True)
class Event:
    """Something that happened to the device's installed model, for the fleet to see."""

    device: str
    kind: str  # installed, install_refused, install_failed, rolled_back, recovered, ...
    message: str
    bundle: dict[str, str] | None = None
    time: float = field(default_factory=time.time)
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"schema": EVENT_SCHEMA, "schema_version": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, doc: Any) -> Event:
        doc = dict(_schema_check(doc, EVENT_SCHEMA))
        doc.pop("schema")
        doc.pop("schema_version")
        doc.pop("dropped", None)
        doc.pop("dropped_total", None)
        _check_fields(doc, _EVENT_FIELDS, "event")
        try:
            return cls(**doc)
        except TypeError as exc:
            raise DataError(f"malformed event: {exc}") from None


class LatencyRecorder:
    """Latencies of one window in bounded memory. Not locked: the agent appends under its lock.

    The hot path is ``samples.append(seconds)`` followed by a length check against
    :data:`LATENCY_CAP`; :meth:`fold` moves held samples into the histogram.
    """

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._hist = np.zeros(len(_EDGES) + 1, dtype=np.int64)
        self._folded = 0

    def fold(self) -> None:
        if self.samples:
            idx = np.searchsorted(_EDGES, np.asarray(self.samples), side="right")
            self._hist += np.bincount(idx, minlength=len(_EDGES) + 1)
            self._folded += len(self.samples)
            self.samples.clear()  # in place: the agent holds this list

    @property
    def count(self) -> int:
        return self._folded + len(self.samples)

    def percentiles_ms(self) -> dict[str, float | None]:
        """p50/p95/p99 in milliseconds: exact while nothing was folded, else within 2%."""
        if self.count == 0:
            return {"p50": None, "p95": None, "p99": None}
        if self._folded == 0:
            # numpy's default (linear) percentile, without np.percentile: that pulls in numpy.ma,
            # most of a megabyte on a device, for three numbers.
            ordered = np.sort(np.asarray(self.samples, dtype=np.float64))
            exact: dict[str, float | None] = {}
            for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
                position = q * (ordered.size - 1)
                low = int(position)
                high = min(low + 1, ordered.size - 1)
                value = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
                exact[name] = float(value) * 1000.0
            return exact
        self.fold()
        cumulative = np.cumsum(self._hist)
        result: dict[str, float | None] = {}
        mids = np.concatenate([[_EDGES[0]], np.sqrt(_EDGES[1:] * _EDGES[:-1]), [_EDGES[-1]]])
        for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
            index = int(np.searchsorted(cumulative, q * cumulative[-1], side="left"))
            result[name] = float(mids[index] * 1000.0)
        return result


def _read_first(paths: list[Path]) -> str | None:
    for path in paths:
        try:
            return path.read_text().strip()
        except OSError:
            continue
    return None


class SystemSampler:
    """Process CPU share, resident memory and board temperature, where the OS exposes them."""

    def __init__(self) -> None:
        self._last_wall = time.monotonic()
        self._last_cpu = self._cpu_seconds()
        self._thermal = sorted(Path("/sys/class/thermal").glob("thermal_zone*/temp"))

    @staticmethod
    def _cpu_seconds() -> float:
        t = os.times()
        return t.user + t.system

    def cpu_percent(self) -> float | None:
        """CPU used by this process since the last call, in percent of one core."""
        wall, cpu = time.monotonic(), self._cpu_seconds()
        elapsed = wall - self._last_wall
        used = cpu - self._last_cpu
        self._last_wall, self._last_cpu = wall, cpu
        return None if elapsed <= 0 else round(100.0 * used / elapsed, 2)

    @staticmethod
    def memory_rss_bytes() -> int | None:
        statm = _read_first([Path("/proc/self/statm")])
        if statm is None:
            return None
        try:
            return int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, IndexError, OSError):
            return None

    def temperature_c(self) -> float | None:
        raw = _read_first(self._thermal)
        if raw is None:
            return None
        try:
            return round(int(raw) / 1000.0, 1)
        except ValueError:
            return None
