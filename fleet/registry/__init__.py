"""The fleet registry (SQLite or PostgreSQL)."""

from __future__ import annotations

from .store import DeviceState, EventRow, Registry, TelemetryRow, WriteResult, normalize_url

__all__ = ["DeviceState", "EventRow", "Registry", "TelemetryRow", "WriteResult", "normalize_url"]
