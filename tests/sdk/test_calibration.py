"""Calibration at bundle time (``--calibration-eval``), and a regressor's output drift."""

from __future__ import annotations

import json

import numpy as np
import pytest
from edgekit import create_bundle, read_bundle
from edgekit.agent import DriftMonitor
from edgekit.bundle import inspect_bundle
from edgekit.calibration import Calibration, calibrated_confidence, fit_calibration
from edgekit.errors import BundleError, DataError
from edgekit.keys import SigningKey
from edgekit.runtime import Model
from edgekit.trust import TrustedKeys
from helpers import retar, tar_members
from test_cli import assert_one_line_error, edgekit


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_temperature_scaling_recovers_the_temperature_labels_were_drawn_with():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4000, 5))
    true_t = 2.5  # the model is overconfident: its logits are 2.5x too large
    labels = np.array([rng.choice(5, p=p) for p in softmax(logits / true_t)])
    calibration = fit_calibration(softmax(logits), labels, "synthetic")
    assert calibration.temperature == pytest.approx(true_t, rel=0.1)
    # Calibrated, the mean confidence matches the accuracy; uncalibrated it overstates it.
    assert calibration.confidence_mean == pytest.approx(calibration.accuracy, abs=0.03)
    assert softmax(logits).max(axis=1).mean() > calibration.accuracy + 0.1
    assert Calibration.from_json(calibration.to_json()) == calibration


def test_calibration_never_changes_the_winning_class():
    rng = np.random.default_rng(1)
    p = softmax(rng.normal(0, 2, size=(50, 4)))
    top = calibrated_confidence(p, 0.5)
    assert np.all(top >= p.max(axis=1) - 1e-12)  # T < 1 sharpens
    assert np.all(calibrated_confidence(p, 1.0) == pytest.approx(p.max(axis=1)))


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        (np.arange(30) % 12, "labels run from 0 to 11 but the model has 10 classes"),
        (-(np.arange(30) % 3), "labels run from -2 to 0"),
        (np.full(30, 0.5), "whole class numbers"),
        (np.arange(10) % 10, "at least 20 labeled samples"),
    ],
)
def test_labels_that_do_not_fit_the_model_are_refused(labels, fragment):
    outputs = softmax(np.random.default_rng(2).normal(size=(len(labels), 10)))
    with pytest.raises(DataError, match=fragment):
        fit_calibration(outputs, labels, "eval.npz")


def test_a_calibration_set_with_labels_of_the_wrong_range_is_refused_by_bundle_create(
    digits_models, tmp_path
):
    assert edgekit("keys", "init").returncode == 0
    bad = tmp_path / "eval.npz"
    np.savez(bad, x=digits_models.x_test[:50], y=digits_models.y_test[:50] + 1)  # 1..10, not 0..9
    out = tmp_path / "digits.ekb"
    result = edgekit(
        "bundle", "create", str(digits_models.fp32), "--name", "digits", "--version", "1.0.0",
        "--baseline", str(bad), "--calibration-eval", str(bad), "-o", str(out),
    )  # fmt: skip
    assert_one_line_error(result, 7, "labels run from 1 to 10 but the model has 10 classes")
    assert not out.exists()
    unlabeled = tmp_path / "unlabeled.npz"
    np.savez(unlabeled, x=digits_models.x_test[:50])
    result = edgekit(
        "bundle", "create", str(digits_models.fp32), "--name", "digits", "--version", "1.0.0",
        "--baseline", str(unlabeled), "--calibration-eval", str(unlabeled), "-o", str(out),
    )  # fmt: skip
    assert_one_line_error(result, 7, "has no labels")


def test_calibration_is_a_signed_member_checked_like_the_others(digits_models, tmp_path):
    key = SigningKey.generate()
    data = tmp_path / "eval.npz"
    np.savez(data, x=digits_models.x_test[:100], y=digits_models.y_test[:100])
    path = tmp_path / "digits.ekb"
    with pytest.raises(DataError, match="needs --baseline DATA as well"):
        create_bundle(
            digits_models.fp32, name="digits", version="1.0.0", key=key, output=path, calibration_eval=data
        )
    manifest = create_bundle(
        digits_models.fp32,
        name="digits",
        version="1.0.0",
        key=key,
        output=path,
        baseline=data,
        calibration_eval=data,
    )
    entry = manifest.file("calibration")
    assert entry is not None and entry.name == "calibration.json"
    bundle = read_bundle(path, TrustedKeys([key.public]))
    calibration = bundle.calibration()
    assert calibration is not None and calibration.samples == 100 and calibration.classes == 10
    assert bundle.baseline() is not None
    members = tar_members(path.read_bytes())
    doc = json.loads(dict(members)["calibration.json"])
    doc["accuracy"] = 0.99  # a device would report a rosier estimate
    forged = retar([(n, json.dumps(doc).encode() if n == "calibration.json" else d) for n, d in members])
    with pytest.raises(BundleError, match="calibration.json"):
        read_bundle(forged, TrustedKeys([key.public]))
    plain = tmp_path / "plain.ekb"
    create_bundle(digits_models.fp32, name="digits", version="1.0.0", key=key, output=plain)
    assert inspect_bundle(plain)[0].calibration() is None


def test_a_regressor_gets_output_drift_and_no_accuracy_estimate(diabetes_regressor, tmp_path, capsys):
    reg = diabetes_regressor
    key = SigningKey.generate()
    path = tmp_path / "diabetes.ekb"
    create_bundle(reg.fp32, name="diabetes", version="1.0.0", key=key, output=path, baseline=reg.data_npz)
    baseline = read_bundle(path, TrustedKeys([key.public])).baseline()
    assert baseline is not None and baseline.outputs is None
    assert baseline.output_values is not None and baseline.output_values.name == "output.value"

    labeled = tmp_path / "labeled.npz"
    np.savez(labeled, x=reg.x[300:], y=reg.y[300:])
    with pytest.raises(DataError, match="calibration is for classifiers"):
        create_bundle(
            reg.fp32,
            name="diabetes",
            version="1.0.0",
            key=key,
            output=tmp_path / "x.ekb",
            baseline=reg.data_npz,
            calibration_eval=labeled,
        )

    model = Model(reg.fp32.read_bytes(), threads=1)
    held_out = reg.x[300:]

    def window(x: np.ndarray):
        monitor = DriftMonitor(baseline, len(x), 0.1, 0.1)
        for sample in x:
            monitor.add(sample, model.run([sample[None]])[0][0])
        return monitor.report()

    calm = window(held_out)
    assert calm.severity == "ok" and not calm.signals["answers"]
    # Older patients only: a real change of who is measured. The inputs' age and the output
    # values move; the bundle has no calibration: outputs moving with inputs is "model affected".
    age = reg.x[:, 0]
    older = reg.x[age > np.quantile(age, 0.6)]
    shifted = window(older)
    names = {f.name for f in shifted.features if f.drifted}
    assert "feature0" in names
    value = next(f for f in shifted.features if f.name == "output.value")
    assert value.mean is not None and value.baseline_mean is not None
    # Every input feature far off: the output values move and the severity says so.
    far = window(held_out + 2.0)
    assert far.signals["answers"] and far.severity == "model affected"
    assert far.accuracy is None and "classifiers only" in far.summary
