"""Valid device messages for fleet tests, and where the test PostgreSQL is.

(A module of its own: test modules cannot import a conftest by name once several test
directories, each with a conftest, are collected together.)"""

from __future__ import annotations

import os
from datetime import datetime, timezone

POSTGRES = os.environ.get("EDGEKIT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
NOW = datetime.now(timezone.utc).replace(microsecond=0)


def telemetry_doc(device: str, seq: int, fleet: str = "lab", **overrides: object) -> dict:
    """A valid edgekit.telemetry v1 record, as an agent publishes it."""
    end = NOW.timestamp() + seq
    doc = {
        "schema": "edgekit.telemetry",
        "schema_version": 1,
        "device": device,
        "fleet": fleet,
        "window_start": end - 1.0,
        "window_end": end,
        "count": 10,
        "errors": 0,
        "latency_ms": {"p50": 1.0, "p95": 2.0 + seq, "p99": 3.0},
        "throughput": 10.0,
        "drift": {"drifted": False, "complete": True, "samples": 5, "scores": {"x": {"psi": 0.1, "ks": 0.2}}},
        "bundle": {"name": "digits", "version": "1.0.0", "bundle_id": "a" * 64},
        "cpu_percent": 1.5,
        "memory_rss_bytes": 50 * 2**20,
        "temperature_c": None,
        "runtime": "litert",
        "seq": seq,
        "dropped": 0,
        "dropped_total": 0,
    }
    doc.update(overrides)
    return doc


def event_doc(device: str, seq: int, **overrides: object) -> dict:
    doc = {
        "schema": "edgekit.event",
        "schema_version": 1,
        "device": device,
        "kind": "installed",
        "message": f"installed digits@1.0.0 ({seq})",
        "bundle": {"name": "digits", "version": "1.0.0", "bundle_id": "a" * 64},
        "time": NOW.timestamp() + seq,
        "seq": seq,
    }
    doc.update(overrides)
    return doc


def state_doc(device: str, status: str = "serving", fleet: str = "lab", **overrides: object) -> dict:
    doc = {
        "schema": "edgekit.state",
        "schema_version": 1,
        "device": device,
        "fleet": fleet,
        "status": status,
        "bundle_id": "a" * 64,
        "bundle_name": "digits",
        "bundle_version": "1.0.0",
        "time": NOW.timestamp(),
    }
    doc.update(overrides)
    return doc
