"""Many device agents in few processes: what ``edgekit fleet simulate`` runs.

Every simulated device is the real agent: an :class:`~edgekit.agent.Agent` and an
:class:`~edgekit.agent.daemon.AgentDaemon` built from its own config, with its own state
directory, device id, MQTT client (client id, credentials, will), desired-state checks,
resumable downloads, crash-safe installs, health checks, drift monitor and telemetry outbox.
What the devices of one process share is the process itself: one interpreter, the imported
code and the runtime library, so a laptop holds a fleet of hundreds.

A :class:`SimulatedFleet` can also feed its devices: ``predict_rate`` calls of ``predict()``
per device and second, on inputs drawn from ``inputs`` (real-valued samples, e.g. held-out
data) or else from the serving bundle's own health-check inputs, so telemetry (latency,
throughput, drift) flows to the fleet. Devices listed in ``drift_devices`` get the same inputs
shifted by ``drift_shift`` (times the inputs' value range), so their drift monitors see a
changed world and report it.

:func:`run_simulation` spreads configs over ``processes`` worker processes (each a
:class:`SimulatedFleet`) and runs until stopped.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import random
import signal
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from edgekit.agent_config import AgentConfig
from edgekit.errors import EdgekitError
from edgekit.healthcheck import load_healthcheck
from edgekit.runtime import dequantize

from .agent import Agent
from .daemon import AgentDaemon
from .install import LoadedBundle

__all__ = ["DEFAULT_DRIFT_SHIFT", "DeviceSummary", "SimulatedFleet", "run_simulation"]

log = logging.getLogger(__name__)

#: How often a worker process checks that its parent is still there (seconds).
ORPHAN_CHECK_S = 1.0
#: How far a drifting device's inputs are shifted, as a fraction of the inputs' value range.
DEFAULT_DRIFT_SHIFT = 0.3


@dataclass(frozen=True)
class DeviceSummary:
    """One simulated device as :meth:`SimulatedFleet.summary` reports it."""

    device: str
    fleet: str
    serving: bool
    version: Optional[str]
    bundle_id: Optional[str]
    connected: bool
    predictions: int
    drifting_inputs: bool
    xnnpack: bool  # the model runs through XNNPACK (else the runtime's built-in kernels)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Inputs:
    """Real-valued samples to feed a model, and their shifted twin for drifting devices."""

    def __init__(self, samples: np.ndarray, shift: float) -> None:
        if len(samples) == 0:
            raise EdgekitError("the simulated inputs hold no sample; give at least one")
        self.samples = samples.astype(np.float32, copy=False)
        low, high = float(self.samples.min()), float(self.samples.max())
        span = (high - low) or 1.0
        # Like a brighter camera: every value moves up, and saturates at the top of the range.
        self.shifted = np.clip(self.samples + shift * span, low, high).astype(np.float32)

    def pick(self, rng: random.Random, drifting: bool) -> np.ndarray:
        pool = self.shifted if drifting else self.samples
        sample: np.ndarray = pool[rng.randrange(len(pool))]
        return sample


class SimulatedFleet:
    """Real agents for ``configs`` (one :class:`AgentConfig` per device) in this process.

    ``start()`` creates every agent and connects its daemon (returns at once; devices connect
    in the background); ``stop()`` stops them cleanly (each publishes ``offline``). Feeding is
    optional (``predict_rate`` > 0); ``inputs`` are real-valued samples shaped like the model's
    first input without its batch axis (or with a batch axis of 1).
    """

    def __init__(
        self,
        configs: Sequence[AgentConfig],
        *,
        predict_rate: float = 0.0,
        inputs: Optional[np.ndarray] = None,
        drift_devices: Collection[str] = (),
        drift_shift: float = DEFAULT_DRIFT_SHIFT,
        upload_interval: float = 5.0,
        seed: int = 0,
    ) -> None:
        devices = [c.device for c in configs]
        if len(set(devices)) != len(devices):
            raise EdgekitError("simulated devices need distinct device ids")
        unknown = sorted(set(drift_devices) - set(devices))
        if unknown:
            raise EdgekitError(f"--drift-device {unknown[0]} is not one of the simulated devices")
        if predict_rate < 0:
            raise EdgekitError(f"the predict rate must be 0 or more, not {predict_rate:g}")
        self.configs = list(configs)
        self.predict_rate = predict_rate
        self.drift_devices = frozenset(drift_devices)
        self.drift_shift = drift_shift
        self.upload_interval = upload_interval
        self._given = _Inputs(inputs, drift_shift) if inputs is not None else None
        self._by_bundle: dict[str, Optional[_Inputs]] = {}  # health-check inputs per bundle id
        self._rng = random.Random(seed)
        self.daemons: list[AgentDaemon] = []
        self.predictions: dict[str, int] = dict.fromkeys(devices, 0)
        self.predict_errors = 0
        self._stop = threading.Event()
        self._feeder: Optional[threading.Thread] = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> SimulatedFleet:
        try:
            for config in self.configs:
                agent = Agent(config)
                try:
                    daemon = AgentDaemon(agent, upload_interval=self.upload_interval)
                except BaseException:
                    agent.close()
                    raise
                self.daemons.append(daemon.start())
        except BaseException:
            self.stop()
            raise
        if self.predict_rate > 0:
            self._feeder = threading.Thread(target=self._feed, name="edgekit-simulate-feeder", daemon=True)
            self._feeder.start()
        log.info("simulating %d devices in this process", len(self.daemons))
        return self

    def stop(self) -> None:
        """Stop feeding, then every daemon (a last ``offline`` state each) and agent."""
        self._stop.set()
        if self._feeder is not None:
            self._feeder.join()
            self._feeder = None
        # Stopping is mostly waiting (threads, the broker's acks): do it for all devices at once.
        stoppers = [
            threading.Thread(target=_stop_device, args=(d,), name=f"edgekit-stop-{d.device}")
            for d in self.daemons
        ]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        self.daemons = []

    def __enter__(self) -> SimulatedFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the devices do --------------------------------------------------------------------

    def wait_connected(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for every device to be connected; returns how many are."""
        deadline = time.monotonic() + timeout
        for daemon in self.daemons:
            daemon.client.wait_connected(max(0.0, deadline - time.monotonic()))
        return sum(d.client.connected for d in self.daemons)

    def wait_serving(self, bundle_id: Optional[str] = None, timeout: Optional[float] = None) -> bool:
        """Block until every device serves ``bundle_id`` (any bundle when None); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for daemon in self.daemons:
            while True:
                status = daemon.agent.status()
                if status.serving and (bundle_id is None or status.bundle_id == bundle_id):
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                daemon.installed.clear()
                status = daemon.agent.status()  # it may have changed before the event was cleared
                if status.serving and (bundle_id is None or status.bundle_id == bundle_id):
                    break
                daemon.installed.wait(remaining)
        return True

    def summary(self) -> list[DeviceSummary]:
        result = []
        for daemon in self.daemons:
            status = daemon.agent.status()
            result.append(
                DeviceSummary(
                    device=daemon.device,
                    fleet=daemon.fleet,
                    serving=status.serving,
                    version=status.version,
                    bundle_id=status.bundle_id,
                    connected=daemon.client.connected,
                    predictions=self.predictions[daemon.device],
                    drifting_inputs=daemon.device in self.drift_devices,
                    xnnpack=status.xnnpack,
                )
            )
        return result

    def _inputs_for(self, loaded: LoadedBundle) -> Optional[_Inputs]:
        if self._given is not None:
            return self._given
        bundle_id = loaded.bundle.bundle_id
        if bundle_id not in self._by_bundle:
            self._by_bundle[bundle_id] = _healthcheck_inputs(loaded, self.drift_shift)
        return self._by_bundle[bundle_id]

    def _feed(self) -> None:
        """One thread calls predict() on every serving device, ``predict_rate`` rounds a second."""
        period = 1.0 / self.predict_rate
        next_round = time.monotonic()
        while not self._stop.is_set():
            for daemon in list(self.daemons):
                agent = daemon.agent
                loaded = agent.served_bundle()
                if loaded is None:
                    continue
                inputs = self._inputs_for(loaded)
                if inputs is None:
                    continue
                try:
                    agent.predict(inputs.pick(self._rng, daemon.device in self.drift_devices))
                except EdgekitError as exc:  # a model that takes other inputs: counted, logged once
                    self.predict_errors += 1
                    if self.predict_errors == 1:
                        log.warning("device %s refused a simulated input: %s", daemon.device, exc)
                    continue
                self.predictions[daemon.device] += 1
            next_round += period
            wait = next_round - time.monotonic()
            if wait < 0:  # behind (too many devices for this rate): go on from now
                next_round = time.monotonic()
                continue
            self._stop.wait(wait)


def _stop_device(daemon: AgentDaemon) -> None:
    try:
        daemon.stop()
    finally:
        daemon.agent.close()


def _healthcheck_inputs(loaded: LoadedBundle, shift: float) -> Optional[_Inputs]:
    """The served bundle's health-check inputs (first input), as real values; None if it has none."""
    manifest, directory = loaded.manifest, loaded.directory
    try:
        entry = manifest.file("healthcheck")
        if entry is None or not manifest.inputs:
            return None
        feeds, _ = load_healthcheck((directory / entry.name).read_bytes(), len(manifest.inputs), 0)
    except (OSError, EdgekitError) as exc:
        log.warning("no simulated inputs for bundle %s: %s", directory.name, exc)
        return None
    spec = manifest.inputs[0]
    values = dequantize(feeds[0], spec) if spec.quantized else feeds[0]
    return _Inputs(np.asarray(values, dtype=np.float32), shift)


# -- several processes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    predict_rate: float
    inputs: Optional[np.ndarray]
    drift_devices: frozenset[str]
    drift_shift: float
    overrides: dict[str, Any]
    connect_timeout: float


def _worker(paths: list[str], options: _Options, index: int, parent: int, stop: Any, ready: Any) -> None:
    """One worker process: its share of the devices until the parent says stop (or is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    logging.basicConfig(
        level=logging.WARNING, format=f"[simulate {index}] %(levelname)s %(name)s: %(message)s"
    )
    try:
        fleet = _fleet([Path(p) for p in paths], options).start()
    except EdgekitError as exc:
        ready.put((index, str(exc)))
        return
    except Exception as exc:  # the parent waits for an answer: never leave it without one
        ready.put((index, f"simulate worker {index} failed to start: {type(exc).__name__}: {exc}"))
        raise
    ready.put((index, fleet.wait_connected(options.connect_timeout)))
    while not stop.wait(ORPHAN_CHECK_S):
        if os.getppid() != parent:  # the parent was killed: do not run on as an orphan
            break
    summaries = [s.to_dict() for s in fleet.summary()]
    fleet.stop()
    ready.put((index, summaries))


def _fleet(paths: Sequence[Path], options: _Options) -> SimulatedFleet:
    configs = [AgentConfig.load(path, **options.overrides) for path in paths]
    return SimulatedFleet(
        configs,
        predict_rate=options.predict_rate,
        inputs=options.inputs,
        drift_devices=options.drift_devices & {c.device for c in configs},
        drift_shift=options.drift_shift,
    )


def run_simulation(
    config_paths: Sequence[Path],
    *,
    processes: int = 1,
    predict_rate: float = 0.0,
    inputs: Optional[np.ndarray] = None,
    drift_devices: Collection[str] = (),
    drift_shift: float = DEFAULT_DRIFT_SHIFT,
    overrides: Optional[dict[str, Any]] = None,
    stop: Optional[threading.Event] = None,
    on_ready: Optional[Callable[[int], None]] = None,
    connect_timeout: float = 30.0,
) -> list[DeviceSummary]:
    """Run the devices of ``config_paths`` (agent configs) until ``stop`` is set, spread over
    ``processes`` processes (1: this one). ``overrides`` are :meth:`AgentConfig.load` keywords
    for every device (e.g. ``threads=1``). ``on_ready(connected)`` is called once every device
    started and connected (or ``connect_timeout`` passed; they keep trying). Returns each
    device's last summary."""
    if processes < 1:
        raise EdgekitError(f"--processes must be 1 or more, not {processes}")
    # Load every config here first, so that a bad one is reported before anything starts.
    devices = {AgentConfig.load(path, **(overrides or {})).device for path in config_paths}
    unknown = sorted(set(drift_devices) - devices)
    if unknown:
        raise EdgekitError(f"--drift-device {unknown[0]} is not one of the simulated devices")
    options = _Options(
        predict_rate, inputs, frozenset(drift_devices), drift_shift, dict(overrides or {}), connect_timeout
    )
    stop = stop or threading.Event()
    processes = min(processes, max(1, len(config_paths)))
    if processes == 1:
        fleet = _fleet(config_paths, options).start()
        try:
            connected = fleet.wait_connected(connect_timeout)
            if on_ready is not None:
                on_ready(connected)
            stop.wait()
            return fleet.summary()
        finally:
            fleet.stop()
    ctx = multiprocessing.get_context("spawn")
    stop_all, ready = ctx.Event(), ctx.Queue()
    shares = [[str(p) for p in config_paths[i::processes]] for i in range(processes)]
    workers = [
        ctx.Process(
            target=_worker,
            args=(share, options, i, os.getpid(), stop_all, ready),
            name=f"edgekit-simulate-{i}",
        )
        for i, share in enumerate(shares)
    ]
    for worker in workers:
        worker.start()
    summaries: list[DeviceSummary] = []
    try:
        failures, connected = [], 0
        answered: set[int] = set()
        while len(answered) < len(workers):
            try:
                index, answer = ready.get(timeout=1.0)
            except queue.Empty:
                if stop.is_set():
                    break
                dead = [i for i, w in enumerate(workers) if i not in answered and w.exitcode is not None]
                if dead:
                    raise EdgekitError(
                        f"simulate worker {dead[0]} exited with {workers[dead[0]].exitcode} before it started"
                    ) from None
                continue
            answered.add(index)
            if isinstance(answer, str):
                failures.append(answer)
            else:
                connected += answer
        if failures:
            raise EdgekitError(failures[0])
        if on_ready is not None:
            on_ready(connected)
        stop.wait()
    finally:
        stop_all.set()
        for _ in range(sum(w.is_alive() for w in workers)):
            try:
                _, result = ready.get(timeout=60)
            except queue.Empty:  # a worker that died without a summary
                break
            if isinstance(result, list):
                summaries += [DeviceSummary(**doc) for doc in result]
        for worker in workers:
            worker.join(30)
    return sorted(summaries, key=lambda s: s.device)
