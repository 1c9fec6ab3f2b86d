"""edgekit's MQTT topic layout, and parsing a topic back into its parts.

With the default prefix ``edgekit``::

    edgekit/fleets/{fleet}/desired              retained, signed desired state of a fleet
    edgekit/devices/{device}/desired            retained, signed per-device override (canaries)
    edgekit/fleets/{fleet}/trust/root/{version} retained, every TUF root of the fleet (a chain)
    edgekit/fleets/{fleet}/trust/{role}         retained, TUF metadata: timestamp, snapshot,
                                                targets, desired (edgekit.roles)
    edgekit/fleets/{fleet}/trust/upgrade        retained, the one-time signed move to TUF
    edgekit/bundles/{sha256}/manifest           retained, manifest.json + manifest.sig
    edgekit/bundles/{sha256}/chunks/{i}         retained, raw bytes of transport chunk i
    edgekit/devices/{device}/state              retained, the device's state (will: offline)
    edgekit/devices/{device}/telemetry          telemetry records, QoS 1
    edgekit/devices/{device}/events             install / verify / health-check / error events
    edgekit/fleets/{fleet}/capture              retained, the signed capture policy (docs/capture.md)
    edgekit/devices/{device}/capture            chunks of sealed capture records, QoS 1
    edgekit/devices/{device}/capture_ack        the fleet's acknowledgements of those records
    edgekit/fleets/{fleet}/bench                retained, the signed bench request (docs/bench.md)
    edgekit/devices/{device}/bench              the device's bench reports, QoS 1

``{sha256}`` is the bundle digest: the SHA-256 of the bundle's exact ``manifest.json`` bytes
(see :attr:`edgekit.bundle.Bundle.bundle_id`). Fleet and device ids are 1-64 characters of
letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit, so they can never
hold a wildcard or a level separator. Pure string logic, no paho.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from .errors import TopicError
from .schema import ID, SHA256

__all__ = ["DEFAULT_PREFIX", "TopicParts", "Topics", "check_device_id", "check_fleet_id"]

DEFAULT_PREFIX = "edgekit"
MAX_CHUNKS = 10_000_000
_INDEX = re.compile(r"^(0|[1-9][0-9]{0,6})$")
_TRUST_NAME = re.compile(r"^(root/[1-9][0-9]{0,8}|timestamp|snapshot|targets|desired|upgrade)$")
_PREFIX_LEVEL = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

FLEET_DESIRED = "fleet_desired"
DEVICE_DESIRED = "device_desired"
BUNDLE_MANIFEST = "bundle_manifest"
BUNDLE_CHUNK = "bundle_chunk"
DEVICE_STATE = "device_state"
DEVICE_TELEMETRY = "device_telemetry"
DEVICE_EVENTS = "device_events"
FLEET_CAPTURE = "fleet_capture"
DEVICE_CAPTURE = "device_capture"
DEVICE_CAPTURE_ACK = "device_capture_ack"
FLEET_BENCH = "fleet_bench"
DEVICE_BENCH = "device_bench"
_DEVICE_LEAVES = {
    "desired": DEVICE_DESIRED,
    "state": DEVICE_STATE,
    "telemetry": DEVICE_TELEMETRY,
    "events": DEVICE_EVENTS,
    "capture": DEVICE_CAPTURE,
    "capture_ack": DEVICE_CAPTURE_ACK,
    "bench": DEVICE_BENCH,
}
_FLEET_LEAVES = {"desired": FLEET_DESIRED, "capture": FLEET_CAPTURE, "bench": FLEET_BENCH}


def _check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not ID.match(value):
        raise TopicError(
            f"invalid {what} id {value!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', '+', '#')"
        )
    return value


def check_device_id(device: object) -> str:
    """``device`` if it is a valid device id, else TopicError."""
    return _check_id(device, "device")


def check_fleet_id(fleet: object) -> str:
    """``fleet`` if it is a valid fleet id, else TopicError."""
    return _check_id(fleet, "fleet")


def _check_sha256(digest: object) -> str:
    if not isinstance(digest, str) or not SHA256.match(digest):
        raise TopicError(f"invalid bundle digest {digest!r}: expected 64 lowercase hex digits (SHA-256)")
    return digest


@dataclass(frozen=True)
class TopicParts:
    """What :meth:`Topics.parse` found: the kind (one of the module's kind constants, e.g.
    ``"device_state"``) and the ids the topic carries."""

    kind: str
    fleet: Optional[str] = None
    device: Optional[str] = None
    sha256: Optional[str] = None
    chunk: Optional[int] = None


class Topics:
    """Topic names under a configurable prefix (default ``edgekit``; may have several levels,
    e.g. ``acme/edgekit``)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        levels = prefix.split("/")
        if not all(_PREFIX_LEVEL.match(level) for level in levels):
            raise TopicError(
                f"invalid topic prefix {prefix!r}: use levels of letters, digits, '.', '_' or '-' "
                "separated by '/' (no wildcards, no leading '$' or '/')"
            )
        self.prefix = prefix
        self._depth = len(levels)

    def __repr__(self) -> str:
        return f"Topics({self.prefix!r})"

    # -- building -----------------------------------------------------------------------------

    def fleet_desired(self, fleet: str) -> str:
        return f"{self.prefix}/fleets/{check_fleet_id(fleet)}/desired"

    def fleet_trust(self, fleet: str, name: str) -> str:
        """A fleet's TUF metadata: ``name`` is a role, ``root/<version>`` or ``upgrade``."""
        if not _TRUST_NAME.match(name):
            raise TopicError(f"invalid trust metadata name {name!r}: a role, root/<version> or upgrade")
        return f"{self.prefix}/fleets/{check_fleet_id(fleet)}/trust/{name}"

    def fleet_trust_filter(self, fleet: str) -> str:
        """Subscription filter for all of a fleet's TUF metadata."""
        return f"{self.prefix}/fleets/{check_fleet_id(fleet)}/trust/#"

    def trust_name(self, fleet: str, topic: str) -> str:
        """The ``name`` of a fleet trust topic (see :meth:`fleet_trust`); TopicError otherwise."""
        base = f"{self.prefix}/fleets/{check_fleet_id(fleet)}/trust/"
        name = topic[len(base) :] if isinstance(topic, str) and topic.startswith(base) else ""
        if not _TRUST_NAME.match(name):
            raise TopicError(f"{topic!r} is not a trust metadata topic of fleet {fleet}")
        return name

    def device_desired(self, device: str) -> str:
        return f"{self.prefix}/devices/{check_device_id(device)}/desired"

    def device_state(self, device: str) -> str:
        return f"{self.prefix}/devices/{check_device_id(device)}/state"

    def device_telemetry(self, device: str) -> str:
        return f"{self.prefix}/devices/{check_device_id(device)}/telemetry"

    def device_events(self, device: str) -> str:
        return f"{self.prefix}/devices/{check_device_id(device)}/events"

    def fleet_capture(self, fleet: str) -> str:
        """The fleet's signed capture policy (retained)."""
        return f"{self.prefix}/fleets/{check_fleet_id(fleet)}/capture"

    def device_capture(self, device: str) -> str:
        """Chunks of the device's sealed capture records (QoS 1)."""
        return f"{self.prefix}/devices/{check_device_id(device)}/capture"

    def device_capture_ack(self, device: str) -> str:
        """The fleet's acknowledgements of the device's capture records."""
        return f"{self.prefix}/devices/{check_device_id(device)}/capture_ack"

    def fleet_bench(self, fleet: str) -> str:
        """The fleet's signed bench request (retained, docs/bench.md)."""
        return f"{self.prefix}/fleets/{check_fleet_id(fleet)}/bench"

    def device_bench(self, device: str) -> str:
        """The device's bench reports (QoS 1)."""
        return f"{self.prefix}/devices/{check_device_id(device)}/bench"

    def bundle_manifest(self, sha256: str) -> str:
        return f"{self.prefix}/bundles/{_check_sha256(sha256)}/manifest"

    def bundle_chunk(self, sha256: str, index: int) -> str:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_CHUNKS:
            raise TopicError(f"invalid chunk index {index!r}")
        return f"{self.prefix}/bundles/{_check_sha256(sha256)}/chunks/{index}"

    def bundle_chunks_filter(self, sha256: str) -> str:
        """Subscription filter for every chunk of one bundle."""
        return f"{self.prefix}/bundles/{_check_sha256(sha256)}/chunks/+"

    def all_devices_filter(self, leaf: str) -> str:
        """Subscription filter for one leaf (``state``, ``telemetry``, ``events``) of every device."""
        if leaf not in ("state", "telemetry", "events", "desired", "capture", "bench"):
            raise TopicError(
                f"unknown device topic {leaf!r}; use state, telemetry, events, desired, capture or bench"
            )
        return f"{self.prefix}/devices/+/{leaf}"

    # -- parsing ------------------------------------------------------------------------------

    def parse(self, topic: str) -> TopicParts:
        """The parts of an edgekit topic; TopicError for anything else (wildcards, bad ids,
        other prefixes, unknown leaves)."""
        if not isinstance(topic, str) or "+" in topic or "#" in topic or "\0" in topic:
            raise TopicError(f"{topic!r} is not an edgekit topic (wildcards are not topics)")
        levels = topic.split("/")
        if "/".join(levels[: self._depth]) != self.prefix:
            raise TopicError(f"{topic!r} is not under the topic prefix {self.prefix!r}")
        rest = levels[self._depth :]
        if len(rest) == 3 and rest[0] == "fleets" and rest[2] in _FLEET_LEAVES:
            return TopicParts(_FLEET_LEAVES[rest[2]], fleet=check_fleet_id(rest[1]))
        if len(rest) == 3 and rest[0] == "devices" and rest[2] in _DEVICE_LEAVES:
            return TopicParts(_DEVICE_LEAVES[rest[2]], device=check_device_id(rest[1]))
        if len(rest) == 3 and rest[0] == "bundles" and rest[2] == "manifest":
            return TopicParts(BUNDLE_MANIFEST, sha256=_check_sha256(rest[1]))
        if len(rest) == 4 and rest[0] == "bundles" and rest[2] == "chunks":
            if not _INDEX.match(rest[3]):
                raise TopicError(f"{topic!r} has an invalid chunk index {rest[3]!r}")
            return TopicParts(BUNDLE_CHUNK, sha256=_check_sha256(rest[1]), chunk=int(rest[3]))
        raise TopicError(f"{topic!r} is not an edgekit topic")
