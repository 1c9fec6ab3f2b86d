"""Ed25519 signing keys and public keys, and where the workstation keeps them.

Private keys are PKCS#8 PEM files under ``$EDGEKIT_HOME/keys/`` with mode 0600, optionally
encrypted with a passphrase. Public keys are PEM SubjectPublicKeyInfo, so OpenSSL reads them.
A key's id is the SHA-256 of its 32 raw public bytes, in hex.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .atomic import atomic_write
from .errors import KeyStoreError
from .schema import ID

__all__ = [
    "KeyInfo",
    "PublicKey",
    "SigningKey",
    "export_public_key",
    "init_key",
    "key_needs_passphrase",
    "list_keys",
    "load_own_public_key",
    "load_public_keys",
    "load_signing_key",
    "public_key_path",
    "signing_key_path",
]

PASSPHRASE_ENV = "EDGEKIT_KEY_PASSPHRASE"
_PEM_PUBLIC = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.S)


class PublicKey:
    """An Ed25519 public key that can verify signatures."""

    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = hashlib.sha256(raw).hexdigest()

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True if ``signature`` is this key's Ed25519 signature of ``data``."""
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def pem(self) -> bytes:
        """PEM SubjectPublicKeyInfo, the form `openssl pkeyutl -pubin` reads."""
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def from_pem(cls, pem: bytes) -> PublicKey:
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError) as exc:
            raise KeyStoreError(
                f"not a PEM public key ({exc}); export one with `edgekit keys export-public`"
            ) from exc
        if not isinstance(key, Ed25519PublicKey):
            raise KeyStoreError(
                "the public key is not Ed25519; edgekit signs and verifies with Ed25519 keys only"
            )
        return cls(key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.key_id == self.key_id

    def __hash__(self) -> int:
        return hash(self.key_id)

    def __repr__(self) -> str:
        return f"PublicKey({self.key_id[:16]})"


class SigningKey:
    """An Ed25519 private key. Never logged, never printed."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = PublicKey(key.public_key())

    @property
    def key_id(self) -> str:
        return self.public.key_id

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        """The raw 64-byte Ed25519 signature of ``data``."""
        return self._key.sign(data)

    def cryptography_key(self) -> Ed25519PrivateKey:
        """The pyca/cryptography key, for signers that take one (python-tuf's CryptoSigner)."""
        return self._key

    def private_pem(self, passphrase: bytes | None = None) -> bytes:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
        )
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    def __repr__(self) -> str:
        return f"SigningKey({self.key_id[:16]})"


@dataclass(frozen=True)
class KeyInfo:
    """What `edgekit keys list` shows of a key: never the key itself."""

    name: str
    key_id: str
    path: Path
    encrypted: bool


def _check_name(name: str) -> None:
    if not ID.match(name):
        raise KeyStoreError(f"invalid key name {name!r}: use letters, digits, '.', '_' or '-'")


def signing_key_path(home: str | os.PathLike[str], name: str = "default") -> Path:
    _check_name(name)
    return Path(home) / "keys" / f"{name}.key.pem"


def public_key_path(home: str | os.PathLike[str], name: str = "default") -> Path:
    _check_name(name)
    return Path(home) / "keys" / f"{name}.pub.pem"


def init_key(
    home: str | os.PathLike[str], name: str = "default", passphrase: bytes | None = None, force: bool = False
) -> KeyInfo:
    """Create a new signing key under ``home``; refuses to overwrite one unless ``force``."""
    path = signing_key_path(home, name)
    if path.exists() and not force:
        raise KeyStoreError(
            f"a signing key already exists at {path}; pass --force to replace it "
            "(bundles signed with the old key will no longer verify against the new one)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    key = SigningKey.generate()
    atomic_write(path, key.private_pem(passphrase), mode=0o600)
    atomic_write(public_key_path(home, name), key.public.pem(), mode=0o644)
    return KeyInfo(name=name, key_id=key.key_id, path=path, encrypted=bool(passphrase))


def _is_encrypted(pem: bytes) -> bool:
    return b"ENCRYPTED" in pem.split(b"\n", 1)[0]


def load_signing_key(
    home: str | os.PathLike[str], name: str = "default", passphrase: bytes | None = None
) -> SigningKey:
    """Load a signing key; the passphrase defaults to ``$EDGEKIT_KEY_PASSPHRASE``."""
    path = signing_key_path(home, name)
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise KeyStoreError(f"no signing key at {path}; create one with `edgekit keys init`") from None
    except OSError as exc:
        raise KeyStoreError(f"cannot read signing key {path}: {exc.strerror}") from None
    if passphrase is None and os.environ.get(PASSPHRASE_ENV):
        passphrase = os.environ[PASSPHRASE_ENV].encode()
    if _is_encrypted(pem) and not passphrase:
        raise KeyStoreError(
            f"signing key {path} is encrypted; set {PASSPHRASE_ENV} or enter the passphrase when asked"
        )
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase if _is_encrypted(pem) else None)
    except (ValueError, TypeError) as exc:
        reason = "wrong passphrase" if _is_encrypted(pem) else f"unreadable key ({exc})"
        raise KeyStoreError(f"cannot load signing key {path}: {reason}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyStoreError(f"signing key {path} is not Ed25519; create one with `edgekit keys init`")
    return SigningKey(key)


def key_needs_passphrase(home: str | os.PathLike[str], name: str = "default") -> bool:
    """True when the named key is encrypted and no passphrase is in the environment."""
    try:
        return _is_encrypted(signing_key_path(home, name).read_bytes()) and not os.environ.get(PASSPHRASE_ENV)
    except OSError:
        return False


def load_own_public_key(home: str | os.PathLike[str], name: str = "default") -> PublicKey:
    """The public half of a signing key, read from the file written beside it (no passphrase)."""
    path = public_key_path(home, name)
    try:
        return PublicKey.from_pem(path.read_bytes())
    except FileNotFoundError:
        raise KeyStoreError(f"no public key at {path}; create a key with `edgekit keys init`") from None


def list_keys(home: str | os.PathLike[str]) -> list[KeyInfo]:
    """Every signing key under ``home`` with its id (read from its public half)."""
    found = []
    for path in sorted((Path(home) / "keys").glob("*.key.pem")):
        name = path.name[: -len(".key.pem")]
        public = load_own_public_key(home, name)
        found.append(
            KeyInfo(name=name, key_id=public.key_id, path=path, encrypted=_is_encrypted(path.read_bytes()))
        )
    return found


def export_public_key(home: str | os.PathLike[str], name: str = "default") -> bytes:
    return load_own_public_key(home, name).pem()


def load_public_keys(pem: bytes) -> list[PublicKey]:
    """Every public key in a PEM text (one or more ``BEGIN PUBLIC KEY`` blocks)."""
    blocks = _PEM_PUBLIC.findall(pem)
    if not blocks:
        raise KeyStoreError("no PEM public key found; export one with `edgekit keys export-public`")
    return [PublicKey.from_pem(block) for block in blocks]
