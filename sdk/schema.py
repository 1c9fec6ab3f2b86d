"""The wire schemas' shared parts: one strict JSON decoder, the id and digest patterns, and the
field checks every decoder uses, each raising the decoder's own typed error.

Every message or document edgekit reads off the wire or a disk (device reports, desired states,
manifests, calibration, capture records) is a versioned JSON object decoded by
:func:`decode_json` (a size cap before parsing, strict JSON: no NaN, Infinity, overflowing
numbers or lone surrogates, then the schema name and version; :func:`load_json` and
:func:`check_schema` are its two halves, for a document that words those refusals its own
way), and its fields checked through a
:class:`Fields` (types, ranges, lengths: a value a database column or a device cannot hold
never gets further). A refusal is the caller's error class (``MessageError``,
``DesiredStateError``, ...) with a stable one-word ``reason`` and a message naming the field
and what it must be. Unknown fields are ignored unless a decoder says otherwise
(:meth:`Fields.only`: the desired state and its shadow section refuse them).

Why a small helper of ours rather than a typed library (msgspec, pydantic): the decoders run on
devices too, down to 32-bit Raspberry Pi OS and Python 3.9, where msgspec has no wheel (checked:
aarch64 yes, armv7l no; CPython 3.9 aarch64 wheels stop at 0.20) and pydantic is heavy. On the
fleet, msgspec's typed decode of a telemetry record is 2.5-5x faster than ours (about 10 against
20-50 µs on a loaded 2-core machine): kept all the same, with the figures and when to revisit,
in BENCHMARKS.md, "Wire decoders".
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Optional, TypeVar

import orjson

from .errors import EdgekitError, MessageError

__all__ = [
    "BUNDLE_NAME",
    "ID",
    "MEMBER",
    "SHA256",
    "Fields",
    "canonical_json",
    "check_schema",
    "decode_json",
    "is_number",
    "load_json",
    "refuse",
]

#: Device, fleet, key and account ids: what topics and registry columns hold.
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: A bundle's name (lower case: it is a catalog and file name too).
BUNDLE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
#: A bundle member's file name.
MEMBER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
#: A SHA-256 digest, lower-case hex.
SHA256 = re.compile(r"^[0-9a-f]{64}$")

E = TypeVar("E", bound=EdgekitError)

MAX_COUNT = 2**31 - 1  # counts fit a 32-bit column
MAX_SEQ = 2**63 - 1
MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: every database's timestamps hold it


def refuse(error: type[E], reason: str, message: str) -> E:
    """``error(message)`` with its ``reason`` word set: the one way every decoder refuses."""
    refused = error(message)
    refused.reason = reason  # type: ignore[attr-defined]
    return refused


def canonical_json(doc: Any) -> bytes:
    """The one canonical encoding of a signed document: sorted keys, no whitespace, ASCII, no
    NaN. These exact bytes are what a key signs and what a TUF target hashes."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
        "ascii"
    )


def load_json(
    payload: bytes,
    what: str,
    *,
    limit: int,
    error: type[EdgekitError] = MessageError,
    reason: Optional[str] = None,
    hint: str = "",
    not_json: Optional[str] = None,
) -> Any:
    """Any strict JSON value (the first half of :func:`decode_json`, for a document whose schema
    line is checked with messages of its own): ``error`` with reason ``oversized`` or
    ``not_json`` (or ``reason`` for both), ``hint`` appended to the message; ``not_json``
    replaces the message of unparsable bytes (``{exc}`` in it is the parser's detail)."""
    if len(payload) > limit:
        raise refuse(
            error, reason or "oversized", f"{what} is {len(payload)} bytes, over the {limit}-byte limit{hint}"
        )
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        message = not_json.format(exc=exc) if not_json else f"{what} is not JSON ({exc}){hint}"
        raise refuse(error, reason or "not_json", message) from None


def decode_json(
    payload: bytes,
    schema: str,
    version: int,
    what: str,
    *,
    limit: int,
    error: type[EdgekitError] = MessageError,
    reason: Optional[str] = None,
) -> dict[str, Any]:
    """A JSON object of ``schema`` at ``version``, or ``error``: reasons ``oversized``,
    ``not_json``, ``wrong_schema``, ``wrong_version`` (or ``reason`` for every one). Strict JSON
    in UTF-8 (RFC 8259, parsed by orjson): every float of a decoded object is finite without
    walking it again."""
    doc = load_json(payload, what, limit=limit, error=error, reason=reason)
    return check_schema(doc, schema, version, what, error, reason=reason)


def check_schema(
    doc: Any,
    schema: str,
    version: int,
    what: str,
    error: type[EdgekitError] = MessageError,
    *,
    reason: Optional[str] = None,
    wrong_schema: Optional[str] = None,
    wrong_version: Optional[str] = None,
) -> dict[str, Any]:
    """``doc`` if it is an object naming ``schema`` at ``version``. ``wrong_schema`` and
    ``wrong_version`` replace the messages (``{found!r}`` in the second is the version found)."""
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        raise refuse(error, reason or "wrong_schema", wrong_schema or f"{what} is not an {schema} message")
    found = doc.get("schema_version")
    if type(found) is not int or found != version:
        message = (
            wrong_version.format(found=found)
            if wrong_version
            else f"{what} has unsupported schema_version {found!r}"
        )
        raise refuse(error, reason or "wrong_version", message)
    return doc


def is_number(value: Any) -> bool:
    """A JSON number (a bool is not one). ``type() is``: this runs per field per message."""
    return type(value) is float or type(value) is int


def is_finite(value: object, depth: int = 0) -> bool:
    """No NaN or infinity anywhere inside (a dict built elsewhere may carry them), nesting bounded."""
    if isinstance(value, float):
        return math.isfinite(value)
    if depth > 32:
        return False
    if isinstance(value, dict):
        return all(is_finite(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(is_finite(v, depth + 1) for v in value)
    return True


class Fields:
    """The field checks of one decoded object: each returns the value or raises ``error`` with
    ``reason`` and a message naming ``what``, the field, and what it must be."""

    __slots__ = ("doc", "error", "hint", "reason", "what")

    def __init__(
        self,
        doc: dict[str, Any],
        what: str,
        error: type[EdgekitError] = MessageError,
        reason: str = "bad_field",
        hint: str = "",
    ) -> None:
        self.doc = doc
        self.what = what
        self.error = error
        self.reason = reason
        self.hint = hint  # appended to the default messages ("; the bundle is corrupt")

    def bad(self, key: str, expected: str, message: Optional[str] = None) -> EdgekitError:
        """The refusal of ``key``; ``message``, when a decoder gives one, replaces the default
        "<what> field <key> must be <expected>" (every check below takes one)."""
        return refuse(
            self.error, self.reason, message or f"{self.what} field {key!r} must be {expected}{self.hint}"
        )

    def only(
        self, required: frozenset[str], optional: frozenset[str] = frozenset(), message: Optional[str] = None
    ) -> None:
        """Refuse a missing field of ``required`` or any field in neither set (a schema that says
        unknown fields are an error: signed documents, where an unread field is a lie)."""
        keys = self.doc.keys()
        if not required <= keys or not keys <= required | optional:
            default = f"{self.what} must have exactly the fields {sorted(required)}"
            if optional:
                default += f" (and optionally {', '.join(sorted(optional))})"
            raise refuse(self.error, self.reason, message or default + self.hint)

    def id(self, key: str, message: Optional[str] = None) -> str:
        value = self.doc.get(key)
        if type(value) is not str or not ID.match(value):
            raise self.bad(key, "an id (1-64 letters, digits, '.', '_', '-')", message)
        return value

    def sha256(self, key: str, message: Optional[str] = None) -> str:
        value = self.doc.get(key)
        if type(value) is not str or not SHA256.match(value):
            raise self.bad(key, "a SHA-256 (64 lower-case hex digits)", message)
        return value

    def text(
        self, key: str, limit: int, message: Optional[str] = None, default: Optional[str] = None
    ) -> Optional[str]:
        """A string of at most ``limit`` characters without NUL, or ``default`` when absent."""
        value = self.doc.get(key, default)
        if value is None:
            return None
        if type(value) is not str or len(value) > limit or "\0" in value:
            raise self.bad(key, f"a string of at most {limit} characters", message)
        return value

    def required_text(
        self, key: str, limit: int, message: Optional[str] = None, default: Optional[str] = None
    ) -> str:
        value = self.text(key, limit, message, default)
        if value is None:
            raise self.bad(key, f"a string of at most {limit} characters", message)
        return value

    def integer(
        self,
        key: str,
        default: Optional[int] = None,
        top: int = MAX_COUNT,
        low: int = 0,
        message: Optional[str] = None,
    ) -> int:
        value = self.doc.get(key, default)
        if type(value) is not int or not low <= value <= top:
            raise self.bad(key, f"an integer from {low} to {top}", message)
        return value

    def optional_integer(self, key: str, top: int = MAX_COUNT) -> Optional[int]:
        return None if self.doc.get(key) is None else self.integer(key, top=top)

    def number(
        self,
        key: str,
        default: Optional[float] = None,
        low: float = -math.inf,
        top: float = math.inf,
        message: Optional[str] = None,
    ) -> float:
        value: Any = self.doc.get(key, default)
        if not is_number(value) or not math.isfinite(value) or not low <= value <= top:
            raise self.bad(
                key, "a finite number" + (f" from {low:g} to {top:g}" if math.isfinite(low) else ""), message
            )
        return float(value)

    def optional_number(self, key: str) -> Optional[float]:
        value = self.doc.get(key)
        if value is None:
            return None
        if not is_number(value) or not math.isfinite(value):
            raise self.bad(key, "a finite number or null")
        return float(value)

    def time(self, key: str, default: Optional[float] = None) -> float:
        value: Any = self.doc.get(key, default)
        if not is_number(value) or not 0 <= value <= MAX_TIME:
            raise self.bad(key, "a unix time in seconds")
        return float(value)

    def boolean(self, key: str, default: Optional[bool] = None) -> bool:
        value = self.doc.get(key, default)
        if type(value) is not bool:
            raise self.bad(key, "true or false")
        return value

    def one_of(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.doc.get(key)
        if value not in choices:
            raise self.bad(key, f"one of {', '.join(choices)}")
        return str(value)

    def mapping(self, key: str, message: Optional[str] = None, default: Any = None) -> dict[str, Any]:
        value = self.doc.get(key, default)
        if type(value) is not dict:
            raise self.bad(key, "an object", message)
        return value

    def nested(self, key: str, what: str, message: Optional[str] = None) -> Fields:
        """The checks of the object at ``key``, refusing as this one does, naming ``what``."""
        return Fields(self.mapping(key, message), what, self.error, self.reason, self.hint)

    def array(self, key: str, limit: int, message: Optional[str] = None, default: Any = None) -> list[Any]:
        """A list of at most ``limit`` items (their checks are the caller's)."""
        value = self.doc.get(key, default)
        if type(value) is not list or len(value) > limit:
            raise self.bad(key, f"a list of at most {limit} items", message)
        return value

    def objects(self, key: str, what: str, limit: int, message: Optional[str] = None) -> list[Fields]:
        """The checks of each object of the list at ``key``, naming ``what``."""
        items = self.array(key, limit, message)
        if not all(type(item) is dict for item in items):
            raise self.bad(key, f"a list of at most {limit} objects", message)
        return [Fields(item, what, self.error, self.reason, self.hint) for item in items]
