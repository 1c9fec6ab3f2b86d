"""Confidence calibration: what a classifier's confidence is worth, measured once with labels.

At bundle time (``edgekit bundle create ... --calibration-eval DATA``) the model is run on a
labeled held-out set and its scores are calibrated by **temperature scaling** (Guo et al.,
"On Calibration of Modern Neural Networks", ICML 2017): one number ``T`` divides the logits
(the log of the probabilities) and is chosen to minimise the negative log-likelihood of the
true labels. It never changes which class wins, only how sure the model says it is, so that
on data like the held-out set the mean calibrated confidence matches the accuracy.

A device then estimates its accuracy on a window of predictions without labels: the mean
calibrated confidence of the window (the "average confidence" estimate). The held-out
accuracy, and the mean and spread of the calibrated confidence there, are the reference the
window is compared against.

Where it fails: a model that is confidently wrong (inverted images on the digits model) keeps
a high confidence, and a change that only makes the model less sure (lower contrast) lowers
the estimate without costing accuracy. The agent's drift monitor therefore combines this
estimate with the shift of the model's answers (see :mod:`edgekit.agent.drift`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .baseline import to_probabilities
from .errors import BundleError, DataError
from .schema import Fields, decode_json

__all__ = [
    "CALIBRATION_SCHEMA_VERSION",
    "Calibration",
    "calibrated_confidence",
    "fit_calibration",
]

CALIBRATION_SCHEMA = "edgekit.calibration"
CALIBRATION_SCHEMA_VERSION = 1
METHOD = "temperature"
#: Fewest labeled samples a calibration is fitted on.
MIN_SAMPLES = 20
_T_RANGE = (0.02, 50.0)
_TINY = 1e-12
_MAX_SIZE = 64 * 1024


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and the held-out reference the device compares windows with."""

    method: str  # "temperature"
    temperature: float
    classes: int
    samples: int  # labeled held-out samples it was fitted on
    accuracy: float  # the model's accuracy on them
    confidence_mean: float  # mean calibrated confidence on them
    confidence_std: float

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "schema": CALIBRATION_SCHEMA,
            "schema_version": CALIBRATION_SCHEMA_VERSION,
            **self.__dict__,
        }
        return (json.dumps(doc, sort_keys=True, allow_nan=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Calibration:
        """Decode ``calibration.json`` (a signed bundle member); BundleError naming what is wrong."""
        what = "calibration.json"
        doc = decode_json(
            data, CALIBRATION_SCHEMA, CALIBRATION_SCHEMA_VERSION, what, limit=_MAX_SIZE, error=BundleError
        )
        f = Fields(doc, what, error=BundleError, reason="malformed")
        if doc.get("method") != METHOD:
            raise f.bad("method", f"{METHOD!r} (this edgekit knows no other; upgrade edgekit)")
        return cls(
            method=METHOD,
            temperature=f.number("temperature", low=_T_RANGE[0], top=_T_RANGE[1]),
            classes=f.integer("classes", low=2),
            samples=f.integer("samples", low=MIN_SAMPLES),
            accuracy=f.number("accuracy", low=0.0, top=1.0),
            confidence_mean=f.number("confidence_mean", low=0.0, top=1.0),
            confidence_std=f.number("confidence_std", low=0.0, top=1.0),
        )


def calibrated_confidence(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """The top calibrated probability of each row of ``probabilities``: softmax(log p / T)."""
    logits = np.log(np.clip(probabilities, _TINY, None)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    top: np.ndarray = 1.0 / weights.sum(axis=1)  # the top class's weight is exp(0) = 1
    return top


def _nll(log_p: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = log_p / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(labels.size), labels]))


def _fit_temperature(log_p: np.ndarray, labels: np.ndarray) -> float:
    """Golden-section search for the NLL-minimising temperature, on a log scale (the NLL is
    unimodal in T for a fixed set of logits)."""
    low, high = math.log(_T_RANGE[0]), math.log(_T_RANGE[1])
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = _nll(log_p, labels, math.exp(a)), _nll(log_p, labels, math.exp(b))
    for _ in range(80):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = _nll(log_p, labels, math.exp(a))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = _nll(log_p, labels, math.exp(b))
    return math.exp((low + high) / 2.0)


def fit_calibration(outputs: np.ndarray, labels: np.ndarray, source: str) -> Calibration:
    """Fit a temperature to a classifier's outputs (N rows of class scores: probabilities or
    logits) on labeled held-out data; DataError naming ``source`` if the labels do not fit."""
    outputs = np.asarray(outputs, dtype=np.float64)
    classes = int(np.prod(outputs.shape[1:])) if outputs.ndim >= 2 else 0
    if classes < 2:
        raise DataError(
            "calibration is for classifiers: the model's first output is not a vector of class scores; "
            "leave out --calibration-eval"
        )
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != outputs.shape[0]:
        raise DataError(f"{source}: give one integer label per sample in y= (got shape {list(y.shape)})")
    if not np.issubdtype(y.dtype, np.integer) and (
        not np.issubdtype(y.dtype, np.floating) or not np.all(np.isfinite(y)) or np.any(y != np.round(y))
    ):
        raise DataError(f"{source}: labels must be whole class numbers 0 to {classes - 1}")
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise DataError(
            f"{source}: labels run from {int(y.min())} to {int(y.max())} but the model has {classes} "
            f"classes; labels must be class numbers 0 to {classes - 1} in the model's output order"
        )
    if y.size < MIN_SAMPLES:
        raise DataError(f"{source}: calibration needs at least {MIN_SAMPLES} labeled samples, got {y.size}")
    y = y.astype(np.int64)
    probabilities = to_probabilities(outputs.reshape(outputs.shape[0], -1))
    log_p = np.log(np.clip(probabilities, _TINY, None))
    temperature = _fit_temperature(log_p, y)
    confidence = calibrated_confidence(probabilities, temperature)
    return Calibration(
        method=METHOD,
        temperature=temperature,
        classes=classes,
        samples=int(y.size),
        accuracy=float(np.mean(probabilities.argmax(axis=1) == y)),
        confidence_mean=float(confidence.mean()),
        confidence_std=float(confidence.std()),
    )
