"""Alert rules: what counts as a problem, with defaults a small business can live with.

Pure: :func:`evaluate` takes a :class:`Snapshot` of what the registry (and the saved rollouts)
say now, the rules' settings and the time, and returns the conditions that hold, one per rule
and subject (a device, a fleet or a channel). Whether a condition has held long enough to
alert, or cleared long enough to resolve, is the evaluator's business
(:mod:`edgekit.fleet.alerts.evaluator`), through each rule's ``hold`` and ``clear_after``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from edgekit.errors import ConfigError

__all__ = [
    "FREEZE_EVENTS",
    "INSTALL_PROBLEMS",
    "RULES",
    "Condition",
    "DesiredFacts",
    "DeviceFacts",
    "EventFacts",
    "RolloutFacts",
    "RuleSpec",
    "Snapshot",
    "drift_flagged",
    "evaluate",
    "merged_settings",
    "parse_setting",
]

#: Device events that open an "install" alert, and the words for them.
INSTALL_PROBLEMS = {
    "install_refused": "refused to install",
    "install_failed": "failed to install",
    "healthcheck_failed": "failed the health check of",
    "rolled_back": "rolled back automatically from",
    "rollback_failed": "could not roll back from",
}
#: Device events that close an open "install" alert.
INSTALL_FIXED = ("installed",)
#: The values a rule setting that is a word may take.
CHOICES = {("drift", "on"): ("model-affected", "inputs-changed")}
#: Device events of the "freeze" rule: the newest of them says whether the device is frozen.
FREEZE_EVENTS = ("freeze_suspected", "freeze_ended")


@dataclass(frozen=True)
class RuleSpec:
    """One rule: what it watches, and its settings with their defaults and meaning."""

    description: str
    defaults: Mapping[str, Any]
    help: Mapping[str, str]


_COMMON = {
    "enabled": "true or false",
    "hold": "seconds the condition must last before it alerts",
    "clear_after": "seconds it must stay cleared before the alert resolves (damps flapping)",
}

RULES: dict[str, RuleSpec] = {
    "offline": RuleSpec(
        "a device stopped reporting (its connection dropped) for longer than offline_after",
        {"enabled": True, "offline_after": 300.0, "clear_after": 60.0},
        {**_COMMON, "offline_after": "seconds a device may be offline before it alerts"},
    ),
    "drift": RuleSpec(
        "a device's model is likely making more mistakes because what it sees changed (drift"
        " severity 'model affected': its estimated accuracy fell, or its answers shifted along with"
        " its inputs); with on=inputs-changed also a device whose inputs changed while its answers"
        " look the same",
        {"enabled": True, "on": "model-affected", "hold": 0.0, "clear_after": 300.0},
        {
            **_COMMON,
            "on": "model-affected (default: only a model likely affected alerts) or inputs-changed"
            " (any change in what the device sees alerts)",
        },
    ),
    "install": RuleSpec(
        "a device refused an install, failed one or its health check, or rolled back",
        {"enabled": True, "clear_after": 0.0},
        _COMMON,
    ),
    "rollout": RuleSpec(
        "a rollout was aborted, or stalled: no device progressed (and the rollout took no step) for"
        " stall_after, not counting a soak's or shadow phase's own planned time",
        {"enabled": True, "stall_after": 1800.0, "clear_after": 0.0},
        {
            **_COMMON,
            "stall_after": "seconds without progress (a device's install or report on the new version,"
            " or a step of the rollout) before a rollout counts as stalled",
        },
    ),
    "latency": RuleSpec(
        "a device's p95 latency is above ratio x the fleet's level over the last day",
        {
            "enabled": True,
            "ratio": 2.0,
            "window": 900.0,
            "min_samples": 50,
            "hold": 0.0,
            "clear_after": 300.0,
        },
        {
            **_COMMON,
            "ratio": "how many times the fleet's own level counts as a problem",
            "window": "seconds of recent telemetry judged",
            "min_samples": "predictions a device must have served in the window",
        },
    ),
    "errors": RuleSpec(
        "a device's error rate is above ratio x the fleet's level over the last day (and >= min_rate)",
        {
            "enabled": True,
            "ratio": 2.0,
            "min_rate": 0.01,
            "window": 900.0,
            "min_samples": 50,
            "hold": 0.0,
            "clear_after": 300.0,
        },
        {
            **_COMMON,
            "ratio": "how many times the fleet's own level counts as a problem",
            "min_rate": "error rates below this never alert",
            "window": "seconds of recent telemetry judged",
            "min_samples": "predictions a device must have served in the window",
        },
    ),
    "board": RuleSpec(
        "a device's board is too hot (a Raspberry Pi throttles at 80 C), or its memory or disk is nearly full",
        {
            "enabled": True,
            "max_temperature_c": 80.0,
            "max_memory_percent": 95.0,
            "max_disk_percent": 90.0,
            "hold": 60.0,
            "clear_after": 300.0,
        },
        {
            **_COMMON,
            "max_temperature_c": "temperature (C) at or above which it alerts",
            "max_memory_percent": "share of the board's RAM in use (%) at or above which it alerts",
            "max_disk_percent": "share of the state directory's disk in use (%) at or above which it alerts",
        },
    ),
    "expiry": RuleSpec(
        "the signed desired state a device runs by expires within expiry_warning (then a device that"
        " restarts from scratch or joins refuses it)",
        {"enabled": True, "expiry_warning": 7 * 86400.0, "role_warning": 2 * 86400.0, "clear_after": 0.0},
        {
            **_COMMON,
            "expiry_warning": "seconds before a desired state's expiry at which it alerts",
            "role_warning": "on the key hierarchy: seconds before the fleet's signed desired role (7 days,"
            " re-signed by the fleet service at half) expires at which it alerts",
        },
    ),
    "freeze": RuleSpec(
        "a device on the key hierarchy raised freeze_suspected: the fleet's signed timestamp it holds"
        " expired and nothing fresh came (until it raises freeze_ended)",
        {"enabled": True, "hold": 0.0, "clear_after": 0.0},
        _COMMON,
    ),
    "old_root": RuleSpec(
        "an online device trusts an older root than its fleet's current one for longer than stuck_after",
        {"enabled": True, "stuck_after": 3600.0, "clear_after": 0.0},
        {**_COMMON, "stuck_after": "seconds an online device may stay on an older root before it alerts"},
    ),
    "trust_expiry": RuleSpec(
        "the signed timestamp that devices of a fleet applied expires within expiry_warning (or has"
        " expired): the fleet service did not re-sign it, or it does not reach them",
        {"enabled": True, "expiry_warning": 6 * 3600.0, "clear_after": 0.0},
        {**_COMMON, "expiry_warning": "seconds before a device's timestamp expires at which it alerts"},
    ),
    "channel": RuleSpec(
        "an alert channel has failed every delivery for failing_after",
        {"enabled": True, "failing_after": 600.0, "clear_after": 0.0},
        {**_COMMON, "failing_after": "seconds of failed deliveries before the channel alerts"},
    ),
}


def parse_setting(rule: str, key: str, value: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``edgekit alerts rule set``, typed like its default; ConfigError names
    what is wrong and what is accepted."""
    spec = RULES.get(rule)
    if spec is None:
        raise ConfigError(f"no alert rule {rule!r}; the rules are: {', '.join(RULES)}")
    if key not in spec.defaults:
        raise ConfigError(f"rule {rule} has no setting {key!r}; its settings are: {', '.join(spec.defaults)}")
    default = spec.defaults[key]
    text = value.strip().lower()
    if isinstance(default, str):
        choices = CHOICES.get((rule, key), ())
        if text not in choices:
            raise ConfigError(f"{rule} {key}={value}: use {' or '.join(choices)}")
        return key, text
    if isinstance(default, bool):
        if text in ("true", "yes", "on", "1"):
            return key, True
        if text in ("false", "no", "off", "0"):
            return key, False
        raise ConfigError(f"{rule} {key}={value}: use true or false")
    try:
        number = (
            float(text[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[text[-1]]
            if text[-1:] in "smhd"
            else float(text)
        )
    except (ValueError, KeyError):
        raise ConfigError(
            f"{rule} {key}={value}: use a number (seconds may end in s, m, h or d: 10m)"
        ) from None
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{rule} {key}={value}: use a number >= 0")
    return key, int(number) if isinstance(default, int) else number


def merged_settings(stored: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every rule's settings: the defaults, overridden by what the owner set."""
    return {name: {**spec.defaults, **stored.get(name, {})} for name, spec in RULES.items()}


@dataclass(frozen=True)
class DeviceFacts:
    id: str
    fleet: str
    online: bool
    status: str
    last_seen: datetime | None
    drifted: bool
    version: str | None = None
    #: "ok", "inputs changed" or "model affected" (None: an agent older than severities).
    drift_severity: str | None = None
    accuracy_estimate: float | None = None
    #: Over the rules' window: predictions, errors, worst p95, hottest temperature.
    count: int = 0
    errors: int = 0
    p95_ms: float | None = None
    temperature_c: float | None = None
    memory_used_percent: float | None = None
    disk_used_percent: float | None = None
    #: Under the TUF key hierarchy: the root version it trusts, when its timestamp expires.
    trust_root: int | None = None
    trust_expires: datetime | None = None


@dataclass(frozen=True)
class DesiredFacts:
    """The newest desired state of a fleet (``device`` None) or of one device, and which
    devices run by it: they serve its bundle and it is the newest they were sent."""

    fleet: str
    device: str | None
    label: str
    seq: int
    expires_at: datetime
    applied_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class EventFacts:
    device: str
    seq: int
    at: datetime
    kind: str
    message: str


@dataclass(frozen=True)
class RolloutFacts:
    fleet: str
    label: str
    phase: str
    phase_since: datetime
    started_at: datetime
    reason: str | None
    canaries: tuple[str, ...] = ()
    #: Seconds the current phase waits by design (a soak, a shadow phase): not a stall.
    planned_s: float = 0.0
    #: The newest progress a device of the rollout reported on its version (an event about
    #: that bundle since the rollout began), if any.
    progressed_at: datetime | None = None

    @property
    def quiet_since(self) -> datetime:
        """Since when nothing moved: the later of the last step (the phase's start, plus its
        planned wait) and the newest device progress."""
        moved = self.phase_since + timedelta(seconds=self.planned_s)
        if self.progressed_at is not None and self.progressed_at > moved:
            return self.progressed_at
        return moved


@dataclass(frozen=True)
class Snapshot:
    devices: Sequence[DeviceFacts] = ()
    #: The newest install-related event of each device (problem or fix), if any.
    install_events: Mapping[str, EventFacts] = field(default_factory=dict)
    rollouts: Sequence[RolloutFacts] = ()
    #: Per fleet over the last day: the average p95 (ms) of its telemetry windows and error rate.
    fleet_p95_ms: Mapping[str, float] = field(default_factory=dict)
    fleet_error_rate: Mapping[str, float] = field(default_factory=dict)
    #: Channels that fail: name -> since when.
    failing_channels: Mapping[str, datetime] = field(default_factory=dict)
    #: The newest desired states that devices run by.
    desired: Sequence[DesiredFacts] = ()
    #: The newest freeze event (freeze_suspected or freeze_ended) of each device, if any.
    freeze_events: Mapping[str, EventFacts] = field(default_factory=dict)
    #: Each fleet with a trust repository: its current root version.
    trust_roots: Mapping[str, int] = field(default_factory=dict)
    #: Each fleet with a trust repository: when its signed desired role expires, and its version.
    trust_desired: Mapping[str, tuple[datetime, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Condition:
    """One problem that holds now. ``since``: when it began; ``origin`` tells apart two
    different occurrences (another event, another rollout) of the same rule and subject."""

    rule: str
    subject: str
    since: datetime
    fleet: str | None = None
    device: str | None = None
    origin: str | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.rule, self.subject)


def drift_flagged(device: DeviceFacts, on: str = "model-affected") -> bool:
    """Whether the drift rule sees a problem on ``device``: by default (``on`` model-affected)
    its model is likely affected (severity ``model affected``), not merely its inputs changed;
    with ``on`` inputs-changed, any severity but ``ok``. An agent too old to report a severity
    is judged by its drift flag."""
    if device.drift_severity is None:
        return device.drifted
    if on == "inputs-changed":
        return device.drift_severity in ("inputs changed", "model affected")
    return device.drift_severity == "model affected"


def evaluate(snapshot: Snapshot, settings: Mapping[str, Mapping[str, Any]], now: datetime) -> list[Condition]:
    """Every condition of every enabled rule that holds at ``now``."""
    found: list[Condition] = []
    on = {name: bool(settings[name]["enabled"]) for name in RULES}
    for d in snapshot.devices:
        seen = d.last_seen or now
        base: dict[str, Any] = {"version": d.version, "last_seen": seen.isoformat()}
        if on["offline"] and not d.online:
            # Since now: the first round that sees it offline starts the clock. (last_seen is
            # when it last said something, which for an idle device can be long before it
            # went away: an MQTT will carries the time the device connected.)
            found.append(Condition("offline", d.id, now, d.fleet, d.id, facts=base))
        if on["drift"] and drift_flagged(d, str(settings["drift"].get("on", "model-affected"))):
            drift = {**base, "severity": d.drift_severity, "accuracy": d.accuracy_estimate}
            found.append(Condition("drift", d.id, now, d.fleet, d.id, facts=drift))
        event = snapshot.install_events.get(d.id)
        if on["install"] and event is not None and event.kind in INSTALL_PROBLEMS:
            found.append(
                Condition(
                    "install",
                    d.id,
                    event.at,
                    d.fleet,
                    d.id,
                    f"event:{event.seq}",
                    {**base, "event": event.kind, "message": event.message},
                )
            )
        found.extend(_performance(d, snapshot, settings, on, now, base))
        found.extend(_trust(d, snapshot, on, now, base))
    if on["trust_expiry"]:
        found.extend(_trust_expiring(snapshot, settings["trust_expiry"], now))
    facts: dict[str, Any]
    for r in snapshot.rollouts:
        if not on["rollout"]:
            break
        facts = {
            "label": r.label,
            "phase": r.phase,
            "reason": r.reason,
            "canaries": list(r.canaries),
        }
        origin = f"rollout:{r.started_at.timestamp():.0f}"
        if r.phase == "aborted":
            found.append(
                Condition("rollout", f"fleet:{r.fleet}", r.phase_since, r.fleet, None, origin, facts)
            )
        elif r.phase != "done":
            stall = timedelta(seconds=float(settings["rollout"]["stall_after"]))
            quiet = r.quiet_since
            if now - quiet >= stall:
                facts = {**facts, "stalled": True, "quiet_since": quiet.isoformat()}
                found.append(Condition("rollout", f"fleet:{r.fleet}", quiet, r.fleet, None, origin, facts))
    if on["expiry"]:
        warning = timedelta(seconds=float(settings["expiry"]["expiry_warning"]))
        # A device on the key hierarchy does not check a desired state's own expires_at: what
        # expires for it is the fleet's desired role (7 days, re-signed by the fleet service).
        tuf = {d.id for d in snapshot.devices if d.trust_root is not None}
        for desired in snapshot.desired:
            applied = tuple(d for d in desired.applied_by if d not in tuf)
            if applied and desired.expires_at - now <= warning:
                found.append(_expiring(replace(desired, applied_by=applied), now))
        role_warning = timedelta(seconds=float(settings["expiry"]["role_warning"]))
        found.extend(_desired_role_expiring(snapshot, role_warning, now))
    if on["channel"]:
        after = timedelta(seconds=float(settings["channel"]["failing_after"]))
        for name, since in snapshot.failing_channels.items():
            if now - since >= after:
                found.append(Condition("channel", f"channel:{name}", since, facts={"channel": name}))
    return found


def _performance(
    d: DeviceFacts,
    snapshot: Snapshot,
    settings: Mapping[str, Mapping[str, Any]],
    on: Mapping[str, bool],
    now: datetime,
    base: Mapping[str, Any],
) -> list[Condition]:
    found = []
    latency, errors, board = settings["latency"], settings["errors"], settings["board"]
    level = snapshot.fleet_p95_ms.get(d.fleet)
    slow = d.p95_ms is not None and level and d.p95_ms >= float(latency["ratio"]) * level
    if on["latency"] and slow and d.count >= int(latency["min_samples"]):
        facts = {**base, "p95_ms": round(d.p95_ms or 0.0, 1), "fleet_p95_ms": round(level or 0.0, 1)}
        found.append(Condition("latency", d.id, now, d.fleet, d.id, facts=facts))
    rate_level = snapshot.fleet_error_rate.get(d.fleet)
    if on["errors"] and d.count >= int(errors["min_samples"]) and rate_level is not None:
        rate = d.errors / d.count
        if rate >= float(errors["min_rate"]) and rate >= float(errors["ratio"]) * rate_level:
            facts = {**base, "error_rate": round(rate, 4), "fleet_error_rate": round(rate_level, 4)}
            found.append(Condition("errors", d.id, now, d.fleet, d.id, facts=facts))
    if on["board"] and d.temperature_c is not None and d.temperature_c >= float(board["max_temperature_c"]):
        facts = {**base, "temperature_c": round(d.temperature_c, 1)}
        found.append(Condition("board", d.id, now, d.fleet, d.id, facts=facts))
    # Memory and disk are alerts of their own (subject DEVICE/memory, DEVICE/disk): a device can
    # be hot and full at once, and each clears on its own.
    for part, used, limit in (
        ("memory", d.memory_used_percent, board["max_memory_percent"]),
        ("disk", d.disk_used_percent, board["max_disk_percent"]),
    ):
        if on["board"] and used is not None and used >= float(limit):
            facts = {**base, "part": part, "used_percent": round(used, 1)}
            found.append(Condition("board", f"{d.id}/{part}", now, d.fleet, d.id, facts=facts))
    return found


def _trust(
    d: DeviceFacts, snapshot: Snapshot, on: Mapping[str, bool], now: datetime, base: Mapping[str, Any]
) -> list[Condition]:
    """The freeze and old-root conditions of device ``d``."""
    found = []
    event = snapshot.freeze_events.get(d.id)
    if on["freeze"] and event is not None and event.kind == "freeze_suspected":
        facts = {
            **base,
            "fleet": d.fleet,
            "message": event.message,
            "trust_expires": d.trust_expires.isoformat() if d.trust_expires else None,
        }
        found.append(Condition("freeze", d.id, event.at, d.fleet, d.id, f"event:{event.seq}", facts))
    current = snapshot.trust_roots.get(d.fleet)
    # Online only: an offline device cannot catch up (the offline rule speaks for it), and it
    # walks the chain of roots within seconds of reconnecting. Since now, like offline: the
    # first round that sees it behind starts the clock of stuck_after.
    if (
        on["old_root"]
        and d.online
        and current is not None
        and d.trust_root is not None
        and d.trust_root < current
    ):
        facts = {**base, "fleet": d.fleet, "trust_root": d.trust_root, "fleet_root": current}
        found.append(Condition("old_root", d.id, now, d.fleet, d.id, f"root:{current}", facts))
    return found


def _trust_expiring(snapshot: Snapshot, settings: Mapping[str, Any], now: datetime) -> list[Condition]:
    """One condition per fleet whose online devices' timestamps expire within ``expiry_warning``,
    naming those devices (the timestamp is the fleet's: one alert, not one per device)."""
    warning = timedelta(seconds=float(settings["expiry_warning"]))
    by_fleet: dict[str, list[DeviceFacts]] = {}
    for d in snapshot.devices:
        # Online only: an offline device cannot take fresh metadata (the offline rule speaks
        # for it), and what it reported before it went away expires as it stays off.
        if d.online and d.trust_expires is not None and d.trust_expires - now <= warning:
            by_fleet.setdefault(d.fleet, []).append(d)
    found = []
    for fleet, devices in sorted(by_fleet.items()):
        first = min(d.trust_expires for d in devices if d.trust_expires is not None)
        facts = {
            "fleet": fleet,
            "devices": sorted(d.id for d in devices),
            "expires_at": first.isoformat(),
            "expired": first <= now,
        }
        found.append(Condition("trust_expiry", f"trust:{fleet}", now, fleet, None, facts=facts))
    return found


def _desired_role_expiring(snapshot: Snapshot, warning: timedelta, now: datetime) -> list[Condition]:
    """One condition per fleet whose signed desired role (its trust repository's) expires within
    ``warning`` while devices on the key hierarchy run by it; a new version is a new occurrence."""
    found = []
    for fleet, (expires, version) in sorted(snapshot.trust_desired.items()):
        devices = sorted(d.id for d in snapshot.devices if d.fleet == fleet and d.trust_root is not None)
        if not devices or expires - now > warning:
            continue
        labels = [d.label for d in snapshot.desired if d.fleet == fleet and d.device is None]
        facts = {
            "fleet": fleet,
            "label": labels[0] if labels else "what they run",
            "expires_at": expires.isoformat(),
            "expired": expires <= now,
            "devices": devices,
            "role": "desired",
        }
        subject = f"desired-role:{fleet}"
        found.append(Condition("expiry", subject, now, fleet, None, f"desired-role:{version}", facts))
    return found


def _expiring(desired: DesiredFacts, now: datetime) -> Condition:
    """One alert per desired state: the fleet's (for every device that runs by it) or a
    device's own; a new desired state (another seq) is another occurrence."""
    facts = {
        "fleet": desired.fleet,
        "label": desired.label,
        "expires_at": desired.expires_at.isoformat(),
        "expired": desired.expires_at <= now,
        "devices": list(desired.applied_by),
    }
    origin = f"desired:{desired.seq}"
    if desired.device is None:
        subject = f"fleet:{desired.fleet}"
        return Condition("expiry", subject, now, desired.fleet, None, origin, facts)
    return Condition("expiry", desired.device, now, desired.fleet, desired.device, origin, facts)
