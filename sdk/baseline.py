"""Drift baselines: the reference statistics a bundle carries and a device compares against.

For image inputs (per-sample shape H x W x C, or H x W) there is one feature per channel, over
all of that channel's pixel values; for vector inputs one feature per element. Each feature
keeps quantile cut points, the baseline's counts in the bins they define, its mean and std.
Bin ``i`` holds values in ``[cuts[i-1], cuts[i])``; bin 0 is everything below ``cuts[0]`` and
the last bin everything from ``cuts[-1]`` up, so shifts outside the baseline's range land in
the outer bins. The reference output distribution is kept too: for a classifier (a first
output of several class scores) the predicted-class and confidence histograms; for a
regressor (a first output of one value) the histogram of that value, as ``output_values``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from .errors import BundleError, DataError

__all__ = [
    "BASELINE_SCHEMA_VERSION",
    "Baseline",
    "FeatureBaseline",
    "OutputBaseline",
    "bin_counts",
    "compute_baseline",
    "feature_values",
    "ks_distance",
    "psi",
    "to_probabilities",
]

BASELINE_SCHEMA = "edgekit.baseline"
BASELINE_SCHEMA_VERSION = 1
DEFAULT_BINS = 16
CONFIDENCE_BINS = 10
_MAX_FEATURES = 4096


@dataclass(frozen=True)
class FeatureBaseline:
    name: str
    cuts: tuple[float, ...]
    counts: tuple[int, ...]
    mean: float
    std: float


@dataclass(frozen=True)
class OutputBaseline:
    classes: int
    class_counts: tuple[int, ...]
    confidence_counts: tuple[int, ...]  # over CONFIDENCE_BINS equal bins of [0, 1]


@dataclass(frozen=True)
class Baseline:
    kind: str  # "image" or "vector"
    samples: int
    features: tuple[FeatureBaseline, ...]
    outputs: OutputBaseline | None = None
    #: A regressor's output value (one feature named ``output.value``); None for classifiers.
    output_values: FeatureBaseline | None = None

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "schema": BASELINE_SCHEMA,
            "schema_version": BASELINE_SCHEMA_VERSION,
            "kind": self.kind,
            "samples": self.samples,
            "features": [_feature_doc(f) for f in self.features],
            "outputs": None
            if self.outputs is None
            else {
                "classes": self.outputs.classes,
                "class_counts": list(self.outputs.class_counts),
                "confidence_counts": list(self.outputs.confidence_counts),
            },
        }
        if self.output_values is not None:  # absent otherwise: older agents read this file unchanged
            doc["output_values"] = _feature_doc(self.output_values)
        return (json.dumps(doc, sort_keys=True, allow_nan=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Baseline:
        try:
            doc = orjson.loads(data)  # strict JSON: NaN and Infinity are refused here
            if doc["schema"] != BASELINE_SCHEMA or doc["schema_version"] != BASELINE_SCHEMA_VERSION:
                raise BundleError("baseline.json has an unsupported schema; upgrade edgekit")
            if doc["kind"] not in ("image", "vector"):
                raise BundleError(f"baseline.json has an unknown kind {doc['kind']!r}")
            features = [_feature(f) for f in doc["features"]]
            values = doc.get("output_values")
            out = doc.get("outputs")
            outputs = None
            if out is not None:
                outputs = OutputBaseline(
                    classes=int(out["classes"]),
                    class_counts=_counts(out["class_counts"]),
                    confidence_counts=_counts(out["confidence_counts"]),
                )
            return cls(
                kind=doc["kind"],
                samples=int(doc["samples"]),
                features=tuple(features),
                outputs=outputs,
                output_values=None if values is None else _feature(values),
            )
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise BundleError(f"baseline.json is malformed ({type(exc).__name__}: {exc})") from None


def _feature_doc(f: FeatureBaseline) -> dict[str, Any]:
    return {"name": f.name, "cuts": list(f.cuts), "counts": list(f.counts), "mean": f.mean, "std": f.std}


def _feature(doc: dict[str, Any]) -> FeatureBaseline:
    cuts = tuple(float(c) for c in doc["cuts"])
    counts = _counts(doc["counts"])
    if len(counts) != len(cuts) + 1 or list(cuts) != sorted(cuts):
        raise BundleError(f"baseline.json feature {doc['name']!r} has inconsistent bins")
    return FeatureBaseline(str(doc["name"]), cuts, counts, float(doc["mean"]), float(doc["std"]))


def _counts(values: Any) -> tuple[int, ...]:
    """Histogram counts: a list of non-negative integers (ValueError otherwise)."""
    if not isinstance(values, list) or not all(type(c) is int and c >= 0 for c in values):
        raise ValueError("counts must be a list of non-negative integers")
    return tuple(values)


def _column_baseline(name: str, column: np.ndarray, bins: int) -> FeatureBaseline:
    cuts = _cuts(column, bins)
    return FeatureBaseline(
        name=name,
        cuts=tuple(float(c) for c in cuts),
        counts=tuple(int(c) for c in bin_counts(column, cuts)),
        mean=float(column.mean()),
        std=float(column.std()),
    )


def input_kind(sample_shape: tuple[int, ...]) -> str:
    """``image`` for H x W (x C) samples, ``vector`` otherwise."""
    return "image" if len(sample_shape) >= 2 else "vector"


def feature_values(x: np.ndarray, kind: str) -> np.ndarray:
    """Rows of observations, one column per feature: pixels x channels, or samples x elements."""
    x = np.asarray(x, dtype=np.float32)
    if kind == "image":
        channels = x.shape[-1] if x.ndim >= 4 else 1
        return x.reshape(-1, channels)
    return x.reshape(x.shape[0], -1)


def bin_counts(values: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Counts of ``values`` (1-D) in the bins defined by ``cuts`` (see module doc)."""
    idx = np.searchsorted(cuts, values, side="right")
    return np.bincount(idx, minlength=len(cuts) + 1)


def _cuts(column: np.ndarray, bins: int) -> np.ndarray:
    qs = np.quantile(column, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    cuts = np.unique(np.concatenate([[column.min()], qs]))
    # A value that holds a large share of the data on its own (black pixels, a saturated
    # sensor, a default of 0) gets a bin of its own, [v, next float after v): then noise that
    # moves values off it, or a camera stuck on it, shows in the histogram.
    atoms = [c for c in cuts if np.count_nonzero(column == c) > column.size / (2 * bins)]
    if atoms or cuts.size == 1:
        cuts = np.unique(
            np.concatenate([cuts, [np.nextafter(np.float32(a), np.float32(np.inf)) for a in atoms]])
        )
    if cuts.size == 1:  # a constant feature: one bin for the constant, one either side
        cuts = np.array([cuts[0], np.nextafter(cuts[0], np.inf)])
    return cuts


def to_probabilities(outputs: np.ndarray) -> np.ndarray:
    """Rows of class scores as probabilities, row by row: a row with no negative score is
    taken as probabilities (renormalised: a quantized softmax does not sum to exactly 1),
    any other row as logits (softmax). Deciding per row keeps a sample's result independent
    of the batch it is in, so a device and the baseline agree."""
    outputs = np.asarray(outputs, dtype=np.float64).reshape(outputs.shape[0], -1)
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    softmax = shifted / shifted.sum(axis=1, keepdims=True)
    totals = outputs.sum(axis=1, keepdims=True)
    is_probability = (outputs.min(axis=1, keepdims=True) >= -1e-6) & (totals > 0)
    normalised = outputs / np.where(totals > 0, totals, 1.0)
    probabilities: np.ndarray = np.where(is_probability, normalised, softmax)
    return probabilities


def output_counts(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted-class counts and confidence histogram of probability rows."""
    classes = probabilities.shape[1]
    predicted = np.bincount(probabilities.argmax(axis=1), minlength=classes)
    confidence = np.clip(
        (probabilities.max(axis=1) * CONFIDENCE_BINS).astype(np.intp), 0, CONFIDENCE_BINS - 1
    )
    return predicted, np.bincount(confidence, minlength=CONFIDENCE_BINS)


def compute_baseline(x: np.ndarray, outputs: np.ndarray | None = None, bins: int = DEFAULT_BINS) -> Baseline:
    """Reference statistics of real-valued model inputs ``x`` (N samples) and, optionally,
    of the model's first output on them (N rows of class scores, or N single values)."""
    if x.shape[0] < 2:
        raise DataError("a drift baseline needs at least 2 samples")
    kind = input_kind(tuple(x.shape[1:]))
    values = feature_values(x, kind)
    if values.shape[1] > _MAX_FEATURES:
        raise DataError(
            f"a drift baseline covers at most {_MAX_FEATURES} features; the input has {values.shape[1]}"
        )
    if not np.all(np.isfinite(values)):
        raise DataError("the baseline data holds NaN or infinite values")
    features = [
        _column_baseline(f"channel{i}" if kind == "image" else f"feature{i}", values[:, i], bins)
        for i in range(values.shape[1])
    ]
    out = regression = None
    size = int(np.prod(outputs.shape[1:])) if outputs is not None and outputs.ndim >= 1 else 0
    if outputs is not None and size > 1:
        predicted, confidence = output_counts(to_probabilities(outputs))
        out = OutputBaseline(
            classes=int(predicted.size),
            class_counts=tuple(int(c) for c in predicted),
            confidence_counts=tuple(int(c) for c in confidence),
        )
    elif outputs is not None and size == 1:
        column = np.asarray(outputs, dtype=np.float64).reshape(-1)
        if np.all(np.isfinite(column)):
            regression = _column_baseline("output.value", column, bins)
    return Baseline(
        kind=kind, samples=int(x.shape[0]), features=tuple(features), outputs=out, output_values=regression
    )


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index between two count vectors over the same bins."""
    p = np.asarray(expected, dtype=np.float64)
    q = np.asarray(actual, dtype=np.float64)
    p = np.clip(p / max(p.sum(), 1.0), eps, None)
    q = np.clip(q / max(q.sum(), 1.0), eps, None)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_distance(expected: np.ndarray, actual: np.ndarray) -> float:
    """Largest gap between the two binned cumulative distributions (a binned KS statistic)."""
    p = np.cumsum(np.asarray(expected, dtype=np.float64))
    q = np.cumsum(np.asarray(actual, dtype=np.float64))
    if p[-1] <= 0 or q[-1] <= 0:
        return 0.0
    return float(np.max(np.abs(p / p[-1] - q / q[-1])))
