"""Field-data capture, the pure core: the signed capture policy, and the captured record sealed
to the owner with HPKE (RFC 9180).

**The policy.** A :class:`CapturePolicy` says whether a fleet's devices may keep inputs they see,
on which triggers (``drift``, ``low-confidence``, ``sample``), within which limits (per hour,
bytes on disk, retention) and to whom they are encrypted (the owner's capture public key, an
X25519 key made by ``edgekit capture keys init``). It travels like a desired state: a signed
envelope (``payload_type`` ``edgekit.capture_policy``) with a sequence number from the fleet's
counter and an expiry, retained on ``{prefix}/fleets/{fleet}/capture``. Turning capture off is
a newer signed policy with ``enabled`` false, so an old "on" cannot be replayed over it.
:func:`verify_capture_policy` takes bytes and keys and returns a verified policy or raises
:class:`~edgekit.errors.CaptureError` with ``reason`` ``unsigned``, ``untrusted``, ``forged``,
``malformed``, ``other-fleet``, ``expired`` or ``replayed``.

**The record.** One capture is a plaintext record (a JSON header: device, fleet, time, trigger,
bundle, the model's outputs; then the raw input tensor bytes) sealed with HPKE base mode,
DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305, from ``cryptography``'s ``hpke``
module (no construction of ours). The HPKE ``info`` binds the ciphertext to its fleet, device,
sequence number and the recipient key, so a record moved to another slot does not open. On the
wire and on disk a record is a small clear header (fleet, device, seq, key id, size: what
routing, dedup and purge need; no time, trigger or content) followed by the sealed bytes; it
travels in chunks (:func:`split_chunks`) that fit the broker's packet limit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .atomic import atomic_write
from .envelope import Kind, open_envelope, seal, verify_envelope
from .errors import CaptureError, TopicError
from .keys import SigningKey
from .schema import Fields, canonical_json, decode_json, refuse
from .topics import check_fleet_id
from .trust import TrustedKeys

__all__ = [
    "CAPTURE_ACK_SCHEMA",
    "CAPTURE_POLICY_SCHEMA",
    "TRIGGERS",
    "CaptureAck",
    "CaptureKey",
    "CapturePolicy",
    "CapturedRecord",
    "RecordHeader",
    "decode_capture_policy",
    "init_capture_key",
    "join_chunks",
    "load_capture_key",
    "load_capture_public",
    "new_capture_policy",
    "open_record",
    "parse_chunk",
    "record_header",
    "seal_record",
    "sign_capture_policy",
    "split_chunks",
    "verify_capture_policy",
]

CAPTURE_POLICY_SCHEMA = "edgekit.capture_policy"
CAPTURE_POLICY_VERSION = 1
RECORD_SCHEMA = "edgekit.capture_record"
RECORD_VERSION = 1
CAPTURE_ACK_SCHEMA = "edgekit.capture_ack"
CAPTURE_ACK_VERSION = 1
MAX_ACK_SIZE = 64 * 1024
MAX_ACK_SEQS = 1000
TRIGGERS = ("drift", "low-confidence", "sample")
MAX_POLICY_SIZE = 16 * 1024
POLICY = Kind(
    payload_type=CAPTURE_POLICY_SCHEMA,
    what="the capture policy",
    error=CaptureError,
    max_size=MAX_POLICY_SIZE,
    how_to_sign="`edgekit capture policy set`",
)
MAX_SEQ = 2**53 - 1
#: The largest sealed record a device makes or the fleet accepts (a 4K RGB float frame fits).
MAX_RECORD_SIZE = 256 * 1024 * 1024
#: Default bytes of one chunk message: small, so a capture never holds up telemetry for long.
DEFAULT_CHUNK_SIZE = 256 * 1024
MAX_NOTE = 500
_RECORD_MAGIC = b"EKC1"
_CHUNK_MAGIC = b"EKK1"
_POLICY_KEYS = {
    "schema",
    "schema_version",
    "fleet",
    "seq",
    "issued_at",
    "expires_at",
    "enabled",
    "triggers",
    "confidence_below",
    "sample_rate",
    "max_per_hour",
    "max_bytes",
    "retain_s",
    "labels_only",
    "recipient",
    "note",
}


def _hpke() -> Any:
    try:
        from cryptography.hazmat.primitives import hpke
    except ImportError:  # cryptography before HPKE landed
        raise refuse(
            CaptureError,
            "unsupported",
            "this device's `cryptography` has no HPKE; upgrade it (pip install -U cryptography)",
        ) from None
    return hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


# -- the policy ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapturePolicy:
    """What a fleet's devices may capture. Times are UNIX seconds; ``recipient`` is the owner's
    X25519 public key (32 raw bytes, base64), empty when capture is off."""

    fleet: str
    seq: int
    issued_at: int
    expires_at: int
    enabled: bool = True
    triggers: tuple[str, ...] = ("drift",)
    confidence_below: float = 0.6
    sample_rate: float = 0.001
    max_per_hour: int = 20
    max_bytes: int = 50 * 1000 * 1000
    retain_s: int = 14 * 86400
    labels_only: bool = False
    recipient: str = ""
    note: str = ""

    @property
    def recipient_id(self) -> str:
        """The capture key's id (SHA-256 hex of its raw public bytes), or '' when off."""
        return hashlib.sha256(base64.b64decode(self.recipient)).hexdigest() if self.recipient else ""

    def active(self, now: float) -> bool:
        return self.enabled and self.expires_at > now

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": CAPTURE_POLICY_SCHEMA,
            "schema_version": CAPTURE_POLICY_VERSION,
            "fleet": self.fleet,
            "seq": self.seq,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "enabled": self.enabled,
            "triggers": list(self.triggers),
            "confidence_below": self.confidence_below,
            "sample_rate": self.sample_rate,
            "max_per_hour": self.max_per_hour,
            "max_bytes": self.max_bytes,
            "retain_s": self.retain_s,
            "labels_only": self.labels_only,
            "recipient": self.recipient,
            "note": self.note,
        }

    def to_json(self) -> bytes:
        """Canonical bytes (sorted keys, no spaces, ASCII): what is signed."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes) -> CapturePolicy:
        """Decode and validate (no signature check); CaptureError ``malformed`` if bad."""
        try:
            doc = decode_json(
                bytes(data),
                CAPTURE_POLICY_SCHEMA,
                CAPTURE_POLICY_VERSION,
                "the capture policy",
                limit=MAX_POLICY_SIZE,
                error=CaptureError,
            )
        except CaptureError as exc:
            raise refuse(CaptureError, "malformed", str(exc)) from None
        if set(doc) != _POLICY_KEYS:
            raise refuse(
                CaptureError,
                "malformed",
                f"the capture policy must have exactly the fields {sorted(_POLICY_KEYS)}",
            )
        f = Fields(doc, "the capture policy", CaptureError, "malformed")
        try:
            fleet = check_fleet_id(doc["fleet"])
        except TopicError as exc:
            raise refuse(CaptureError, "malformed", f"the capture policy has an {exc}") from None
        triggers = doc["triggers"]
        if (
            not isinstance(triggers, list)
            or not all(t in TRIGGERS for t in triggers)
            or len(set(triggers)) != len(triggers)
        ):
            raise f.bad("triggers", f"a list of distinct triggers among {', '.join(TRIGGERS)}")
        recipient = f.required_text("recipient", 64)
        enabled = f.boolean("enabled")
        if enabled and (not triggers or not _is_key(recipient)):
            raise refuse(
                CaptureError,
                "malformed",
                "an enabled capture policy needs at least one trigger and the owner's capture public key",
            )
        issued = f.integer("issued_at", top=MAX_SEQ)
        expires = f.integer("expires_at", top=MAX_SEQ)
        if expires <= issued:
            raise refuse(CaptureError, "malformed", "the capture policy expires before it was issued")
        return cls(
            fleet=fleet,
            seq=f.integer("seq", top=MAX_SEQ, low=1),
            issued_at=issued,
            expires_at=expires,
            enabled=enabled,
            triggers=tuple(triggers),
            confidence_below=f.number("confidence_below", low=0.0, top=1.0),
            sample_rate=f.number("sample_rate", low=0.0, top=1.0),
            max_per_hour=f.integer("max_per_hour", top=1_000_000),
            max_bytes=f.integer("max_bytes", top=2**62),
            retain_s=f.integer("retain_s", top=10 * 366 * 86400, low=1),
            labels_only=f.boolean("labels_only"),
            recipient=recipient,
            note=f.required_text("note", MAX_NOTE),
        )

    def describe(self) -> str:
        """One line for owners: what this policy lets devices do."""
        if not self.enabled:
            return f"capture is off for fleet {self.fleet} (policy {self.seq})"
        what = "model outputs only" if self.labels_only else "inputs and model outputs"
        on = ", ".join(
            {
                "drift": "when drift is flagged",
                "low-confidence": f"when the top score is below {self.confidence_below:g}",
                "sample": f"a random {self.sample_rate:g} of predictions",
            }[t]
            for t in self.triggers
        )
        return (
            f"fleet {self.fleet} captures {what} {on}; at most {self.max_per_hour} an hour and "
            f"{self.max_bytes} bytes per device, each kept {self.retain_s // 86400 or 1} day(s) at most"
        )


def _is_key(value: str) -> bool:
    try:
        return len(base64.b64decode(value, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def new_capture_policy(
    fleet: str,
    *,
    seq: int,
    recipient: Optional[bytes] = None,
    enabled: bool = True,
    triggers: tuple[str, ...] = ("drift",),
    confidence_below: float = 0.6,
    sample_rate: float = 0.001,
    max_per_hour: int = 20,
    max_bytes: int = 50 * 1000 * 1000,
    retain_s: int = 14 * 86400,
    labels_only: bool = False,
    note: str = "",
    ttl: int = 365 * 86400,
    now: Optional[float] = None,
) -> CapturePolicy:
    """A policy issued now (or at ``now``), valid ``ttl`` seconds; ``recipient`` is the owner's raw
    32-byte X25519 public key (:attr:`CaptureKey.public_raw`). Validated: a bad argument fails here."""
    issued = int(time.time() if now is None else now)
    policy = CapturePolicy(
        fleet=fleet,
        seq=seq,
        issued_at=issued,
        expires_at=issued + ttl,
        enabled=enabled,
        triggers=tuple(triggers) if enabled else (),
        confidence_below=float(confidence_below),
        sample_rate=float(sample_rate),
        max_per_hour=max_per_hour,
        max_bytes=max_bytes,
        retain_s=retain_s,
        labels_only=labels_only,
        recipient=base64.b64encode(recipient).decode("ascii") if (recipient and enabled) else "",
        note=note,
    )
    return CapturePolicy.from_json(policy.to_json())


def sign_capture_policy(policy: CapturePolicy, key: SigningKey) -> bytes:
    """The signed envelope to publish, retained, on the fleet's capture topic."""
    return seal(policy.to_json(), CAPTURE_POLICY_SCHEMA, key)


def decode_capture_policy(data: bytes) -> CapturePolicy:
    """The policy in an envelope, WITHOUT checking the signature (for display only)."""
    return CapturePolicy.from_json(open_envelope(data, POLICY).payload)


def verify_capture_policy(
    data: bytes,
    trusted: TrustedKeys,
    *,
    fleet: str,
    last_seq: Optional[int] = None,
    now: Optional[float] = None,
) -> CapturePolicy:
    """Verify a signed capture policy for a device of ``fleet`` whose last applied policy had
    ``last_seq``. A policy turned off is returned (``enabled`` False) like any other; an expired
    one is refused (the device then captures nothing)."""
    policy = CapturePolicy.from_json(verify_envelope(data, trusted, POLICY).payload)
    if policy.fleet != fleet:
        raise refuse(
            CaptureError,
            "other-fleet",
            f"the capture policy is for fleet {policy.fleet!r}, not this device's fleet {fleet!r}",
        )
    moment = time.time() if now is None else now
    if policy.expires_at <= moment:
        raise refuse(
            CaptureError,
            "expired",
            f"the capture policy {policy.seq} expired; nothing is captured until the owner sets a new one",
        )
    if last_seq is not None and policy.seq <= last_seq:
        raise refuse(
            CaptureError,
            "replayed",
            f"the capture policy {policy.seq} is not newer than the one applied ({last_seq}): a replay",
        )
    return policy


# -- the owner's capture key ------------------------------------------------------------------------


class CaptureKey:
    """The owner's X25519 key pair for opening captured records. Never logged, never printed."""

    def __init__(self, private: Any) -> None:
        self._private = private
        from cryptography.hazmat.primitives import serialization

        self.public_raw: bytes = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.key_id = hashlib.sha256(self.public_raw).hexdigest()

    @classmethod
    def generate(cls) -> CaptureKey:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        return cls(X25519PrivateKey.generate())

    def private_pem(self, passphrase: Optional[bytes]) -> bytes:
        from cryptography.hazmat.primitives import serialization

        encryption: Any = (
            serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
        )
        return bytes(
            self._private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
            )
        )

    def public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return bytes(
            self._private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def open(self, sealed: bytes, info: bytes) -> bytes:
        """HPKE-open ``sealed``; CaptureError ``wrong-key``/``tampered`` when it does not open."""
        from cryptography.exceptions import InvalidTag

        try:
            return bytes(_hpke().decrypt(sealed, self._private, info=info))
        except (InvalidTag, ValueError):
            raise refuse(
                CaptureError,
                "tampered",
                "the record does not open: it was altered, cut short, or sealed to another capture key",
            ) from None

    def __repr__(self) -> str:
        return f"CaptureKey({self.key_id[:16]})"


def capture_key_paths(home: str | os.PathLike[str]) -> tuple[Path, Path]:
    keys = Path(home) / "keys"
    return keys / "capture.key.pem", keys / "capture.pub.pem"


def init_capture_key(
    home: str | os.PathLike[str], passphrase: Optional[bytes], force: bool = False
) -> CaptureKey:
    """Make the owner's capture key pair under ``home/keys`` (private 0600, passphrase-protected
    when one is given); refuses to replace one unless ``force`` (records sealed to the old key
    could no longer be opened)."""
    private, public = capture_key_paths(home)
    if private.exists() and not force:
        raise refuse(
            CaptureError,
            "exists",
            f"a capture key already exists at {private}; records sealed to it open only with it. "
            "Pass --force to replace it anyway",
        )
    private.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(private.parent, 0o700)
    key = CaptureKey.generate()
    atomic_write(private, key.private_pem(passphrase), mode=0o600)
    atomic_write(public, key.public_pem(), mode=0o644)
    return key


def load_capture_public(home: str | os.PathLike[str]) -> bytes:
    """The raw 32 bytes of the owner's capture public key (no passphrase needed)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    path = capture_key_paths(home)[1]
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise refuse(
            CaptureError, "no-key", f"no capture key at {path}; make one with `edgekit capture keys init`"
        ) from None
    except ValueError as exc:
        raise refuse(CaptureError, "no-key", f"{path} is not a PEM public key ({exc})") from None
    if not isinstance(key, X25519PublicKey):
        raise refuse(
            CaptureError, "no-key", f"{path} is not an X25519 key; make one with `edgekit capture keys init`"
        )
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_capture_key(home: str | os.PathLike[str], passphrase: Optional[bytes]) -> CaptureKey:
    """The owner's private capture key; CaptureError naming the fix when it cannot be read."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    path = capture_key_paths(home)[0]
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise refuse(
            CaptureError, "no-key", f"no capture key at {path}; make one with `edgekit capture keys init`"
        ) from None
    encrypted = b"ENCRYPTED" in pem.split(b"\n", 1)[0]
    if encrypted and not passphrase:
        raise refuse(
            CaptureError,
            "no-key",
            f"capture key {path} is protected by a passphrase; set EDGEKIT_CAPTURE_PASSPHRASE or enter it",
        )
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase if encrypted else None)
    except (ValueError, TypeError):
        raise refuse(CaptureError, "no-key", f"cannot open capture key {path}: wrong passphrase") from None
    if not isinstance(key, X25519PrivateKey):
        raise refuse(CaptureError, "no-key", f"{path} is not an X25519 capture key")
    return CaptureKey(key)


# -- acknowledgements ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptureAck:
    """The fleet's word to a device on ``devices/{device}/capture_ack``: these records are
    stored (``seqs``), or, with ``drop_all``, delete everything held (``capture purge``)."""

    device: str
    seqs: tuple[int, ...] = ()
    drop_all: bool = False

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "schema": CAPTURE_ACK_SCHEMA,
            "schema_version": CAPTURE_ACK_VERSION,
            "device": self.device,
            "seqs": list(self.seqs),
        }
        if self.drop_all:
            doc["drop_all"] = True
        return canonical_json(doc)

    @classmethod
    def from_json(cls, data: bytes) -> CaptureAck:
        """Decode with the shared strict decoder; CaptureError ``malformed`` naming the problem."""
        what = "the capture acknowledgement"
        doc = decode_json(
            bytes(data),
            CAPTURE_ACK_SCHEMA,
            CAPTURE_ACK_VERSION,
            what,
            limit=MAX_ACK_SIZE,
            error=CaptureError,
            reason="malformed",
        )
        f = Fields(doc, what, CaptureError, "malformed")
        seqs = f.array("seqs", MAX_ACK_SEQS)
        if not all(type(s) is int and 0 <= s <= MAX_SEQ for s in seqs):
            raise f.bad("seqs", f"a list of at most {MAX_ACK_SEQS} record numbers")
        return cls(f.id("device"), tuple(seqs), f.boolean("drop_all", False))


# -- records -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordHeader:
    """The clear part of a sealed record: routing, dedup and purge only."""

    fleet: str
    device: str
    seq: int
    key_id: str
    size: int

    def info(self) -> bytes:
        """The HPKE ``info``: what the ciphertext is bound to."""
        return (
            f"{RECORD_SCHEMA}/{RECORD_VERSION}/{self.fleet}/{self.device}/{self.seq}/{self.key_id}".encode()
        )


@dataclass(frozen=True)
class CapturedRecord:
    """An opened record: provenance and the input (None with ``labels_only``)."""

    header: RecordHeader
    time: float
    trigger: str
    bundle: dict[str, str]
    outputs: list[Any]
    policy_seq: int
    input_dtype: Optional[str] = None
    input_shape: Optional[tuple[int, ...]] = None
    input_bytes: Optional[bytes] = field(default=None, repr=False)

    @property
    def top_class(self) -> Optional[int]:
        first = self.outputs[0] if self.outputs else None
        flat = _flatten(first)
        return max(range(len(flat)), key=flat.__getitem__) if flat else None

    @property
    def top_score(self) -> Optional[float]:
        flat = _flatten(self.outputs[0] if self.outputs else None)
        return max(flat) if flat else None


def _flatten(value: Any, depth: int = 0) -> list[float]:
    if isinstance(value, list) and depth < 16:
        out: list[float] = []
        for v in value:
            out.extend(_flatten(v, depth + 1))
        return out
    return [float(value)] if isinstance(value, (int, float)) and math.isfinite(value) else []


def _frame(magic: bytes, header: dict[str, Any], body: bytes) -> bytes:
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("ascii")
    return magic + struct.pack(">H", len(head)) + head + body


def _unframe(magic: bytes, data: bytes, what: str) -> tuple[dict[str, Any], bytes]:
    if len(data) < 6 or data[:4] != magic:
        raise refuse(CaptureError, "malformed", f"{what} is not edgekit capture data")
    (size,) = struct.unpack(">H", data[4:6])
    if len(data) < 6 + size:
        raise refuse(CaptureError, "truncated", f"{what} is cut short")
    try:
        header = json.loads(data[6 : 6 + size])
    except (ValueError, RecursionError):
        raise refuse(CaptureError, "malformed", f"{what} has a damaged header") from None
    if not isinstance(header, dict):
        raise refuse(CaptureError, "malformed", f"{what} has a damaged header")
    return header, data[6 + size :]


def seal_record(
    policy: CapturePolicy,
    *,
    device: str,
    seq: int,
    time: float,
    trigger: str,
    bundle: dict[str, str],
    outputs: list[Any],
    input_array: Any = None,
) -> bytes:
    """The sealed record (clear header + HPKE ciphertext) for one capture under ``policy``.
    ``input_array`` is a numpy array (ignored with ``labels_only``); ``outputs`` JSON-able lists."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    body = b""
    meta: dict[str, Any] = {
        "schema": RECORD_SCHEMA,
        "schema_version": RECORD_VERSION,
        "time": time,
        "trigger": trigger,
        "bundle": bundle,
        "outputs": outputs,
        "policy_seq": policy.seq,
        "input": None,
    }
    if input_array is not None and not policy.labels_only:
        body = input_array.tobytes()
        meta["input"] = {"dtype": input_array.dtype.str, "shape": list(input_array.shape)}
    inner = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode("utf-8")
    plaintext = struct.pack(">I", len(inner)) + inner + body
    head = RecordHeader(policy.fleet, device, seq, policy.recipient_id, 0)
    public = X25519PublicKey.from_public_bytes(base64.b64decode(policy.recipient))
    sealed = bytes(_hpke().encrypt(plaintext, public, info=head.info()))
    header = {"fleet": head.fleet, "device": device, "seq": seq, "key": head.key_id, "size": len(sealed)}
    return _frame(_RECORD_MAGIC, header, sealed)


def record_header(data: bytes) -> RecordHeader:
    """The clear header of a sealed record (no decryption); CaptureError if it is not one."""
    header, sealed = _unframe(_RECORD_MAGIC, data, "the captured record")
    f = Fields(header, "the captured record", CaptureError, "malformed")
    head = RecordHeader(
        f.id("fleet"),
        f.id("device"),
        f.integer("seq", top=MAX_SEQ),
        f.sha256("key"),
        f.integer("size", top=MAX_RECORD_SIZE),
    )
    if len(sealed) < head.size:
        raise refuse(CaptureError, "truncated", f"record {head.seq} of device {head.device} is cut short")
    if len(sealed) > head.size:
        raise refuse(
            CaptureError, "malformed", f"record {head.seq} of device {head.device} has trailing bytes"
        )
    return head


def open_record(data: bytes, key: CaptureKey) -> CapturedRecord:
    """Open a sealed record with the owner's key; CaptureError (``wrong-key``, ``tampered``,
    ``truncated``, ``malformed``) naming the record when it cannot be."""
    head = record_header(data)
    name = f"record {head.seq} of device {head.device}"
    if head.key_id != key.key_id:
        raise refuse(
            CaptureError,
            "wrong-key",
            f"{name} is sealed to capture key {head.key_id[:16]}, not this one ({key.key_id[:16]}); "
            "open it with the key that was in the policy then",
        )
    try:
        plaintext = key.open(data[-head.size :] if head.size else b"", head.info())
    except CaptureError as exc:
        raise refuse(CaptureError, exc.reason, f"{name}: {exc}") from None
    if len(plaintext) < 4:
        raise refuse(CaptureError, "malformed", f"{name} is empty")
    (size,) = struct.unpack(">I", plaintext[:4])
    try:
        meta = decode_json(
            plaintext[4 : 4 + size], RECORD_SCHEMA, RECORD_VERSION, name, limit=16 * 2**20, error=CaptureError
        )
    except CaptureError as exc:
        raise refuse(CaptureError, "malformed", str(exc)) from None
    f = Fields(meta, name, CaptureError, "malformed")
    body = plaintext[4 + size :]
    dtype = shape = None
    spec = meta.get("input")
    if spec is not None:
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("shape"), list)
            or not isinstance(spec.get("dtype"), str)
        ):
            raise f.bad("input", "an object with dtype and shape")
        shape_list = spec["shape"]
        if len(shape_list) > 8 or not all(type(v) is int and 0 <= v <= 2**31 for v in shape_list):
            raise f.bad("input", "an object with dtype and a shape of at most 8 sizes")
        dtype, shape = spec["dtype"], tuple(shape_list)
        try:
            kind = np.dtype(dtype)
        except (TypeError, ValueError):
            raise f.bad("input", "an object with a numeric numpy dtype") from None
        if kind.kind not in "biuf":
            raise f.bad("input", "an object with a numeric numpy dtype")
        width = kind.itemsize
        if width * math.prod(shape) != len(plaintext) - 4 - size:
            raise refuse(CaptureError, "malformed", f"{name}: its input does not match its shape")
    outputs = meta.get("outputs")
    bundle = meta.get("bundle")
    if not isinstance(outputs, list) or not isinstance(bundle, dict):
        raise f.bad("outputs", "a list, with a bundle object")
    return CapturedRecord(
        header=head,
        time=f.time("time"),
        trigger=f.one_of("trigger", TRIGGERS),
        bundle={str(k): str(v) for k, v in bundle.items()},
        outputs=outputs,
        policy_seq=f.integer("policy_seq", top=MAX_SEQ),
        input_dtype=dtype,
        input_shape=shape,
        input_bytes=body if spec is not None else None,
    )


# -- chunks ----------------------------------------------------------------------------------------------


def split_chunks(record: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[bytes]:
    """The chunk messages of one sealed record, each at most ``chunk_size`` bytes of it plus a
    small header (device, seq, part, parts)."""
    head = record_header(record)
    parts = max(1, -(-len(record) // chunk_size))
    return [
        _frame(
            _CHUNK_MAGIC,
            {"device": head.device, "seq": head.seq, "part": i, "parts": parts},
            record[i * chunk_size : (i + 1) * chunk_size],
        )
        for i in range(parts)
    ]


@dataclass(frozen=True)
class Chunk:
    device: str
    seq: int
    part: int
    parts: int
    data: bytes


def parse_chunk(message: bytes) -> Chunk:
    header, data = _unframe(_CHUNK_MAGIC, message, "the capture chunk")
    f = Fields(header, "the capture chunk", CaptureError, "malformed")
    parts = f.integer("parts", low=1, top=MAX_RECORD_SIZE // 1024)
    return Chunk(f.id("device"), f.integer("seq", top=MAX_SEQ), f.integer("part", top=parts - 1), parts, data)


def join_chunks(chunks: list[bytes]) -> bytes:
    """The record the chunks (in part order) carried."""
    return b"".join(chunks)
