"""On-fleet benchmarks, the workstation's side (docs/bench.md): ask chosen devices to measure
candidate bundles, and sum up what they reported by board class.

:func:`start_bench` publishes each candidate's chunks (as a push does), then a signed bench
request, retained on the fleet's bench topic (:mod:`edgekit.bench`); devices that were offline
run it when they come back, until it expires. Nothing is installed and nothing serving is
replaced. :func:`summarize` groups reports (stored by ingest, or heard directly by
``edgekit bench --wait``) by board class and candidate: the side-by-side table a user picks a
quantization mode from.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from edgekit.bench import (
    DEFAULT_TTL,
    MAX_CANDIDATES,
    MAX_DEVICES,
    BenchCandidate,
    BenchReport,
    board_class,
    new_bench_request,
    sign_bench_request,
)
from edgekit.bundle import Bundle
from edgekit.errors import BenchError

from .actions import audited
from .control import ControlPlane
from .push import FleetLink
from .trustrepo import require_authorised

__all__ = ["choose_devices", "row_of_report", "row_of_result", "start_bench", "summarize"]


def choose_devices(link: FleetLink, devices: Sequence[str], count: Optional[int]) -> list[str]:
    """The devices to benchmark: ``devices`` by name (each must have been heard from), else the
    first ``count`` devices heard from (online ones first), else all of them. BenchError, naming
    the problem and the fix, for an unknown device or a fleet without devices."""
    fleet = link.fleet
    known = link.states
    heard = ", ".join(sorted(known)) or "none"
    if not known:
        raise BenchError(
            f"no device of fleet {fleet} has been heard from, so there is nothing to benchmark on; "
            "start an agent for the fleet (edgekit-agent run) or check --broker"
        )
    if devices:
        unknown = [d for d in devices if d not in known]
        if unknown:
            raise BenchError(
                f"fleet {fleet} has no device {', '.join(unknown)} (devices heard from: {heard}); "
                "name one of those with --device"
            )
        if len(set(devices)) > MAX_DEVICES:
            raise BenchError(f"{len(set(devices))} devices named; one benchmark asks at most {MAX_DEVICES}")
        return sorted(set(devices))
    ranked = sorted(known, key=lambda d: (not known[d].online, d))
    if count is not None:
        if count < 1:
            raise BenchError("--devices must be at least 1")
        if count > MAX_DEVICES:
            raise BenchError(f"--devices {count}: one benchmark asks at most {MAX_DEVICES} devices")
        if count > len(ranked):
            raise BenchError(
                f"--devices {count}: fleet {fleet} has only {len(ranked)} device(s) ({heard}); "
                f"ask for {len(ranked)} or fewer"
            )
        return sorted(ranked[:count])
    if len(ranked) > MAX_DEVICES:
        # Checked here, before any chunk is published: one request names at most MAX_DEVICES.
        raise BenchError(
            f"fleet {fleet} has {len(ranked)} devices and one benchmark asks at most {MAX_DEVICES}; "
            f"choose some with --devices N (N up to {MAX_DEVICES}), online ones first"
        )
    return sorted(ranked)


def too_many_candidates(count: int) -> str:
    """The refusal of a benchmark of more than MAX_CANDIDATES models, in an owner's words."""
    return (
        f"{count} models given, and one benchmark measures at most {MAX_CANDIDATES}: "
        "name fewer, and run another `edgekit bench` for the rest"
    )


def start_bench(
    control: ControlPlane,
    link: FleetLink,
    candidates: Sequence[Bundle],
    devices: Sequence[str],
    *,
    threads: tuple[int, ...],
    runs: int,
    ttl: int = DEFAULT_TTL,
) -> int:
    """Ask ``devices`` of ``link``'s fleet to measure ``candidates`` (docs/bench.md): their
    chunks, then the signed request (retained). Returns the request's seq, which names the
    benchmark in the reports."""
    fleet = link.fleet
    labels = ", ".join(c.manifest.label for c in candidates)
    with audited(control, "bench", fleet, labels[:200]):
        if not candidates:
            raise BenchError("name at least one model or bundle to benchmark")
        if len(candidates) > MAX_CANDIDATES:
            raise BenchError(too_many_candidates(len(candidates)))
        if len({c.bundle_id for c in candidates}) != len(candidates):
            raise BenchError("the same bundle is named twice; name each candidate once")
        # Devices on TUF measure only candidates targets authorises: refused before anything is sent.
        require_authorised(link.trust_home, fleet, [(c.bundle_id, c.manifest.label) for c in candidates])
        for bundle in candidates:
            link.publish_bundle(bundle)
        seq = control.next_seq(fleet)
        request = new_bench_request(
            fleet,
            seq=seq,
            devices=list(devices),
            candidates=[BenchCandidate(c.bundle_id, c.manifest.name, c.manifest.version) for c in candidates],
            threads=threads,
            runs=runs,
            ttl=ttl,
        )
        topic = link.topics.fleet_bench(fleet)
        link.client.publish(topic, sign_bench_request(request, link.key), qos=1, retain=True).wait(30)
    return seq


# -- summing up -------------------------------------------------------------------------------------


def row_of_report(report: BenchReport) -> dict[str, Any]:
    """A report as the plain row :func:`summarize` reads."""
    checked = report.correctness or {}
    return {
        "device": report.device,
        "bench_seq": report.bench_seq,
        "board_class": board_class(report.board),
        "runtime": report.board["runtime"],
        "xnnpack": report.board["xnnpack"],
        "candidate": f"{report.candidate['name']}@{report.candidate['version']}",
        "candidate_id": report.candidate["bundle_id"],
        "state": report.state,
        "error": report.error,
        "load_ms": report.load_ms,
        "peak_rss_mb": None if report.peak_rss_bytes is None else report.peak_rss_bytes / 2**20,
        "added_rss_mb": None if report.added_rss_bytes is None else report.added_rss_bytes / 2**20,
        "by_threads": report.by_threads,
        "hc_samples": checked.get("samples"),
        "hc_agreed": checked.get("agreed"),
        "hc_max_error": checked.get("max_abs_error"),
        "temperature_c": report.temperature_c,
        "throttled": report.throttled,
    }


def row_of_result(result: Any) -> dict[str, Any]:
    """A registry row (edgekit.fleet.registry.models.BenchResult) as the plain row :func:`summarize` reads."""
    return {
        "device": result.device,
        "bench_seq": result.bench_seq,
        "board_class": result.board_class,
        "runtime": result.runtime,
        "xnnpack": result.xnnpack,
        "candidate": result.candidate_label,
        "candidate_id": result.candidate_id,
        "state": result.state,
        "error": result.error,
        "load_ms": result.load_ms,
        "peak_rss_mb": result.peak_rss_mb,
        "added_rss_mb": result.added_rss_mb,
        "by_threads": json.loads(result.by_threads),
        "hc_samples": result.hc_samples,
        "hc_agreed": result.hc_agreed,
        "hc_max_error": result.hc_max_error,
        "temperature_c": result.temperature_c,
        "throttled": result.throttled,
    }


def _median(values: Iterable[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _max(values: Iterable[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _candidate(label: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in rows if r["state"] == "done"]
    counts = sorted({t["threads"] for r in done for t in r["by_threads"]})
    threads = []
    for count in counts:
        figures = [t for r in done for t in r["by_threads"] if t["threads"] == count]
        threads.append(
            {
                "threads": count,
                **{k: _median(t[k] for t in figures) for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms")},
                "per_second": _median(t["per_second"] for t in figures),
                "forced": sum(t.get("forced", 0) for t in figures),
            }
        )
    checked = [r for r in done if r["hc_samples"] is not None]
    wrong = sorted(r["device"] for r in checked if r["hc_agreed"] != r["hc_samples"])
    return {
        "candidate": label,
        "candidate_id": rows[0]["candidate_id"],
        "devices": sorted(r["device"] for r in rows),
        "failed": [{"device": r["device"], "error": r["error"]} for r in rows if r["state"] != "done"],
        "load_ms": _median(r["load_ms"] for r in done),
        "peak_rss_mb": _max(r["peak_rss_mb"] for r in done),
        "added_rss_mb": _max(r["added_rss_mb"] for r in done),  # what the candidate added
        "threads": threads,
        # Health-check agreement with the workstation's outputs: True on every device checked,
        # False when one disagreed (named in disagreeing_devices), None when none could check.
        "correct": (not wrong) if checked else None,
        "health_check_samples": sum(r["hc_samples"] for r in checked),
        "health_check_agreed": sum(r["hc_agreed"] for r in checked),
        "max_abs_error": _max(r["hc_max_error"] for r in checked),
        "disagreeing_devices": wrong,
        "temperature_c": _max(r["temperature_c"] for r in done),
        "throttled_devices": sorted(r["device"] for r in done if r["throttled"] not in (None, "0x0")),
    }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Reports of one benchmark grouped by board class, then candidate (in the order first
    reported): medians across a class's devices, the worst memory and temperature, and who
    disagreed with the workstation's health-check outputs."""
    classes: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        classes.setdefault(row["board_class"], {}).setdefault(row["candidate"], []).append(row)
    return {
        "bench_seq": rows[0]["bench_seq"] if rows else None,
        "classes": [
            {
                "board_class": name,
                "runtime": next(iter(by_candidate.values()))[0]["runtime"],
                "xnnpack": next(iter(by_candidate.values()))[0]["xnnpack"],
                "devices": sorted({r["device"] for group in by_candidate.values() for r in group}),
                "candidates": [_candidate(label, group) for label, group in by_candidate.items()],
            }
            for name, by_candidate in sorted(classes.items())
        ],
    }
