"""Drift on digits: does a window's severity tell harmless shifts from harmful ones, and what does it cost?

    .venv/bin/python benchmarks/bench_drift.py [--trials N] [--window W] [--int8] [--json]
    .venv/bin/python benchmarks/bench_drift.py --detector [--trials N] [--psi-threshold P] [--ks-threshold K] [--int8]

Default (issue 20's figures): the bundle is made as a user makes it, ``--baseline`` on the
1400 training digits and ``--calibration-eval`` on the first 200 held-out digits (with labels).
Each trial takes a window of ``--window`` (100) images drawn without replacement from the other
197 held-out digits (for the class-mix shift: from those showing digits 0-6 only), applies the
shift to them, runs the model (the real TFLite runtime) and feeds inputs and outputs to the
agent's DriftMonitor with the agent's defaults. Per shift: the true accuracy on the shifted
pool, its cost in points against clean, the share of windows per severity, the mean estimated
accuracy and the mean |estimate - window's true accuracy|. Goals: ``model affected`` on >= 95%
of windows for shifts costing >= 5 points, <= 10% for shifts costing < 1 point, <= 5% on clean;
across shifts, the estimate's mean absolute error and its Spearman rank correlation with the
true accuracy (goal >= 0.8).

Then the cost of the added statistics on ``predict()`` at the default sample rate (5%): an
agent serving the calibrated bundle against the same agent serving the bundle with the
baseline only (the statistics before this change) and with drift sampling off, in alternating
rounds in the same process (each agent first in turn); ratios are medians of the per-round
ratios (goal: calibrated within 2% of baseline-only).

``--detector``: the input/output drift detector alone (``drifted``), against scipy's KS test,
for several window sizes (the table in BENCHMARKS.md, "Drift detection"). Its baseline is
computed directly from the training digits; windows are drawn with replacement from a pool of
shifted test digits (4 noisy copies where the shift is random).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.ndimage import rotate
from scipy.stats import ks_2samp, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import digits_models
from edgekit import SigningKey, create_bundle, read_bundle
from edgekit.agent import Agent, AgentConfig, DriftMonitor
from edgekit.baseline import compute_baseline
from edgekit.runtime import Model, dequantize, quantize
from edgekit.tflite import TensorSpec, inspect_tflite
from edgekit.trust import TrustedKeys

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

_CORNER = (np.arange(8)[:, None] < 4) & (np.arange(8)[None, :] < 4)
SEVERITY_SHIFTS: dict[str, Shift] = {
    "clean": lambda x, rng: x,
    **{
        name: SHIFTS[name]
        for name in (
            "brightness +0.03",
            "brightness +0.1",
            "brightness +0.3",
            "noise sigma 0.05",
            "noise sigma 0.2",
        )
    },
    "contrast x0.85": lambda x, rng: x * 0.85,
    "contrast x0.7": lambda x, rng: x * 0.7,
    "rotation 15 deg": lambda x, rng: np.clip(rotate(x, 15, axes=(1, 2), reshape=False, order=1), 0, 1),
    "rotation 30 deg": lambda x, rng: np.clip(rotate(x, 30, axes=(1, 2), reshape=False, order=1), 0, 1),
    "occluded quarter": lambda x, rng: np.where(_CORNER[None, :, :, None], 0.0, x),
    "inverted": lambda x, rng: 1.0 - x,
    "class mix (digits 0-6 only)": lambda x, rng: x,
}
CALIBRATION = 200


def outputs_of(
    model: Model, x: np.ndarray, spec: TensorSpec | None = None, out: TensorSpec | None = None
) -> np.ndarray:
    if spec is None or out is None:
        return np.stack([model.run([s[None].astype(np.float32)])[0][0] for s in x])
    return np.stack([dequantize(model.run([quantize(s[None], spec)])[0], out)[0] for s in x])


# -- severity ------------------------------------------------------------------------------------


def make_bundles(args: argparse.Namespace, tmp: Path, key: SigningKey) -> dict[str, Path]:
    root = digits_models()
    with np.load(root / "digits_test.npz") as data:
        np.savez(tmp / "train.npz", x=data["x_train"])
        np.savez(tmp / "heldout.npz", x=data["x"][:CALIBRATION], y=data["y"][:CALIBRATION])
    model_path = root / ("digits_int8.tflite" if args.int8 else "digits_fp32.tflite")
    bundles = {"calibrated": tmp / "calibrated.ekb", "baseline only": tmp / "baseline.ekb"}
    for name, path in bundles.items():
        create_bundle(
            model_path,
            name="digits",
            version="1.0.0",
            key=key,
            output=path,
            baseline=tmp / "train.npz",
            calibration_eval=tmp / "heldout.npz" if name == "calibrated" else None,
        )
    return bundles


def severity(args: argparse.Namespace, bundle_path: Path, key: SigningKey) -> list[dict]:
    root = digits_models()
    with np.load(root / "digits_test.npz") as data:
        x_pool, y_pool = data["x"][CALIBRATION:], data["y"][CALIBRATION:]
    bundle = read_bundle(bundle_path, TrustedKeys([key.public]))
    baseline, calibration = bundle.baseline(), bundle.calibration()
    assert baseline is not None and calibration is not None
    spec, out_spec = (bundle.manifest.inputs[0], bundle.manifest.outputs[0]) if args.int8 else (None, None)
    model = Model(bundle.model, threads=1)
    defaults = AgentConfig(device="d", fleet="f", state_dir=Path("."), trusted_keys="")
    clean_accuracy = float(np.mean(outputs_of(model, x_pool, spec, out_spec).argmax(axis=1) == y_pool))
    rng = np.random.default_rng(0)
    rows = []
    for name, shift in SEVERITY_SHIFTS.items():
        keep = y_pool < 7 if name.startswith("class mix") else np.ones(len(y_pool), dtype=bool)
        xs, ys = x_pool[keep], y_pool[keep]
        shifted = shift(xs, rng).astype(np.float32)
        accuracy = float(np.mean(outputs_of(model, shifted, spec, out_spec).argmax(axis=1) == ys))
        counts = {"ok": 0, "inputs changed": 0, "model affected": 0}
        estimates, errors = [], []
        for _ in range(args.trials):
            idx = rng.choice(len(xs), args.window, replace=False)
            window = shift(xs[idx], rng).astype(np.float32)
            out = outputs_of(model, window, spec, out_spec)
            fed = window if spec is None else quantize(window[:, None], spec)[:, 0]
            monitor = DriftMonitor(
                baseline,
                args.window,
                defaults.drift_psi_threshold,
                defaults.drift_ks_threshold,
                input_spec=spec,
                calibration=calibration,
            )
            for sample, o in zip(fed, out):
                monitor.add(sample, o)
            report = monitor.report()
            assert report.severity is not None and report.accuracy is not None
            counts[report.severity] += 1
            estimates.append(report.accuracy.estimate)
            errors.append(abs(report.accuracy.estimate - float(np.mean(out.argmax(axis=1) == ys[idx]))))
        rows.append(
            {
                "shift": name,
                "accuracy": accuracy,
                "cost_points": 100 * (clean_accuracy - accuracy),
                **{k: v / args.trials for k, v in counts.items()},
                "estimate": float(np.mean(estimates)),
                "window_abs_error": float(np.mean(errors)),
            }
        )
    return rows


def summarise(rows: list[dict]) -> dict:
    real = [r for r in rows if not r["shift"].startswith("class mix")]
    rho = spearmanr([r["estimate"] for r in real], [r["accuracy"] for r in real])[0]
    return {
        "estimate_mae": float(np.mean([abs(r["estimate"] - r["accuracy"]) for r in real])),
        "estimate_spearman": float(rho),
        "affected_if_cost_ge_5": {r["shift"]: r["model affected"] for r in real if r["cost_points"] >= 5},
        "affected_if_cost_lt_1": {
            r["shift"]: r["model affected"] for r in real if r["cost_points"] < 1 and r["shift"] != "clean"
        },
        "affected_clean": next(r["model affected"] for r in rows if r["shift"] == "clean"),
    }


# -- predict() overhead --------------------------------------------------------------------------


def write_config(path: Path, key: SigningKey, state: Path, rate: float) -> Path:
    pem = key.public.pem().decode()
    path.write_text(
        f'device = "bench"\nfleet = "bench"\nstate_dir = "{state}"\nthreads = 1\n'
        f'trusted_keys = """\n{pem}"""\n[drift]\nsample_rate = {rate}\n'
    )
    return path


def overhead(bundles: dict[str, Path], tmp: Path, key: SigningKey, seconds: float, rounds: int) -> dict:
    """predict() calls per second of three agents in alternating rounds; ratios of the medians."""
    rate = AgentConfig(device="d", fleet="f", state_dir=Path("."), trusted_keys="").drift_sample_rate
    cases = {
        "calibrated": (bundles["calibrated"], rate),
        "baseline only": (bundles["baseline only"], rate),
        "drift off": (bundles["baseline only"], 0.0),
    }
    agents: dict[str, Agent] = {}
    for name, (bundle, sample_rate) in cases.items():
        slug = name.replace(" ", "-")
        config = write_config(tmp / f"{slug}.toml", key, tmp / f"state-{slug}", sample_rate)
        agent = Agent.from_config(config, background=False)
        agent.install(bundle)
        agents[name] = agent
    status = agents["calibrated"].status()
    dtype = np.dtype(status.inputs[0]["dtype"])
    x = np.load(digits_models() / "digits_test.npz")["x"][:1].reshape(status.inputs[0]["shape"]).astype(dtype)

    def run(agent: Agent, n: int) -> float:
        predict = agent.predict
        start = time.perf_counter()
        for _ in range(n):
            predict(x)
        return n / (time.perf_counter() - start)

    n = max(2000, int(seconds * run(agents["drift off"], 5000)))
    rates: dict[str, list[float]] = {name: [] for name in agents}
    names = list(agents)
    for i in range(rounds):
        for name in names[i % 3 :] + names[: i % 3]:  # each agent goes first in turn
            rates[name].append(run(agents[name], n))
    sampled = {
        name: agent._served.drift.sampled if agent._served and agent._served.drift else 0
        for name, agent in agents.items()
    }
    for agent in agents.values():
        agent.close()
    median = {name: statistics.median(r) for name, r in rates.items()}
    monitor_us = per_sample_cost(bundles["calibrated"], key, x)

    def ratio(a: str, b: str) -> float:  # the median of the per-round ratios (load drifts between rounds)
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    return {
        "sample_rate": rate,
        "calls_per_round": n,
        "rounds": rounds,
        "per_s": median,
        "sampled": sampled,
        "calibrated_vs_baseline_only": ratio("calibrated", "baseline only"),
        "calibrated_vs_drift_off": ratio("calibrated", "drift off"),
        "monitor_us_per_sample": monitor_us,
        # What the added statistics cost per predict() call at this rate, against one call.
        "added_fraction": rate
        * (monitor_us["calibrated"] - monitor_us["baseline only"])
        * 1e-6
        * median["drift off"],
    }


def per_sample_cost(
    bundle_path: Path, key: SigningKey, x: np.ndarray, samples: int = 12800
) -> dict[str, float]:
    """Microseconds per sampled input in DriftMonitor.add (binning in batches included), with
    and without the calibration, alternating 7 times; medians."""
    bundle = read_bundle(bundle_path, TrustedKeys([key.public]))
    baseline, calibration = bundle.baseline(), bundle.calibration()
    assert baseline is not None
    output = np.full((1, 10), 0.1, dtype=np.float32)
    output[0, 3] = 0.5
    times: dict[str, list[float]] = {"calibrated": [], "baseline only": []}
    for _ in range(7):
        for name, cal in (("calibrated", calibration), ("baseline only", None)):
            monitor = DriftMonitor(baseline, 200, 0.1, 0.1, calibration=cal)
            start = time.perf_counter()
            for _ in range(samples):
                monitor.add(x, output)
            monitor.flush()
            times[name].append((time.perf_counter() - start) / samples * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


# -- the detector alone --------------------------------------------------------------------------


def detector(args: argparse.Namespace) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100, help="windows per shift (and window size)")
    parser.add_argument("--window", type=int, default=100, help="sampled inputs per severity window")
    parser.add_argument("--seconds", type=float, default=0.2, help="length of one predict() round")
    parser.add_argument("--rounds", type=int, default=30, help="predict() rounds per agent")
    parser.add_argument("--detector", action="store_true", help="the drift detector's table instead")
    parser.add_argument("--psi-threshold", type=float, default=None, help="--detector: default the agent's")
    parser.add_argument("--ks-threshold", type=float, default=None, help="--detector: default the agent's")
    parser.add_argument(
        "--int8", action="store_true", help="use the int8 model: the agent sees quantized inputs"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.detector:
        detector(args)
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        key = SigningKey.generate()
        bundles = make_bundles(args, tmp, key)
        rows = severity(args, bundles["calibrated"], key)
        cost = overhead(bundles, tmp, key, args.seconds, args.rounds)
    summary = summarise(rows)
    if args.json:
        print(json.dumps({"shifts": rows, "summary": summary, "overhead": cost}, indent=2))
        return
    print(
        f"{'int8' if args.int8 else 'fp32'} digits model; {args.trials} windows of {args.window} per shift; "
        f"baseline: 1400 training digits; calibration: {CALIBRATION} held-out digits; windows from the rest"
    )
    print(
        f"{'shift':<29}{'accuracy':>9}{'cost':>7}{'ok':>6}{'inputs':>8}{'model':>7}{'estimate':>10}{'|err|':>7}"
    )
    for r in rows:
        print(
            f"{r['shift']:<29}{r['accuracy']:>9.3f}{r['cost_points']:>7.1f}{r['ok']:>6.2f}"
            f"{r['inputs changed']:>8.2f}{r['model affected']:>7.2f}{r['estimate']:>10.3f}{r['window_abs_error']:>7.3f}"
        )
    print(
        f"estimate vs true accuracy across shifts (class mix excluded): MAE {summary['estimate_mae']:.3f}, "
        f"Spearman {summary['estimate_spearman']:.2f} (goal >= 0.8)"
    )
    print(f"model affected, shifts costing >= 5 points (goal >= 0.95): {summary['affected_if_cost_ge_5']}")
    print(f"model affected, shifts costing < 1 point (goal <= 0.10): {summary['affected_if_cost_lt_1']}")
    print(f"model affected, clean (goal <= 0.05): {summary['affected_clean']:.2f}")
    per_s = cost["per_s"]
    print(
        f"predict() at sample rate {cost['sample_rate']}: calibrated {per_s['calibrated']:,.0f}/s, "
        f"baseline only {per_s['baseline only']:,.0f}/s, drift off {per_s['drift off']:,.0f}/s; "
        f"calibrated / baseline only {cost['calibrated_vs_baseline_only']:.3f} (goal >= 0.98), "
        f"calibrated / drift off {cost['calibrated_vs_drift_off']:.3f}"
    )
    us = cost["monitor_us_per_sample"]
    print(
        f"per sampled input: {us['calibrated']:.2f} us with calibration, {us['baseline only']:.2f} us without; "
        f"the added statistics cost {cost['added_fraction']:.3%} of a predict() call at the default rate "
        "(goal <= 2%)"
    )


if __name__ == "__main__":
    main()
