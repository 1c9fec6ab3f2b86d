"""The alert evaluator: it turns what the registry says into alerts, and alerts into messages
waiting to be delivered.

Every ``interval`` seconds :meth:`Evaluator.tick` reads the devices, their recent telemetry and
install events from the registry and the saved rollouts under ``$EDGEKIT_HOME/rollouts``, asks
the rules (:func:`edgekit.fleet.alerts.rules.evaluate`) which conditions hold, and reconciles
them with the alerts table in one transaction:

- a new condition becomes a *pending* alert; once it has held for the rule's ``hold`` (for
  ``offline``: ``offline_after``, counted from the first round that sees the device offline) it *opens*, and
  one "opened" message per channel is queued;
- while it stays open nothing more is sent (one alert per condition and subject until it
  resolves); when the condition goes away the alert starts *clearing*, and once it has stayed
  away for ``clear_after`` it *resolves* and one "resolved" message per channel is queued. A
  condition that comes back while clearing keeps the same alert (counted in ``flaps``): that is
  how flapping is damped;
- messages are rows of ``alert_deliveries``, sent by the :class:`~edgekit.fleet.alerts.delivery.Dispatcher`
  on its own thread: the evaluator never waits on a mail server, and nothing waits on the
  evaluator (ingest runs in other processes).

Only one evaluator works on a registry at a time, however many services share it: each tick
first takes (or renews) a lease row in the registry, and a tick without the lease does nothing.
In a service (:class:`Alerting`) the evaluator also runs only while its process holds the
``alert-evaluator`` leader lock of the control plane (:meth:`~edgekit.fleet.control.ControlPlane.leader`,
as the rollout controller does): a PostgreSQL advisory lock, or a file lock on SQLite, that
the database or the kernel frees the moment its holder dies. The others try to take it every
``interval`` seconds, so after a kill -9 of the leader another service evaluates within one
interval (it takes the dead holder's lease over at once instead of waiting for it to expire).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple, Optional

from edgekit.errors import ConfigError
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from ..control import ControlPlane
from ..registry import Registry
from ..registry.models import Alert, AlertDelivery, Device, Event, Telemetry
from ..rollout import SHADOW, SOAK
from ..trustrepo import current_roots, desired_expiries
from .delivery import Dispatcher
from .messages import render
from .rules import (
    FREEZE_EVENTS,
    INSTALL_FIXED,
    INSTALL_PROBLEMS,
    Condition,
    DesiredFacts,
    DeviceFacts,
    EventFacts,
    RolloutFacts,
    Snapshot,
    evaluate,
)
from .store import OPEN, PENDING, RESOLVED, AlertStore, ChannelRow, utc

__all__ = ["Alerting", "Evaluator", "TickResult"]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class TickResult:
    """What one tick did: alerts opened and resolved, messages queued (None: no lease)."""

    opened: int = 0
    resolved: int = 0
    queued: int = 0


#: How far back the freeze rule looks for a device's freeze_suspected / freeze_ended events.
FREEZE_WINDOW = timedelta(days=30)


def _newest(rows: Sequence[Any]) -> dict[str, EventFacts]:
    """The newest of ``rows`` (device, seq, at, kind, message) per device."""
    newest: dict[str, EventFacts] = {}
    for device, seq, at, kind, message in rows:
        old = newest.get(device)
        if old is None or (utc(at), seq) > (old.at, old.seq):
            newest[device] = EventFacts(device, seq, utc(at), kind, message)
    return newest


def _hold(rule: str, settings: dict[str, Any]) -> float:
    if rule == "offline":
        return float(settings["offline_after"])
    if rule == "old_root":
        return float(settings["stuck_after"])
    return float(settings.get("hold", 0.0))


class Measured(NamedTuple):
    """One device's telemetry over the rules' window: predictions, errors, and the worst p95,
    temperature, RAM and disk use."""

    predictions: int = 0
    errors: int = 0
    p95_ms: Optional[float] = None
    temperature_c: Optional[float] = None
    memory_used_percent: Optional[float] = None
    disk_used_percent: Optional[float] = None


class Evaluator:
    """Rules -> alerts -> queued deliveries, for one registry (and one EDGEKIT_HOME)."""

    def __init__(
        self,
        registry: Registry,
        home: Path,
        *,
        link_base: Optional[str] = None,
        performance_interval: float = 30.0,
        lease_ttl: float = 30.0,
    ) -> None:
        self.store = AlertStore(registry, home)
        self.registry = registry
        self.home = Path(home)
        self.link_base = link_base
        self.performance_interval = performance_interval
        self.lease_ttl = lease_ttl
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"[:64]
        self._performance: (
            tuple[
                datetime,
                dict[str, Measured],
                dict[str, float],
                dict[str, float],
            ]
            | None
        ) = None
        self._lease_until: Optional[datetime] = None

    # -- one round --------------------------------------------------------------------------

    def tick(self, now: Optional[datetime] = None) -> Optional[TickResult]:
        """Evaluate every rule once and reconcile the alerts; None if another evaluator holds
        the lease."""
        now = utc(now or now_utc())
        # Renewed at half its life, not every round: a write less for ingest's database.
        if self._lease_until is None or now >= self._lease_until - timedelta(seconds=self.lease_ttl / 2):
            if not self.store.take_lease(self.holder, now, self.lease_ttl):
                self._lease_until = None
                return None
            self._lease_until = now + timedelta(seconds=self.lease_ttl)
        settings = self.store.rule_settings()
        channels = self.store.channels()
        snapshot = self.snapshot(now, settings, channels)
        conditions = evaluate(snapshot, settings, now)
        return self._reconcile(conditions, settings, channels, now)

    def take_over(self, now: Optional[datetime] = None) -> None:
        """Take the lease whoever holds it: for a caller that holds the evaluator's leader lock
        (any other holder is dead; waiting for its lease to expire would only delay alerts)."""
        now = utc(now or now_utc())
        self.store.take_lease(self.holder, now, self.lease_ttl, force=True)
        self._lease_until = now + timedelta(seconds=self.lease_ttl)

    def release(self) -> None:
        self._lease_until = None
        self.store.drop_lease(self.holder)

    def snapshot(
        self, now: datetime, settings: dict[str, dict[str, Any]], channels: Sequence[ChannelRow]
    ) -> Snapshot:
        perf, fleet_p95, fleet_errors = self._performance_facts(now, settings)
        with self.registry.session() as session:
            columns = (
                Device.id,
                Device.fleet,
                Device.online,
                Device.status,
                Device.last_seen,
                Device.drifted,
                Device.bundle_version,
                Device.drift_severity,
                Device.accuracy_estimate,
                Device.bundle_id,
                Device.trust_root,
                Device.trust_expires,
            )
            devices = session.execute(select(*columns)).all()
            since = now - timedelta(days=1)
            kinds = [*INSTALL_PROBLEMS, *INSTALL_FIXED]
            events = session.execute(
                select(Event.device, Event.seq, Event.at, Event.kind, Event.message).where(
                    Event.at >= since, Event.kind.in_(kinds)
                )
            ).all()
            # A freeze can outlast a day: its events are looked for over FREEZE_WINDOW.
            freezes = session.execute(
                select(Event.device, Event.seq, Event.at, Event.kind, Event.message).where(
                    Event.at >= now - FREEZE_WINDOW, Event.kind.in_(FREEZE_EVENTS)
                )
            ).all()
        newest, frozen = _newest(events), _newest(freezes)
        facts = []
        serving: dict[str, tuple[str, str | None]] = {}
        for (
            device,
            fleet,
            online,
            status,
            last_seen,
            drifted,
            version,
            severity,
            accuracy,
            bundle,
            trust_root,
            trust_expires,
        ) in devices:
            serving[device] = (fleet, bundle)
            measured = perf.get(device, Measured())
            seen = utc(last_seen) if last_seen else None
            facts.append(
                DeviceFacts(
                    device,
                    fleet,
                    online,
                    status,
                    seen,
                    drifted,
                    version,
                    severity,
                    accuracy,
                    measured.predictions,
                    measured.errors,
                    measured.p95_ms,
                    measured.temperature_c,
                    measured.memory_used_percent,
                    measured.disk_used_percent,
                    trust_root,
                    utc(trust_expires) if trust_expires else None,
                )
            )
        failing = {c.name: utc(c.failing_since) for c in channels if c.failing_since is not None}
        return Snapshot(
            facts,
            newest,
            self._rollouts(),
            fleet_p95,
            fleet_errors,
            failing,
            self._desired(serving),
            frozen,
            current_roots(self.home),
            desired_expiries(self.home),
        )

    def _desired(self, serving: dict[str, tuple[str, str | None]]) -> list[DesiredFacts]:
        """Each fleet's and device's newest desired state, with the devices that run by it:
        a device runs by the newer (higher seq) of its fleet's and its own, if it serves that
        bundle."""
        rows = ControlPlane(self.registry).desired_states()
        if not rows:
            return []
        fleets = {r.fleet: r for r in rows if not r.device}
        own = {r.device: r for r in rows if r.device}
        applied: dict[tuple[str, str], list[str]] = {}
        for device, (fleet, bundle) in sorted(serving.items()):
            candidates = [
                r for r in (fleets.get(fleet), own.get(device)) if r is not None and r.fleet == fleet
            ]
            if not candidates:
                continue
            newest = max(candidates, key=lambda r: r.seq)
            if bundle is not None and newest.bundle_id == bundle:
                applied.setdefault((newest.fleet, newest.device), []).append(device)
        return [
            DesiredFacts(
                r.fleet,
                r.device or None,
                r.label,
                r.seq,
                utc(r.expires_at),
                tuple(applied.get((r.fleet, r.device), ())),
            )
            for r in rows
        ]

    def _performance_facts(
        self, now: datetime, settings: dict[str, dict[str, Any]]
    ) -> tuple[dict[str, Measured], dict[str, float], dict[str, float]]:
        """Per device over the rules' window, and per fleet over the last day; recomputed every
        ``performance_interval`` seconds (they read telemetry, the registry's biggest table)."""
        cached = self._performance
        if cached is not None and (now - cached[0]).total_seconds() < self.performance_interval:
            return cached[1], cached[2], cached[3]
        window = max(float(settings["latency"]["window"]), float(settings["errors"]["window"]))
        recent = now - timedelta(seconds=window)
        day = now - timedelta(days=1)
        with self.registry.session() as session:
            rows = session.execute(
                select(
                    Telemetry.device,
                    func.sum(Telemetry.count),
                    func.sum(Telemetry.errors),
                    func.max(Telemetry.latency_p95_ms),
                    func.max(Telemetry.temperature_c),
                    func.max(Telemetry.memory_used_percent),
                    func.max(Telemetry.disk_used_percent),
                )
                .where(Telemetry.window_end >= recent)
                .group_by(Telemetry.device)
            ).all()
            fleets = session.execute(
                select(
                    Device.fleet,
                    func.avg(Telemetry.latency_p95_ms),
                    func.sum(Telemetry.errors),
                    func.sum(Telemetry.count),
                )
                .join(Device, Device.id == Telemetry.device)
                .where(Telemetry.window_end >= day)
                .group_by(Device.fleet)
            ).all()
        perf = {d: Measured(int(c or 0), int(e or 0), p95, t, m, k) for d, c, e, p95, t, m, k in rows}
        fleet_p95 = {f: float(p) for f, p, _e, _c in fleets if p is not None}
        fleet_errors = {f: float(e or 0) / float(c) for f, _p, e, c in fleets if c}
        self._performance = (now, perf, fleet_p95, fleet_errors)
        return perf, fleet_p95, fleet_errors

    def _rollouts(self) -> list[RolloutFacts]:
        """Every fleet's current rollout, from the control plane in the registry, with the
        planned wait of its phase and the newest progress its devices reported."""
        found = []
        for r in (info.rollout for info in ControlPlane(self.registry).rollouts()):
            started = datetime.fromtimestamp(r.started_at, timezone.utc)
            planned, progressed = 0.0, None
            if not r.finished:
                try:
                    policy = r.rollout_policy
                    planned = (
                        policy.shadow_s if r.phase == SHADOW else policy.soak_s if r.phase == SOAK else 0.0
                    )
                except (ConfigError, TypeError):
                    planned = 0.0  # a policy this version cannot read: judged by its steps alone
                progressed = self._progressed(r.bundle_id, {*r.devices, *r.canaries}, started)
            found.append(
                RolloutFacts(
                    r.fleet,
                    r.label,
                    r.phase,
                    datetime.fromtimestamp(r.phase_since, timezone.utc),
                    started,
                    r.reason,
                    tuple(r.canaries),
                    planned,
                    progressed,
                )
            )
        return found

    def _progressed(self, bundle_id: str, devices: set[str], since: datetime) -> Optional[datetime]:
        """When a device of a rollout last reported progress on its bundle: the newest event
        about that bundle (installed, or a failure it decided on) since the rollout began. A
        download that stalls is no progress."""
        if not devices:
            return None
        with self.registry.session() as session:
            at = session.execute(
                select(func.max(Event.at)).where(
                    Event.bundle_id == bundle_id,
                    Event.device.in_(sorted(devices)),
                    Event.at >= since,
                    Event.kind != "download_stalled",
                )
            ).scalar()
        return utc(at) if at is not None else None

    # -- alerts -----------------------------------------------------------------------------

    def _reconcile(
        self,
        conditions: list[Condition],
        settings: dict[str, dict[str, Any]],
        channels: Sequence[ChannelRow],
        now: datetime,
    ) -> TickResult:
        present = {c.key: c for c in conditions}
        opened = resolved = queued = 0
        with self.registry.session() as session, session.begin():
            live = session.execute(select(Alert).where(Alert.state.in_([PENDING, OPEN]))).scalars()
            alerts = {(a.rule, a.subject): a for a in live}
            for key, condition in present.items():
                alert = alerts.get(key)
                if alert is None:
                    alert = Alert(
                        rule=condition.rule,
                        subject=condition.subject,
                        origin=condition.origin,
                        fleet=condition.fleet,
                        device=condition.device,
                        state=PENDING,
                        since=min(condition.since, now),
                        summary="",
                        facts={**condition.facts, "flaps": 0},
                    )
                    session.add(alert)
                elif alert.state == OPEN:
                    if alert.clearing_since is not None:
                        alert.clearing_since = None
                        alert.facts = {**alert.facts, "flaps": int(alert.facts.get("flaps", 0)) + 1}
                    continue
                elif alert.facts != {**condition.facts, "flaps": 0}:  # pending: no write unless it changed
                    alert.facts = {**condition.facts, "flaps": 0}
                hold = _hold(condition.rule, settings[condition.rule])
                if (now - utc(alert.since)).total_seconds() >= hold:
                    alert.state, alert.opened_at = OPEN, now
                    session.flush()  # its id, for the message
                    alert.summary = str(self._message(alert, "opened", now)["json"]["alert"]["title"])
                    queued += self._queue(session, alert, "opened", channels, now)
                    opened += 1
            for key, alert in alerts.items():
                if key in present:
                    continue
                if alert.state == PENDING:
                    session.delete(alert)
                    continue
                if alert.clearing_since is None:
                    alert.clearing_since = now
                clear_after = float(settings[alert.rule]["clear_after"])
                if (now - utc(alert.clearing_since)).total_seconds() >= clear_after:
                    alert.state, alert.resolved_at = RESOLVED, now
                    queued += self._queue(session, alert, "resolved", channels, now)
                    resolved += 1
        if opened or resolved:
            log.info("alerts: %d opened, %d resolved, %d messages queued", opened, resolved, queued)
        return TickResult(opened, resolved, queued)

    def _message(self, alert: Alert, event: str, now: datetime) -> dict[str, Any]:
        return render(
            alert_id=alert.id or 0,
            rule=alert.rule,
            event=event,
            fleet=alert.fleet,
            device=alert.device,
            since=utc(alert.since),
            facts=alert.facts,
            now=now,
            link_base=self.link_base,
        )

    def _queue(
        self, session: Any, alert: Alert, event: str, channels: Sequence[ChannelRow], now: datetime
    ) -> int:
        message = self._message(alert, event, now)
        n = 0
        for channel in channels:
            if alert.rule == "channel" and alert.subject == f"channel:{channel.name}":
                continue  # a channel that fails is not told about itself
            session.add(
                AlertDelivery(
                    channel_id=channel.id,
                    alert_id=alert.id,
                    kind=event,
                    state="pending",
                    created_at=now,
                    next_attempt_at=now,
                    attempts=0,
                    message=message,
                )
            )
            n += 1
        return n


class Alerting:
    """The evaluator and the dispatcher of a fleet service, each on its own thread."""

    def __init__(
        self,
        registry: Registry,
        home: Path,
        *,
        interval: float = 2.0,
        link_base: Optional[str] = None,
        dispatcher: Optional[Dispatcher] = None,
        clock: Clock = now_utc,
    ) -> None:
        self.evaluator = Evaluator(registry, home, link_base=link_base, lease_ttl=max(30.0, 5 * interval))
        self.dispatcher = dispatcher or Dispatcher(registry, home, link_base=link_base)
        self.interval = interval
        self.clock = clock
        #: Rounds that failed (database trouble): logged, counted, tried again.
        self.errors = 0
        #: Totals over the evaluator's rounds (opened and resolved alerts, queued messages).
        self.totals = TickResult()
        self._rounds = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        #: Whether this process runs the evaluator now (holds its leader lock).
        self.leading = threading.Event()

    def start(self) -> Alerting:
        for target, name in ((self._evaluate, "evaluator"), (self.dispatcher.run, "dispatcher")):
            thread = threading.Thread(target=target, name=f"edgekit-alerts-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.dispatcher.stop()
        for thread in self._threads:
            thread.join(timeout)
        try:
            self.evaluator.release()
        except SQLAlchemyError as exc:
            log.warning("alerts: could not release the evaluator's lease (%s); it expires by itself", exc)

    def wait_for(self, predicate: Callable[[TickResult], bool], timeout: float = 30.0) -> bool:
        """Block until ``predicate(totals)`` holds after a round; False on timeout (tests use it)."""
        with self._rounds:
            return bool(self._rounds.wait_for(lambda: predicate(self.totals), timeout))

    def _evaluate(self) -> None:
        """Evaluate while this process holds the evaluator's leader lock; else try for it every
        ``interval`` seconds (a dead leader's lock is freed at once: see the module's doc)."""
        from ..control import ControlPlane, operator_name

        control = ControlPlane(self.evaluator.registry, actor=f"fleet serve ({operator_name()})")
        control.lead_while_elected("alert-evaluator", self._lead, self._stop, self.interval, self._failed)

    def _failed(self) -> None:
        """Counted and logged: the evaluator must outlive any database trouble."""
        self.errors += 1
        log.exception("alerts: the evaluator lost its lock or its database; trying again")

    def _lead(self) -> None:
        log.info("alerts: this process runs the alert evaluator")
        self.leading.set()
        try:
            self.evaluator.take_over(self.clock())
            self._rounds_while_leading()
        finally:
            self.leading.clear()

    def _rounds_while_leading(self) -> None:
        while not self._stop.is_set():
            try:
                result = self.evaluator.tick(self.clock())
                if result is None:
                    # Another evaluator took the lease (one without the lock, or a leader whose
                    # lock this process's database connection lost): let the lock go, try again.
                    log.warning("alerts: another evaluator holds the lease; stepping back")
                    return
                if result.queued:
                    self.dispatcher.wake()
                with self._rounds:
                    t = self.totals
                    self.totals = TickResult(
                        t.opened + result.opened, t.resolved + result.resolved, t.queued + result.queued
                    )
                    self._rounds.notify_all()
            except (SQLAlchemyError, OSError, ConfigError) as exc:
                self.errors += 1
                log.error("alerts: an evaluation round failed (%s); trying again", exc)
            except Exception:  # counted and logged: the evaluator must outlive any one bad row
                self.errors += 1
                log.exception("alerts: an evaluation round failed; trying again")
            self._stop.wait(self.interval)
