"""The workstation's side of distribution: publish bundles and signed desired states, watch the
fleet answer, and drive canary rollouts to the end.

:class:`FleetLink` is one operator connection to the broker. It keeps what every device of a
fleet last said (its retained state, and the telemetry since a rollout began) and publishes
signed desired states with sequence numbers that only grow: the next number is above both the
one saved under ``$EDGEKIT_HOME/fleets/`` and any number seen on the broker's retained
documents, so two workstations, or one that lost its home directory, never go backwards.

:func:`run_rollout` runs the :mod:`edgekit.fleet.rollout` state machine against a live fleet,
one :func:`step_rollout` at a time, saving the rollout after every step so that ``edgekit
rollout resume`` or the rollout controller of ``edgekit fleet up`` can pick it up.

:func:`driving` is the lock that keeps two drivers off one fleet's rollout: ``push``,
``rollout resume|abort``, ``fleet rollback`` and the controller all take it before they change
``rollouts/FLEET.json``. It is an ``flock`` on ``rollouts/FLEET.lock``: the kernel releases it
when its holder exits or dies (kill -9, a crash, a laptop's power), so there is no stale lock to
clean up, and no guessing whether a recorded pid is still alive or was reused. The file also
names the holder's pid and command, for the error message of whoever is refused.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from edgekit.atomic import atomic_write
from edgekit.bundle import Bundle
from edgekit.catalog import Catalog
from edgekit.desired import decode_desired_state, new_desired_state, sign_desired_state
from edgekit.errors import BrokerError, ConfigError, DesiredStateError, MessageError, RolloutError
from edgekit.keys import SigningKey
from edgekit.mqtt import Message, MqttClient
from edgekit.reports import DeviceStateReport
from edgekit.topics import Topics
from edgekit.transfer import Upload, clear_bundle, publish_bundle, start_upload

from .rollout import Action, DeviceReport, Rollout, RolloutPolicy, abort, advance, start

__all__ = ["FleetLink", "FleetRecord", "driving", "rollout_path", "run_rollout", "step_rollout"]

log = logging.getLogger(__name__)


@dataclass
class _Window:
    """Telemetry of one device since a moment: counts and the worst p95, for canary checks."""

    count: int = 0
    errors: int = 0
    p95_ms: Optional[float] = None
    drifted: bool = False


@dataclass
class FleetRecord:
    """What the workstation remembers of a fleet between commands (``fleets/NAME.json``)."""

    fleet: str
    seq: int = 0
    bundle_id: Optional[str] = None  # what the fleet was last told to run
    label: Optional[str] = None
    history: list[dict[str, str]] = field(default_factory=list)  # [{id, label}] newest last
    devices: list[str] = field(default_factory=list)  # heard from when it was last told something

    @classmethod
    def load(cls, home: Path, fleet: str) -> FleetRecord:
        path = home / "fleets" / f"{fleet}.json"
        try:
            doc = json.loads(path.read_bytes())
            return cls(
                fleet=fleet,
                seq=int(doc["seq"]),
                bundle_id=doc.get("bundle_id"),
                label=doc.get("label"),
                history=list(doc.get("history", [])),
                devices=[str(d) for d in doc.get("devices", [])],
            )
        except FileNotFoundError:
            return cls(fleet=fleet)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{path} is corrupt ({exc}); delete it to start the fleet's record over"
            ) from None

    def save(self, home: Path) -> None:
        path = home / "fleets" / f"{self.fleet}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "seq": self.seq,
            "bundle_id": self.bundle_id,
            "label": self.label,
            "history": self.history[-20:],
            "devices": sorted(self.devices),
        }
        atomic_write(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())

    def previous(self) -> Optional[dict[str, str]]:
        """The bundle the fleet ran before the current one, if any."""
        older = [h for h in self.history if h["id"] != self.bundle_id]
        return older[-1] if older else None


class FleetLink:
    """An operator's connection to one fleet. Thread-safe; handlers run on the client's thread."""

    def __init__(
        self, client: MqttClient, fleet: str, key: SigningKey, home: Path, topics: Optional[Topics] = None
    ) -> None:
        self.client = client
        self.fleet = fleet
        self.key = key
        self.home = home
        self.topics = topics or Topics()
        self.record = FleetRecord.load(home, fleet)
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
            doc = json.loads(message.payload)
            device = doc["device"]
            bundle = doc.get("bundle") or {}
            count, errors = int(doc["count"]), int(doc["errors"])
            p95 = (doc.get("latency_ms") or {}).get("p95")
            drifted = bool((doc.get("drift") or {}).get("drifted"))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self.rejected += 1
            log.warning("dropped malformed telemetry on %s: %s", message.topic, exc)
            return
        if self._window_bundle is None or bundle.get("bundle_id") != self._window_bundle:
            return
        window = self._windows.setdefault(device, _Window())
        window.count += count
        window.errors += errors
        if p95 is not None:
            window.p95_ms = max(window.p95_ms or 0.0, float(p95))
        window.drifted = window.drifted or drifted
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
        known = set(self.record.devices)
        while time.monotonic() < deadline:
            quiet = known_settle if known and known <= self.states.keys() else settle
            if not self.wait_change(min(quiet, max(0.0, deadline - time.monotonic()))):
                break
        return self.devices()

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

    def desire(self, bundle_id: str, name: str, version: str, device: Optional[str] = None) -> int:
        """Sign and publish (retained) a desired state; returns its sequence number."""
        seq = max(self.record.seq, self._seen_seq) + 1
        state = new_desired_state(
            self.fleet,
            bundle_sha256=bundle_id,
            bundle_name=name,
            bundle_version=version,
            seq=seq,
            device=device,
        )
        topic = self.topics.device_desired(device) if device else self.topics.fleet_desired(self.fleet)
        self.client.publish(topic, sign_desired_state(state, self.key), qos=1, retain=True).wait(30)
        self.record.seq = seq
        if device is None:
            self.record.bundle_id = bundle_id
            self.record.label = f"{name}@{version}"
            self.record.history = [h for h in self.record.history if h["id"] != bundle_id]
            self.record.history.append({"id": bundle_id, "label": self.record.label})
        self.record.devices = sorted(self.states)  # what the next discovery expects to hear
        self.record.save(self.home)
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
            self.desire(action.bundle_id, name, version, action.device)

    def clear_bundle(self, bundle_id: str, chunk_count: int) -> None:
        clear_bundle(self.client, bundle_id, chunk_count, self.topics)


def rollout_path(home: Path, fleet: str) -> Path:
    """Where a fleet's current rollout is saved."""
    return home / "rollouts" / f"{fleet}.json"


@contextmanager
def driving(home: Path, fleet: str, holder: str, wait: float = 0.0) -> Iterator[None]:
    """Hold the lock on ``fleet``'s rollout; RolloutError naming the holder if another process
    (or another driver in this one) has it for longer than ``wait`` seconds."""
    path = rollout_path(home, fleet).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    held = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    raise RolloutError(
                        f"the rollout of fleet {fleet} is being driven by {held}; wait for it to "
                        "finish, or stop it first"
                    ) from None
                time.sleep(0.05)  # flock has no timed wait; the holders' steps are short
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({holder})\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def step_rollout(
    link: FleetLink, rollout: Rollout, policy: RolloutPolicy, state_path: Path, labels: dict[str, str]
) -> Rollout:
    """One step: advance with what the devices say now, publish what that asks for, save (when
    the rollout changed: devices report often, download progress included; each save is two
    fsyncs, and ``rollout`` as given is the one saved last)."""
    new, actions = advance(rollout, link.reports(), policy, time.time())
    if actions:
        link.carry_out(actions, labels)
    if new != rollout or actions:
        new.save(state_path)
    return new


def run_rollout(
    link: FleetLink,
    rollout: Rollout,
    policy: RolloutPolicy,
    state_path: Path,
    labels: dict[str, str],
    *,
    timeout: float,
    on_change: Optional[Callable[[Rollout, FleetLink], None]] = None,
) -> Rollout:
    """Advance ``rollout`` until it is finished or ``timeout`` seconds pass; saved after every
    step. The caller holds :func:`driving` for the fleet."""
    deadline = time.monotonic() + timeout
    link.watch_telemetry_of(rollout.bundle_id)
    while not rollout.finished:
        rollout = step_rollout(link, rollout, policy, state_path, labels)
        if on_change is not None:
            on_change(rollout, link)
        if rollout.finished or time.monotonic() >= deadline:
            break
        link.wait_change(min(1.0, max(0.0, deadline - time.monotonic())))
    return rollout


def begin_rollout(
    link: FleetLink, bundle: Bundle, policy: RolloutPolicy, state_path: Path
) -> tuple[Rollout, dict[str, str]]:
    """Start a rollout of ``bundle`` to every device the fleet has; returns it and its labels."""
    previous = link.record.bundle_id if link.record.bundle_id != bundle.bundle_id else None
    labels = {bundle.bundle_id: bundle.manifest.label}
    if previous is not None and link.record.label:
        labels[previous] = link.record.label
    rollout, actions = start(
        link.fleet, bundle.bundle_id, bundle.manifest.label, link.reports(), previous, policy, time.time()
    )
    link.watch_telemetry_of(bundle.bundle_id)
    link.carry_out(actions, labels)
    rollout.save(state_path)
    return rollout, labels


def abort_saved_rollout(
    client: MqttClient,
    home: Path,
    fleet: str,
    key: SigningKey,
    holder: str,
    wait: float = 15.0,
    reason: str = "aborted by the operator",
) -> Rollout:
    """Stop ``fleet``'s saved rollout and send the devices it reached back to the previous
    bundle (``edgekit rollout abort`` and the dashboard's Abort button), under its lock."""
    state_path = rollout_path(home, fleet)
    with driving(home, fleet, holder, wait=wait):
        rollout = Rollout.load(state_path)
        link = FleetLink(client, fleet, key, home)
        rollout, actions = abort(rollout, reason, time.time())
        link.carry_out(actions, labels_of(rollout, link.record))
        rollout.save(state_path)
    return rollout


def rollback_target(catalog: Catalog, home: Path, fleet: str, to: Optional[str] = None) -> Bundle:
    """The bundle ``edgekit fleet rollback`` (and the dashboard's Roll back button) sends
    ``fleet`` back to: ``to`` (VERSION of the current bundle's name, or NAME@VERSION), else the
    one it ran before, from the workstation's catalog."""
    record = FleetRecord.load(home, fleet)
    if to is None:
        previous = record.previous()
        if previous is None:
            raise RolloutError(f"fleet {fleet} has no earlier bundle on record; name one with --to VERSION")
        found = catalog.find(previous["id"])
        if found is None:
            raise RolloutError(
                f"{previous['label']} is not in the catalog any more; name a version with --to"
            )
        return found[1]
    if not record.label:
        raise RolloutError(f"nothing was pushed to fleet {fleet} from here; push a bundle first")
    name, _, version = to.rpartition("@")
    return catalog.read(name or record.label.partition("@")[0], version)[1]


def start_rollback(link: FleetLink, bundle: Bundle, timeout: float) -> tuple[Rollout, dict[str, str]]:
    """Tell the whole fleet of ``link`` to go back to ``bundle`` (a rollout without canaries,
    saved); the caller holds :func:`driving`. The bundle is published again first: it may
    have been cleared from the broker since."""
    link.record = FleetRecord.load(link.home, link.fleet)
    upload = link.start_upload(bundle)
    rollout, labels = begin_rollout(
        link, bundle, RolloutPolicy(canary=0, install_timeout_s=timeout), rollout_path(link.home, link.fleet)
    )
    upload.finish()
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
            client_id=f"edgekit-operator-{int(time.time() * 1000) % 10**9}",
            username=username,
            password=password,
        ).connect(timeout=timeout)
    except BrokerError as exc:
        raise BrokerError(
            f"{exc}; set --broker, EDGEKIT_BROKER or broker in $EDGEKIT_HOME/config.toml"
        ) from None
