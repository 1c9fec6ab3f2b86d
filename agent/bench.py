"""On-fleet benchmarks on the device (docs/bench.md): measure candidate bundles on this board,
off the serving path, and report what was measured.

    report = measure(bundle, board=describe_board("ai_edge_litert", True), threads=(1, 2), runs=50)

What :func:`measure` does for one candidate, with a fresh interpreter of its own (the serving
model is never replaced or touched):

- **load time**: creating the interpreter and allocating its tensors (first thread count);
- **latency** per interpreter thread count: two warm-up runs, then ``runs`` timed runs on the
  bundle's health-check inputs (real inputs when the bundle was made with data), p50, p95, p99
  and mean in milliseconds, and runs per second back to back;
- **memory**: the agent process's peak resident set while this candidate was measured (what
  the board must hold with the serving model and the candidate loaded: the highest ``VmRSS``
  sampled after loading, the health check, the warm-up and the timed runs, and ``VmHWM`` reset
  for this candidate through ``/proc/self/clear_refs`` where the kernel permits it), and what
  the candidate added over the resident set before it;
- **correctness**: the bundle's health-check inputs, compared with the outputs the workstation
  recorded, within the bundle's own tolerance: an arch-specific wrong answer shows here;
- **temperature and throttling**, where the board reports them (the hottest
  ``/sys/class/thermal/thermal_zone*/temp``; ``vcgencmd get_throttled`` on a Raspberry Pi);
  None where it does not.

:class:`BenchLink` is the transport: it follows the fleet's signed bench request (verified by
:func:`edgekit.bench.verify_bench_request`; this module decides nothing about trust), fetches
each candidate's chunks like any bundle, runs :func:`measure` in one worker thread at the
lowest CPU priority, waiting for the serving model to be idle before each run, and queues the
reports in an on-disk outbox the daemon drains to ``devices/{device}/bench``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import platform
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from edgekit.atomic import atomic_write
from edgekit.bench import (
    BenchCandidate,
    BenchReport,
    BenchRequest,
    decode_bench_request,
    verify_bench_request,
)
from edgekit.bundle import Bundle
from edgekit.errors import BenchError, BrokerError, DownloadCancelledError, EdgekitError
from edgekit.healthcheck import load_healthcheck
from edgekit.runtime import Model, dequantize
from edgekit.transfer import fetch_staged_bundle

from .outbox import Outbox
from .shadow import MEMORY_RESERVE, available_memory_bytes, estimate_memory_need

__all__ = [
    "BenchLink",
    "describe_board",
    "measure",
    "read_temperature",
    "read_throttled",
]

log = logging.getLogger(__name__)

#: The worker thread's nice value (Linux: per thread): below everything serving.
NICE = 19
WARMUP_RUNS = 2
#: Serving must have been idle this long (seconds), and three times the last bench run, before
#: a bench run starts: runs go in the quiet moments between requests.
QUIET_MIN = 0.005
#: A device that never goes quiet still runs one bench run this often (seconds), counted as
#: ``forced`` in the report: the bench progresses slowly instead of never, and serving loses
#: at most one candidate run's worth of CPU per interval.
MAX_WAIT = 2.0
QUIET_MAX = 0.5
BENCH_FILE = "bench.json"
OUTBOX_MAX = 200

# /proc/cpuinfo "CPU part" of ARM cores (aarch64 kernels print no model name).
_ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd49": "Neoverse-N2",
    "0xd4f": "Neoverse-V2",
}


def _read(path: Path, limit: int = 200) -> Optional[str]:
    try:
        text = path.read_bytes()[:65536].replace(b"\0", b"").decode("utf-8", "replace").strip()
    except OSError:
        return None
    return text[:limit] or None


def _cpu_model(cpuinfo: Optional[str]) -> Optional[str]:
    if not cpuinfo:
        return None
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() not in fields:
            fields[name.strip()] = value.strip()
    if fields.get("model name"):
        return fields["model name"][:200]
    part = fields.get("CPU part", "").lower()
    if part:
        return _ARM_PARTS.get(part, f"ARM CPU part {part}")
    return fields.get("Hardware") or fields.get("cpu model") or None


def describe_board(runtime: str, xnnpack: bool, root: str = "/") -> dict[str, Any]:
    """This board's class: model (device tree, else DMI product name), CPU model, machine, cores,
    and the runtime and kernels that run models. ``root``: where /proc and /sys are (tests)."""
    base = Path(root)
    model = _read(base / "proc/device-tree/model") or _read(base / "sys/class/dmi/id/product_name")
    return {
        "model": model,
        "cpu": _cpu_model(_read(base / "proc/cpuinfo", limit=65536)),
        "machine": platform.machine() or None,
        "cores": os.cpu_count() or 1,
        "runtime": runtime,
        "xnnpack": bool(xnnpack),
    }


def read_temperature(root: str = "/") -> Optional[float]:
    """The hottest thermal zone in °C, or None where the board reports none."""
    found = []
    for path in glob.glob(os.path.join(root, "sys/class/thermal/thermal_zone*/temp")):
        text = _read(Path(path))
        with contextlib.suppress(TypeError, ValueError):
            found.append(int(text) / 1000.0)  # type: ignore[arg-type]
    return max(found) if found else None


def read_throttled() -> Optional[str]:
    """``vcgencmd get_throttled``'s flags (``0x0``: never throttled) on a Raspberry Pi; None elsewhere."""
    command = shutil.which("vcgencmd")
    if command is None:
        return None
    try:
        done = subprocess.run(
            [command, "get_throttled"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    _, _, value = done.stdout.strip().partition("=")
    return value[:32] or None


def _memory() -> tuple[Optional[int], Optional[int]]:
    """(VmRSS, VmHWM) of this process in bytes, where /proc says."""
    rss = hwm = None
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss, hwm


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current resident set (``/proc/self/clear_refs`` "5"),
    so VmHWM then is the peak of what follows; False where the kernel does not permit it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


class _Peak:
    """One candidate's peak resident set: the highest VmRSS sampled after each step (load, the
    health check, the warm-up, the timed runs), and VmHWM when it was reset at the start."""

    def __init__(self) -> None:
        self.before, _ = _memory()
        self.highest = self.before
        self.exact = _reset_peak()

    def sample(self) -> None:
        rss, _ = _memory()
        if rss is not None and (self.highest is None or rss > self.highest):
            self.highest = rss

    def result(self) -> tuple[Optional[int], Optional[int]]:
        """(peak bytes, bytes the candidate added over the resident set before it)."""
        self.sample()
        peak = self.highest
        if self.exact:
            _, hwm = _memory()
            if hwm is not None and (peak is None or hwm > peak):
                peak = hwm
        added = None if peak is None or self.before is None else max(0, peak - self.before)
        return peak, added


def _percentile(ordered: Sequence[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return (ordered[low] + (ordered[high] - ordered[low]) * (position - low)) * 1000.0


def _agreement(model: Model, bundle: Bundle, between: Callable[[], bool]) -> Optional[dict[str, Any]]:
    """The health-check inputs run by ``model``, compared with the recorded outputs."""
    manifest = bundle.manifest
    data = bundle.member("healthcheck")
    spec = manifest.healthcheck
    if spec is None or data is None:
        return None
    feeds, expected = load_healthcheck(data, len(manifest.inputs), len(manifest.outputs))
    agreed, worst = 0, 0.0
    for s in range(spec.samples):
        between()
        got = model.run([feed[s] for feed in feeds])
        ok = True
        for j, out_spec in enumerate(manifest.outputs):
            want = dequantize(expected[j][s], out_spec).astype(np.float64)
            have = dequantize(got[j], out_spec).astype(np.float64)
            if want.shape != have.shape or not np.all(np.isfinite(have)):
                ok = False
                continue
            error = np.abs(have - want)
            worst = max(worst, float(error.max(initial=0.0)))
            ok = ok and bool(np.all(error <= spec.atol + spec.rtol * np.abs(want)))
        agreed += int(ok)
    return {"samples": spec.samples, "agreed": agreed, "max_abs_error": worst, "tolerance": spec.atol}


def _inputs(model: Model, bundle: Bundle) -> list[list[np.ndarray]]:
    """Inputs for the timed runs: the health-check samples, else zeros of the model's shapes."""
    manifest = bundle.manifest
    data = bundle.member("healthcheck")
    if manifest.healthcheck is not None and data is not None:
        feeds, _ = load_healthcheck(data, len(manifest.inputs), len(manifest.outputs))
        return [[feed[s] for feed in feeds] for s in range(manifest.healthcheck.samples)]
    return [[np.zeros(d["shape"], dtype=d["dtype"]) for d in model.input_details]]


def measure(
    bundle: Bundle,
    *,
    board: dict[str, Any],
    threads: Sequence[int] = (1,),
    runs: int = 50,
    between: Callable[[], bool] = lambda: False,
    cancel: Optional[threading.Event] = None,
) -> dict[str, Any]:
    """Measure ``bundle`` (already verified) on this board; the fields of a BenchReport
    (load_ms, by_threads, correctness, memory, temperature, throttled). ``between()`` is called
    before each timed run (the daemon waits there for the serving model to be idle) and says
    whether the run is forced (serving was not idle; counted per thread count).
    EdgekitError (ModelFormatError, ...) when the candidate cannot be loaded."""
    peak = _Peak()  # this candidate's own peak, not the process's lifetime high-water mark
    load_ms: Optional[float] = None
    correctness: Optional[dict[str, Any]] = None
    by_threads = []
    for count in threads:
        between()  # every step that uses the CPU waits for a quiet moment, loading too
        start = time.perf_counter()
        model = Model(bundle.model, runtime=board["runtime"], threads=count, xnnpack=board["xnnpack"])
        loaded = time.perf_counter() - start
        try:
            peak.sample()
            if load_ms is None:
                load_ms = loaded * 1000.0
                correctness = _agreement(model, bundle, between)
                peak.sample()
            feeds = _inputs(model, bundle)
            for i in range(WARMUP_RUNS):
                between()
                model.run(feeds[i % len(feeds)])
            peak.sample()
            latencies = []
            forced = 0
            for i in range(runs):
                if cancel is not None and cancel.is_set():
                    raise DownloadCancelledError("the bench was replaced by a newer request")
                forced += int(between())
                start = time.perf_counter()
                model.run(feeds[i % len(feeds)])
                latencies.append(time.perf_counter() - start)
            peak.sample()
        finally:
            model.close()
        ordered = sorted(latencies)
        total = sum(ordered)
        by_threads.append(
            {
                "threads": count,
                "runs": runs,
                "p50_ms": _percentile(ordered, 0.5),
                "p95_ms": _percentile(ordered, 0.95),
                "p99_ms": _percentile(ordered, 0.99),
                "mean_ms": total / len(ordered) * 1000.0,
                "per_second": len(ordered) / total if total > 0 else 0.0,
                "forced": forced,
            }
        )
    peak_bytes, added = peak.result()
    return {
        "load_ms": load_ms,
        "by_threads": by_threads,
        "correctness": correctness,
        "peak_rss_bytes": peak_bytes,
        "added_rss_bytes": added,
        "temperature_c": read_temperature(),
        "throttled": read_throttled(),
    }


EventSink = Callable[[str, str, Optional[dict[str, str]]], None]
#: Fetches one candidate's bundle (verified against the device's trusted keys) into a directory.
Fetcher = Callable[[BenchCandidate, Path, threading.Event], Bundle]


class BenchLink:
    """Follows the fleet's bench topic, runs requested benchmarks in one low-priority worker,
    keeps reports in an outbox (``state_dir/outbox/bench``) until the broker has them."""

    def __init__(
        self,
        *,
        device: str,
        fleet: str,
        state_dir: Path,
        trusted: Any,
        board: dict[str, Any],
        fetch: Fetcher,
        activity: Callable[[], object] = lambda: None,
        authorised: Callable[[], Optional[frozenset[str]]] = lambda: None,
        on_event: Optional[EventSink] = None,
        wake: Optional[Callable[[], None]] = None,
        available: Callable[[], Optional[int]] = available_memory_bytes,
    ) -> None:
        self.device = device
        self.fleet = fleet
        self.state_dir = Path(state_dir)
        self.trusted = trusted
        self.board = board
        self.outbox = Outbox(self.state_dir / "outbox" / "bench", OUTBOX_MAX)
        self.refused = 0
        #: Candidates (or whole requests) lost to an unexpected error: counted, logged with its
        #: traceback, and reported as failed; the worker goes on with the next.
        self.errors = 0
        #: Set each time the reports of one request are all queued (tests wait on it).
        self.finished = threading.Event()
        self._fetch = fetch
        self._activity = activity
        #: Under TUF: the bundles the device's verified targets lists (None: single-key trust).
        self._authorised = authorised
        self._available = available
        self._marker: object = None
        self._since = time.monotonic()
        self._last_run = 0.0
        self._last_start = 0.0
        self._on_event = on_event
        self._wake = wake
        # Each request comes with the event that cancels it (made by on_message, which also sets
        # the one before: a newer request replaces the bench in progress, whenever it arrives).
        self._requests: queue.Queue[Optional[tuple[BenchRequest, threading.Event]]] = queue.Queue()
        self._cancel = threading.Event()
        self._running = threading.Event()  # the cancel event of the request the worker runs
        self._lock = threading.Lock()  # self._cancel, self._progress and BENCH_FILE
        self._thread: Optional[threading.Thread] = None
        #: The request followed and which of its candidates were reported (BENCH_FILE).
        self._progress = self._load_progress()
        self._last_seq = _int(self._progress.get("seq"))
        self._report_interrupted()  # before any new request can replace what BENCH_FILE says

    # -- the request --------------------------------------------------------------------------

    def _load_progress(self) -> dict[str, Any]:
        try:
            progress = json.loads((self.state_dir / BENCH_FILE).read_bytes())
        except (OSError, ValueError):
            return {}
        return progress if isinstance(progress, dict) else {}

    def _save_progress(self) -> None:
        """BENCH_FILE: the seq followed (a restart does not run it again), its candidates and
        those already reported (a restart reports the others as failed). Under self._lock."""
        try:
            atomic_write(self.state_dir / BENCH_FILE, json.dumps(self._progress).encode())
        except OSError as exc:
            log.error("device %s could not save %s: %s", self.device, BENCH_FILE, exc.strerror or exc)

    def on_message(self, payload: bytes) -> None:
        """A message on the fleet's bench topic (the MQTT dispatcher thread: cheap)."""
        if not payload:
            return  # a cleared retained request
        try:
            request = verify_bench_request(
                payload,
                self.trusted,
                fleet=self.fleet,
                device=self.device,
                last_seq=self._last_seq,
                authorised=self._authorised(),
            )
        except BenchError as exc:
            reason = getattr(exc, "reason", "malformed")
            if reason == "not-chosen" or (reason == "replayed" and _seq(payload) == self._last_seq):
                return  # for other devices, or the retained copy of the one followed: not news
            self.refused += 1
            log.warning("device %s refused a bench request: %s", self.device, exc)
            self._event("bench_refused", f"device {self.device} refused a bench request: {exc}", None)
            return
        self._last_seq = request.seq
        cancel = threading.Event()
        with self._lock:
            self._progress = {
                "seq": request.seq,
                "candidates": [_ident(c) for c in request.candidates],
                "reported": [],
            }
            self._save_progress()  # a restart does not run it again
            self._cancel.set()  # a newer request replaces one in progress
            self._cancel = cancel
        self._requests.put((request, cancel))

    # -- the worker ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name=f"edgekit-bench-{self.device}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._cancel.set()
        self._requests.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        """True while the worker runs (the daemon's watchdog checks it)."""
        return self._thread is not None and self._thread.is_alive()

    def _report_interrupted(self) -> None:
        """A request the agent stopped or restarted during is not run again (docs/bench.md): its
        candidates not yet reported are reported failed, so the owner sees why they are missing."""
        with self._lock:
            progress = self._progress
            seq = _int(progress.get("seq"))
            candidates = progress.get("candidates")
            reported = progress.get("reported")
            if seq is None or not isinstance(candidates, list) or not isinstance(reported, list):
                return
            left = [c for c in candidates if isinstance(c, dict) and c.get("bundle_id") not in reported]
            for ident in left:
                label = f"{ident.get('name')}@{ident.get('version')}"
                try:
                    report = BenchReport(
                        device=self.device,
                        fleet=self.fleet,
                        bench_seq=seq,
                        candidate=ident,
                        board=self.board,
                        state="failed",
                        error=(
                            f"device {self.device} did not measure {label}: the agent restarted during "
                            "the benchmark, which is not run again; ask again with `edgekit bench`"
                        ),
                    )
                    self.outbox.put(report.to_dict())
                except (EdgekitError, OSError, ValueError, TypeError) as exc:  # a damaged BENCH_FILE
                    log.error(
                        "device %s could not report bench seq %d as interrupted: %s", self.device, seq, exc
                    )
                progress["reported"] = [*reported, ident.get("bundle_id")]
                reported = progress["reported"]
            if left:
                log.warning("device %s: bench seq %d was interrupted by a restart", self.device, seq)
                self._save_progress()
                if self._wake is not None:
                    self._wake()

    def _reported(self, seq: int, bundle_id: str) -> None:
        with self._lock:
            if self._progress.get("seq") != seq:
                return  # a newer request replaced it
            reported = self._progress.get("reported")
            if isinstance(reported, list):
                reported.append(bundle_id)
                self._save_progress()

    def _between(self) -> bool:
        """Wait for a quiet moment: serving idle for QUIET_MIN seconds and three times the last
        bench run. True when MAX_WAIT passed without one (the run is forced)."""
        now = time.monotonic()
        if self._last_start:
            self._last_run = now - self._last_start
        quiet = min(max(QUIET_MIN, 3 * self._last_run), QUIET_MAX)
        deadline = now + MAX_WAIT
        while True:
            marker = self._activity()
            now = time.monotonic()
            if marker != self._marker:
                self._marker, self._since = marker, now
            elif now - self._since >= quiet:
                self._last_start = time.monotonic()
                return False
            if now >= deadline or self._running.is_set():
                self._last_start = time.monotonic()
                return True
            time.sleep(min(quiet / 4, deadline - now) if deadline > now else 0)

    def _work(self) -> None:
        # Serving keeps priority: at nice 19 this thread gets only the CPU serving does not want.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        while True:
            item = self._requests.get()
            if item is None:
                return
            if not self._requests.empty():
                continue  # a newer one is waiting: it replaces this one
            request, cancel = item
            self._running = cancel  # a wait for a quiet moment ends when this request is replaced
            try:
                self._run(request, cancel)
            except DownloadCancelledError:
                log.info("device %s: bench seq %d was replaced or stopped", self.device, request.seq)
            except Exception:  # counted and logged: the worker must outlive any one request
                self.errors += 1
                log.exception(
                    "device %s: bench seq %d ended by an unexpected error", self.device, request.seq
                )

    def _run(self, request: BenchRequest, cancel: threading.Event) -> None:
        labels = ", ".join(c.label for c in request.candidates)
        self._event("bench_started", f"device {self.device} is measuring {labels}", None)
        for candidate in request.candidates:
            ident = _ident(candidate)
            directory = self.state_dir / "downloads" / f"bench-{candidate.sha256}"
            fields: dict[str, Any]
            try:
                bundle = self._fetch(candidate, directory, cancel)
                self._check_memory(bundle, candidate)
                fields = measure(
                    bundle,
                    board=self.board,
                    threads=request.threads,
                    runs=request.runs,
                    between=self._between,
                    cancel=cancel,
                )
                state, error = "done", None
            except DownloadCancelledError:
                raise
            except (EdgekitError, OSError, ValueError, RuntimeError) as exc:
                # reported, counted in the report; the serving model was not touched
                state, error, fields = (
                    "failed",
                    f"device {self.device} could not measure {candidate.label}: {exc}",
                    {},
                )
                log.error("%s", error)
            except Exception as exc:  # a bug or a bundle nothing foresaw: counted, logged, reported
                self.errors += 1
                state, error, fields = (
                    "failed",
                    f"device {self.device} could not measure {candidate.label}: an unexpected error "
                    f"in the agent ({type(exc).__name__}: {exc}); the serving model was not touched",
                    {},
                )
                log.exception("device %s could not measure %s", self.device, candidate.label)
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            report = BenchReport(
                device=self.device,
                fleet=self.fleet,
                bench_seq=request.seq,
                candidate=ident,
                board=self.board,
                state=state,
                error=error,
                **fields,
            )
            try:
                self.outbox.put(report.to_dict())
            except (OSError, ValueError) as exc:  # a full disk; a figure JSON cannot hold (counted)
                log.error("device %s could not queue its bench report: %s", self.device, exc)
            self._reported(request.seq, candidate.sha256)
            if self._wake is not None:
                self._wake()
        self._event("bench_finished", f"device {self.device} measured {labels}", None)
        self.finished.set()

    def _check_memory(self, bundle: Bundle, candidate: BenchCandidate) -> None:
        """Refuse (BenchError, reported) a candidate the board cannot hold beside the serving
        model, as a shadow does: serving is never put at risk by a benchmark."""
        need = estimate_memory_need(len(bundle.model))
        free = self._available()
        if free is not None and free - need < MEMORY_RESERVE:
            mib = 1024 * 1024
            raise BenchError(
                f"not enough memory to measure it beside the serving model: it would need about "
                f"{need / mib:.1f} MiB and the board has {free / mib:.1f} MiB available (keeping "
                f"{MEMORY_RESERVE / mib:.0f} MiB for serving); the serving model was left alone. "
                "Benchmark it on a board with more memory"
            )

    def _event(self, kind: str, message: str, bundle: Optional[dict[str, str]]) -> None:
        if self._on_event is not None:
            self._on_event(kind, message, bundle)
        if self._wake is not None:
            self._wake()


def _ident(candidate: BenchCandidate) -> dict[str, str]:
    return {"bundle_id": candidate.sha256, "name": candidate.name, "version": candidate.version}


def _int(value: object) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _seq(payload: bytes) -> Optional[int]:
    try:
        return decode_bench_request(payload).seq
    except BenchError:
        return None


def fetch_candidate(
    client: Any, topics: Any, trusted: Any, *, stall_timeout: float, max_size: int
) -> Fetcher:
    """The daemon's :data:`Fetcher`: a candidate's chunks from the broker, each checked against
    its signed plan, then the bundle's signature checked again against ``trusted``."""
    from .agent import _staged_as_bundle

    def fetch(candidate: BenchCandidate, directory: Path, cancel: threading.Event) -> Bundle:
        try:
            staged = fetch_staged_bundle(
                client,
                candidate.sha256,
                trusted,
                directory,
                topics,
                timeout=None,
                stall_timeout=stall_timeout,
                max_size=max_size,
                cancel=cancel,
            )
        except BrokerError as exc:
            raise BenchError(f"its chunks could not be fetched ({exc})") from None
        return _staged_as_bundle(staged, trusted)

    return fetch
