"""Registry rows as the plain JSON the CLI's --json and the dashboard's /api/ return."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from .models import AuditEntry, Device, Event, Telemetry

__all__ = ["audit_json", "device_json", "drift_text", "event_json", "iso", "telemetry_json"]


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _accuracy(estimate: float | None, low: float | None, high: float | None) -> dict[str, Any] | None:
    return None if estimate is None else {"estimate": estimate, "low": low, "high": high}


def drift_text(d: Device) -> str:
    """A device's drift in an owner's words, the same in ``fleet status`` and the dashboard:
    ``ok``, ``inputs changed``, ``model affected: estimated accuracy 66% (59-74%)``; a device
    whose agent predates severities shows ``drifted 0.29`` (its score) / ``ok``; nothing
    judged yet, ``-``."""
    severity = d.drift_severity
    if severity is None:
        if d.drifted:
            return "drifted" if d.drift_score is None else f"drifted {d.drift_score:.2f}"
        return "ok" if d.drift_score is not None else "-"
    if d.accuracy_estimate is None:
        return severity
    text = f"{severity}: estimated accuracy {d.accuracy_estimate:.0%}"
    if d.accuracy_low is not None and d.accuracy_high is not None:
        text += f" ({d.accuracy_low * 100:.0f}-{d.accuracy_high:.0%})"
    return text if severity == "model affected" else f"{severity} ({d.accuracy_estimate:.0%} est.)"


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
        "drift_severity": d.drift_severity,
        "accuracy": _accuracy(d.accuracy_estimate, d.accuracy_low, d.accuracy_high),
        "drift_text": drift_text(d),
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
        "drift_severity": t.drift_severity,
        "drift_threshold": t.drift_threshold,
        "accuracy": _accuracy(t.accuracy_estimate, t.accuracy_low, t.accuracy_high),
        "bundle_version": t.bundle_version,
        "cpu_percent": t.cpu_percent,
        "memory_mb": t.memory_mb,
        "temperature_c": t.temperature_c,
        "memory_used_percent": t.memory_used_percent,
        "disk_used_percent": t.disk_used_percent,
        "resolution_s": t.resolution_s,
    }


def audit_json(a: AuditEntry) -> dict[str, Any]:
    return {
        "at": iso(a.at),
        "actor": a.actor,
        "action": a.action,
        "fleet": a.fleet,
        "target": a.target,
        "result": a.result,
        "detail": a.detail,
    }
