"""The capture policy (signed like a desired state) and the sealed record (HPKE to the owner)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from edgekit.capture import (
    CaptureKey,
    CapturePolicy,
    init_capture_key,
    join_chunks,
    load_capture_key,
    load_capture_public,
    new_capture_policy,
    open_record,
    parse_chunk,
    seal_record,
    sign_capture_policy,
    split_chunks,
    verify_capture_policy,
)
from edgekit.errors import CaptureError
from edgekit.keys import SigningKey
from edgekit.trust import TrustedKeys

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def signer() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="module")
def owner() -> CaptureKey:
    return CaptureKey.generate()


def _policy(owner: CaptureKey, seq: int = 5, **kw: object) -> CapturePolicy:
    return new_capture_policy("shop", seq=seq, recipient=owner.public_raw, now=NOW, **kw)  # type: ignore[arg-type]


def _reason(call: object) -> str:
    with pytest.raises(CaptureError) as info:
        call()  # type: ignore[operator]
    return info.value.reason  # type: ignore[attr-defined,no-any-return]


def test_policy_round_trips_and_verifies(signer: SigningKey, owner: CaptureKey) -> None:
    policy = _policy(owner, triggers=("drift", "sample"), sample_rate=0.01, note="shelf camera retraining")
    assert CapturePolicy.from_json(policy.to_json()) == policy
    got = verify_capture_policy(
        sign_capture_policy(policy, signer), TrustedKeys([signer.public]), fleet="shop", last_seq=4, now=NOW
    )
    assert got == policy and got.recipient_id == owner.key_id
    assert "when drift is flagged" in got.describe()


def test_refusals_name_their_reason(signer: SigningKey, owner: CaptureKey) -> None:
    trusted = TrustedKeys([signer.public])
    policy = _policy(owner)
    signed = sign_capture_policy(policy, signer)
    assert (
        _reason(lambda: verify_capture_policy(policy.to_json(), trusted, fleet="shop", now=NOW)) == "unsigned"
    )
    other = SigningKey.generate()
    assert (
        _reason(
            lambda: verify_capture_policy(sign_capture_policy(policy, other), trusted, fleet="shop", now=NOW)
        )
        == "untrusted"
    )
    assert _reason(lambda: verify_capture_policy(signed, trusted, fleet="cafe", now=NOW)) == "other-fleet"
    assert (
        _reason(lambda: verify_capture_policy(signed, trusted, fleet="shop", now=policy.expires_at))
        == "expired"
    )
    assert (
        _reason(lambda: verify_capture_policy(signed, trusted, fleet="shop", last_seq=5, now=NOW))
        == "replayed"
    )
    envelope = json.loads(signed)
    forged = _policy(owner, max_per_hour=10_000)
    envelope["payload"] = __import__("base64").b64encode(forged.to_json()).decode()
    assert (
        _reason(lambda: verify_capture_policy(json.dumps(envelope).encode(), trusted, fleet="shop", now=NOW))
        == "forged"
    )
    assert _reason(lambda: verify_capture_policy(b"", trusted, fleet="shop", now=NOW)) == "unsigned"
    assert _reason(lambda: verify_capture_policy(b"{nope", trusted, fleet="shop", now=NOW)) == "malformed"


def test_an_enabled_policy_needs_a_recipient_and_a_trigger() -> None:
    with pytest.raises(CaptureError, match="capture public key"):
        new_capture_policy("shop", seq=1, recipient=None, now=NOW)
    off = new_capture_policy("shop", seq=2, enabled=False, now=NOW)
    assert not off.active(NOW) and off.triggers == () and "off" in off.describe()


def _seal(policy: CapturePolicy, array: np.ndarray, seq: int = 7) -> bytes:
    return seal_record(
        policy,
        device="cam-1",
        seq=seq,
        time=NOW,
        trigger="drift",
        bundle={"name": "digits", "version": "1.0.0", "bundle_id": "ab" * 32},
        outputs=[[0.1, 0.7, 0.2]],
        input_array=array,
    )


def test_sealed_record_opens_with_the_owner_key_only(owner: CaptureKey) -> None:
    array = np.arange(224 * 224 * 3, dtype=np.uint8).reshape(224, 224, 3)
    sealed = _seal(_policy(owner), array)
    assert array.tobytes()[:64] not in sealed  # ciphertext only
    assert len(sealed) <= array.nbytes * 1.01
    record = open_record(sealed, owner)
    assert record.header.device == "cam-1" and record.trigger == "drift" and record.top_class == 1
    got = np.frombuffer(record.input_bytes or b"", dtype=record.input_dtype).reshape(record.input_shape)
    assert np.array_equal(got, array)
    assert _reason(lambda: open_record(sealed, CaptureKey.generate())) == "wrong-key"


def test_tampered_truncated_or_moved_records_do_not_open(owner: CaptureKey) -> None:
    sealed = _seal(_policy(owner), np.zeros((4, 4), np.float32))
    flipped = bytearray(sealed)
    flipped[-20] ^= 1
    assert _reason(lambda: open_record(bytes(flipped), owner)) == "tampered"
    assert _reason(lambda: open_record(sealed[:-5], owner)) == "truncated"
    assert _reason(lambda: open_record(sealed[:3], owner)) == "malformed"
    # The same ciphertext under another seq (a replay into another slot) does not open.
    moved = sealed.replace(b'"seq":7', b'"seq":8')
    assert _reason(lambda: open_record(moved, owner)) == "tampered"


def test_labels_only_records_carry_no_input(owner: CaptureKey) -> None:
    record = open_record(_seal(_policy(owner, labels_only=True), np.ones((8,), np.float32)), owner)
    assert record.input_bytes is None and record.outputs == [[0.1, 0.7, 0.2]]


def test_chunks_reassemble(owner: CaptureKey) -> None:
    sealed = _seal(_policy(owner), np.arange(10_000, dtype=np.float32))
    chunks = split_chunks(sealed, 4096)
    parsed = [parse_chunk(c) for c in chunks]
    assert [c.part for c in parsed] == list(range(len(chunks))) and parsed[0].parts == len(chunks)
    assert all(len(c.data) <= 4096 for c in parsed)
    assert join_chunks([c.data for c in parsed]) == sealed


def test_capture_key_files(tmp_path: object) -> None:
    key = init_capture_key(tmp_path, b"secret words")  # type: ignore[arg-type]
    assert load_capture_public(tmp_path) == key.public_raw  # type: ignore[arg-type]
    assert load_capture_key(tmp_path, b"secret words").key_id == key.key_id  # type: ignore[arg-type]
    assert _reason(lambda: load_capture_key(tmp_path, b"wrong")) == "no-key"  # type: ignore[arg-type]
    assert _reason(lambda: load_capture_key(tmp_path, None)) == "no-key"  # type: ignore[arg-type]
    assert _reason(lambda: init_capture_key(tmp_path, None)) == "exists"  # type: ignore[arg-type]


def test_a_pulled_folder_is_data_with_labels_from_labels_csv(tmp_path: object) -> None:
    from pathlib import Path

    from edgekit.data import load_data
    from edgekit.errors import DataError

    folder = Path(str(tmp_path))
    (folder / "inputs").mkdir()
    lines = []
    for i in range(4):
        np.save(folder / "inputs" / f"cam-{i}.npy", np.full((8, 8, 1), i, np.float32))
        lines.append(json.dumps({"id": f"cam-{i}", "input": f"inputs/cam-{i}.npy", "trigger": "drift"}))
    lines.append(json.dumps({"id": "cam-9", "input": None}))  # a labels-only record: no input
    (folder / "records.jsonl").write_text("\n".join(lines) + "\n")
    data = load_data(folder)
    assert data.x.shape == (4, 8, 8, 1) and data.y is None and float(data.x[3].max()) == 3.0
    (folder / "labels.csv").write_text("id,label\ncam-3,7\ncam-1,2\n")
    data = load_data(folder)
    assert data.x.shape == (2, 8, 8, 1) and data.y.tolist() == [2, 7]  # type: ignore[union-attr]
    (folder / "labels.csv").write_text("image,class\ncam-3,7\n")
    with pytest.raises(DataError, match="id,label"):
        load_data(folder)
    (folder / "labels.csv").write_text("id,label\ncam-3,seven\n")
    with pytest.raises(DataError, match="line 2"):
        load_data(folder)
