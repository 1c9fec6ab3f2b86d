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
from .schema import BUNDLE_NAME, MEMBER, SHA256, Fields, check_schema, is_number, load_json
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
#: The largest manifest.json decoded (bundles refuse one over 1 MiB before it; a manifest message
#: carries it in base64 within 2 MiB).
MAX_MANIFEST_SIZE = 2 * 1024 * 1024
MAX_SIZE = 2**63 - 1
MAX_TENSORS = 4096  # inputs, outputs and ops of one model
MAX_DIMS = 32
MAX_CHANNELS = 65536  # per-channel quantization parameters of one tensor
_WHAT = "manifest.json"
_CORRUPT = "; the bundle is corrupt"

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
        """Decode ``manifest.json`` with the shared strict decoder (:mod:`edgekit.schema`: no
        NaN, Infinity or overflowing numbers, every field's type and range checked); BundleError
        naming what is wrong. Unknown fields are ignored (the signature covers the bytes)."""
        doc = check_schema(
            load_json(
                bytes(data),
                _WHAT,
                limit=MAX_MANIFEST_SIZE,
                error=BundleError,
                reason="malformed",
                hint=_CORRUPT,
                not_json="manifest.json is not valid JSON ({exc})" + _CORRUPT,
            ),
            MANIFEST_SCHEMA,
            MANIFEST_SCHEMA_VERSION,
            _WHAT,
            BundleError,
            reason="malformed",
            wrong_schema=f"manifest.json is not an edgekit manifest{_CORRUPT}",
            wrong_version=f"manifest schema version {{found!r}} is not supported by edgekit {__version__} "
            f"(supports {MANIFEST_SCHEMA_VERSION}); upgrade edgekit",
        )
        f = Fields(doc, _WHAT, BundleError, "malformed", _CORRUPT)
        files = []
        seen: set[str] = set()
        for item in f.objects("files", "manifest.json file entry", len(ROLES)):
            name, role = item.doc.get("name"), item.doc.get("role")
            if type(name) is not str or not MEMBER.match(name) or name.startswith("manifest."):
                raise BundleError(f"manifest lists an invalid member name {name!r}")
            if name in seen:
                raise BundleError(f"manifest lists member {name!r} twice")
            seen.add(name)
            if type(role) is not str or role not in ROLES:
                raise BundleError(f"manifest gives member {name!r} an unknown role {role!r}")
            size = item.integer(
                "size",
                top=MAX_SIZE,
                message=f"manifest gives member {name!r} an invalid size {item.doc.get('size')!r}",
            )
            digest = item.sha256("sha256", message=f"manifest gives member {name!r} an invalid SHA-256")
            files.append(FileEntry(name=name, role=role, size=size, sha256=digest))
        roles = [e.role for e in files]
        if roles.count("model") != 1 or any(roles.count(r) > 1 for r in ROLES):
            raise BundleError("manifest must name exactly one model and at most one member per role")
        model = f.nested("model", "manifest.json model")
        if model.doc.get("format") != "tflite" or model.doc.get("file") != next(
            e.name for e in files if e.role == "model"
        ):
            raise BundleError("manifest's model section does not match its model member")
        healthcheck = None
        if doc.get("healthcheck") is not None:
            hc = f.nested("healthcheck", "manifest.json healthcheck")
            healthcheck = HealthCheckSpec(
                file=hc.required_text("file", 100),
                samples=hc.integer("samples"),
                atol=hc.number("atol", low=0.0),
                rtol=hc.number("rtol", low=0.0),
            )
            if healthcheck.file not in seen:
                raise BundleError("manifest's health check names a member that is not in the bundle")
        transport = f.nested("transport", "manifest.json transport")
        chunk_size = transport.integer(
            "chunk_size",
            low=1024,
            top=MAX_CHUNK_SIZE,
            message=f"manifest has an invalid chunk size {transport.doc.get('chunk_size')!r}",
        )
        mismatch = "manifest's chunk plan does not match its members"
        total = transport.integer("total_size", top=MAX_SIZE, message=mismatch)
        chunks = tuple(transport.array("chunks", MAX_MANIFEST_SIZE // 66, message=mismatch))
        if total != sum(e.size for e in files) or len(chunks) != -(-total // chunk_size):
            raise BundleError(mismatch)
        if not all(type(c) is str and SHA256.match(c) for c in chunks):
            raise BundleError("manifest's chunk plan has an invalid SHA-256")
        preprocessing = f.mapping(
            "preprocessing", message="manifest's preprocessing must be an object", default={}
        )
        signer = f.sha256("signer", message="manifest's signer is not a key id")
        strings = "manifest's created_at and min_agent_version must be strings"
        created_at = f.required_text("created_at", 64, message=strings)
        min_agent = f.required_text("min_agent_version", 64, message=strings, default="0.0.0")
        name, version = doc.get("name"), doc.get("version")
        return cls(
            name=check_name(name if type(name) is str else repr(name)),
            version=check_version(version if type(version) is str else ""),
            created_at=created_at,
            signer=signer,
            files=tuple(files),
            inputs=tuple(_tensor(t) for t in model.objects("inputs", "manifest.json input", MAX_TENSORS)),
            outputs=tuple(_tensor(t) for t in model.objects("outputs", "manifest.json output", MAX_TENSORS)),
            ops=tuple(_ops(model)),
            chunks=ChunkPlan(chunk_size=chunk_size, total_size=total, sha256=chunks),
            healthcheck=healthcheck,
            preprocessing=preprocessing,
            min_agent_version=min_agent,
            tflite_schema_version=model.integer("tflite_schema_version", default=3),
        )


def _ops(model: Fields) -> list[str]:
    ops = model.array("ops", MAX_TENSORS)
    if not all(type(op) is str and 0 < len(op) <= 256 for op in ops):
        raise model.bad("ops", "a list of operator names")
    return ops


def _tensor(t: Fields) -> TensorSpec:
    """One input or output of the manifest's model section (what :meth:`TensorSpec.to_dict` wrote)."""
    quant = t.nested("quantization", f"{t.what} quantization") if t.doc.get("quantization") else None
    shape = _ints(t, "shape", MAX_DIMS, low=-1)
    signature = _ints(t, "shape_signature", MAX_DIMS, low=-1) if t.doc.get("shape_signature") else shape
    return TensorSpec(
        name=t.required_text("name", 4096),
        index=t.integer("index"),
        shape=shape,
        dtype=t.required_text("dtype", 32),
        scale=tuple(_numbers(quant, "scale")) if quant else (),
        zero_point=_ints(quant, "zero_point", MAX_CHANNELS, low=-(2**31), default=[]) if quant else (),
        quantized_dimension=quant.integer("quantized_dimension", default=0) if quant else 0,
        shape_signature=signature,
    )


def _ints(f: Fields, key: str, limit: int, low: int, default: Any = None) -> tuple[int, ...]:
    values = f.array(key, limit, default=default)
    if not all(type(v) is int and low <= v <= 2**31 - 1 for v in values):
        raise f.bad(key, f"a list of at most {limit} integers from {low} to {2**31 - 1}")
    return tuple(values)


def _numbers(f: Fields, key: str) -> list[float]:
    values = f.array(key, MAX_CHANNELS, default=[])
    if not all(is_number(v) for v in values):  # strict JSON: every number is finite
        raise f.bad(key, f"a list of at most {MAX_CHANNELS} numbers")
    return [float(v) for v in values]
