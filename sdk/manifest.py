"""The bundle manifest: plain, frozen data with a versioned JSON form.

The manifest is what a bundle's signature covers. It lists every other member with its size
and SHA-256, the model's input/output signature and ops, the health check's tolerances, and
the chunk plan used when the bundle travels over MQTT. Decoding validates every field and
raises :class:`~edgekit.errors.BundleError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ._version import __version__
from .errors import BundleError
from .schema import BUNDLE_NAME, MEMBER, SHA256
from .tflite import TensorSpec

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MANIFEST_SCHEMA_VERSION",
    "ChunkPlan",
    "FileEntry",
    "HealthCheckSpec",
    "Manifest",
    "parse_version",
]

MANIFEST_SCHEMA = "edgekit.manifest"
MANIFEST_SCHEMA_VERSION = 1
DEFAULT_CHUNK_SIZE = 128 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
#: The largest MQTT packet edgekit ever sends: a chunk of the largest chunk size, its topic and
#: headers (manifest messages, desired states and reports are far smaller). Devices ask the
#: broker never to send them more (MQTT 5 Maximum Packet Size), the generated Mosquitto config
#: accepts no more from anyone: an endless message is cut off at the broker.
MAX_MESSAGE_SIZE = MAX_CHUNK_SIZE + 64 * 1024

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$"
)
ROLES = ("model", "labels", "baseline", "calibration", "healthcheck", "model_card")


def parse_version(text: str) -> tuple[int, int, int, tuple[tuple[int, int | str], ...]]:
    """A sortable key for a semantic version (``1.2.3``, ``1.2.3-rc.1``); ValueError if invalid.

    Pre-releases sort before the release, as semver says.
    """
    match = _SEMVER.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a semantic version like 1.2.3")
    major, minor, patch, pre = match.groups()
    if pre is None:
        # A release sorts after any of its pre-releases.
        pre_key: tuple[tuple[int, int | str], ...] = ((2, 0),)
    else:
        pre_key = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))
    return int(major), int(minor), int(patch), pre_key


def check_name(name: str) -> str:
    if not BUNDLE_NAME.match(name):
        raise BundleError(
            f"invalid bundle name {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_version(version: str) -> str:
    try:
        parse_version(version)
    except ValueError as exc:
        raise BundleError(f"invalid version: {exc}") from None
    return version


@dataclass(frozen=True)
class FileEntry:
    """One member of the bundle other than the manifest and its signature."""

    name: str
    role: str
    size: int
    sha256: str


@dataclass(frozen=True)
class HealthCheckSpec:
    """Where the health-check samples live and how close a device's outputs must come."""

    file: str
    samples: int
    atol: float
    rtol: float


@dataclass(frozen=True)
class ChunkPlan:
    """How the bundle's members (concatenated in manifest order) are cut for transport."""

    chunk_size: int
    total_size: int
    sha256: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    created_at: str
    signer: str
    files: tuple[FileEntry, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ops: tuple[str, ...]
    chunks: ChunkPlan
    healthcheck: HealthCheckSpec | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    min_agent_version: str = __version__
    tflite_schema_version: int = 3

    def file(self, role: str) -> FileEntry | None:
        """The member with ``role`` (model, labels, baseline, calibration, healthcheck, model_card), if any."""
        for entry in self.files:
            if entry.role == role:
                return entry
        return None

    @property
    def model_file(self) -> FileEntry:
        entry = self.file("model")
        if entry is None:  # from_json guarantees one; kept for type narrowing
            raise BundleError("the manifest names no model file")
        return entry

    @property
    def label(self) -> str:
        """``name@version``, how logs and messages name a bundle."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": MANIFEST_SCHEMA,
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "name": self.name,
            "version": self.version,
            "created_at": self.created_at,
            "signer": self.signer,
            "min_agent_version": self.min_agent_version,
            "files": [
                {"name": f.name, "role": f.role, "size": f.size, "sha256": f.sha256} for f in self.files
            ],
            "model": {
                "file": self.model_file.name,
                "format": "tflite",
                "tflite_schema_version": self.tflite_schema_version,
                "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs],
                "ops": list(self.ops),
            },
            "healthcheck": None
            if self.healthcheck is None
            else {
                "file": self.healthcheck.file,
                "samples": self.healthcheck.samples,
                "atol": self.healthcheck.atol,
                "rtol": self.healthcheck.rtol,
            },
            "preprocessing": self.preprocessing,
            "transport": {
                "chunk_size": self.chunks.chunk_size,
                "total_size": self.chunks.total_size,
                "chunks": list(self.chunks.sha256),
            },
        }

    def to_json(self) -> bytes:
        """The canonical bytes that get signed: sorted keys, two-space indent, trailing newline."""
        return (json.dumps(self.to_dict(), sort_keys=True, indent=2, allow_nan=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise BundleError(f"manifest.json is not valid JSON ({exc}); the bundle is corrupt") from None
        try:
            return cls._from_dict(doc)
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise BundleError(f"manifest.json is malformed ({detail}); the bundle is corrupt") from None

    @classmethod
    def _from_dict(cls, doc: Any) -> Manifest:
        if not isinstance(doc, dict) or doc.get("schema") != MANIFEST_SCHEMA:
            raise BundleError("manifest.json is not an edgekit manifest; the bundle is corrupt")
        if doc.get("schema_version") != MANIFEST_SCHEMA_VERSION:
            raise BundleError(
                f"manifest schema version {doc.get('schema_version')!r} is not supported by edgekit "
                f"{__version__} (supports {MANIFEST_SCHEMA_VERSION}); upgrade edgekit"
            )
        files = []
        seen: set[str] = set()
        for item in doc["files"]:
            name, role, size, digest = item["name"], item["role"], item["size"], item["sha256"]
            if not isinstance(name, str) or not MEMBER.match(name) or name.startswith("manifest."):
                raise BundleError(f"manifest lists an invalid member name {name!r}")
            if name in seen:
                raise BundleError(f"manifest lists member {name!r} twice")
            seen.add(name)
            if role not in ROLES:
                raise BundleError(f"manifest gives member {name!r} an unknown role {role!r}")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise BundleError(f"manifest gives member {name!r} an invalid size {size!r}")
            if not isinstance(digest, str) or not SHA256.match(digest):
                raise BundleError(f"manifest gives member {name!r} an invalid SHA-256")
            files.append(FileEntry(name=name, role=role, size=size, sha256=digest))
        roles = [f.role for f in files]
        if roles.count("model") != 1 or any(roles.count(r) > 1 for r in ROLES):
            raise BundleError("manifest must name exactly one model and at most one member per role")
        model = doc["model"]
        if model.get("format") != "tflite" or model.get("file") != next(
            f.name for f in files if f.role == "model"
        ):
            raise BundleError("manifest's model section does not match its model member")
        hc = doc.get("healthcheck")
        healthcheck = None
        if hc is not None:
            healthcheck = HealthCheckSpec(
                file=str(hc["file"]),
                samples=int(hc["samples"]),
                atol=float(hc["atol"]),
                rtol=float(hc["rtol"]),
            )
            if healthcheck.file not in seen:
                raise BundleError("manifest's health check names a member that is not in the bundle")
        transport = doc["transport"]
        chunk_size = transport["chunk_size"]
        total = transport["total_size"]
        chunks = tuple(transport["chunks"])
        if not isinstance(chunk_size, int) or not 1024 <= chunk_size <= MAX_CHUNK_SIZE:
            raise BundleError(f"manifest has an invalid chunk size {chunk_size!r}")
        if total != sum(f.size for f in files) or len(chunks) != -(-total // chunk_size):
            raise BundleError("manifest's chunk plan does not match its members")
        if not all(isinstance(c, str) and SHA256.match(c) for c in chunks):
            raise BundleError("manifest's chunk plan has an invalid SHA-256")
        preprocessing = doc.get("preprocessing", {})
        if not isinstance(preprocessing, dict):
            raise BundleError("manifest's preprocessing must be an object")
        signer = doc["signer"]
        if not isinstance(signer, str) or not SHA256.match(signer):
            raise BundleError("manifest's signer is not a key id")
        created_at = doc["created_at"]
        min_agent = doc.get("min_agent_version", "0.0.0")
        if not isinstance(created_at, str) or not isinstance(min_agent, str):
            raise BundleError("manifest's created_at and min_agent_version must be strings")
        return cls(
            name=check_name(doc["name"]) if isinstance(doc["name"], str) else check_name(repr(doc["name"])),
            version=check_version(doc["version"]) if isinstance(doc["version"], str) else check_version(""),
            created_at=created_at,
            signer=signer,
            files=tuple(files),
            inputs=tuple(TensorSpec.from_dict(t) for t in model["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in model["outputs"]),
            ops=tuple(str(op) for op in model["ops"]),
            chunks=ChunkPlan(chunk_size=chunk_size, total_size=total, sha256=chunks),
            healthcheck=healthcheck,
            preprocessing=preprocessing,
            min_agent_version=min_agent,
            tflite_schema_version=int(model.get("tflite_schema_version", 3)),
        )
