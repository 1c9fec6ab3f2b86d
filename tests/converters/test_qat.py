"""Quantization-aware training (``convert --quantize int8 --qat``) on the digits CNN and on a
MobileNet-style model (depthwise blocks, batch normalization, a residual add)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgekit.errors import ConfigError
from helpers import assert_one_line_error, edgekit

pytestmark = pytest.mark.slow


@pytest.fixture
def options(digits_data: Any, tmp_path: Path) -> Any:
    from edgekit.converters import ConvertOptions

    return ConvertOptions(
        model=digits_data.model,
        output=tmp_path / "qat.tflite",
        quantize="int8",
        calibration=digits_data.calibration,
        train=digits_data.train,
        qat=True,
        epochs=1,
        eval=digits_data.test,
        latency_runs=3,
    )


def test_qat_reports_post_training_int8_beside_it(options: Any) -> None:
    from edgekit.converters import convert

    doc = convert(options).to_dict()
    qat = doc["qat"]
    assert qat["epochs"] == 1 and qat["kernels"] == 2 and qat["fake_quant_points"] == 1
    assert qat["ptq"]["accuracy"] is not None and qat["ptq_accuracy_drop_points"] is not None
    assert doc["converted"]["accuracy"] >= doc["reference"]["accuracy"] - 0.03
    assert Path(doc["output"]["path"]).stat().st_size == doc["converted"]["size"]
    assert doc["calibration_data"] == str(options.calibration)  # --calibration wins over --train


def test_cli_qat_with_train_only_calibrates_from_the_training_data(digits_data: Any, tmp_path: Path) -> None:
    """The issue's form, `convert MODEL --quantize int8 --qat --train DATA`: no --calibration."""
    out, report = tmp_path / "qat.tflite", tmp_path / "report.json"
    result = edgekit(
        "convert", digits_data.model, "-o", out, "--quantize", "int8", "--qat", "--train", digits_data.train,
        "--epochs", "1", "--eval", digits_data.test, "--latency-runs", "3", "--report", report,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"int8 ranges calibrated from {digits_data.train}" in " ".join(result.stdout.split())
    doc = json.loads(report.read_text())
    assert doc["calibration_data"] == str(digits_data.train)
    assert doc["quantize"] == "int8" and doc["qat"]["epochs"] == 1 and doc["output"]["written"]
    assert doc["converted"]["accuracy"] >= doc["reference"]["accuracy"] - 0.03
    assert out.stat().st_size == doc["converted"]["size"]


def _mobilenet_style(classes: int = 10) -> Any:
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU(6.0)(x)
    shortcut = x
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU(6.0)(x)
    x = layers.Conv2D(16, 1, use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.Add()([x, shortcut])
    x = layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2)(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(classes, activation="softmax")(x))


def test_mobilenet_style_int8_model_agrees_with_its_quantization_aware_keras_model(digits_data: Any) -> None:
    import keras
    from edgekit.converters import fake_quantized, quantization_aware_training
    from edgekit.converters.evaluate import model_outputs
    from edgekit.converters.load import SourceModel
    from edgekit.converters.quantize import quantize

    with np.load(digits_data.train) as train:
        x, y = train["x"], train["y"]
    with np.load(digits_data.test) as test:
        x_test = test["x"]
    model = _mobilenet_style()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=6, batch_size=32, verbose=0)
    result = quantization_aware_training(model, x, y, x[:300], epochs=1)
    # Quantized on their own: the two ReLUs before the add, the 1x1 conv (its BN fused) and the
    # add that sum them, the last ReLU (its depthwise conv fused), the average. Not the output.
    assert result.fake_quant_points == 6 and result.kernels == 5
    expected = np.asarray(fake_quantized(model, x[:300]).predict(x_test, verbose=0))
    source = SourceModel(path=Path("m.keras"), format="keras", keras=model)
    try:
        content = quantize(source.saved_model_dir(), "int8", "float", x[:300])
    finally:
        source.close()
    outputs = model_outputs(content, x_test)
    assert float(np.abs(outputs - expected).mean()) < 0.01
    assert float(np.mean(outputs.argmax(axis=1) == expected.argmax(axis=1))) >= 0.97
    with np.load(digits_data.test) as test:
        assert float(np.mean(outputs.argmax(axis=1) == test["y"])) >= 0.7  # a trained model, not noise


def test_qat_refuses_layers_it_cannot_handle_naming_them() -> None:
    import keras
    from edgekit.converters.qat import check_qat_layers

    model = keras.Sequential(
        [keras.Input((8, 8)), keras.layers.LSTM(4, name="memory"), keras.layers.Dense(3, name="classes")]
    )
    with pytest.raises(ConfigError, match=r"--qat cannot handle memory \(LSTM\); convert without --qat"):
        check_qat_layers(model)


# fmt: off
BAD_QAT = [
    ("qat without int8", ["-q", "fp16", "--qat", "--train", "{train}"], ["--qat", "--quantize int8"]),
    ("qat without train", ["-q", "int8", "--calibration", "{calibration}", "--qat"], ["--qat needs --train"]),
    ("qat without train or calibration", ["-q", "int8", "--qat"], ["--qat needs --train"]),
    ("int8 without calibration or qat", ["-q", "int8"], ["--quantize int8 needs --calibration"]),
    ("qat with prune", ["-q", "int8", "--calibration", "{calibration}", "--qat", "--train", "{train}", "--prune", "0.5"], ["--prune"]),
    ("train without qat or prune", ["-q", "int8", "--calibration", "{calibration}", "--train", "{train}"], ["--qat"]),
]
# fmt: on


@pytest.mark.parametrize(("case", "args", "needles"), BAD_QAT, ids=[c[0] for c in BAD_QAT])
def test_cli_answers_bad_qat_flags_with_one_line(
    case: str, args: list[str], needles: list[str], digits_data: Any, tmp_path: Path
) -> None:
    names = {"train": str(digits_data.train), "calibration": str(digits_data.calibration)}
    out = tmp_path / "o.tflite"
    result = edgekit("convert", digits_data.model, "-o", out, *[a.format(**names) for a in args])
    assert_one_line_error(result, *needles)
    assert not out.exists()


def test_qat_on_a_saved_model_is_refused(options: Any, tmp_path: Path) -> None:
    import keras
    from edgekit.converters import convert

    saved = tmp_path / "saved"
    keras.models.load_model(options.model).export(str(saved), verbose=False)
    with pytest.raises(ConfigError, match="--qat needs a Keras model"):
        convert(replace(options, model=saved))
