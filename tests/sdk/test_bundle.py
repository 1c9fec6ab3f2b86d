"""Bundles: round trips on real models, and refusal of every kind of tampering."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from edgekit import (
    BundleError,
    SignatureError,
    SigningKey,
    TrustedKeys,
    UntrustedKeyError,
    create_bundle,
    inspect_bundle,
    read_bundle,
)
from edgekit.baseline import Baseline
from edgekit.healthcheck import run_healthcheck
from edgekit.runtime import Model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("\n".join(f"digit-{i}" for i in range(10)) + "\n")
    return path


@pytest.fixture(scope="module")
def good_bundle(
    digits_models, key: SigningKey, labels: Path, tmp_path_factory: pytest.TempPathFactory
) -> bytes:
    out = tmp_path_factory.mktemp("bundles") / "digits.ekb"
    create_bundle(
        digits_models.fp32,
        name="digits",
        version="1.0.0",
        key=key,
        output=out,
        labels=labels,
        baseline=digits_models.data_npz,
        chunk_size=4096,
    )
    return out.read_bytes()


def members_of(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive.getmembers()]  # type: ignore[union-attr]


def retar(members: list[tuple[str, bytes]], kinds: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if kinds and name in kinds:
                info.type = kinds[name]
                info.linkname = "/etc/passwd"
                info.size = 0
                data = b""
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def replace_member(data: bytes, name: str, content: bytes) -> bytes:
    return retar([(n, content if n == name else d) for n, d in members_of(data)])


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_round_trip_on_digits_models(digits_models, key, trusted, labels, variant, tmp_path):
    model_path = getattr(digits_models, variant)
    out = tmp_path / f"digits-{variant}.ekb"
    manifest = create_bundle(
        model_path,
        name="digits",
        version="1.2.3",
        key=key,
        output=out,
        labels=labels,
        baseline=digits_models.data_npz,
    )
    bundle = read_bundle(out, trusted)
    assert bundle.signer == key.key_id
    assert bundle.manifest == manifest
    assert bundle.model == model_path.read_bytes()
    assert bundle.labels() == [f"digit-{i}" for i in range(10)]
    assert {f.name for f in manifest.files} == {
        "model.tflite",
        "labels.txt",
        "baseline.json",
        "healthcheck.npz",
    }

    # The manifest's signature matches what the interpreter itself reports.
    model = Model(bundle.model)
    (detail,) = model.input_details
    (spec,) = manifest.inputs
    assert spec.shape == tuple(detail["shape"]) and spec.dtype == np.dtype(detail["dtype"]).name
    assert spec.name == detail["name"]
    if variant == "int8":
        assert spec.dtype == "int8" and spec.quantized
        assert spec.scale[0] == pytest.approx(detail["quantization"][0])
        assert spec.zero_point[0] == detail["quantization"][1]
    else:
        assert spec.dtype == "float32" and not spec.quantized
    assert "CONV_2D" in manifest.ops and "FULLY_CONNECTED" in manifest.ops

    # The health check replays on a fresh interpreter, and catches a different model.
    hc = bundle.member("healthcheck")
    assert hc is not None and manifest.healthcheck is not None
    assert (
        run_healthcheck(model, hc, manifest.healthcheck, manifest.inputs, manifest.outputs)
        <= manifest.healthcheck.atol
    )

    baseline = bundle.baseline()
    assert isinstance(baseline, Baseline) and baseline.kind == "image"
    assert baseline.samples == len(digits_models.x_test)
    assert baseline.outputs is not None and baseline.outputs.classes == 10
    assert sum(baseline.outputs.class_counts) == baseline.samples


def test_a_baseline_with_infinite_negative_or_fractional_counts_is_one_bundle_error():
    """Found by the fuzz target (an OverflowError escaped on Infinity): baseline.json is strict
    JSON, and its counts are non-negative integers."""
    good = {
        "schema": "edgekit.baseline",
        "schema_version": 1,
        "kind": "vector",
        "samples": 3,
        "features": [{"name": "x0", "cuts": [0.5], "counts": [1, 2], "mean": 0.4, "std": 0.1}],
        "outputs": {"classes": 2, "class_counts": [1, 2], "confidence_counts": [3]},
    }
    assert Baseline.from_json(json.dumps(good).encode()).outputs is not None
    for bad in ("Infinity", "NaN", "-1", "1.5", '"2"'):
        text = json.dumps(good).replace('"class_counts": [1, 2]', f'"class_counts": [1, {bad}]')
        with pytest.raises(BundleError, match="baseline.json is malformed"):
            Baseline.from_json(text.encode())


def test_health_check_detects_another_model(digits_models, key, trusted, tmp_path):
    from edgekit.errors import HealthCheckError

    out = tmp_path / "a.ekb"
    create_bundle(digits_models.fp32, name="digits", version="1.0.0", key=key, output=out)
    bundle = read_bundle(out, trusted)
    other = tmp_path / "b.ekb"
    create_bundle(digits_models.int8, name="digits", version="1.0.0", key=key, output=other)
    int8_bundle = read_bundle(other, trusted)
    m = int8_bundle.manifest
    hc = int8_bundle.member("healthcheck")
    assert hc is not None and m.healthcheck is not None
    # The fp32 model fed the int8 model's recorded (int8) inputs cannot reproduce its outputs.
    with pytest.raises((HealthCheckError, ValueError)):
        run_healthcheck(Model(bundle.model), hc, m.healthcheck, m.inputs, m.outputs)


def test_round_trip_on_third_party_model(third_party_tflite, key, trusted, tmp_path):
    out = tmp_path / "face.ekb"
    manifest = create_bundle(third_party_tflite, name="face-detector", version="0.10.14", key=key, output=out)
    bundle = read_bundle(out, trusted)
    assert bundle.model == third_party_tflite.read_bytes()
    model = Model(bundle.model)
    assert [spec.shape for spec in manifest.inputs] == [tuple(d["shape"]) for d in model.input_details]
    assert [spec.name for spec in manifest.outputs] == [d["name"] for d in model.output_details]
    assert len(manifest.outputs) == 2
    assert "DEPTHWISE_CONV_2D" in manifest.ops
    assert len(bundle.manifest.chunks.sha256) >= 2  # 230 KB travels in more than one 128 KiB chunk


def test_bundles_are_reproducible_with_source_date_epoch(digits_models, key, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a, b = tmp_path / "a.ekb", tmp_path / "b.ekb"
    for out in (a, b):
        create_bundle(digits_models.fp32, name="digits", version="1.0.0", key=key, output=out)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def test_create_refuses_bad_inputs_with_clear_errors(digits_models, key, tmp_path):
    from edgekit import DataError, ModelFormatError

    out = tmp_path / "x.ekb"
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ModelFormatError, match="not a TFLite model"):
        create_bundle(junk, name="x", version="1.0.0", key=key, output=out)
    with pytest.raises(BundleError, match="invalid bundle name"):
        create_bundle(digits_models.fp32, name="Bad Name", version="1.0.0", key=key, output=out)
    with pytest.raises(BundleError, match="semantic version"):
        create_bundle(digits_models.fp32, name="x", version="v1", key=key, output=out)
    with pytest.raises(BundleError, match="does not exist"):
        create_bundle(tmp_path / "missing.tflite", name="x", version="1.0.0", key=key, output=out)
    few = tmp_path / "few.txt"
    few.write_text("a\nb\n")
    with pytest.raises(BundleError, match="2 labels but the model outputs 10"):
        create_bundle(digits_models.fp32, name="x", version="1.0.0", key=key, output=out, labels=few)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((5, 64), dtype=np.float32))
    with pytest.raises(DataError, match=r"samples have shape \(64,\).*expects \(8, 8, 1\)"):
        create_bundle(digits_models.fp32, name="x", version="1.0.0", key=key, output=out, baseline=wrong)
    assert not out.exists()


# -- tampering -----------------------------------------------------------------------------


MEMBERS = ["manifest.json", "manifest.sig", "model.tflite", "labels.txt", "baseline.json", "healthcheck.npz"]


@pytest.mark.parametrize("member", MEMBERS)
def test_a_flipped_bit_in_any_member_is_refused(good_bundle, trusted, member):
    members = dict(members_of(good_bundle))
    content = bytearray(members[member])
    content[len(content) // 2] ^= 0x01
    tampered = replace_member(good_bundle, member, bytes(content))
    with pytest.raises(BundleError):
        read_bundle(tampered, trusted)


def test_a_flipped_bit_anywhere_in_the_file_is_refused(good_bundle, trusted):
    rng = np.random.default_rng(7)
    for offset in rng.integers(0, len(good_bundle), size=40):
        data = bytearray(good_bundle)
        data[offset] ^= 1 << int(rng.integers(0, 8))
        try:
            bundle = read_bundle(bytes(data), trusted)
        except BundleError:
            continue
        # A flip in tar padding or an unused header byte changes nothing that is read.
        assert bundle.manifest_bytes == dict(members_of(good_bundle))["manifest.json"]
        assert bundle.model == dict(members_of(good_bundle))["model.tflite"]


def test_an_edited_manifest_is_refused(good_bundle, trusted):
    manifest = json.loads(dict(members_of(good_bundle))["manifest.json"])
    manifest["version"] = "9.9.9"
    edited = (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode()
    with pytest.raises(SignatureError, match="does not verify"):
        read_bundle(replace_member(good_bundle, "manifest.json", edited), trusted)


@pytest.mark.parametrize(
    ("signature", "message"),
    [(bytes(64), "does not verify"), (b"", "malformed signature"), (b"\x01" * 63, "malformed signature")],
)
def test_a_zeroed_or_malformed_signature_is_refused(good_bundle, trusted, signature, message):
    with pytest.raises(SignatureError, match=message):
        read_bundle(replace_member(good_bundle, "manifest.sig", signature), trusted)


def test_a_missing_signature_is_refused(good_bundle, trusted):
    stripped = retar([(n, d) for n, d in members_of(good_bundle) if n != "manifest.sig"])
    with pytest.raises(SignatureError, match="unsigned"):
        read_bundle(stripped, trusted)


def test_a_signature_swapped_from_another_bundle_is_refused(
    digits_models, good_bundle, key, trusted, tmp_path
):
    other = tmp_path / "other.ekb"
    create_bundle(digits_models.int8, name="digits", version="2.0.0", key=key, output=other)
    other_sig = dict(members_of(other.read_bytes()))["manifest.sig"]
    with pytest.raises(SignatureError, match="does not verify"):
        read_bundle(replace_member(good_bundle, "manifest.sig", other_sig), trusted)


def test_a_bundle_signed_by_an_untrusted_key_is_refused(digits_models, tmp_path, trusted):
    stranger = SigningKey.generate()
    out = tmp_path / "stranger.ekb"
    create_bundle(digits_models.fp32, name="digits", version="1.0.0", key=stranger, output=out)
    with pytest.raises(
        UntrustedKeyError, match=f"signed by key {stranger.key_id[:16]}, which is not trusted"
    ):
        read_bundle(out, trusted)
    # ...but it can still be looked at, and the reason is reported.
    bundle, problem = inspect_bundle(out, trusted)
    assert bundle.signer is None and problem is not None and "not trusted" in problem


def test_a_forged_manifest_claiming_a_trusted_signer_is_refused(good_bundle, key, trusted):
    manifest = json.loads(dict(members_of(good_bundle))["manifest.json"])
    forged = (json.dumps(manifest, sort_keys=True, indent=2) + " \n").encode()
    forger = SigningKey.generate()
    tampered = replace_member(
        replace_member(good_bundle, "manifest.json", forged), "manifest.sig", forger.sign(forged)
    )
    with pytest.raises(SignatureError, match="does not verify"):
        read_bundle(tampered, trusted)


def test_an_extra_member_is_refused(good_bundle, trusted):
    with pytest.raises(BundleError, match="'extra.bin', which its manifest does not list"):
        read_bundle(retar([*members_of(good_bundle), ("extra.bin", b"payload")]), trusted)


def test_a_missing_member_is_refused(good_bundle, trusted):
    with pytest.raises(BundleError, match="missing 'labels.txt'"):
        read_bundle(retar([(n, d) for n, d in members_of(good_bundle) if n != "labels.txt"]), trusted)


def test_a_duplicate_member_is_refused(good_bundle, trusted):
    members = members_of(good_bundle)
    with pytest.raises(BundleError, match="twice"):
        read_bundle(retar([*members, ("model.tflite", b"evil")]), trusted)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../evil.tflite", "path traversal"),
        ("sub/../../evil", "path traversal"),
        ("/etc/cron.d/evil", "absolute path"),
        ("dir/model.tflite", "invalid name"),
    ],
)
def test_paths_are_refused(good_bundle, trusted, name, message):
    with pytest.raises(BundleError, match=message):
        read_bundle(retar([*members_of(good_bundle), (name, b"x")]), trusted)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (tarfile.SYMTYPE, "symbolic link"),
        (tarfile.LNKTYPE, "hard link"),
        (tarfile.CHRTYPE, "character device"),
        (tarfile.DIRTYPE, "directory"),
        (tarfile.FIFOTYPE, "FIFO"),
    ],
)
def test_links_devices_and_directories_are_refused(good_bundle, trusted, kind, message):
    members = [*members_of(good_bundle), ("sneaky", b"")]
    with pytest.raises(BundleError, match=message):
        read_bundle(retar(members, kinds={"sneaky": kind}), trusted)


def test_pax_and_gnu_long_names_are_refused(good_bundle, trusted):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo("a" * 150)
        archive.addfile(info, io.BytesIO(b""))
    with pytest.raises(BundleError):
        read_bundle(buffer.getvalue(), trusted)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("manifest.json")
        info.pax_headers = {"path": "../../x"}
        archive.addfile(info, io.BytesIO(b""))
    with pytest.raises(BundleError, match="pax"):
        read_bundle(buffer.getvalue(), trusted)


@pytest.mark.parametrize("cut", [1, 100, 511, 512, 1000, -1024, -1])
def test_truncated_bundles_are_refused(good_bundle, trusted, cut):
    # Negative cuts take only end-of-archive padding: every member is intact, yet a short
    # copy is still a bad copy.
    data = good_bundle[: cut if cut > 0 else len(good_bundle) + cut]
    if cut == -1024:
        data = data.rstrip(b"\0")
    with pytest.raises(BundleError):
        read_bundle(data, trusted)


def test_empty_random_and_oversized_files_are_refused(good_bundle, trusted, tmp_path):
    with pytest.raises(BundleError, match="empty"):
        read_bundle(b"", trusted)
    with pytest.raises(BundleError):
        read_bundle(np.random.default_rng(1).bytes(4096), trusted)
    with pytest.raises(BundleError, match="over the 1000-byte"):
        read_bundle(good_bundle, trusted, max_size=1000)
    path = tmp_path / "big.ekb"
    path.write_bytes(good_bundle)
    with pytest.raises(BundleError, match="over the 1000-byte bundle limit"):
        read_bundle(path, trusted, max_size=1000)
    with pytest.raises(BundleError, match="does not exist"):
        read_bundle(tmp_path / "nope.ekb", trusted)
    with pytest.raises(BundleError, match="directory"):
        read_bundle(tmp_path, trusted)


def test_trailing_data_after_the_archive_is_refused(good_bundle, trusted):
    with pytest.raises(BundleError, match="after its end-of-archive"):
        read_bundle(good_bundle + b"evil", trusted)


def test_a_manifest_that_lies_about_a_member_is_refused_even_if_signed(good_bundle, key, trusted):
    """Mix-and-match: a validly signed manifest whose hashes belong to other content."""
    manifest = json.loads(dict(members_of(good_bundle))["manifest.json"])
    for entry in manifest["files"]:
        if entry["name"] == "labels.txt":
            entry["sha256"] = hashlib.sha256(b"other\n").hexdigest()
    data = (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode()
    tampered = replace_member(
        replace_member(good_bundle, "manifest.json", data), "manifest.sig", key.sign(data)
    )
    with pytest.raises(BundleError, match="labels.txt.*SHA-256"):
        read_bundle(tampered, trusted)


# -- fuzzing -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bundles_raise_only_bundle_errors(good_bundle, trusted, data):
    raw = bytearray(good_bundle)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    with contextlib.suppress(BundleError):
        read_bundle(bytes(raw[:cut] if data.draw(st.booleans()) else raw), trusted)


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=4096))
def test_arbitrary_bytes_raise_only_bundle_errors(blob):
    trusted = TrustedKeys([SigningKey.generate().public])
    with pytest.raises(BundleError):
        read_bundle(blob, trusted)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    doc=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=6)
        ),
        max_leaves=30,
    )
)
def test_signed_garbage_manifests_raise_only_bundle_errors(good_bundle, key, trusted, doc):
    """Even a trusted signer's malformed manifest is a BundleError, not a crash."""
    manifest = json.loads(dict(members_of(good_bundle))["manifest.json"])
    if isinstance(doc, dict):
        manifest.update(doc)
    else:
        manifest["model"] = doc
    data = json.dumps(manifest).encode()
    tampered = replace_member(
        replace_member(good_bundle, "manifest.json", data), "manifest.sig", key.sign(data)
    )
    with contextlib.suppress(BundleError):
        read_bundle(tampered, trusted)
