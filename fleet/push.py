"""The workstation's side of distribution: publish bundles and signed desired states, watch the
fleet answer, and drive canary rollouts to the end.

:class:`FleetLink` is one operator connection to the broker. It keeps what every device of a
fleet last said (its retained state, and the telemetry since a rollout began) and publishes
signed desired states with sequence numbers that only grow: the next number is above both the
fleet's counter in the control plane (:mod:`edgekit.fleet.control`, the registry database) and
any number seen on the broker's retained documents, so two operators, or one whose database was
restored from an old backup, never go backwards.

:func:`run_rollout` runs the :mod:`edgekit.fleet.rollout` state machine against a live fleet,
one :func:`step_rollout` at a time, saving the rollout in the control plane after every step so
that ``edgekit rollout resume`` or the rollout controller of ``edgekit fleet up`` / ``fleet
serve`` can pick it up. Whoever changes a fleet's rollout holds the fleet's driving lock first
(:meth:`edgekit.fleet.control.ControlPlane.driving`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from edgekit.bundle import Bundle
from edgekit.config import edgekit_home
from edgekit.desired import ShadowRequest, decode_desired_state, new_desired_state, sign_desired_state
from edgekit.errors import BrokerError, DesiredStateError, MessageError
from edgekit.keys import SigningKey
from edgekit.mqtt import Message, MqttClient
from edgekit.reports import DRIFT_SEVERITIES, DeviceStateReport, TelemetryRecord
from edgekit.topics import Topics
from edgekit.transfer import Upload, clear_bundle, publish_bundle, start_upload

from .control import ControlPlane, FleetRecord
from .rollout import SHADOW, Action, DeviceReport, Rollout, RolloutPolicy, advance, phase_deadline, start
from .shadow import summarize
from .trustrepo import publish_desired, require_authorised

__all__ = ["FleetLink", "begin_rollout", "run_rollout", "step_rollout"]

log = logging.getLogger(__name__)


@dataclass
class _Window:
    """Telemetry of one device since a moment: counts and the worst p95, for canary checks."""

    count: int = 0
    errors: int = 0
    p95_ms: Optional[float] = None
    drifted: bool = False
    drift_severity: Optional[str] = None  # the worst reported (None: no agent judged one)


class FleetLink:
    """An operator's connection to one fleet. Thread-safe; handlers run on the client's thread."""

    def __init__(
        self,
        client: MqttClient,
        fleet: str,
        key: SigningKey,
        control: ControlPlane,
        topics: Optional[Topics] = None,
        trust_home: Optional[Path] = None,
    ) -> None:
        self.client = client
        #: Where fleets' TUF repositories and online keys are (``trust/F``): EDGEKIT_HOME by default.
        self.trust_home = trust_home if trust_home is not None else edgekit_home()
        self.fleet = fleet
        self.key = key
        self.control = control
        self.topics = topics or Topics()
        self.record = control.record(fleet)
        self.states: dict[str, DeviceStateReport] = {}
        self.rejected = 0
        self._seen_seq = 0
        self._windows: dict[str, _Window] = {}
        self._window_bundle: Optional[str] = None
        self._changed = threading.Condition()
        self._version = 0
        client.subscribe(self.topics.all_devices_filter("state"), self._on_state, timeout=10)
        client.subscribe(self.topics.all_devices_filter("telemetry"), self._on_telemetry, timeout=10)
        client.subscribe(self.topics.fleet_desired(fleet), self._on_desired, timeout=10)
        client.subscribe(self.topics.all_devices_filter("desired"), self._on_desired, timeout=10)

    # -- what the devices say ------------------------------------------------------------------

    def _bump(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def _on_state(self, message: Message) -> None:
        if not message.payload:
            return
        try:
            report = DeviceStateReport.from_json(message.payload)
        except MessageError as exc:
            self.rejected += 1
            log.warning("dropped a malformed state on %s: %s", message.topic, exc)
            return
        if report.fleet != self.fleet:
            return
        known = self.states.get(report.device)
        if report.bundle_id is None and known is not None and known.bundle_id is not None:
            # The MQTT will says only "offline": the device still has what it last served.
            report = replace(
                report,
                bundle_id=known.bundle_id,
                bundle_name=known.bundle_name,
                bundle_version=known.bundle_version,
            )
        self.states[report.device] = report
        self._seen_seq = max(self._seen_seq, report.target_seq or 0)
        self._bump()

    def _on_telemetry(self, message: Message) -> None:
        try:
            record = TelemetryRecord.from_json(message.payload)
        except MessageError as exc:
            self.rejected += 1
            log.warning("dropped malformed telemetry on %s: %s", message.topic, exc)
            return
        bundle = record.bundle or {}
        if (
            record.fleet != self.fleet
            or self._window_bundle is None
            or bundle.get("bundle_id") != self._window_bundle
        ):
            return
        window = self._windows.setdefault(record.device, _Window())
        window.count += record.count
        window.errors += record.errors
        p95 = record.latency_ms.get("p95")
        if p95 is not None:
            window.p95_ms = max(window.p95_ms or 0.0, p95)
        window.drifted = window.drifted or bool(record.drift.get("drifted"))
        severity = record.drift_severity
        rank = DRIFT_SEVERITIES.index(severity) if severity is not None else -1
        if rank > (DRIFT_SEVERITIES.index(window.drift_severity) if window.drift_severity else -1):
            window.drift_severity = severity
        self._bump()

    def _on_desired(self, message: Message) -> None:
        if not message.payload:
            return
        try:
            state, _ = decode_desired_state(message.payload)
        except DesiredStateError:
            return
        if state.fleet == self.fleet:
            self._seen_seq = max(self._seen_seq, state.seq)

    def devices(self) -> list[str]:
        return sorted(self.states)

    def wait_change(self, timeout: float) -> bool:
        """Block until a device reports something new (True) or ``timeout`` passes (False)."""
        with self._changed:
            version = self._version
            return self._changed.wait_for(lambda: self._version != version, timeout)

    def discover(self, settle: float = 1.0, limit: float = 10.0, known_settle: float = 0.1) -> list[str]:
        """Collect the devices' retained states until none arrived for ``settle`` seconds, or
        for ``known_settle`` seconds once every device the fleet record knows has been heard
        from (the broker sends retained states in one burst after the subscription; the short
        wait still takes in devices the record does not know yet, sent in the same burst)."""
        deadline = time.monotonic() + limit
        known = set(self.record.devices) | self._provisioned()
        while time.monotonic() < deadline:
            quiet = known_settle if known and known <= self.states.keys() else settle
            if not self.wait_change(min(quiet, max(0.0, deadline - time.monotonic()))):
                break
        unheard = sorted(known - self.states.keys())
        if unheard and time.monotonic() < deadline:
            # Some brokers (RabbitMQ's MQTT plugin, some cloud services) send retained messages
            # to exact-topic subscriptions only: ask for the known devices' states by name.
            for device in unheard:
                self.client.subscribe(self.topics.device_state(device), self._on_state, timeout=10)
            while not known <= self.states.keys() and time.monotonic() < deadline:
                if not self.wait_change(min(settle, max(0.0, deadline - time.monotonic()))):
                    break
            for device in unheard:
                self.client.unsubscribe(self.topics.device_state(device))
        return self.devices()

    def _provisioned(self) -> set[str]:
        """Devices provisioned for this fleet (``edgekit device add``, in the control plane)."""
        return {p.device for p in self.control.provisioned(self.fleet)}

    def reports(self) -> list[DeviceReport]:
        """The rollout controller's view of every known device of the fleet."""
        result = []
        for device, state in sorted(self.states.items()):
            window = self._windows.get(device, _Window())
            failed = state.target_id if state.status == "failed" else None
            result.append(
                DeviceReport(
                    device=device,
                    online=state.online,
                    bundle_id=state.bundle_id,
                    failed_bundle_id=failed,
                    reason=state.error,
                    count=window.count,
                    errors=window.errors,
                    p95_ms=window.p95_ms,
                    drifted=window.drifted,
                    drift_severity=window.drift_severity,
                )
            )
        return result

    def watch_telemetry_of(self, bundle_id: str) -> None:
        """Count telemetry of devices serving ``bundle_id`` from now on (canary judgment)."""
        self._window_bundle = bundle_id
        self._windows = {}

    @property
    def watching(self) -> Optional[str]:
        """The bundle whose telemetry is being counted, if any."""
        return self._window_bundle

    # -- what the workstation says ---------------------------------------------------------------

    def publish_bundle(self, bundle: Bundle, progress: Optional[Callable[[int, int], None]] = None) -> str:
        return publish_bundle(self.client, bundle, self.topics, progress=progress)

    def start_upload(self, bundle: Bundle) -> Upload:
        """Publish the bundle's manifest; tell the devices, then ``finish()`` publishes the chunks
        while they already fetch them (:func:`edgekit.transfer.start_upload`)."""
        return start_upload(self.client, bundle, self.topics)

    def desire(
        self,
        bundle_id: str,
        name: str,
        version: str,
        device: Optional[str] = None,
        shadow: Optional[ShadowRequest] = None,
    ) -> int:
        """Sign and publish (retained) a desired state (with ``shadow``: a candidate to try
        beside the bundle, docs/shadow.md); returns its sequence number."""
        seq = self.control.next_seq(self.fleet, above=self._seen_seq)
        state = new_desired_state(
            self.fleet,
            bundle_sha256=bundle_id,
            bundle_name=name,
            bundle_version=version,
            seq=seq,
            device=device,
            shadow=shadow,
        )
        # A fleet with a TUF key hierarchy gets the same state through its online desired role
        # (devices on TUF follow that; devices still on single-key trust, the envelope below).
        publish_desired(
            self.trust_home,
            state,
            lambda role, data: self.client.publish(
                self.topics.fleet_trust(self.fleet, role), data, qos=1, retain=True
            ).wait(30),
            now=time.time(),
        )
        topic = self.topics.device_desired(device) if device else self.topics.fleet_desired(self.fleet)
        self.client.publish(topic, sign_desired_state(state, self.key), qos=1, retain=True).wait(30)
        self.control.record_desired(state)
        self.record.seq = seq
        if device is None:
            self.record.bundle_id = bundle_id
            self.record.label = f"{name}@{version}"
            self.record.history = [h for h in self.record.history if h["id"] != bundle_id]
            self.record.history.append({"id": bundle_id, "label": self.record.label})
        self.record.devices = sorted(self.states)  # what the next discovery expects to hear
        self.control.save_record(self.record)
        log.info(
            "published desired state seq %d: %s@%s for %s",
            seq,
            name,
            version,
            f"device {device}" if device else f"fleet {self.fleet}",
        )
        return seq

    def carry_out(self, actions: list[Action], labels: dict[str, str]) -> None:
        for action in actions:
            name, _, version = labels[action.bundle_id].partition("@")
            self.desire(action.bundle_id, name, version, action.device, shadow=action.shadow)

    def clear_bundle(self, bundle_id: str, chunk_count: int) -> None:
        clear_bundle(self.client, bundle_id, chunk_count, self.topics)


def step_rollout(link: FleetLink, rollout: Rollout, policy: RolloutPolicy, labels: dict[str, str]) -> Rollout:
    """One step: advance with what the devices say now, publish what that asks for, save (when
    the rollout changed: devices report often, download progress included; each save is two
    fsyncs, and ``rollout`` as given is the one saved last)."""
    reports = link.reports()
    if rollout.phase == SHADOW:
        reports = with_shadow_figures(link.control, rollout, reports)
    new, actions = advance(rollout, reports, policy, time.time())
    if actions:
        link.carry_out(actions, labels)
    if new != rollout or actions:
        link.control.save_rollout(new)
    return new


#: Seconds of clock difference allowed between a device and the workstation when picking the
#: shadow windows of a rollout's shadow phase (those that ended after the phase began).
CLOCK_SLACK = 60.0


def with_shadow_figures(
    control: ControlPlane, rollout: Rollout, reports: list[DeviceReport]
) -> list[DeviceReport]:
    """``reports`` with each canary's shadow figures of the rollout's bundle since its shadow
    phase began: the windows ingest stored in the registry (``edgekit fleet serve`` / ``fleet
    up`` run it), so a restarted controller judges what the devices measured meanwhile."""
    since = rollout.phase_since - CLOCK_SLACK
    windows = [
        w
        for w in control.registry.shadow_windows(rollout.fleet, rollout.bundle_id)
        if w.device in rollout.canaries and _epoch(w.window_end) >= since
    ]
    figures = {d["device"]: d for d in summarize(windows)["devices"]}
    return [replace(r, shadow=figures.get(r.device)) for r in reports]


def _epoch(moment: datetime) -> float:
    """UNIX seconds of a registry time (SQLite gives it back without its zone: UTC)."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def run_rollout(
    link: FleetLink,
    rollout: Rollout,
    policy: RolloutPolicy,
    labels: dict[str, str],
    *,
    timeout: float,
    on_change: Optional[Callable[[Rollout, FleetLink], None]] = None,
) -> Rollout:
    """Advance ``rollout`` until it is finished or a phase outlasts its time by ``timeout``
    seconds (:func:`~edgekit.fleet.rollout.phase_deadline`: a shadow phase or soak is waited out
    first); saved after every step. The caller holds :func:`driving` for the fleet."""
    began = time.time()  # wall-clock, like the rollout's phase_since
    link.watch_telemetry_of(rollout.bundle_id)
    while not rollout.finished:
        rollout = step_rollout(link, rollout, policy, labels)
        if on_change is not None:
            on_change(rollout, link)
        deadline = phase_deadline(rollout, policy, timeout, began)
        if rollout.finished or time.time() >= deadline:
            break
        link.wait_change(min(1.0, max(0.0, deadline - time.time())))
    return rollout


def begin_rollout(link: FleetLink, bundle: Bundle, policy: RolloutPolicy) -> tuple[Rollout, dict[str, str]]:
    """Start a rollout of ``bundle`` to every device the fleet has; returns it and its labels."""
    # Refused before anything is saved or sent; the shadow phase's candidate is this bundle too.
    require_authorised(link.trust_home, link.fleet, [(bundle.bundle_id, bundle.manifest.label)])
    previous = link.record.bundle_id if link.record.bundle_id != bundle.bundle_id else None
    labels = {bundle.bundle_id: bundle.manifest.label}
    if previous is not None and link.record.label:
        labels[previous] = link.record.label
    rollout, actions = start(
        link.fleet, bundle.bundle_id, bundle.manifest.label, link.reports(), previous, policy, time.time()
    )
    link.watch_telemetry_of(bundle.bundle_id)
    link.carry_out(actions, labels)
    link.control.save_rollout(rollout, new=True)
    return rollout, labels


def labels_of(rollout: Rollout, record: FleetRecord) -> dict[str, str]:
    labels = {rollout.bundle_id: rollout.label}
    for entry in record.history:
        labels.setdefault(entry["id"], entry["label"])
    return labels


def operator_login(
    url: str, username: Optional[str], password: Optional[str], home: Optional[Path]
) -> tuple[Optional[str], Optional[str]]:
    """The account the workstation's services use on ``url``: the one given, else the URL's
    own, else the operator account of ``home/broker/operator.json`` if there is one."""
    if (
        username is None
        and home is not None
        and "@" not in url
        and (home / "broker" / "operator.json").exists()
    ):
        from edgekit.broker import operator_credentials

        creds = operator_credentials(home)
        return creds.username, creds.password
    return username, password


def connect_operator(
    url: str,
    username: Optional[str] = None,
    password: Optional[str] = None,
    timeout: float = 10.0,
    home: Optional[Path] = None,
) -> MqttClient:
    """The operator's connection. Without credentials (in the URL or given), those of
    ``home/broker/operator.json`` (written by ``edgekit broker mosquitto-config``) are used."""
    username, password = operator_login(url, username, password, home)
    try:
        return MqttClient(
            url,
            # Unique per connection: two operators (or two commands) starting in the same millisecond
            # must not share an id, or the broker drops the first of them.
            client_id=f"edgekit-operator-{uuid.uuid4().hex[:12]}",
            username=username,
            password=password,
        ).connect(timeout=timeout)
    except BrokerError as exc:
        raise BrokerError(
            f"{exc}; set --broker, EDGEKIT_BROKER or broker in $EDGEKIT_HOME/config.toml"
        ) from None
