"""``edgekit distill``: train a small student model to mimic a large teacher (knowledge distillation).

The loss is Hinton et al.'s (2015): ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T))`` on the
teacher's soft targets at temperature ``T``, plus ``(1 - alpha) * cross-entropy(labels, s)``
where a sample has a label; a sample without one (``--unlabeled`` data, or ``--data`` without
labels) learns from the teacher alone (``T^2 * KL``). Teacher and student may end in a softmax
or output logits: probabilities are turned back into logits (``log p``; softmax is
shift-invariant, so ``softmax(log p / T) == softmax(z / T)``).

The student is a Keras model the user gives (its architecture, trained from its weights), or
derived from the teacher: narrowed by a width multiplier (:func:`narrowed`: every Conv/Dense
layer's filters or units times ``width``, except the last, the classes; fresh weights), made
shallower (:func:`edgekit.converters.blocks.shortened`: shape-keeping blocks removed, deepest
first, until at most ``depth`` Conv/Dense layers are left; the teacher's weights in the layers
kept), or both (shallower, then narrower). Training keeps the weights with the
lowest distillation loss on a validation split held out of the training data (early stopping).
Teacher and student are then converted to the chosen mode and measured on the same runtime.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from edgekit._version import __version__
from edgekit.data import Dataset
from edgekit.errors import AccuracyGateError, ConfigError, DataError, ModelFormatError
from edgekit.keys import SigningKey
from edgekit.tflite import inspect_tflite

from .blocks import Block, network_depth, shortened
from .convert import (
    StepReporter,
    Steps,
    check_data_paths,
    check_labels,
    check_measuring,
    checked_data,
    parse_bundle_spec,
    write_bundle,
    write_file,
)
from .evaluate import ModelMetrics, evaluate_model, latency_machine, points_lost
from .load import SourceModel, captured_stdout, load_model
from .quantize import check_mode, make_converter, quantize, run_converter

__all__ = [
    "DISTILL_REPORT_SCHEMA",
    "DistillOptions",
    "DistillReport",
    "ModelCost",
    "TrainingResult",
    "check_options",
    "distill",
    "distill_student",
    "model_cost",
    "narrowed",
]

log = logging.getLogger(__name__)

DISTILL_REPORT_SCHEMA = "edgekit.distill-report"
DISTILL_REPORT_SCHEMA_VERSION = 1
#: Epochs without a better validation loss before training stops.
PATIENCE = 5
#: Fraction of the training samples held out to choose the epoch (none below MIN_VALIDATION samples).
VALIDATION_FRACTION = 0.1
MIN_VALIDATION = 50
BATCH_SIZE = 32
LEARNING_RATE = 1e-3

#: Layers :func:`narrowed` knows how to rebuild narrower (by class name). Anything else is refused.
_WIDTH_LAYERS = {"Conv1D", "Conv2D", "Conv3D", "SeparableConv1D", "SeparableConv2D", "Dense"}
_PASS_LAYERS = {
    "InputLayer", "DepthwiseConv1D", "DepthwiseConv2D", "BatchNormalization", "LayerNormalization",
    "Activation", "ReLU", "LeakyReLU", "ELU", "PReLU", "Softmax", "Dropout", "SpatialDropout1D",
    "SpatialDropout2D", "GaussianNoise", "Flatten", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
    "GlobalMaxPooling1D", "GlobalMaxPooling2D", "MaxPooling1D", "MaxPooling2D", "AveragePooling1D",
    "AveragePooling2D", "ZeroPadding1D", "ZeroPadding2D", "Cropping2D", "Add", "Subtract", "Multiply",
    "Average", "Maximum", "Minimum", "Concatenate", "Rescaling", "Normalization", "UpSampling2D",
}  # fmt: skip


@dataclass(frozen=True)
class DistillOptions:
    """Everything ``edgekit distill`` takes; see docs/convert.md."""

    teacher: Path
    output: Path  # the student, .keras
    data: Path
    student: Path | None = None
    width: float | None = None
    depth: int | None = None  # Conv/Dense layers the student keeps at most
    unlabeled: Path | None = None
    temperature: float = 4.0
    alpha: float = 0.5
    epochs: int = 30
    eval: Path | None = None
    max_accuracy_drop: float | None = None
    seed: int = 0
    quantize: str | None = None  # None: measured as fp32, no .tflite written
    io: str | None = None
    report: Path | None = None
    bundle: str | None = None
    latency_runs: int = 100


@dataclass(frozen=True)
class ModelCost:
    """Parameters, multiply-accumulates (Conv and Dense layers) of one inference, depth."""

    params: int
    macs: int | None  # None when the model is not a Keras model (a SavedModel teacher)
    depth: int | None = None  # Conv/Dense layers; None for a SavedModel teacher

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "macs": self.macs, "depth": self.depth}


@dataclass(frozen=True)
class TrainingResult:
    epochs_run: int
    best_epoch: int  # 1-based; the weights kept
    seconds: float
    train_loss: float
    validation_loss: float | None
    validation_samples: int
    labelled_samples: int
    unlabelled_samples: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "seconds": round(self.seconds, 3),
            "train_loss": round(self.train_loss, 6),
            "validation_loss": None if self.validation_loss is None else round(self.validation_loss, 6),
            "validation_samples": self.validation_samples,
            "labelled_samples": self.labelled_samples,
            "unlabelled_samples": self.unlabelled_samples,
        }


@dataclass(frozen=True)
class DistillReport:
    """Teacher against student, both converted to ``quantize`` and run on the same runtime."""

    teacher: str
    output: str
    tflite: str | None
    written: bool
    quantize: str
    io: str
    student_source: str  # "width 0.5", "depth 4", "depth 4, width 0.5" or the --student path
    temperature: float
    alpha: float
    seed: int
    teacher_metrics: ModelMetrics
    student_metrics: ModelMetrics  # agreement: top-1 agreement with the teacher
    teacher_cost: ModelCost
    student_cost: ModelCost
    training: TrainingResult
    timings: dict[str, float]
    max_accuracy_drop: float | None = None
    gate_passed: bool | None = None
    eval_source: str | None = None
    bundle: dict[str, Any] | None = None
    removed_blocks: tuple[Block, ...] = ()  # with --depth: the teacher's blocks the student lacks
    machine: str = field(default_factory=platform.machine)

    @property
    def accuracy_drop(self) -> float | None:
        """Accuracy points the student loses against the teacher (negative: the student is better)."""
        return points_lost(self.teacher_metrics.accuracy, self.student_metrics.accuracy)

    def to_dict(self) -> dict[str, Any]:
        t, s = self.teacher_metrics, self.student_metrics
        return {
            "schema": DISTILL_REPORT_SCHEMA,
            "schema_version": DISTILL_REPORT_SCHEMA_VERSION,
            "edgekit_version": __version__,
            "teacher": {"path": self.teacher, **t.to_dict(), **self.teacher_cost.to_dict()},
            "student": {
                "source": self.student_source,
                **s.to_dict(),
                **self.student_cost.to_dict(),
                "removed_blocks": [block.to_dict() for block in self.removed_blocks],
            },
            "output": {"path": self.output, "tflite": self.tflite, "written": self.written},
            "quantize": self.quantize,
            "io": self.io,
            "temperature": self.temperature,
            "alpha": self.alpha,
            "seed": self.seed,
            "eval_data": self.eval_source,
            "params_ratio": round(self.student_cost.params / self.teacher_cost.params, 6),
            "macs_ratio": round(self.student_cost.macs / self.teacher_cost.macs, 6)
            if self.student_cost.macs and self.teacher_cost.macs
            else None,
            "size_ratio": round(s.size / t.size, 6),
            "latency_ratio": round(s.latency_ms_median / t.latency_ms_median, 6)
            if t.latency_ms_median
            else None,
            "accuracy_drop_points": self.accuracy_drop,
            "agreement": s.agreement,
            "gate": {"max_accuracy_drop": self.max_accuracy_drop, "passed": self.gate_passed},
            "training": self.training.to_dict(),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "latency_machine": latency_machine(self.machine),
            "bundle": self.bundle,
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()


# -- students -----------------------------------------------------------------------------------


def narrowed(teacher: Any, width: float) -> Any:
    """A fresh (untrained) copy of ``teacher`` with every Conv/Dense layer but the last ``width`` times as wide.

    Refused (ConfigError naming the layers) for layers whose width cannot be changed safely:
    nested models, reshapes, custom layers, recurrent and attention layers.
    """
    import keras

    _check_width(width)
    layers = list(teacher.layers)
    unknown = [
        f"{layer.name} ({type(layer).__name__})"
        for layer in layers
        if type(layer).__name__ not in _WIDTH_LAYERS | _PASS_LAYERS or isinstance(layer, keras.Model)
    ]
    if unknown:
        raise ConfigError(
            "--width works for plain CNNs and MobileNet-style models; it cannot narrow "
            f"{', '.join(unknown[:6])}; give a student architecture with --student ARCH.keras"
        )
    wide = [layer for layer in layers if type(layer).__name__ in _WIDTH_LAYERS]
    if len(wide) < 2:
        raise ConfigError(
            "--width needs at least two Conv/Dense layers (the last one, the classes, keeps its width); "
            "give a student architecture with --student ARCH.keras"
        )
    keep = wide[-1].name
    sizes: dict[str, int] = {}

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        if type(layer).__name__ in _WIDTH_LAYERS and layer.name != keep:
            key = "units" if "units" in config else "filters"
            config[key] = max(1, round(config[key] * width))
            sizes[layer.name] = config[key]
        return type(layer).from_config(config)

    try:
        with captured_stdout("keras clone"):
            student = keras.models.clone_model(teacher, clone_function=clone)
    except Exception as exc:  # Keras raises many types when a rebuilt graph does not fit
        log.debug("narrowing failed", exc_info=True)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"cannot build a --width {width:g} student from this teacher ({first[:200]}); "
            "give a student architecture with --student ARCH.keras"
        ) from None
    log.info("student layer widths: %s", sizes)
    return student


def _check_width(width: float) -> None:
    if not 0.0 < width <= 1.0:
        raise ConfigError(f"--width {width:g} is out of range; give a fraction such as 0.5 (at most 1)")


def model_cost(model: Any) -> ModelCost:
    """Parameters, and multiply-accumulates of Conv/Depthwise/Separable/Dense layers for one sample."""
    macs = 0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind not in _WIDTH_LAYERS and not kind.startswith("DepthwiseConv"):
            continue
        try:
            out_shape = tuple(int(d) for d in layer.output.shape[1:])
            in_shape = tuple(int(d) for d in layer.input.shape[1:])
        except (AttributeError, TypeError, ValueError):  # shared layers, unknown sizes
            continue
        out_elems = int(np.prod(out_shape))
        in_ch = in_shape[-1]
        if kind == "Dense":
            macs += out_elems * in_ch
            continue
        kernel = int(np.prod(layer.kernel_size))
        if kind.startswith("DepthwiseConv"):
            macs += out_elems * kernel
        elif kind.startswith("SeparableConv"):
            mid = in_ch * int(layer.depth_multiplier)
            spatial = out_elems // out_shape[-1]
            macs += spatial * mid * kernel + out_elems * mid
        else:
            macs += out_elems * kernel * in_ch // int(getattr(layer, "groups", 1) or 1)
    return ModelCost(params=int(model.count_params()), macs=macs, depth=network_depth(model))


def _tflite_params(content: bytes) -> int:
    from edgekit.tflite import constant_tensors

    return sum(int(np.prod(spec.shape)) if spec.shape else 1 for spec, _ in constant_tensors(content))


# -- training -----------------------------------------------------------------------------------


def _as_logits(outputs: np.ndarray) -> tuple[np.ndarray, bool]:
    """(logits, were probabilities): rows of non-negative values summing to 1 are probabilities."""
    out = np.asarray(outputs, dtype=np.float64)
    probs = bool(out.min() >= 0.0 and out.max() <= 1.0 and np.allclose(out.sum(axis=1), 1.0, atol=1e-3))
    if probs:
        return np.log(np.clip(out, 1e-7, 1.0)).astype(np.float32), True
    return out.astype(np.float32), False


def _ends_in_softmax(model: Any, sample: np.ndarray) -> bool:
    out = np.asarray(model(sample[:8], training=False))
    return _as_logits(out.reshape(out.shape[0], -1))[1]


def distill_student(
    student: Any,
    x: np.ndarray,
    teacher_logits: np.ndarray,
    labels: np.ndarray | None,
    temperature: float = 4.0,
    alpha: float = 0.5,
    epochs: int = 30,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> TrainingResult:
    """Train ``student`` in place on the teacher's logits (and ``labels``: class numbers, -1 for none).

    The best epoch by validation loss (a held-out split of ``x``) is kept; training stops after
    :data:`PATIENCE` epochs without improvement.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    n = int(x.shape[0])
    y = np.full(n, -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = round(n * VALIDATION_FRACTION) if n * VALIDATION_FRACTION >= MIN_VALIDATION else 0
    val, train = order[:n_val], order[n_val:]
    probs = _ends_in_softmax(student, x)
    t2 = float(temperature) ** 2
    optimizer = keras.optimizers.Adam(LEARNING_RATE)

    def losses(xb: Any, tb: Any, yb: Any, training: bool) -> Any:
        out = student(xb, training=training)
        out = tf.reshape(out, (tf.shape(out)[0], -1))
        logits = tf.math.log(tf.clip_by_value(out, 1e-7, 1.0)) if probs else out
        soft_t = tf.nn.softmax(tb / temperature)
        log_s = tf.nn.log_softmax(logits / temperature)
        kl = tf.reduce_sum(soft_t * (tf.math.log(tf.clip_by_value(soft_t, 1e-12, 1.0)) - log_s), axis=1) * t2
        has = tf.cast(yb >= 0, tf.float32)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.maximum(yb, 0), logits=logits)
        per_sample = has * (alpha * kl + (1.0 - alpha) * ce) + (1.0 - has) * kl
        return tf.reduce_mean(per_sample), tf.reduce_mean(kl)

    @tf.function(reduce_retracing=True)  # type: ignore[untyped-decorator]
    def step(xb: Any, tb: Any, yb: Any) -> Any:
        with tf.GradientTape() as tape:
            loss, _ = losses(xb, tb, yb, True)
        grads = tape.gradient(loss, student.trainable_variables)
        optimizer.apply_gradients(zip(grads, student.trainable_variables))
        return loss

    def val_loss() -> float:
        total = 0.0
        for start in range(0, n_val, 256):
            idx = val[start : start + 256]
            _, kl = losses(x[idx], teacher_logits[idx], y[idx], False)
            total += float(kl) * len(idx)
        return total / n_val

    started = time.perf_counter()
    best_loss = float("inf")
    best_weights = student.get_weights()
    best_epoch = 0
    train_loss = float("nan")
    epochs_run = 0
    for epoch in range(1, epochs + 1):
        batch_order = rng.permutation(train)
        total = 0.0
        for start in range(0, len(batch_order), BATCH_SIZE):
            idx = batch_order[start : start + BATCH_SIZE]
            total += float(step(x[idx], teacher_logits[idx], y[idx])) * len(idx)
        train_loss = total / max(1, len(batch_order))
        epochs_run = epoch
        monitored = val_loss() if n_val else train_loss
        if on_epoch is not None:
            on_epoch(epoch, monitored)
        if monitored < best_loss - 1e-6:
            best_loss, best_epoch, best_weights = monitored, epoch, student.get_weights()
        elif epoch - best_epoch >= PATIENCE:
            break
    student.set_weights(best_weights)
    return TrainingResult(
        epochs_run=epochs_run,
        best_epoch=best_epoch,
        seconds=time.perf_counter() - started,
        train_loss=train_loss,
        validation_loss=best_loss if n_val else None,
        validation_samples=n_val,
        labelled_samples=int(np.count_nonzero(y >= 0)),
        unlabelled_samples=int(np.count_nonzero(y < 0)),
    )


# -- the command --------------------------------------------------------------------------------


def check_options(options: DistillOptions) -> tuple[str, str]:
    """Every check that needs no file read; returns the effective (mode, io)."""
    mode = options.quantize or "fp32"
    io = check_mode(mode, options.io, True)  # calibration: the training data
    derived = options.width is not None or options.depth is not None
    if options.student is not None and derived:
        raise ConfigError(
            "give the student one way: --student ARCH.keras, or --width/--depth to derive it from the teacher"
        )
    if options.student is None and not derived:
        raise ConfigError(
            "give the student: --student ARCH.keras, --width W (e.g. 0.5) to narrow the teacher, "
            "or --depth D (e.g. 4) to keep at most D of its Conv/Dense layers"
        )
    if options.temperature <= 0:
        raise ConfigError(f"--temperature {options.temperature:g} must be above 0 (typical: 2 to 8)")
    if not 0.0 <= options.alpha <= 1.0:
        raise ConfigError(f"--alpha {options.alpha:g} must be between 0 (labels only) and 1 (teacher only)")
    if options.width is not None:
        _check_width(options.width)
    if options.depth is not None and options.depth < 1:
        raise ConfigError(
            f"--depth {options.depth} is out of range; give how many Conv/Dense layers the student keeps "
            "(at least 1, fewer than the teacher's)"
        )
    if options.epochs < 1:
        raise ConfigError("--epochs must be at least 1")
    check_measuring(options.max_accuracy_drop, options.eval, options.latency_runs)
    check_data_paths(("--data", options.data), ("--unlabeled", options.unlabeled), ("--eval", options.eval))
    if options.output.suffix.lower() != ".keras":
        raise ConfigError(
            f"-o {options.output} names the student model; give a .keras file, e.g. student.keras"
        )
    if options.report is not None and options.report.resolve() == options.output.resolve():
        raise ConfigError("--report and -o name the same file")
    if options.bundle is not None:
        parse_bundle_spec(options.bundle)
        if options.quantize is None:
            raise ConfigError(
                "--bundle ships a .tflite; choose its mode with --quantize (e.g. --quantize int8)"
            )
    return mode, io


def _load_student(path: Path) -> Any:
    source = load_model(path)
    if source.keras is None:
        source.close()
        raise ModelFormatError(
            f"--student {path} is a SavedModel; give the student as a Keras .keras or .h5 file"
        )
    return source.keras


def _predict(source: SourceModel, x: np.ndarray) -> np.ndarray:
    """The teacher's first output for every sample (Keras, or the SavedModel's serving signature)."""
    import tensorflow as tf

    if source.keras is not None:
        with captured_stdout("teacher predict"):
            out = source.keras.predict(x, batch_size=256, verbose=0)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return np.asarray(out).reshape(x.shape[0], -1)
    loaded = tf.saved_model.load(str(source.path))
    serve = loaded.signatures["serving_default"]
    (name,) = serve.structured_input_signature[1]  # one input: checked on the converted model
    rows = []
    for start in range(0, x.shape[0], 256):
        result = serve(**{name: tf.constant(x[start : start + 256])})
        first = result[sorted(result)[0]]
        rows.append(np.asarray(first).reshape(first.shape[0], -1))
    return np.concatenate(rows)


def distill(
    options: DistillOptions, steps: StepReporter | None = None, signing_key: SigningKey | None = None
) -> DistillReport:
    """Distill, convert and measure; raises AccuracyGateError (after writing the report) on refusal."""
    steps = steps or Steps()
    started = time.perf_counter()
    mode, io = check_options(options)
    if options.bundle is not None and signing_key is None:
        raise ConfigError("--bundle needs a signing key; create one with `edgekit keys init`")
    steps.begin("loading the teacher")
    teacher = load_model(options.teacher)
    steps.end()
    try:
        return _distill(options, teacher, mode, io, steps, signing_key, started)
    finally:
        teacher.close()


def _distill(
    options: DistillOptions,
    teacher: SourceModel,
    mode: str,
    io: str,
    steps: StepReporter,
    signing_key: SigningKey | None,
    started: float,
) -> DistillReport:
    timings: dict[str, float] = {}
    t = time.perf_counter()
    reference = run_converter(make_converter(teacher.saved_model_dir(), "fp32"), "teacher fp32 conversion")
    info = inspect_tflite(reference)
    if len(info.inputs) != 1 or not info.outputs:
        raise ConfigError(
            f"the teacher has {len(info.inputs)} inputs; edgekit distill handles single-input models"
        )
    spec = info.inputs[0]
    classes = int(np.prod(info.outputs[0].shape[1:]))
    if classes < 2:
        raise ConfigError(
            f"the teacher outputs {classes} value; distillation needs a classifier with 2 or more classes"
        )

    data = checked_data(options.data, spec, "training", False)
    unlabeled = checked_data(options.unlabeled, spec, "unlabeled", False) if options.unlabeled else None
    evaluation = checked_data(options.eval, spec, "evaluation", False) if options.eval else None
    for part, what in ((data, "training"), (evaluation, "evaluation")):
        if part is not None:
            check_labels(part, classes, what)
    if options.max_accuracy_drop is not None and (evaluation is None or evaluation.y is None):
        raise DataError(
            f"--max-accuracy-drop needs labels in --eval {options.eval}: an .npz with x and y, "
            "or image sub-folders per class"
        )
    x, labels = _training_set(data, unlabeled)

    removed: list[Block] = []
    if options.student is not None:
        student = _load_student(options.student)
        student_source = str(options.student)
    else:
        if teacher.keras is None:
            flags = "--depth" if options.width is None else "--width"
            raise ConfigError(
                f"{flags} derives the student from a Keras teacher; for a SavedModel teacher give "
                "--student ARCH.keras"
            )
        import keras

        keras.utils.set_random_seed(options.seed)  # the student's fresh weights, as --seed promises
        student = teacher.keras
        parts = []
        if options.depth is not None:
            student, removed = shortened(student, options.depth)
            parts.append(f"depth {network_depth(student)}")
        if options.width is not None:
            student = narrowed(student, options.width)
            parts.append(f"width {options.width:g}")
        student_source = ", ".join(parts)
    _check_student(student, spec.shape, classes)
    timings["setup"] = time.perf_counter() - t

    steps.begin("teacher predictions", None)
    t = time.perf_counter()
    teacher_logits, _ = _as_logits(_predict(teacher, x))
    timings["teacher_predictions"] = time.perf_counter() - t
    steps.end()

    steps.begin(f"distilling ({options.epochs} epochs at most)", options.epochs)
    training = distill_student(
        student,
        x,
        teacher_logits,
        labels,
        temperature=options.temperature,
        alpha=options.alpha,
        epochs=options.epochs,
        seed=options.seed,
        on_epoch=lambda _epoch, _loss: steps.advance(1),
    )
    timings["distillation"] = training.seconds
    steps.end()

    student_model = SourceModel(path=options.output, format="keras", keras=student)
    try:
        steps.begin(f"converting teacher and student to {mode}")
        t = time.perf_counter()
        teacher_bytes = quantize(teacher.saved_model_dir(), mode, io, x)
        student_bytes = quantize(student_model.saved_model_dir(), mode, io, x)
        timings["conversion"] = time.perf_counter() - t
        steps.end()
    finally:
        student_model.close()

    ex = None if evaluation is None else evaluation.x
    ey = None if evaluation is None else evaluation.y
    n = 0 if ex is None else int(ex.shape[0])
    t = time.perf_counter()
    steps.begin(f"evaluating the {mode} teacher", n + options.latency_runs)
    teacher_metrics, teacher_out = evaluate_model(
        teacher_bytes, ex, ey, latency_runs=options.latency_runs, on_sample=steps.advance
    )
    steps.end()
    steps.begin(f"evaluating the {mode} student", n + options.latency_runs)
    student_metrics, _ = evaluate_model(
        student_bytes,
        ex,
        ey,
        reference=teacher_out,
        latency_runs=options.latency_runs,
        on_sample=steps.advance,
    )
    steps.end()
    timings["evaluation"] = time.perf_counter() - t

    tflite = options.output.with_suffix(".tflite") if options.quantize is not None else None
    report = DistillReport(
        teacher=str(options.teacher),
        output=str(options.output),
        tflite=None if tflite is None else str(tflite),
        written=False,
        quantize=mode,
        io=io,
        student_source=student_source,
        temperature=options.temperature,
        alpha=options.alpha,
        seed=options.seed,
        teacher_metrics=teacher_metrics,
        student_metrics=student_metrics,
        teacher_cost=model_cost(teacher.keras)
        if teacher.keras is not None
        else ModelCost(_tflite_params(reference), None),
        student_cost=model_cost(student),
        training=training,
        timings=timings,
        max_accuracy_drop=options.max_accuracy_drop,
        eval_source=None if evaluation is None else evaluation.source,
        removed_blocks=tuple(removed),
    )
    if options.max_accuracy_drop is not None:
        drop = report.accuracy_drop
        passed = drop is not None and drop <= options.max_accuracy_drop
        report = replace(report, gate_passed=passed)
        if not passed:
            report = _finish(report, started)
            if options.report is not None:
                write_file(options.report, report.to_json(), "--report")
            raise AccuracyGateError(
                f"refused: the {mode} student loses {drop:.2f} accuracy points against the teacher "
                f"({100 * (teacher_metrics.accuracy or 0):.2f}% → {100 * (student_metrics.accuracy or 0):.2f}%), "
                f"more than --max-accuracy-drop {options.max_accuracy_drop:g}; no model written "
                "(try a wider student, more --epochs or more --unlabeled data)",
                report=report,
            )

    _save_keras(student, options.output)
    if tflite is not None:
        write_file(tflite, student_bytes, "-o")
    report = replace(report, written=True)
    if options.bundle is not None:
        assert signing_key is not None and tflite is not None
        steps.begin("signing the bundle")
        t = time.perf_counter()
        report = replace(report, bundle=write_bundle(tflite, options.bundle, signing_key, options.data))
        timings["bundle"] = time.perf_counter() - t
        steps.end()
    report = _finish(report, started)
    if options.report is not None:
        write_file(options.report, report.to_json(), "--report")
    return report


def _training_set(data: Dataset, unlabeled: Dataset | None) -> tuple[np.ndarray, np.ndarray | None]:
    """All training inputs, and their class numbers (-1 where there is none); None if no labels at all."""
    parts = [data.x] + ([] if unlabeled is None else [unlabeled.x])
    x = np.concatenate(parts).astype(np.float32)
    if data.y is None:
        return x, None
    y = np.asarray(data.y)
    y = y.argmax(axis=1) if y.ndim == 2 and y.shape[1] > 1 else y.reshape(-1)
    extra = 0 if unlabeled is None else len(unlabeled)
    return x, np.concatenate([y.astype(np.int64), np.full(extra, -1, dtype=np.int64)])


def _check_student(student: Any, input_shape: tuple[int, ...], classes: int) -> None:
    inputs, outputs = student.inputs, student.outputs
    if len(inputs) != 1 or len(outputs) != 1:
        raise ConfigError(
            f"the student has {len(inputs)} inputs and {len(outputs)} outputs; it needs one of each, like the teacher"
        )
    got = tuple(int(d) if d is not None else -1 for d in inputs[0].shape[1:])
    want = tuple(int(d) for d in input_shape[1:])
    if got != want:
        raise ConfigError(
            f"the student takes inputs of shape {got}, the teacher {want}; they must be the same"
        )
    out = int(np.prod([d for d in outputs[0].shape[1:] if d is not None]))
    if out != classes:
        raise ConfigError(
            f"the student outputs {out} values, the teacher {classes} classes; end the student in {classes} outputs"
        )


def _save_keras(model: Any, path: Path) -> None:
    """Save atomically: a temporary .keras next to ``path``, then renamed over it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".keras", dir=path.parent)
        os.close(fd)
        try:
            with captured_stdout("keras save"):
                model.save(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        raise ConfigError(f"cannot write -o {path}: {exc.strerror or exc}") from None


def _finish(report: DistillReport, started: float) -> DistillReport:
    return replace(report, timings={**report.timings, "total": time.perf_counter() - started})
