"""The .tflite reader agrees with the interpreter, and never crashes on garbage."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from edgekit import ModelFormatError, inspect_tflite
from edgekit.runtime import Model
from edgekit.tflite import constant_tensors
from fuzz_targets import model_without_subgraphs
from hypothesis import given, settings
from hypothesis import strategies as st


def _agrees_with_interpreter(data: bytes) -> None:
    info = inspect_tflite(data)
    model = Model(data)
    for specs, details in ((info.inputs, model.input_details), (info.outputs, model.output_details)):
        assert len(specs) == len(details)
        for spec, detail in zip(specs, details):
            assert spec.name == detail["name"]
            assert spec.index == detail["index"]
            assert spec.shape == tuple(int(v) for v in detail["shape"])
            assert spec.shape_signature == tuple(int(v) for v in detail["shape_signature"])
            assert spec.dtype == np.dtype(detail["dtype"]).name
            params = detail["quantization_parameters"]
            assert spec.scale == pytest.approx(tuple(float(v) for v in params["scales"]))
            assert spec.zero_point == tuple(int(v) for v in params["zero_points"])


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_reader_matches_the_interpreter_on_digits_models(digits_models, variant):
    _agrees_with_interpreter(getattr(digits_models, variant).read_bytes())


def test_reader_matches_the_interpreter_on_a_third_party_model(third_party_tflite):
    _agrees_with_interpreter(third_party_tflite.read_bytes())


def test_a_model_loaded_from_its_file_runs_as_the_same_model_loaded_from_bytes(digits_models):
    path = digits_models.int8
    from_file, from_bytes = Model(path), Model(path.read_bytes())
    inputs = [np.ones(d["shape"], d["dtype"]) for d in from_bytes.input_details]
    assert [o.tolist() for o in from_file.run(inputs)] == [o.tolist() for o in from_bytes.run(inputs)]


def test_a_missing_model_file_is_a_model_format_error(tmp_path):
    with pytest.raises(ModelFormatError, match="cannot load the model"):
        Model(tmp_path / "gone.tflite")


def test_op_list_and_constants_of_the_int8_model(digits_models):
    data = digits_models.int8.read_bytes()
    info = inspect_tflite(data)
    assert {"CONV_2D", "FULLY_CONNECTED", "SOFTMAX", "RESHAPE"} <= set(info.ops)
    weights = {spec.name: raw for spec, raw in constant_tensors(data) if spec.dtype == "int8"}
    # Conv2D(8, 3x3x1) and Dense(10 from 6*6*8) weights are stored as int8 constants.
    assert sorted(len(raw) for raw in weights.values())[-2:] == [8 * 9, 10 * 288]


def test_non_tflite_bytes_are_refused_with_a_clear_error():
    with pytest.raises(ModelFormatError, match="not a TFLite model"):
        inspect_tflite(b"PK\x03\x04 this is a zip")


def test_truncated_models_are_refused(digits_models):
    data = digits_models.fp32.read_bytes()
    for cut in (8, 16, 64, len(data) // 2):
        with pytest.raises(ModelFormatError):
            inspect_tflite(data[:cut])


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_fuzzed_models_raise_only_model_format_errors(digits_models, data):
    raw = bytearray(digits_models.int8.read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(0, min(len(raw) - 1, 4096)))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ModelFormatError):
        inspect_tflite(bytes(raw))


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(min_size=8, max_size=512))
def test_arbitrary_bytes_with_the_identifier_raise_only_model_format_errors(blob):
    with contextlib.suppress(ModelFormatError):
        inspect_tflite(blob[:4] + b"TFL3" + blob[8:])


def test_a_model_without_subgraphs_is_refused_by_every_reader():
    """Found in review: constant_tensors raised IndexError on it; both readers raise the typed error."""
    data = model_without_subgraphs()
    with pytest.raises(ModelFormatError, match="no subgraph"):
        inspect_tflite(data)
    with pytest.raises(ModelFormatError, match="no subgraph"):
        list(constant_tensors(data))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fuzzed_models_raise_only_model_format_errors_from_constant_tensors(digits_models, data):
    raw = bytearray(digits_models.int8.read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ModelFormatError):
        list(constant_tensors(bytes(raw)))
