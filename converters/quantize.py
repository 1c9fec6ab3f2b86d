"""Quantization modes: one TFLite converter setup per ``--quantize`` value.

- ``fp32``: no quantization, the float reference.
- ``fp16``: weights stored as float16 (dequantized at load); about half the size.
- ``dynamic``: weights int8, activations float, quantized on the fly (no calibration data).
- ``int8``: full integer (weights and activations int8) from calibration data; int8 input and
  output by default, float input and output with ``io="float"``.
- ``int16x8``: activations int16, weights int8, from calibration data; float input and output.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from edgekit.errors import ConfigError, ModelFormatError

from .load import captured_stdout, quiet_tensorflow

__all__ = [
    "CALIBRATION_SAMPLES",
    "IO_TYPES",
    "MODES",
    "check_mode",
    "make_converter",
    "quantize",
    "representative",
]

log = logging.getLogger(__name__)

MODES = ("fp32", "fp16", "dynamic", "int8", "int16x8")
IO_TYPES = ("int8", "float")
#: Calibration uses at most this many samples (spread evenly over the data given).
CALIBRATION_SAMPLES = 300


def check_mode(mode: str, io: str | None, has_calibration: bool) -> str:
    """Validate a mode and I/O type; returns the effective I/O type ("int8" or "float")."""
    if mode not in MODES:
        raise ConfigError(f"unknown --quantize {mode!r}; choose one of {', '.join(MODES)}")
    if io is not None and io not in IO_TYPES:
        raise ConfigError(f"unknown --io {io!r}; choose int8 or float")
    if mode in ("int8", "int16x8") and not has_calibration:
        raise ConfigError(
            f"--quantize {mode} needs --calibration DATA (a few hundred typical inputs) to set activation ranges"
        )
    if io == "int8" and mode != "int8":
        raise ConfigError(f"--io int8 applies to --quantize int8 only; {mode} keeps float input and output")
    if io is None:
        return "int8" if mode == "int8" else "float"
    return io


def representative(calibration: np.ndarray, limit: int = CALIBRATION_SAMPLES) -> Any:
    """A representative-dataset factory: samples spread evenly over ``calibration``, batch of one."""
    count = min(limit, calibration.shape[0])
    picks = np.linspace(0, calibration.shape[0] - 1, count).round().astype(np.int64)
    data = np.asarray(calibration, dtype=np.float32)

    def samples() -> Iterator[list[np.ndarray]]:
        for i in picks:
            yield [data[i : i + 1]]

    return samples


def make_converter(
    saved_model: Path, mode: str, io: str = "float", calibration: np.ndarray | None = None
) -> Any:
    """A ``tf.lite.TFLiteConverter`` set up for ``mode`` (not yet run)."""
    quiet_tensorflow()
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if mode == "fp32":
        return converter
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "dynamic":
        pass
    elif mode == "int8":
        assert calibration is not None
        converter.representative_dataset = representative(calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if io == "int8":
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    elif mode == "int16x8":
        assert calibration is not None
        converter.representative_dataset = representative(calibration)
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        ]
    else:  # pragma: no cover - check_mode runs first
        raise ConfigError(f"unknown mode {mode}")
    return converter


def run_converter(converter: Any, what: str) -> bytes:
    """Run a converter; its failures become one-line ModelFormatErrors."""
    try:
        with captured_stdout(what):
            return bytes(converter.convert())
    except Exception as exc:
        log.debug("%s failed", what, exc_info=True)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelFormatError(f"TFLite conversion ({what}) failed: {first[:300]}") from None


def quantize(
    saved_model: Path,
    mode: str,
    io: str = "float",
    calibration: np.ndarray | None = None,
    float_layers: Sequence[str] = (),
) -> bytes:
    """Convert the SavedModel at ``saved_model`` with ``mode``; returns the .tflite bytes.

    ``float_layers`` (int8 only) names tensors, as the quantization debugger reports them, whose
    producing ops stay float; the model then keeps float input and output.
    """
    converter = make_converter(saved_model, mode, io, calibration)
    if float_layers:
        if mode != "int8":
            raise ConfigError("--float-layers applies to --quantize int8 only")
        from .evaluate import selectively_quantized

        return selectively_quantized(converter, calibration, float_layers)  # type: ignore[arg-type]
    return run_converter(converter, f"{mode} conversion")
