"""Wire decoders: what checking a message costs over parsing its JSON.

    .venv/bin/python benchmarks/bench_decode.py [--records 20000]

Decodes the same telemetry records (as an agent writes them: drift verdict and accuracy
included), device states and events with edgekit's decoders (``TelemetryRecord.from_json`` and
friends: size cap, strict JSON, schema, every field), against the baseline measured in the same
run: ``orjson.loads`` of the same bytes, no checks. Best of 5 rounds each. With msgspec
installed, also a msgspec typed decoder of the telemetry record (``Struct`` with the ranges,
patterns and nested objects edgekit's decoder checks, the drift verdict's inner scores and
accuracy as plain objects), and msgspec's untyped parse, in the same run (for the decision in
``edgekit.schema``: edgekit does not depend on msgspec; it has no 32-bit ARM wheel).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal, Optional

import orjson
from edgekit.reports import DeviceStateReport, Event, TelemetryRecord

try:
    import msgspec
except ImportError:  # a reference only: edgekit does not depend on it
    msgspec = None

if msgspec is not None:
    Count = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
    Big = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    Moment = Annotated[float, msgspec.Meta(ge=0, le=253402300799.0)]
    Ident = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    Name = Annotated[str, msgspec.Meta(max_length=200)]
    Severity = Optional[Literal["ok", "inputs changed", "model affected"]]

    class Latency(msgspec.Struct):
        p50: Optional[float] = None
        p95: Optional[float] = None
        p99: Optional[float] = None

    class Bundle(msgspec.Struct):
        name: Name
        version: Name
        bundle_id: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]

    class Drift(msgspec.Struct):  # the verdict's top level; scores and accuracy as plain objects
        drifted: bool = False
        scores: dict[str, Any] = msgspec.field(default_factory=dict)
        severity: Severity = None
        windows: Optional[Count] = None
        summary: Optional[Annotated[str, msgspec.Meta(max_length=1000)]] = None
        signals: Optional[dict[str, bool]] = None
        accuracy: Optional[dict[str, Any]] = None

    class Telemetry(msgspec.Struct):  # the fields edgekit's decoder checks, with their ranges
        schema: Literal["edgekit.telemetry"]
        schema_version: Literal[1]
        device: Ident
        fleet: Ident
        window_start: Moment
        window_end: Moment
        count: Count
        errors: Count
        latency_ms: Latency
        throughput: Annotated[float, msgspec.Meta(ge=0)]
        drift: Drift
        bundle: Optional[Bundle] = None
        cpu_percent: Optional[float] = None
        memory_rss_bytes: Optional[Big] = None
        temperature_c: Optional[float] = None
        runtime: Optional[Name] = None
        seq: Big = 0
        dropped: Count = 0
        dropped_total: Big = 0


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
    if msgspec is None:
        print("msgspec not installed: no reference figure (pip install msgspec to add it)")
        return

    typed = msgspec.json.Decoder(Telemetry)
    plain = msgspec.json.Decoder()
    base = best(orjson.loads, data["telemetry"])
    ours = best(TelemetryRecord.from_json, data["telemetry"])
    parse = best(plain.decode, data["telemetry"])
    ref = best(typed.decode, data["telemetry"])
    print(
        f"telemetry, same run: orjson.loads {base:.2f} µs, edgekit decoder {ours:.2f} µs ({ours / base:.2f}x),"
    )
    print(f"  msgspec untyped decode {parse:.2f} µs ({parse / base:.2f}x), msgspec typed Struct {ref:.2f} µs")
    print(f"  ({ref / base:.2f}x orjson, {ref / ours:.2f}x edgekit's); msgspec {msgspec.__version__}")


if __name__ == "__main__":
    main()
