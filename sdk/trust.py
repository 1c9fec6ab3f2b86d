"""What a device or workstation trusts: a set of public keys, and signature checks against it.

Pure logic, no transport: functions take bytes and keys and return the verifying key's id or
raise. Nothing here imports paho, and nothing in the MQTT layer decides trust.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import KeyStoreError, SignatureError, UntrustedKeyError
from .keys import PublicKey, load_public_keys

__all__ = ["SIGNATURE_SIZE", "TrustedKeys"]

SIGNATURE_SIZE = 64


class TrustedKeys:
    """An immutable set of trusted Ed25519 public keys, looked up by key id."""

    def __init__(self, keys: Iterable[PublicKey]) -> None:
        self._keys = {key.key_id: key for key in keys}
        if not self._keys:
            raise KeyStoreError("no trusted public key given; add one with --key or in the config")

    @classmethod
    def from_pem(cls, pem: bytes) -> TrustedKeys:
        return cls(load_public_keys(pem))

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> TrustedKeys:
        keys: list[PublicKey] = []
        for path in paths:
            try:
                keys.extend(load_public_keys(Path(path).read_bytes()))
            except OSError as exc:
                raise KeyStoreError(f"cannot read public key file {path}: {exc.strerror}") from None
        return cls(keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __iter__(self) -> Iterator[PublicKey]:
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, data: bytes, signature: bytes, claimed_key_id: str | None, what: str) -> str:
        """Check that a trusted key signed ``data``; returns that key's id.

        ``claimed_key_id`` is the signer the signed document names. It only selects the key to
        try: the signature itself must verify. ``what`` names the document in error messages.
        """
        if len(signature) != SIGNATURE_SIZE:
            raise SignatureError(
                f"{what} has a malformed signature ({len(signature)} bytes, expected {SIGNATURE_SIZE}); "
                "re-sign it with `edgekit bundle create`"
            )
        if claimed_key_id is not None and claimed_key_id not in self._keys:
            raise UntrustedKeyError(
                f"{what} is signed by key {claimed_key_id[:16]}, which is not trusted here; "
                "pass its public key with --key, or re-sign it with a trusted key"
            )
        candidates = [self._keys[claimed_key_id]] if claimed_key_id is not None else list(self._keys.values())
        for key in candidates:
            if key.verify(signature, data):
                return key.key_id
        raise SignatureError(
            f"{what} has a signature that does not verify: it was altered after signing, or forged"
        )
