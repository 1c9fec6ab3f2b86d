"""Measuring what the agent reports: latency percentiles in bounded memory, and the process's
CPU and memory use and the board's temperature where the kernel exposes them.

The records themselves, :class:`TelemetryRecord` (one window of ``predict()`` calls) and
:class:`Event` (one install, refusal, health-check failure, rollback or recovery), are wire
schema and live in :mod:`edgekit.reports`, shared with the fleet that decodes them; they are
re-exported here. Both are queued in an :class:`~edgekit.agent.outbox.Outbox` on disk until
delivered; the outbox adds ``seq`` (only grows, per device) and the ``dropped`` counts.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
from edgekit.reports import EVENT_SCHEMA, TELEMETRY_SCHEMA, Event, TelemetryRecord

__all__ = [
    "EVENT_SCHEMA",
    "TELEMETRY_SCHEMA",
    "Event",
    "LatencyRecorder",
    "SystemSampler",
    "TelemetryRecord",
]

# Latencies are folded into log-spaced bins (2% wide, 1 µs .. 1000 s) once this many are held,
# so a window of any length costs bounded memory; percentiles are then accurate to 2%.
LATENCY_CAP = 8192
_EDGES = np.exp(np.arange(math.log(1e-6), math.log(1e3), math.log(1.02)))


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

    @staticmethod
    def memory_used_percent() -> float | None:
        """The board's RAM in use: MemTotal - MemAvailable of /proc/meminfo, in percent."""
        fields: dict[str, int] = {}
        try:
            with open("/proc/meminfo", encoding="ascii") as meminfo:
                for line in meminfo:
                    name, _, rest = line.partition(":")
                    if name in ("MemTotal", "MemAvailable"):
                        fields[name] = int(rest.split()[0])
        except (OSError, ValueError, IndexError):
            return None
        total, available = fields.get("MemTotal"), fields.get("MemAvailable")
        if not total or available is None:
            return None
        return round(100.0 * (total - available) / total, 1)

    @staticmethod
    def disk_used_percent(path: str | os.PathLike[str]) -> float | None:
        """The filesystem holding ``path`` (the agent's state directory), in use, in percent of
        what an unprivileged process may use (as ``df`` counts it)."""
        try:
            st = os.statvfs(path)
        except OSError:
            return None
        used = st.f_blocks - st.f_bfree
        usable = used + st.f_bavail
        return round(100.0 * used / usable, 1) if usable > 0 else None

    def temperature_c(self) -> float | None:
        raw = _read_first(self._thermal)
        if raw is None:
            return None
        try:
            return round(int(raw) / 1000.0, 1)
        except ValueError:
            return None
