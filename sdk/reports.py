"""What a device says about itself on its retained ``state`` topic.

A :class:`DeviceStateReport` is the one message the fleet (and ``edgekit push --wait``) reads
to know what a device serves and what it is doing: ``serving``, ``idle`` (nothing installed),
``downloading`` (with ``progress`` 0..1), ``verifying``, ``installing``, ``failed`` (with the
bundle and the reason; the previous bundle keeps serving), and ``offline`` (the MQTT will).
It is retained, so a workstation that connects later sees every device's last word.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any, Optional

from .errors import MessageError

__all__ = ["STATE_SCHEMA", "STATUSES", "DeviceStateReport", "decode_json_message"]

STATE_SCHEMA = "edgekit.state"
STATE_SCHEMA_VERSION = 1
STATUSES = ("serving", "idle", "downloading", "verifying", "installing", "failed", "offline")
#: Device messages larger than this are refused before parsing.
MAX_REPORT_SIZE = 256 * 1024


def decode_json_message(payload: bytes, schema: str, version: int, what: str) -> dict[str, Any]:
    """A JSON object of ``schema`` at ``version``, or MessageError: the one defensive decoder
    every device-to-fleet message goes through."""
    if len(payload) > MAX_REPORT_SIZE:
        raise MessageError(f"{what} is {len(payload)} bytes, over the {MAX_REPORT_SIZE}-byte limit")
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MessageError(f"{what} is not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        raise MessageError(f"{what} is not an {schema} message")
    if doc.get("schema_version") != version:
        raise MessageError(f"{what} has unsupported schema_version {doc.get('schema_version')!r}")
    return doc


def _opt_str(doc: dict[str, Any], key: str) -> Optional[str]:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise MessageError(f"state field {key!r} must be a string")
    return value


@dataclass(frozen=True)
class DeviceStateReport:
    device: str
    fleet: str
    status: str
    bundle_id: Optional[str] = None  # what it serves
    bundle_name: Optional[str] = None
    bundle_version: Optional[str] = None
    target_id: Optional[str] = None  # what it was told to serve (downloading/installing/failed)
    target_seq: Optional[int] = None
    progress: Optional[float] = None
    error: Optional[str] = None
    agent_version: Optional[str] = None
    time: float = 0.0

    @property
    def online(self) -> bool:
        return self.status != "offline"

    def to_json(self) -> bytes:
        doc = {"schema": STATE_SCHEMA, "schema_version": STATE_SCHEMA_VERSION, **self.__dict__}
        doc["time"] = self.time or time.time()
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> DeviceStateReport:
        doc = decode_json_message(payload, STATE_SCHEMA, STATE_SCHEMA_VERSION, "device state")
        device, fleet, status = doc.get("device"), doc.get("fleet"), doc.get("status")
        if not isinstance(device, str) or not isinstance(fleet, str):
            raise MessageError("device state must name its device and fleet")
        if status not in STATUSES:
            raise MessageError(f"device state has an unknown status {status!r}")
        progress = doc.get("progress")
        seq = doc.get("target_seq")
        stamp = doc.get("time", 0.0)
        if progress is not None and (
            isinstance(progress, bool) or not isinstance(progress, (int, float)) or not 0 <= progress <= 1
        ):
            raise MessageError("device state progress must be a number from 0 to 1")
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
            raise MessageError("device state target_seq must be an integer")
        if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or not math.isfinite(stamp):
            raise MessageError("device state time must be a number")
        return cls(
            device=device,
            fleet=fleet,
            status=status,
            bundle_id=_opt_str(doc, "bundle_id"),
            bundle_name=_opt_str(doc, "bundle_name"),
            bundle_version=_opt_str(doc, "bundle_version"),
            target_id=_opt_str(doc, "target_id"),
            target_seq=seq,
            progress=None if progress is None else float(progress),
            error=_opt_str(doc, "error"),
            agent_version=_opt_str(doc, "agent_version"),
            time=float(stamp),
        )
