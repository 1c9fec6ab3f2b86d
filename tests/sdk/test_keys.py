"""Signing keys: creation, protection, passphrases, export."""

from __future__ import annotations

import stat

import pytest
from edgekit import KeyStoreError
from edgekit.keys import (
    PublicKey,
    export_public_key,
    init_key,
    list_keys,
    load_public_keys,
    load_signing_key,
)


def test_init_creates_a_private_key_readable_only_by_its_owner(edgekit_home):
    info = init_key(edgekit_home)
    mode = stat.S_IMODE(info.path.stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(info.path.parent.stat().st_mode) == 0o700
    key = load_signing_key(edgekit_home)
    assert key.key_id == info.key_id
    assert key.public.verify(key.sign(b"hello"), b"hello")
    assert not key.public.verify(key.sign(b"hello"), b"hellO")


def test_init_refuses_to_overwrite_without_force(edgekit_home):
    first = init_key(edgekit_home)
    with pytest.raises(KeyStoreError, match="--force"):
        init_key(edgekit_home)
    assert load_signing_key(edgekit_home).key_id == first.key_id
    second = init_key(edgekit_home, force=True)
    assert second.key_id != first.key_id
    assert load_signing_key(edgekit_home).key_id == second.key_id


def test_encrypted_key_needs_its_passphrase(edgekit_home, monkeypatch):
    info = init_key(edgekit_home, passphrase=b"correct horse")
    assert info.encrypted
    assert b"ENCRYPTED" in info.path.read_bytes()
    with pytest.raises(KeyStoreError, match="encrypted; set EDGEKIT_KEY_PASSPHRASE"):
        load_signing_key(edgekit_home)
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        load_signing_key(edgekit_home, passphrase=b"wrong")
    assert load_signing_key(edgekit_home, passphrase=b"correct horse").key_id == info.key_id
    monkeypatch.setenv("EDGEKIT_KEY_PASSPHRASE", "correct horse")
    assert load_signing_key(edgekit_home).key_id == info.key_id
    # Listing and exporting the public half need no passphrase.
    monkeypatch.delenv("EDGEKIT_KEY_PASSPHRASE")
    (listed,) = list_keys(edgekit_home)
    assert listed.key_id == info.key_id and listed.encrypted


def test_exported_public_key_is_pem_subject_public_key_info(edgekit_home):
    info = init_key(edgekit_home)
    pem = export_public_key(edgekit_home)
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    (public,) = load_public_keys(pem)
    assert public.key_id == info.key_id


def test_missing_and_bad_keys_give_clear_errors(edgekit_home, tmp_path):
    with pytest.raises(KeyStoreError, match="edgekit keys init"):
        load_signing_key(edgekit_home)
    with pytest.raises(KeyStoreError, match="no PEM public key"):
        load_public_keys(b"hello")
    with pytest.raises(KeyStoreError, match="invalid key name"):
        init_key(edgekit_home, name="../escape")
    rsa_pem = (
        b"-----BEGIN PUBLIC KEY-----\n"
        b"MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAMtyh9HWTs0RVHOX+PTO8xPWhH1g2Ha+\n"
        b"DVDE5uFYPjN9SAbJS3A1dRxCVdgqNkJs7oYbGJCiHBbfvkrqX7Ve71kCAwEAAQ==\n"
        b"-----END PUBLIC KEY-----\n"
    )
    with pytest.raises(KeyStoreError, match="not Ed25519|not a PEM"):
        PublicKey.from_pem(rsa_pem)
