"""The rollout view: each fleet's current rollout (from the control plane) with its
canaries' progress, and its abort criteria beside the values measured on each canary."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select

from ..control import ControlPlane
from ..registry import Registry
from ..registry.models import Device, Telemetry
from ..registry.views import iso
from ..rollout import Rollout

__all__ = ["rollout_views"]

PHASES = {
    "shadow": "the canaries try it in the shadow of what they serve",
    "canary": "installing on the canaries",
    "soak": "the canaries serve it; watching them",
    "fleet": "sent to the whole fleet",
    "done": "done",
    "aborted": "stopped",
}


def _at(seconds: float) -> str | None:
    return iso(datetime.fromtimestamp(seconds, timezone.utc))


def rollout_views(registry: Registry) -> list[dict[str, Any]]:
    """Every fleet's current rollout (from the control plane), newest first, as the dashboard
    shows it."""
    views = [
        {**_view(registry, info.rollout), "started_by": info.started_by}
        for info in ControlPlane(registry).rollouts()
    ]
    return sorted(views, key=lambda v: v["started_at"] or "", reverse=True)


def _view(registry: Registry, rollout: Rollout) -> dict[str, Any]:
    policy = rollout.rollout_policy
    version = rollout.label.rpartition("@")[2]
    started = datetime.fromtimestamp(rollout.started_at, timezone.utc)
    with registry.session() as session:
        devices = {
            d.id: d for d in session.execute(select(Device).where(Device.id.in_(rollout.devices))).scalars()
        }
        measured = {
            device: (int(count or 0), int(errors or 0), p95)
            for device, count, errors, p95 in session.execute(
                select(
                    Telemetry.device,
                    func.sum(Telemetry.count),
                    func.sum(Telemetry.errors),
                    func.max(Telemetry.latency_p95_ms),
                )
                .where(
                    Telemetry.device.in_(rollout.canaries),
                    Telemetry.window_end >= started,
                    Telemetry.bundle_version == version,
                )
                .group_by(Telemetry.device)
            )
        }
    rows = []
    for name in rollout.devices:
        d = devices.get(name)
        serving = d is not None and d.bundle_id == rollout.bundle_id
        if name in rollout.failed:
            state = f"failed: {rollout.failed[name]}"
        elif serving:
            state = f"serves {rollout.label}"
        elif d is None or not d.online:
            state = "offline"
        else:
            state = f"{d.status} ({d.bundle_version or 'no version'})"
        row: dict[str, Any] = {
            "device": name,
            "canary": name in rollout.canaries,
            "state": state,
            "serving": serving,
        }
        if name in rollout.canaries:
            count, errors, p95 = measured.get(name, (0, 0, None))
            baseline = rollout.baseline_p95_ms.get(name)
            row.update(
                predictions=count,
                error_rate=errors / count if count else None,
                p95_ms=p95,
                baseline_p95_ms=baseline,
                drifted=bool(d and d.drifted),
            )
        rows.append(row)
    criteria = [
        {"criterion": "error rate", "limit": f"at most {policy.max_error_rate:.1%}", "key": "error_rate"},
        {
            "criterion": "p95 latency",
            "limit": f"at most {policy.max_p95_regression:.0%} above the canary's p95 before the rollout",
            "key": "p95_ms",
        },
        {
            "criterion": "input drift",
            "limit": "none" if policy.abort_on_drift else "not checked",
            "key": "drifted",
        },
        {
            "criterion": "install time",
            "limit": f"serving within {policy.install_timeout_s:.0f} s",
            "key": "serving",
        },
    ]
    return {
        "fleet": rollout.fleet,
        "label": rollout.label,
        "phase": rollout.phase,
        "phase_words": PHASES.get(rollout.phase, rollout.phase),
        "phase_since": _at(rollout.phase_since),
        "started_at": _at(rollout.started_at),
        "reason": rollout.reason,
        "soak_s": policy.soak_s,
        "min_samples": policy.min_samples,
        "criteria": criteria,
        "devices": rows,
    }
