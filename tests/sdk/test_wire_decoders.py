"""The wire schemas read through the one strict decoder (edgekit.schema): what a hand-written
json.loads let through (NaN, Infinity, numbers as strings, unknown fields where the schema is
closed, a wrong schema_version) is refused with the decoder's own error and one line."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Callable

import pytest
from edgekit.capture import CaptureAck
from edgekit.desired import DesiredState, new_desired_state
from edgekit.errors import BundleError, CaptureError, DesiredStateError
from edgekit.manifest import ChunkPlan, FileEntry, HealthCheckSpec, Manifest
from edgekit.tflite import TensorSpec

DIGEST = hashlib.sha256(b"model").hexdigest()


def a_manifest() -> Manifest:
    return Manifest(
        name="digits",
        version="1.0.0",
        created_at="2026-01-01T00:00:00Z",
        signer="a" * 64,
        files=(
            FileEntry("model.tflite", "model", 2000, DIGEST),
            FileEntry("hc.npz", "healthcheck", 10, DIGEST),
        ),
        inputs=(TensorSpec("x", 0, (1, 28, 28), "float32", shape_signature=(-1, 28, 28)),),
        outputs=(
            TensorSpec("y", 5, (1, 10), "int8", scale=(0.5,), zero_point=(-128,), shape_signature=(1, 10)),
        ),
        ops=("FULLY_CONNECTED", "SOFTMAX"),
        chunks=ChunkPlan(1024, 2010, (DIGEST, DIGEST)),
        healthcheck=HealthCheckSpec("hc.npz", 4, 1e-3, 1e-2),
        preprocessing={"scale": 0.5},
    )


def edited(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``doc`` with the field at ``path`` (dots, list indexes) set to ``value`` (or removed)."""
    doc = json.loads(json.dumps(doc))
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) else last
    if value is REMOVE:
        del node[key]
    else:
        node[key] = value
    return doc


REMOVE = object()


def test_a_manifest_round_trips_through_the_strict_decoder_byte_for_byte():
    manifest = a_manifest()
    data = manifest.to_json()
    assert Manifest.from_json(data) == manifest
    assert Manifest.from_json(data).to_json() == data  # what is signed does not change


@pytest.mark.parametrize(
    "raw, words",
    [
        (b'"healthcheck": {"atol": NaN', "not valid JSON"),
        (b'"healthcheck": {"atol": Infinity', "not valid JSON"),
        (b'"healthcheck": {"atol": 1e999', "not valid JSON"),
    ],
)
def test_a_manifest_with_nan_or_infinity_is_refused(raw, words):
    data = a_manifest().to_json().replace(b'"healthcheck": {\n    "atol": 0.001', raw)
    assert raw in data
    with pytest.raises(BundleError, match=words) as refused:
        Manifest.from_json(data)
    assert "\n" not in str(refused.value) and str(refused.value).endswith("the bundle is corrupt")


@pytest.mark.parametrize(
    "path, value, words",
    [
        ("healthcheck.samples", "4", "'samples' must be an integer"),
        ("healthcheck.atol", -1, "'atol' must be a finite number"),
        ("healthcheck", [], "'healthcheck' must be an object"),
        ("files.0.size", 2000.0, "invalid size 2000.0"),
        ("files.0.size", True, "invalid size True"),
        ("files.0.sha256", DIGEST.upper(), "invalid SHA-256"),
        ("files", {}, "'files' must be a list"),
        ("model.ops", ["FULLY_CONNECTED", 7], "'ops' must be a list of operator names"),
        ("model.inputs.0.shape", [1, "28", 28], "'shape' must be a list"),
        ("model.outputs.0.quantization.scale", ["nan"], "'scale' must be a list"),
        ("model.outputs.0.name", None, "'name' must be a string"),
        ("model.tflite_schema_version", "3", "'tflite_schema_version' must be an integer"),
        ("transport.chunk_size", "1024", "invalid chunk size '1024'"),
        ("transport.total_size", REMOVE, "chunk plan does not match"),
        ("transport", REMOVE, "'transport' must be an object"),
        ("model", REMOVE, "'model' must be an object"),
        ("schema_version", True, "schema version True is not supported"),
        ("schema_version", 2, "schema version 2 is not supported"),
        ("created_at", 5, "created_at and min_agent_version must be strings"),
        ("preprocessing", None, "preprocessing must be an object"),
    ],
)
def test_a_manifest_with_a_wrong_type_or_missing_field_is_refused_in_one_line(path, value, words):
    doc = edited(a_manifest().to_dict(), path, value)
    with pytest.raises(BundleError, match=words) as refused:
        Manifest.from_json(json.dumps(doc).encode())
    assert "\n" not in str(refused.value)


def test_unknown_manifest_fields_are_ignored_as_the_schema_says():
    """The signature covers the bytes; a field this edgekit does not know changes nothing it reads."""
    doc = {**a_manifest().to_dict(), "comment": "from the future"}
    assert Manifest.from_json(json.dumps(doc).encode()) == a_manifest()


def a_desired_doc() -> dict[str, Any]:
    return new_desired_state(
        "shop", bundle_sha256=DIGEST, bundle_name="digits", bundle_version="1.0.0", seq=3, now=1_800_000_000
    ).to_dict()


@pytest.mark.parametrize(
    "payload, words",
    [
        (b'{"schema": "edgekit.desired", "schema_version": 1, "seq": NaN}', "not valid JSON"),
        (b'{"schema": "edgekit.desired", "schema_version": 1, "seq": Infinity}', "not valid JSON"),
        (b'{"schema": "edgekit.desired", "schema_version": 1, "seq": 1e400}', "not valid JSON"),
        (b"\xff{}", "not valid JSON"),
    ],
)
def test_a_desired_state_with_nan_infinity_or_bad_bytes_is_refused(payload, words):
    with pytest.raises(DesiredStateError, match=words) as refused:
        DesiredState.from_json(payload)
    assert refused.value.reason == "malformed"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "path, value, words",
    [
        ("seq", 3.0, "seq must be an integer"),
        ("seq", True, "seq must be an integer"),
        ("schema_version", 1.0, "schema version 1.0 is not supported"),
        ("bundle", ["x"], "bundle must have sha256, name and version"),
        ("bundle.extra", 1, "bundle must have sha256, name and version"),
        ("bundle.sha256", REMOVE, "bundle must have sha256, name and version"),
        ("bundle.sha256", 5, "sha256 is not 64 lowercase hex"),
        ("extra", 1, "must have exactly the fields"),
        ("device", REMOVE, "must have exactly the fields"),
    ],
)
def test_a_desired_state_with_a_wrong_type_unknown_or_missing_field_is_refused(path, value, words):
    doc = edited(a_desired_doc(), path, value)
    with pytest.raises(DesiredStateError, match=words) as refused:
        DesiredState.from_json(json.dumps(doc).encode())
    assert refused.value.reason == "malformed"  # type: ignore[attr-defined]


def test_a_desired_state_keeps_its_canonical_bytes():
    doc = a_desired_doc()
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert DesiredState.from_json(data).to_json() == data


@pytest.mark.parametrize(
    "shadow, words",
    [
        ({"sample": float("inf")}, "not valid JSON"),
        ({"sample": "0.5"}, "sample rate must be a number"),
        ({"sample": 0}, "sample rate must be a number"),
        ({"extra": 1}, "shadow section must have exactly the fields"),
    ],
)
def test_a_shadow_section_is_decoded_as_strictly(shadow, words):
    section = {
        "sha256": DIGEST,
        "name": "digits",
        "version": "2.0.0",
        "sample": 0.5,
        "until": "2027-01-01T00:00:00Z",
    }
    doc = {**a_desired_doc(), "shadow": {**section, **shadow}}
    with pytest.raises(DesiredStateError, match=words):
        DesiredState.from_json(json.dumps(doc).encode())  # json.dumps writes Infinity


def message_of(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: {**d, "schema_version": 1.0}, "version 1.0 is not supported"),
        (lambda d: {**d, "schema_version": True}, "version True is not supported"),
        (lambda d: {**d, "manifest": 5}, r"malformed \(no manifest\)"),
        (lambda d: {k: v for k, v in d.items() if k != "signature"}, r"malformed \(no signature\)"),
        (lambda d: {**d, "signature": "é"}, "malformed"),
    ],
)
def test_a_manifest_message_with_wrong_types_is_refused(edit: Callable[[dict], dict], words: str):
    from edgekit.keys import SigningKey
    from edgekit.transfer import MANIFEST_MESSAGE_SCHEMA, MANIFEST_MESSAGE_VERSION, verify_manifest_message
    from edgekit.trust import TrustedKeys

    good = {
        "schema": MANIFEST_MESSAGE_SCHEMA,
        "schema_version": MANIFEST_MESSAGE_VERSION,
        "manifest": base64.b64encode(b"{}").decode(),
        "signature": base64.b64encode(bytes(64)).decode(),
    }
    with pytest.raises(BundleError, match=words) as refused:
        verify_manifest_message(message_of(edit(good)), TrustedKeys([SigningKey.generate().public]), DIGEST)
    assert refused.value.reason == "malformed"  # type: ignore[attr-defined]
    nan = message_of(good).replace(b'"schema_version": 1', b'"schema_version": NaN')
    with pytest.raises(BundleError, match="malformed"):
        verify_manifest_message(nan, TrustedKeys([SigningKey.generate().public]), DIGEST)


def test_a_capture_ack_round_trips_and_refuses_what_it_does_not_know():
    for ack in (CaptureAck("cam-1", (3, 4)), CaptureAck("cam-1", drop_all=True)):
        assert CaptureAck.from_json(ack.to_json()) == ack
    good = json.loads(CaptureAck("cam-1", (3,)).to_json())
    for doc in (
        {**good, "seqs": [3.0]},
        {**good, "seqs": [True]},
        {**good, "seqs": [-1]},
        {**good, "seqs": "3"},
        {**good, "drop_all": "yes"},
        {**good, "device": "../x"},
        {**good, "schema_version": 2},
        {k: v for k, v in good.items() if k != "seqs"},
    ):
        with pytest.raises(CaptureError) as refused:
            CaptureAck.from_json(json.dumps(doc).encode())
        assert refused.value.reason == "malformed"  # type: ignore[attr-defined]
    with pytest.raises(CaptureError, match="not JSON"):
        CaptureAck.from_json(b'{"schema": "edgekit.capture_ack", "schema_version": 1, "seqs": [NaN]}')
