"""Drift that matters: a window's severity tells a harmless change from one that hurts the model.

The digits model is bundled with a baseline and a calibration on the first 200 held-out
images; windows of 100 are drawn (fixed seeds) from the other held-out images under a shift,
without replacement so that a window is 100 independent images as a device would see them
(drawn with replacement from a pool of 197, repeats add sampling noise no device has), fed with the real model's outputs to the agent's DriftMonitor, and the severity
rates are asserted over many windows, never a single draw. Numpy only: this file runs in the
lean device venv too (no TensorFlow, no scipy).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from edgekit import create_bundle, read_bundle
from edgekit.agent import Agent, DriftMonitor
from edgekit.reports import TelemetryRecord
from edgekit.runtime import Model
from edgekit.trust import TrustedKeys

SPLIT = 200  # baseline and calibration on the first SPLIT held-out images, windows on the rest
WINDOW = 100
WINDOWS = 40


def rotate(x: np.ndarray, degrees: float) -> np.ndarray:
    """Images (N, H, W, 1) rotated about their centre, bilinear, zeros outside."""
    n, h, w, _ = x.shape
    theta = np.deg2rad(degrees)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    sy = np.cos(theta) * (ys - cy) - np.sin(theta) * (xs - cx) + cy
    sx = np.sin(theta) * (ys - cy) + np.cos(theta) * (xs - cx) + cx
    y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
    fy, fx = sy - y0, sx - x0
    out = np.zeros((n, h, w), dtype=np.float64)
    img = x[..., 0]
    for dy, dx, weight in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        yy, xx = y0 + dy, x0 + dx
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        out += np.where(inside, img[:, np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], 0.0) * weight
    return np.clip(out, 0, 1)[..., None].astype(np.float32)


def occlude(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[:, :4, :4, :] = 0.0  # a covered quarter of the image
    return out


Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]
HARMLESS: dict[str, Shift] = {
    "brightness +0.03": lambda x, rng: np.clip(x + 0.03, 0, 1),
    "noise sigma 0.05": lambda x, rng: np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1),
    "contrast x0.85": lambda x, rng: x * 0.85,
}
HARMFUL: dict[str, Shift] = {
    "rotation 15 degrees": lambda x, rng: rotate(x, 15),
    "rotation 30 degrees": lambda x, rng: rotate(x, 30),
    "occluded quarter": lambda x, rng: occlude(x),
    "inverted": lambda x, rng: 1.0 - x,
}


class Digits:
    def __init__(self, models, bundle: Path, key) -> None:
        loaded = read_bundle(bundle, TrustedKeys([key.public]))
        self.baseline = loaded.baseline()
        self.calibration = loaded.calibration()
        self.model = Model(models.fp32.read_bytes(), threads=1)
        self.x, self.y = models.x_test[SPLIT:], models.y_test[SPLIT:]

    def outputs(self, x: np.ndarray) -> np.ndarray:
        return np.stack([self.model.run([s[None].astype(np.float32)])[0][0] for s in x])

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.outputs(x).argmax(axis=1) == y))

    def severities(
        self, x: np.ndarray, seed: int, calibrated: bool = True, labels: list[str] | None = None
    ) -> tuple[Counter[str], list]:
        """Severity counts over WINDOWS windows drawn from ``x``, and the last window's report."""
        outputs = self.outputs(x)
        rng = np.random.default_rng(seed)
        counts: Counter[str] = Counter()
        report = None
        for _ in range(WINDOWS):
            monitor = DriftMonitor(
                self.baseline,
                WINDOW,
                0.1,
                0.1,
                calibration=self.calibration if calibrated else None,
                labels=labels,
            )
            for i in rng.choice(len(x), WINDOW, replace=False):
                monitor.add(x[i], outputs[i])
            report = monitor.report()
            counts[report.severity] += 1
        return counts, [report]


@pytest.fixture(scope="module")
def calibrated_bundle(models, key, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calibrated")
    data = out / "heldout.npz"
    np.savez(data, x=models.x_test[:SPLIT], y=models.y_test[:SPLIT])
    path = out / "digits-calibrated.ekb"
    create_bundle(
        models.fp32,
        name="digits",
        version="1.1.0",
        key=key,
        output=path,
        baseline=data,
        calibration_eval=data,
    )
    return path


@pytest.fixture(scope="module")
def digits(models, key, calibrated_bundle) -> Digits:
    return Digits(models, calibrated_bundle, key)


def test_clean_windows_are_ok(digits):
    counts, (report,) = digits.severities(digits.x, seed=10)
    assert counts["model affected"] / WINDOWS <= 0.05
    assert counts["ok"] / WINDOWS >= 0.9
    assert report.accuracy is not None and report.accuracy.method == "confidence"
    true = digits.accuracy(digits.x, digits.y)
    assert abs(report.accuracy.estimate - true) < 0.1
    assert report.accuracy.low <= report.accuracy.estimate <= report.accuracy.high


@pytest.mark.parametrize("shift", sorted(HARMLESS))
def test_harmless_shifts_are_inputs_changed(digits, shift):
    rng = np.random.default_rng(20)
    x = HARMLESS[shift](digits.x, rng).astype(np.float32)
    assert digits.accuracy(x, digits.y) > digits.accuracy(digits.x, digits.y) - 0.01  # it costs < 1 point
    counts, (report,) = digits.severities(x, seed=21)
    assert counts["model affected"] / WINDOWS <= 0.1
    assert counts["inputs changed"] / WINDOWS >= 0.8
    assert report.signals["inputs"]


@pytest.mark.parametrize("shift", sorted(HARMFUL))
def test_harmful_shifts_are_model_affected(digits, shift):
    rng = np.random.default_rng(30)
    x = HARMFUL[shift](digits.x, rng).astype(np.float32)
    true = digits.accuracy(x, digits.y)
    assert true < digits.accuracy(digits.x, digits.y) - 0.05  # it costs >= 5 points
    counts, (report,) = digits.severities(x, seed=31)
    assert counts["model affected"] / WINDOWS >= 0.95
    assert report.summary.startswith("model affected")
    assert report.accuracy is not None and report.accuracy.estimate < report.accuracy.reference


def test_confidently_wrong_inversion_is_caught_by_the_answer_shift(digits):
    """Inverted digits: the model is wrong on all of them, but its calibrated confidence
    overestimates its accuracy; the answers moving with the inputs still catch it, and the
    estimate falls back to the bound the answer shift gives."""
    x = (1.0 - digits.x).astype(np.float32)
    assert digits.accuracy(x, digits.y) < 0.05
    counts, (report,) = digits.severities(x, seed=40)
    assert counts["model affected"] == WINDOWS
    assert report.signals["answers"] and report.signals["inputs"]
    assert report.accuracy.method == "answer shift"
    assert "confidence cannot be trusted" in report.summary


def test_a_class_mix_change_alone_is_reported_as_such(digits):
    """Only digits 0-6 in front of the camera: the answers move, the inputs do not."""
    keep = digits.y < 7
    names = [f"digit {i}" for i in range(10)]
    counts, (report,) = digits.severities(digits.x[keep], seed=50, labels=names)
    assert counts["inputs changed"] / WINDOWS >= 0.9
    assert report.signals["answers"] and not report.signals["inputs"]
    assert "mix of answers changed (more 'digit " in report.summary
    grown = report.summary.split("more 'digit ")[1][0]
    assert int(grown) < 7  # a digit that is still shown, by the name labels.txt gives it


def test_without_calibration_severity_uses_input_and_output_drift(digits):
    counts, (report,) = digits.severities((1.0 - digits.x).astype(np.float32), seed=60, calibrated=False)
    assert counts["model affected"] == WINDOWS
    assert report.accuracy is None and not report.calibrated
    assert "no calibration" in report.summary
    counts, _ = digits.severities(digits.x, seed=61, calibrated=False)
    assert counts["model affected"] / WINDOWS <= 0.05


def test_severity_reaches_status_and_telemetry(make_config, calibrated_bundle, bundles, models):
    rng = np.random.default_rng(70)
    path = make_config("severity", drift_sample_rate=1.0, drift_window=WINDOW)
    with Agent.from_config(path, background=False) as agent:
        agent.install(calibrated_bundle)
        status = agent.status()
        assert status.drift_checks == "inputs, outputs and accuracy"
        assert status.drift["severity"] is None  # no complete window yet
        for i in SPLIT + rng.choice(len(models.x_test) - SPLIT, WINDOW, replace=False):
            agent.predict(1.0 - models.x_test[i])
        record = agent.flush_telemetry()
        assert record is not None and record.drift_severity == "model affected"
        assert record.drift["windows"] == 1
        again = agent.flush_telemetry()  # no new window: the same verdict, the same count
        assert again is not None and again.drift_severity == "model affected" and again.drift["windows"] == 1
        assert record.drift["accuracy"]["reference"] == pytest.approx(digits_reference(agent))
        assert TelemetryRecord.from_dict(record.to_dict()).drift_severity == "model affected"
        agent.install(bundles.v3)  # baseline, no calibration
        assert agent.status().drift_checks == "inputs and outputs"


def digits_reference(agent: Agent) -> float:
    served = agent._served
    assert served is not None and served.drift is not None and served.drift.calibration is not None
    return served.drift.calibration.accuracy
