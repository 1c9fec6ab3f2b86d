"""Benchmark `edgekit convert`: sizes, accuracy, sparsity, latency and conversion time.

One command (from the repository root, with the venv):

    .venv/bin/python benchmarks/bench_convert.py [--skip-mobilenet] [--json results.json]

Part 1, a digits CNN (scikit-learn's 8x8 digits; two conv layers and a 65k-weight dense layer)
trained here: every mode's file size against fp32 measured in the same run, int8 accuracy drop,
fp16 size, and 75%-pruned int8 (accuracy drop, gzip size against the unpruned int8).
Part 2, keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3)) with random
weights: size, single-thread latency (median, p95) and conversion time for every mode.
Latency is measured on this machine (x86 unless it says otherwise), not on an ARM board.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TARGETS = {
    "int8_size_ratio": 0.30,
    "int8_accuracy_drop": 1.0,
    "fp16_size_ratio": 0.55,
    "pruned_int8_accuracy_drop": 2.0,
    "pruned_gzip_vs_int8": 0.6,
}


def digits_cnn(x: np.ndarray, y: np.ndarray, epochs: int) -> Any:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape=(8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def run(options: Any) -> Any:
    from edgekit.converters import convert

    return convert(options)


def bench_digits(work: Path) -> dict[str, Any]:
    from dataclasses import replace

    from edgekit.converters import ConvertOptions
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
    t = time.perf_counter()
    model = digits_cnn(x_train, y_train, epochs=20)
    train_s = time.perf_counter() - t
    model_path = work / "digits.keras"
    model.save(model_path)
    np.savez(work / "train.npz", x=x_train, y=y_train)
    np.savez(work / "test.npz", x=x_test, y=y_test)
    np.save(work / "calibration.npy", x_train[:300])
    base = ConvertOptions(
        model=model_path,
        output=work / "digits.tflite",
        calibration=work / "calibration.npy",
        eval=work / "test.npz",
        latency_runs=300,
    )
    rows: dict[str, Any] = {}
    for mode in ("fp32", "fp16", "dynamic", "int8", "int16x8"):
        report = run(replace(base, quantize=mode, output=work / f"digits_{mode}.tflite"))
        rows[mode] = report.to_dict()
    import keras

    keras.utils.set_random_seed(0)
    pruned = run(
        replace(
            base, quantize="int8", prune=0.75, train=work / "train.npz", epochs=8, output=work / "p.tflite"
        )
    ).to_dict()
    rows["int8+prune75"] = pruned
    keras.utils.set_random_seed(0)
    rows["int8+2:4"] = run(
        replace(
            base,
            quantize="int8",
            sparsity_pattern="2:4",
            train=work / "train.npz",
            epochs=8,
            output=work / "s.tflite",
        )
    ).to_dict()
    int8 = rows["int8"]
    figures = {
        "int8_size_ratio": int8["size_ratio"],
        "int8_accuracy_drop": int8["accuracy_drop_points"],
        "fp16_size_ratio": rows["fp16"]["size_ratio"],
        "pruned_int8_accuracy_drop": pruned["accuracy_drop_points"],
        "pruned_gzip_vs_int8": pruned["converted"]["gzip_size"] / int8["converted"]["gzip_size"],
    }
    return {
        "train_seconds": train_s,
        "params": int(model.count_params()),
        "rows": rows,
        "figures": figures,
    }


def bench_mobilenet(work: Path) -> dict[str, Any]:
    import keras
    from edgekit.converters import ConvertOptions
    from edgekit.errors import EdgekitError

    keras.utils.set_random_seed(0)
    t = time.perf_counter()
    model = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3))
    model_path = work / "mobilenetv2.keras"
    model.save(model_path)
    build_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    np.save(work / "mn_calibration.npy", rng.uniform(-1, 1, (64, 96, 96, 3)).astype(np.float32))
    rows = {}
    for mode in ("fp32", "fp16", "dynamic", "int8", "int16x8"):
        try:
            report = run(
                ConvertOptions(
                    model=model_path,
                    output=work / f"mn_{mode}.tflite",
                    quantize=mode,
                    calibration=work / "mn_calibration.npy",
                    latency_runs=50,
                )
            )
        except EdgekitError as exc:  # recorded as a result: the runtime refusing a mode is a finding
            rows[mode] = {"error": str(exc)}
            print(f"  mobilenetv2 {mode}: {exc}", file=sys.stderr)
            continue
        rows[mode] = report.to_dict()
        print(f"  mobilenetv2 {mode}: {rows[mode]['converted']['size']} bytes", file=sys.stderr)
    return {"params": int(model.count_params()), "build_seconds": build_s, "rows": rows}


def table(rows: dict[str, Any], accuracy: bool) -> str:
    head = (
        "| mode | size (bytes) | x fp32 | gzip (bytes) | latency median / p95 (ms) "
        "| latency x fp32 (same run) | conversion (s) |"
    )
    sep = "|---|---:|---:|---:|---:|---:|---:|"
    if accuracy:
        head += " accuracy | drop (points) | weight sparsity |"
        sep += "---:|---:|---:|"
    lines = [head, sep]
    for mode, doc in rows.items():
        if "error" in doc:
            lines.append(f"| {mode} | not written: {doc['error']} |")
            continue
        c = doc["converted"]
        line = (
            f"| {mode} | {c['size']} | {doc['size_ratio']:.3f} | {c['gzip_size']} | "
            f"{c['latency_ms_median']:.3f} / {c['latency_ms_p95']:.3f} | {doc['latency_ratio']:.2f} | "
            f"{doc['timings_s']['conversion']:.1f} |"
        )
        if accuracy:
            line += f" {100 * c['accuracy']:.2f}% | {doc['accuracy_drop_points']:.2f} | {100 * c['weight_sparsity']:.1f}% |"
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-mobilenet", action="store_true", help="Only the digits CNN.")
    parser.add_argument("--json", type=Path, help="Also write every report to this JSON file.")
    args = parser.parse_args()
    machine = (
        f"{platform.machine()} ({platform.processor() or 'cpu'}), {os.cpu_count()} cores, 1 inference thread"
    )
    results: dict[str, Any] = {"machine": machine}
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        work = Path(tmp)
        print("digits CNN ...", file=sys.stderr)
        digits = bench_digits(work)
        results["digits"] = digits
        if not args.skip_mobilenet:
            print("MobileNetV2 96x96 ...", file=sys.stderr)
            results["mobilenetv2"] = bench_mobilenet(work)
    print(f"latency measured on {machine}; these are x86 figures, not ARM figures\n")
    print(f"### digits CNN ({digits['params']} parameters, 397 test images)\n")
    print(table(digits["rows"], accuracy=True))
    print("\n| figure | measured | target | ok |\n|---|---:|---:|---|")
    ok = True
    for key, target in TARGETS.items():
        value = digits["figures"][key]
        passed = value <= target
        ok = ok and passed
        print(f"| {key} | {value:.3f} | <= {target} | {'yes' if passed else 'NO'} |")
    if "mobilenetv2" in results:
        mn = results["mobilenetv2"]
        print(f"\n### MobileNetV2 96x96, random weights ({mn['params']} parameters)\n")
        print(table(mn["rows"], accuracy=False))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
