"""What an operator can do to a fleet, once: the CLI (on its own registry), the fleet service's
API (for ``--server`` and the dashboard) and tests all call these.

Each takes the fleet's driving lock (waiting up to :data:`LOCK_WAIT` seconds), changes the
rollout in the control plane, publishes what that asks for, and lands in the audit log with how
it ended. :func:`pushing` and :func:`rolling_back` are context managers: the rollout has
started when the block begins, and the lock is held until it ends, so ``push --wait`` can drive
the rollout to its end under the same lock; the API returns at once and leaves the rest to the
rollout controller.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

from edgekit.bundle import Bundle
from edgekit.desired import ShadowRequest
from edgekit.errors import ConfigError, EdgekitError, PromotionRefusedError, RolloutError

from .control import ControlPlane
from .push import FleetLink, begin_rollout, labels_of, step_rollout
from .rollout import SHADOW, Rollout, RolloutPolicy, abort, choose_devices
from .shadow import judge
from .trustrepo import require_authorised

__all__ = [
    "LOCK_WAIT",
    "abort_rollout",
    "audited",
    "previous_bundle",
    "promote_shadow",
    "pushing",
    "resume_rollout",
    "resuming",
    "rollback_device",
    "rolling_back",
    "shadow_devices",
    "shadow_verdict",
    "start_shadow",
    "stop_shadow",
]

# Seconds to wait for a fleet's driving lock: the rollout controller holds it for one step at a
# time; `push --wait` and `rollout resume` hold it until they are done.
LOCK_WAIT = 15.0


@contextmanager
def audited(control: ControlPlane, action: str, fleet: str, target: Optional[str] = None) -> Iterator[None]:
    """Record ``action`` in the audit log with how it ended (the one-line error when it failed)."""
    try:
        yield
    except EdgekitError as exc:
        control.audit(action, fleet=fleet, target=target, result="failed", detail=str(exc))
        raise
    except BaseException:
        control.audit(action, fleet=fleet, target=target, result="interrupted")
        raise
    control.audit(action, fleet=fleet, target=target)


@contextmanager
def pushing(
    control: ControlPlane,
    link: FleetLink,
    bundle: Bundle,
    policy: RolloutPolicy,
    holder: str,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Iterator[tuple[Rollout, dict[str, str]]]:
    """Start a rollout of ``bundle`` to ``link``'s fleet: manifest, desired state(s), then the
    chunks (devices fetch while they are published). Refused (RolloutError) while another
    operator's rollout of the fleet is unfinished."""
    fleet = link.fleet
    with (
        audited(control, "push", fleet, bundle.manifest.label),
        control.driving(fleet, holder, wait=LOCK_WAIT),
    ):
        control.refuse_if_busy(fleet)
        link.record = control.record(fleet)  # as the last driver left it
        if policy.shadow_s and link.record.bundle_id in (None, bundle.bundle_id):
            raise RolloutError(
                f"fleet {fleet} serves nothing else yet: a shadow phase compares {bundle.manifest.label} "
                "with the bundle the fleet serves; push that first, or push without --shadow-first"
            )
        upload = link.start_upload(bundle)
        rollout, labels = begin_rollout(link, bundle, policy)
        if rollout.phase == SHADOW:  # `shadow status` shows the canaries' figures
            control.save_shadow_asked(fleet, bundle.bundle_id, list(rollout.canaries))
        upload.finish(progress=progress)
        yield rollout, labels


def previous_bundle(control: ControlPlane, fleet: str, to: Optional[str]) -> Bundle:
    """The bundle ``fleet rollback`` goes back to: ``to`` (VERSION of the current bundle's name,
    or NAME@VERSION), else the one the fleet ran before the current one."""
    record = control.record(fleet)
    if to is None:
        previous = record.previous()
        if previous is None:
            raise RolloutError(f"fleet {fleet} has no earlier bundle on record; name one with --to VERSION")
        bundle = control.catalog.find(previous["id"])
        if bundle is None:
            raise RolloutError(
                f"{previous['label']} is not in the catalog any more; name a version with --to"
            )
        return bundle
    if not record.label:
        raise RolloutError(f"nothing was pushed to fleet {fleet} yet; push a bundle first")
    name, _, version = to.rpartition("@")
    return control.catalog.read(name or record.label.partition("@")[0], version)


@contextmanager
def rolling_back(
    control: ControlPlane, link: FleetLink, bundle: Bundle, timeout: float, holder: str
) -> Iterator[tuple[Rollout, dict[str, str]]]:
    """Send the whole fleet back to ``bundle`` (a new, higher-numbered desired state), its
    chunks published again in case they were cleared. Never refused for another operator's
    rollout: this is how a bad one is stopped."""
    fleet = link.fleet
    with (
        audited(control, "rollback", fleet, bundle.manifest.label),
        control.driving(fleet, holder, wait=LOCK_WAIT),
    ):
        link.record = control.record(fleet)
        upload = link.start_upload(bundle)
        rollout, labels = begin_rollout(link, bundle, RolloutPolicy(canary=0, install_timeout_s=timeout))
        upload.finish()
        yield rollout, labels


def rollback_device(control: ControlPlane, link: FleetLink, device: str, bundle: Bundle, holder: str) -> int:
    """Send one device of ``link``'s fleet back to ``bundle``: a signed desired state for it
    alone (numbered above the fleet's, so it stays on ``bundle`` until the next push to the
    fleet), its chunks published again in case they were cleared. Returns its seq; ConfigError
    if the fleet has no such device (call ``link.discover()`` first)."""
    fleet = link.fleet
    with (
        audited(control, "device-rollback", fleet, f"{device}: {bundle.manifest.label}"),
        control.driving(fleet, holder, wait=LOCK_WAIT),
    ):
        if device not in link.states:
            heard = ", ".join(sorted(link.states)) or "none"
            raise ConfigError(f"fleet {fleet} has no device {device} (devices heard from: {heard})")
        link.record = control.record(fleet)
        upload = link.start_upload(bundle)
        seq = link.desire(bundle.bundle_id, bundle.manifest.name, bundle.manifest.version, device=device)
        upload.finish()
    return seq


@contextmanager
def resuming(control: ControlPlane, link: FleetLink, holder: str) -> Iterator[Rollout]:
    """Take the fleet's unfinished rollout one step on now, with what the devices say (their
    retained states, heard afresh by ``link.discover()``): what the rollout controller does each
    round. The block begins after that step, holding the fleet's driving lock, so ``rollout
    resume`` drives the rollout on to its end under it; the audit entry is written when the
    block ends, with how it ended. RolloutError if the rollout is finished."""
    fleet = link.fleet
    rollout = control.rollout(fleet)
    with (
        audited(control, "rollout-resume", fleet, rollout.label),
        control.driving(fleet, holder, wait=LOCK_WAIT),
    ):
        rollout = control.rollout(fleet)  # as the last driver left it
        if rollout.finished:
            raise RolloutError(f"the rollout of {rollout.label} to fleet {fleet} is already {rollout.phase}")
        link.record = control.record(fleet)
        link.watch_telemetry_of(rollout.bundle_id)
        yield step_rollout(link, rollout, rollout.rollout_policy, labels_of(rollout, link.record))


def resume_rollout(control: ControlPlane, link: FleetLink, holder: str) -> Rollout:
    """:func:`resuming` for one step (the dashboard's "Resume now"); the rollout controller
    takes it on from there."""
    with resuming(control, link, holder) as rollout:
        return rollout


def abort_rollout(control: ControlPlane, link: FleetLink, holder: str) -> Rollout:
    """Stop the fleet's rollout and send the devices it reached back to the previous bundle."""
    fleet = link.fleet
    rollout = control.rollout(fleet)
    with (
        audited(control, "rollout-abort", fleet, rollout.label),
        control.driving(fleet, holder, wait=LOCK_WAIT),
    ):
        rollout = control.rollout(fleet)  # as the last driver left it
        link.record = control.record(fleet)
        rollout, actions = abort(rollout, f"aborted by {control.actor}", time.time())
        link.carry_out(actions, labels_of(rollout, link.record))
        control.save_rollout(rollout)
    return rollout


def _serving(control: ControlPlane, link: FleetLink) -> tuple[str, str, str]:
    """The bundle the fleet was last told to run: (id, name, version); RolloutError if none."""
    link.record = control.record(link.fleet)
    record = link.record
    if record.bundle_id is None or not record.label:
        raise RolloutError(
            f"nothing was pushed to fleet {link.fleet} yet: a shadow compares a candidate with the model "
            "the fleet serves; push a bundle first"
        )
    name, _, version = record.label.rpartition("@")
    return record.bundle_id, name, version


def shadow_devices(
    link: FleetLink, count: Optional[int] = None, names: Sequence[str] = ()
) -> Optional[list[str]]:
    """The devices of ``link``'s fleet to ask to try a candidate (``push --shadow --devices N``
    or ``--device D``): ``count`` of the known devices, chosen like canaries (online ones first,
    by name), or the ``names`` given; None: every device. ConfigError for a device the fleet
    does not have or more devices than it has (call ``link.discover()`` first)."""
    fleet = link.fleet
    heard = sorted(link.states)
    if names:
        unknown = sorted(set(names) - set(heard))
        if unknown:
            raise ConfigError(
                f"fleet {fleet} has no device {', '.join(unknown)} (devices heard from: "
                f"{', '.join(heard) or 'none'}); name devices of the fleet with --device"
            )
        return sorted(set(names))
    if count is None:
        return None
    if count > len(heard):
        raise ConfigError(
            f"--devices {count} asks for more devices than fleet {fleet} has ({len(heard)} heard from); "
            f"give at most {len(heard)}"
        )
    return sorted(choose_devices(link.reports(), count))


def start_shadow(
    control: ControlPlane,
    link: FleetLink,
    candidate: Bundle,
    sample: float,
    duration_s: float,
    holder: str,
    devices: Optional[Sequence[str]] = None,
) -> int:
    """Ask the fleet (or only ``devices`` of it: :func:`shadow_devices`) to try ``candidate``
    in the shadow of the bundle it serves for ``duration_s`` seconds on a ``sample`` share of
    live inputs (docs/shadow.md): the candidate's chunks, then a desired state naming the served
    bundle with a shadow section. Nothing is installed; no request is answered by the
    candidate. Returns the desired state's seq. Refused (RolloutError) while a rollout is
    unfinished, or when nothing was pushed yet."""
    fleet = link.fleet
    with (
        audited(control, "shadow", fleet, candidate.manifest.label),
        control.driving(fleet, holder, wait=LOCK_WAIT),
    ):
        control.refuse_if_busy(fleet)
        bundle_id, name, version = _serving(control, link)
        if candidate.bundle_id == bundle_id:
            raise RolloutError(
                f"{candidate.manifest.label} is what fleet {fleet} serves already; push another candidate"
            )
        # Devices on TUF try only a candidate targets authorises: refused before anything is sent.
        require_authorised(link.trust_home, fleet, [(candidate.bundle_id, candidate.manifest.label)])
        link.publish_bundle(candidate)  # before the desired state: devices fetch it at once
        asked = None if devices is None else sorted(set(devices))
        request = ShadowRequest(
            candidate.bundle_id,
            candidate.manifest.name,
            candidate.manifest.version,
            sample,
            int(time.time() + duration_s),
            None if asked is None else tuple(asked),
        )
        control.save_shadow_asked(fleet, candidate.bundle_id, asked)
        return link.desire(bundle_id, name, version, shadow=request)


def stop_shadow(control: ControlPlane, link: FleetLink, holder: str) -> int:
    """End the fleet's shadow evaluation: a desired state naming the served bundle without a
    shadow section (devices unload the candidate and report its last window). Returns its seq."""
    fleet = link.fleet
    with audited(control, "shadow-stop", fleet), control.driving(fleet, holder, wait=LOCK_WAIT):
        bundle_id, name, version = _serving(control, link)
        return link.desire(bundle_id, name, version)


def shadow_verdict(
    control: ControlPlane,
    fleet: str,
    min_agreement: float,
    max_latency_ratio: float,
    max_error: Optional[float] = None,
) -> dict[str, Any]:
    """Judge the fleet's shadow candidate (edgekit.fleet.shadow.judge) from the windows in the
    registry: the verdict ``shadow promote --json`` prints when it passes, else
    PromotionRefusedError naming each failing device and why. Audited either way. Needs no
    broker: a refusal publishes nothing."""
    summary = control.shadow_summary(fleet)  # only the devices asked
    reasons = judge(summary, min_agreement, max_latency_ratio, max_error)
    verdict = {
        "fleet": fleet,
        "candidate": summary["candidate"],
        "candidate_id": summary["candidate_id"],
        "passed": not reasons,
        "reasons": reasons,
    }
    with audited(control, "shadow-promote", fleet, summary["candidate"]):
        if reasons:
            raise PromotionRefusedError(
                f"{summary['candidate'] or 'the candidate'} was not promoted on fleet {fleet}: "
                + "; ".join(reasons),
                verdict,
            )
    return verdict


def promote_shadow(
    control: ControlPlane, link: FleetLink, verdict: dict[str, Any], canary: int, holder: str
) -> dict[str, Any]:
    """Start a normal rollout (:func:`pushing`) of the candidate a passed :func:`shadow_verdict`
    names: the verdict with the ``rollout`` started. Its desired state has no shadow section,
    so it ends the shadow too."""
    bundle = control.catalog.find(verdict["candidate_id"])
    if bundle is None:
        raise RolloutError(
            f"{verdict['candidate']} is not in the catalog of this registry; push it with "
            f"`edgekit push FILE --fleet {link.fleet}` instead"
        )
    with pushing(control, link, bundle, RolloutPolicy(canary=canary), holder) as (rollout, _):
        started = {"bundle": rollout.label, "phase": rollout.phase, "canaries": list(rollout.canaries)}
    return {**verdict, "rollout": started}
