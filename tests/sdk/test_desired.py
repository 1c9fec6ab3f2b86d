"""Signed desired states: what a device accepts, and every kind of document it refuses."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from edgekit import DesiredStateError, SigningKey, TrustedKeys
from edgekit.desired import (
    DesiredState,
    decode_desired_state,
    new_desired_state,
    sign_desired_state,
    verify_desired_state,
)
from hypothesis import given, settings
from hypothesis import strategies as st

NOW = 1_800_000_000
SHA_OLD = hashlib.sha256(b"bundle 1.0.0").hexdigest()
SHA_NEW = hashlib.sha256(b"bundle 1.1.0").hexdigest()


def state(seq: int = 5, fleet: str = "shop-cams", device: str | None = None, **kw: object) -> DesiredState:
    args: dict[str, object] = {
        "bundle_sha256": SHA_NEW,
        "bundle_name": "digits",
        "bundle_version": "1.1.0",
        "seq": seq,
        "device": device,
        "ttl": 3600,
        "now": NOW,
    }
    args.update(kw)
    return new_desired_state(fleet, **args)  # type: ignore[arg-type]


def refusal(data: bytes, trusted: TrustedKeys, **kw: object) -> DesiredStateError:
    args: dict[str, object] = {"fleet": "shop-cams", "device": "cam-1", "last_seq": 4, "now": NOW + 10}
    args.update(kw)
    with pytest.raises(DesiredStateError) as info:
        verify_desired_state(data, trusted, **args)  # type: ignore[arg-type]
    return info.value


def test_signed_state_for_the_fleet_is_accepted(key: SigningKey, trusted: TrustedKeys) -> None:
    doc = state()
    got = verify_desired_state(
        sign_desired_state(doc, key), trusted, fleet="shop-cams", device="cam-1", last_seq=4, now=NOW + 10
    )
    assert got == doc
    assert got.bundle_sha256 == SHA_NEW and got.seq == 5 and got.expires_at == NOW + 3600


def test_per_device_override_is_accepted_by_that_device_only(key: SigningKey, trusted: TrustedKeys) -> None:
    data = sign_desired_state(state(device="cam-1"), key)
    assert verify_desired_state(data, trusted, fleet="shop-cams", device="cam-1", now=NOW).device == "cam-1"
    err = refusal(data, trusted, device="cam-2")
    assert err.reason == "other-device" and "cam-1" in str(err)


def test_envelope_payload_is_canonical_json_and_verifies_with_openssl(
    key: SigningKey, tmp_path: Path
) -> None:
    envelope = json.loads(sign_desired_state(state(), key))
    payload = base64.b64decode(envelope["payload"])
    assert payload == json.dumps(json.loads(payload), sort_keys=True, separators=(",", ":")).encode()
    assert envelope["signer"] == key.key_id
    (tmp_path / "doc.json").write_bytes(payload)
    (tmp_path / "doc.sig").write_bytes(base64.b64decode(envelope["signature"]))
    (tmp_path / "key.pem").write_bytes(key.public.pem())
    result = subprocess.run(
        [
            "openssl",
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            "key.pem",
            "-rawin",
            "-in",
            "doc.json",
            "-sigfile",
            "doc.sig",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout


def test_forged_state_is_refused(key: SigningKey, trusted: TrustedKeys) -> None:
    envelope = json.loads(sign_desired_state(state(), key))
    doc = json.loads(base64.b64decode(envelope["payload"]))
    doc["bundle"]["sha256"] = SHA_OLD  # the attacker points the fleet at another bundle
    envelope["payload"] = base64.b64encode(json.dumps(doc).encode()).decode()
    err = refusal(json.dumps(envelope).encode(), trusted)
    assert err.reason == "forged" and "does not verify" in str(err)


def test_state_signed_by_an_untrusted_key_is_refused(trusted: TrustedKeys) -> None:
    other = SigningKey.generate()
    err = refusal(sign_desired_state(state(), other), trusted)
    assert err.reason == "untrusted" and other.key_id[:16] in str(err)


def test_untrusted_key_claiming_a_trusted_key_id_is_forged(key: SigningKey, trusted: TrustedKeys) -> None:
    other = SigningKey.generate()
    envelope = json.loads(sign_desired_state(state(), other))
    envelope["signer"] = key.key_id
    assert refusal(json.dumps(envelope).encode(), trusted).reason == "forged"


def test_unsigned_state_is_refused(trusted: TrustedKeys) -> None:
    err = refusal(state().to_json(), trusted)
    assert err.reason == "unsigned" and "unsigned" in str(err)
    assert refusal(b"", trusted).reason == "unsigned"


def test_replayed_state_is_refused(key: SigningKey, trusted: TrustedKeys) -> None:
    old = sign_desired_state(state(seq=3), key)
    err = refusal(old, trusted, last_seq=4)
    assert err.reason == "replayed" and "older" in str(err)
    same = sign_desired_state(state(seq=4), key)
    assert "already applied" in str(refusal(same, trusted, last_seq=4))


def test_rollback_is_a_higher_sequence_pointing_at_an_older_bundle(
    key: SigningKey, trusted: TrustedKeys
) -> None:
    rollback = state(seq=6, bundle_sha256=SHA_OLD, bundle_version="1.0.0")
    got = verify_desired_state(
        sign_desired_state(rollback, key), trusted, fleet="shop-cams", last_seq=5, now=NOW
    )
    assert got.bundle_sha256 == SHA_OLD


def test_expired_state_is_refused(key: SigningKey, trusted: TrustedKeys) -> None:
    err = refusal(sign_desired_state(state(), key), trusted, now=NOW + 3600)
    assert err.reason == "expired" and "expired at" in str(err)


def test_state_for_another_fleet_is_refused(key: SigningKey, trusted: TrustedKeys) -> None:
    err = refusal(sign_desired_state(state(fleet="warehouse"), key), trusted)
    assert err.reason == "other-fleet" and "warehouse" in str(err)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("seq", 0, "seq"),
        ("seq", True, "seq"),
        ("seq", 2**60, "seq"),
        ("fleet", "a/b", "fleet"),
        ("device", "+", "device"),
        ("issued_at", "yesterday", "issued_at"),
        ("expires_at", "2020-02-30T00:00:00Z", "expires_at"),
        ("schema_version", 2, "schema version"),
        ("extra", 1, "exactly the fields"),
    ],
)
def test_malformed_signed_documents_are_refused(
    key: SigningKey, trusted: TrustedKeys, field: str, value: object, match: str
) -> None:
    doc = state().to_dict()
    doc[field] = value
    payload = json.dumps(doc).encode()
    envelope = json.loads(sign_desired_state(state(), key))
    envelope["payload"] = base64.b64encode(payload).decode()
    envelope["signature"] = base64.b64encode(key.sign(payload)).decode()
    err = refusal(json.dumps(envelope).encode(), trusted)
    assert err.reason == "malformed"
    assert match in str(err)


def test_bad_arguments_fail_when_issuing_not_on_devices() -> None:
    with pytest.raises(DesiredStateError, match="sha256"):
        state(bundle_sha256="nothex")
    with pytest.raises(DesiredStateError, match="version"):
        state(bundle_version="latest")


def test_decode_without_trust_shows_the_claimed_signer(key: SigningKey) -> None:
    doc, signer = decode_desired_state(sign_desired_state(state(), key))
    assert doc == state() and signer == key.key_id


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_decoder_fuzzed_with_bytes_raises_only_desired_state_error(trusted: TrustedKeys, data: bytes) -> None:
    with contextlib.suppress(DesiredStateError):
        verify_desired_state(data, trusted, fleet="shop-cams")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["schema", "schema_version", "payload_type", "payload", "signer", "signature", "x"]),
        _json,
    ),
    st.dictionaries(
        st.sampled_from(
            ["schema", "schema_version", "fleet", "device", "bundle", "seq", "issued_at", "expires_at", "y"]
        ),
        _json,
    ),
)
def test_decoder_fuzzed_with_structured_json_raises_only_desired_state_error(
    key: SigningKey, trusted: TrustedKeys, envelope: dict[str, object], doc: dict[str, object]
) -> None:
    payload = json.dumps(doc).encode()
    signed = {
        "schema": "edgekit.signed",
        "schema_version": 1,
        "payload_type": "edgekit.desired",
        "payload": base64.b64encode(payload).decode(),
        "signer": key.key_id,
        "signature": base64.b64encode(key.sign(payload)).decode(),
    }
    for candidate in (envelope, {**signed, **envelope}, signed):
        with contextlib.suppress(DesiredStateError):
            verify_desired_state(json.dumps(candidate).encode(), trusted, fleet="shop-cams", now=NOW)
