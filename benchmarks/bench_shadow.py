"""Serving with a shadow evaluation running against serving without, in the same process.

    .venv/bin/python benchmarks/bench_shadow.py [--rounds R] [--calls N] [--json]

The digits fp32 model serves; the int8 model is the candidate. Each round runs ``N`` calls of
``agent.predict(x)`` (x cycling over the digits test set) three ways, in turn: no shadow, a
shadow at ``sample=0.1`` and one at ``sample=1.0`` (default CPU budget: 25% of one core).
Reported: serving p95 latency and throughput of each, their ratios to no shadow (median over
rounds), and what the shadow compared and dropped. Then the agreement estimate: 1,000+ calls at
``sample=0.1`` against the top-1 agreement computed offline over the same inputs.
Goal (issue 14): serving p95 with the shadow at 0.1 <= 1.05x serving p95 without.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import digits_models
from _serving import bundles, ratios, serve, serving_inputs, write_config
from edgekit import SigningKey, create_bundle
from edgekit.agent import Agent
from edgekit.runtime import Model


def top1(path: Path, xs: np.ndarray) -> np.ndarray:
    model = Model(path)
    detail = model.input_details[0]
    scale, zero = detail["quantization"]
    out = []
    for x in xs:
        feed = x[None].astype(np.float32)
        if detail["dtype"] != np.float32:
            feed = np.clip(np.round(feed / scale + zero), -128, 127).astype(detail["dtype"])
        out.append(int(np.argmax(model.run([feed])[0])))
    return np.array(out)


def modes_case(
    tmp: Path,
    key: SigningKey,
    serving_model: Path,
    candidate_model: Path,
    xs: np.ndarray,
    calls: int,
    rounds: int,
) -> dict[str, Any]:
    """Serving p95 and throughput without a shadow, with one at 0.1 and at 1.0, round by round."""
    modes = (None, 0.1, 1.0)
    results: dict[str, dict[str, list[float]]] = {
        str(m): {"p95": [], "rate": [], "compared": [], "dropped": []} for m in modes
    }
    serving, candidate = bundles(tmp, key, serving_model, candidate_model)
    config = write_config(tmp / f"{serving_model.stem}.toml", key, tmp / f"state-{serving_model.stem}")
    with Agent.from_config(config, background=False) as agent:
        agent.install(serving)
        serve(agent, xs, max(10, calls // 6))  # warm up
        for _ in range(rounds):
            for mode in modes:
                if mode is not None:
                    agent.start_shadow(candidate, sample=mode)
                p95, rate = serve(agent, xs, calls)
                figures = agent.stop_shadow() if mode is not None else None
                row = results[str(mode)]
                row["p95"].append(p95)
                row["rate"].append(rate)
                row["compared"].append(figures["compared"] if figures else 0)
                row["dropped"].append(figures["dropped"] if figures else 0)
            agent.flush_telemetry()
    summary = ratios(results, "None")
    for mode, r in results.items():
        summary[mode]["compared_per_round"] = statistics.median(r["compared"])
        summary[mode]["dropped_per_round"] = statistics.median(r["dropped"])
    return summary


def agreement_case(tmp: Path, key: SigningKey, models: Path, xs: np.ndarray) -> dict[str, Any]:
    """The agreement estimate at sample 0.1 over 1,000+ live inputs, against the truth."""
    serving, candidate = tmp / "agree-s.ekb", tmp / "agree-c.ekb"
    create_bundle(models / "digits_fp32.tflite", name="digits", version="1.0.0", key=key, output=serving)
    create_bundle(models / "digits_int8.tflite", name="digits", version="2.0.0", key=key, output=candidate)
    inputs = np.concatenate([xs] * (1 + 1000 // len(xs)))
    truth = top1(models / "digits_int8.tflite", inputs[:, 0]) == top1(
        models / "digits_fp32.tflite", inputs[:, 0]
    )
    with Agent.from_config(
        write_config(tmp / "agree.toml", key, tmp / "agree-state"), background=False
    ) as agent:
        agent.install(serving)
        shadow = agent.start_shadow(candidate, sample=0.1, cpu_budget=1.0)
        for start in range(0, len(inputs), 16):
            for x in inputs[start : start + 16]:
                agent.predict(x)
            shadow.wait_idle()
        estimate = agent.stop_shadow()
    assert estimate is not None
    return {
        "inputs": len(inputs),
        "truth": float(truth.mean()),
        "estimate": estimate["agreement"],
        "compared": estimate["compared"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3000, help="digits predict() calls per mode and round")
    parser.add_argument("--large-calls", type=int, default=60, help="MobileNetV2 calls per mode and round")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    models = digits_models()
    xs, large = serving_inputs(models)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        key = SigningKey.generate()
        summary = {
            "digits fp32 serving, int8 candidate": modes_case(
                tmp,
                key,
                models / "digits_fp32.tflite",
                models / "digits_int8.tflite",
                xs,
                args.calls,
                args.rounds,
            ),
            "MobileNetV2 fp32 serving, same model as candidate": modes_case(
                tmp,
                key,
                models / "mobilenet_v2_fp32.tflite",
                models / "mobilenet_v2_fp32.tflite",
                large,
                args.large_calls,
                args.rounds,
            ),
            "agreement": agreement_case(tmp, key, models, xs),
        }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for case, rows in summary.items():
        if case == "agreement":
            continue
        print(f"{case}:")
        for mode, r in rows.items():
            label = "no shadow" if mode == "None" else f"shadow at {mode}"
            print(
                f"  {label:>13}: p95 {r['p95_ms']:.3f} ms ({r['p95_ratio']:.2f}x)  {r['per_s']:,.1f}/s "
                f"({r['throughput_ratio']:.2f}x)  compared {r['compared_per_round']:.0f}, "
                f"dropped {r['dropped_per_round']:.0f} per round"
            )
    a = summary["agreement"]
    print(
        f"agreement at 0.1 over {a['inputs']} inputs: estimate {a['estimate']:.4f} from {a['compared']} "
        f"compared, truth {a['truth']:.4f}"
    )


if __name__ == "__main__":
    main()
