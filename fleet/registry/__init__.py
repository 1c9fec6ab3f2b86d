"""The fleet registry (SQLite or PostgreSQL)."""

from __future__ import annotations

from .store import BatchResult, DeviceState, EventRow, Registry, TelemetryRow, WriteResult, normalize_url

__all__ = [
    "BatchResult",
    "DeviceState",
    "EventRow",
    "Registry",
    "TelemetryRow",
    "WriteResult",
    "normalize_url",
]
