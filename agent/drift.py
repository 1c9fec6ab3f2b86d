"""Streaming drift statistics: sampled inputs and outputs compared with the bundle's baseline.

The agent hands a sample of its ``predict()`` inputs (real values) and outputs to a
:class:`DriftMonitor`. It keeps, per input feature (per channel for images, per element for
vectors), the counts in the baseline's bins, the sum and the sum of squares, plus the
predicted-class and confidence histograms of the outputs, for the current window of
``window`` sampled inputs. When a window fills, it is scored against the baseline with the
population stability index (PSI) and a binned Kolmogorov–Smirnov distance (the largest gap
between the two cumulative histograms), and becomes the window :meth:`DriftMonitor.report`
shows. A feature has drifted when its PSI exceeds ``psi_threshold`` or its KS distance
exceeds ``ks_threshold``, and that score is also beyond what sampling noise alone gives at
``ALPHA`` (Bonferroni-corrected over the features) for the window's and the baseline's
sizes; the report has drifted when any feature (or the output class or
confidence distribution) has. Binning is vectorized over a batch of samples and all
features at once: each sampled input costs a few array operations, never a Python loop over
its values.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from edgekit.baseline import (
    CONFIDENCE_BINS,
    Baseline,
    FeatureBaseline,
    bin_counts,
    ks_distance,
    output_counts,
    psi,
    to_probabilities,
)
from edgekit.calibration import Calibration, calibrated_confidence
from edgekit.reports import DRIFT_SEVERITIES
from edgekit.runtime import dequantize, quantize
from edgekit.tflite import TensorSpec

__all__ = ["SEVERITIES", "AccuracyEstimate", "DriftMonitor", "DriftReport", "FeatureDrift"]

#: Sampled inputs buffered before they are binned together (one vectorized pass).
BATCH = 128
#: Pixels per channel summarised from each sampled image (a fixed random subset for larger
#: images): histograms need hundreds of values per window, not every pixel of every image, and
#: this keeps a sampled 224x224x3 input as cheap as a small one.
MAX_PIXELS = 256
_SMALL_FEATURES = 8
#: Output distributions are compared for classifiers only: a first output of more elements
#: than this (a detector's boxes, an embedding) is not a class-score vector.
MAX_CLASSES = 1000
#: False-alarm level of the sampling-noise floor, shared by all features of a report.
ALPHA = 1e-3
#: False-alarm level of ``model affected`` on data like the baseline's, per window, shared
#: (Bonferroni) by the two output-side tests that can raise it: with a calibration, estimated
#: accuracy and answers (the latter only with the inputs); without, answers and confidence (each
#: only with the inputs). The same level is used for each output-side test in both modes.
SEVERITY_ALPHA = 0.01
_SEVERITY_TESTS = 2
#: Two-sided coverage of the accuracy interval reported.
INTERVAL = 0.9
#: A window's severity, in the words an owner sees (None: no complete window judged yet).
SEVERITIES = DRIFT_SEVERITIES
OK, INPUTS_CHANGED, MODEL_AFFECTED = DRIFT_SEVERITIES


def _normal_quantile(p: float) -> float:
    """The standard normal quantile, by bisection on erfc (``statistics`` costs a device
    half a megabyte of imports for this one number)."""
    low, high = -40.0, 40.0
    for _ in range(100):
        mid = (low + high) / 2.0
        if 0.5 * math.erfc(-mid / math.sqrt(2.0)) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2.0


def noise_limits(bins: int, n: int, m: int, alpha: float) -> tuple[float, float]:
    """PSI and KS values that two samples of sizes ``n`` and ``m`` from the same distribution
    exceed with probability ``alpha`` (PSI ~ chi-square(bins - 1) x (1/n + 1/m); KS by the
    asymptotic Kolmogorov distribution)."""
    if n <= 0 or m <= 0:
        return math.inf, math.inf
    scale = 1.0 / n + 1.0 / m
    k = max(bins - 1, 1)
    z = _normal_quantile(1.0 - alpha)
    chi2 = k * (1.0 - 2.0 / (9.0 * k) + z * math.sqrt(2.0 / (9.0 * k))) ** 3  # Wilson-Hilferty
    ks = math.sqrt(-math.log(alpha / 2.0) / 2.0) * math.sqrt(scale)
    return chi2 * scale, ks


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's scores in the reported window. ``ks`` is None where it has no meaning
    (the predicted-class distribution: classes have no order)."""

    name: str
    psi: float
    ks: float | None
    mean: float | None
    baseline_mean: float | None
    drifted: bool
    psi_limit: float = 0.0  # the larger of the threshold and the sampling-noise floor
    ks_limit: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "psi": self.psi,
            "ks": self.ks,
            "psi_limit": self.psi_limit,
            "ks_limit": self.ks_limit,
            "mean": self.mean,
            "baseline_mean": self.baseline_mean,
            "drifted": self.drifted,
        }


@dataclass(frozen=True)
class AccuracyEstimate:
    """The window's accuracy estimated without labels, from the bundle's calibration.

    ``method`` is ``confidence`` (held-out accuracy minus the drop of mean calibrated
    confidence) or ``answer shift`` (the answers moved in a way the class mix does not explain:
    then at most ``1 - TV`` of them can still be right, TV the total-variation distance between
    the window's and the baseline's predicted-class distributions; a confidently wrong model
    hides from the confidence estimate but not from this bound). ``low``..``high`` is a
    ``INTERVAL`` interval for the sampling noise of the window and of the held-out set."""

    estimate: float
    low: float
    high: float
    reference: float  # accuracy on the labeled held-out set at bundle time
    method: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class DriftReport:
    """The current drift verdict. ``samples`` is how many sampled inputs the scored window
    holds; ``complete`` is False while the first window is still filling (then ``drifted`` is
    False: a partial window is shown, never judged)."""

    window: int
    samples: int
    complete: bool
    windows: int  # windows completed so far
    psi_threshold: float
    ks_threshold: float
    features: tuple[FeatureDrift, ...]
    drifted: bool
    #: ``ok``, ``inputs changed`` or ``model affected``; None until a window is complete.
    severity: str | None = None
    #: The tests behind ``severity``: inputs, answers (predicted classes), confidence, accuracy.
    signals: dict[str, bool] = dataclasses.field(default_factory=dict)
    accuracy: AccuracyEstimate | None = None
    calibrated: bool = False  # the bundle carries a calibration (else no accuracy estimate)
    summary: str = ""  # one line for an owner

    @property
    def scores(self) -> dict[str, float]:
        """The largest of each feature's PSI and KS, relative to their thresholds (1.0 = at threshold)."""
        return {
            f.name: max(f.psi / self.psi_threshold, (f.ks or 0.0) / self.ks_threshold) for f in self.features
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "samples": self.samples,
            "complete": self.complete,
            "windows": self.windows,
            "psi_threshold": self.psi_threshold,
            "ks_threshold": self.ks_threshold,
            "drifted": self.drifted,
            "severity": self.severity,
            "summary": self.summary,
            "signals": dict(self.signals),
            "calibrated": self.calibrated,
            "accuracy": self.accuracy.to_dict() if self.accuracy is not None else None,
            "features": [f.to_dict() for f in self.features],
        }


def on_quantized_grid(feature: FeatureBaseline, spec: TensorSpec) -> FeatureBaseline:
    """The baseline's bins as a quantized input sees them.

    A device feeding a quantized model only ever sees values on its grid (``scale`` apart), so
    a cut is moved to half a step below the grid point its value quantizes to: values the
    baseline counted at or above the cut still land there. A value's own bin (``[v, next
    float)``) becomes the bin of the one grid point ``v`` quantizes to; other bins narrower than
    a step that become empty are merged into the next one.
    """
    step = float(spec.scale[0])
    mapped = dequantize(quantize(np.asarray(feature.cuts, dtype=np.float32), spec), spec).astype(np.float64)
    mapped -= step / 2.0
    original = feature.cuts
    cuts: list[float] = []
    counts = [feature.counts[0]]
    for i, cut in enumerate(mapped):
        if cuts and cut <= cuts[-1] and original[i] - original[i - 1] < step:
            # A value's own bin, [v, next float): on the grid, the one grid point v is on.
            cut = cuts[-1] + step
        if cuts and cut <= cuts[-1]:
            counts[-1] += feature.counts[i + 1]  # an emptied bin: its values now fall in the next
            continue
        cuts.append(float(cut))
        counts.append(feature.counts[i + 1])
    # counts[k] is the bin below cuts[k]; an emptied bin's values belong above its cut.
    return dataclasses.replace(feature, cuts=tuple(cuts), counts=tuple(counts))


def _pad_cuts(features: tuple[FeatureBaseline, ...]) -> np.ndarray:
    width = max(len(f.cuts) for f in features)
    cuts = np.full((len(features), width), np.inf, dtype=np.float64)
    for i, feature in enumerate(features):
        cuts[i, : len(feature.cuts)] = feature.cuts
    return cuts


class _Window:
    """Counts of one window: per-feature bins, sums, output histograms."""

    def __init__(self, features: int, bins: int, classes: int) -> None:
        self.samples = 0
        self.counts = np.zeros((features, bins), dtype=np.int64)
        self.total = np.zeros(features, dtype=np.float64)
        self.values = 0  # values per feature seen (pixels x samples for images)
        self.classes = np.zeros(max(classes, 1), dtype=np.int64)
        self.confidence = np.zeros(CONFIDENCE_BINS, dtype=np.int64)
        self.calibrated_sum = 0.0  # of the calibrated top probability, for the accuracy estimate
        self.calibrated_var = 0.0  # sum of c (1 - c): the Poisson-binomial variance of the hits
        self.output_values = np.zeros(0, dtype=np.int64)  # a regressor's output-value bins
        self.output_total = 0.0
        self.outputs = 0  # samples with an output


class DriftMonitor:
    """Windowed drift summaries against one :class:`~edgekit.baseline.Baseline`. Thread-safe."""

    def __init__(
        self,
        baseline: Baseline,
        window: int,
        psi_threshold: float,
        ks_threshold: float,
        input_spec: TensorSpec | None = None,
        calibration: Calibration | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        """``input_spec``: the model input the samples are fed to; when it is quantized,
        :meth:`add` accepts its integer values and dequantizes the few it keeps.
        ``calibration``: the bundle's, for the accuracy estimate (ignored unless it matches
        the baseline's classes). ``labels``: class names, for the summary's words."""
        if not baseline.features:
            raise ValueError("the baseline has no features")
        self.baseline = baseline
        self.window = window
        self.psi_threshold = psi_threshold
        self.ks_threshold = ks_threshold
        self._spec = input_spec if input_spec is not None and input_spec.quantized else None
        self._features = baseline.features
        if self._spec is not None and len(self._spec.scale) == 1:
            self._features = tuple(on_quantized_grid(f, self._spec) for f in baseline.features)
        self._cuts = _pad_cuts(self._features)
        self._ncuts = np.array([len(f.cuts) for f in self._features])
        self._bins = self._cuts.shape[1] + 1
        outputs = baseline.outputs
        self._classes = outputs.classes if outputs is not None and outputs.classes <= MAX_CLASSES else 0
        self.calibration = (
            calibration
            if calibration is not None and self._classes and calibration.classes == self._classes
            else None
        )
        self._labels = tuple(labels) if labels is not None and len(labels) == self._classes else None
        # A regressor's single output value, binned like an input feature.
        self._values = baseline.output_values if not self._classes else None
        self._offsets = np.arange(len(baseline.features), dtype=np.int64) * self._bins
        self._positions: np.ndarray | None = None
        self._lock = threading.Lock()
        self._pending_in: list[np.ndarray] = []
        self._pending_out: list[np.ndarray] = []
        self._current = self._new_window()
        self._last: _Window | None = None
        self._windows = 0
        self.sampled = 0

    def _new_window(self) -> _Window:
        win = _Window(len(self.baseline.features), self._bins, self._classes)
        if self._values is not None:
            win.output_values = np.zeros(len(self._values.cuts) + 1, dtype=np.int64)
        return win

    # -- feeding ----------------------------------------------------------------------------

    def _select(self, x: np.ndarray) -> np.ndarray:
        """The values of one sample that are summarised: (rows, features), real-valued."""
        features = len(self.baseline.features)
        if self.baseline.kind == "image":
            values = np.asarray(x).reshape(-1, features)
            if values.shape[0] > MAX_PIXELS:
                if self._positions is None or (
                    self._positions.size and self._positions[-1] >= values.shape[0]
                ):
                    rng = np.random.default_rng(0)
                    self._positions = np.sort(rng.choice(values.shape[0], MAX_PIXELS, replace=False))
                values = values[self._positions]
            else:
                values = values.copy()
        else:
            values = np.asarray(x).reshape(1, -1).copy()
            if values.shape[1] != features:
                raise ValueError(f"sampled inputs have {values.shape[1]} features, the baseline {features}")
        real: np.ndarray = (
            dequantize(values.reshape(-1), self._spec).reshape(values.shape)
            if self._spec is not None
            else values.astype(np.float32, copy=False)
        )
        return real

    def add(self, x: np.ndarray, output: np.ndarray | None = None) -> None:
        """Queue one sampled input (the model's per-sample shape, with or without a batch axis
        of 1; real values, or the quantized input's integers when ``input_spec`` was given) and
        the model's first output (real values) for it. Cheap: binning happens per batch."""
        values = self._select(x)
        flush = False
        with self._lock:
            self._pending_in.append(values)
            if output is not None and (self._classes or self._values is not None):
                self._pending_out.append(output)
            self.sampled += 1
            flush = len(self._pending_in) >= BATCH
        if flush:
            self.flush()

    def flush(self) -> None:
        """Bin everything queued so far (called by :meth:`add` and :meth:`report`)."""
        with self._lock:
            inputs, self._pending_in = self._pending_in, []
            outputs, self._pending_out = self._pending_out, []
            if not inputs:
                return
            # Process window by window so a window boundary falls between the right samples.
            start = 0
            while start < len(inputs):
                room = self.window - self._current.samples
                chunk_in = inputs[start : start + room]
                chunk_out = outputs[start : start + room] if len(outputs) == len(inputs) else []
                self._update(self._current, chunk_in, chunk_out)
                start += len(chunk_in)
                if self._current.samples >= self.window:
                    self._last = self._current
                    self._windows += 1
                    self._current = self._new_window()

    def _update(self, win: _Window, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> None:
        values = np.concatenate(inputs).astype(np.float64, copy=False)
        win.counts += self._bin(values)
        win.total += values.sum(axis=0)
        win.values += values.shape[0]
        win.samples += len(inputs)
        if outputs and self._values is not None:
            column = np.array([float(np.asarray(o).reshape(-1)[0]) for o in outputs])
            win.output_values += bin_counts(column, np.asarray(self._values.cuts))
            win.output_total += float(column.sum())
            win.outputs += column.size
        elif outputs:
            probabilities = to_probabilities(
                np.stack([np.asarray(o, dtype=np.float64).reshape(-1) for o in outputs])
            )
            if probabilities.shape[1] == self._classes:
                predicted, confidence = output_counts(probabilities)
                win.classes += predicted
                win.confidence += confidence
                if self.calibration is not None:
                    top = calibrated_confidence(probabilities, self.calibration.temperature)
                    win.calibrated_sum += float(top.sum())
                    win.calibrated_var += float((top * (1.0 - top)).sum())

    def _bin(self, values: np.ndarray) -> np.ndarray:
        """Counts per (feature, bin) of a (rows, features) matrix, in one vectorized pass."""
        features = values.shape[1]
        if features <= _SMALL_FEATURES:
            # Few features, many values each (image channels): binary search per channel.
            idx = np.empty(values.shape, dtype=np.int64)
            for f in range(features):
                idx[:, f] = np.searchsorted(self._cuts[f, : self._ncuts[f]], values[:, f], side="right")
        else:
            # Many features, few values each (vectors): compare against every cut at once.
            idx = (~(values[:, :, None] < self._cuts[None, :, :])).sum(axis=2)
            idx = np.minimum(idx, self._ncuts[None, :])
        # bincount takes the platform's index type: int32 on a 32-bit board (armhf), where an
        # int64 array is refused ("Cannot cast array data from dtype('int64') to dtype('int32')").
        flat = (idx + self._offsets[None, :]).reshape(-1).astype(np.intp, copy=False)
        counts: np.ndarray = np.bincount(flat, minlength=features * self._bins).reshape(features, self._bins)
        return counts

    # -- reporting --------------------------------------------------------------------------

    def report(self) -> DriftReport:
        """Scores of the last complete window (or of the first window while it fills)."""
        self.flush()
        with self._lock:
            complete = self._last is not None
            win = self._last if self._last is not None else self._current
            features = self._score(win, judge=complete)
            signals = self._signals(win, features)
            accuracy = self._accuracy(win, signals)
            severity = self._severity(signals) if complete and win.samples else None
            return DriftReport(
                window=self.window,
                samples=win.samples,
                complete=complete,
                windows=self._windows,
                psi_threshold=self.psi_threshold,
                ks_threshold=self.ks_threshold,
                features=tuple(features),
                drifted=complete and any(f.drifted for f in features),
                severity=severity,
                signals=signals,
                accuracy=accuracy,
                calibrated=self.calibration is not None,
                summary=self._summary(severity, signals, accuracy, win),
            )

    # -- severity ---------------------------------------------------------------------------

    def _signals(self, win: _Window, features: list[FeatureDrift]) -> dict[str, bool]:
        """The tests behind a severity, each at ``SEVERITY_ALPHA / 2`` on the output side:
        ``inputs`` (any input feature drifted, as reported), ``answers`` (the predicted-class
        distribution moved), ``confidence`` (the confidence distribution moved) and
        ``accuracy`` (the mean calibrated confidence fell below what the held-out set gives)."""
        by_name = {f.name: f for f in features}
        alpha = SEVERITY_ALPHA / _SEVERITY_TESTS
        signals = {
            "inputs": any(f.drifted for f in features if not f.name.startswith("output.")),
            "answers": False,
            "confidence": False,
            "accuracy": False,
        }
        value = by_name.get("output.value")
        if value is not None and win.outputs:
            # A regressor: its answers are its output values.
            psi_limit, ks_limit = noise_limits(
                len(win.output_values), win.outputs, self.baseline.samples, alpha
            )
            signals["answers"] = value.psi > psi_limit or (value.ks or 0.0) > ks_limit
        outputs = int(win.classes.sum()) if self._classes else 0
        if not outputs or self.baseline.outputs is None:
            return signals
        reference = self.baseline.samples
        answers, confidence = by_name.get("output.class"), by_name.get("output.confidence")
        if answers is not None:
            signals["answers"] = answers.psi > noise_limits(self._classes, outputs, reference, alpha)[0]
        if confidence is not None:
            psi_limit, ks_limit = noise_limits(CONFIDENCE_BINS, outputs, reference, alpha)
            signals["confidence"] = confidence.psi > psi_limit or (confidence.ks or 0.0) > ks_limit
        cal = self.calibration
        if cal is not None:
            noise = cal.confidence_std * math.sqrt(1.0 / outputs + 1.0 / cal.samples)
            mean = win.calibrated_sum / outputs
            signals["accuracy"] = mean < cal.confidence_mean - _normal_quantile(1.0 - alpha) * noise
        return signals

    def _accuracy(self, win: _Window, signals: dict[str, bool]) -> AccuracyEstimate | None:
        cal = self.calibration
        outputs = int(win.classes.sum()) if self._classes else 0
        if cal is None or not outputs or self.baseline.outputs is None:
            return None
        # Difference of confidences: the held-out accuracy, moved by as much as the mean
        # calibrated confidence moved (on held-out-like data the two agree by construction).
        estimate = cal.accuracy - (cal.confidence_mean - win.calibrated_sum / outputs)
        method = "confidence"
        if signals["answers"] and signals["inputs"]:
            expected = np.asarray(self.baseline.outputs.class_counts, dtype=np.float64)
            seen = win.classes.astype(np.float64)
            bound = 1.0 - 0.5 * float(np.abs(expected / expected.sum() - seen / seen.sum()).sum())
            if bound < estimate:
                estimate, method = bound, "answer shift"
        z = _normal_quantile(0.5 + INTERVAL / 2.0)
        half = z * math.sqrt(
            win.calibrated_var / outputs**2 + cal.accuracy * (1.0 - cal.accuracy) / cal.samples
        )
        estimate = min(max(estimate, 0.0), 1.0)
        return AccuracyEstimate(
            estimate=estimate,
            low=max(estimate - half, 0.0),
            high=min(estimate + half, 1.0),
            reference=cal.accuracy,
            method=method,
        )

    def _severity(self, signals: dict[str, bool]) -> str:
        if self.calibration is not None:
            # The estimate fell, or the answers moved together with the inputs (a class mix
            # alone moves the answers, not the inputs; a confidently wrong model moves both).
            affected = signals["accuracy"] or (signals["answers"] and signals["inputs"])
        else:
            affected = signals["inputs"] and (signals["answers"] or signals["confidence"])
        if affected:
            return MODEL_AFFECTED
        return INPUTS_CHANGED if any(signals.values()) else OK

    def _summary(
        self, severity: str | None, signals: dict[str, bool], accuracy: AccuracyEstimate | None, win: _Window
    ) -> str:
        if severity is None:
            return f"not judged yet: {win.samples} of {self.window} sampled inputs seen"
        if severity == OK:
            text = "ok: inputs and answers look like the baseline data"
        elif severity == INPUTS_CHANGED:
            if signals["answers"] and not signals["inputs"] and self._values is not None:
                text = (
                    "inputs changed: the model's output values moved while its inputs still look like the "
                    "baseline data; what the device measures changed, not necessarily how well the model works"
                )
            elif signals["answers"] and not signals["inputs"]:
                text = (
                    f"inputs changed: the mix of answers changed (more {self._most_increased(win)}) "
                    "while the inputs still look like the baseline data; "
                    "what the device sees changed, not how well the model works"
                )
            elif signals["inputs"]:
                text = "inputs changed: they no longer look like the baseline data, but the model's answers did not change"
            else:
                text = (
                    "inputs changed: the model is more or less sure of its answers than on the baseline data, "
                    "though its inputs and answers look the same"
                )
        elif accuracy is not None and accuracy.method == "answer shift":
            text = (
                "model affected: its answers shifted along with its inputs; at most "
                f"{accuracy.estimate:.0%} of them can still be right (tested at {accuracy.reference:.0%}; "
                "its confidence cannot be trusted here)"
            )
        elif accuracy is not None:
            text = (
                f"model affected: estimated accuracy {accuracy.estimate:.0%} "
                f"({accuracy.low * 100:.0f}-{accuracy.high:.0%}), {accuracy.reference:.0%} when tested"
            )
        elif self._values is not None:
            text = (
                "model affected: its output values moved along with its inputs (no accuracy estimate: "
                "edgekit estimates accuracy for classifiers only)"
            )
        else:
            text = (
                "model affected: its answers or its confidence changed along with its inputs "
                "(the bundle has no calibration, so no accuracy estimate)"
            )
        if accuracy is not None and severity != MODEL_AFFECTED:
            text += f"; estimated accuracy {accuracy.estimate:.0%} ({accuracy.reference:.0%} when tested)"
        return text

    def _most_increased(self, win: _Window) -> str:
        """The class whose share of the answers grew most, by name when the bundle has labels."""
        assert self.baseline.outputs is not None
        expected = np.asarray(self.baseline.outputs.class_counts, dtype=np.float64)
        seen = win.classes.astype(np.float64)
        grown = int(np.argmax(seen / max(seen.sum(), 1.0) - expected / max(expected.sum(), 1.0)))
        return f"'{self._labels[grown]}'" if self._labels is not None else f"of class {grown}"

    def _feature(
        self,
        name: str,
        expected: np.ndarray,
        actual: np.ndarray,
        judge: bool,
        alpha: float,
        with_ks: bool = True,
        mean: float | None = None,
        baseline_mean: float | None = None,
    ) -> FeatureDrift:
        # Half a count in every bin (Jeffreys smoothing): an empty bin in a small window is
        # sampling noise, not an infinitely surprising event.
        p = psi(expected + 0.5, actual + 0.5)
        k = ks_distance(expected, actual) if with_ks else None
        noise_psi, noise_ks = noise_limits(len(expected), int(actual.sum()), int(expected.sum()), alpha)
        psi_limit = max(self.psi_threshold, noise_psi)
        ks_limit = max(self.ks_threshold, noise_ks)
        drifted = judge and (p > psi_limit or (k is not None and k > ks_limit))
        return FeatureDrift(name, p, k, mean, baseline_mean, drifted, psi_limit, ks_limit)

    def _score(self, win: _Window, judge: bool) -> list[FeatureDrift]:
        out: list[FeatureDrift] = []
        if win.samples == 0:
            return out
        reference = self.baseline.outputs if self._classes else None
        tests = len(self.baseline.features) + (2 if reference is not None else 0) + (self._values is not None)
        alpha = ALPHA / tests
        for i, feature in enumerate(self._features):
            counts = win.counts[i, : len(feature.cuts) + 1]
            mean = float(win.total[i] / win.values) if win.values else None
            out.append(
                self._feature(
                    feature.name, np.asarray(feature.counts), counts, judge, alpha, True, mean, feature.mean
                )
            )
        if reference is not None and int(win.classes.sum()) > 0:
            out.append(
                self._feature(
                    "output.class", np.asarray(reference.class_counts), win.classes, judge, alpha, False
                )
            )
            out.append(
                self._feature(
                    "output.confidence", np.asarray(reference.confidence_counts), win.confidence, judge, alpha
                )
            )
        values = self._values
        if values is not None and win.outputs:
            mean = win.output_total / win.outputs
            counts = np.asarray(values.counts)
            out.append(
                self._feature(values.name, counts, win.output_values, judge, alpha, True, mean, values.mean)
            )
        return out
