"""Shadow evaluation: a candidate model runs beside the serving one on a sampled share of live
inputs, off the request path, and only statistics come out of it.

    agent.start_shadow("candidate.ekb", sample=0.1)   # verified with the agent's trusted keys
    ...                                               # predict() as usual: answers come from the serving model
    agent.shadow_status()                             # the current window's figures
    agent.flush_telemetry().shadow                    # the same, in each telemetry record
    agent.stop_shadow()

How it works:

- ``predict()`` copies a sampled share (``sample``) of its inputs, with the serving model's
  outputs and the CPU time of its run, to a bounded queue (:data:`QUEUE_MAX`) and returns at once. When the
  queue is full the sample is dropped and counted: the serving path never waits for the shadow.
- One worker thread runs the candidate on each queued input and compares: top-1 agreement
  (classification outputs: one output whose last axis has more than one class) and the mean and
  max absolute error on dequantized (real) output values; the latency of both models on the same
  inputs, as the CPU time of each run on its thread (the worker runs at nice 19 and waits behind
  serving by design: wall-clock time would count that wait against the candidate, and an
  identical candidate measured 4-6x the serving model on a busy agent). After each run the worker sleeps in proportion to the CPU time it spent, so that it
  uses at most ``cpu_budget`` of one core (default 0.25).
- A candidate that raises (any exception from its run: the runtime refusing an input, a
  kernel failing, ...), returns NaN or infinity, or takes longer than ``hang_seconds`` on one
  input is unloaded and an event (``shadow_failed``) says why; the serving model never notices.
  The worker never ends silently: whatever ends it fails the shadow with an event, and
  :meth:`Shadow.alive` (the daemon's watchdog) is False if it ever ended with the shadow running.
  A native crash (a segfault in the runtime) takes the whole agent process down with it.
  (A hung run cannot be interrupted in Python: its thread is abandoned and the candidate's
  interpreter is freed when that run returns.)
- Before loading, the candidate's memory need is estimated (three times the model's size: the
  runtime's copy, packed weights, tensors) and compared with the board's available memory
  (``MemAvailable``) less a reserve for the serving model (:data:`MEMORY_RESERVE`); when short,
  the shadow is refused with an event (``shadow_refused``) saying how much it would need.
- Each window carries the agent's peak resident memory with both models loaded
  (``peak_memory_bytes``): the highest of its RSS sampled when the candidate loaded, after each
  comparison and when the window closes.
- Reports carry statistics only, never inputs or outputs.

Pure numbers live in :class:`ShadowWindow`; :class:`Shadow` owns the candidate and the thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from edgekit.bundle import Bundle
from edgekit.errors import BundleError, EdgekitError
from edgekit.runtime import Model, dequantize, quantize
from edgekit.tflite import TensorSpec

from .drift import DriftMonitor
from .telemetry import SystemSampler

__all__ = [
    "DEFAULT_CPU_BUDGET",
    "DEFAULT_HANG_SECONDS",
    "MEMORY_RESERVE",
    "QUEUE_MAX",
    "Shadow",
    "ShadowError",
    "ShadowWindow",
    "available_memory_bytes",
    "estimate_memory_need",
]

log = logging.getLogger(__name__)

DEFAULT_CPU_BUDGET = 0.25
DEFAULT_HANG_SECONDS = 10.0
QUEUE_MAX = 32
#: The worker thread's nice value (Linux: per thread): below everything serving.
NICE = 19
#: Memory left to the serving model and the system when a candidate loads (bytes).
MEMORY_RESERVE = 64 * 1024 * 1024
_MEMORY_FACTOR = 3


class ShadowError(EdgekitError):
    """The shadow cannot start: the candidate is refused, incompatible, or the board too short of memory."""


def available_memory_bytes() -> Optional[int]:
    """``MemAvailable`` of /proc/meminfo in bytes, or None where the OS does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                name, _, rest = line.partition(":")
                if name == "MemAvailable":
                    return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def estimate_memory_need(model_size: int) -> int:
    """Bytes a candidate of ``model_size`` bytes is expected to take once loaded."""
    return _MEMORY_FACTOR * model_size


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def _percentile(values: Sequence[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return (ordered[low] + (ordered[high] - ordered[low]) * (position - low)) * 1000.0


#: Latencies kept per window for the percentiles (a reservoir past this many).
_LATENCY_KEEP = 4096


class ShadowWindow:
    """The figures of one window. Not locked: :class:`Shadow` holds its lock around it."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.compared = 0
        self.dropped = 0
        self.agreed = 0
        self.classified = 0  # comparisons where top-1 agreement applies
        self.abs_error_sum = 0.0
        self.abs_error_count = 0
        self.abs_error_max = 0.0
        self.serving_s: list[float] = []
        self.candidate_s: list[float] = []
        self.peak_memory: Optional[int] = None  # bytes: the highest RSS sampled in the window
        self._rng = np.random.default_rng(0)

    def note_memory(self, rss: Optional[int]) -> None:
        if rss is not None and (self.peak_memory is None or rss > self.peak_memory):
            self.peak_memory = rss

    def add(self, agree: Optional[bool], abs_error: np.ndarray, serving_s: float, candidate_s: float) -> None:
        self.compared += 1
        if agree is not None:
            self.classified += 1
            self.agreed += int(agree)
        if abs_error.size:
            self.abs_error_sum += float(abs_error.sum())
            self.abs_error_count += int(abs_error.size)
            self.abs_error_max = max(self.abs_error_max, float(abs_error.max()))
        if len(self.serving_s) < _LATENCY_KEEP:
            self.serving_s.append(serving_s)
            self.candidate_s.append(candidate_s)
        else:  # reservoir: every comparison equally likely to be kept
            slot = int(self._rng.integers(0, self.compared))
            if slot < _LATENCY_KEEP:
                self.serving_s[slot] = serving_s
                self.candidate_s[slot] = candidate_s

    def to_dict(
        self,
        end: float,
        candidate: dict[str, str],
        state: str,
        error: Optional[str],
        sample: float,
        severity: Optional[str] = None,
    ) -> dict[str, Any]:
        return {
            "candidate": candidate,
            "state": state,
            "sample_rate": sample,
            "window_start": self.start,
            "window_end": end,
            "compared": self.compared,
            "dropped": self.dropped,
            "classified": self.classified,
            "agreed": self.agreed,
            "agreement": self.agreed / self.classified if self.classified else None,
            "abs_error_mean": self.abs_error_sum / self.abs_error_count if self.abs_error_count else None,
            "abs_error_max": self.abs_error_max if self.abs_error_count else None,
            "serving_latency_ms": {
                "p50": _percentile(self.serving_s, 0.5),
                "p95": _percentile(self.serving_s, 0.95),
            },
            "candidate_latency_ms": {
                "p50": _percentile(self.candidate_s, 0.5),
                "p95": _percentile(self.candidate_s, 0.95),
            },
            "error": error,
            # The agent's peak resident memory with both models loaded in this window (sampled).
            "peak_memory_bytes": self.peak_memory,
            # The candidate's drift severity on these inputs (ok, inputs changed, model
            # affected), from its last complete drift window; None before one is complete or
            # when its bundle has no baseline.
            "severity": severity,
        }


def _reason(exc: Exception) -> str:
    """An exception as the reason a candidate failed: its message (the runtime's, or "it
    returned NaN or infinity"), with its type when that says more than an empty message."""
    text = str(exc).strip()
    if isinstance(exc, RuntimeError) and text:  # the runtime's own words, its lines run together
        text = re.sub(r"(?<=\S)(?=Node number )", ". ", text).rstrip(".")
        return f"the runtime could not run it ({text})"
    if isinstance(exc, (ValueError, EdgekitError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True)
class _Sample:
    real_inputs: list[np.ndarray]  # real-valued (dequantized) inputs, copied
    serving_outputs: list[np.ndarray]  # real-valued outputs, as the caller got them
    serving_s: float


EventSink = Callable[[str, str, Optional[dict[str, str]]], None]

RUNNING = "running"
FAILED = "failed"
STOPPED = "stopped"
EXPIRED = "expired"


class Shadow:
    """A candidate loaded beside the serving model, fed by :meth:`offer`, judged per window."""

    def __init__(
        self,
        bundle: Bundle,
        serving_inputs: Sequence[TensorSpec],
        serving_outputs: Sequence[TensorSpec],
        *,
        sample: float = 0.1,
        until: Optional[float] = None,
        cpu_budget: float = DEFAULT_CPU_BUDGET,
        hang_seconds: float = DEFAULT_HANG_SECONDS,
        runtime: str = "auto",
        xnnpack: bool = True,
        on_event: Optional[EventSink] = None,
        available: Callable[[], Optional[int]] = available_memory_bytes,
        rss: Callable[[], Optional[int]] = SystemSampler.memory_rss_bytes,
        drift_window: int = 200,
        psi_threshold: float = 0.1,
        ks_threshold: float = 0.1,
    ) -> None:
        """Check and load the candidate (ShadowError, with an event, if it cannot be), then start
        the worker. ``bundle`` is already verified against the device's trusted keys."""
        if not 0.0 < sample <= 1.0:
            raise ShadowError(f"the shadow sample rate must be above 0 and at most 1, got {sample}")
        if not 0.0 < cpu_budget <= 1.0:
            raise ShadowError(f"the shadow CPU budget must be above 0 and at most 1 core, got {cpu_budget}")
        self.identity = {
            "name": bundle.manifest.name,
            "version": bundle.manifest.version,
            "bundle_id": bundle.bundle_id,
        }
        self.label = bundle.manifest.label
        self._on_event = on_event
        manifest = bundle.manifest
        if [list(s.shape) for s in manifest.inputs] != [list(s.shape) for s in serving_inputs] or len(
            manifest.outputs
        ) != len(serving_outputs):
            raise self._refuse(
                f"the candidate {self.label} takes or returns other shapes than the serving model; "
                "a shadow needs the same inputs and outputs"
            )
        model_bytes = bundle.model
        need = estimate_memory_need(len(model_bytes))
        free = available()
        if free is not None and free - need < MEMORY_RESERVE:
            raise self._refuse(
                f"not enough memory to try {self.label} beside the serving model: it would need about "
                f"{_mib(need)} and the board has {_mib(free)} available (keeping {_mib(MEMORY_RESERVE)} "
                "for serving); the serving model was left alone. Free memory or try it on a larger board"
            )
        try:
            self._model: Optional[Model] = Model(model_bytes, runtime=runtime, threads=1, xnnpack=xnnpack)
        except (BundleError, EdgekitError) as exc:
            raise self._refuse(f"the candidate {self.label} cannot be loaded: {exc}") from None
        self.memory_need_bytes = need
        details = self._model.input_details
        by_name = {spec.name: spec for spec in manifest.inputs}
        self._in_specs = [by_name.get(d["name"], manifest.inputs[0]) for d in details]
        out_by_name = {spec.name: spec for spec in manifest.outputs}
        self._out_specs = [
            out_by_name.get(d["name"], manifest.outputs[0]) for d in self._model.output_details
        ]
        self._in_dtypes = [np.dtype(d["dtype"]) for d in details]
        # The candidate judged on this device's inputs like a serving model (docs/agent.md,
        # "Drift"): from its own bundle's baseline and calibration, so a candidate
        # the field's inputs would hurt shows `model affected` before anyone promotes it.
        baseline = bundle.baseline()
        self._drift: Optional[DriftMonitor] = None
        if baseline is not None and baseline.features:
            self._drift = DriftMonitor(
                baseline,
                drift_window,
                psi_threshold,
                ks_threshold,
                calibration=bundle.calibration(),
                labels=bundle.labels(),
            )
        self._serving_in = list(serving_inputs)
        self.sample = sample
        self.until = until
        self.cpu_budget = cpu_budget
        self.hang_seconds = hang_seconds
        self.state = RUNNING
        self.error: Optional[str] = None
        self._lock = threading.Lock()
        self._rss = rss
        self._window = ShadowWindow(time.time())
        self._window.note_memory(rss())  # both models are loaded now
        self._queue: queue.Queue[Optional[_Sample]] = queue.Queue(QUEUE_MAX)
        self._busy_since: Optional[float] = None
        self._thread = threading.Thread(target=self._work, name=f"edgekit-shadow-{self.label}", daemon=True)
        self._thread.start()
        self._event(
            "shadow_started",
            f"trying {self.label} in the shadow of the serving model on {sample:.0%} of inputs",
        )

    # -- the serving side (called from predict(); must be cheap and never raise) ------------

    @property
    def active(self) -> bool:
        return self.state == RUNNING

    def offer(self, feeds: Sequence[np.ndarray], outputs: Sequence[np.ndarray], serving_s: float) -> None:
        """Queue a copy of one served input (as fed to the serving model), its real outputs and
        the serving run's CPU time (``serving_s``, seconds); dropped and counted when the worker
        is behind."""
        if self.state != RUNNING:
            return
        if self._queue.full():  # behind: count it without copying anything
            busy = self._busy_since
            if busy is not None and time.perf_counter() - busy > self.hang_seconds:
                self._fail(
                    f"the candidate {self.label} ran for over {self.hang_seconds:g} s on one input (hung)"
                )
                return
            with self._lock:
                self._window.dropped += 1
            return
        if self.until is not None and time.time() >= self.until:
            self._finish(EXPIRED, f"the shadow of {self.label} reached its end time")
            return
        try:
            real = [
                dequantize(f, s) if s.quantized else np.array(f, copy=True)
                for f, s in zip(feeds, self._serving_in)
            ]
            sample = _Sample(real, [np.array(o, copy=True) for o in outputs], serving_s)
            self._queue.put_nowait(sample)
        except (queue.Full, ValueError, TypeError, MemoryError):  # never fails the caller: counted
            with self._lock:
                self._window.dropped += 1

    # -- the worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        """The worker: it ends only with the shadow. Any exception from a candidate's run (or a
        bug here) unloads the candidate and reports it (``shadow_failed``; logged, with the
        traceback of anything but the runtime's and edgekit's own errors); whatever ends the
        thread ends the shadow with it, never silently."""
        try:
            self._loop()
        except BaseException as exc:  # not a candidate's run (that is caught in _loop): a bug
            log.exception("the shadow worker of %s ended unexpectedly", self.label)
            self._fail(
                f"the shadow of {self.label} ended by an unexpected error in the agent "
                f"({type(exc).__name__}: {exc})"
            )
            if not isinstance(exc, Exception):
                raise
        finally:
            if self.state == RUNNING:  # cannot happen: said out loud if it does
                self._fail(f"the shadow worker of {self.label} ended while the candidate was loaded")

    def _loop(self) -> None:
        # Serving keeps priority: on Linux a thread has its own nice value; at 19 the kernel
        # runs the candidate only on CPU time the serving thread does not want.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        while True:
            item = self._queue.get()
            if item is None or self.state != RUNNING:
                self._queue.task_done()
                return
            cpu0 = time.thread_time()
            try:
                self._compare(item)
            except Exception as exc:
                # The candidate failed (the runtime raised, it returned NaN, or anything else a
                # run or a comparison can raise): unloaded and reported; serving goes on.
                if not isinstance(exc, (ValueError, RuntimeError, EdgekitError)):
                    log.exception("the candidate %s failed on a live input", self.label)
                self._fail(f"the candidate {self.label} failed on a live input: {_reason(exc)}")
                self._queue.task_done()
                return
            self._queue.task_done()
            spent = time.thread_time() - cpu0
            # At most cpu_budget of one core: idle (1 - b) / b as long as we worked.
            pause = spent * (1.0 - self.cpu_budget) / self.cpu_budget
            if pause > 0 and self._stop_wait(pause):
                return

    def alive(self) -> bool:
        """False only when the worker ended while the shadow is still running (the daemon's
        watchdog checks it); a failed, stopped or expired shadow has no worker to watch."""
        return self.state != RUNNING or self._thread.is_alive()

    def _stop_wait(self, seconds: float) -> bool:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            if self.state != RUNNING:
                return True
            time.sleep(min(0.05, end - time.perf_counter()) if end > time.perf_counter() else 0)
        return self.state != RUNNING

    def _compare(self, item: _Sample) -> None:
        model = self._model
        if model is None:
            return
        feeds = []
        for value, spec, dtype in zip(item.real_inputs, self._in_specs, self._in_dtypes):
            feeds.append(quantize(value, spec) if spec.quantized else value.astype(dtype, copy=False))
        self._busy_since = time.perf_counter()  # wall clock: a hang is judged by it
        cpu0 = time.thread_time()
        try:
            raw = model.run(feeds)
        finally:  # returned or raised: not hung (so _unload frees its interpreter now)
            self._busy_since = None
        # The candidate's latency is the CPU time of its run on this thread (one interpreter
        # thread, so all of it): the worker runs at nice 19 and waits behind serving, other
        # processes and the GIL by design, and that waiting would make even the serving model
        # itself look several times slower here than where it serves.
        elapsed = time.thread_time() - cpu0
        outs = [
            dequantize(o, s) if s.quantized else o.astype(np.float32, copy=False)
            for o, s in zip(raw, self._out_specs)
        ]
        for out in outs:
            if not np.all(np.isfinite(out)):
                raise ValueError("it returned NaN or infinity")
        agree: Optional[bool] = None
        first_c, first_s = outs[0], item.serving_outputs[0]
        if len(outs) == 1 and first_c.ndim >= 1 and first_c.shape[-1] > 1:
            agree = bool(np.array_equal(np.argmax(first_c, axis=-1), np.argmax(first_s, axis=-1)))
        errors = np.concatenate(
            [
                np.abs(c.astype(np.float64) - s.astype(np.float64)).ravel()
                for c, s in zip(outs, item.serving_outputs)
            ]
        )
        if self._drift is not None:
            self._drift.add(item.real_inputs[0], outs[0])
        rss = self._rss()  # after a run of both: their tensors are allocated
        with self._lock:
            self._window.add(agree, errors, item.serving_s, elapsed)
            self._window.note_memory(rss)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until every queued input was compared (or the shadow ended); False on timeout.
        For tests and benchmarks: serving never waits for the shadow."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks and self.state == RUNNING:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(min(left, 0.1))  # wakes to see a failure too
        return True

    # -- ending ---------------------------------------------------------------------------------

    def _unload(self) -> None:
        model, self._model = self._model, None
        if model is not None and self._busy_since is None:
            model.close()
        with contextlib.suppress(queue.Full):  # a full queue: the worker sees the state instead
            self._queue.put_nowait(None)

    def _fail(self, message: str) -> None:
        with self._lock:
            if self.state != RUNNING:
                return
            self.state, self.error = FAILED, message
        self._unload()
        log.error("%s; it was unloaded, the serving model was not affected", message)
        self._event(
            "shadow_failed", f"{message}; it was unloaded and the serving model answered every request"
        )

    def _finish(self, state: str, message: str) -> None:
        with self._lock:
            if self.state != RUNNING:
                return
            self.state = state
        self._unload()
        self._event("shadow_stopped", message)

    def stop(self) -> None:
        """Unload the candidate and stop the worker (its last figures stay readable)."""
        self._finish(STOPPED, f"the shadow of {self.label} was stopped")
        self._thread.join(timeout=self.hang_seconds)

    def _event(self, kind: str, message: str) -> None:
        if self._on_event is not None:
            self._on_event(kind, message, self.identity)

    def _refuse(self, message: str) -> ShadowError:
        self._event("shadow_refused", message)
        return ShadowError(message)

    # -- reporting ----------------------------------------------------------------------------

    def window(self, *, close: bool) -> dict[str, Any]:
        """The current window's figures (statistics only); ``close``: start a new window."""
        busy = self._busy_since
        if busy is not None and time.perf_counter() - busy > self.hang_seconds:
            self._fail(f"the candidate {self.label} ran for over {self.hang_seconds:g} s on one input (hung)")
        if self.until is not None and time.time() >= self.until:  # also without traffic
            self._finish(EXPIRED, f"the shadow of {self.label} reached its end time")
        now = time.time()
        severity = self._drift.report().severity if self._drift is not None else None
        rss = self._rss() if self.state == RUNNING else None  # once unloaded, not both any more
        with self._lock:
            window = self._window
            window.note_memory(rss)
            if close:
                self._window = ShadowWindow(now)
                self._window.note_memory(rss)
            return window.to_dict(now, self.identity, self.state, self.error, self.sample, severity)
