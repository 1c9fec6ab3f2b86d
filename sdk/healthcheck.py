"""Health checks: a few deterministic inputs and the outputs the model gave its author.

Made when a bundle is created (``healthcheck.npz``), run by a device after loading a model:
if its outputs are not within tolerance of the recorded ones, the device is not running the
model the author ran (wrong runtime, corrupted weights, a broken delegate) and the install is
rolled back. Tolerances apply to real values: quantized outputs are dequantized first.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence

import numpy as np

from .errors import BundleError, HealthCheckError
from .manifest import HealthCheckSpec
from .runtime import Model, dequantize, quantize
from .tflite import TensorSpec

__all__ = ["HEALTHCHECK_FILE", "make_healthcheck", "run_healthcheck"]

HEALTHCHECK_FILE = "healthcheck.npz"
DEFAULT_SAMPLES = 4
FLOAT_ATOL = 1e-4
RTOL = 1e-3


def _inputs(spec: TensorSpec, n: int, rng: np.random.Generator, real: np.ndarray | None) -> np.ndarray:
    shape = (n, *spec.shape)
    if real is not None and real.shape[0] >= n and tuple(real.shape[1:]) == tuple(spec.shape[1:]):
        # Real samples exercise the model far better than noise; batch axis is the model's own.
        values = real[:n].reshape(shape).astype(np.float32)
        return quantize(values, spec) if spec.quantized or spec.dtype != "float32" else values
    dtype = np.dtype(spec.dtype)
    if np.issubdtype(dtype, np.floating):
        return rng.uniform(0.0, 1.0, size=shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)


def make_healthcheck(
    model: Model,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    real_samples: np.ndarray | None = None,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
) -> tuple[bytes, HealthCheckSpec]:
    """Run ``model`` on deterministic inputs; returns the ``.npz`` bytes and its manifest entry.

    ``real_samples`` (real-valued, shaped like the first input without its batch axis) are used
    for the first input when given, e.g. from the drift baseline data.
    """
    rng = np.random.default_rng(seed)
    feeds = [_inputs(spec, samples, rng, real_samples if i == 0 else None) for i, spec in enumerate(inputs)]
    results: list[list[np.ndarray]] = [[] for _ in outputs]
    for s in range(samples):
        for j, value in enumerate(model.run([feed[s] for feed in feeds])):
            results[j].append(value)
    arrays = {f"input_{i}": feed for i, feed in enumerate(feeds)}
    arrays.update({f"output_{j}": np.stack(values) for j, values in enumerate(results)})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    atol = max([FLOAT_ATOL] + [1.5 * max(spec.scale) for spec in outputs if spec.quantized])
    return buffer.getvalue(), HealthCheckSpec(file=HEALTHCHECK_FILE, samples=samples, atol=atol, rtol=RTOL)


def load_healthcheck(data: bytes, n_inputs: int, n_outputs: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            feeds = [archive[f"input_{i}"] for i in range(n_inputs)]
            expected = [archive[f"output_{j}"] for j in range(n_outputs)]
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BundleError(f"healthcheck.npz is malformed ({exc}); the bundle is corrupt") from None
    return feeds, expected


def run_healthcheck(
    model: Model,
    data: bytes,
    spec: HealthCheckSpec,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
) -> float:
    """Replay the recorded inputs; returns the largest error, or raises HealthCheckError."""
    feeds, expected = load_healthcheck(data, len(inputs), len(outputs))
    worst = 0.0
    for s in range(spec.samples):
        got = model.run([feed[s] for feed in feeds])
        for j, out_spec in enumerate(outputs):
            want = dequantize(expected[j][s], out_spec).astype(np.float64)
            have = dequantize(got[j], out_spec).astype(np.float64)
            if want.shape != have.shape:
                raise HealthCheckError(
                    f"health check failed: output {out_spec.name!r} has shape {have.shape}, expected {want.shape}"
                )
            error = np.abs(have - want)
            worst = max(worst, float(error.max(initial=0.0)))
            if not np.all(error <= spec.atol + spec.rtol * np.abs(want)):
                raise HealthCheckError(
                    f"health check failed on sample {s}: output {out_spec.name!r} differs from the recorded "
                    f"output by up to {float(error.max()):.6g} (tolerance {spec.atol:.3g} + {spec.rtol:.3g}x); "
                    "the runtime or the model file is not what the author ran"
                )
    return worst
