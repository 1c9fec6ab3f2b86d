"""The fleet registry (SQLite or PostgreSQL)."""

from __future__ import annotations

from .store import (
    BatchResult,
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
    "DeviceState",
    "EventRow",
    "Registry",
    "ShadowRow",
    "TelemetryRow",
    "WriteResult",
    "normalize_url",
]
