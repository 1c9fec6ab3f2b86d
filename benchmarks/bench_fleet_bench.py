"""Serving with an on-fleet benchmark running against serving without, in the same process.

    .venv/bin/python benchmarks/bench_fleet_bench.py [--rounds R] [--calls N] [--large-calls M] [--paced-calls P] [--json]

An agent serves a model; each round runs ``N`` calls of ``agent.predict(x)`` twice, in turn:
with nothing else running, and while the device's bench worker measures a candidate (the real
path of docs/bench.md minus MQTT: a signed request handed to :class:`BenchLink`, verified, run
in its nice-19 worker that waits for the serving model to be idle before each run; the bench is
replaced by the next round's, so it is busy for the whole serving measurement). Reported:
serving p95 latency and throughput of each, and their ratios to no bench (median of the
per-round ratios). Cases: the digits fp32 model serving with the int8 one benchmarked at 1 and 2
interpreter threads, and MobileNetV2 fp32 serving and benchmarked, back to back (serving never
idle: the bench waits, one forced run per 2 s) and with a request every 50 ms (the bench runs in
the gaps, and a request may arrive during one of its runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import digits_models
from _serving import bundles, ratios, serve, serving_inputs, write_config
from edgekit import SigningKey, TrustedKeys
from edgekit.agent import Agent
from edgekit.agent.bench import BenchLink, describe_board
from edgekit.bench import MAX_RUNS, BenchCandidate, new_bench_request, sign_bench_request
from edgekit.bundle import read_bundle


def case(
    tmp: Path,
    key: SigningKey,
    serving_model: Path,
    candidate_model: Path,
    xs: np.ndarray,
    calls: int,
    rounds: int,
    threads: tuple[int, ...],
    gap: float = 0.0,
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(dir=tmp))  # each case its own agent
    serving, candidate = bundles(tmp, key, serving_model, candidate_model)
    bundle = read_bundle(candidate, TrustedKeys([key.public]))
    state = tmp / f"state-{serving_model.stem}"
    results: dict[str, dict[str, list[float]]] = {m: {"p95": [], "rate": []} for m in ("off", "on")}
    with Agent.from_config(
        write_config(tmp / f"{serving_model.stem}.toml", key, state), background=False
    ) as agent:
        agent.install(serving)
        started = threading.Event()
        link = BenchLink(
            device="bench",
            fleet="bench",
            state_dir=state,
            trusted=TrustedKeys([key.public]),
            board=describe_board(agent.runtime_name(), agent.config.xnnpack),
            fetch=lambda *_: bundle,
            activity=agent.serving_activity,
            on_event=lambda kind, *_: started.set() if kind == "bench_started" else None,
        )
        link.start()
        serve(agent, xs, max(10, calls // 6))  # warm up
        try:
            for round_ in range(rounds):
                p95, rate = serve(agent, xs, calls, gap)
                results["off"]["p95"].append(p95)
                results["off"]["rate"].append(rate)
                started.clear()
                request = new_bench_request(
                    "bench",
                    seq=round_ + 1,
                    devices=["bench"],
                    candidates=[BenchCandidate(bundle.bundle_id, "bench", "2.0.0")],
                    threads=threads,
                    runs=MAX_RUNS,
                )
                link.on_message(sign_bench_request(request, key))  # replaces the previous round's
                started.wait(30)
                p95, rate = serve(agent, xs, calls, gap)
                results["on"]["p95"].append(p95)
                results["on"]["rate"].append(rate)
        finally:
            link.stop()
    return ratios(results, "off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3000, help="digits predict() calls per mode and round")
    parser.add_argument("--large-calls", type=int, default=60, help="MobileNetV2 calls per mode and round")
    parser.add_argument(
        "--paced-calls", type=int, default=40, help="MobileNetV2 calls 50 ms apart per mode and round"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    models = digits_models()
    xs, large = serving_inputs(models)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        key = SigningKey.generate()
        summary = {
            "digits fp32 serving, int8 benchmarked at 1,2 threads": case(
                tmp,
                key,
                models / "digits_fp32.tflite",
                models / "digits_int8.tflite",
                xs,
                args.calls,
                args.rounds,
                (1, 2),
            ),
            "MobileNetV2 fp32 serving, same model benchmarked at 1 thread": case(
                tmp,
                key,
                models / "mobilenet_v2_fp32.tflite",
                models / "mobilenet_v2_fp32.tflite",
                large,
                args.large_calls,
                args.rounds,
                (1,),
            ),
            "MobileNetV2 fp32 serving a request every 50 ms, same model benchmarked at 1 thread": case(
                tmp,
                key,
                models / "mobilenet_v2_fp32.tflite",
                models / "mobilenet_v2_fp32.tflite",
                large,
                args.paced_calls,
                args.rounds,
                (1,),
                gap=0.05,
            ),
        }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for name, rows in summary.items():
        print(f"{name}:")
        for mode, r in rows.items():
            label = "no bench" if mode == "off" else "bench running"
            print(
                f"  {label:>13}: p95 {r['p95_ms']:.3f} ms ({r['p95_ratio']:.2f}x)  {r['per_s']:,.1f}/s "
                f"({r['throughput_ratio']:.2f}x)"
            )


if __name__ == "__main__":
    main()
