"""Serving with a shadow evaluation running against serving without, in the same process.

    .venv/bin/python benchmarks/bench_shadow.py [--rounds R] [--calls N] [--repeats K] [--agreement-only] [--json]

The digits fp32 model serves; the int8 model is the candidate. Each round runs ``N`` calls of
``agent.predict(x)`` (x cycling over the digits test set) three ways, in turn: no shadow, a
shadow at ``sample=0.1`` and one at ``sample=1.0`` (default CPU budget: 25% of one core).
Reported: serving p95 latency and throughput of each, their ratios to no shadow (median over
rounds), and what the shadow compared and dropped. Then the agreement estimate against the
truth (top-1 agreement computed offline over the same inputs), over the 1,797 digits images as
live inputs, at ``sample=0.1`` (``--repeats`` runs) and ``1.0``, with its Wilson 95% interval:
for the int8 candidate and for a differently built one that disagrees on ~14%
(``--agreement-only``: that part alone, a minute or two).
Goal (issue 14): serving p95 with the shadow at 0.1 <= 1.05x serving p95 without.
"""

from __future__ import annotations

import argparse
import json
import random
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


def linear_digits(out: Path) -> Path:
    """A differently built digits classifier: one dense layer on the 64 pixels (no convolution),
    trained on the last 500 images of scikit-learn's digits (seeded). It answers like the served
    CNN on ~86% of the digits: a candidate whose agreement an estimate has to find."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    from sklearn.datasets import load_digits

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import convert_to_tflite

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input(shape=(8, 8, 1), batch_size=1),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    model.fit(x[-500:], digits.target[-500:], epochs=30, batch_size=16, verbose=0)
    path = out / "digits_linear.tflite"
    path.write_bytes(convert_to_tflite(model))
    return path


def live_inputs() -> np.ndarray:
    """All 1,797 images of scikit-learn's digits, each (1, 8, 8, 1): distinct live inputs."""
    from sklearn.datasets import load_digits

    return (load_digits().images / 16.0).astype(np.float32)[:, None, ..., None]


def agreement_case(
    tmp: Path, key: SigningKey, models: Path, repeats: int, seed: int = 0
) -> list[dict[str, Any]]:
    """The agreement estimate against the truth, over 1,797 distinct live inputs: for the int8
    build of the served model (it disagrees on a handful) and for a differently built model
    (it disagrees on ~14%), at sample 0.1 (``repeats`` runs: a different sample each) and 1.0.
    The truth: both models run offline on the same inputs."""
    from edgekit.fleet.shadow import wilson_interval

    inputs = live_inputs()
    serving_model = models / "digits_fp32.tflite"
    serving = tmp / "agree-s.ekb"
    create_bundle(serving_model, name="digits", version="1.0.0", key=key, output=serving)
    served = top1(serving_model, inputs[:, 0])
    candidates = (
        ("int8 build of the served model", models / "digits_int8.tflite"),
        ("one dense layer, trained apart", linear_digits(tmp)),
    )
    # The agent draws which inputs it compares from Python's random: seeded here (after the
    # training above, which seeds it too), so a run repeats; each shadow run gets its own draws.
    random.seed(seed)
    rows = []
    for label, path in candidates:
        candidate = tmp / f"agree-{path.stem}.ekb"
        create_bundle(path, name="digits", version="2.0.0", key=key, output=candidate)
        truth = float((top1(path, inputs[:, 0]) == served).mean())
        for sample, runs in ((0.1, repeats), (1.0, 1)):
            for _ in range(runs):
                state = tmp / f"agree-state-{len(rows)}"  # a fresh device each run
                with Agent.from_config(
                    write_config(tmp / "agree.toml", key, state), background=False
                ) as agent:
                    agent.install(serving)
                    shadow = agent.start_shadow(candidate, sample=sample, cpu_budget=1.0)
                    for start in range(0, len(inputs), 16):  # letting it catch up: nothing dropped
                        for x in inputs[start : start + 16]:
                            agent.predict(x)
                        shadow.wait_idle()
                    figures = agent.stop_shadow()
                assert figures is not None and figures["dropped"] == 0
                low, high = wilson_interval(figures["agreed"], figures["classified"])
                rows.append(
                    {
                        "candidate": label,
                        "sample": sample,
                        "inputs": len(inputs),
                        "compared": figures["compared"],
                        "estimate": figures["agreement"],
                        "low": low,
                        "high": high,
                        "truth": truth,
                        "error": figures["agreement"] - truth,
                        "holds_truth": low <= truth <= high,
                    }
                )
    return rows


def agreement_summary(rows: list[dict[str, Any]]) -> dict[tuple[str, float], dict[str, Any]]:
    """Per candidate and sample rate: runs, mean and largest |estimate - truth|, and in how many
    runs the Wilson interval held the truth."""
    grouped: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["candidate"], row["sample"]), []).append(row)
    return {
        key: {
            "runs": len(runs),
            "abs_error_mean": statistics.mean(abs(r["error"]) for r in runs),
            "abs_error_max": max(abs(r["error"]) for r in runs),
            "held": sum(r["holds_truth"] for r in runs),
        }
        for key, runs in grouped.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3000, help="digits predict() calls per mode and round")
    parser.add_argument("--large-calls", type=int, default=60, help="MobileNetV2 calls per mode and round")
    parser.add_argument("--repeats", type=int, default=5, help="agreement runs at sample 0.1 per candidate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the agent's sampling draws")
    parser.add_argument(
        "--agreement-only", action="store_true", help="only the agreement estimate against the truth"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    models = digits_models()
    xs, large = serving_inputs(models)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        key = SigningKey.generate()
        summary: dict[str, Any] = {}
        if args.agreement_only:
            summary["agreement"] = agreement_case(tmp, key, models, args.repeats, args.seed)
        else:
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
                "agreement": agreement_case(tmp, key, models, args.repeats, args.seed),
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
    for (candidate, sample), runs in agreement_summary(summary["agreement"]).items():
        print(
            f"{candidate}, sample {sample}: {runs['runs']} run(s), |error| mean {runs['abs_error_mean']:.4f} "
            f"max {runs['abs_error_max']:.4f}, the 95% interval held the truth in {runs['held']} of {runs['runs']}"
        )
    for a in summary["agreement"]:
        print(
            f"{a['candidate']}, sample {a['sample']} over {a['inputs']} inputs: estimate "
            f"{a['estimate']:.4f} from {a['compared']} compared (95% {a['low']:.4f}-{a['high']:.4f}), "
            f"truth {a['truth']:.4f}, error {a['error']:+.4f}"
            + ("" if a["holds_truth"] else "  (interval misses the truth)")
        )


if __name__ == "__main__":
    main()
