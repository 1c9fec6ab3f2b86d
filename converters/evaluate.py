"""Measure a converted model against its float reference, both run as TFLite.

Accuracy (when labels exist), top-1 agreement with the reference, mean and max absolute output
error, file size and gzip size, latency median and p95 over repeated single-sample runs on one
thread; and, for int8, the layers with the largest quantization error from TFLite's
quantization debugger (``tf.lite.experimental.QuantizationDebugger``).
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from edgekit.errors import ConfigError, ModelFormatError
from edgekit.runtime import Model, dequantize, quantize
from edgekit.tflite import TensorSpec, inspect_tflite

from .load import captured_stdout
from .quantize import representative

__all__ = [
    "LayerError",
    "ModelMetrics",
    "evaluate_model",
    "latency_machine",
    "measure_latency",
    "model_outputs",
    "points_lost",
    "quantization_errors",
    "selectively_quantized",
]

log = logging.getLogger(__name__)

LATENCY_RUNS = 100
LATENCY_WARMUP = 5


@dataclass(frozen=True)
class ModelMetrics:
    """Figures for one .tflite model on the evaluation data."""

    size: int
    gzip_size: int
    latency_ms_median: float
    latency_ms_p95: float
    samples: int = 0
    accuracy: float | None = None
    agreement: float | None = None  # top-1 agreement with the float reference
    mean_abs_error: float | None = None  # output error against the float reference
    max_abs_error: float | None = None
    weight_sparsity: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "gzip_size": self.gzip_size,
            "latency_ms_median": round(self.latency_ms_median, 6),
            "latency_ms_p95": round(self.latency_ms_p95, 6),
            "samples": self.samples,
            "accuracy": self.accuracy,
            "agreement": self.agreement,
            "mean_abs_error": self.mean_abs_error,
            "max_abs_error": self.max_abs_error,
            "weight_sparsity": round(self.weight_sparsity, 6),
        }


@dataclass(frozen=True)
class LayerError:
    """One quantized tensor's error as the quantization debugger measured it."""

    op: str
    tensor: str
    rmse_over_scale: float  # ~0.29 is pure rounding noise; well above 0.7 deserves a look
    mean_error: float
    max_abs_error: float
    scale: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "tensor": self.tensor,
            "rmse_over_scale": round(self.rmse_over_scale, 6),
            "mean_error": self.mean_error,
            "max_abs_error": self.max_abs_error,
            "scale": self.scale,
        }


def points_lost(before: float | None, after: float | None) -> float | None:
    """Accuracy points from ``before`` to ``after`` (fractions); negative when it got better."""
    if before is None or after is None:
        return None
    return round(100.0 * (before - after), 4)


def latency_machine(machine: str) -> str:
    """Where latency was measured, as the reports say it."""
    if machine in ("aarch64", "arm64", "armv7l"):
        return f"{machine} (1 thread)"
    return f"{machine} (1 thread; not an ARM figure)"


def gzip_size(data: bytes) -> int:
    return len(gzip.compress(data, compresslevel=9, mtime=0))


def _input_spec(info: Any) -> TensorSpec:
    if len(info.inputs) != 1:
        raise ConfigError(
            f"the model has {len(info.inputs)} inputs; edgekit convert evaluates single-input models"
        )
    return info.inputs[0]  # type: ignore[no-any-return]


def model_outputs(content: bytes, x: np.ndarray, on_sample: Callable[[], None] | None = None) -> np.ndarray:
    """The model's first output, dequantized to real values, for every sample of ``x`` (batch 1)."""
    info = inspect_tflite(content)
    spec = _input_spec(info)
    out_spec = info.outputs[0]
    with captured_stdout("runtime load"):
        model = Model(content, threads=1)
    rows = []
    for sample in x:
        raw = model.run([quantize(sample.reshape(spec.shape), spec)])
        rows.append(dequantize(raw[0], out_spec).reshape(-1))
        if on_sample is not None:
            on_sample()
    return np.stack(rows)


def measure_latency(
    content: bytes, sample: np.ndarray | None = None, runs: int = LATENCY_RUNS, warmup: int = LATENCY_WARMUP
) -> tuple[float, float]:
    """Median and p95 latency in ms of single invocations on one thread (the sample, or zeros)."""
    info = inspect_tflite(content)
    spec = _input_spec(info)
    if sample is None:
        sample = np.zeros(spec.shape, dtype=np.float32)
    raw = quantize(np.asarray(sample).reshape(spec.shape), spec)
    with captured_stdout("runtime load"):
        model = Model(content, threads=1)
    for _ in range(warmup):
        model.run([raw])
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        model.run([raw])
        times.append((time.perf_counter() - started) * 1000.0)
    return float(np.median(times)), float(np.percentile(times, 95))


def predicted(outputs: np.ndarray) -> np.ndarray:
    if outputs.shape[1] == 1:
        return (outputs[:, 0] > (0.5 if outputs.min() >= 0 else 0.0)).astype(np.int64)
    return outputs.argmax(axis=1)  # type: ignore[no-any-return]


def labels_of(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        return y.argmax(axis=1)  # type: ignore[no-any-return]
    return y.reshape(-1).astype(np.int64)


def evaluate_model(
    content: bytes,
    x: np.ndarray | None,
    y: np.ndarray | None,
    reference: np.ndarray | None = None,
    latency_runs: int = LATENCY_RUNS,
    on_sample: Callable[[], None] | None = None,
) -> tuple[ModelMetrics, np.ndarray | None]:
    """Metrics for ``content``; ``reference`` is the float reference's outputs on ``x``."""
    from .prune import weight_sparsity

    zeros, weights = weight_sparsity(content)
    outputs = None
    accuracy = agreement = mean_err = max_err = None
    if x is not None:
        outputs = model_outputs(content, x, on_sample)
        if y is not None:
            accuracy = float(np.mean(predicted(outputs) == labels_of(y)))
        if reference is not None:
            agreement = float(np.mean(predicted(outputs) == predicted(reference)))
            diff = np.abs(outputs.astype(np.float64) - reference.astype(np.float64))
            mean_err, max_err = float(diff.mean()), float(diff.max())
    median, p95 = measure_latency(content, None if x is None else x[0], runs=latency_runs)
    metrics = ModelMetrics(
        size=len(content),
        gzip_size=gzip_size(content),
        latency_ms_median=median,
        latency_ms_p95=p95,
        samples=0 if x is None else int(x.shape[0]),
        accuracy=accuracy,
        agreement=agreement,
        mean_abs_error=mean_err,
        max_abs_error=max_err,
        weight_sparsity=zeros / weights if weights else 0.0,
    )
    return metrics, outputs


def _debugger(converter: Any, calibration: np.ndarray, denylisted: Sequence[str] = ()) -> Any:
    import tensorflow as tf

    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(denylisted) or None)
    try:
        with captured_stdout("quantization debugger"):
            return tf.lite.experimental.QuantizationDebugger(
                converter=converter,
                debug_dataset=representative(calibration, limit=100),
                debug_options=options,
            )
    except Exception as exc:
        log.debug("quantization debugger failed", exc_info=True)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelFormatError(f"the quantization debugger cannot handle this model: {first[:300]}") from None


def quantization_errors(converter: Any, calibration: np.ndarray, top: int = 5) -> list[LayerError]:
    """The ``top`` quantized tensors with the largest RMSE relative to their quantization step."""
    debugger = _debugger(converter, calibration)
    with captured_stdout("quantization debugger run"):
        debugger.run()
    table = io.StringIO()
    debugger.layer_statistics_dump(table)
    table.seek(0)
    rows = []
    for row in csv.DictReader(table):
        scale = float(row["scale"])
        rmse = float(np.sqrt(float(row["mean_squared_error"])))
        rows.append(
            LayerError(
                op=row["op_name"],
                tensor=row["tensor_name"],
                rmse_over_scale=rmse / scale if scale else 0.0,
                mean_error=float(row["mean_error"]),
                max_abs_error=float(row["max_abs_error"]),
                scale=scale,
            )
        )
    rows.sort(key=lambda r: r.rmse_over_scale, reverse=True)
    return rows[:top]


def selectively_quantized(converter: Any, calibration: np.ndarray, float_layers: Sequence[str]) -> bytes:
    """int8 model whose ops producing the named tensors stay float (the debugger's denylist).

    A name matches a tensor exactly, or any tensor whose name contains it (so a Keras layer
    name such as ``dense_1`` selects that layer's tensors). Unknown names are an error listing
    the tensors there are.
    """
    import tensorflow as tf

    converter.inference_input_type = tf.float32
    converter.inference_output_type = tf.float32
    probe = _debugger(converter, calibration)
    with captured_stdout("quantization debugger run"):
        probe.run()
    table = io.StringIO()
    probe.layer_statistics_dump(table)
    table.seek(0)
    tensors = [row["tensor_name"] for row in csv.DictReader(table)]
    chosen: list[str] = []
    for wanted in float_layers:
        hits = [t for t in tensors if t == wanted] or [t for t in tensors if wanted in t]
        if not hits:
            raise ConfigError(
                f"--float-layers: no quantized tensor matches {wanted!r}; tensors are: {', '.join(tensors[:20])}"
            )
        chosen.extend(h for h in hits if h not in chosen)
    try:
        with captured_stdout("selective quantization"):
            probe.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=chosen)
            return bytes(probe.get_nondebug_quantized_model())
    except Exception as exc:
        log.debug("selective quantization failed", exc_info=True)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelFormatError(f"keeping {', '.join(float_layers)} in float failed: {first[:300]}") from None
