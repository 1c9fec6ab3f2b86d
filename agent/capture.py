"""Capture on the device: keep the inputs the owner's signed policy asks for, within its limits,
sealed to the owner, until the fleet has them.

A :class:`Capturer` lives in ``state_dir/capture``:

- ``policy.json``: the signed policy applied last (its envelope, re-verified on start) and its
  ``seq``, the floor below which a policy is a replay. No valid, unexpired, enabled policy:
  nothing is captured. A newer policy turning capture off, or the policy's expiry, stops it
  at once (checked on every offer).
- ``hour.json``: when the captures of the last hour were taken, each as wall time, monotonic
  time and boot id. A capture counts against the hour while either clock says it is less than an
  hour old, or its wall time is in the future (the clock went back), so neither a restart nor a
  clock jump lets more through than ``max_per_hour``. The slot is written **before** the record:
  a kill between the two loses a capture, never adds one.
- ``records/{seq:016d}-{delete_at}.ekc``: one sealed record per file (clear header + HPKE
  ciphertext, :func:`edgekit.capture.seal_record`), written atomically, so a kill -9 leaves
  whole records only (stray temp files are removed on start). ``delete_at`` is the wall time
  its retention ends: :meth:`Capturer.sweep` deletes it then, uploaded or not. Before a record is
  stored, the oldest are dropped until the folder holds at most ``max_bytes`` (counted). A full
  disk or any error while capturing is counted and logged, never raised into ``predict()``.

Triggers (:meth:`Capturer.observe`, called by ``Agent.predict``): ``sample`` (a random fraction
of predictions), ``low-confidence`` (the top output below the threshold) and ``drift``
(:meth:`Capturer.drift_sample`: the inputs the drift monitor sampled into its current window
are held in memory, a uniform sample of at most :data:`WINDOW_MAX_INPUTS` inputs, the policy's
``max_per_hour`` and :data:`WINDOW_MAX_BYTES` bytes; when the window fills and the monitor flags
it, those inputs are captured, within the policy's limits as any other). The app's
``capture_filter(x, trigger)`` sees each input first and returns the array to keep (blurred,
cropped) or None to veto it.

Upload (:mod:`edgekit.agent.daemon` calls :meth:`pending`, :meth:`read`, :meth:`ack`): records
go out in chunks after events and telemetry are drained (low priority), and are deleted once
the fleet acknowledged them on ``devices/{device}/capture_ack``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from edgekit.atomic import atomic_write
from edgekit.capture import (
    DEFAULT_CHUNK_SIZE,
    CaptureAck,
    CapturePolicy,
    decode_capture_policy,
    seal_record,
    split_chunks,
    verify_capture_policy,
)
from edgekit.errors import CaptureError
from edgekit.schema import refuse
from edgekit.trust import TrustedKeys

__all__ = ["CaptureClock", "CaptureFilter", "CaptureLink", "CaptureStats", "Capturer"]

log = logging.getLogger(__name__)

CaptureFilter = Callable[[np.ndarray, str], Optional[np.ndarray]]
EventSink = Callable[[str, str, Optional[dict[str, str]]], None]
HOUR = 3600.0
_SUFFIX = ".ekc"
#: The drift window's sampled inputs held in memory for the ``drift`` trigger, at most this
#: many (also at most the policy's ``max_per_hour``: more could never be kept) ...
WINDOW_MAX_INPUTS = 256
#: ... and at most this many bytes of inputs (also at most the policy's ``max_bytes``).
WINDOW_MAX_BYTES = 32 * 2**20


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _in_hour(slot: list[Any], wall: float, mono: float, boot: str) -> bool:
    """Whether a capture taken at ``slot`` (wall, monotonic, boot id) still counts against the
    hour. Within one boot the monotonic clock decides (wall-clock jumps do not matter); across
    a reboot the wall clock, and a capture "in the future" (the clock went back) still counts."""
    if slot[2] == boot and boot:
        return bool(mono - slot[1] < HOUR)
    return bool(wall - slot[0] < HOUR)


def _compact(output: np.ndarray) -> Any:
    """The output as JSON-able lists of 6-significant-digit floats (a float32's repr as a double
    costs 19 characters a value; 1000 class scores would weigh more than the encryption)."""
    array = np.asarray(output, dtype=np.float64)
    return np.vectorize(lambda v: float(f"{v:.6g}"), otypes=[float])(array).tolist() if array.size else []


class CaptureClock:
    """Wall time, monotonic time and the boot id; tests inject their own."""

    def __init__(self) -> None:
        self._boot = _boot_id()

    def wall(self) -> float:
        return time.time()

    def mono(self) -> float:
        return time.monotonic()

    def boot(self) -> str:
        return self._boot


@dataclass
class CaptureStats:
    """Counts since start: what was kept and why the rest was not."""

    captured: int = 0
    capped: int = 0  # over max_per_hour
    vetoed: int = 0  # the app's capture_filter said no
    too_big: int = 0  # one record larger than max_bytes
    dropped_oldest: int = 0  # evicted to stay within max_bytes
    expired: int = 0  # deleted by retention
    failed: int = 0  # a full disk, a filter that raised, ...
    busy: int = 0  # the writer had too many waiting
    uploaded: int = 0
    by_trigger: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Capturer:
    """The device's capture state. Thread-safe; every public method is cheap when capture is off."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        device: str,
        fleet: str,
        trusted: TrustedKeys,
        on_event: Optional[EventSink] = None,
        capture_filter: Optional[CaptureFilter] = None,
        clock: Optional[CaptureClock] = None,
        policy_keys: Optional[Callable[[], Optional[TrustedKeys]]] = None,
    ) -> None:
        self.directory = Path(directory)
        self.records = self.directory / "records"
        self.device = device
        self.fleet = fleet
        self.trusted = trusted
        self.filter = capture_filter
        self.clock = clock or CaptureClock()
        self.stats = CaptureStats()
        self._on_event = on_event
        #: Set by the daemon on a device that follows its fleet's TUF metadata: the keys that may
        #: sign a capture policy there (the desired role's, from the verified targets; None until
        #: some is verified). None on single-key trust, where ``trusted`` signs policies.
        self.policy_keys = policy_keys
        self._waiting: Optional[bytes] = None  # a policy that came before any verified metadata
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # a policy applied, records acknowledged
        self.policy: Optional[CapturePolicy] = None
        self.last_seq: Optional[int] = None
        # The drift window's sampled inputs (drift_sample): a uniform sample (reservoir) of
        # (input, output) copies, how many the window has seen, and the monitor's window seen.
        self._window: list[tuple[np.ndarray, np.ndarray]] = []
        self._window_seen = 0
        self._window_index: tuple[int, int] = (0, -1)
        self._window_lock = threading.Lock()
        self.windows_captured = 0  # drift windows flagged whose inputs were offered
        # The hot path reads these three (0 / None when the trigger is off).
        self.sample_rate = 0.0
        self.confidence_below: Optional[float] = None
        self.drift_on = False
        #: True while an enabled policy is set: ``predict()`` calls :meth:`observe` only then.
        self.armed = False
        self.always = False
        self._hour: list[list[Any]] = []
        self._next_seq = 1
        self._files: list[tuple[int, int, int]] = []  # (seq, delete_at, size), oldest first
        self._sent: dict[int, float] = {}  # seq -> monotonic time its chunks were all acknowledged
        self._write_lock = threading.Lock()  # one capture written at a time (hour.json in order)
        self._jobs: Optional[queue.Queue[Any]] = None
        self._writer: Optional[threading.Thread] = None
        self.records.mkdir(parents=True, exist_ok=True)
        self._scan()
        self._load()

    # -- state on disk ------------------------------------------------------------------------

    def _scan(self) -> None:
        found = []
        for entry in os.scandir(self.records):
            name = entry.name
            if name.startswith(".") and name.endswith(".tmp"):  # a write cut by a crash
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                continue
            stem = name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else ""
            seq, _, delete_at = stem.partition("-")
            if seq.isdigit() and delete_at.isdigit():
                found.append((int(seq), int(delete_at), entry.stat().st_size))
        self._files = sorted(found)
        meta = self._read_json("meta.json")
        floor = int(meta.get("next_seq", 1)) if isinstance(meta.get("next_seq"), int) else 1
        if not meta:  # lost or new: number on above anything possibly handed out
            floor = max(floor, int(self.clock.wall() * 1000))
        self._next_seq = max(floor, self._files[-1][0] + 1 if self._files else 1)
        hour = self._read_json("hour.json").get("slots")
        self._hour = (
            [s for s in hour if isinstance(s, list) and len(s) == 3] if isinstance(hour, list) else []
        )
        self._damaged: Optional[list[Any]] = None
        if not isinstance(hour, list) and (self.directory / "hour.json").exists():
            # The hour's log is damaged: take the hour as full rather than risk going over.
            log.error(
                "device %s: the capture log of the last hour is damaged; no capture for an hour", self.device
            )
            self._damaged = [self.clock.wall(), self.clock.mono(), self.clock.boot()]

    def _read_json(self, name: str) -> dict[str, Any]:
        try:
            doc = json.loads((self.directory / name).read_bytes())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _load(self) -> None:
        saved = self._read_json("policy.json")
        seq = saved.get("seq")
        self.last_seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
        envelope = saved.get("envelope")
        if self.last_seq is None or not isinstance(envelope, str):
            return
        try:
            policy = self._verify(base64.b64decode(envelope), self.last_seq - 1)
        except (CaptureError, ValueError) as exc:
            if getattr(exc, "reason", None) == "waiting":
                return
            log.warning(
                "device %s: the saved capture policy no longer holds (%s); capturing nothing",
                self.device,
                exc,
            )
            if getattr(exc, "reason", None) == "single-key":
                self.event("capture_policy_refused", f"device {self.device}: {exc}")
            return
        self._set(policy)

    def _verify(self, envelope: bytes, last_seq: Optional[int]) -> CapturePolicy:
        """A policy checked against the keys that may sign one on this device: under TUF the
        fleet's desired role keys only (a single key no longer turns capture on)."""
        if self.policy_keys is None:
            return verify_capture_policy(
                envelope, self.trusted, fleet=self.fleet, last_seq=last_seq, now=self.clock.wall()
            )
        keys = self.policy_keys()
        if keys is None:
            raise refuse(
                CaptureError,
                "waiting",
                f"device {self.device} has verified none of its fleet's TUF metadata yet; "
                "the capture policy is checked once it has",
            )
        try:
            return verify_capture_policy(
                envelope, keys, fleet=self.fleet, last_seq=last_seq, now=self.clock.wall()
            )
        except CaptureError as exc:
            if getattr(exc, "reason", None) != "untrusted":
                raise
            raise refuse(
                CaptureError,
                "single-key",
                "the capture policy is not signed by the fleet's online key: this device follows the "
                "fleet's TUF keys, where a single key no longer turns capture on; set the policy with "
                "`edgekit capture policy set` on the machine that holds the fleet's online key",
            ) from None

    def reload(self) -> None:
        """Check the saved policy (and one that came before any verified metadata) again: the
        keys that may sign one changed (TUF metadata verified, or rotated)."""
        with self._lock:
            self._set(None)
            self._load()
            waiting, self._waiting = self._waiting, None
            self._changed.notify_all()
        if waiting is not None:
            try:
                self.apply(waiting)
            except CaptureError as exc:
                if getattr(exc, "reason", None) not in ("waiting", "replayed"):
                    self.event(
                        "capture_policy_refused", f"device {self.device} refused a capture policy: {exc}"
                    )

    def _set(self, policy: Optional[CapturePolicy]) -> None:
        self.policy = policy
        on = policy is not None and policy.enabled
        triggers = policy.triggers if policy is not None and on else ()
        self.sample_rate = policy.sample_rate if policy is not None and "sample" in triggers else 0.0
        self.confidence_below = (
            policy.confidence_below if policy is not None and "low-confidence" in triggers else None
        )
        self.drift_on = "drift" in triggers
        if not self.drift_on:
            self._window, self._window_seen = [], 0
        #: Every prediction must be looked at (low-confidence); else only the sampled ones.
        self.always = self.confidence_below is not None
        self.armed = on

    @property
    def active(self) -> bool:
        return self.policy is not None and self.policy.active(self.clock.wall())

    def apply(self, envelope: bytes) -> CapturePolicy:
        """Verify and apply a signed policy; CaptureError (the device keeps what it had) if refused."""
        try:
            policy = self._verify(envelope, self.last_seq)
        except CaptureError as exc:
            if getattr(exc, "reason", None) == "waiting":
                self._waiting = bytes(envelope)
            raise
        doc = {"seq": policy.seq, "envelope": base64.b64encode(envelope).decode("ascii")}
        with self._lock:
            self.last_seq = policy.seq
            self._set(policy)
            self._changed.notify_all()
            try:
                atomic_write(self.directory / "policy.json", json.dumps(doc).encode())
            except OSError as exc:  # applied in memory; a restart falls back to the older one
                log.error("device %s could not save its capture policy: %s", self.device, exc.strerror)
        log.info("device %s: %s", self.device, policy.describe())
        return policy

    def event(self, kind: str, message: str) -> None:
        if self._on_event is not None:
            self._on_event(kind, message, None)

    # -- the hot path -------------------------------------------------------------------------

    def observe(self, x: np.ndarray, out: np.ndarray, bundle: Callable[[], dict[str, str]]) -> None:
        """Called by ``predict()`` after each run while a policy is set: decide whether this input
        is kept. Never raises."""
        trigger = None
        if self.sample_rate and random.random() < self.sample_rate:
            trigger = "sample"
        elif self.confidence_below is not None and float(np.max(out)) < self.confidence_below:
            trigger = "low-confidence"
        if trigger is not None:
            self.offer(x, [out], trigger, bundle())

    def drift_sample(
        self, x: np.ndarray, out: np.ndarray, monitor: Any, bundle: Callable[[], dict[str, str]]
    ) -> None:
        """Called by ``predict()`` for each input the drift monitor sampled, right after
        ``monitor.add``, while a policy with the ``drift`` trigger is on. Holds a uniform sample
        of the window's inputs (reservoir sampling, bounded: see :data:`WINDOW_MAX_INPUTS`); when
        this input fills the window and the monitor flags it, offers them. Never raises."""
        policy = self.policy
        if policy is None:
            return
        try:
            size = max(int(monitor.window), 1)
            # The monitor's window this input is in (a new bundle brings a new monitor).
            index = (id(monitor), (int(monitor.sampled) - 1) // size)
            full = int(monitor.sampled) % size == 0
            x = np.asarray(x)
            room = min(
                WINDOW_MAX_INPUTS,
                policy.max_per_hour,
                min(WINDOW_MAX_BYTES, policy.max_bytes) // max(x.nbytes, 1),
            )
            with self._window_lock:
                if index != self._window_index:  # a new window: what the last one held goes
                    self._window, self._window_seen, self._window_index = [], 0, index
                self._window_seen += 1
                if len(self._window) < room:
                    self._window.append((np.array(x, copy=True), np.array(out, copy=True)))
                elif room > 0:
                    slot = random.randrange(self._window_seen)
                    if slot < room:
                        self._window[slot] = (np.array(x, copy=True), np.array(out, copy=True))
                if not full:
                    return
                held, self._window, self._window_seen = self._window, [], 0
            report = monitor.report()  # the window just filled: judged now
            if not (report.complete and report.drifted) or not held:
                return
            self.windows_captured += 1
            self._offer_many(held, "drift", bundle())
        except Exception as exc:  # noqa: BLE001 - capture never fails predict()
            with self._lock:
                self.stats.failed += 1
            log.warning("device %s: the drift window's capture failed (%s); serving on", self.device, exc)

    def offer(self, x: np.ndarray, outputs: list[np.ndarray], trigger: str, bundle: dict[str, str]) -> bool:
        """Keep one input if the policy and its limits allow. The hour's slot is taken here, at
        once (a flood of triggers is capped before any work); the filter, sealing and writing run
        on the writer thread when one is started (:meth:`start_writer`), else here. True when the
        capture was taken (stored, or handed to the writer)."""
        policy = self.policy
        wall = self.clock.wall()
        if policy is None or not policy.active(wall):
            return False
        with self._lock:
            slot = self._take_slot(policy.max_per_hour, wall)
        if slot is None:
            return False
        job = (policy, x, outputs, trigger, bundle, wall, slot)
        if self._jobs is not None:
            try:  # copies: the caller's arrays may be reused for the next frame
                self._jobs.put_nowait(
                    (
                        policy,
                        np.array(x, copy=True),
                        [np.array(o, copy=True) for o in outputs],
                        trigger,
                        bundle,
                        wall,
                        slot,
                    )
                )
            except queue.Full:
                with self._lock:
                    self.stats.busy += 1  # the slot stays taken: never more than the cap
                return False
            return True
        return self._run(job)

    def _take_slot(self, max_per_hour: int, wall: float) -> Optional[list[Any]]:
        """One capture's slot in the hour (the caller holds ``_lock``), or None when the hour
        is full (counted as capped)."""
        if self._count_hour(wall) >= max_per_hour:
            self.stats.capped += 1
            return None
        slot: list[Any] = [wall, self.clock.mono(), self.clock.boot()]
        self._hour.append(slot)
        return slot

    def _offer_many(
        self, items: list[tuple[np.ndarray, np.ndarray]], trigger: str, bundle: dict[str, str]
    ) -> int:
        """:meth:`offer` for several inputs (copies of their own) at once: each takes the hour's
        slot or is capped, and they go to the writer as one job. Returns how many were taken."""
        policy = self.policy
        wall = self.clock.wall()
        if policy is None or not policy.active(wall):
            return 0
        jobs = []
        with self._lock:
            for x, out in items:
                slot = self._take_slot(policy.max_per_hour, wall)
                if slot is not None:
                    jobs.append((policy, x, [out], trigger, bundle, wall, slot))
        if self._jobs is not None:
            try:
                self._jobs.put_nowait(jobs)
            except queue.Full:
                with self._lock:
                    self.stats.busy += len(jobs)  # the slots stay taken: never more than the cap
                return 0
        else:
            for job in jobs:
                self._run(job)
        return len(jobs)

    def _run(self, job: tuple[Any, ...]) -> bool:
        with self._write_lock:
            try:
                return self._capture(*job)
            except Exception as exc:  # noqa: BLE001 - counted, logged: a full disk or an app filter that raised never fails predict()
                with self._lock:
                    self.stats.failed += 1
                log.warning("device %s: a %s capture failed (%s); serving on", self.device, job[3], exc)
                return False

    def start_writer(self, depth: int = 8) -> None:
        """Seal and write captures on a thread of their own, so ``predict()`` never waits for the
        disk; at most ``depth`` wait (more are counted as ``busy`` and not kept)."""
        if self._jobs is not None:
            return
        self._jobs = queue.Queue(depth)
        self._writer = threading.Thread(
            target=self._write_loop, name=f"edgekit-capture-{self.device}", daemon=True
        )
        self._writer.start()

    def _write_loop(self) -> None:
        jobs = self._jobs
        assert jobs is not None
        while True:
            job = jobs.get()
            if job is None:
                return
            for one in job if isinstance(job, list) else [job]:
                self._run(one)
            jobs.task_done()

    def flush(self) -> None:
        """Wait until every capture handed to the writer is stored (or failed)."""
        if self._jobs is not None:
            self._jobs.join()

    def close(self) -> None:
        """Finish the captures handed to the writer, and stop it."""
        if self._jobs is not None and self._writer is not None:
            self.flush()
            self._jobs.put(None)
            self._writer.join()
            self._jobs, self._writer = None, None

    def _count_hour(self, wall: float) -> int:
        mono, boot = self.clock.mono(), self.clock.boot()
        slot = self._damaged
        if slot is not None:
            if _in_hour(slot, wall, mono, boot):
                return 2**31
            self._damaged = None
        kept = [s for s in self._hour if _in_hour(s, wall, mono, boot)]
        self._hour = kept
        return len(kept)

    def _capture(
        self,
        policy: CapturePolicy,
        x: np.ndarray,
        outputs: list[np.ndarray],
        trigger: str,
        bundle: dict[str, str],
        wall: float,
        slot: list[Any],
    ) -> bool:
        kept: Optional[np.ndarray] = np.asarray(x)
        if self.filter is not None and not policy.labels_only:
            kept = self.filter(np.array(x, copy=True), trigger)
            if kept is None:
                with self._lock:
                    self.stats.vetoed += 1
                    with contextlib.suppress(ValueError):  # a vetoed input does not use up the hour
                        self._hour.remove(slot)
                return False
            kept = np.asarray(kept)
        # The hour's slot on disk first: a crash after this loses the capture, never adds one.
        with self._lock:
            hour = json.dumps({"slots": self._hour}).encode()
            seq = self._next_seq
            self._next_seq += 1
        atomic_write(self.directory / "hour.json", hour)
        atomic_write(self.directory / "meta.json", json.dumps({"next_seq": seq + 1}).encode())
        sealed = seal_record(
            policy,
            device=self.device,
            seq=seq,
            time=wall,
            trigger=trigger,
            bundle=bundle,
            outputs=[_compact(o) for o in outputs],
            input_array=kept,
        )
        with self._lock:
            if len(sealed) > policy.max_bytes:
                self.stats.too_big += 1
                return False
            self._make_room(len(sealed), policy.max_bytes)
        delete_at = int(wall + policy.retain_s)
        atomic_write(self.records / f"{seq:016d}-{delete_at}{_SUFFIX}", sealed, mode=0o600)
        with self._lock:
            self._files.append((seq, delete_at, len(sealed)))
            self.stats.captured += 1
            self.stats.by_trigger[trigger] = self.stats.by_trigger.get(trigger, 0) + 1
        return True

    def _make_room(self, size: int, limit: int) -> None:
        total = sum(f[2] for f in self._files)
        while self._files and total + size > limit:
            seq, delete_at, old = self._files.pop(0)
            self._unlink(seq, delete_at)
            total -= old
            self.stats.dropped_oldest += 1
            log.info("device %s dropped capture %d to stay within the policy's bytes", self.device, seq)

    def _unlink(self, seq: int, delete_at: int) -> None:
        self._sent.pop(seq, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.records / f"{seq:016d}-{delete_at}{_SUFFIX}")

    # -- retention and upload -------------------------------------------------------------------

    def sweep(self) -> int:
        """Delete every record whose retention ended (uploaded or not); returns how many. Also
        notices a policy that expired (an event, once)."""
        wall = self.clock.wall()
        with self._lock:
            due = [f for f in self._files if f[1] <= wall]
            for seq, delete_at, _ in due:
                self._unlink(seq, delete_at)
            self._files = [f for f in self._files if f[1] > wall]
            self.stats.expired += len(due)
            policy = self.policy
            if policy is not None and policy.enabled and policy.expires_at <= wall:
                self._set(None)
                message = f"capture policy {policy.seq} expired; device {self.device} captures nothing until a new one is set"
                log.warning("%s", message)
                self.event("capture_policy_expired", message)
        return len(due)

    def bytes_held(self) -> int:
        with self._lock:
            return sum(f[2] for f in self._files)

    def __len__(self) -> int:
        return len(self._files)

    def held(self) -> list[int]:
        """Seqs of every record held, oldest first."""
        with self._lock:
            return [seq for seq, _, _ in self._files]

    def pending(self, limit: int, resend_after: float) -> list[int]:
        """Seqs to upload now, oldest first: never sent, or sent ``resend_after`` seconds ago
        without the fleet's acknowledgement."""
        mono = self.clock.mono()
        with self._lock:
            return [seq for seq, _, _ in self._files if mono - self._sent.get(seq, -1e18) >= resend_after][
                :limit
            ]

    def read(self, seq: int) -> Optional[bytes]:
        with self._lock:
            found = [f for f in self._files if f[0] == seq]
        if not found:
            return None
        try:
            return (self.records / f"{seq:016d}-{found[0][1]}{_SUFFIX}").read_bytes()
        except FileNotFoundError:
            return None

    def sent(self, seq: int) -> None:
        with self._lock:
            self._sent[seq] = self.clock.mono()

    def ack(self, seqs: list[int]) -> int:
        """The fleet has these records: delete them. Returns how many were held."""
        wanted = set(seqs)
        with self._lock:
            done = [f for f in self._files if f[0] in wanted]
            for seq, delete_at, _ in done:
                self._unlink(seq, delete_at)
            self._files = [f for f in self._files if f[0] not in wanted]
            self.stats.uploaded += len(done)
            self._changed.notify_all()
        return len(done)

    def wait_for(self, predicate: Callable[[Capturer], bool], timeout: float) -> bool:
        """Wait until ``predicate(self)`` holds after a policy change or an acknowledgement."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout)


# -- the device's link to the fleet (used by the daemon) ------------------------------------------

#: Sealed records sent per upload pass, at most: captures never hold up telemetry for long.
UPLOAD_PER_PASS = 4
#: Seconds to wait for the fleet's acknowledgement before a record is sent again.
RESEND_AFTER = 300.0


class CaptureLink:
    """Follows the fleet's capture policy topic, uploads held records in chunks, deletes them
    when the fleet acknowledges. ``client`` is the daemon's :class:`edgekit.mqtt.MqttClient`."""

    def __init__(
        self,
        capturer: Capturer,
        client: Any,
        topics: Any,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        resend_after: float = RESEND_AFTER,
        wake: Optional[Callable[[], None]] = None,
    ) -> None:
        self.capturer = capturer
        self.client = client
        self.topics = topics
        self.chunk_size = chunk_size
        self.resend_after = resend_after
        self.refused = 0  # policies refused (unsigned, other fleet, expired, replayed, ...)
        self._wake = wake

    def start(self) -> None:
        cap = self.capturer
        self.client.subscribe(self.topics.fleet_capture(cap.fleet), self._on_policy, qos=1, timeout=None)
        self.client.subscribe(self.topics.device_capture_ack(cap.device), self._on_ack, qos=1, timeout=None)

    def _on_policy(self, message: Any) -> None:
        if not message.payload:
            return  # a cleared retained policy: the newest applied one stays (or its expiry ends it)
        cap = self.capturer
        try:
            cap.apply(message.payload)
        except CaptureError as exc:
            reason = getattr(exc, "reason", "malformed")
            if reason == "replayed" and _policy_seq(message.payload) == cap.last_seq:
                return  # the retained copy of the policy applied last, seen again on reconnect
            if reason == "waiting":
                log.info("device %s: %s", cap.device, exc)
                return  # checked again (Capturer.reload) once the fleet's TUF metadata is verified
            self.refused += 1
            log.warning("device %s refused a capture policy: %s", cap.device, exc)
            cap.event("capture_policy_refused", f"device {cap.device} refused a capture policy: {exc}")
            if self._wake is not None:
                self._wake()
            return
        policy = cap.policy
        if policy is not None:
            cap.event("capture_policy_applied", f"device {cap.device}: {policy.describe()}")
        if self._wake is not None:
            self._wake()

    def _on_ack(self, message: Any) -> None:
        cap = self.capturer
        try:
            ack = CaptureAck.from_json(message.payload)
            if ack.device != cap.device:
                raise CaptureError(f"it is for device {ack.device}, not this one")
        except CaptureError as exc:
            log.warning("device %s ignored a malformed capture acknowledgement: %s", cap.device, exc)
            return
        if ack.drop_all:  # `edgekit capture purge --device`: drop what is held
            dropped = cap.ack(cap.held())
            cap.event(
                "capture_purged", f"device {cap.device} deleted the {dropped} captures it held, as asked"
            )
            return
        cap.ack(list(ack.seqs))

    def upload(self, limit: int = UPLOAD_PER_PASS) -> int:
        """Send up to ``limit`` held records (chunks QoS 1); returns how many were sent whole.
        BrokerError stops the pass (the records stay held and are sent next time)."""
        cap = self.capturer
        sent = 0
        topic = self.topics.device_capture(cap.device)
        for seq in cap.pending(limit, self.resend_after):
            record = cap.read(seq)
            if record is None:
                continue
            deliveries = [
                self.client.publish(topic, chunk, qos=1) for chunk in split_chunks(record, self.chunk_size)
            ]
            for delivery in deliveries:
                delivery.wait(30.0)
            cap.sent(seq)
            sent += 1
        return sent


def _policy_seq(envelope: bytes) -> Optional[int]:
    try:
        return decode_capture_policy(envelope).seq
    except CaptureError:
        return None
