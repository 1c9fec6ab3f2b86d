"""The signed desired state: which bundle a fleet (or one device) should run.

A :class:`DesiredState` names the bundle by its digest (the SHA-256 of its ``manifest.json``
bytes), its name and version, and carries a sequence number that must only grow and an
expiry. It travels in a signed envelope (one JSON object)::

    {
      "schema": "edgekit.signed", "schema_version": 1,
      "payload_type": "edgekit.desired",
      "payload": "<base64 of the canonical JSON bytes of the document>",
      "signer": "<key id: SHA-256 hex of the Ed25519 public key>",
      "signature": "<base64 of the raw 64-byte Ed25519 signature over the payload bytes>"
    }

The signature covers the exact payload bytes, so verifying never depends on re-serializing
JSON; the payload names its own schema, so a signed manifest can never pass for a desired
state. Canonical JSON: sorted keys, no spaces, ASCII only.

Verification is pure (bytes and keys in, a verified :class:`DesiredState` out, or a
:class:`~edgekit.errors.DesiredStateError` whose ``reason`` is one of ``unsigned``,
``untrusted``, ``forged``, ``malformed``, ``other-fleet``, ``other-device``, ``expired``,
``replayed``). A device keeps one sequence counter for its fleet's and its own documents
(both are numbered from one counter per fleet) and applies only a document whose ``seq`` is
higher than the last one it applied. A rollback is a new, higher-numbered document that
points at an older bundle.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from .envelope import Kind, open_envelope, seal, verify_envelope
from .errors import BundleError, DesiredStateError, TopicError
from .keys import SigningKey
from .manifest import check_name, check_version
from .schema import Fields, canonical_json, check_schema, load_json, refuse
from .topics import check_device_id, check_fleet_id
from .trust import TrustedKeys

__all__ = [
    "DESIRED_SCHEMA_VERSION",
    "LONGEST_S",
    "DesiredState",
    "ShadowRequest",
    "decode_desired_state",
    "new_desired_state",
    "sign_desired_state",
    "verify_desired_state",
]

DESIRED_SCHEMA = "edgekit.desired"
DESIRED_SCHEMA_VERSION = 1
#: The longest a shadow, a rollout's phase or a timeout may last, in seconds (365 days): a
#: document's times must stay within the calendar (``_format_time``), and longer is a typo.
LONGEST_S = 365 * 86400
#: Refuse envelopes larger than this before parsing anything.
MAX_ENVELOPE_SIZE = 64 * 1024
MAX_SEQ = 2**53 - 1
DEFAULT_TTL = 30 * 24 * 3600
DESIRED = Kind(
    payload_type=DESIRED_SCHEMA,
    what="the desired state",
    error=DesiredStateError,
    max_size=MAX_ENVELOPE_SIZE,
    how_to_sign="`edgekit push`",
    untrusted_fix="sign it with a key in the device's trusted keys",
)
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_DOC_KEYS = frozenset(
    {
        "schema",
        "schema_version",
        "fleet",
        "device",
        "bundle",
        "seq",
        "issued_at",
        "expires_at",
    }
)
_WHAT = "the desired state"
_BUNDLE_FIELDS = "the desired state's bundle must have sha256, name and version"


#: The optional shadow section's fields (docs/shadow.md); ``devices`` is optional too.
_SHADOW_KEYS = frozenset({"sha256", "name", "version", "sample", "until"})
#: At most this many devices named in a shadow section (the envelope's size bounds it anyway).
MAX_SHADOW_DEVICES = 1000


def _format_time(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime(_TIME_FORMAT)


def _parse_time(value: object, what: str) -> int:
    if not isinstance(value, str) or not _TIME.match(value):
        raise refuse(
            DesiredStateError,
            "malformed",
            f"the desired state's {what} is not a UTC time like 2026-01-31T12:00:00Z",
        )
    try:  # the pattern above fixed the format; fromisoformat checks the date (strptime is slow)
        moment = datetime.fromisoformat(value[:-1]).replace(tzinfo=timezone.utc)
    except ValueError:
        raise refuse(
            DesiredStateError, "malformed", f"the desired state's {what} {value!r} is not a valid date"
        ) from None
    return int(moment.timestamp())


@dataclass(frozen=True)
class ShadowRequest:
    """A candidate bundle to try in the shadow of the serving one (docs/shadow.md): devices
    fetch, verify and load it beside the serving model and compare a ``sample`` share of live
    inputs until ``until`` (UNIX seconds). It never answers a request.

    In JSON it is the desired state's optional ``shadow`` section; a document without one is
    byte for byte what agents before it read. Those older agents refuse a document that has one
    (``malformed``: "must have exactly the fields ..."), keep serving what they serve, and say so
    in a ``desired_refused`` event: a shadow needs agents of edgekit 0.3 or later.

    ``devices`` (sorted device ids, or None: every device the document reaches) names the
    devices asked to try the candidate; the others ignore the section (``push --shadow
    --devices N``). Agents before it refuse a section that has it, as above."""

    bundle_sha256: str
    bundle_name: str
    bundle_version: str
    sample: float
    until: int
    devices: Optional[tuple[str, ...]] = None

    def asks(self, device: Optional[str]) -> bool:
        """Whether ``device`` is asked to try the candidate."""
        return self.devices is None or device in self.devices

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "sha256": self.bundle_sha256,
            "name": self.bundle_name,
            "version": self.bundle_version,
            "sample": self.sample,
            "until": _format_time(self.until),
        }
        if self.devices is not None:  # only then: agents before it read the rest unchanged
            doc["devices"] = list(self.devices)
        return doc

    @classmethod
    def from_dict(cls, doc: object) -> ShadowRequest:
        fields = (
            f"the desired state's shadow section must have exactly the fields {sorted(_SHADOW_KEYS)} "
            "(and optionally devices)"
        )
        if type(doc) is not dict:
            raise refuse(DesiredStateError, "malformed", fields)
        f = Fields(doc, "the desired state's shadow section", DesiredStateError, "malformed")
        f.only(_SHADOW_KEYS, frozenset({"devices"}), fields)
        digest = f.sha256("sha256", "the shadow candidate's sha256 is not 64 lowercase hex digits")
        name, version = _name_version(f, "the shadow section names an")
        rate = "the shadow sample rate must be a number above 0 and at most 1"
        sample = f.number("sample", low=0.0, top=1.0, message=rate)
        if sample == 0:
            raise refuse(DesiredStateError, "malformed", rate)
        devices = _shadow_devices(doc["devices"]) if "devices" in doc else None
        return cls(digest, name, version, sample, _parse_time(doc["until"], "shadow until"), devices)


def _shadow_devices(value: object) -> tuple[str, ...]:
    """The shadow section's ``devices``: a non-empty, sorted list of distinct device ids."""
    if (
        not isinstance(value, list)
        or not 0 < len(value) <= MAX_SHADOW_DEVICES
        or not all(isinstance(d, str) for d in value)
    ):
        raise refuse(
            DesiredStateError,
            "malformed",
            f"the shadow section's devices must be a list of 1 to {MAX_SHADOW_DEVICES} device ids",
        )
    try:
        devices = tuple(check_device_id(d) for d in value)
    except TopicError as exc:
        raise refuse(DesiredStateError, "malformed", f"the shadow section names an {exc}") from None
    if list(devices) != sorted(set(devices)):
        raise refuse(
            DesiredStateError, "malformed", "the shadow section's devices must be sorted and distinct"
        )
    return devices


@dataclass(frozen=True)
class DesiredState:
    """What a fleet, or with ``device`` set one device of it, should run.

    ``issued_at`` and ``expires_at`` are UNIX seconds (UTC); in JSON they are ISO-8601 strings.
    """

    fleet: str
    bundle_sha256: str
    bundle_name: str
    bundle_version: str
    seq: int
    issued_at: int
    expires_at: int
    device: Optional[str] = None
    schema_version: int = DESIRED_SCHEMA_VERSION
    #: A candidate to try in the shadow of the serving bundle, or None (docs/shadow.md).
    shadow: Optional[ShadowRequest] = None

    @property
    def scope(self) -> str:
        """``fleet shop-cams`` or ``device cam-3 of fleet shop-cams``, for messages."""
        return f"fleet {self.fleet}" if self.device is None else f"device {self.device} of fleet {self.fleet}"

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "schema": DESIRED_SCHEMA,
            "schema_version": self.schema_version,
            "fleet": self.fleet,
            "device": self.device,
            "bundle": {
                "sha256": self.bundle_sha256,
                "name": self.bundle_name,
                "version": self.bundle_version,
            },
            "seq": self.seq,
            "issued_at": _format_time(self.issued_at),
            "expires_at": _format_time(self.expires_at),
        }
        if self.shadow is not None:  # only then: older agents read the rest unchanged
            doc["shadow"] = self.shadow.to_dict()
        return doc

    def to_json(self) -> bytes:
        """Canonical bytes: sorted keys, no whitespace, ASCII. These bytes are what is signed."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes) -> DesiredState:
        """Decode and validate a document (no signature check) with the shared strict decoder
        (:mod:`edgekit.schema`): exactly the known fields, no NaN or Infinity; DesiredStateError
        ``malformed`` naming what is wrong."""
        doc = check_schema(
            load_json(
                bytes(data),
                _WHAT,
                limit=MAX_ENVELOPE_SIZE,
                error=DesiredStateError,
                reason="malformed",
                not_json="the desired state is not valid JSON",
            ),
            DESIRED_SCHEMA,
            DESIRED_SCHEMA_VERSION,
            _WHAT,
            DesiredStateError,
            reason="malformed",
            wrong_schema="the signed document is not an edgekit desired state",
            wrong_version="desired state schema version {found!r} is not supported "
            f"(this edgekit reads {DESIRED_SCHEMA_VERSION}); upgrade edgekit",
        )
        f = Fields(doc, _WHAT, DesiredStateError, "malformed")
        f.only(
            _DOC_KEYS,
            frozenset({"shadow"}),
            f"the desired state must have exactly the fields {sorted(_DOC_KEYS)}",
        )
        bundle = f.nested("bundle", "the desired state's bundle", _BUNDLE_FIELDS)
        bundle.only(frozenset({"sha256", "name", "version"}), message=_BUNDLE_FIELDS)
        seq = f.integer(
            "seq",
            low=1,
            top=MAX_SEQ,
            message=f"the desired state's seq must be an integer from 1 to {MAX_SEQ}",
        )
        digest = bundle.sha256("sha256", "the desired state's bundle sha256 is not 64 lowercase hex digits")
        try:
            fleet = check_fleet_id(doc["fleet"])
            device = None if doc["device"] is None else check_device_id(doc["device"])
        except TopicError as exc:
            raise refuse(DesiredStateError, "malformed", f"the desired state has an {exc}") from None
        name, version = _name_version(bundle, "the desired state names an")
        issued = _parse_time(doc["issued_at"], "issued_at")
        expires = _parse_time(doc["expires_at"], "expires_at")
        if expires <= issued:
            raise refuse(DesiredStateError, "malformed", "the desired state expires before it was issued")
        shadow = ShadowRequest.from_dict(doc["shadow"]) if "shadow" in doc else None
        return cls(
            fleet=fleet,
            bundle_sha256=digest,
            bundle_name=name,
            bundle_version=version,
            seq=seq,
            issued_at=issued,
            expires_at=expires,
            device=device,
            shadow=shadow,
        )


def _name_version(f: Fields, prefix: str) -> tuple[str, str]:
    """A bundle's name and version, by the rules bundles follow (shared with them)."""
    name, version = f.doc.get("name"), f.doc.get("version")
    try:
        return check_name(name if type(name) is str else ""), check_version(
            version if type(version) is str else ""
        )
    except BundleError as exc:
        raise refuse(DesiredStateError, "malformed", f"{prefix} {exc}") from None


def new_desired_state(
    fleet: str,
    *,
    bundle_sha256: str,
    bundle_name: str,
    bundle_version: str,
    seq: int,
    device: Optional[str] = None,
    ttl: int = DEFAULT_TTL,
    now: Optional[float] = None,
    shadow: Optional[ShadowRequest] = None,
) -> DesiredState:
    """A desired state issued now (or at ``now``) that expires ``ttl`` seconds later."""
    issued = int(time.time() if now is None else now)
    state = DesiredState(
        fleet=fleet,
        bundle_sha256=bundle_sha256,
        bundle_name=bundle_name,
        bundle_version=bundle_version,
        seq=seq,
        issued_at=issued,
        expires_at=issued + ttl,
        device=device,
        shadow=shadow,
    )
    # Round-trip through the validator so a bad argument fails here, not on every device.
    return DesiredState.from_json(state.to_json())


def sign_desired_state(state: DesiredState, key: SigningKey) -> bytes:
    """The signed envelope (JSON bytes) to publish, retained, on the desired-state topic."""
    return seal(state.to_json(), DESIRED_SCHEMA, key)


def decode_desired_state(data: bytes) -> tuple[DesiredState, str]:
    """The document and its claimed signer, WITHOUT checking the signature (for display only)."""
    opened = open_envelope(data, DESIRED)
    return DesiredState.from_json(opened.payload), opened.signer


def verify_desired_state(
    data: bytes,
    trusted: TrustedKeys,
    *,
    fleet: str,
    device: Optional[str] = None,
    last_seq: Optional[int] = None,
    now: Optional[float] = None,
) -> DesiredState:
    """Verify a signed desired-state envelope for a receiver and return the document.

    ``fleet`` and ``device`` are who is asking: a fleet-wide document must be for ``fleet``;
    a per-device document for ``device`` (of ``fleet``). ``last_seq`` is the highest sequence
    number already applied (None: nothing yet); the document's must be higher. Refuses, with a
    DesiredStateError saying why: unsigned, untrusted key, bad signature, malformed, other
    fleet, other device, expired, replayed (lower or equal seq).
    """
    state = DesiredState.from_json(verify_envelope(data, trusted, DESIRED).payload)
    if state.fleet != fleet:
        raise refuse(
            DesiredStateError,
            "other-fleet",
            f"the desired state is for fleet {state.fleet!r}, not this device's fleet {fleet!r}",
        )
    if state.device is not None and state.device != device:
        raise refuse(
            DesiredStateError,
            "other-device",
            f"the desired state is for device {state.device!r}, not {device!r}",
        )
    moment = time.time() if now is None else now
    if state.expires_at <= moment:
        raise refuse(
            DesiredStateError,
            "expired",
            f"the desired state (seq {state.seq}) expired at {_format_time(state.expires_at)}; "
            "the operator must publish a fresh one (or the device clock is wrong)",
        )
    if last_seq is not None and state.seq <= last_seq:
        what = "is the one already applied" if state.seq == last_seq else "is older than the one applied"
        raise refuse(
            DesiredStateError,
            "replayed",
            f"the desired state has seq {state.seq}, which {what} (seq {last_seq}); "
            "a replay or a stale retained message, ignoring it",
        )
    return state
