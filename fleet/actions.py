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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Optional

from edgekit.bundle import Bundle
from edgekit.errors import EdgekitError, RolloutError

from .control import ControlPlane
from .push import FleetLink, begin_rollout, labels_of
from .rollout import Rollout, RolloutPolicy, abort

__all__ = ["LOCK_WAIT", "abort_rollout", "audited", "previous_bundle", "pushing", "rolling_back"]

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
        upload = link.start_upload(bundle)
        rollout, labels = begin_rollout(link, bundle, policy)
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
