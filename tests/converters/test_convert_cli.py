"""`edgekit convert` as a user runs it: a subprocess, one line per bad input, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, edgekit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("not a model")
    (d / "model.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))
    with zipfile.ZipFile(d / "broken.keras", "w") as z:
        z.writestr("config.json", "{not json")
    (d / "empty_dir").mkdir()
    np.save(d / "wrong_shape.npy", np.zeros((10, 7, 7), dtype=np.float32))
    np.savez(d / "no_labels.npz", x=np.zeros((10, 8, 8, 1), dtype=np.float32))
    np.savez(d / "bad_labels.npz", x=np.zeros((10, 8, 8, 1), dtype=np.float32), y=np.full(10, 42))
    np.save(d / "strings.npy", np.array(["a", "b"]))
    return {p.name: p for p in d.iterdir()}


def test_cli_converts_and_prints_json_with_every_figure(digits_data, tmp_path: Path) -> None:
    out = tmp_path / "digits.tflite"
    report = tmp_path / "report.json"
    result = edgekit(
        "convert", digits_data.model, "-o", out, "--quantize", "int8", "--calibration",
        digits_data.calibration, "--eval", digits_data.test, "--report", report,
        "--max-accuracy-drop", "2", "--latency-runs", "5", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc == json.loads(report.read_text())
    assert doc["gate"] == {"max_accuracy_drop": 2.0, "passed": True}
    assert out.stat().st_size == doc["converted"]["size"]
    for key in ("accuracy", "agreement", "mean_abs_error", "max_abs_error", "size", "gzip_size",
                "latency_ms_median", "latency_ms_p95"):  # fmt: skip
        assert doc["converted"][key] is not None, key
    assert doc["worst_layers"]
    assert "not an ARM figure" in doc["latency_machine"]


def test_cli_table_names_the_figures(digits_data, tmp_path: Path) -> None:
    result = edgekit(
        "convert", digits_data.model, "-o", tmp_path / "m.tflite", "-q", "fp16",
        "--eval", digits_data.test, "--latency-runs", "5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for words in ("file size", "gzip size", "latency median", "accuracy", "top-1 agreement", "wrote"):
        assert words in result.stdout


def test_cli_gate_refuses_with_one_line_and_leaves_no_file(digits_data, tmp_path: Path) -> None:
    out = tmp_path / "refused.tflite"
    result = edgekit(
        "convert", digits_data.model, "-o", out, "-q", "int8", "--calibration", digits_data.calibration,
        "--prune", "99%", "--train", digits_data.train, "--epochs", "1", "--eval", digits_data.test,
        "--max-accuracy-drop", "1", "--latency-runs", "5",
    )  # fmt: skip
    assert_one_line_error(result, "refused", "--max-accuracy-drop 1", "no model written")
    assert result.returncode == 20
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_bundle_is_signed_with_the_default_key(digits_data, tmp_path: Path, edgekit_home: Path) -> None:
    assert edgekit("keys", "init").returncode == 0
    out = tmp_path / "digits.tflite"
    result = edgekit(
        "convert", digits_data.model, "-o", out, "-q", "dynamic", "--baseline", digits_data.unlabelled,
        "--bundle", "digits:2.0.0", "--latency-runs", "5", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["bundle"]["baseline"] is True
    verify = edgekit("bundle", "verify", out.with_suffix(".ekb"), "--json")
    assert verify.returncode == 0, verify.stderr
    assert json.loads(verify.stdout)["version"] == "2.0.0"


# Inputs refused before any model is loaded (fast) and after (data checked against the model).
BAD_INPUTS = [
    ("missing model", ["{nope}/model.keras", "-o", "{tmp}/o.tflite"], ["does not exist", ".keras"]),
    ("unknown format", ["{notes_txt}", "-o", "{tmp}/o.tflite"], ["accepts", ".keras", ".h5", "SavedModel"]),
    ("already tflite", ["{model_tflite}", "-o", "{tmp}/o.tflite"], ["already a TFLite model"]),
    ("dir without saved_model.pb", ["{empty_dir}", "-o", "{tmp}/o.tflite"], ["saved_model.pb"]),
    ("broken .keras", ["{broken_keras}", "-o", "{tmp}/o.tflite"], ["cannot load", "re-save"]),
    ("no output", ["{model}"], ["-o OUT.tflite"]),
    ("unknown mode", ["{model}", "-o", "{tmp}/o.tflite", "-q", "int4"], ["int4", "fp16", "int16x8"]),
    ("int8 without calibration", ["{model}", "-o", "{tmp}/o.tflite", "-q", "int8"], ["--calibration"]),
    ("int16x8 without calibration", ["{model}", "-o", "{tmp}/o.tflite", "-q", "int16x8"], ["--calibration"]),
    ("io int8 on fp16", ["{model}", "-o", "{tmp}/o.tflite", "-q", "fp16", "--io", "int8"], ["--io int8"]),
    ("bad io", ["{model}", "-o", "{tmp}/o.tflite", "--io", "int4"], ["--io", "int8 or float"]),
    ("prune without train", ["{model}", "-o", "{tmp}/o.tflite", "--prune", "0.5"], ["--train"]),
    ("prune out of range", ["{model}", "-o", "{tmp}/o.tflite", "--prune", "1.5", "--train", "{train}"], ["0 and 1"]),
    ("prune not a number", ["{model}", "-o", "{tmp}/o.tflite", "--prune", "lots"], ["not a number"]),
    ("bad pattern", ["{model}", "-o", "{tmp}/o.tflite", "--sparsity-pattern", "1:8"], ["2:4"]),
    ("2:4 with other sparsity", ["{model}", "-o", "{tmp}/o.tflite", "--sparsity-pattern", "2:4", "--prune", "0.7", "--train", "{train}"], ["50%"]),
    ("gate without eval", ["{model}", "-o", "{tmp}/o.tflite", "--max-accuracy-drop", "1"], ["--eval"]),
    ("negative gate", ["{model}", "-o", "{tmp}/o.tflite", "--max-accuracy-drop", "-1", "--eval", "{test}"], ["0 or more"]),
    ("float layers on fp16", ["{model}", "-o", "{tmp}/o.tflite", "-q", "fp16", "--float-layers", "dense"], ["int8 only"]),
    ("bundle spec", ["{model}", "-o", "{tmp}/o.tflite", "--bundle", "digits"], ["NAME:VERSION"]),
    ("bundle without key", ["{model}", "-o", "{tmp}/o.tflite", "--bundle", "digits:1.0.0"], ["keys init"]),
    ("output is .ekb", ["{model}", "-o", "{tmp}/o.ekb"], [".tflite"]),
    ("missing data", ["{model}", "-o", "{tmp}/o.tflite", "--eval", "{nope}/x.npz"], ["--eval", "does not exist"]),
    ("wrong shape", ["{model}", "-o", "{tmp}/o.tflite", "-q", "int8", "--calibration", "{wrong_shape_npy}"], ["(7, 7)", "(8, 8, 1)"]),
    ("strings", ["{model}", "-o", "{tmp}/o.tflite", "--eval", "{strings_npy}"], ["expected numbers"]),
    ("train without labels", ["{model}", "-o", "{tmp}/o.tflite", "--prune", "0.5", "--train", "{no_labels_npz}"], ["no labels"]),
    ("gate without labels", ["{model}", "-o", "{tmp}/o.tflite", "--max-accuracy-drop", "1", "--eval", "{no_labels_npz}"], ["labels"]),
    ("labels out of range", ["{model}", "-o", "{tmp}/o.tflite", "--eval", "{bad_labels_npz}"], ["42", "10 classes"]),
    ("unknown float layer", ["{model}", "-o", "{tmp}/o.tflite", "-q", "int8", "--calibration", "{calibration}", "--float-layers", "nosuchlayer"], ["nosuchlayer"]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "args", "needles"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_cli_answers_every_bad_input_with_one_line(
    case: str, args: list[str], needles: list[str], digits_data, bad_files, tmp_path: Path
) -> None:
    names = {
        **{k.replace(".", "_"): str(v) for k, v in bad_files.items()},
        "model": str(digits_data.model),
        "train": str(digits_data.train),
        "test": str(digits_data.test),
        "calibration": str(digits_data.calibration),
        "tmp": str(tmp_path),
        "nope": str(tmp_path / "nope"),
    }
    argv = [a.format(**names) for a in args]
    result = edgekit("convert", *argv)
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "o.tflite").exists()


def test_importing_the_cli_does_not_import_tensorflow() -> None:
    code = "import sys, edgekit.cli, edgekit.converters; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_cli_reports_an_unwritable_output_in_one_line(digits_data, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    result = edgekit("convert", digits_data.model, "-o", blocker / "o.tflite", "--latency-runs", "2")
    assert_one_line_error(result, "cannot write -o")
