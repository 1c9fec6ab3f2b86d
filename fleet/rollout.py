"""Canary rollouts as a pure state machine.

A rollout moves one fleet to one bundle: first to a few canary devices, which then soak (serve
real traffic for a while), then to the whole fleet. With a shadow phase (``push --canary N
--shadow-first 15m``, docs/shadow.md) the canaries first try the bundle in the shadow of the
one they serve, and only when their shadow figures pass (:func:`edgekit.fleet.shadow.judge`:
agreement, latency, candidate failures, drift) do they install it; otherwise the rollout aborts
naming the canary and the figure, and nothing was switched anywhere. It aborts on a canary's failed install or
health check, on a canary's error rate or p95-latency regression beyond the policy's bounds,
on drift that affects the model (severity ``model affected``; ``inputs changed`` does not
abort; an agent without severities aborts on any drift), or on a canary that does not install
in time; an abort rolls the canaries back.

The controller never talks to a broker. :func:`start` and :func:`advance` take what is known
about the devices (:class:`DeviceReport`) and the time, and return the new :class:`Rollout`
and the :class:`Action` s to carry out (publish a signed desired state for a device or for the
fleet). The caller publishes them, saves the rollout (:meth:`Rollout.save`, atomic), and calls
:func:`advance` again when something changes; so a rollout survives the workstation crashing
or sleeping: load it and advance.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgekit.atomic import atomic_write
from edgekit.desired import LONGEST_S, ShadowRequest
from edgekit.errors import ConfigError

from .shadow import judge

__all__ = [
    "Action",
    "DeviceReport",
    "Rollout",
    "RolloutPolicy",
    "abort",
    "advance",
    "choose_devices",
    "phase_deadline",
    "start",
]

ROLLOUT_SCHEMA = "edgekit.rollout"
ROLLOUT_SCHEMA_VERSION = 1

SHADOW = "shadow"  # the canaries try the bundle in the shadow of the one they serve
CANARY = "canary"  # waiting for the canaries to serve the new bundle
SOAK = "soak"  # canaries serve it; watching them
FLEET = "fleet"  # the whole fleet was told; waiting for every device
DONE = "done"
ABORTED = "aborted"
FINISHED = (DONE, ABORTED)


@dataclass(frozen=True)
class RolloutPolicy:
    canary: int = 1
    soak_s: float = 60.0
    install_timeout_s: float = 600.0
    max_error_rate: float = 0.05
    max_p95_regression: float = 0.5  # abort if a canary's p95 exceeds its pre-rollout p95 by 50 %
    abort_on_drift: bool = True
    min_samples: int = 20  # predictions a canary must serve (or compare in the shadow) before they are judged
    # The shadow phase (0: none): seconds the canaries try the bundle in the shadow first, the
    # share of their live inputs compared, and what their figures must reach to go on.
    shadow_s: float = 0.0
    shadow_sample: float = 0.1
    min_agreement: float = 0.98
    max_latency_ratio: float = 1.2
    #: The largest absolute difference allowed between the two models' outputs (dequantized),
    #: or None: not judged. Outputs that are not classes can only be judged by it: without it
    #: their shadow phase does not pass (edgekit.fleet.shadow.judge).
    max_error: float | None = None

    def __post_init__(self) -> None:
        if max(self.soak_s, self.install_timeout_s, self.shadow_s) > LONGEST_S:
            raise ConfigError(
                f"rollout policy: the soak, the timeout and the shadow phase may each last at most "
                f"{LONGEST_S // 86400} days"
            )
        if self.max_error is not None and not self.max_error >= 0:
            raise ConfigError("rollout policy: the max output error must be 0 or more")
        if self.canary < 0 or self.soak_s < 0 or self.install_timeout_s <= 0:
            raise ConfigError("rollout policy: canary and soak must be >= 0 and the install timeout > 0")
        if self.shadow_s < 0 or not 0 < self.shadow_sample <= 1:
            raise ConfigError("rollout policy: the shadow phase must be >= 0 s and its sample within 0..1")
        if not 0 <= self.min_agreement <= 1 or self.max_latency_ratio < 0:
            raise ConfigError("rollout policy: min agreement must be within 0..1 and the latency ratio >= 0")
        if self.shadow_s and not self.canary:
            raise ConfigError("rollout policy: a shadow phase needs at least one canary")
        if not 0 <= self.max_error_rate <= 1 or self.max_p95_regression < 0:
            raise ConfigError(
                "rollout policy: max error rate must be within 0..1 and the p95 regression >= 0"
            )


@dataclass(frozen=True)
class DeviceReport:
    """What is known of one device now. Counts cover the windows since it began serving
    the rollout's bundle (the caller resets them when the device switches bundles)."""

    device: str
    online: bool = True
    bundle_id: str | None = None  # the bundle it serves
    failed_bundle_id: str | None = None  # a bundle whose install or health check failed
    reason: str | None = None
    count: int = 0
    errors: int = 0
    p95_ms: float | None = None
    drifted: bool = False
    #: The worst drift severity reported (ok / inputs changed / model affected); None when the
    #: device's agent does not judge severity (then ``drifted`` decides).
    drift_severity: str | None = None
    #: In the shadow phase: this device's shadow figures of the rollout's bundle since the
    #: phase began (one ``devices`` entry of :func:`edgekit.fleet.shadow.summarize`), or None.
    shadow: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Action:
    """Publish a desired state naming ``bundle_id``, for one device or (``device`` None) the
    fleet; with ``shadow``, asking it to try that candidate beside ``bundle_id``."""

    bundle_id: str
    device: str | None = None
    shadow: ShadowRequest | None = None


@dataclass(frozen=True)
class Rollout:
    fleet: str
    bundle_id: str
    label: str  # name@version, for people
    previous_bundle_id: str | None
    devices: tuple[str, ...]
    canaries: tuple[str, ...]
    phase: str
    phase_since: float
    started_at: float
    baseline_p95_ms: Mapping[str, float] = field(default_factory=dict)
    failed: Mapping[str, str] = field(default_factory=dict)  # device -> why
    reason: str | None = None
    policy: Mapping[str, Any] = field(default_factory=dict)  # the RolloutPolicy it runs under

    @property
    def rollout_policy(self) -> RolloutPolicy:
        return RolloutPolicy(**self.policy)

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    def to_json(self) -> bytes:
        doc = {"schema": ROLLOUT_SCHEMA, "schema_version": ROLLOUT_SCHEMA_VERSION, **asdict(self)}
        doc["baseline_p95_ms"] = dict(self.baseline_p95_ms)
        doc["failed"] = dict(self.failed)
        doc["policy"] = dict(self.policy)
        return (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, source: str = "rollout state") -> Rollout:
        try:
            doc: dict[str, Any] = json.loads(data)
            if doc.pop("schema") != ROLLOUT_SCHEMA or doc.pop("schema_version") != ROLLOUT_SCHEMA_VERSION:
                raise ValueError("not an edgekit rollout of a supported version")
            doc["devices"] = tuple(doc["devices"])
            doc["canaries"] = tuple(doc["canaries"])
            rollout = cls(**doc)
            if rollout.phase not in (SHADOW, CANARY, SOAK, FLEET, DONE, ABORTED):
                raise ValueError(f"unknown phase {rollout.phase!r}")
            return rollout
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigError(f"{source} is corrupt ({exc}); `edgekit rollout abort` starts over") from None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> Rollout:
        try:
            return cls.from_json(path.read_bytes(), str(path))
        except FileNotFoundError:
            raise ConfigError(
                f"no rollout saved at {path}; start one with `edgekit push --canary N`"
            ) from None


def choose_devices(reports: Sequence[DeviceReport], count: int) -> list[str]:
    """``count`` devices, as canaries are chosen: online ones first, then by name."""
    ordered = sorted(reports, key=lambda r: (not r.online, r.device))
    return [r.device for r in ordered[:count]]


def start(
    fleet: str,
    bundle_id: str,
    label: str,
    reports: Sequence[DeviceReport],
    previous_bundle_id: str | None,
    policy: RolloutPolicy,
    now: float,
) -> tuple[Rollout, list[Action]]:
    """Begin a rollout: the canaries (online devices first, by name) are told first; with no
    canary the whole fleet is told at once."""
    canaries = tuple(choose_devices(reports, policy.canary))
    shadow_first = bool(canaries and policy.shadow_s)
    if shadow_first and previous_bundle_id is None:
        raise ConfigError(
            f"fleet {fleet} serves nothing yet: a shadow phase compares {label} with the bundle the "
            "fleet serves; push one first (or push without --shadow-first)"
        )
    rollout = Rollout(
        fleet=fleet,
        bundle_id=bundle_id,
        label=label,
        previous_bundle_id=previous_bundle_id,
        devices=tuple(sorted(r.device for r in reports)),
        canaries=canaries,
        phase=SHADOW if shadow_first else CANARY if canaries else FLEET,
        phase_since=now,
        started_at=now,
        baseline_p95_ms={r.device: r.p95_ms for r in reports if r.p95_ms is not None},
        policy=asdict(policy),
    )
    if not canaries:
        return rollout, [Action(bundle_id)]
    if shadow_first:
        return rollout, _shadow_actions(rollout, policy, now)
    return rollout, [Action(bundle_id, device) for device in canaries]


def _shadow_actions(rollout: Rollout, policy: RolloutPolicy, now: float) -> list[Action]:
    """Each canary: keep serving the previous bundle, try the rollout's beside it. The shadow
    lasts as long as the phase may (its time, then the install timeout to gather enough)."""
    assert rollout.previous_bundle_id is not None
    name, _, version = rollout.label.rpartition("@")
    request = ShadowRequest(
        rollout.bundle_id,
        name,
        version,
        policy.shadow_sample,
        int(now + policy.shadow_s + policy.install_timeout_s) + 1,
    )
    return [Action(rollout.previous_bundle_id, device, request) for device in rollout.canaries]


#: Seconds a driver waits beyond a phase's own timeout, so that the controller's own verdict
#: (abort, late devices) is what ends the phase, not the driver giving up a moment before it.
DEADLINE_GRACE_S = 5.0


def phase_deadline(rollout: Rollout, policy: RolloutPolicy, timeout: float, since: float) -> float:
    """When a driver following ``rollout`` (``push --wait``, ``rollout resume``) gives up on its
    current phase: ``timeout`` seconds after the phase's own time is up (the shadow phase's
    length, the soak; none for the others), counted from ``since`` (when the drive began) at the
    earliest. So ``--timeout`` applies per phase, and a 15 min shadow phase is waited out."""
    own = policy.shadow_s if rollout.phase == SHADOW else policy.soak_s if rollout.phase == SOAK else 0.0
    return max(since, rollout.phase_since + own) + timeout + DEADLINE_GRACE_S


def abort(rollout: Rollout, reason: str, now: float) -> tuple[Rollout, list[Action]]:
    """Stop the rollout and send the canaries back to the previous bundle (a new, higher-
    numbered desired state each: a device never goes back to an older document)."""
    if rollout.finished:
        return rollout, []
    previous = rollout.previous_bundle_id
    if previous is None:  # a first rollout has nothing to go back to
        actions = []
    elif rollout.phase == FLEET:  # the fleet was told: tell it again, with a higher number
        actions = [Action(previous)]
    else:
        actions = [Action(previous, device) for device in rollout.canaries]
    return replace(rollout, phase=ABORTED, phase_since=now, reason=reason), actions


def _canary_problem(rollout: Rollout, report: DeviceReport, policy: RolloutPolicy) -> str | None:
    if report.failed_bundle_id == rollout.bundle_id:
        return (
            f"canary {report.device} failed to install {rollout.label}: {report.reason or 'no reason given'}"
        )
    if report.bundle_id != rollout.bundle_id:
        return None
    if policy.abort_on_drift and report.drift_severity == "model affected":
        return f"canary {report.device}: drift has affected the model on {rollout.label}"
    if policy.abort_on_drift and report.drift_severity is None and report.drifted:
        # An agent that does not judge severity: any drift counts.
        return f"canary {report.device} reports input drift on {rollout.label}"
    if report.count >= policy.min_samples:
        rate = report.errors / report.count
        if rate > policy.max_error_rate:
            return (
                f"canary {report.device} error rate {rate:.1%} exceeds {policy.max_error_rate:.1%} "
                f"on {rollout.label}"
            )
        before = rollout.baseline_p95_ms.get(report.device)
        if before and report.p95_ms is not None and report.p95_ms > before * (1 + policy.max_p95_regression):
            return (
                f"canary {report.device} p95 latency {report.p95_ms:.1f} ms is more than "
                f"{policy.max_p95_regression:.0%} above its {before:.1f} ms before {rollout.label}"
            )
    return None


def _shadow_step(
    rollout: Rollout, by_device: Mapping[str, DeviceReport], policy: RolloutPolicy, now: float
) -> tuple[Rollout, list[Action]]:
    """The shadow phase: abort at once when the candidate fails on a canary; once the phase's
    time is up, abort as soon as a canary that compared ``min_samples`` inputs fails a figure;
    when every canary compared that many (or the install timeout more passed), judge their
    figures: install on the canaries, or abort saying which canary failed which figure."""
    empty: Mapping[str, Any] = {}
    figures = {d: (by_device.get(d) or DeviceReport(d)).shadow for d in rollout.canaries}
    for device, fig in figures.items():
        if fig is not None and fig.get("state") == "failed":
            return abort(
                rollout,
                f"in the shadow phase, canary {device}: the candidate {rollout.label} failed there "
                f"({fig.get('error') or 'no reason given'})",
                now,
            )
    elapsed = now - rollout.phase_since
    if elapsed < policy.shadow_s:
        return rollout, []
    short = [d for d, fig in figures.items() if (fig or empty).get("compared", 0) < policy.min_samples]
    reported = [fig for d, fig in figures.items() if fig is not None and d not in short]
    judged = [
        f"canary {r}"
        for r in (
            judge({"devices": reported}, policy.min_agreement, policy.max_latency_ratio, policy.max_error)
            if reported
            else []
        )
    ]
    if short and not judged and elapsed <= policy.shadow_s + policy.install_timeout_s:
        # Enough time, not yet enough inputs, and no canary judged has failed: wait for them
        # (up to the timeout). One that has failed ends the phase now: waiting changes nothing.
        return rollout, []
    reasons = [
        f"canary {d} compared {(figures[d] or empty).get('compared', 0)} input(s), fewer than the "
        f"{policy.min_samples} needed to judge (is it serving requests? did it refuse the shadow?)"
        for d in short
        if not judged  # a failure decided it: the short ones were not waited for
    ] + judged
    if reasons:
        return abort(rollout, f"in the shadow phase, {rollout.label} did not pass: {'; '.join(reasons)}", now)
    return replace(rollout, phase=CANARY, phase_since=now), [
        Action(rollout.bundle_id, device) for device in rollout.canaries
    ]


def advance(
    rollout: Rollout, reports: Sequence[DeviceReport], policy: RolloutPolicy, now: float
) -> tuple[Rollout, list[Action]]:
    """One step: look at the devices, move the rollout on, say what to publish."""
    if rollout.finished:
        return rollout, []
    by_device = {r.device: r for r in reports}
    if rollout.phase == SHADOW:
        return _shadow_step(rollout, by_device, policy, now)
    if rollout.phase in (CANARY, SOAK):
        for device in rollout.canaries:
            report = by_device.get(device, DeviceReport(device, online=False))
            problem = _canary_problem(rollout, report, policy)
            if problem is None and rollout.phase == SOAK and report.bundle_id != rollout.bundle_id:
                problem = f"canary {device} stopped serving {rollout.label} during the soak"
            if problem:
                return abort(rollout, problem, now)
        serving = all(
            by_device.get(d, DeviceReport(d)).bundle_id == rollout.bundle_id for d in rollout.canaries
        )
        if rollout.phase == CANARY:
            if serving:
                return replace(rollout, phase=SOAK, phase_since=now), []
            if now - rollout.phase_since > policy.install_timeout_s:
                late = [
                    d
                    for d in rollout.canaries
                    if by_device.get(d, DeviceReport(d)).bundle_id != rollout.bundle_id
                ]
                return abort(
                    rollout,
                    f"canary {', '.join(late)} did not serve {rollout.label} within "
                    f"{policy.install_timeout_s:.0f} s",
                    now,
                )
            return rollout, []
        if now - rollout.phase_since >= policy.soak_s:
            return replace(rollout, phase=FLEET, phase_since=now), [Action(rollout.bundle_id)]
        return rollout, []
    # FLEET: every device was told; collect who serves, who failed, who is late.
    failed = dict(rollout.failed)
    for device in rollout.devices:
        seen = by_device.get(device)
        if seen is not None and seen.failed_bundle_id == rollout.bundle_id and device not in failed:
            failed[device] = seen.reason or "install failed"
    pending = [
        d
        for d in rollout.devices
        if d not in failed and by_device.get(d, DeviceReport(d)).bundle_id != rollout.bundle_id
    ]
    if not pending:
        reason = None if not failed else f"{len(failed)} device(s) failed: {', '.join(sorted(failed))}"
        return replace(rollout, phase=DONE, phase_since=now, failed=failed, reason=reason), []
    if now - rollout.phase_since > policy.install_timeout_s:
        failed.update({d: "timed out" for d in pending})
        return replace(
            rollout,
            phase=DONE,
            phase_since=now,
            failed=failed,
            reason=f"{len(failed)} device(s) failed or timed out: {', '.join(sorted(failed))}",
        ), []
    return replace(rollout, failed=failed), []
