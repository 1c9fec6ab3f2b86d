"""A deployment: the device's way from the bundle it serves to the one its desired state names.

An explicit state machine, modelled on the Mender client's deployment states: each state is
written to ``state_dir/deployment.json`` (atomically: :func:`edgekit.atomic.atomic_write`)
*before* it runs, so a kill -9 or a power cut at any moment finds, at the next start, the
state it was in, and :func:`on_restart` says where to go on from there::

    idle ─▶ fetching ─▶ verifying ─▶ installing ─▶ health-checking ─▶ serving
               │            │             │               │
               └────────────┴─────────────┴───────────────┴──▶ rolled-back

``fetching``
    the chunks come from the broker into ``state_dir/downloads/DIGEST`` (each chunk checked
    against the signed plan as it lands). Killed here: the next start fetches on from the
    chunks already stored. A newer desired state naming another bundle preempts it (the
    download is cancelled and removed); stopping the agent cancels it (kept, resumed later).
``verifying``
    the bundle's signature (again, against this store's keys), size and version are checked.
    Killed here: the download is complete on disk; the next start re-hashes it and goes on.
``installing``
    the bundle's directory is made durable and renamed into ``bundles/``. Killed here: the
    store's recovery at start removes what the pointer does not name; the deployment starts
    over from ``fetching`` (what is left of the download is reused).
``health-checking``
    the model loads and runs the bundle's health check; the pointer (``installed.json``) is
    flipped only after it passes. Killed here after the flip: the new bundle serves, the
    deployment is ``serving``. Killed before it: the first time, the deployment starts over
    (a power cut); the second time, it is ``rolled-back`` and the bundle marked failed: a model
    that kills the agent while it loads (out of memory, a crash in the runtime) must not put
    the device in a restart loop.
``serving``
    the device serves what its desired state names; nothing to resume.
``rolled-back``
    the deployment failed (a refused, corrupt or unhealthy bundle, a full disk): the bundle
    served before it never stopped being the committed one and serves on. Nothing to resume;
    a new desired state starts a new deployment.

A newer desired state always starts a new deployment; what this module persists is the one
in progress (the signed desired state included, so a restart resumes it without waiting for
the broker's retained copy).

Fault injection (for tests): with ``EDGEKIT_FAULT_PAUSE_AT=STATE`` in its environment, the
agent stops when it enters STATE, just after persisting it, writes
``edgekit fault point: paused at STATE`` on stderr and waits there until it is killed
(tests/faults/test_agent_kill9.py kills it with SIGKILL in each state). Unset: no effect.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from edgekit.atomic import atomic_write

__all__ = [
    "ACTIVE",
    "DEPLOYMENT_FILE",
    "FAULT_PAUSE_ENV",
    "FETCHING",
    "HEALTH_CHECKING",
    "IDLE",
    "INSTALLING",
    "MAX_HEALTH_CHECK_INTERRUPTIONS",
    "ROLLED_BACK",
    "SERVING",
    "STATES",
    "VERIFYING",
    "DeploymentRecord",
    "fault_point",
    "load_deployment",
    "on_restart",
    "save_deployment",
]

log = logging.getLogger(__name__)

DEPLOYMENT_FILE = "deployment.json"
SCHEMA = "edgekit.agent.deployment"
SCHEMA_VERSION = 1

IDLE = "idle"
FETCHING = "fetching"
VERIFYING = "verifying"
INSTALLING = "installing"
HEALTH_CHECKING = "health-checking"
SERVING = "serving"
ROLLED_BACK = "rolled-back"
STATES = (IDLE, FETCHING, VERIFYING, INSTALLING, HEALTH_CHECKING, SERVING, ROLLED_BACK)
#: States a deployment is still under way in: a restart resumes it.
ACTIVE = (FETCHING, VERIFYING, INSTALLING, HEALTH_CHECKING)
#: Health checks of one deployment cut short by the agent dying that are retried; one more
#: and the deployment is rolled back.
MAX_HEALTH_CHECK_INTERRUPTIONS = 1

FAULT_PAUSE_ENV = "EDGEKIT_FAULT_PAUSE_AT"


@dataclass(frozen=True)
class DeploymentRecord:
    """The deployment as persisted: its state, and what it deploys (the bundle, and the signed
    desired state that named it, to resume without the broker)."""

    state: str = IDLE
    seq: Optional[int] = None
    bundle_id: Optional[str] = None
    name: Optional[str] = None
    version: Optional[str] = None
    envelope: Optional[bytes] = None  # the signed desired state, as received
    #: Health checks of this deployment cut short by the agent dying (see on_restart).
    interrupted: int = 0
    error: Optional[str] = None
    updated_at: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}" if self.name else "no bundle"

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "state": self.state,
            "seq": self.seq,
            "bundle_id": self.bundle_id,
            "name": self.name,
            "version": self.version,
            "envelope": base64.b64encode(self.envelope).decode("ascii") if self.envelope else None,
            "interrupted": self.interrupted,
            "error": self.error,
            "updated_at": self.updated_at,
        }
        return (json.dumps(doc, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> DeploymentRecord:
        """Decode a persisted record; ValueError if it is not one."""
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise ValueError("not an edgekit deployment record")
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"deployment record version {doc.get('schema_version')!r} is not supported")
        state = doc.get("state")
        if state not in STATES:
            raise ValueError(f"unknown deployment state {state!r}")
        seq, interrupted = doc.get("seq"), doc.get("interrupted", 0)
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
            raise ValueError("the deployment's seq is not an integer")
        if isinstance(interrupted, bool) or not isinstance(interrupted, int):
            raise ValueError("the deployment's interruption count is not an integer")
        texts = {}
        for key in ("bundle_id", "name", "version", "envelope", "error"):
            value = doc.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"the deployment's {key} is not a string")
            texts[key] = value
        try:
            envelope = base64.b64decode(texts["envelope"], validate=True) if texts["envelope"] else None
        except (binascii.Error, ValueError):
            raise ValueError("the deployment's desired state is not base64") from None
        if state in ACTIVE and (seq is None or texts["bundle_id"] is None or envelope is None):
            raise ValueError(f"a deployment in state {state} must name its desired state and bundle")
        updated = doc.get("updated_at", 0.0)
        return cls(
            state=state,
            seq=seq,
            bundle_id=texts["bundle_id"],
            name=texts["name"],
            version=texts["version"],
            envelope=envelope,
            interrupted=interrupted,
            error=texts["error"],
            updated_at=float(updated) if isinstance(updated, (int, float)) else 0.0,
        )


def load_deployment(state_dir: Path) -> Optional[DeploymentRecord]:
    """The deployment persisted in ``state_dir`` (``idle`` if there is none); None if the file
    is damaged (the caller says so and starts from ``idle``)."""
    try:
        return DeploymentRecord.from_json((Path(state_dir) / DEPLOYMENT_FILE).read_bytes())
    except FileNotFoundError:
        return DeploymentRecord()
    except (OSError, ValueError, RecursionError):
        return None


def save_deployment(state_dir: Path, record: DeploymentRecord) -> DeploymentRecord:
    """Persist ``record`` atomically (OSError if the disk refuses); returns it as written."""
    record = replace(record, updated_at=time.time())
    atomic_write(Path(state_dir) / DEPLOYMENT_FILE, record.to_json())
    return record


def on_restart(record: DeploymentRecord, serving_id: Optional[str]) -> DeploymentRecord:
    """Where a deployment found on disk at start goes on (pure: the module docstring's table).

    ``serving_id`` is the id of the bundle the recovered store serves. Returns the record with
    the state to run next: itself for a finished deployment (idle, serving, rolled-back);
    ``serving`` if the bundle it deploys is the one served (killed after the commit);
    ``rolled-back`` (with the reason) after too many health checks cut short; else
    ``fetching``, from which the deployment resumes.
    """
    if record.state not in ACTIVE:
        return record
    if record.bundle_id is not None and record.bundle_id == serving_id:
        return replace(record, state=SERVING, error=None)
    if record.state == HEALTH_CHECKING:
        interrupted = record.interrupted + 1
        if interrupted > MAX_HEALTH_CHECK_INTERRUPTIONS:
            return replace(
                record,
                state=ROLLED_BACK,
                interrupted=interrupted,
                error=(
                    f"the agent stopped dead {interrupted} times while checking the health of "
                    f"{record.label} (out of memory, a crash in the model runtime, or power cuts); "
                    "it was not installed and the previous bundle serves on. Check the model fits "
                    "this device, then publish a new desired state to try again"
                ),
            )
        return replace(record, state=FETCHING, interrupted=interrupted)
    return replace(record, state=FETCHING)


def fault_point(state: str) -> None:
    """The fault-injection point of the kill -9 tests (module docstring): pause for ever in
    ``state`` when ``EDGEKIT_FAULT_PAUSE_AT`` names it; no effect otherwise."""
    if os.environ.get(FAULT_PAUSE_ENV) != state:
        return
    sys.stderr.write(f"edgekit fault point: paused at {state}\n")
    sys.stderr.flush()
    threading.Event().wait()  # until SIGKILL
