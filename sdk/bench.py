"""On-fleet benchmarks (docs/bench.md): the signed request a fleet's devices follow, and the
report each device sends back for each candidate.

A :class:`BenchRequest` names the devices that should measure, the candidate bundles (by digest,
name and version: their chunks are published like any bundle's), the interpreter thread counts
to try and the number of timed runs. It travels in the signed envelope of
:mod:`edgekit.envelope` (``payload_type`` ``edgekit.bench_request``), retained on
``fleets/{fleet}/bench``. A device applies it only when it is signed by a key it trusts, is for
its fleet, names the device, has not expired, and has a ``seq`` above the last request it
followed (:func:`verify_bench_request`: bytes and keys in, a request out, or a
:class:`~edgekit.errors.BenchError` whose ``reason`` is ``unsigned``, ``untrusted``,
``forged``, ``malformed``, ``other-fleet``, ``not-chosen``, ``expired``, ``replayed``, or,
on a device under the TUF key hierarchy, ``unauthorised``: a candidate its fleet's verified
``targets`` role does not list).

A :class:`BenchReport` is what a device measured of one candidate, sent on
``devices/{device}/bench``; :meth:`BenchReport.from_json` is the one strict decoder the agent's
tests, ingest, the CLI and the dashboard use (MessageError when malformed: counted and dropped).
No I/O here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

from .envelope import Kind, open_envelope, seal, verify_envelope
from .errors import BenchError, BundleError, TopicError
from .keys import SigningKey
from .manifest import check_name, check_version
from .schema import SHA256, Fields, canonical_json, decode_json, refuse
from .topics import check_device_id, check_fleet_id
from .trust import TrustedKeys

__all__ = [
    "BENCH_REPORT_SCHEMA",
    "BENCH_REQUEST_SCHEMA",
    "MAX_RUNS",
    "BenchCandidate",
    "BenchReport",
    "BenchRequest",
    "board_class",
    "decode_bench_request",
    "new_bench_request",
    "parse_threads",
    "sign_bench_request",
    "verify_bench_request",
]

BENCH_REQUEST_SCHEMA = "edgekit.bench_request"
BENCH_REPORT_SCHEMA = "edgekit.bench_report"
SCHEMA_VERSION = 1
MAX_ENVELOPE_SIZE = 64 * 1024
MAX_REPORT_SIZE = 64 * 1024
MAX_CANDIDATES = 8
MAX_DEVICES = 500
MAX_THREADS = 64
MAX_THREAD_COUNTS = 8
MAX_RUNS = 10_000
MAX_SEQ = 2**53 - 1
DEFAULT_RUNS = 50
DEFAULT_TTL = 24 * 3600
#: A report's free text (board model, CPU model, error) is cut to this many characters.
MAX_TEXT = 200
STATES = ("done", "failed")

BENCH = Kind(
    payload_type=BENCH_REQUEST_SCHEMA,
    what="the bench request",
    error=BenchError,
    max_size=MAX_ENVELOPE_SIZE,
    how_to_sign="`edgekit bench`",
    untrusted_fix="sign it with a key in the device's trusted keys",
)
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_KEYS = {
    "schema",
    "schema_version",
    "fleet",
    "seq",
    "devices",
    "candidates",
    "threads",
    "runs",
    "issued_at",
    "expires_at",
}


def _bad(message: str, reason: str = "malformed") -> BenchError:
    return refuse(BenchError, reason, message)


def _format_time(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime(_TIME_FORMAT)


def _parse_time(value: object, what: str) -> int:
    try:
        if not isinstance(value, str) or len(value) != 20:
            raise ValueError
        return int(datetime.strptime(value, _TIME_FORMAT).replace(tzinfo=timezone.utc).timestamp())
    except ValueError:
        raise _bad(f"the bench request's {what} is not a UTC time like 2026-01-31T12:00:00Z") from None


def parse_threads(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` as (1, 2, 4): distinct interpreter thread counts from 1 to 64, at most 8 of
    them; BenchError naming the problem otherwise."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or any(not p.isdigit() for p in parts):
        raise _bad(f"--threads {text!r} is not a list of thread counts; write it like 1,2,4")
    counts = tuple(int(p) for p in parts)
    if any(not 1 <= n <= MAX_THREADS for n in counts):
        raise _bad(f"--threads {text!r}: each thread count must be from 1 to {MAX_THREADS}")
    if len(set(counts)) != len(counts) or len(counts) > MAX_THREAD_COUNTS:
        raise _bad(f"--threads {text!r}: give up to {MAX_THREAD_COUNTS} different thread counts, like 1,2,4")
    return counts


@dataclass(frozen=True)
class BenchCandidate:
    """A bundle to measure, as the request names it."""

    sha256: str
    name: str
    version: str

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, str]:
        return {"sha256": self.sha256, "name": self.name, "version": self.version}

    @classmethod
    def from_dict(cls, doc: object) -> BenchCandidate:
        if not isinstance(doc, dict) or set(doc) != {"sha256", "name", "version"}:
            raise _bad("each bench candidate must have exactly sha256, name and version")
        digest, name, version = doc["sha256"], doc["name"], doc["version"]
        if not isinstance(digest, str) or not SHA256.match(digest):
            raise _bad("a bench candidate's sha256 is not 64 lowercase hex digits")
        try:
            check_name(name if isinstance(name, str) else "")
            check_version(version if isinstance(version, str) else "")
        except BundleError as exc:
            raise _bad(f"the bench request names an {exc}") from None
        return cls(digest, name, version)


@dataclass(frozen=True)
class BenchRequest:
    """Which devices of ``fleet`` measure which candidates, with which thread counts, how many
    timed runs each. ``issued_at`` and ``expires_at`` are UNIX seconds (ISO-8601 in JSON)."""

    fleet: str
    seq: int
    devices: tuple[str, ...]
    candidates: tuple[BenchCandidate, ...]
    threads: tuple[int, ...]
    runs: int
    issued_at: int
    expires_at: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": BENCH_REQUEST_SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "fleet": self.fleet,
            "seq": self.seq,
            "devices": list(self.devices),
            "candidates": [c.to_dict() for c in self.candidates],
            "threads": list(self.threads),
            "runs": self.runs,
            "issued_at": _format_time(self.issued_at),
            "expires_at": _format_time(self.expires_at),
        }

    def to_json(self) -> bytes:
        """Canonical bytes: what is signed."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes) -> BenchRequest:
        """Decode and validate a request (no signature check); BenchError if malformed."""
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise _bad("the bench request is not valid JSON") from None
        if not isinstance(doc, dict) or doc.get("schema") != BENCH_REQUEST_SCHEMA:
            raise _bad("the signed document is not an edgekit bench request")
        version = doc.get("schema_version")
        if version != SCHEMA_VERSION or isinstance(version, bool):
            raise _bad(f"bench request schema version {version!r} is not supported; upgrade edgekit")
        if set(doc) != _KEYS:
            raise _bad(f"the bench request must have exactly the fields {sorted(_KEYS)}")
        seq, runs = doc["seq"], doc["runs"]
        if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq <= MAX_SEQ:
            raise _bad(f"the bench request's seq must be an integer from 1 to {MAX_SEQ}")
        if isinstance(runs, bool) or not isinstance(runs, int) or not 1 <= runs <= MAX_RUNS:
            raise _bad(f"the bench request's runs must be an integer from 1 to {MAX_RUNS}")
        devices, candidates, threads = doc["devices"], doc["candidates"], doc["threads"]
        if not isinstance(devices, list) or not 1 <= len(devices) <= MAX_DEVICES:
            raise _bad(f"the bench request must name 1 to {MAX_DEVICES} devices")
        if not isinstance(candidates, list) or not 1 <= len(candidates) <= MAX_CANDIDATES:
            raise _bad(f"the bench request must name 1 to {MAX_CANDIDATES} candidates")
        if (
            not isinstance(threads, list)
            or not 1 <= len(threads) <= MAX_THREAD_COUNTS
            or any(
                isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_THREADS for n in threads
            )
            or len(set(threads)) != len(threads)
        ):
            raise _bad(
                f"the bench request's threads must be 1 to {MAX_THREAD_COUNTS} counts from 1 to {MAX_THREADS}"
            )
        try:
            fleet = check_fleet_id(doc["fleet"])
            named = tuple(check_device_id(d) for d in devices)
        except TopicError as exc:
            raise _bad(f"the bench request has an {exc}") from None
        issued = _parse_time(doc["issued_at"], "issued_at")
        expires = _parse_time(doc["expires_at"], "expires_at")
        if expires <= issued:
            raise _bad("the bench request expires before it was issued")
        return cls(
            fleet,
            seq,
            named,
            tuple(BenchCandidate.from_dict(c) for c in candidates),
            tuple(threads),
            runs,
            issued,
            expires,
        )


def new_bench_request(
    fleet: str,
    *,
    seq: int,
    devices: list[str],
    candidates: list[BenchCandidate],
    threads: tuple[int, ...] = (1,),
    runs: int = DEFAULT_RUNS,
    ttl: int = DEFAULT_TTL,
    now: Optional[float] = None,
) -> BenchRequest:
    """A request issued now (or at ``now``), validated here so a bad argument fails on the
    workstation, not on every device."""
    issued = int(time.time() if now is None else now)
    request = BenchRequest(
        fleet, seq, tuple(devices), tuple(candidates), tuple(threads), runs, issued, issued + ttl
    )
    return BenchRequest.from_json(request.to_json())


def sign_bench_request(request: BenchRequest, key: SigningKey) -> bytes:
    """The signed envelope to publish, retained, on the fleet's bench topic."""
    return seal(request.to_json(), BENCH_REQUEST_SCHEMA, key)


def decode_bench_request(data: bytes) -> BenchRequest:
    """The request WITHOUT checking its signature (to read its seq; never to act on)."""
    return BenchRequest.from_json(open_envelope(data, BENCH).payload)


def verify_bench_request(
    data: bytes,
    trusted: TrustedKeys,
    *,
    fleet: str,
    device: str,
    last_seq: Optional[int] = None,
    now: Optional[float] = None,
    authorised: Optional[frozenset[str]] = None,
) -> BenchRequest:
    """The request for ``device`` of ``fleet``, its signature checked against ``trusted``, or a
    BenchError saying why not (see the module's docstring for the reasons).

    ``authorised``: on a device under the TUF key hierarchy, the digests its verified
    ``targets`` role lists (:attr:`edgekit.roles.TrustReport.authorised`; empty when nothing is
    verified yet); every candidate must be one of them. None under single-key trust."""
    request = BenchRequest.from_json(verify_envelope(data, trusted, BENCH).payload)
    if request.fleet != fleet:
        raise _bad(
            f"the bench request is for fleet {request.fleet!r}, not this device's fleet {fleet!r}",
            "other-fleet",
        )
    if device not in request.devices:
        raise _bad(f"the bench request (seq {request.seq}) does not name device {device}", "not-chosen")
    # Replay first: the retained copy of a request already followed is not news once it expired.
    if last_seq is not None and request.seq <= last_seq:
        raise _bad(
            f"the bench request has seq {request.seq}, not above the last one followed (seq {last_seq}); "
            "a replay or the retained copy, ignoring it",
            "replayed",
        )
    if request.expires_at <= (time.time() if now is None else now):
        raise _bad(
            f"the bench request (seq {request.seq}) expired at {_format_time(request.expires_at)}; "
            "ask again with `edgekit bench` (or the device clock is wrong)",
            "expired",
        )
    if authorised is not None:
        outside = [c for c in request.candidates if c.sha256 not in authorised]
        if outside:
            raise _bad(
                f"the bench request (seq {request.seq}) names {', '.join(c.label for c in outside)}, which "
                f"fleet {fleet}'s targets role does not authorise; nothing was fetched or run. Authorise it "
                f"with `edgekit trust authorise BUNDLE --fleet {fleet}` (signed by the targets key) and ask again",
                "unauthorised",
            )
    return request


def board_class(board: dict[str, Any]) -> str:
    """The label of a board class: board model, CPU model, runtime and XNNPACK use, e.g.
    ``Raspberry Pi 4 Model B Rev 1.4 · Cortex-A72 · ai_edge_litert · XNNPACK``. Devices of one
    class should measure alike; two classes side by side are what a user compares."""
    model = board.get("model") or f"unknown {board.get('machine') or 'board'}"
    cpu = board.get("cpu") or "unknown CPU"
    kernels = "XNNPACK" if board.get("xnnpack") else "built-in kernels"
    return f"{model} · {cpu} · {board.get('runtime') or 'unknown runtime'} · {kernels}"


def _optional_text(f: Fields, key: str) -> Optional[str]:
    return f.text(key, MAX_TEXT)


@dataclass(frozen=True)
class BenchReport:
    """What one device measured of one candidate (docs/bench.md). Latencies in milliseconds."""

    device: str
    fleet: str
    bench_seq: int
    candidate: dict[str, str]  # bundle_id, name, version
    board: dict[str, Any]  # model, cpu, machine, cores, runtime, xnnpack
    state: str  # done | failed
    error: Optional[str] = None
    load_ms: Optional[float] = None
    peak_rss_bytes: Optional[int] = None
    added_rss_bytes: Optional[int] = None
    #: Per interpreter thread count: threads, runs, p50_ms, p95_ms, p99_ms, mean_ms, per_second,
    #: forced (runs made while serving was busy, after waiting MAX_WAIT for a quiet moment).
    by_threads: list[dict[str, Any]] = field(default_factory=list)
    #: The bundle's health-check inputs run here: samples, agreed (within the bundle's
    #: tolerance), max_abs_error; None when the bundle carries no health check.
    correctness: Optional[dict[str, Any]] = None
    temperature_c: Optional[float] = None  # the hottest thermal zone after the runs; None: not reported
    throttled: Optional[str] = None  # `vcgencmd get_throttled` (a Raspberry Pi); None elsewhere
    time: float = field(default_factory=time.time)
    seq: int = 0  # the device's outbox number: (device, seq) is stored once

    @property
    def agrees(self) -> Optional[bool]:
        """True when every health-check sample matched the workstation's outputs; None: not checked."""
        c = self.correctness
        return None if c is None else c["agreed"] == c["samples"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": BENCH_REPORT_SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "device": self.device,
            "fleet": self.fleet,
            "bench_seq": self.bench_seq,
            "candidate": dict(self.candidate),
            "board": dict(self.board),
            "state": self.state,
            "error": self.error,
            "load_ms": self.load_ms,
            "peak_rss_bytes": self.peak_rss_bytes,
            "added_rss_bytes": self.added_rss_bytes,
            "by_threads": [dict(t) for t in self.by_threads],
            "correctness": None if self.correctness is None else dict(self.correctness),
            "temperature_c": self.temperature_c,
            "throttled": self.throttled,
            "time": self.time,
            "seq": self.seq,
        }

    @classmethod
    def from_json(cls, payload: bytes) -> BenchReport:
        """Decode and validate one report message; MessageError (counted and dropped) if bad."""
        doc = decode_json(payload, BENCH_REPORT_SCHEMA, SCHEMA_VERSION, "bench report", limit=MAX_REPORT_SIZE)
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> BenchReport:
        f = Fields(doc, "bench report")
        candidate = Fields(f.mapping("candidate"), "bench report candidate")
        ident = {
            "bundle_id": candidate.sha256("bundle_id"),
            "name": candidate.required_text("name", 64),
            "version": candidate.required_text("version", 64),
        }
        b = Fields(f.mapping("board"), "bench report board")
        board = {
            "model": _optional_text(b, "model"),
            "cpu": _optional_text(b, "cpu"),
            "machine": _optional_text(b, "machine"),
            "cores": b.integer("cores", top=4096),
            "runtime": b.required_text("runtime", 32),
            "xnnpack": b.boolean("xnnpack"),
        }
        by_threads = f.doc.get("by_threads")
        if not isinstance(by_threads, list) or len(by_threads) > MAX_THREAD_COUNTS:
            raise f.bad("by_threads", f"a list of at most {MAX_THREAD_COUNTS} objects")
        rows = []
        for entry in by_threads:
            if not isinstance(entry, dict):
                raise f.bad("by_threads", "a list of objects")
            t = Fields(entry, "bench report by_threads entry")
            rows.append(
                {
                    "threads": t.integer("threads", top=MAX_THREADS, low=1),
                    "runs": t.integer("runs", top=MAX_RUNS, low=1),
                    **{
                        k: t.number(k, low=0.0)
                        for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "per_second")
                    },
                    # runs made while serving was busy (it never went quiet; see docs/bench.md)
                    "forced": t.integer("forced", 0, top=MAX_RUNS),
                }
            )
        correctness = None
        if f.doc.get("correctness") is not None:
            c = Fields(f.mapping("correctness"), "bench report correctness")
            samples = c.integer("samples", top=100_000)
            agreed = c.integer("agreed", top=samples)
            correctness = {
                "samples": samples,
                "agreed": agreed,
                "max_abs_error": c.optional_number("max_abs_error"),
                "tolerance": c.optional_number("tolerance"),
            }
        throttled = f.text("throttled", 32)
        return cls(
            device=f.id("device"),
            fleet=f.id("fleet"),
            bench_seq=f.integer("bench_seq", top=MAX_SEQ, low=1),
            candidate=ident,
            board=board,
            state=f.one_of("state", STATES),
            error=f.text("error", 1000),
            load_ms=_optional_nonnegative(f, "load_ms"),
            peak_rss_bytes=f.optional_integer("peak_rss_bytes", top=2**50),
            added_rss_bytes=f.optional_integer("added_rss_bytes", top=2**50),
            by_threads=rows,
            correctness=correctness,
            temperature_c=f.optional_number("temperature_c"),
            throttled=throttled,
            time=f.time("time"),
            seq=f.integer("seq", 0, top=2**63 - 1),
        )


def _optional_nonnegative(f: Fields, key: str) -> Optional[float]:
    value = f.optional_number(key)
    if value is not None and value < 0:
        raise f.bad(key, "a number of at least 0, or null")
    return value
