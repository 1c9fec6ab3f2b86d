"""Drift detection on digits: detection rate under real shifts, false-alarm rate without, in one run.

    .venv/bin/python benchmarks/bench_drift.py [--trials N] [--json]

The baseline is what `edgekit bundle create --baseline` records from the 1400 training
images (pixel histogram on quantile bins, predicted-class and confidence histograms of the
fp32 digits model). Each trial draws a window of held-out test images (with replacement),
applies a shift, and feeds them to the agent's DriftMonitor with the model's outputs, using
the agent's default thresholds; a trial counts as an alarm when the window's report says
``drifted``. The reference detector is scipy's two-sample KS test (``scipy.stats.ks_2samp``)
between the training pixels and the window's pixels at p < 0.001. "edgekit inputs" counts
only the pixel feature (what the KS test sees); "edgekit" also the output distributions.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.stats import ks_2samp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import digits_models
from edgekit.agent import AgentConfig, DriftMonitor
from edgekit.baseline import compute_baseline
from edgekit.runtime import Model, dequantize, quantize
from edgekit.tflite import TensorSpec, inspect_tflite

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]
SHIFTS: dict[str, Shift] = {
    "none (false alarms)": lambda x, rng: x,
    "brightness +0.03": lambda x, rng: np.clip(x + 0.03, 0, 1),
    "brightness +0.1": lambda x, rng: np.clip(x + 0.1, 0, 1),
    "brightness +0.3": lambda x, rng: np.clip(x + 0.3, 0, 1),
    "noise sigma 0.01": lambda x, rng: np.clip(x + rng.normal(0, 0.01, x.shape), 0, 1),
    "noise sigma 0.05": lambda x, rng: np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1),
    "noise sigma 0.2": lambda x, rng: np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1),
    "inverted": lambda x, rng: 1.0 - x,
    "blank camera": lambda x, rng: np.zeros_like(x),
    "10% of frames inverted": lambda x, rng: np.where(rng.random((len(x), 1, 1, 1)) < 0.1, 1.0 - x, x),
}
WINDOWS = (50, 100, 200)
REFERENCE_P = 1e-3


def outputs_of(
    model: Model, x: np.ndarray, spec: TensorSpec | None = None, out: TensorSpec | None = None
) -> np.ndarray:
    if spec is None or out is None:
        return np.stack([model.run([s[None].astype(np.float32)])[0][0] for s in x])
    return np.stack([dequantize(model.run([quantize(s[None], spec)])[0], out)[0] for s in x])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100, help="windows per shift and window size")
    parser.add_argument("--psi-threshold", type=float, default=None, help="default: the agent's default")
    parser.add_argument("--ks-threshold", type=float, default=None, help="default: the agent's default")
    parser.add_argument(
        "--int8", action="store_true", help="use the int8 model: the agent sees quantized inputs"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    root = digits_models()
    with np.load(root / "digits_test.npz") as data:
        x_train, x_test = data["x_train"], data["x"]
    spec = out_spec = None
    if args.int8:
        content = (root / "digits_int8.tflite").read_bytes()
        info = inspect_tflite(content)
        spec, out_spec = info.inputs[0], info.outputs[0]
    else:
        content = (root / "digits_fp32.tflite").read_bytes()
    model = Model(content, threads=1)
    baseline = compute_baseline(x_train, outputs_of(model, x_train, spec, out_spec))
    reference_pixels = x_train.reshape(-1)
    defaults = AgentConfig(device="d", fleet="f", state_dir=Path("."), trusted_keys="")
    psi_threshold = args.psi_threshold or defaults.drift_psi_threshold
    ks_threshold = args.ks_threshold or defaults.drift_ks_threshold
    rng = np.random.default_rng(0)
    results = []
    for name, shift in SHIFTS.items():
        # A pool of shifted images and their outputs (4 noisy copies where the shift is random).
        copies = 4 if "noise" in name else 1
        pool = np.concatenate([shift(x_test, rng).astype(np.float32) for _ in range(copies)])
        pool_out = outputs_of(model, pool, spec, out_spec)
        fed = pool if spec is None else quantize(pool[:, None], spec)[:, 0]
        for window in WINDOWS:
            alarms = input_alarms = reference_alarms = 0
            for _ in range(args.trials):
                idx = rng.integers(0, len(pool), window)
                monitor = DriftMonitor(baseline, window, psi_threshold, ks_threshold, input_spec=spec)
                for i in idx:
                    monitor.add(fed[i], pool_out[i])
                report = monitor.report()
                alarms += report.drifted
                input_alarms += any(f.drifted for f in report.features if f.name.startswith("channel"))
                reference_alarms += ks_2samp(reference_pixels, pool[idx].reshape(-1)).pvalue < REFERENCE_P
            results.append(
                {
                    "shift": name,
                    "window": window,
                    "edgekit": alarms / args.trials,
                    "edgekit_inputs": input_alarms / args.trials,
                    "scipy_ks": reference_alarms / args.trials,
                }
            )
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"{'int8' if args.int8 else 'fp32'} model; alarm rate over {args.trials} windows per cell; psi_threshold={psi_threshold}, "
        f"ks_threshold={ks_threshold}; reference: scipy ks_2samp p < {REFERENCE_P}"
    )
    print(f"{'shift':<22}{'window':>7}{'edgekit':>9}{'inputs':>8}{'scipy KS':>10}")
    for r in results:
        print(
            f"{r['shift']:<22}{r['window']:>7}{r['edgekit']:>9.2f}{r['edgekit_inputs']:>8.2f}{r['scipy_ks']:>10.2f}"
        )


if __name__ == "__main__":
    main()
