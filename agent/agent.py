"""The embeddable agent: serve the installed model, watch it for drift, queue telemetry.

    from edgekit.agent import Agent

    agent = Agent.from_config("agent.toml")
    scores = agent.predict(image)            # [array of shape (1, 10)]: outputs in model order
    by_name = agent.predict(image, as_dict=True)
    agent.drift().drifted
    agent.status()
    agent.close()

``predict(x)`` is thread-safe (one interpreter, one lock held only around
set_tensor/invoke/get_tensor), needs no network, and returns a **list of numpy arrays, one per
model output, in the model's output order**, each with the model's output shape (batch axis
included, e.g. ``(1, 10)``); with ``as_dict=True`` a dict from output tensor name to array.
``x`` is one array for a single-input model (the model's input shape, or the per-sample
shape without the batch axis of 1), or a list (input order) or dict (by name) of arrays.
Real-valued inputs to a quantized model are quantized with the model's own scale and
zero-point, and quantized outputs are dequantized to float32; ``raw=True`` feeds and returns
the model's own integer tensors untouched.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from edgekit.agent_config import AgentConfig
from edgekit.bundle import Bundle, read_bundle, verify_manifest_signature
from edgekit.errors import BundleError, DataError, EdgekitError, InstallError, RuntimeUnavailableError
from edgekit.runtime import dequantize, quantize, resolve_runtime
from edgekit.tflite import TensorSpec

if TYPE_CHECKING:  # edgekit.transfer and its MQTT client load only in agents that fetch from a fleet
    from edgekit.transfer import StagedBundle
    from edgekit.trust import TrustedKeys

from .capture import CaptureClock, CaptureFilter, Capturer
from .drift import DriftMonitor, DriftReport
from .install import (
    POINTER_FILE,
    BundleSource,
    BundleStore,
    InstallResult,
    LoadedBundle,
    StepSink,
    _is_staged,
)
from .outbox import Outbox
from .shadow import DEFAULT_CPU_BUDGET, DEFAULT_HANG_SECONDS, Shadow, ShadowError
from .telemetry import LATENCY_CAP, Event, LatencyRecorder, SystemSampler, TelemetryRecord

__all__ = ["Agent", "AgentStatus"]

log = logging.getLogger(__name__)

_clock = time.perf_counter
_random = random.random
#: The calling thread's CPU time: what a shadow compares of the two models (docs/shadow.md).
_cpu = time.thread_time

Inputs = Union[np.ndarray, Sequence[np.ndarray], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class AgentStatus:
    """What ``edgekit-agent status`` shows."""

    device: str
    fleet: str
    state_dir: str
    serving: bool
    name: str | None
    version: str | None
    bundle_id: str | None  # SHA-256 of the signed manifest
    previous: str | None  # directory name of the previous bundle, kept for rollback
    runtime: str | None
    xnnpack: bool  # the served model runs through XNNPACK (else built-in kernels); none served: the config's
    threads: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    telemetry_queued: int
    events_queued: int
    drift: dict[str, Any] | None
    #: What the drift monitor checks: ``off`` (no baseline in the bundle), ``inputs and outputs``
    #: (no calibration in the bundle: no accuracy estimate), ``inputs, outputs and accuracy``.
    drift_checks: str = "off"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Served:
    """The serving model with everything predict() needs precomputed."""

    def __init__(self, loaded: LoadedBundle, config: AgentConfig) -> None:
        model = loaded.model
        self.set_tensor, self.invoke, self.get_tensor = model.set_tensor, model.invoke, model.get_tensor
        manifest = loaded.manifest
        by_name = {spec.name: spec for spec in manifest.inputs}
        self.in_specs: list[TensorSpec] = [
            by_name.get(d["name"], manifest.inputs[0]) for d in model.input_details
        ]
        out_by_name = {spec.name: spec for spec in manifest.outputs}
        self.out_specs: list[TensorSpec] = [
            out_by_name.get(d["name"], manifest.outputs[0]) for d in model.output_details
        ]
        self.in_idx = [int(d["index"]) for d in model.input_details]
        self.out_idx = [int(d["index"]) for d in model.output_details]
        self.in_shapes = [tuple(int(v) for v in d["shape"]) for d in model.input_details]
        self.in_dtypes = [np.dtype(d["dtype"]) for d in model.input_details]
        self.single = len(self.in_idx) == 1 and len(self.out_idx) == 1
        # The fast path: one input, one output, fed an array of exactly the model's shape and dtype.
        self.shape0 = self.in_shapes[0]
        self.dtype0 = self.in_dtypes[0]
        self.i0 = self.in_idx[0]
        self.o0 = self.out_idx[0]
        self.name0 = str(model.output_details[0]["name"])
        self.fast = self.single
        self.deq0 = self.out_specs[0] if self.out_specs[0].quantized else None
        self.any_quantized_out = any(spec.quantized for spec in self.out_specs)
        self.out_names = [str(d["name"]) for d in model.output_details]
        self.in_names = [str(d["name"]) for d in model.input_details]
        baseline = loaded.bundle.baseline()
        calibration = loaded.bundle.calibration()
        labels = loaded.bundle.member("labels")
        # Serving needs the model (the runtime holds its own copy) and the manifest, not the
        # member bytes: drop them so a device does not keep a second copy of the bundle in memory.
        self.loaded = dataclasses.replace(loaded, bundle=dataclasses.replace(loaded.bundle, members={}))
        self.model = model
        self.drift: DriftMonitor | None = None
        if baseline is not None and baseline.features:
            self.drift = DriftMonitor(
                baseline,
                config.drift_window,
                config.drift_psi_threshold,
                config.drift_ks_threshold,
                input_spec=self.in_specs[0],
                calibration=calibration,
                labels=labels.decode("utf-8").splitlines() if labels is not None else None,
            )
        self.rate = config.drift_sample_rate if self.drift is not None else 0.0

    def _feed(self, i: int, value: Any, raw: bool) -> np.ndarray:
        shape, dtype, spec = self.in_shapes[i], self.in_dtypes[i], self.in_specs[i]
        array = np.asarray(value)
        if array.shape != shape:
            if int(np.prod(array.shape)) == int(np.prod(shape)) and array.shape == shape[1:]:
                array = array.reshape(shape)
            else:
                raise DataError(
                    f"input {spec.name!r} must have shape {list(shape)} (or {list(shape[1:])}), got {list(array.shape)}"
                )
        if array.dtype == dtype:
            return array
        if raw:
            raise DataError(f"raw input {spec.name!r} must be {dtype.name}, got {array.dtype.name}")
        if spec.quantized:
            return quantize(array, spec)
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise DataError(f"input {spec.name!r} must hold numbers, got {array.dtype}")
        return array.astype(dtype)

    def feeds(self, x: Inputs, raw: bool) -> list[np.ndarray]:
        n = len(self.in_idx)
        if isinstance(x, Mapping):
            missing = [name for name in self.in_names if name not in x]
            if missing:
                raise DataError(f"missing input {missing[0]!r}; the model takes {self.in_names}")
            return [self._feed(i, x[name], raw) for i, name in enumerate(self.in_names)]
        if n == 1 and not isinstance(x, (list, tuple)):
            return [self._feed(0, x, raw)]
        if not isinstance(x, (list, tuple)) or len(x) != n:
            raise DataError(
                f"the model takes {n} inputs ({self.in_names}); pass a list or dict of {n} arrays"
            )
        return [self._feed(i, value, raw) for i, value in enumerate(x)]

    def real_output(self, out: np.ndarray) -> np.ndarray:
        spec = self.out_specs[0]
        return dequantize(out, spec) if spec.quantized else out

    def close(self) -> None:
        """Free the interpreter now, even if a waiting predict() still holds this object."""
        self.model.close()
        self.set_tensor, self.invoke, self.get_tensor = (
            self.model.set_tensor,
            self.model.invoke,
            self.model.get_tensor,
        )


def _drift_checks(served: _Served | None) -> str:
    if served is None or served.drift is None:
        return "off"
    return "inputs, outputs and accuracy" if served.drift.calibration is not None else "inputs and outputs"


def _return_freed_memory() -> None:
    """Hand memory freed after verifying and loading a bundle back to the OS (glibc keeps it
    otherwise, and a device's RSS would carry the install's transient copies for months)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: libc is among them
    except (OSError, AttributeError):  # not glibc: nothing to do
        return


def _staged_as_bundle(staged: StagedBundle, trusted: TrustedKeys) -> Bundle:
    """A downloaded candidate (every chunk checked against its signed plan) as a Bundle in
    memory, its signature checked again against ``trusted``."""
    verified = staged.verified
    signer = verify_manifest_signature(verified.manifest_bytes, verified.signature, trusted)
    try:
        members = {f.name: (staged.directory / f.name).read_bytes() for f in verified.manifest.files}
    except OSError as exc:
        raise BundleError(f"the downloaded candidate cannot be read: {exc.strerror or exc}") from None
    return Bundle(
        manifest=verified.manifest,
        manifest_bytes=verified.manifest_bytes,
        signature=verified.signature,
        signer=signer,
        members=members,
        size=sum(len(m) for m in members.values()),
    )


class Agent:
    """A device agent serving one installed bundle. Create with :meth:`from_config`."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        background: bool = True,
        capture_filter: CaptureFilter | None = None,
        capture_clock: CaptureClock | None = None,
    ) -> None:
        """Recover the bundle store, load the committed bundle (if any) and, when
        ``background``, start the thread that closes a telemetry window every
        ``telemetry_interval`` seconds. ``capture_filter(x, trigger)`` sees every input a
        capture policy would keep and returns the array to keep (e.g. faces blurred) or None
        to veto it (docs/capture.md)."""
        self.config = config
        state = Path(config.state_dir)
        self.events = Outbox(state / "outbox" / "events", config.telemetry_queue_max)
        self.telemetry = Outbox(state / "outbox" / "telemetry", config.telemetry_queue_max)
        self.store = BundleStore(
            state,
            config.trusted(),
            runtime=config.runtime,
            threads=config.interpreter_threads,
            xnnpack=config.xnnpack,
            max_bundle_size=config.max_bundle_size,
            on_event=self.record_event,
        )
        #: Field-data capture: nothing is kept without the owner's signed policy (docs/capture.md).
        self.capture = Capturer(
            state / "capture",
            device=config.device,
            fleet=config.fleet,
            trusted=config.trusted(),
            on_event=self.record_event,
            capture_filter=capture_filter,
            clock=capture_clock,
            # On TUF (provisioned, or upgraded: the root is on disk) a capture policy waits for
            # the daemon's verified metadata: the single key in trusted_keys does not sign one.
            policy_keys=_no_keys_yet
            if config.trust_root or (state / "trust" / "root.json").exists()
            else None,
        )
        self._lock = threading.Lock()  # the interpreter and the window counters
        self._latency = LatencyRecorder()
        self._lat = self._latency.samples  # the hot path appends here
        self._errors = 0
        self._window_start = time.time()
        self._system = SystemSampler()
        self._sample_rate = config.drift_sample_rate
        self._served: _Served | None = None
        self._shadow: Shadow | None = None
        self._last_shadow: Shadow | None = None  # stopped: its last window not yet reported
        self._pointer_mtime = 0.0
        self._serve(self.store.recover())
        if self._served is None:
            self._import_runtime()
        self._stop = threading.Event()
        if background:  # captures are sealed and written off the predict() path
            self.capture.start_writer()
        self.telemetry_failures = 0  # background windows that could not be recorded
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(
                target=self._telemetry_loop, name="edgekit-telemetry", daemon=True
            )
            self._thread.start()

    @classmethod
    def from_config(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        background: bool = True,
        capture_filter: CaptureFilter | None = None,
        capture_clock: CaptureClock | None = None,
        **overrides: Any,
    ) -> Agent:
        """Load ``path`` (TOML) with ``EDGEKIT_*`` and keyword overrides, then start the agent."""
        return cls(
            AgentConfig.load(path, **overrides),
            background=background,
            capture_filter=capture_filter,
            capture_clock=capture_clock,
        )

    def _import_runtime(self) -> None:
        """Import the runtime at start rather than in the middle of the first install (on a
        small board that takes a while), and say now if there is none."""
        try:
            resolve_runtime(self.config.runtime)
        except RuntimeUnavailableError as exc:
            log.warning("device %s cannot run a model: %s", self.config.device, exc)

    # -- serving ----------------------------------------------------------------------------

    def _serve(self, loaded: LoadedBundle | None) -> None:
        if getattr(self, "_shadow", None) is not None:  # it was compared with the model now replaced
            self.stop_shadow()
        served = None if loaded is None else _Served(loaded, self.config)
        with self._lock:
            self._served = served
        self._pointer_mtime = self._pointer_stat()
        _return_freed_memory()
        if loaded is not None:
            log.info("serving %s with %s", loaded.manifest.label, loaded.model.runtime)

    def predict(self, x: Inputs, *, as_dict: bool = False, raw: bool = False) -> Any:
        """Run the model once. Returns a list of arrays in output order (``as_dict``: by name).

        Raises DataError for an input of the wrong shape or type, InstallError when no bundle
        is installed."""
        served = self._served
        if (
            served is not None
            and served.fast
            and type(x) is np.ndarray
            and x.dtype is served.dtype0
            and x.shape == served.shape0
            and not raw
        ):
            # The common case (one input of exactly the model's shape and dtype, one output),
            # kept short: on a small model it is most of what the agent adds to a bare call.
            shadow = self._shadow
            shadowed = shadow is not None and _random() < shadow.sample
            lock = self._lock
            lock.acquire()
            if served is not self._served:  # swapped by a low-memory install: see _acquire_for
                lock.release()
                return self.predict(x, as_dict=as_dict, raw=raw)
            try:
                cpu = _cpu() if shadowed else 0.0
                start = _clock()
                served.set_tensor(served.i0, x)
                served.invoke()
                out = served.get_tensor(served.o0)
                latencies = self._lat
                elapsed = _clock() - start
                if shadowed:
                    cpu = _cpu() - cpu
                latencies.append(elapsed)
                if len(latencies) >= LATENCY_CAP:
                    self._latency.fold()
            except (ValueError, RuntimeError) as exc:
                self._errors += 1
                raise DataError(f"the runtime rejected the input: {exc}") from None
            finally:
                lock.release()
            if served.deq0 is not None:
                out = dequantize(out, served.deq0)
            capture = self.capture
            if _random() < served.rate:
                served.drift.add(x, out)  # type: ignore[union-attr]  # rate is 0 without a monitor
                if capture.drift_on:  # the drift trigger holds the window's sampled inputs
                    capture.drift_sample(x, out, served.drift, served.loaded.identity)
            if capture.armed:  # a signed capture policy is on
                if capture.always:
                    capture.observe(x, out, served.loaded.identity)
                elif _random() < capture.sample_rate:
                    capture.offer(x, [out], "sample", served.loaded.identity())
            if shadowed and shadow is not None:
                # the serving model's CPU time, as the candidate's is measured: see Shadow._compare
                shadow.offer((x,), (out,), cpu)  # copies; never blocks, never raises
            return {served.name0: out} if as_dict else [out]
        return self._predict(served, x, as_dict, raw)

    def _acquire_for(self, served: _Served) -> bool:
        """Take the lock to run ``served``: False (and the lock not held) if a low-memory install
        swapped it while this call waited (it was closed: the caller starts again)."""
        self._lock.acquire()
        if served is self._served:
            return True
        self._lock.release()
        return False

    def _predict(self, served: _Served | None, x: Inputs, as_dict: bool, raw: bool) -> Any:
        if served is None:
            with self._lock:  # a low-memory install may be swapping models: wait for it
                served = self._served
            if served is not None:
                return self.predict(x, as_dict=as_dict, raw=raw)
            raise InstallError(
                "no model is installed; install a bundle with `edgekit-agent install FILE.ekb`"
            )
        lock = self._lock
        try:
            feeds = served.feeds(x, raw)
        except DataError:
            with lock:
                self._errors += 1
            raise
        shadow = self._shadow
        shadowed = shadow is not None and _random() < shadow.sample
        if not self._acquire_for(served):
            return self.predict(x, as_dict=as_dict, raw=raw)
        try:
            cpu = _cpu() if shadowed else 0.0
            start = _clock()
            try:
                for index, value in zip(served.in_idx, feeds):
                    served.set_tensor(index, value)
                served.invoke()
                outputs = [served.get_tensor(index) for index in served.out_idx]
            except (ValueError, RuntimeError) as exc:
                self._errors += 1
                raise DataError(f"the runtime rejected the input: {exc}") from None
            latencies = self._lat
            elapsed = _clock() - start
            if shadowed:
                cpu = _cpu() - cpu
            latencies.append(elapsed)
            if len(latencies) >= LATENCY_CAP:
                self._latency.fold()
        finally:
            lock.release()
        if _random() < served.rate:
            real_out = served.real_output(outputs[0])
            served.drift.add(feeds[0], real_out)  # type: ignore[union-attr]
            if self.capture.drift_on:  # the drift trigger holds the window's sampled inputs
                self.capture.drift_sample(feeds[0], real_out, served.drift, served.loaded.identity)
        if shadowed and shadow is not None:
            real = [dequantize(o, s) if s.quantized else o for o, s in zip(outputs, served.out_specs)]
            shadow.offer(feeds, real, cpu)  # copies; never blocks, never raises
        if served.any_quantized_out and not raw:
            outputs = [dequantize(o, s) if s.quantized else o for o, s in zip(outputs, served.out_specs)]
        if self.capture.armed:
            self.capture.observe(
                feeds[0], served.real_output(outputs[0]) if raw else outputs[0], served.loaded.identity
            )
        if as_dict:
            return dict(zip(served.out_names, outputs))
        return outputs

    # -- reports ----------------------------------------------------------------------------

    def drift(self) -> DriftReport | None:
        """The drift report of the serving bundle, or None if it carries no baseline."""
        served = self._served
        return None if served is None or served.drift is None else served.drift.report()

    def serving_activity(self) -> tuple[int, int]:
        """A value that changes with every prediction served (nothing is added to predict() for
        it): on-fleet benchmarks run only once it has stood still for a while."""
        latency = self._latency
        return id(latency), latency.count

    def runtime_name(self) -> str:
        """The runtime this agent runs models with (its config's, resolved); the configured
        name when none imports."""
        try:
            return resolve_runtime(self.config.runtime)
        except RuntimeUnavailableError:
            return self.config.runtime

    def served_bundle(self) -> LoadedBundle | None:
        """The bundle being served (manifest, directory, model), or None: cheap, for hot paths
        that need only what is served (``status()`` also reads the store and the drift report)."""
        served = self._served
        return served.loaded if served is not None else None

    def status(self) -> AgentStatus:
        served = self._served
        loaded = served.loaded if served is not None else None
        report = self.drift()
        return AgentStatus(
            device=self.config.device,
            fleet=self.config.fleet,
            state_dir=str(self.config.state_dir),
            serving=loaded is not None,
            name=loaded.manifest.name if loaded else None,
            version=loaded.manifest.version if loaded else None,
            bundle_id=loaded.bundle.bundle_id if loaded else None,
            previous=self.store.pointer()["previous"],
            runtime=loaded.model.runtime if loaded else None,
            xnnpack=loaded.model.xnnpack if loaded else self.config.xnnpack,
            threads=self.config.interpreter_threads,
            inputs=[s.to_dict() for s in loaded.manifest.inputs] if loaded else [],
            outputs=[s.to_dict() for s in loaded.manifest.outputs] if loaded else [],
            telemetry_queued=len(self.telemetry),
            events_queued=len(self.events),
            drift=report.to_dict() if report is not None else None,
            drift_checks=_drift_checks(served),
        )

    # -- changing the installed bundle ---------------------------------------------------------

    def install(
        self, source: BundleSource, *, allow_downgrade: bool = False, step: StepSink | None = None
    ) -> InstallResult:
        """Verify, install and start serving a bundle (a ``.ekb`` path as str or path-like, its bytes, a
        :class:`~edgekit.bundle.Bundle` from :func:`~edgekit.bundle.read_bundle`, or a
        :class:`~edgekit.transfer.StagedBundle` from
        :func:`~edgekit.transfer.fetch_staged_bundle`); on any failure the current one keeps
        serving. ``step(name)`` is told each step as it begins (``verifying``, ``installing``,
        ``health-checking``; see :data:`~edgekit.agent.install.StepSink`)."""
        if not self.config.low_memory_install or self._served is None:
            result, loaded = self.store.install(source, allow_downgrade=allow_downgrade, step=step)
            if result.changed or self._served is None:
                self._close_window()
                self._serve(loaded)
            return result
        # Low-memory install: once the new bundle is verified and on disk, the serving model is
        # freed before the new one loads (one model in memory, not two; docs/agent.md, "Memory").
        # Predictions wait for the new model meanwhile; if it fails, the old one is loaded again.
        lock = self._lock
        held = False

        def make_room() -> None:
            nonlocal held
            self.stop_shadow()  # it compares with the model about to go (and frees its memory)
            self._close_window()
            lock.acquire()
            held = True
            old, self._served = self._served, None
            if old is not None:  # callers waiting with a reference to it will see it was swapped
                old.close()
            _return_freed_memory()

        try:
            result, loaded = self.store.install(
                source, allow_downgrade=allow_downgrade, make_room=make_room, step=step
            )
            if held:
                self._served = _Served(loaded, self.config)
            elif result.changed:
                self._close_window()
                self._serve(loaded)
        except BaseException:
            if held:  # the pointer still names the old bundle: serve it again
                old = self.store.recover()
                self._served = None if old is None else _Served(old, self.config)
            raise
        finally:
            if held:
                lock.release()
                self._pointer_mtime = self._pointer_stat()
                _return_freed_memory()
        if held:
            log.info("serving %s with %s", loaded.manifest.label, loaded.model.runtime)
        return result

    def rollback(self) -> LoadedBundle:
        """Serve the previous bundle again."""
        loaded = self.store.rollback()
        self._close_window()
        self._serve(loaded)
        return loaded

    def _pointer_stat(self) -> float:
        try:
            return os.stat(self.store.state_dir / POINTER_FILE).st_mtime
        except FileNotFoundError:
            return 0.0

    def reload_if_changed(self) -> bool:
        """Serve what another process (``edgekit-agent install``/``rollback``) committed."""
        if self._pointer_stat() == self._pointer_mtime:
            return False
        pointer = self.store.pointer()
        served = self._served
        if served is not None and served.loaded.directory.name == pointer["current"]:
            self._pointer_mtime = self._pointer_stat()
            return False
        self._close_window()
        try:
            self._serve(self.store.recover())
        except BundleError as exc:
            log.error("cannot load the newly committed bundle: %s", exc)
            return False
        return True

    # -- shadow evaluation (docs/shadow.md) -------------------------------------------------

    def start_shadow(
        self,
        source: str | os.PathLike[str] | bytes | Bundle | StagedBundle,
        *,
        sample: float = 0.1,
        until: float | None = None,
        cpu_budget: float = DEFAULT_CPU_BUDGET,
        hang_seconds: float = DEFAULT_HANG_SECONDS,
    ) -> Shadow:
        """Load a candidate bundle beside the serving model and run a ``sample`` share of live
        inputs through it, off the request path (:mod:`edgekit.agent.shadow`). The bundle is
        verified against the device's trusted keys; ``until`` (UNIX seconds) ends the shadow.
        Replaces a running shadow. Raises ShadowError (with a ``shadow_refused`` event) when the
        candidate is refused, incompatible or the board is short of memory; BundleError or
        SignatureError when it does not verify."""
        served = self._served
        if served is None:
            raise ShadowError("no model is serving: a shadow compares a candidate with the serving model")
        try:
            if isinstance(source, Bundle):
                bundle = source
                verify_manifest_signature(bundle.manifest_bytes, bundle.signature, self.store.trusted)
            elif isinstance(source, (str, os.PathLike, bytes)):
                bundle = read_bundle(source, self.store.trusted, self.config.max_bundle_size)
            elif _is_staged(source):
                bundle = _staged_as_bundle(source, self.store.trusted)
            else:
                raise TypeError(f"cannot try a {type(source).__name__} in the shadow")
        except EdgekitError as exc:
            self.record_event("shadow_refused", f"the shadow candidate was refused: {exc}", None)
            raise
        self.stop_shadow()
        shadow = Shadow(
            bundle,
            served.in_specs,
            served.out_specs,
            sample=sample,
            until=until,
            cpu_budget=cpu_budget,
            hang_seconds=hang_seconds,
            runtime=self.config.runtime,
            xnnpack=self.config.xnnpack,
            on_event=self.record_event,
            drift_window=self.config.drift_window,
            psi_threshold=self.config.drift_psi_threshold,
            ks_threshold=self.config.drift_ks_threshold,
        )
        self._shadow = shadow
        return shadow

    def stop_shadow(self) -> dict[str, Any] | None:
        """Unload the candidate; returns the last (unreported) window's figures, or None."""
        shadow, self._shadow = self._shadow, None
        if shadow is None:
            return None
        shadow.stop()
        self._last_shadow = shadow
        return shadow.window(close=False)

    @property
    def shadow(self) -> Shadow | None:
        """The shadow evaluation running (or failed and not yet reported), or None."""
        return self._shadow

    def shadow_status(self) -> dict[str, Any] | None:
        """The running (or last failed) shadow's current window: statistics only."""
        shadow = self._shadow
        return None if shadow is None else shadow.window(close=False)

    # -- telemetry --------------------------------------------------------------------------

    def record_event(self, kind: str, message: str, bundle: dict[str, str] | None) -> None:
        """Queue an event for the fleet: its kind, a one-line message, the bundle it concerns."""
        event = Event(device=self.config.device, kind=kind, message=message, bundle=bundle)
        try:
            self.events.put(event.to_dict())
        except OSError as exc:  # counted by the outbox as dropped; reporting must not fail the caller
            log.error("could not queue the %s event (%s): %s", kind, exc.strerror or exc, message)

    def _close_window(self) -> TelemetryRecord | None:
        with self._lock:
            latency, self._latency = self._latency, LatencyRecorder()
            self._lat = self._latency.samples
            errors, self._errors = self._errors, 0
            start, self._window_start = self._window_start, time.time()
            served = self._served
        end = self._window_start
        count = latency.count
        if count == 0 and errors == 0 and served is None and self._shadow is None:
            return None
        report = served.drift.report() if served is not None and served.drift is not None else None
        drift: dict[str, Any] = {"drifted": False, "complete": False, "samples": 0, "scores": {}}
        if report is not None:
            drift = {
                "drifted": report.drifted,
                "complete": report.complete,
                "samples": report.samples,
                "scores": {
                    f.name: {"psi": f.psi, "ks": f.ks, "psi_limit": f.psi_limit} for f in report.features
                },
                "psi_threshold": report.psi_threshold,
                "severity": report.severity,
                "windows": report.windows,  # a new verdict when this grows; else the last one again
                "summary": report.summary,
                "signals": dict(report.signals),
                "calibrated": report.calibrated,
                "accuracy": report.accuracy.to_dict() if report.accuracy is not None else None,
            }
        record = TelemetryRecord(
            device=self.config.device,
            fleet=self.config.fleet,
            window_start=start,
            window_end=end,
            count=count,
            errors=errors,
            latency_ms=latency.percentiles_ms(),
            throughput=count / (end - start) if end > start else 0.0,
            drift=drift,
            bundle=served.loaded.identity() if served is not None else None,
            cpu_percent=self._system.cpu_percent(),
            memory_rss_bytes=self._system.memory_rss_bytes(),
            temperature_c=self._system.temperature_c(),
            memory_used_percent=self._system.memory_used_percent(),
            disk_used_percent=self._system.disk_used_percent(self.config.state_dir),
            runtime=served.loaded.model.runtime if served is not None else None,
            shadow=self._shadow_window(),
        )
        try:
            queued = self.telemetry.put(record.to_dict())
        except OSError as exc:  # counted by the outbox as dropped, reported with the next record
            self.telemetry_failures += 1
            log.error("could not queue a telemetry record (%s)", exc.strerror or exc)
            return None
        _return_freed_memory()  # the window's summaries were transient: give their pages back
        return TelemetryRecord.from_dict(queued)

    def _shadow_window(self) -> dict[str, Any] | None:
        # A stopped candidate's last figures go first, also when another candidate replaced it:
        # reported any later (after the new one failed, say), they would be the fleet's newest
        # window and make the old candidate the one `shadow status` and `promote` judge.
        stopped, self._last_shadow = self._last_shadow, None
        if stopped is not None:
            return stopped.window(close=True)
        shadow = self._shadow
        if shadow is None:
            return None
        window = shadow.window(close=True)
        if not shadow.active:  # failed or expired: reported once, then gone
            self._shadow = None
        return window

    def flush_telemetry(self) -> TelemetryRecord | None:
        """Close the current telemetry window now and queue its record (returned, with its seq)."""
        return self._close_window()

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.config.telemetry_interval):
            try:
                self._close_window()
                self.reload_if_changed()
                self.capture.sweep()  # retention: held captures are deleted on time, sent or not
            except Exception:  # the loop must outlive a full disk: counted, logged, retried next window
                self.telemetry_failures += 1
                log.exception("telemetry window could not be recorded (%d so far)", self.telemetry_failures)

    def close(self) -> None:
        """Stop the background thread and the shadow, and queue the last window's record."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.capture.close()
        self.stop_shadow()  # its last figures go out with the last record
        self._close_window()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _no_keys_yet() -> None:
    """What may sign a capture policy on a TUF device before its daemon verified any metadata."""
    return None
