"""Benchmark `edgekit distill` and `edgekit convert --qat` on scikit-learn's 8x8 digits.

One command (from the repository root, with the venv):

    .venv/bin/python benchmarks/bench_distill.py [--only distill|depth|qat] [--json results.json]

Distillation: the teacher is bench_convert's digits CNN (two conv layers, a 128-unit dense
layer; about 72k parameters) trained here; the student is the teacher at ``--width 0.4``. The
distilled student learns from the labelled training images and from the same images shifted by
one pixel (teacher targets only, no labels); the baseline, in the same run, is the same student
trained on the labels alone. Both, and the teacher, are converted to int8 and measured on the
same runtime.

Depth: a residual CNN teacher (a Conv2D stem, four residual blocks that keep the 8x8x32 shape,
ten Conv/Dense layers) and ``--depth 4``: its three deepest blocks removed (4 Conv/Dense layers
left), the teacher's weights kept in the layers that stay. Distilled as above; the baseline, in
the same run, is the same shallower student trained on the labels alone.

QAT: the digits CNN (the distillation teacher above) as trained, converted the way the issue
writes it, ``--quantize int8 --qat --train DATA`` without ``--calibration`` (the training inputs
calibrate); and a MobileNet-style model (depthwise-separable blocks with batch normalization and
ReLU), which as trained loses no accuracy to post-training int8 (per-channel weights). The
benchmark makes the case where it does, the way real MobileNets do (Nagel et al. 2019,
"Data-Free Quantization Through Weight Equalization and Bias Correction": per-channel activation
ranges differing by orders of magnitude): a float-equivalent copy whose first ReLU has 4
channels scaled up by ``--wide`` and the next batch normalization scaled down by as much (the
float model's outputs do not change). The int8 model then spends its 256 levels of that tensor
on 4 channels. Post-training int8 and ``--qat`` are compared against the same float reference
in the same run.

The data is small (1797 images of 8x8 pixels, 397 held out): one image is 0.25 accuracy points,
so differences of a point or less are a handful of images. Latency is measured on this machine
(x86 unless it says otherwise), one thread, not on an ARM board.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import digits_cnn

TARGETS = {
    "teacher_over_student_params": (">=", 4.0),
    "student_params_ratio": ("<=", 0.25),
    "student_accuracy_drop": ("<=", 1.0),
    "student_agreement": (">=", 0.97),
    "ptq_accuracy_drop": (">=", 2.0),
    "qat_accuracy_drop": ("<=", 0.5),
}


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def shifted(x: np.ndarray) -> np.ndarray:
    """Each image moved one pixel up, down, left and right (zeros shifted in): unlabelled inputs."""
    out = []
    for axis, step in ((1, 1), (1, -1), (2, 1), (2, -1)):
        moved = np.roll(x, step, axis=axis)
        index = [slice(None)] * 4
        index[axis] = 0 if step == 1 else -1
        moved[tuple(index)] = 0.0
        out.append(moved)
    return np.concatenate(out)


def bench_distill(work: Path, width: float, epochs: int) -> dict[str, Any]:
    from dataclasses import replace

    from edgekit.converters import DistillOptions, distill

    x_train, y_train, x_test, y_test = digits_split()
    t = time.perf_counter()
    teacher = digits_cnn(x_train, y_train, epochs=20)
    train_s = time.perf_counter() - t
    teacher.save(work / "teacher.keras")
    np.savez(work / "train.npz", x=x_train, y=y_train)
    np.savez(work / "test.npz", x=x_test, y=y_test)
    np.save(work / "shifted.npy", shifted(x_train))
    base = DistillOptions(
        teacher=work / "teacher.keras",
        output=work / "student.keras",
        data=work / "train.npz",
        unlabeled=work / "shifted.npy",
        width=width,
        epochs=epochs,
        eval=work / "test.npz",
        quantize="int8",
        latency_runs=300,
    )
    distilled = distill(base).to_dict()
    print("  distilled student done", file=sys.stderr)
    hard = distill(replace(base, alpha=0.0, unlabeled=None, output=work / "hard.keras")).to_dict()
    print("  hard-label student done", file=sys.stderr)
    figures = {
        "teacher_over_student_params": distilled["teacher"]["params"] / distilled["student"]["params"],
        "student_params_ratio": distilled["params_ratio"],
        "student_accuracy_drop": distilled["accuracy_drop_points"],
        "student_agreement": distilled["agreement"],
    }
    return {"teacher_train_seconds": train_s, "distilled": distilled, "hard_labels": hard, "figures": figures}


def residual_cnn(x: np.ndarray, y: np.ndarray, epochs: int, blocks: int = 4, filters: int = 32) -> Any:
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = layers.Conv2D(filters, 3, padding="same", activation="relu", name="stem")(inputs)
    for i in range(1, blocks + 1):
        shortcut = h
        h = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"res{i}_a")(h)
        h = layers.BatchNormalization(name=f"res{i}_bn")(h)
        h = layers.ReLU(name=f"res{i}_relu")(h)
        h = layers.Conv2D(filters, 3, padding="same", name=f"res{i}_b")(h)
        h = layers.Add(name=f"res{i}_add")([h, shortcut])
        h = layers.ReLU(name=f"res{i}_out")(h)
    h = layers.MaxPooling2D()(h)
    h = layers.Flatten()(h)
    model = keras.Model(inputs, layers.Dense(10, activation="softmax", name="classes")(h))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def bench_depth(work: Path, depth: int, epochs: int) -> dict[str, Any]:
    from dataclasses import replace

    from edgekit.converters import DistillOptions, distill

    x_train, y_train, x_test, y_test = digits_split()
    t = time.perf_counter()
    teacher = residual_cnn(x_train, y_train, epochs=20)
    train_s = time.perf_counter() - t
    teacher.save(work / "residual.keras")
    np.savez(work / "train.npz", x=x_train, y=y_train)
    np.savez(work / "test.npz", x=x_test, y=y_test)
    np.save(work / "shifted.npy", shifted(x_train))
    base = DistillOptions(
        teacher=work / "residual.keras",
        output=work / "shallow.keras",
        data=work / "train.npz",
        unlabeled=work / "shifted.npy",
        depth=depth,
        epochs=epochs,
        eval=work / "test.npz",
        quantize="int8",
        latency_runs=300,
    )
    distilled = distill(base).to_dict()
    print("  distilled shallow student done", file=sys.stderr)
    hard = distill(replace(base, alpha=0.0, unlabeled=None, output=work / "shallow-hard.keras")).to_dict()
    print("  hard-label shallow student done", file=sys.stderr)
    # The same shallow architecture from fresh weights (not the teacher's), on the labels alone.
    import keras
    from edgekit.converters import shortened

    keras.utils.set_random_seed(0)
    keras.models.clone_model(shortened(teacher, depth)[0]).save(work / "shallow-arch.keras")
    scratch = distill(
        replace(
            base, depth=None, student=work / "shallow-arch.keras", alpha=0.0, unlabeled=None,
            output=work / "shallow-scratch.keras",
        )
    ).to_dict()  # fmt: skip
    print("  shallow student from scratch done", file=sys.stderr)
    figures = {
        "depth_student_params_ratio": distilled["params_ratio"],
        "depth_student_macs_ratio": distilled["macs_ratio"],
        "depth_student_accuracy_drop": distilled["accuracy_drop_points"],
        "depth_student_agreement": distilled["agreement"],
    }
    return {
        "teacher_train_seconds": train_s,
        "distilled": distilled,
        "hard_labels": hard,
        "scratch": scratch,
        "figures": figures,
    }


def mobilenet_style(x: np.ndarray, y: np.ndarray, epochs: int) -> Any:
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    h = layers.BatchNormalization()(h)
    h = layers.ReLU()(h)
    for filters, stride in ((32, 1), (64, 2), (64, 1)):
        h = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False)(h)
        h = layers.BatchNormalization()(h)
        h = layers.ReLU()(h)
        h = layers.Conv2D(filters, 1, use_bias=False)(h)
        h = layers.BatchNormalization()(h)
        h = layers.ReLU()(h)
    h = layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, layers.Dense(10, activation="softmax")(h))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def widen_first_activation(model: Any, factor: float, channels: int) -> None:
    """Float-equivalent: ReLU(f*z) = f*ReLU(z) for the first ``channels`` channels of the first
    ReLU, undone by the next batch normalization (its statistics scaled by f and f^2)."""
    norms = [layer for layer in model.layers if type(layer).__name__ == "BatchNormalization"]
    picked = np.arange(channels)
    gamma, beta, mean, var = norms[0].get_weights()
    gamma[picked] *= factor
    beta[picked] *= factor
    norms[0].set_weights([gamma, beta, mean, var])
    gamma, beta, mean, var = norms[1].get_weights()
    eps = float(norms[1].epsilon)
    mean[picked] *= factor
    var[picked] = (var[picked] + eps) * factor**2 - eps
    norms[1].set_weights([gamma, beta, mean, var])


def bench_qat(work: Path, wide: float, epochs: int) -> dict[str, Any]:
    from edgekit.converters import ConvertOptions, convert

    x_train, y_train, x_test, y_test = digits_split()
    np.savez(work / "train.npz", x=x_train, y=y_train)
    np.savez(work / "test.npz", x=x_test, y=y_test)
    np.save(work / "calibration.npy", x_train[:300])
    t = time.perf_counter()
    model = mobilenet_style(x_train, y_train, epochs=20)
    train_s = time.perf_counter() - t
    model.save(work / "mobilenet_style.keras")
    plain_float = model.predict(x_test, verbose=0)
    widen_first_activation(model, wide, 4)
    float_change = float(np.abs(model.predict(x_test, verbose=0) - plain_float).max())
    model.save(work / "mobilenet_style_wide.keras")
    rows = {}
    for name, path in (("plain", "mobilenet_style.keras"), ("wide", "mobilenet_style_wide.keras")):
        report = convert(
            ConvertOptions(
                model=work / path,
                output=work / f"{name}.tflite",
                quantize="int8",
                io="float",
                calibration=work / "calibration.npy",
                train=work / "train.npz",
                qat=True,
                epochs=epochs,
                eval=work / "test.npz",
                latency_runs=100,
            )
        ).to_dict()
        rows[name] = report
        print(f"  {name}: done", file=sys.stderr)
    # The digits CNN (the distillation teacher, bench_convert's model) as trained, in the issue's
    # form: `--quantize int8 --qat --train DATA` without --calibration (the training inputs calibrate).
    t = time.perf_counter()
    digits_cnn(x_train, y_train, epochs=20).save(work / "digits_cnn.keras")
    digits_train_s = time.perf_counter() - t
    rows["digits CNN"] = convert(
        ConvertOptions(
            model=work / "digits_cnn.keras",
            output=work / "digits_cnn.tflite",
            quantize="int8",
            io="float",
            train=work / "train.npz",
            qat=True,
            epochs=epochs,
            eval=work / "test.npz",
            latency_runs=100,
        )
    ).to_dict()
    print("  digits CNN: done", file=sys.stderr)
    wide_doc = rows["wide"]
    figures = {
        "ptq_accuracy_drop": wide_doc["qat"]["ptq_accuracy_drop_points"],
        "qat_accuracy_drop": wide_doc["accuracy_drop_points"],
    }
    return {
        "train_seconds": train_s,
        "digits_cnn_train_seconds": digits_train_s,
        "params": int(model.count_params()),
        "wide_factor": wide,
        "float_max_output_change": float_change,
        "rows": rows,
        "figures": figures,
    }


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("distill", "depth", "qat"), help="Run one part.")
    parser.add_argument("--width", type=float, default=0.4, help="Student width (default 0.4).")
    parser.add_argument("--distill-epochs", type=int, default=60, help="Distillation epochs at most.")
    parser.add_argument("--depth", type=int, default=4, help="Depth of the shallower student (default 4).")
    parser.add_argument("--wide", type=float, default=100.0, help="Range factor of the QAT case.")
    parser.add_argument("--qat-epochs", type=int, default=8, help="Quantization-aware training epochs.")
    parser.add_argument("--json", type=Path, help="Also write every report to this JSON file.")
    args = parser.parse_args()
    machine = (
        f"{platform.machine()} ({platform.processor() or 'cpu'}), {os.cpu_count()} cores, 1 inference thread"
    )
    results: dict[str, Any] = {"machine": machine}
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        work = Path(tmp)
        if args.only in (None, "distill"):
            print("distillation ...", file=sys.stderr)
            results["distill"] = bench_distill(work, args.width, args.distill_epochs)
            figures.update(results["distill"]["figures"])
        if args.only in (None, "depth"):
            print("distillation to a shallower student ...", file=sys.stderr)
            results["depth"] = bench_depth(work, args.depth, args.distill_epochs)
        if args.only in (None, "qat"):
            print("quantization-aware training ...", file=sys.stderr)
            results["qat"] = bench_qat(work, args.wide, args.qat_epochs)
            figures.update(results["qat"]["figures"])
    print(f"latency measured on {machine}; these are x86 figures, not ARM figures\n")
    if "distill" in results:
        d = results["distill"]
        doc, hard = d["distilled"], d["hard_labels"]
        t, s, h = doc["teacher"], doc["student"], hard["student"]
        print(f"### distillation: digits CNN teacher, student at width {args.width} (int8, same runtime)\n")
        print(
            "| model | parameters | MACs | int8 size (bytes) | latency median / p95 (ms) | accuracy | agreement with teacher |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, m in (("teacher", t), ("student, distilled", s), ("student, labels only", h)):
            print(
                f"| {name} | {m['params']} | {m['macs']} | {m['size']} | "
                f"{m['latency_ms_median']:.4f} / {m['latency_ms_p95']:.4f} | {pct(m['accuracy'])} | "
                f"{pct(m['agreement'])} |"
            )
        print(
            f"\nstudent/teacher: parameters {doc['params_ratio']:.3f}x, MACs {doc['macs_ratio']:.3f}x, "
            f"latency {doc['latency_ratio']:.2f}x; distillation {doc['training']['epochs_run']} epochs "
            f"({doc['training']['seconds']:.1f}s), labels only {hard['training']['epochs_run']} epochs"
        )
    if "depth" in results:
        d = results["depth"]
        doc, hard, scratch = d["distilled"], d["hard_labels"], d["scratch"]
        t, s, h = doc["teacher"], doc["student"], hard["student"]
        removed = ", ".join(b["layers"][0].split("_")[0] for b in s["removed_blocks"])
        print(
            f"\n### depth: residual CNN teacher ({t['depth']} Conv/Dense layers), student --depth {args.depth} "
            f"(removed: {removed}; int8, same runtime)\n"
        )
        print(
            "| model | depth | parameters | MACs | int8 size (bytes) | latency median / p95 (ms) | accuracy | "
            "agreement with teacher |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        rows = (
            ("teacher", t),
            ("student, distilled", s),
            ("student, labels only", h),
            ("student, labels only, fresh weights", scratch["student"]),
        )
        for name, m in rows:
            print(
                f"| {name} | {m['depth']} | {m['params']} | {m['macs']} | {m['size']} | "
                f"{m['latency_ms_median']:.4f} / {m['latency_ms_p95']:.4f} | {pct(m['accuracy'])} | "
                f"{pct(m['agreement'])} |"
            )
        print(
            f"\nstudent/teacher: parameters {doc['params_ratio']:.3f}x, MACs {doc['macs_ratio']:.3f}x, "
            f"size {doc['size_ratio']:.3f}x, latency {doc['latency_ratio']:.2f}x; distillation "
            f"{doc['training']['epochs_run']} epochs ({doc['training']['seconds']:.1f}s, best "
            f"{doc['training']['best_epoch']}), labels only {hard['training']['epochs_run']} epochs "
            f"(best {hard['training']['best_epoch']}), fresh weights {scratch['training']['epochs_run']} "
            f"epochs (best {scratch['training']['best_epoch']}); teacher trained in {d['teacher_train_seconds']:.1f}s"
        )
    if "qat" in results:
        q = results["qat"]
        print(
            f"\n### quantization-aware training: MobileNet-style ({q['params']} parameters), "
            f"first activation widened x{q['wide_factor']:g} (float outputs change by at most "
            f"{q['float_max_output_change']:.2g})\n"
        )
        print("| model | float accuracy | post-training int8 | drop | QAT int8 | drop | QAT time (s) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, doc in q["rows"].items():
            print(
                f"| {name if name == 'digits CNN' else 'MobileNet-style, ' + name} | {pct(doc['reference']['accuracy'])} | {pct(doc['qat']['ptq']['accuracy'])} | "
                f"{doc['qat']['ptq_accuracy_drop_points']:.2f} | {pct(doc['converted']['accuracy'])} | "
                f"{doc['accuracy_drop_points']:.2f} | {doc['qat']['seconds']:.1f} |"
            )
    if any(key in figures for key in TARGETS):
        print("\n| figure | measured | target | ok |\n|---|---:|---:|---|")
    ok = True
    for key, (sign, target) in TARGETS.items():
        if key not in figures:
            continue
        value = figures[key]
        passed = value >= target if sign == ">=" else value <= target
        ok = ok and passed
        print(f"| {key} | {value:.3f} | {sign} {target} | {'yes' if passed else 'NO'} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
