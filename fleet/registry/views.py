"""Registry rows as the plain JSON the CLI's --json and the dashboard's /api/ return."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from .models import Device, Event, Telemetry

__all__ = ["device_json", "event_json", "iso", "telemetry_json"]


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def device_json(d: Device) -> dict[str, Any]:
    return {
        "device": d.id,
        "fleet": d.fleet,
        "online": d.online,
        "status": d.status,
        "bundle_id": d.bundle_id,
        "bundle": d.bundle_name,
        "version": d.bundle_version,
        "first_seen": iso(d.first_seen),
        "last_seen": iso(d.last_seen),
        "latency_p95_ms": d.latency_p95_ms,
        "drift_score": d.drift_score,
        "drifted": d.drifted,
        "detail": d.detail,
    }


def event_json(e: Event) -> dict[str, Any]:
    return {
        "device": e.device,
        "seq": e.seq,
        "at": iso(e.at),
        "kind": e.kind,
        "bundle_id": e.bundle_id,
        "message": e.message,
    }


def telemetry_json(t: Telemetry) -> dict[str, Any]:
    return {
        "seq": t.seq,
        "window_start": iso(t.window_start),
        "window_end": iso(t.window_end),
        "count": t.count,
        "errors": t.errors,
        "latency_p50_ms": t.latency_p50_ms,
        "latency_p95_ms": t.latency_p95_ms,
        "latency_p99_ms": t.latency_p99_ms,
        "drift_score": t.drift_score,
        "drifted": t.drifted,
        "bundle_version": t.bundle_version,
        "cpu_percent": t.cpu_percent,
        "memory_mb": t.memory_mb,
        "temperature_c": t.temperature_c,
        "resolution_s": t.resolution_s,
    }
