"""The signed envelope: the one JSON wrapper of every document a fleet signs for its devices
(desired states, capture policies). It carries the payload bytes, what they are, the signer's
key id and an Ed25519 signature over the payload::

    {"schema": "edgekit.signed", "schema_version": 1, "payload_type": "edgekit.desired",
     "payload": BASE64, "signer": KEY_ID, "signature": BASE64}

:func:`seal` makes one; :func:`open_envelope` checks its shape and returns the parts (for
display: nothing verified); :func:`verify_envelope` also checks the signature against the keys a
device trusts. Each refusal raises the document's own error class (``DesiredStateError``,
``CaptureError``) with a ``reason`` a device reports: ``unsigned``, ``malformed``, ``untrusted``
or ``forged``. No I/O here: bytes in, verified bytes out.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from .errors import EdgekitError, SignatureError, UntrustedKeyError
from .keys import SigningKey
from .schema import SHA256, refuse
from .trust import TrustedKeys

__all__ = [
    "ENVELOPE_SCHEMA",
    "ENVELOPE_SCHEMA_VERSION",
    "Envelope",
    "Kind",
    "open_envelope",
    "seal",
    "verify_envelope",
]

ENVELOPE_SCHEMA = "edgekit.signed"
ENVELOPE_SCHEMA_VERSION = 1
_KEYS = {"schema", "schema_version", "payload_type", "payload", "signer", "signature"}


@dataclass(frozen=True)
class Kind:
    """What an envelope must hold, and how its refusals read."""

    payload_type: str  # the payload's own schema, e.g. "edgekit.desired"
    what: str  # "the desired state": how messages name the document
    error: type[EdgekitError]  # the class every refusal raises
    max_size: int  # bytes of the whole message
    how_to_sign: str  # the command that publishes it signed, for the `unsigned` refusal
    untrusted_fix: str = ""  # what to do when the signer is not trusted (appended to that refusal)


@dataclass(frozen=True)
class Envelope:
    payload: bytes
    signer: str  # key id (SHA-256 of the public key), as claimed: verified by verify_envelope only
    signature: bytes


def seal(payload: bytes, payload_type: str, key: SigningKey) -> bytes:
    """The signed envelope (JSON bytes) of ``payload``, to publish retained."""
    envelope = {
        "schema": ENVELOPE_SCHEMA,
        "schema_version": ENVELOPE_SCHEMA_VERSION,
        "payload_type": payload_type,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signer": key.key_id,
        "signature": base64.b64encode(key.sign(payload)).decode("ascii"),
    }
    return json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode("ascii")


def open_envelope(data: bytes, kind: Kind) -> Envelope:
    """The parts of a signed envelope of ``kind``, its shape checked, its signature NOT."""

    def bad(reason: str, message: str) -> EdgekitError:
        return refuse(kind.error, reason, message)

    if not isinstance(data, (bytes, bytearray)):
        raise bad("malformed", f"{kind.what} must be bytes")
    if not data:
        raise bad("unsigned", f"{kind.what} message is empty (cleared); there is nothing to apply")
    if len(data) > kind.max_size:
        raise bad("malformed", f"{kind.what} message is over {kind.max_size} bytes; refusing it")
    try:
        envelope = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("malformed", f"{kind.what} message is not JSON") from None
    if not isinstance(envelope, dict):
        raise bad("malformed", f"{kind.what} message is not a signed envelope")
    if envelope.get("schema") == kind.payload_type:
        raise bad("unsigned", f"{kind.what} is unsigned; publish it with a signature ({kind.how_to_sign})")
    if envelope.get("schema") != ENVELOPE_SCHEMA or set(envelope) != _KEYS:
        raise bad("malformed", f"{kind.what} message is not an edgekit signed envelope")
    version = envelope["schema_version"]
    if version != ENVELOPE_SCHEMA_VERSION or isinstance(version, bool):
        raise bad("malformed", f"signed envelope version {version!r} is not supported; upgrade edgekit")
    if envelope["payload_type"] != kind.payload_type:
        raise bad("malformed", f"the signed envelope holds {envelope['payload_type']!r}, not {kind.what}")
    signer = envelope["signer"]
    if not isinstance(signer, str) or not SHA256.match(signer):
        raise bad("unsigned", f"{kind.what} names no valid signer key id")
    signature = _b64(envelope["signature"], "signature", kind)
    if not signature:
        raise bad("unsigned", f"{kind.what} has an empty signature; it is unsigned")
    return Envelope(_b64(envelope["payload"], "payload", kind), signer, signature)


def verify_envelope(data: bytes, trusted: TrustedKeys, kind: Kind) -> Envelope:
    """:func:`open_envelope`, then the signature checked against ``trusted``."""
    opened = open_envelope(data, kind)
    try:
        trusted.verify(opened.payload, opened.signature, opened.signer, kind.what)
    except UntrustedKeyError:
        fix = f"; {kind.untrusted_fix}" if kind.untrusted_fix else ""
        raise refuse(
            kind.error,
            "untrusted",
            f"{kind.what} is signed by key {opened.signer[:16]}, which this device does not trust{fix}",
        ) from None
    except SignatureError:
        raise refuse(
            kind.error,
            "forged",
            f"{kind.what}'s signature does not verify: it was altered after signing, or forged",
        ) from None
    return opened


def _b64(value: object, what: str, kind: Kind) -> bytes:
    if isinstance(value, str) and value.isascii():
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            pass
    raise refuse(kind.error, "malformed", f"{kind.what} envelope's {what} is not base64")
