"""The rollout controller of ``edgekit fleet up`` / ``fleet serve``: it drives the rollouts
that nobody is driving to their end.

``edgekit push --canary N`` without ``--wait`` tells the canaries and leaves the rollout saved in
the control plane (:mod:`edgekit.fleet.control`); a crashed or closed ``push --wait`` leaves one
too. :class:`RolloutController` looks at every unfinished rollout a few times a second; for each
one whose driving lock (:meth:`~edgekit.fleet.control.ControlPlane.driving`) it can take at once,
it reloads it, takes one :func:`~edgekit.fleet.push.step_rollout` (the step ``push --wait`` and
``rollout resume`` take: soak, advance to the fleet, abort and roll the canaries back) and lets
the lock go. Holding the lock for one step only means ``edgekit rollout abort``, a new ``push``
or ``fleet rollback`` from another terminal gets in between two steps, and the controller then
carries on from what they saved; a ``push --wait`` or ``rollout resume`` holding the lock drives
the rollout itself and the controller keeps off until it is done (or dies).

Several ``fleet serve`` processes may share one database: only the **leader** runs the
controller (:meth:`~edgekit.fleet.control.ControlPlane.leader`, a lock the database frees when
its holder dies); the others try again every ``interval`` and take over within one interval of
the leader's death. A step is saved before the next is taken, so no step is done twice.

The controller signs desired states with the workstation's key (``keys/default``, or
``key_name``; an encrypted key needs ``EDGEKIT_KEY_PASSPHRASE``, or pass ``key``).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Optional

from edgekit.errors import EdgekitError, RolloutError
from edgekit.keys import SigningKey, load_signing_key
from edgekit.mqtt import MqttClient
from edgekit.topics import Topics

from .control import ControlPlane
from .push import FleetLink, connect_operator, labels_of, step_rollout

__all__ = ["RolloutController"]

log = logging.getLogger(__name__)

HOLDER = "the rollout controller of edgekit fleet up"


class RolloutController:
    """Drive every unfinished rollout of ``control`` that no one else drives, while this
    process is the leader.

    ``home`` holds the signing key; ``broker_url`` is where the devices are (``username``/``password`` for a broker with
    accounts, else the operator account under ``home/broker`` if there is one); ``interval`` is how often (seconds) the rollouts are looked at.
    ``finished`` lists ``(fleet, phase, reason)`` of every rollout it brought to an end.
    """

    def __init__(
        self,
        broker_url: str,
        home: Path,
        control: ControlPlane,
        *,
        key: Optional[SigningKey] = None,
        key_name: str = "default",
        username: Optional[str] = None,
        password: Optional[str] = None,
        topics: Optional[Topics] = None,
        interval: float = 0.5,
    ) -> None:
        self.broker_url = broker_url
        self.home = Path(home)
        self.control = control
        #: Whether this process is the leader now (runs the controller).
        self.leading = threading.Event()
        self.key_name = key_name
        self.interval = interval
        self.topics = topics or Topics()
        self.finished: list[tuple[str, str, Optional[str]]] = []
        #: Steps that failed (broker, key or file trouble): logged, counted, tried again.
        self.errors = 0
        self._key = key
        self._username = username
        self._password = password
        self._client: Optional[MqttClient] = None
        self._links: dict[str, FleetLink] = {}
        self._stop = threading.Event()
        self._done = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._complained: set[str] = set()

    def start(self) -> RolloutController:
        """Connect to the broker and start the controller's thread (BrokerError if unreachable)."""
        if self._thread is not None:
            return self
        self._client = connect_operator(self.broker_url, self._username, self._password, home=self.home)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="edgekit-rollout-controller", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the step under way, then stop. The rollouts stay saved; the next controller
        (or ``rollout resume``) goes on from there."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._client is not None:
            self._client.close()
            self._client = None
        self._links = {}

    def __enter__(self) -> RolloutController:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        self.control.lead_while_elected(
            "rollout-controller", self._lead, self._stop, self.interval, self._failed
        )

    def _failed(self) -> None:
        """Counted and logged: the controller must outlive any database trouble."""
        self.errors += 1
        log.exception("the rollout controller lost its lease or its database; trying again")

    def _lead(self) -> None:
        log.info("this process runs the rollout controller (leader %s)", self.control.actor)
        self.leading.set()
        try:
            while not self._stop.is_set():
                try:
                    self.tick()
                except Exception:  # counted and logged: the controller must outlive any one rollout
                    self.errors += 1
                    log.exception("the rollout controller failed a round; trying again")
                self._stop.wait(self.interval)
        finally:
            self.leading.clear()

    def tick(self) -> None:
        """Look at every unfinished rollout once and step those that are free."""
        for fleet in self.control.unfinished():
            if self._stop.is_set():
                return
            try:
                link = self._link(fleet)  # outside the lock: the first one listens a while
                with self.control.driving(fleet, HOLDER):
                    self._step(fleet, link)
                self._complained.discard(fleet)
            except RolloutError:
                continue  # someone else drives it (push --wait, rollout resume, another controller)
            except (EdgekitError, OSError) as exc:
                self.errors += 1
                if fleet not in self._complained:  # once per trouble, not every half second
                    self._complained.add(fleet)
                    log.error("cannot drive the rollout of fleet %s: %s", fleet, exc)

    def _step(self, fleet: str, link: FleetLink) -> None:
        rollout = self.control.rollout(fleet)  # again, under the lock: as the last driver left it
        if rollout.finished:
            return
        link.record = self.control.record(fleet)  # a push since the last step changes it
        if link.watching != rollout.bundle_id:
            link.watch_telemetry_of(rollout.bundle_id)
            log.info("driving the rollout of %s to fleet %s (phase %s)", rollout.label, fleet, rollout.phase)
        before = rollout.phase
        rollout = step_rollout(link, rollout, rollout.rollout_policy, labels_of(rollout, link.record))
        if rollout.phase != before:
            log.info(
                "rollout of %s to fleet %s: %s -> %s%s",
                rollout.label,
                fleet,
                before,
                rollout.phase,
                f" ({rollout.reason})" if rollout.reason else "",
            )
        if rollout.finished:
            with self._done:
                self.finished.append((fleet, rollout.phase, rollout.reason))
                self._done.notify_all()

    def wait_finished(self, fleet: str, timeout: float) -> Optional[tuple[str, Optional[str]]]:
        """Block until this controller brought ``fleet``'s rollout to an end; its (phase,
        reason), or None after ``timeout`` seconds."""

        def found() -> Optional[tuple[str, Optional[str]]]:
            return next(((p, r) for f, p, r in reversed(self.finished) if f == fleet), None)

        with self._done:
            self._done.wait_for(lambda: found() is not None, timeout)
            return found()

    def _link(self, fleet: str) -> FleetLink:
        link = self._links.get(fleet)
        if link is None:
            assert self._client is not None
            if self._key is None:
                self._key = load_signing_key(self.home, self.key_name)
            link = FleetLink(self._client, fleet, self._key, self.control, self.topics, trust_home=self.home)
            # What `rollout resume` does too: hear every device's retained state before the
            # first step, so a soaking canary is not taken for one that stopped serving.
            link.discover()
            self._links[fleet] = link
        return link
