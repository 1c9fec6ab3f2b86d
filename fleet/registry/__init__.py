"""The fleet registry (SQLite or PostgreSQL)."""

from __future__ import annotations

from .store import (
    BatchResult,
    BenchRow,
    DeviceState,
    EventRow,
    Registry,
    ShadowRow,
    TelemetryRow,
    WriteResult,
    normalize_url,
)

__all__ = [
    "BatchResult",
    "BenchRow",
    "DeviceState",
    "EventRow",
    "Registry",
    "ShadowRow",
    "TelemetryRow",
    "WriteResult",
    "normalize_url",
]
