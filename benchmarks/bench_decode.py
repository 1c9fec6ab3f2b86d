"""Wire decoders: what checking a message costs over parsing its JSON.

    .venv/bin/python benchmarks/bench_decode.py [--records 20000]

Decodes the same telemetry records (as an agent writes them: drift verdict and accuracy
included), device states and events with edgekit's decoders (``TelemetryRecord.from_json`` and
friends: size cap, strict JSON, schema, every field), against the baseline measured in the same
run: ``orjson.loads`` of the same bytes, no checks. Best of 5 rounds each. With msgspec
installed, also a msgspec ``Struct`` decoder of the telemetry record's top level (for
reference: edgekit does not depend on it; it has no 32-bit ARM wheel).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import orjson
from edgekit.reports import DeviceStateReport, Event, TelemetryRecord


def records(n: int) -> dict[str, list[bytes]]:
    now = time.time()
    telemetry = [
        TelemetryRecord(
            device=f"cam-{i % 100}",
            fleet="shop",
            window_start=now - 60,
            window_end=now,
            count=600,
            errors=1,
            latency_ms={"p50": 1.2, "p95": 2.5, "p99": 4.0},
            throughput=10.0,
            drift={
                "drifted": False,
                "complete": True,
                "samples": 60,
                "scores": {"pixels": {"psi": 0.01, "ks": 0.05}},
                "severity": "ok",
                "windows": 3,
                "summary": "inputs look like the training data",
                "signals": {"inputs": False, "answers": False, "confidence": False, "accuracy": False},
                "calibrated": True,
                "accuracy": {"estimate": 0.95, "low": 0.9, "high": 0.98, "reference": 0.96, "method": "t"},
            },
            bundle={"name": "digits", "version": "1.0.0", "bundle_id": "a" * 64},
            cpu_percent=3.5,
            memory_rss_bytes=40_000_000,
            temperature_c=51.2,
            runtime="ai_edge_litert",
            seq=i + 1,
        ).to_dict()
        for i in range(n)
    ]
    states = [
        DeviceStateReport(
            f"cam-{i % 100}", "shop", "serving", "a" * 64, "digits", "1.0.0", time=now
        ).to_json()
        for i in range(n)
    ]
    events = [
        json.dumps(
            Event(f"cam-{i % 100}", "installed", "installed digits@1.0.0", time=now, seq=i + 1).to_dict()
        ).encode()
        for i in range(n)
    ]
    return {"telemetry": [json.dumps(t).encode() for t in telemetry], "state": states, "event": events}


def best(function: Callable[[bytes], Any], payloads: list[bytes], rounds: int = 5) -> float:
    """Best per-message microseconds over ``rounds`` passes."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for payload in payloads:
            function(payload)
        times.append(time.perf_counter() - start)
    return min(times) / len(payloads) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=20000)
    args = parser.parse_args()
    data = records(args.records)
    decoders = {
        "telemetry": TelemetryRecord.from_json,
        "state": DeviceStateReport.from_json,
        "event": Event.from_json,
    }
    print(f"{'message':10s} {'orjson.loads (baseline)':>24s} {'edgekit decoder':>16s} {'ratio':>7s}")
    for kind, payloads in data.items():
        base = best(orjson.loads, payloads)
        ours = best(decoders[kind], payloads)
        print(f"{kind:10s} {base:>21.2f} µs {ours:>13.2f} µs {ours / base:>6.2f}x")
    try:
        import msgspec
    except ImportError:
        print("msgspec not installed: no reference figure (pip install msgspec to add it)")
        return

    class Telemetry(msgspec.Struct):  # the top level only, types and no ranges: a lower bound
        schema: str
        schema_version: int
        device: str
        fleet: str
        window_start: float
        window_end: float
        count: int
        errors: int
        latency_ms: dict[str, Any]
        throughput: float
        drift: dict[str, Any]
        bundle: dict[str, str]
        seq: int

    decoder = msgspec.json.Decoder(Telemetry)
    ref = best(decoder.decode, data["telemetry"])
    print(f"{'telemetry':10s} msgspec Struct (types only, no ranges): {ref:.2f} µs")


if __name__ == "__main__":
    main()
