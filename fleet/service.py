"""The fleet service: ingest worker processes + the dashboard + metrics, started and stopped as one.

:class:`FleetService` is what ``edgekit fleet serve`` (and ``edgekit fleet up``) run:

- the registry is opened (and migrated) once, in this process, before anything else starts;
- ``workers`` ingest processes (:mod:`edgekit.fleet.ingest`), started with ``spawn``. With more
  than one they join the MQTT 5 shared subscription group ``group`` for telemetry and events,
  so the broker splits those messages between them; worker 0 alone follows device state (which
  is retained, and retained messages never reach a shared subscription). A worker that dies is
  restarted (with backoff) until the service stops;
- the dashboard (:func:`edgekit.fleet.dashboard.create_app`) under uvicorn, on a socket this
  process binds itself, so a busy port is a one-line error, not a traceback;
- the rollout controller (:class:`edgekit.fleet.controller.RolloutController`), which drives
  saved rollouts that nobody drives (``controller=True``, with ``home``);
- with ``home`` holding fleets' TUF repositories (``edgekit trust init``), a thread that
  re-signs and publishes their online roles (timestamp, snapshot, desired) before they expire
  (:func:`edgekit.fleet.trustrepo.keep_fresh`), with each fleet's online key;
- the alert evaluator and dispatcher (:class:`edgekit.fleet.alerts.Alerting`, ``alerts=True``,
  with ``home``), here in the service process: one evaluator however many workers there are
  (and the ``alert-evaluator`` leader lock keeps it to one across services sharing a registry);
- every MQTT connection uses the URL's account, else the operator account under ``home``;
- **metrics across processes**: each worker sends the increase of its counters (telemetry
  ingested and duplicates, events, states, rejections by kind and reason, database errors)
  every ``report_interval`` seconds, and once more after its final flush, over a
  ``multiprocessing`` queue. This process adds them to the one :class:`FleetMetrics` that
  ``/metrics`` renders, so counters are totals over all workers and survive a worker restart.

:meth:`FleetService.stop` (the CLI calls it on Ctrl-C or SIGTERM) stops the dashboard, then
asks every worker to stop: each disconnects, writes what it holds (the final flush), reports
its last counts and exits.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any, Optional

from edgekit.errors import ConfigError, EdgekitError
from edgekit.mqtt import MqttClient, parse_broker_url
from edgekit.topics import DEFAULT_PREFIX, Topics

from .accounts import Accounts
from .dashboard import FleetMetrics, check_bind, create_app
from .ingest import DEFAULT_BATCH_SIZE, DEFAULT_MAX_DELAY, Ingest, IngestStats, ingest_client
from .push import operator_login
from .registry import Registry

__all__ = ["FleetService", "ServiceConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceConfig:
    """What ``edgekit fleet serve`` takes. ``http_port=0`` picks a free port."""

    broker: str
    registry: str
    workers: int = 1
    host: str = "127.0.0.1"
    http_port: int = 8765
    token: Optional[str] = field(default=None, repr=False)
    group: str = "edgekit-ingest"
    prefix: str = DEFAULT_PREFIX
    batch_size: int = DEFAULT_BATCH_SIZE
    max_delay: float = DEFAULT_MAX_DELAY
    session_expiry: int = 0
    report_interval: float = 1.0
    log_level: str = "WARNING"
    ready_timeout: float = 60.0
    dashboard: bool = True
    #: Run the rollout controller (:mod:`edgekit.fleet.controller`) in the service process.
    controller: bool = True
    #: EDGEKIT_HOME: the operator account (``broker/operator.json``), keys and saved rollouts.
    home: Optional[str] = None
    #: The ingest workers read MQTT with edgekit's own read side (False: the MQTT library's; for measuring).
    fast_read: bool = True
    #: Seconds between two checks of the fleets' online TUF roles (re-signed before they expire).
    trust_interval: float = 60.0
    #: Evaluate alert rules and deliver alerts (:mod:`edgekit.fleet.alerts`), with ``home``.
    alerts: bool = True
    #: Seconds between two evaluations of the alert rules.
    alert_interval: float = 2.0
    #: The dashboard's address as the owner reaches it (links in alerts); default: where it listens.
    public_url: Optional[str] = None

    def validate(self) -> None:
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"--workers {self.workers}: use 1 to 64 ingest processes")
        if self.workers > 1 and parse_broker_url(self.broker).protocol == "3.1.1":
            raise ConfigError(
                "--workers above 1 needs MQTT 5 shared subscriptions, and the broker URL says "
                "?protocol=3.1.1; use one worker, or an MQTT 5 broker (Mosquitto, EMQX)"
            )
        if not 0.05 <= self.alert_interval <= 3600:
            raise ConfigError(f"alert interval {self.alert_interval:g}s: use 0.05 to 3600 seconds")
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"--public-url {self.public_url}: use the dashboard's http:// or https:// address"
            )
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(
                f"--http-port {self.http_port}: use a TCP port from 1 to 65535 (0: any free port)"
            )
        Topics(self.prefix)


def _worker_main(
    config: ServiceConfig, index: int, stop: ProcessEvent, reports: multiprocessing.Queue[Any]
) -> None:
    """One ingest process: runs until ``stop`` is set (or it gets SIGTERM), then flushes."""
    logging.basicConfig(level=config.log_level, format=f"%(levelname)s ingest-{index} %(name)s: %(message)s")
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the service, which stops us in order
    # SIGTERM (systemd, `timeout` and the like signal the whole process group) only raises a
    # flag: Event.set() in the handler would wait for the lock that the interrupted
    # stop.wait() holds, for ever.
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: terminated.set())
    registry = Registry(config.registry, migrate=False)
    shared = config.workers > 1
    # A persistent session must be found again under the same id; a clean one gets a unique id so
    # two services (or a restarted worker) never take each other's connection.
    suffix = str(index) if config.session_expiry else f"{index}-{uuid.uuid4().hex[:8]}"
    username, password = operator_login(config.broker, None, None, Path(config.home) if config.home else None)
    client = ingest_client(
        config.broker,
        protocol="5" if shared else None,  # start() found that the broker speaks it
        client_id=f"{config.group}-{suffix}",
        session_expiry=config.session_expiry,
        username=username,
        password=password,
        fast_read=config.fast_read,
    )
    ingest = Ingest(
        registry,
        client,
        topics=Topics(config.prefix),
        shared_group=config.group if shared else None,
        owns_state=index == 0,
        batch_size=config.batch_size,
        max_delay=config.max_delay,
    )
    reported = IngestStats()

    def report() -> None:
        nonlocal reported
        now = ingest.snapshot()
        delta, reported = now.minus(reported), now
        if delta != IngestStats():
            log.debug("ingest worker %d: %s", index, now)
            reports.put((index, delta))

    ingest.start()
    sink = None
    if index == 0:  # one process keeps the devices' capture records (ciphertext; docs/capture.md)
        from edgekit.mqtt import MqttClient

        from .capture import CaptureSink

        sink = CaptureSink(
            registry,
            MqttClient(
                config.broker,
                client_id=f"{config.group}-capture-{uuid.uuid4().hex[:8]}",
                username=username,
                password=password,
            ),
            Topics(config.prefix),
        ).start(connect_timeout=None)
    # Ready once connected, or once messages flow: a persistent session's backlog arrives before
    # the broker acknowledges the renewed subscriptions (which "connected" waits for).
    deadline = time.monotonic() + config.ready_timeout
    while time.monotonic() < deadline and not stop.is_set() and not terminated.is_set():
        if ingest.client.wait_connected(0.2) or ingest.snapshot().received:
            reports.put((index, "ready"))
            break
    try:
        while not stop.wait(config.report_interval) and not terminated.is_set():
            report()
            if os.getppid() != parent:  # the service was killed (-9): flush and go, not linger
                log.warning("ingest worker %d: the service process is gone; stopping", index)
                break
    finally:
        ingest.stop()
        if sink is not None:
            sink.stop()
        if os.getppid() != parent:
            reports.cancel_join_thread()  # nobody reads the counts any more: do not wait on them
        report()
        reports.put((index, None))  # this worker is done
        registry.close()


class FleetService:
    """Ingest workers + dashboard + metrics. ``start()`` returns once all are up."""

    def __init__(self, config: ServiceConfig) -> None:
        config.validate()
        self.config = config
        self.registry = Registry(config.registry)  # migrated here, once, before the workers start
        if config.dashboard:
            try:
                check_bind(config.host, config.token, Accounts(self.registry).any())
            except ConfigError:
                self.registry.close()
                raise
        self.metrics = FleetMetrics(self.registry)
        #: Counts over every worker, as reported so far.
        self.totals = IngestStats()
        self.url: Optional[str] = None
        self._context = multiprocessing.get_context("spawn")
        self._stop = self._context.Event()
        self._reports: multiprocessing.Queue[Any] = self._context.Queue()
        self._workers: dict[int, multiprocessing.process.BaseProcess] = {}
        self._done: set[int] = set()
        self._ready: set[int] = set()
        self._lock = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._server: Any = None
        self._controller: Any = None
        self._keeper_stop = threading.Event()
        self.alerting: Any = None
        self._socket: Optional[socket.socket] = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, connect_timeout: float = 10.0) -> FleetService:
        # Fail fast, with one line, on a broker that is not there or refuses us.
        home = Path(self.config.home) if self.config.home else None
        username, password = operator_login(self.config.broker, None, None, home)
        probe = MqttClient(
            self.config.broker,
            client_id=f"edgekit-check-{uuid.uuid4().hex[:8]}",
            username=username,
            password=password,
        ).connect(connect_timeout)
        probe.close()
        if self.config.workers > 1 and probe.protocol != "5":
            raise ConfigError(
                f"--workers above 1 needs MQTT 5 shared subscriptions, and the broker at "
                f"{probe.url} speaks only MQTT {probe.protocol}; use one worker, or an MQTT 5 "
                "broker (Mosquitto, EMQX)"
            )
        if self.config.dashboard:
            self._socket = self._listen()
        for index in range(self.config.workers):
            self._spawn(index)
        for target, name in ((self._pump, "metrics"), (self._supervise, "supervisor")):
            thread = threading.Thread(target=target, name=f"edgekit-service-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        # Return (and let the CLI print the URLs) only once every worker is connected and
        # subscribed: nothing published after that is missed.
        with self._lock:
            ready = self._lock.wait_for(
                lambda: len(self._ready) == self.config.workers, self.config.ready_timeout
            )
        if not ready:
            self.stop()
            raise ConfigError(
                f"the ingest workers did not connect to {self.config.broker} within "
                f"{self.config.ready_timeout:g}s; see the log above"
            )
        if self.config.controller and home is not None:
            from .control import ControlPlane, operator_name
            from .controller import RolloutController

            # The controller reads rollouts and fleet records, never the catalog: no keys to trust.
            control = ControlPlane(self.registry, actor=f"fleet serve ({operator_name()})")
            self._controller = RolloutController(self.config.broker, home, control).start()
        if home is not None and (home / "trust").is_dir():
            thread = threading.Thread(
                target=self._keep_trust, args=(home,), name="edgekit-service-trust", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        if self.config.alerts and home is not None:
            from .alerts import Alerting

            link = self.config.public_url or self.url
            self.alerting = Alerting(
                self.registry, home, interval=self.config.alert_interval, link_base=link
            ).start()
        if self._socket is not None:
            self._serve_dashboard(self._socket)
        return self

    def _keep_trust(self, home: Path) -> None:
        """Every ``trust_interval`` seconds: re-sign and publish the online TUF roles (timestamp,
        snapshot, desired) of every fleet under ``home/trust`` before they expire."""
        from edgekit.keys import load_signing_key

        from .push import connect_operator
        from .trustrepo import keep_fresh

        topics = Topics(self.config.prefix)
        client: Optional[MqttClient] = None

        def publish(fleet: str, role: str, data: bytes) -> None:
            nonlocal client
            if client is None:
                client = connect_operator(self.config.broker, home=home)
            client.publish(topics.fleet_trust(fleet, role), data, retain=True).wait(30)

        try:
            while True:
                try:
                    done = keep_fresh(
                        home, publish, lambda name: load_signing_key(home, name), now=time.time()
                    )
                    for fleet, roles in done.items():
                        log.info("re-signed and published %s of fleet %s", ", ".join(roles), fleet)
                except EdgekitError as exc:  # the broker is away: try again next time
                    log.error("could not publish fresh trust metadata: %s", exc)
                if self._keeper_stop.wait(self.config.trust_interval):
                    return
        finally:
            if client is not None:
                client.close()

    def _listen(self) -> socket.socket:
        host, port = self.config.host, self.config.http_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"the dashboard cannot listen on {host}:{port} ({exc.strerror}); choose another --http-port or --host"
            ) from None
        sock.listen(128)
        sock.set_inheritable(True)
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound}/"
        return sock

    def _serve_dashboard(self, sock: socket.socket) -> None:
        import uvicorn

        from .api import ApiContext

        home = Path(self.config.home) if self.config.home else None
        username, password = operator_login(self.config.broker, None, None, home)
        api = ApiContext(self.registry, self.config.broker, home, username, password, token=self.config.token)
        app = create_app(self.registry, self.metrics, token=self.config.token, api=api)
        config = uvicorn.Config(app, log_level=self.config.log_level.lower(), access_log=False)
        self._server = uvicorn.Server(config)
        thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="edgekit-dashboard", daemon=True
        )
        thread.start()
        self._threads.append(thread)
        while not self._server.started and thread.is_alive():
            time.sleep(0.02)  # uvicorn offers no event for "listening"; bounded by its startup

    def _spawn(self, index: int) -> None:
        process = self._context.Process(
            target=_worker_main,
            args=(self.config, index, self._stop, self._reports),
            name=f"edgekit-ingest-{index}",
        )
        process.start()
        self._workers[index] = process
        log.info("ingest worker %d started (pid %s)", index, process.pid)

    def stop(self, timeout: float = 60.0) -> IngestStats:
        """Stop the dashboard, then the workers after their final flush; return the totals."""
        with self._lock:
            if self._stopping:
                return self.totals
            self._stopping = True
        if self._server is not None:
            self._server.should_exit = True
        if self._controller is not None:
            self._controller.stop()  # finishes the step under way; the rollouts stay saved
        self._keeper_stop.set()
        if self.alerting is not None:
            self.alerting.stop()  # queued deliveries stay in the registry for the next start
        self._stop.set()
        deadline = time.monotonic() + timeout
        for process in self._workers.values():
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                log.error("ingest worker %s did not stop in time; terminating it", process.name)
                process.terminate()
                process.join(5)
        # Every worker's last report is in once its "done" marker arrived; a worker that crashed
        # or was terminated sends none, so only those that exited cleanly are waited for.
        clean = {i for i, process in self._workers.items() if process.exitcode == 0}
        with self._lock:
            self._lock.wait_for(lambda: self._done >= clean, max(0.1, deadline - time.monotonic()))
        self._reports.put(None)
        for thread in self._threads:
            thread.join(10)
        if self._socket is not None:
            self._socket.close()
        self.registry.close()
        return self.totals

    # -- threads ------------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Add every worker's counter increases to the service's metrics and totals."""
        metrics = self.metrics
        while True:
            item = self._reports.get()
            if item is None:
                return
            index, delta = item
            if delta is None or delta == "ready":
                with self._lock:
                    (self._done if delta is None else self._ready).add(index)
                    self._lock.notify_all()
                continue
            metrics.ingested.inc(delta.telemetry)
            metrics.duplicates.inc(delta.telemetry_duplicates)
            metrics.events.inc(delta.events)
            metrics.states.inc(delta.states)
            metrics.db_errors.inc(delta.db_errors)
            for (kind, reason), n in delta.rejected.items():
                metrics.rejected.labels(kind=kind, reason=reason).inc(n)
            with self._lock:
                self.totals.add(delta)
                self._lock.notify_all()

    def _supervise(self) -> None:
        backoff: dict[int, float] = {}
        while not self._stop.wait(1.0):
            for index, process in list(self._workers.items()):
                if process.is_alive() or self._stop.is_set():
                    continue
                delay = backoff.get(index, 1.0)
                log.error(
                    "ingest worker %d exited (code %s); restarting it in %.0fs",
                    index,
                    process.exitcode,
                    delay,
                )
                if self._stop.wait(delay):
                    return
                backoff[index] = min(delay * 2, 60.0)
                self._spawn(index)

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> bool:
        """Block until ``predicate(totals)`` holds; False on timeout (tests use it)."""
        with self._lock:
            return bool(self._lock.wait_for(lambda: predicate(self.totals), timeout))

    @property
    def worker_pids(self) -> list[Optional[int]]:
        return [p.pid for p in self._workers.values()]
