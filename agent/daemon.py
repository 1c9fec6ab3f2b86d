"""The agent's MQTT side: follow the signed desired state, fetch and install bundles, report.

:class:`AgentDaemon` wraps an :class:`~edgekit.agent.Agent` (which keeps serving ``predict()``
throughout) and one :class:`~edgekit.mqtt.MqttClient`:

- It subscribes to its fleet's and its own desired-state topics. Each document is verified
  (:func:`edgekit.desired.verify_desired_state`: trusted signer, this fleet/device, not
  expired, a sequence number above the last one applied, kept on disk) before anything else;
  a refused document is logged and recorded as an event, and the device keeps serving.
- A new target bundle is deployed by the state machine of :mod:`edgekit.agent.deployment`
  (fetching → verifying → installing → health-checking → serving, or rolled-back), each state
  persisted before it runs, so a kill -9 resumes in the right state: fetched from the broker's
  retained chunks into ``state_dir/downloads`` (resumable across restarts and broker outages;
  it fails on inactivity, ``download_stall_timeout`` seconds without a chunk while connected,
  not after a flat limit), verified, and installed by the agent's crash-safe pipeline (health
  check included). A newer desired state naming another bundle preempts a download in
  progress; :meth:`AgentDaemon.stop` (SIGTERM) cancels one within a fraction of a second. A
  desired state may name an older bundle: that is how an operator rolls back, so it is
  installed without the offline downgrade guard.
- It publishes its state (retained; the MQTT will marks it ``offline``): serving, downloading
  with progress, verifying, installing, or failed with the reason. Telemetry records and events
  are taken from the agent's on-disk outboxes and published with QoS 1 in ``seq`` order; a
  record is removed from disk only once the broker acknowledged it, so an outage loses nothing
  (up to the outbox bound, beyond which the drop is counted in the next record).

Threads: the MQTT client's dispatcher runs the handlers (cheap: verify, then hand over); one
worker thread fetches and installs; one uploader thread drains the outboxes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from edgekit._version import __version__
from edgekit.atomic import atomic_write
from edgekit.desired import DesiredState, decode_desired_state, verify_desired_state
from edgekit.errors import (
    BrokerError,
    ConfigError,
    DesiredStateError,
    DownloadCancelledError,
    DownloadStalledError,
    EdgekitError,
    TopicError,
    TrustMetadataError,
)
from edgekit.keys import PublicKey
from edgekit.manifest import MAX_MESSAGE_SIZE
from edgekit.mqtt import Message, MqttClient, TlsConfig, Will
from edgekit.reports import DeviceStateReport
from edgekit.topics import Topics
from edgekit.transfer import fetch_staged_bundle
from edgekit.trust import TrustedKeys

from . import deployment
from .agent import Agent
from .bench import BenchLink, describe_board, fetch_candidate
from .capture import CaptureLink
from .deployment import DeploymentRecord
from .shadow import ShadowError

if TYPE_CHECKING:
    from edgekit.roles import DeviceTrust, TrustReport

__all__ = ["AgentDaemon"]

log = logging.getLogger(__name__)

DESIRED_FILE = "desired.json"
#: Where a device in TUF mode keeps its trusted root and last verified metadata.
TRUST_DIR = "trust"
DOWNLOADS_DIR = "downloads"
UPLOAD_BATCH = 200
#: Seconds between two download progress reports of a device, at most.
PROGRESS_INTERVAL = 0.25


def _seq_of(envelope: bytes) -> Optional[int]:
    try:
        return decode_desired_state(envelope)[0].seq
    except DesiredStateError:
        return None


class _Retained:
    """The fleet's trust metadata as the broker delivered it, as a source for edgekit.roles."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self._files = files

    def root(self, version: int) -> Optional[bytes]:
        return self._files.get(f"root/{version}")

    def metadata(self, role: str) -> Optional[bytes]:
        return self._files.get(role)


class _Throttle:
    """Calls ``publish(value)`` with the latest value at most once per ``interval`` seconds, and
    once more ``interval`` after an update it held back (a trailing call), until :meth:`close`."""

    def __init__(self, publish: Callable[[float], None], interval: float) -> None:
        self._publish = publish
        self._interval = interval
        self._lock = threading.Lock()  # held while publishing: nothing is published after close()
        self._latest = 0.0
        self._last = float("-inf")
        self._timer: Optional[threading.Timer] = None
        self._closed = False

    def update(self, value: float) -> None:
        with self._lock:
            if self._closed:
                return
            self._latest = value
            wait = self._last + self._interval - time.monotonic()
            if wait > 0:
                if self._timer is None:
                    self._timer = threading.Timer(wait, self._flush)
                    self._timer.daemon = True
                    self._timer.start()
                return
            self._last = time.monotonic()
            self._publish(value)

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
            if not self._closed:
                self._last = time.monotonic()
                self._publish(self._latest)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


class AgentDaemon:
    """Connect an agent to its fleet. ``start()`` returns at once; ``stop()`` is clean."""

    def __init__(
        self,
        agent: Agent,
        *,
        client: Optional[MqttClient] = None,
        upload_interval: float = 5.0,
        fetch_timeout: Optional[float] = None,
    ) -> None:
        """``fetch_timeout``: an overall limit on one download in seconds (None, the default:
        none; a download fails on inactivity, ``download_stall_timeout``)."""
        self.agent = agent
        config = agent.config
        self.device = config.device
        self.fleet = config.fleet
        self.topics = Topics(config.topic_prefix)
        self.state_dir = Path(config.state_dir)
        self.upload_interval = upload_interval
        self.fetch_timeout = fetch_timeout
        self.refused = 0  # desired states refused (forged, replayed, expired, ...)
        #: Set each time the device starts serving what its desired state names.
        self.installed = threading.Event()
        self._trusted = config.trusted()
        self._desired = self._load_desired()
        #: What the broker holds of the fleet's TUF metadata (unverified bytes, by name).
        self._trust_files: dict[str, bytes] = {}
        self._trust_lock = threading.Lock()
        self._tuf: Optional[DeviceTrust] = self._load_tuf()
        #: The newest root version announced (trust_root_updated), the one loaded from disk at start.
        self._root_announced = self._tuf.root_version if self._tuf is not None else 0
        #: The desired role's keys in the last verified targets: what may sign a capture policy.
        self._policy_signers: tuple[PublicKey, ...] = ()
        self._frozen = False
        self._last_trust_error = ""
        #: The last report of the fleet's TUF metadata (None: not in TUF mode, or nothing yet).
        self.trust_report: Optional[TrustReport] = None
        #: Set each time the device verified a new set of TUF metadata.
        self.trust_changed = threading.Event()
        self._lock = threading.Lock()
        #: The next deployment to run, and the signed desired state that names it.
        self._target: Optional[tuple[DesiredState, bytes]] = None
        #: The deployment the worker runs (its desired state), and what cancels its download.
        self._running: Optional[DesiredState] = None
        self._cancel = threading.Event()
        self._record = self._load_deployment()
        self._wake_worker = threading.Event()
        self._wake_uploader = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._status: dict[str, Any] = {}
        self._uploaded = threading.Condition()  # notified after every upload pass
        self.client = client or self._new_client()
        #: Field-data capture: the fleet's signed policy in, sealed records out (docs/capture.md).
        self.capture = CaptureLink(agent.capture, self.client, self.topics, wake=self._wake_uploader.set)
        if self.tuf_mode:
            self._capture_under_tuf()
        #: On-fleet benchmarks: the fleet's signed request in, reports out (docs/bench.md).
        self.bench = BenchLink(
            device=self.device,
            fleet=self.fleet,
            state_dir=self.state_dir,
            trusted=self._trusted,
            board=describe_board(agent.runtime_name(), config.xnnpack),
            fetch=fetch_candidate(
                self.client,
                self.topics,
                self._trusted,
                stall_timeout=config.download_stall_timeout,
                max_size=config.max_bundle_size,
            ),
            activity=agent.serving_activity,
            authorised=self._authorised,
            on_event=agent.record_event,
            wake=self._wake_uploader.set,
        )

    # -- lifecycle --------------------------------------------------------------------------

    def _new_client(self) -> MqttClient:
        config = self.agent.config
        if not config.broker:
            raise EdgekitError(f'{config.source}: no broker configured; set broker = "mqtt://host:1883"')
        tls = None
        if config.mqtt_ca or config.mqtt_cert:
            tls = TlsConfig(ca_file=config.mqtt_ca, cert_file=config.mqtt_cert, key_file=config.mqtt_key)
        offline = DeviceStateReport(self.device, self.fleet, "offline", agent_version=__version__)
        return MqttClient(
            config.broker,
            client_id=f"edgekit-{self.device}",
            username=config.mqtt_username or None,
            password=config.mqtt_password or None,
            tls=tls,
            will=Will(self.topics.device_state(self.device), offline.to_json(), qos=1, retain=True),
            max_packet_size=MAX_MESSAGE_SIZE,  # MQTT 5: the broker drops anything larger for us
        )

    def start(self) -> AgentDaemon:
        self.client.on_connection_change(self._on_connection)
        self.client.connect(timeout=None)  # keep trying in the background; predict() never waits
        for topic in (self.topics.fleet_desired(self.fleet), self.topics.device_desired(self.device)):
            self.client.subscribe(topic, self._on_desired, qos=1, timeout=None)
        self.client.subscribe(self.topics.fleet_trust_filter(self.fleet), self._on_trust, qos=1, timeout=None)
        self.capture.start()
        self.client.subscribe(
            self.topics.fleet_bench(self.fleet),
            lambda m: self.bench.on_message(m.payload),
            qos=1,
            timeout=None,
        )
        self.bench.start()
        for name, target in (("install", self._worker), ("upload", self._uploader)):
            thread = threading.Thread(target=target, name=f"edgekit-{name}-{self.device}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker (a download in progress is cancelled, kept, and resumed at the next
        start) and the uploader, publish a last ``offline`` state, disconnect."""
        self._stop.set()
        with self._lock:
            self._cancel.set()
        self._wake_worker.set()
        self._wake_uploader.set()
        self.bench.stop(timeout)
        for thread in self._threads:
            thread.join(timeout)
        if self.client.connected:
            self.publish_state("offline", wait=2.0)  # with what it serves, which the will cannot say
        self.client.close()

    def alive(self) -> bool:
        """True while the install worker, the uploader, the bench worker and a running shadow's
        worker run (what the systemd watchdog vouches for)."""
        shadow = self.agent.shadow
        return (
            bool(self._threads)
            and all(thread.is_alive() for thread in self._threads)
            and self.bench.alive()
            and (shadow is None or shadow.alive())
        )

    def __enter__(self) -> AgentDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- desired state ------------------------------------------------------------------------

    def _load_desired(self) -> dict[str, Any]:
        path = self.state_dir / DESIRED_FILE
        try:
            doc = json.loads(path.read_bytes())
            if isinstance(doc, dict) and isinstance(doc.get("seq"), int) and not isinstance(doc["seq"], bool):
                return doc
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            pass
        # The floor below which documents are replays is lost: the next valid, unexpired document
        # is accepted as new. Said out loud, so the fleet knows this device was damaged.
        message = f"{DESIRED_FILE} is damaged; the next signed desired state is taken as new"
        log.error("device %s: %s", self.device, message)
        self.agent.record_event("store_damaged", message, None)
        with contextlib.suppress(OSError):
            path.unlink()
        return {}

    def _save_desired(self) -> None:
        """Keep what was applied on disk; on a full disk it is kept in memory only (logged)."""
        try:
            atomic_write(self.state_dir / DESIRED_FILE, json.dumps(self._desired).encode())
        except OSError as exc:
            log.error("device %s could not save %s: %s", self.device, DESIRED_FILE, exc.strerror or exc)

    @property
    def last_seq(self) -> Optional[int]:
        seq = self._desired.get("seq")
        return seq if isinstance(seq, int) else None

    def _on_desired(self, message: Message) -> None:
        if not message.payload:
            return  # a cleared retained document
        if self.tuf_mode:
            # After the move to TUF, a document signed by one key is not enough any more.
            self.refused += 1
            log.info(
                "device %s ignored a single-key desired state on %s (TUF mode)", self.device, message.topic
            )
            return
        try:
            state = verify_desired_state(
                message.payload, self._trusted, fleet=self.fleet, device=self.device, last_seq=self.last_seq
            )
        except DesiredStateError as exc:
            if getattr(exc, "reason", None) == "replayed":
                # The retained copy of the document applied last comes back on every reconnect:
                # not news. An older one (a replay, or the fleet's document after a newer
                # per-device one) is counted and logged, not reported as an event each time.
                if _seq_of(message.payload) != self.last_seq:
                    self.refused += 1
                    log.info("device %s ignored a desired state on %s: %s", self.device, message.topic, exc)
                else:
                    self._resume(message.payload)
                return
            self.refused += 1
            log.warning("device %s refused a desired state on %s: %s", self.device, message.topic, exc)
            self.agent.record_event("desired_refused", str(exc), None)
            self._wake_uploader.set()
            return
        self._accept(state, bytes(message.payload))

    def _accept(self, state: DesiredState, envelope: bytes) -> None:
        """Apply a verified desired state: ``envelope`` is what the deployment record keeps
        (the signed single-key envelope, or under TUF the document's canonical bytes)."""
        self._desired = {"seq": state.seq, "bundle": state.bundle_sha256, "version": state.bundle_version}
        self._save_desired()
        log.info(
            "device %s: desired state seq %d names %s@%s (%s)",
            self.device,
            state.seq,
            state.bundle_name,
            state.bundle_version,
            state.scope,
        )
        with self._lock:
            self._target = (state, envelope)
            running = self._running
            if running is not None and running.bundle_sha256 != state.bundle_sha256:
                # A newer desired state preempts the deployment in progress: its download stops
                # at once (an install already under way finishes first: it is short).
                log.info(
                    "device %s: desired state seq %d preempts the deployment of %s@%s",
                    self.device,
                    state.seq,
                    running.bundle_name,
                    running.bundle_version,
                )
                self._cancel.set()
        self._wake_worker.set()

    def _resume(self, envelope: bytes) -> None:
        """The document applied last, seen again (after a restart or a reconnect): if what it
        names is not served yet and did not fail to install, go on with it (a download cut by
        a restart resumes from the chunks already stored)."""
        seq = self.last_seq
        if seq is None or self._desired.get("bundle") in (self._serving_id(), self._desired.get("failed")):
            return
        try:  # the same checks as when it was applied: signature, fleet, device, expiry
            state = verify_desired_state(
                envelope, self._trusted, fleet=self.fleet, device=self.device, last_seq=seq - 1
            )
        except DesiredStateError as exc:
            log.warning("device %s cannot resume its desired state: %s", self.device, exc)
            return
        if state.bundle_sha256 != self._desired.get("bundle"):
            return  # the fleet's and the device's documents share numbers; not the one applied
        with self._lock:
            running = self._running
            if running is not None and running.bundle_sha256 == state.bundle_sha256:
                return  # the deployment resumed from disk at start is on it already
            self._target = (state, envelope)
        log.info("device %s resumes installing %s@%s", self.device, state.bundle_name, state.bundle_version)
        self._wake_worker.set()

    # -- TUF trust (edgekit.roles) ------------------------------------------------------------

    @property
    def tuf_mode(self) -> bool:
        """True once the device follows its fleet's TUF metadata (provisioned, or upgraded)."""
        return self._tuf is not None or (self.state_dir / TRUST_DIR / "root.json").exists()

    def _load_tuf(self) -> Optional[DeviceTrust]:
        directory = self.state_dir / TRUST_DIR
        configured = self.agent.config.trust_root
        if not (directory / "root.json").exists() and configured is None:
            return None
        from edgekit.roles import ROLES, DeviceTrust  # python-tuf: only on devices that use it

        local = {}
        for role in ROLES[1:]:
            with contextlib.suppress(OSError):
                local[role] = (directory / f"{role}.json").read_bytes()
        try:
            return DeviceTrust(self.fleet, self.device, (directory / "root.json").read_bytes(), local)
        except (OSError, TrustMetadataError) as exc:
            if (directory / "root.json").exists():
                message = f"trust/root.json is damaged ({exc}); starting again from the provisioned root"
                log.error("device %s: %s", self.device, message)
                self.agent.record_event("store_damaged", message, None)
        if configured is None:
            return None  # tuf_mode stays True (the directory exists): nothing single-key is applied
        try:
            return DeviceTrust(self.fleet, self.device, Path(configured).read_bytes(), local)
        except OSError as exc:
            raise ConfigError(
                f"{self.agent.config.source}: trust_root: cannot read {configured}: {exc.strerror}"
            ) from None

    def _save_trust(self, trust: DeviceTrust) -> None:
        directory = self.state_dir / TRUST_DIR
        try:
            directory.mkdir(parents=True, exist_ok=True)
            atomic_write(directory / "root.json", trust.root)
            for role, data in trust.local.items():
                atomic_write(directory / f"{role}.json", data)
        except OSError as exc:
            log.error("device %s could not save its trust metadata: %s", self.device, exc.strerror or exc)

    def _capture_under_tuf(self) -> None:
        """From now on a capture policy must be signed by a key of the fleet's desired role (the
        online key, as the verified targets lists it), not by the single key."""
        capturer = self.agent.capture
        capturer.policy_keys = self._capture_keys
        capturer.reload()

    def _capture_keys(self) -> Optional[TrustedKeys]:
        return TrustedKeys(self._policy_signers) if self._policy_signers else None

    def _authorised(self) -> Optional[frozenset[str]]:
        """Under TUF, the bundles the fleet's verified targets lists (empty until something is
        verified): the only ones a bench request or a shadow section may name. None under
        single-key trust."""
        if not self.tuf_mode:
            return None
        report = self.trust_report
        return frozenset() if report is None else report.authorised

    def _on_trust(self, message: Message) -> None:
        try:
            name = self.topics.trust_name(self.fleet, message.topic)
        except TopicError:
            self.refused += 1
            return
        with self._trust_lock:
            if message.payload:
                self._trust_files[name] = bytes(message.payload)
            else:
                self._trust_files.pop(name, None)
        if name == "upgrade":
            if message.payload and self._tuf is None and not self.tuf_mode:
                self._upgrade(bytes(message.payload))
            return
        self.check_trust()

    def _upgrade(self, data: bytes) -> None:
        from edgekit.roles import DeviceTrust, verify_trust_upgrade

        try:
            root = verify_trust_upgrade(data, self._trusted, self.fleet)
            trust = DeviceTrust(self.fleet, self.device, root)
        except TrustMetadataError as exc:
            self.refused += 1
            log.warning("device %s refused a trust upgrade: %s", self.device, exc)
            self.agent.record_event("trust_refused", str(exc), None)
            self._wake_uploader.set()
            return
        self._save_trust(trust)
        self._tuf = trust
        self._capture_under_tuf()
        message = (
            f"device {self.device} now trusts fleet {self.fleet}'s TUF root v{trust.root_version}; "
            "desired states signed by a single key are no longer applied"
        )
        log.info("%s", message)
        self.agent.record_event("trust_upgraded", message, None)
        self._wake_uploader.set()
        self.check_trust()

    def check_trust(self, now: Optional[float] = None) -> Optional[TrustReport]:
        """Verify what the broker holds of the fleet's TUF metadata; apply a new desired state.

        Called on every trust message and by the uploader's loop (so a freeze is noticed when
        nothing arrives). Returns the report, or None when nothing could be verified."""
        trust = self._tuf
        if trust is None:
            return None
        with self._trust_lock:  # the dispatcher and the uploader both call this
            return self._check_trust(trust, now)

    def _check_trust(self, trust: DeviceTrust, now: Optional[float]) -> Optional[TrustReport]:
        files = dict(self._trust_files)
        before = trust.root_version
        first = self.trust_report is None
        try:
            report = trust.refresh(_Retained(files), now=now)
        except TrustMetadataError as exc:
            if trust.root_version != before:
                self._save_trust(trust)  # the roots verified before the refused document
                self._root_updated(trust.root_version)
            if exc.reason == "incomplete":
                log.debug("device %s: %s", self.device, exc)
                return None
            self.refused += 1
            if str(exc) != self._last_trust_error:  # once per distinct refusal, not per retry
                self._last_trust_error = str(exc)
                log.warning("device %s refused its fleet's trust metadata: %s", self.device, exc)
                self.agent.record_event("trust_refused", f"device {self.device}: {exc}", None)
                self._wake_uploader.set()
            return None
        if report.changed:
            self._save_trust(trust)
            self._last_trust_error = ""
        self.trust_report = report
        if report.desired_keys and report.desired_keys != self._policy_signers:
            # The keys that may sign a capture policy appeared or changed (a report that stopped
            # short of targets, in a freeze, keeps the last ones).
            self._policy_signers = report.desired_keys
            self.agent.capture.reload()
        self._note_freeze(report)
        if report.changed & {"root", "timestamp"}:
            # The fleet sees the root version and the timestamp's expiry in the state: its
            # trust_expiry alert judges the expiry of what the device applied, so a fresh
            # timestamp (every ~12 h) is said too, else a healthy device would look stale.
            self.publish_state()
        if "root" in report.changed:
            self._root_updated(report.root_version)
        state = report.desired
        last = self.last_seq
        if state is not None and (last is None or state.seq > last):
            self._accept(state, state.to_json())
        elif (
            state is not None
            and (report.changed or first)
            and state.seq == last
            and self._desired.get("bundle") == state.bundle_sha256
            and state.bundle_sha256 not in (self._serving_id(), self._desired.get("failed"))
        ):
            with self._lock:
                running = self._running
                if self._target is None and (running is None or running.bundle_sha256 != state.bundle_sha256):
                    self._target = (state, state.to_json())
            self._wake_worker.set()
        if report.changed:
            self.trust_changed.set()
        return report

    def _root_updated(self, version: int) -> None:
        """Say once that the device trusts a newer root (also when the refresh that verified it
        then stopped short: the re-signed documents of the new root may arrive after it)."""
        if version <= self._root_announced:
            return
        self._root_announced = version
        self.agent.record_event(
            "trust_root_updated",
            f"device {self.device} now trusts root v{version} of fleet {self.fleet}",
            None,
        )
        self._wake_uploader.set()

    def _note_freeze(self, report: TrustReport) -> None:
        if report.freeze_suspected and not self._frozen:
            self._frozen = True
            expired = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(report.expires.get("timestamp", 0)))
            message = (
                f"device {self.device} has had no fresh word from fleet {self.fleet} since {expired}: "
                "someone may be holding back updates (or the fleet service is down); "
                "it keeps serving what it runs. Check that `edgekit fleet serve` runs and reaches the broker"
            )
            log.error("%s", message)
            self.agent.record_event("freeze_suspected", message, None)
            self._wake_uploader.set()
        elif not report.freeze_suspected and self._frozen:
            self._frozen = False
            self.agent.record_event(
                "freeze_ended",
                f"device {self.device} has fresh trust metadata from fleet {self.fleet} again",
                None,
            )
            self._wake_uploader.set()

    # -- install worker -----------------------------------------------------------------------

    def _serving_id(self) -> Optional[str]:
        served = self.agent.served_bundle()
        return served.bundle.bundle_id if served is not None else None

    def _worker(self) -> None:
        self._resume_deployment()
        while not self._stop.is_set():
            self._wake_worker.wait()
            self._wake_worker.clear()
            with self._lock:
                target, self._target = self._target, None
            if target is None or self._stop.is_set():
                continue
            state = target[0]
            if state.bundle_sha256 == self._desired.get("failed") and state.seq == self._desired.get("seq"):
                # The retained document came back (on the broker's thread) while the deployment
                # found on disk was being rolled back here: it names what just failed. Only a
                # new desired state retries it.
                log.info(
                    "device %s: not retrying %s@%s, which failed",
                    self.device,
                    state.bundle_name,
                    state.bundle_version,
                )
                continue
            self._deploy(*target)
            self._wake_uploader.set()

    # -- the deployment state machine (agent/deployment.py) ------------------------------------

    def _load_deployment(self) -> DeploymentRecord:
        record = deployment.load_deployment(self.state_dir)
        if record is not None:
            return record
        message = f"{deployment.DEPLOYMENT_FILE} is damaged; a deployment in progress starts again"
        log.error("device %s: %s", self.device, message)
        self.agent.record_event("store_damaged", message, None)
        return DeploymentRecord()

    def _enter(self, state: str, error: Optional[str] = None) -> None:
        """Persist the deployment's next state (before it runs), report it, and pass the
        fault-injection point of the kill -9 tests."""
        record = replace(self._record, state=state, error=error)
        try:
            record = deployment.save_deployment(self.state_dir, record)
        except OSError as exc:  # a full disk: the deployment goes on; a restart starts it again
            log.error(
                "device %s could not save %s: %s",
                self.device,
                deployment.DEPLOYMENT_FILE,
                exc.strerror or exc,
            )
        self._record = record
        log.info("device %s: deployment of %s is %s", self.device, record.label, state)
        running = self._running
        if state in (deployment.VERIFYING, deployment.INSTALLING, deployment.HEALTH_CHECKING):
            status = "verifying" if state == deployment.VERIFYING else "installing"
            self.publish_state(status, target=running)
        deployment.fault_point(state)

    def _resume_deployment(self) -> None:
        """At start, before anything else: go on with the deployment a kill or a stop cut
        short, from the state :func:`~edgekit.agent.deployment.on_restart` says."""
        found = self._record
        downloads = self.state_dir / DOWNLOADS_DIR
        for entry in downloads.iterdir() if downloads.is_dir() else ():
            if found.state not in deployment.ACTIVE or entry.name != found.bundle_id:
                shutil.rmtree(entry, ignore_errors=True)  # left by a kill after its deployment ended
        if found.state not in deployment.ACTIVE:
            deployment.fault_point(found.state)  # idle, serving, rolled-back: nothing to resume
            return
        record = deployment.on_restart(found, self._serving_id())
        log.info(
            "device %s: the deployment of %s was %s when the agent stopped; now %s",
            self.device,
            found.label,
            found.state,
            record.state,
        )
        self._record = record
        if record.state == deployment.SERVING:  # killed after the commit: done
            self._enter(deployment.SERVING)
            self.installed.set()
            self.publish_state()
            shutil.rmtree(self.state_dir / DOWNLOADS_DIR, ignore_errors=True)
            return
        if record.state == deployment.ROLLED_BACK:
            self._fail(record.bundle_id or "", record.name, record.version, record.error or "")
            return
        if record.seq is None or record.seq != self.last_seq or record.envelope is None:
            return  # a newer desired state was applied since: it comes back from the broker
        if self.tuf_mode:
            return  # under TUF the fleet's metadata names it again, verified, once it arrives
        try:  # the same checks as when it was applied: signature, fleet, device, expiry
            state = verify_desired_state(
                record.envelope, self._trusted, fleet=self.fleet, device=self.device, last_seq=record.seq - 1
            )
        except DesiredStateError as exc:
            log.warning("device %s cannot resume its deployment: %s", self.device, exc)
            return
        self._deploy(state, record.envelope, interrupted=record.interrupted)

    def _deploy(self, target: DesiredState, envelope: bytes, interrupted: int = 0) -> None:
        """Run one deployment from ``fetching`` to ``serving`` or ``rolled-back``."""
        cancel = threading.Event()
        with self._lock:
            self._running, self._cancel = target, cancel
            if self._stop.is_set():
                cancel.set()
        if self._record.bundle_id != target.bundle_sha256 or self._record.seq != target.seq:
            interrupted = 0  # a new deployment
        self._record = DeploymentRecord(
            state=deployment.IDLE,
            seq=target.seq,
            bundle_id=target.bundle_sha256,
            name=target.bundle_name,
            version=target.bundle_version,
            envelope=envelope,
            interrupted=interrupted,
        )
        ident = {
            "name": target.bundle_name,
            "version": target.bundle_version,
            "bundle_id": target.bundle_sha256,
        }
        try:
            if target.bundle_sha256 == self._serving_id():
                self._enter(deployment.SERVING)
                self.publish_state()
                self._follow_shadow(target, cancel)
                return
            self._apply(target, cancel)
            self._follow_shadow(target, cancel)
        except DownloadCancelledError:
            if self._stop.is_set():  # kept: the next start resumes it
                log.info(
                    "device %s: the download of %s@%s stops with the agent",
                    self.device,
                    target.bundle_name,
                    target.bundle_version,
                )
            else:  # preempted by a newer desired state: its space is given back
                log.info(
                    "device %s: the download of %s@%s was preempted",
                    self.device,
                    target.bundle_name,
                    target.bundle_version,
                )
                shutil.rmtree(self.state_dir / DOWNLOADS_DIR / target.bundle_sha256, ignore_errors=True)
        except DownloadStalledError as exc:  # the broker does not hold or send the chunks
            # Not marked failed: a reconnect, or the bundle published again, resumes it.
            message = f"device {self.device}: {exc}"
            log.error("%s", message)
            self.agent.record_event("download_stalled", message, ident)
            self.publish_state("failed", target=target, error=message)
        except BrokerError as exc:  # the transport, not the bundle: a reconnect resumes it
            log.warning(
                "device %s: fetching %s@%s stopped: %s",
                self.device,
                target.bundle_name,
                target.bundle_version,
                exc,
            )
        except EdgekitError as exc:
            self._fail(target.bundle_sha256, target.bundle_name, target.bundle_version, str(exc), target)
        except Exception as exc:
            log.exception("device %s: unexpected error installing %s", self.device, target.bundle_sha256[:12])
            error = f"{type(exc).__name__}: {exc}"
            self._enter(deployment.ROLLED_BACK, error)  # not marked failed: the next start retries
            self.publish_state("failed", target=target, error=error)
        finally:
            with self._lock:
                self._running = None

    def _follow_shadow(self, target: DesiredState, cancel: threading.Event) -> None:
        """Start, replace or stop the shadow evaluation the desired state asks for (docs/shadow.md):
        the candidate is fetched like a bundle, verified and loaded beside the serving model; a
        desired state without a shadow section stops a running one. Failures are reported as
        events; the serving model is never touched."""
        request = target.shadow
        if request is None or not request.asks(self.device):
            # No shadow, or one for other devices of the fleet (`push --shadow --devices N`).
            if self.agent.stop_shadow() is not None:
                log.info("device %s: the shadow evaluation stopped (the desired state has none)", self.device)
            return
        ident = {
            "name": request.bundle_name,
            "version": request.bundle_version,
            "bundle_id": request.bundle_sha256,
        }
        label = f"{request.bundle_name}@{request.bundle_version}"
        if request.until <= time.time():
            log.info("device %s: the shadow of %s has already ended", self.device, label)
            return
        running = self.agent.shadow_status()
        if (
            running is not None
            and running["candidate"]["bundle_id"] == request.bundle_sha256
            and running["state"] == "running"
        ):
            return  # the same candidate: a re-sent desired state does not restart it
        authorised = self._authorised()
        if authorised is not None and request.bundle_sha256 not in authorised:
            # Under TUF the desired role may name only bundles targets lists, the candidate too.
            message = (
                f"device {self.device} did not try {label} in the shadow: fleet {self.fleet}'s targets role "
                "does not authorise it, so nothing was fetched and the serving model carries on; authorise it "
                f"with `edgekit trust authorise BUNDLE --fleet {self.fleet}` (signed by the targets key)"
            )
            log.warning("%s", message)
            self.agent.record_event("shadow_refused", message, ident)
            return
        directory = self.state_dir / DOWNLOADS_DIR / f"shadow-{request.bundle_sha256}"
        try:
            staged = fetch_staged_bundle(
                self.client,
                request.bundle_sha256,
                self._trusted,
                directory,
                self.topics,
                timeout=self.fetch_timeout,
                stall_timeout=self.agent.config.download_stall_timeout,
                max_size=self.agent.config.max_bundle_size,
                cancel=cancel,
            )
            self.agent.start_shadow(staged, sample=request.sample, until=float(request.until))
            log.info("device %s: trying %s in the shadow of the serving model", self.device, label)
        except DownloadCancelledError:
            return
        except ShadowError as exc:  # refused with its own event (memory, shapes)
            log.error("device %s: %s", self.device, exc)
        except (EdgekitError, OSError) as exc:
            message = f"device {self.device} could not try {label} in the shadow: {exc}"
            log.error("%s", message)
            self.agent.record_event("shadow_refused", message, ident)
        finally:
            shutil.rmtree(directory, ignore_errors=True)  # the candidate's model is in memory

    def _fail(
        self,
        bundle_id: str,
        name: Optional[str],
        version: Optional[str],
        error: str,
        target: Optional[DesiredState] = None,
    ) -> None:
        """The deployment is rolled back: the bundle served before serves on; the bundle is not
        retried until a new desired state names it; its download's space is given back."""
        self._desired["failed"] = bundle_id
        self._save_desired()
        shutil.rmtree(self.state_dir / DOWNLOADS_DIR / bundle_id, ignore_errors=True)
        log.error("device %s could not install %s@%s: %s", self.device, name, version, error)
        self._enter(deployment.ROLLED_BACK, error)
        self.agent.record_event(
            "install_failed", error, {"name": name or "", "version": version or "", "bundle_id": bundle_id}
        )
        self.publish_state("failed", target=target, error=error)

    def _apply(self, target: DesiredState, cancel: threading.Event) -> None:
        downloads = self.state_dir / DOWNLOADS_DIR
        directory = downloads / target.bundle_sha256
        self._enter(deployment.FETCHING, self._record.error)
        # Where the download stands, a few times a second at most (not per chunk: every report
        # costs the device, the broker and every watching workstation), and once more soon after
        # the last chunk that arrived, so the fleet also sees where a stalled download stopped.
        reporter = _Throttle(
            lambda fraction: self.publish_state("downloading", target=target, progress=fraction),
            PROGRESS_INTERVAL,
        )
        reporter.update(0.0)
        try:
            bundle = fetch_staged_bundle(  # laid out as installed: the install moves it, no copy
                self.client,
                target.bundle_sha256,
                self._trusted,
                directory,
                self.topics,
                timeout=self.fetch_timeout,
                stall_timeout=self.agent.config.download_stall_timeout,
                max_size=self.agent.config.max_bundle_size,
                progress=lambda received, total: reporter.update(received / total if total else 1.0),
                cancel=cancel,
            )
        finally:
            reporter.close()
        # A signed, fresher desired state may name an older version: an operator's rollback.
        # Every chunk and member was checked as it arrived; the store checks the signature
        # again. The store tells each step as it begins: verifying, installing, health-checking.
        result = self.agent.install(bundle, allow_downgrade=True, step=self._enter)
        self._enter(deployment.SERVING)
        log.info("device %s now serves %s@%s", self.device, result.name, result.version)
        self.publish_state()  # say so first, clean up after
        self.installed.set()
        # Keep no download: what is served is installed (a later rollback fetches again).
        shutil.rmtree(downloads, ignore_errors=True)

    # -- state and uploads --------------------------------------------------------------------

    def publish_state(
        self,
        status: Optional[str] = None,
        *,
        target: Optional[DesiredState] = None,
        progress: Optional[float] = None,
        error: Optional[str] = None,
        wait: Optional[float] = None,
    ) -> None:
        """Publish this device's state (retained); ``wait`` seconds at most for the broker's ack."""
        served = self.agent.served_bundle()  # not status(): no disk read, no drift report
        trust, applied = self._tuf, self.trust_report
        expires = applied.expires.get("timestamp") if applied is not None else None
        report = DeviceStateReport(
            device=self.device,
            fleet=self.fleet,
            status=status or ("serving" if served is not None else "idle"),
            bundle_id=served.bundle.bundle_id if served else None,
            bundle_name=served.manifest.name if served else None,
            bundle_version=served.manifest.version if served else None,
            target_id=target.bundle_sha256 if target else None,
            target_seq=target.seq if target else None,
            progress=progress,
            error=error,
            agent_version=__version__,
            trust_root=trust.root_version if trust is not None else None,
            trust_expires=float(expires) if expires is not None else None,
        )
        if not self.client.connected:
            return  # the connection listener publishes the current state on reconnect
        try:
            delivery = self.client.publish(
                self.topics.device_state(self.device), report.to_json(), retain=True
            )
            if wait is not None:
                delivery.wait(wait)
        except BrokerError as exc:
            log.warning("device %s could not publish its state: %s", self.device, exc)

    def _on_connection(self, connected: bool, reason: str) -> None:
        if connected:
            log.info("device %s connected to the broker", self.device)
            self.publish_state()
            self._wake_uploader.set()
        elif not self._stop.is_set():  # not the clean disconnect of stop()
            log.warning("device %s lost the broker (%s); serving on, reports are queued", self.device, reason)

    def _uploader(self) -> None:
        while not self._stop.is_set():
            self._wake_uploader.wait(self.upload_interval)
            self._wake_uploader.clear()
            if self._tuf is not None:
                self.check_trust()  # cheap when nothing changed; notices a freeze
            if self.client.connected:
                self.upload()

    def wait_drained(self, timeout: Optional[float] = None) -> bool:
        """Wait until the broker has acknowledged every queued event and telemetry record
        (True), or ``timeout`` seconds pass (False)."""
        with self._uploaded:
            return self._uploaded.wait_for(
                lambda: (
                    len(self.agent.events) == 0
                    and len(self.agent.telemetry) == 0
                    and len(self.bench.outbox) == 0
                ),
                timeout,
            )

    def upload(self) -> int:
        """Publish queued events and telemetry in seq order; remove each from disk once the broker
        has it. Returns how many were delivered. Stops at the first failure (kept for next time)."""
        try:
            return self._upload()
        finally:
            with self._uploaded:
                self._uploaded.notify_all()

    def _upload(self) -> int:
        delivered = 0
        for outbox, topic in (
            (self.agent.events, self.topics.device_events(self.device)),
            (self.agent.telemetry, self.topics.device_telemetry(self.device)),
            (self.bench.outbox, self.topics.device_bench(self.device)),
        ):
            while True:
                records = outbox.peek(UPLOAD_BATCH)
                if not records:
                    break
                last = None
                try:
                    deliveries = [
                        (
                            self.client.publish(topic, json.dumps(r, separators=(",", ":")).encode(), qos=1),
                            r["seq"],
                        )
                        for r in records
                    ]
                    for delivery, seq in deliveries:
                        delivery.wait(30.0)
                        last = seq
                except BrokerError as exc:
                    log.info("device %s: upload paused (%s); records stay queued", self.device, exc)
                    if last is not None:
                        outbox.ack(last)
                    return delivered
                if last is not None:
                    delivered += outbox.ack(last)
                if len(records) < UPLOAD_BATCH:
                    break
        # Captures last, a few at a time: telemetry, events and state are never held up by them.
        if len(self.agent.events) == 0 and len(self.agent.telemetry) == 0:
            try:
                delivered += self.capture.upload()
            except BrokerError as exc:
                log.info("device %s: capture upload paused (%s); records stay held", self.device, exc)
        return delivered
