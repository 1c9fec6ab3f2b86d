"""``edgekit convert``: model → quantized (optionally pruned) .tflite, measured, gated, bundled.

:func:`convert` does the work and returns a :class:`ConversionReport`; the CLI only parses
flags and prints. Order of work: validate every option, load the model, convert the float
reference, load and check all DATA, prune, convert, evaluate, gate, and only then write the
.tflite (atomically) and, if asked, a signed bundle. A refused model leaves no output file.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
from edgekit._version import __version__
from edgekit.atomic import atomic_write
from edgekit.data import Dataset, fit_to_input, load_data
from edgekit.errors import AccuracyGateError, ConfigError, DataError
from edgekit.keys import SigningKey
from edgekit.tflite import TensorSpec, inspect_tflite

from .evaluate import (
    LayerError,
    ModelMetrics,
    evaluate_model,
    latency_machine,
    points_lost,
    quantization_errors,
)
from .load import SourceModel, load_model
from .prune import PATTERNS, PruneResult, prune_model
from .qat import QatResult, check_qat_layers, quantization_aware_training
from .quantize import check_mode, make_converter, quantize, run_converter

__all__ = [
    "REPORT_SCHEMA",
    "ConversionReport",
    "ConvertOptions",
    "StepReporter",
    "Steps",
    "convert",
    "parse_bundle_spec",
]

log = logging.getLogger(__name__)

REPORT_SCHEMA = "edgekit.convert-report"
REPORT_SCHEMA_VERSION = 1


class StepReporter(Protocol):
    """What :func:`convert` reports progress to (the CLI draws rich progress bars)."""

    def begin(self, description: str, total: Optional[int] = None) -> None: ...

    def advance(self, amount: int = 1) -> None: ...

    def end(self) -> None: ...


class Steps:
    """A silent :class:`StepReporter`."""

    def begin(self, description: str, total: Optional[int] = None) -> None:
        """A step starts; ``total`` units of work if known."""

    def advance(self, amount: int = 1) -> None:
        """``amount`` units of the current step are done."""

    def end(self) -> None:
        """The current step is done."""


@dataclass(frozen=True)
class ConvertOptions:
    """Everything ``edgekit convert`` takes; see docs/convert.md."""

    model: Path
    output: Path
    quantize: str = "fp32"
    io: str | None = None  # int8 | float; default int8 for int8, float otherwise
    calibration: Path | None = None
    prune: float | None = None
    qat: bool = False
    train: Path | None = None
    epochs: int = 8
    sparsity_pattern: str = "unstructured"
    eval: Path | None = None
    max_accuracy_drop: float | None = None
    float_layers: tuple[str, ...] = ()
    report: Path | None = None
    baseline: Path | None = None
    bundle: str | None = None  # NAME:VERSION
    latency_runs: int = 100


@dataclass(frozen=True)
class ConversionReport:
    """Every figure of one conversion. ``to_json`` is what ``--report`` and ``--json`` write."""

    source: str
    source_format: str
    output: str
    written: bool
    quantize: str
    io: str
    float_layers: tuple[str, ...]
    reference: ModelMetrics
    converted: ModelMetrics
    timings: dict[str, float]
    pruning: PruneResult | None = None
    qat: QatResult | None = None
    ptq: ModelMetrics | None = None  # with --qat: the int8 model without quantization-aware training
    worst_layers: tuple[LayerError, ...] = ()
    max_accuracy_drop: float | None = None
    gate_passed: bool | None = None
    baseline_source: str | None = None
    bundle: dict[str, Any] | None = None
    eval_source: str | None = None
    # the DATA that set the int8/int16x8 ranges (--calibration, or --train with --qat)
    calibration_source: str | None = None
    machine: str = field(default_factory=platform.machine)

    @property
    def size_ratio(self) -> float:
        return self.converted.size / self.reference.size

    @property
    def gzip_ratio(self) -> float:
        return self.converted.gzip_size / self.reference.gzip_size

    @property
    def accuracy_drop(self) -> float | None:
        """Accuracy points lost against the float reference (negative: the model got better)."""
        return points_lost(self.reference.accuracy, self.converted.accuracy)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": REPORT_SCHEMA,
            "schema_version": REPORT_SCHEMA_VERSION,
            "edgekit_version": __version__,
            "source": {"path": self.source, "format": self.source_format},
            "output": {"path": self.output, "written": self.written},
            "quantize": self.quantize,
            "io": self.io,
            "float_layers": list(self.float_layers),
            "eval_data": self.eval_source,
            "calibration_data": self.calibration_source,
            "reference": self.reference.to_dict(),
            "converted": self.converted.to_dict(),
            "size_ratio": round(self.size_ratio, 6),
            "gzip_ratio": round(self.gzip_ratio, 6),
            "latency_ratio": round(self.converted.latency_ms_median / self.reference.latency_ms_median, 6)
            if self.reference.latency_ms_median
            else None,
            "accuracy_drop_points": self.accuracy_drop,
            "gate": {"max_accuracy_drop": self.max_accuracy_drop, "passed": self.gate_passed},
            "pruning": None if self.pruning is None else self.pruning.to_dict(),
            "qat": self._qat_dict(),
            "worst_layers": [layer.to_dict() for layer in self.worst_layers],
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "latency_machine": latency_machine(self.machine),
            "baseline_data": self.baseline_source,
            "bundle": self.bundle,
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    def _qat_dict(self) -> dict[str, Any] | None:
        if self.qat is None or self.ptq is None:
            return None
        return {
            **self.qat.to_dict(),
            "ptq": self.ptq.to_dict(),
            "ptq_accuracy_drop_points": points_lost(self.reference.accuracy, self.ptq.accuracy),
        }


def parse_bundle_spec(spec: str) -> tuple[str, str]:
    """``NAME:VERSION`` → (name, version), both validated like ``bundle create`` does."""
    from edgekit.manifest import check_name, check_version

    name, sep, version = spec.partition(":")
    if not sep or not name or not version:
        raise ConfigError(f"--bundle {spec!r} must be NAME:VERSION, e.g. --bundle digits:1.0.0")
    return check_name(name), check_version(version)


def _validate(options: ConvertOptions, signing_key: SigningKey | None) -> tuple[str, float | None]:
    # --qat calibrates from --train when no --calibration is given (a missing --train is named below)
    qat_calibrates = options.qat and options.quantize == "int8"
    io = check_mode(options.quantize, options.io, options.calibration is not None or qat_calibrates)
    if options.float_layers:
        if options.quantize != "int8":
            raise ConfigError("--float-layers applies to --quantize int8 only")
        if options.io == "int8":
            raise ConfigError("--float-layers keeps float input and output; drop --io int8")
        io = "float"
    if options.sparsity_pattern not in PATTERNS:
        raise ConfigError(
            f"unknown --sparsity-pattern {options.sparsity_pattern!r}; choose unstructured or 2:4"
        )
    sparsity = options.prune
    if options.sparsity_pattern == "2:4":
        if sparsity is not None and abs(sparsity - 0.5) > 1e-9:
            raise ConfigError("--sparsity-pattern 2:4 is 50% sparsity; pass --prune 0.5 or leave --prune out")
        sparsity = 0.5
    if sparsity is not None:
        if not 0.0 < sparsity < 1.0:
            raise ConfigError(
                f"--prune {sparsity} is out of range; give a fraction between 0 and 1, e.g. 0.75"
            )
        if options.train is None:
            raise ConfigError("pruning needs --train DATA (inputs and labels) to fine-tune the model")
        if options.epochs < 1:
            raise ConfigError("--epochs must be at least 1")
    elif options.train is not None and not options.qat:
        raise ConfigError("--train is only used with --prune SPARSITY or --qat")
    if options.qat:
        if options.quantize != "int8":
            raise ConfigError("--qat trains for int8; add --quantize int8")
        if sparsity is not None:
            raise ConfigError(
                "--qat and --prune cannot be combined yet; prune first, then convert with --qat"
            )
        if options.train is None:
            raise ConfigError("--qat needs --train DATA (inputs and labels) to fine-tune the model")
        if options.epochs < 1:
            raise ConfigError("--epochs must be at least 1")
    check_measuring(options.max_accuracy_drop, options.eval, options.latency_runs)
    check_data_paths(
        ("--calibration", options.calibration),
        ("--train", options.train),
        ("--eval", options.eval),
        ("--baseline", options.baseline),
    )
    output = options.output
    if output.suffix.lower() == ".ekb":
        raise ConfigError("-o names the .tflite file; with --bundle the .ekb is written next to it")
    if output.is_dir():
        raise ConfigError(f"-o {output} is a directory; give a file name such as model.tflite")
    if options.report is not None and options.report.resolve() == output.resolve():
        raise ConfigError("--report and -o name the same file")
    if options.bundle is not None:
        parse_bundle_spec(options.bundle)
        if signing_key is None:
            raise ConfigError("--bundle needs a signing key; create one with `edgekit keys init`")
    return io, sparsity


def check_measuring(max_accuracy_drop: float | None, eval_data: Path | None, latency_runs: int) -> None:
    """The gate and latency flags (``convert`` and ``distill``)."""
    if max_accuracy_drop is not None:
        if max_accuracy_drop < 0:
            raise ConfigError("--max-accuracy-drop must be 0 or more accuracy points")
        if eval_data is None:
            raise ConfigError("--max-accuracy-drop needs --eval DATA with labels to measure accuracy")
    if latency_runs < 1:
        raise ConfigError("latency runs must be at least 1")


def check_data_paths(*flags: tuple[str, Path | None]) -> None:
    """Every DATA given exists (before anything slow runs)."""
    for flag, path in flags:
        if path is not None and not path.exists():
            raise DataError(
                f"{flag} {path} does not exist; give a .npy or .npz file, a folder of images, or a folder from `edgekit capture pull`"
            )


def checked_data(path: Path, spec: TensorSpec, what: str, need_labels: bool) -> Dataset:
    """DATA at ``path`` shaped for the model's input ``spec``, finite, with labels if ``need_labels``."""
    dataset = load_data(path, image_shape=tuple(spec.shape[1:]))
    x = fit_to_input(dataset.x, spec, f"{what} data {dataset.source}")
    x = np.asarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{what} data {dataset.source} holds NaN or infinite values")
    if need_labels and dataset.y is None:
        raise DataError(
            f"{what} data {dataset.source} has no labels; give an .npz with x and y, "
            "a folder of images in one sub-folder per class, or a `capture pull` folder with a labels.csv"
        )
    return Dataset(x=x, y=dataset.y, source=dataset.source, classes=dataset.classes)


def check_labels(data: Dataset, classes: int, what: str) -> None:
    """Labels (if any) must be class numbers below ``classes``, or one-hot over ``classes``."""
    if data.y is None:
        return
    y = np.asarray(data.y)
    if y.ndim == 2 and y.shape[1] > 1:
        if y.shape[1] != classes:
            raise DataError(
                f"{what} data {data.source}: labels are one-hot over {y.shape[1]} classes, the model outputs {classes}"
            )
        return
    if not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0):
        raise DataError(f"{what} data {data.source}: labels are {y.dtype} values, expected class numbers")
    if classes > 1 and (y.min() < 0 or y.max() >= classes):
        raise DataError(
            f"{what} data {data.source}: labels run from {int(y.min())} to {int(y.max())}, "
            f"the model outputs {classes} classes (0 to {classes - 1})"
        )


def convert(
    options: ConvertOptions, steps: StepReporter | None = None, signing_key: SigningKey | None = None
) -> ConversionReport:
    """Run one conversion. Raises AccuracyGateError (after writing the report, if asked) on refusal."""
    steps = steps or Steps()
    started = time.perf_counter()
    io, sparsity = _validate(options, signing_key)
    timings: dict[str, float] = {}

    steps.begin("loading the model")
    source = load_model(options.model)
    steps.end()
    if sparsity is not None and not source.trainable:
        raise ConfigError(
            "pruning needs a Keras model (.keras or .h5) to fine-tune; a SavedModel directory can be quantized only"
        )
    if options.qat:
        if not source.trainable:
            raise ConfigError(
                "--qat needs a Keras model (.keras or .h5) to fine-tune; a SavedModel directory can be quantized only"
            )
        check_qat_layers(source.keras)
    try:
        return _convert(options, source, io, sparsity, steps, signing_key, timings, started)
    finally:
        source.close()


def _convert(
    options: ConvertOptions,
    source: SourceModel,
    io: str,
    sparsity: float | None,
    steps: StepReporter,
    signing_key: SigningKey | None,
    timings: dict[str, float],
    started: float,
) -> ConversionReport:
    steps.begin("converting the float reference")
    t = time.perf_counter()
    source.saved_model_dir()  # a Keras model is exported once here; every mode converts from it
    timings["export"] = time.perf_counter() - t
    t = time.perf_counter()
    reference_bytes = run_converter(
        make_converter(source.saved_model_dir(), "fp32"), "fp32 reference conversion"
    )
    timings["reference_conversion"] = time.perf_counter() - t
    steps.end()
    info = inspect_tflite(reference_bytes)
    if len(info.inputs) != 1:
        raise ConfigError(
            f"the model has {len(info.inputs)} inputs; edgekit convert handles single-input models"
        )
    spec = info.inputs[0]
    classes = int(np.prod(info.outputs[0].shape[1:])) if info.outputs else 0

    calibration = (
        checked_data(options.calibration, spec, "calibration", False) if options.calibration else None
    )
    train = checked_data(options.train, spec, "training", True) if options.train else None
    evaluation = checked_data(options.eval, spec, "evaluation", False) if options.eval else None
    if options.baseline is not None:
        checked_data(options.baseline, spec, "baseline", False)
    for data, what in ((train, "training"), (evaluation, "evaluation")):
        if data is not None:
            check_labels(data, classes, what)
    if options.max_accuracy_drop is not None and (evaluation is None or evaluation.y is None):
        raise DataError(
            f"--max-accuracy-drop needs labels in --eval {options.eval}: an .npz with x and y, "
            "or image sub-folders per class"
        )

    pruning = None
    if sparsity is not None:
        assert train is not None and train.y is not None
        total = int(np.ceil(len(train) / 32)) * options.epochs

        def on_batch(step: int, _total: int) -> None:
            steps.advance(1)

        steps.begin(f"pruning to {sparsity:.0%} ({options.sparsity_pattern}) while fine-tuning", total)
        pruning = prune_model(
            source.keras,
            train.x,
            np.asarray(train.y),
            sparsity,
            options.sparsity_pattern,
            epochs=options.epochs,
            on_batch=on_batch,
        )
        source.weights_changed()
        timings["pruning"] = pruning.seconds
        steps.end()

    if calibration is None and options.qat:
        calibration = train  # --qat without --calibration: the training inputs set the int8 ranges
    cal_x = None if calibration is None else calibration.x
    qat = ptq_bytes = None
    if options.qat:
        assert train is not None and train.y is not None and cal_x is not None
        steps.begin("converting to int8 without quantization-aware training (for comparison)")
        t = time.perf_counter()
        ptq_bytes = quantize(source.saved_model_dir(), "int8", io, cal_x, options.float_layers)
        timings["ptq_conversion"] = time.perf_counter() - t
        steps.end()
        steps.begin("quantization-aware training", int(np.ceil(len(train) / 32)) * options.epochs)
        qat = quantization_aware_training(
            source.keras,
            train.x,
            np.asarray(train.y),
            cal_x,
            epochs=options.epochs,
            on_batch=lambda _step, _total: steps.advance(1),
        )
        source.weights_changed()
        timings["qat"] = qat.seconds
        steps.end()

    if options.quantize == "fp32" and pruning is None:
        converted_bytes = reference_bytes
        timings["conversion"] = timings["reference_conversion"]
    else:
        steps.begin(f"converting to {options.quantize}")
        t = time.perf_counter()
        converted_bytes = quantize(
            source.saved_model_dir(), options.quantize, io, cal_x, options.float_layers
        )
        timings["conversion"] = time.perf_counter() - t
        steps.end()

    worst: list[LayerError] = []
    if options.quantize == "int8" and evaluation is not None and cal_x is not None:
        steps.begin("finding the layers with the largest quantization error")
        t = time.perf_counter()
        worst = quantization_errors(make_converter(source.saved_model_dir(), "int8", "float", cal_x), cal_x)
        timings["quantization_debugger"] = time.perf_counter() - t
        steps.end()

    _check_runs(converted_bytes, options.quantize)
    x = None if evaluation is None else evaluation.x
    y = None if evaluation is None else evaluation.y
    n = 0 if x is None else int(x.shape[0])
    steps.begin("evaluating the float reference", n + options.latency_runs)
    t = time.perf_counter()
    reference, ref_outputs = evaluate_model(
        reference_bytes, x, y, latency_runs=options.latency_runs, on_sample=steps.advance
    )
    steps.end()
    steps.begin(f"evaluating the {options.quantize} model", n + options.latency_runs)
    converted, _ = evaluate_model(
        converted_bytes,
        x,
        y,
        reference=ref_outputs,
        latency_runs=options.latency_runs,
        on_sample=steps.advance,
    )
    steps.end()
    ptq = None
    if ptq_bytes is not None:
        steps.begin("evaluating the int8 model without quantization-aware training", n + options.latency_runs)
        ptq, _ = evaluate_model(
            ptq_bytes, x, y, reference=ref_outputs, latency_runs=options.latency_runs, on_sample=steps.advance
        )
        steps.end()
    timings["evaluation"] = time.perf_counter() - t

    baseline_path = options.baseline or options.calibration or options.train
    report = ConversionReport(
        source=str(options.model),
        source_format=source.format,
        output=str(options.output),
        written=False,
        quantize=options.quantize,
        io=io,
        float_layers=tuple(options.float_layers),
        reference=reference,
        converted=converted,
        timings=timings,
        pruning=pruning,
        qat=qat,
        ptq=ptq,
        worst_layers=tuple(worst),
        max_accuracy_drop=options.max_accuracy_drop,
        eval_source=None if evaluation is None else evaluation.source,
        calibration_source=None if calibration is None else calibration.source,
        baseline_source=str(baseline_path) if (options.bundle and baseline_path) else None,
    )
    drop = report.accuracy_drop
    if options.max_accuracy_drop is not None:
        passed = drop is not None and drop <= options.max_accuracy_drop
        report = _replace(report, gate_passed=passed)
        if not passed:
            report = _finish(report, timings, started)
            if options.report is not None:
                write_file(options.report, report.to_json(), "--report")
            assert reference.accuracy is not None and converted.accuracy is not None
            raise AccuracyGateError(
                f"refused: the {options.quantize} model loses {drop:.2f} accuracy points "
                f"({100 * reference.accuracy:.2f}% → {100 * converted.accuracy:.2f}%), more than "
                f"--max-accuracy-drop {options.max_accuracy_drop:g}; no model written "
                "(try a milder --quantize, --float-layers, or less --prune)",
                report=report,
            )

    write_file(options.output, converted_bytes, "-o")
    report = _replace(report, written=True)
    if options.bundle is not None:
        assert signing_key is not None
        steps.begin("signing the bundle")
        t = time.perf_counter()
        bundle = write_bundle(options.output, options.bundle, signing_key, baseline_path)
        timings["bundle"] = time.perf_counter() - t
        steps.end()
        report = _replace(report, bundle=bundle)
    report = _finish(report, timings, started)
    if options.report is not None:
        write_file(options.report, report.to_json(), "--report")
    return report


def write_bundle(tflite: Path, spec: str, signing_key: SigningKey, baseline: Path | None) -> dict[str, Any]:
    """Sign ``tflite`` into ``NAME:VERSION`` bundle next to it (``.ekb``); the report's ``bundle`` figures."""
    from edgekit.bundle import create_bundle, read_bundle
    from edgekit.trust import TrustedKeys

    name, version = parse_bundle_spec(spec)
    bundle_path = tflite.with_suffix(".ekb")
    create_bundle(tflite, name=name, version=version, key=signing_key, output=bundle_path, baseline=baseline)
    bundle = read_bundle(bundle_path, TrustedKeys([signing_key.public]))
    return {
        "path": str(bundle_path),
        "name": name,
        "version": version,
        "bundle_id": bundle.bundle_id,
        "size": bundle.size,
        "baseline": bundle.baseline() is not None,
        "signer": bundle.signer,
    }


def write_file(path: Path, data: bytes, flag: str) -> None:
    """Write ``data`` atomically; an unwritable place is a ConfigError naming ``flag``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    except OSError as exc:
        raise ConfigError(f"cannot write {flag} {path}: {exc.strerror or exc}") from None


def _check_runs(content: bytes, mode: str) -> None:
    """The converter can emit models the runtime refuses to prepare; say so before writing anything."""
    from edgekit.errors import ModelFormatError
    from edgekit.runtime import Model

    from .load import captured_stdout

    try:
        with captured_stdout("runtime load"):
            Model(content, threads=1)
    except ModelFormatError as exc:
        detail = " ".join(str(exc).split())
        raise ModelFormatError(
            f"the {mode} model converted, but the TFLite runtime cannot run it ({detail[:300]}); "
            "no model written; try another --quantize mode"
        ) from None


def _replace(report: ConversionReport, **changes: Any) -> ConversionReport:
    from dataclasses import replace

    return replace(report, **changes)


def _finish(report: ConversionReport, timings: dict[str, float], started: float) -> ConversionReport:
    return _replace(report, timings={**timings, "total": time.perf_counter() - started})
