"""`edgekit.converters.convert`: every quantization mode, the accuracy gate, pruning that survives
into the .tflite, bundles with a drift baseline. Real Keras models, real TFLite runtimes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from edgekit import SigningKey, TrustedKeys, read_bundle
from edgekit.converters import ConvertOptions, convert, weight_sparsity
from edgekit.errors import AccuracyGateError
from edgekit.tflite import constant_tensors, inspect_tflite

pytestmark = pytest.mark.slow


def tensor_dtypes(content: bytes) -> set[str]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    return {np.dtype(d["dtype"]).name for d in interpreter.get_tensor_details()}


def kernel(content: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """The constant tensor of ``shape`` (the digits CNN's dense kernel is (10, 288))."""
    for spec, raw in constant_tensors(content):
        if spec.shape == shape:
            return np.frombuffer(raw, dtype=np.dtype(spec.dtype)).reshape(shape)
    raise AssertionError(f"no constant tensor of shape {shape}")


@pytest.fixture
def options(digits_data, tmp_path: Path) -> ConvertOptions:
    return ConvertOptions(
        model=digits_data.model,
        output=tmp_path / "out.tflite",
        calibration=digits_data.calibration,
        eval=digits_data.test,
        latency_runs=5,
    )


@pytest.mark.parametrize(
    ("mode", "io", "input_dtype", "weights_dtype"),
    [
        ("fp32", None, "float32", "float32"),
        ("fp16", None, "float32", "float16"),
        ("dynamic", None, "float32", "int8"),
        ("int8", None, "int8", "int8"),
        ("int8", "float", "float32", "int8"),
        ("int16x8", None, "float32", "int8"),
    ],
)
def test_every_mode_converts_and_is_measured_against_the_float_reference(
    options: ConvertOptions, mode: str, io: str | None, input_dtype: str, weights_dtype: str
) -> None:
    report = convert(replace(options, quantize=mode, io=io))
    content = options.output.read_bytes()
    info = inspect_tflite(content)
    assert info.inputs[0].dtype == input_dtype
    assert info.outputs[0].dtype == input_dtype
    assert kernel(content, (10, 288)).dtype == np.dtype(weights_dtype)
    if mode == "int16x8":
        assert "int16" in tensor_dtypes(content)
    doc = json.loads(report.to_json())
    assert doc["output"] == {"path": str(options.output), "written": True}
    assert doc["converted"]["size"] == len(content)
    assert doc["reference"]["accuracy"] > 0.7
    assert doc["converted"]["samples"] == doc["reference"]["samples"] > 300
    assert doc["converted"]["agreement"] >= 0.95
    assert doc["accuracy_drop_points"] <= 3.0
    assert doc["converted"]["latency_ms_p95"] >= doc["converted"]["latency_ms_median"] > 0
    assert doc["converted"]["gzip_size"] < doc["converted"]["size"]
    if mode == "fp32":
        assert doc["converted"]["max_abs_error"] == 0.0
    else:
        assert doc["size_ratio"] < 0.7
        assert doc["converted"]["max_abs_error"] > 0.0
    if mode == "int8":
        worst = doc["worst_layers"]
        assert worst and worst[0]["rmse_over_scale"] >= worst[-1]["rmse_over_scale"]
        assert {w["op"] for w in worst} & {"CONV_2D", "FULLY_CONNECTED"}


def test_int8_io_values_are_quantized_with_the_reported_scale(options: ConvertOptions) -> None:
    convert(replace(options, quantize="int8"))
    spec = inspect_tflite(options.output.read_bytes()).inputs[0]
    assert spec.quantized and spec.scale[0] > 0


def test_float_layers_stay_float_in_an_int8_model(options: ConvertOptions) -> None:
    report = convert(replace(options, quantize="int8", float_layers=("dense",)))
    content = options.output.read_bytes()
    assert kernel(content, (10, 288)).dtype == np.float32  # the dense layer kept float
    assert kernel(content, (8, 3, 3, 1)).dtype == np.int8  # the convolution is still int8
    assert report.io == "float"
    assert inspect_tflite(content).inputs[0].dtype == "float32"


def test_gate_accepts_a_model_within_the_allowed_drop(options: ConvertOptions, tmp_path: Path) -> None:
    report = convert(replace(options, quantize="fp16", max_accuracy_drop=1.0, report=tmp_path / "r.json"))
    assert report.gate_passed is True
    assert options.output.exists()
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["gate"] == {"max_accuracy_drop": 1.0, "passed": True}


def test_gate_refuses_a_model_that_loses_too_much_and_writes_no_model(
    options: ConvertOptions, digits_data, tmp_path: Path
) -> None:
    import keras

    keras.utils.set_random_seed(0)
    report_path = tmp_path / "refused.json"
    refused = replace(
        options,
        quantize="int8",
        prune=0.99,
        train=digits_data.train,
        epochs=1,
        max_accuracy_drop=1.0,
        report=report_path,
        bundle="digits:1.0.0",
    )
    with pytest.raises(AccuracyGateError, match=r"refused: the int8 model loses .* no model written"):
        convert(refused, signing_key=SigningKey.generate())
    assert not options.output.exists()
    assert not options.output.with_suffix(".ekb").exists()
    doc = json.loads(report_path.read_text())
    assert doc["gate"]["passed"] is False
    assert doc["accuracy_drop_points"] > 1.0
    assert doc["output"]["written"] is False


@pytest.fixture(scope="module")
def pruned_int8(digits_data, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pruned") / "pruned.tflite"
    report = convert(
        ConvertOptions(
            model=digits_data.model,
            output=out,
            quantize="int8",
            calibration=digits_data.calibration,
            prune=0.75,
            train=digits_data.train,
            epochs=3,
            eval=digits_data.test,
            latency_runs=5,
        )
    )
    return out, report.to_dict()


def test_pruned_sparsity_is_present_in_the_tflite_file(pruned_int8: tuple[Path, dict]) -> None:
    path, doc = pruned_int8
    dense = kernel(path.read_bytes(), (10, 288))
    assert np.mean(dense == 0) >= 0.75
    assert doc["pruning"]["layers"][0]["sparsity"] == pytest.approx(0.75, abs=0.001)
    assert doc["pruning"]["dense_layers"] == ["conv2d"]  # 72 weights: below the pruning minimum
    zeros, total = weight_sparsity(path.read_bytes())
    assert doc["converted"]["weight_sparsity"] == pytest.approx(zeros / total)
    assert doc["converted"]["gzip_size"] < doc["converted"]["size"] * 0.8


@pytest.fixture(scope="module")
def pruned_keras(digits_data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits CNN pruned to 75% (unstructured) and saved, to convert in every mode."""
    import keras
    from edgekit.converters import prune_model

    model = keras.models.load_model(digits_data.model)
    with np.load(digits_data.train) as train:
        prune_model(model, train["x"], train["y"], 0.75, epochs=2)
    path = tmp_path_factory.mktemp("pruned-keras") / "pruned.keras"
    model.save(path)
    return path


@pytest.mark.parametrize("mode", ["fp32", "fp16", "dynamic", "int8", "int16x8"])
def test_pruning_survives_every_quantization_mode(
    pruned_keras: Path, options: ConvertOptions, mode: str
) -> None:
    convert(replace(options, model=pruned_keras, quantize=mode, eval=None))
    dense = kernel(options.output.read_bytes(), (10, 288))
    assert np.mean(dense == 0) >= 0.75


def test_two_four_sparsity_keeps_two_of_every_four_weights(options: ConvertOptions, digits_data) -> None:
    report = convert(
        replace(options, quantize="int8", sparsity_pattern="2:4", train=digits_data.train, epochs=1)
    )
    dense = kernel(options.output.read_bytes(), (10, 288))  # (out, in): groups run along `in`
    nonzero_per_group = np.count_nonzero(dense.reshape(10, -1, 4), axis=2)
    assert nonzero_per_group.max() <= 2
    assert report.pruning is not None and report.pruning.pattern == "2:4"
    assert report.pruning.sparsity == pytest.approx(0.5)


def test_bundle_carries_the_model_and_a_baseline_from_the_calibration_data(
    options: ConvertOptions,
) -> None:
    key = SigningKey.generate()
    report = convert(replace(options, quantize="int8", bundle="digits:1.2.0"), signing_key=key)
    bundle = read_bundle(options.output.with_suffix(".ekb"), TrustedKeys([key.public]))
    assert bundle.manifest.name == "digits" and bundle.manifest.version == "1.2.0"
    assert bundle.model == options.output.read_bytes()
    baseline = bundle.baseline()
    assert baseline is not None and baseline.samples == 200  # calibration.npy holds 200 samples
    assert report.bundle is not None and report.bundle["bundle_id"] == bundle.bundle_id
    assert report.bundle["baseline"] is True and report.baseline_source == str(options.calibration)


def test_saved_model_directories_convert(options: ConvertOptions, tmp_path: Path) -> None:
    import keras

    model = keras.models.load_model(options.model)
    saved = tmp_path / "saved"
    model.export(str(saved), verbose=False)
    report = convert(replace(options, model=saved, quantize="dynamic"))
    assert report.source_format == "saved_model"
    assert report.accuracy_drop is not None and report.accuracy_drop <= 2.0


def test_legacy_h5_files_convert(options: ConvertOptions, tmp_path: Path) -> None:
    import keras

    model = keras.models.load_model(options.model)
    h5 = tmp_path / "digits.h5"
    model.save(h5)
    report = convert(replace(options, model=h5, quantize="fp16"))
    assert report.source_format == "h5"
    assert report.converted.agreement == 1.0


def test_a_folder_of_images_is_eval_data_with_labels_from_class_folders(
    options: ConvertOptions, tmp_path: Path
) -> None:
    from PIL import Image

    with np.load(options.eval) as test:  # type: ignore[arg-type]
        x, y = test["x"][:60], test["y"][:60]
    folder = tmp_path / "images"
    for i, (image, label) in enumerate(zip(x, y)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        # Saved at 16x16: the loader resizes to the model's 8x8 input.
        big = Image.fromarray((image[..., 0] * 255).round().astype(np.uint8)).resize((16, 16))
        big.save(folder / str(label) / f"{i}.png")
    report = convert(replace(options, quantize="fp16", eval=folder))
    assert report.converted.samples == 60
    assert report.reference.accuracy is not None and report.reference.accuracy > 0.6
