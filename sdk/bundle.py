"""Signed model bundles (``.ekb``): create them, and read them without trusting them.

A bundle is an uncompressed POSIX tar holding ``manifest.json``, ``manifest.sig`` (the raw
64-byte Ed25519 signature over the manifest's exact bytes), the model and optional members
(``labels.txt``, ``baseline.json``, ``calibration.json``, ``healthcheck.npz``, ``model_card.md``).

Reading is defensive. Sizes are checked before anything is read; the tar parser here accepts
regular files with plain names only (no directories, links, devices, paths, long-name or pax
headers, duplicates); the signature is checked before the manifest is parsed; and every
member is hashed against the signed manifest before a :class:`Bundle` is returned. Every failure is a :class:`~edgekit.errors.BundleError`.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import re
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .atomic import atomic_write, fsync_dir
from .baseline import Baseline, compute_baseline
from .calibration import Calibration, fit_calibration
from .data import fit_to_input, load_data
from .errors import BundleError, DataError, ModelFormatError, SignatureError, UntrustedKeyError
from .healthcheck import HEALTHCHECK_FILE, make_healthcheck
from .keys import SigningKey
from .manifest import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    ChunkPlan,
    FileEntry,
    Manifest,
    check_name,
    check_version,
)
from .runtime import Model, dequantize, quantize
from .schema import MEMBER
from .tflite import TensorSpec, inspect_tflite
from .trust import TrustedKeys

__all__ = [
    "MAX_BUNDLE_SIZE",
    "Bundle",
    "ExtractedBundle",
    "check_members",
    "chunk_plan",
    "create_bundle",
    "extract_bundle",
    "inspect_bundle",
    "manifest_id",
    "read_bundle",
    "verify_manifest_signature",
]

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
MODEL_FILE = "model.tflite"
LABELS_FILE = "labels.txt"
BASELINE_FILE = "baseline.json"
CALIBRATION_FILE = "calibration.json"
MODEL_CARD_FILE = "model_card.md"

#: Largest bundle read by default (the agent's config can lower it).
MAX_BUNDLE_SIZE = 1024 * 1024 * 1024
MAX_MANIFEST_SIZE = 1024 * 1024
MAX_MEMBERS = 16
BASELINE_MODEL_SAMPLES = 1000
CALIBRATION_MAX_SAMPLES = 20000
_BLOCK = 512
_TYPE_NAMES = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"5": "a directory",
    b"6": "a FIFO",
    b"7": "a contiguous file",
    b"x": "a pax extended header",
    b"g": "a pax global header",
    b"L": "a GNU long name",
    b"K": "a GNU long link name",
}


@dataclass(frozen=True)
class Bundle:
    """A bundle whose members all match its manifest. ``signer`` is the trusted key id that
    verified it, or None when it was only inspected (integrity checked, trust not)."""

    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    signer: str | None
    members: Mapping[str, bytes]
    size: int

    @property
    def bundle_id(self) -> str:
        """The bundle's identity: the SHA-256 of its signed ``manifest.json`` bytes.

        The manifest commits to every member by hash, so this names the whole content; unlike
        a hash of the ``.ekb`` file, a device that receives the bundle in chunks can compute it.
        Desired states and MQTT topics name bundles by it.
        """
        return manifest_id(self.manifest_bytes)

    def member(self, role: str) -> bytes | None:
        entry = self.manifest.file(role)
        return None if entry is None else self.members[entry.name]

    @property
    def model(self) -> bytes:
        return self.members[self.manifest.model_file.name]

    def labels(self) -> list[str] | None:
        data = self.member("labels")
        return None if data is None else data.decode("utf-8").splitlines()

    def baseline(self) -> Baseline | None:
        data = self.member("baseline")
        return None if data is None else Baseline.from_json(data)

    def calibration(self) -> Calibration | None:
        data = self.member("calibration")
        return None if data is None else Calibration.from_json(data)

    def extract(self, directory: str | os.PathLike[str]) -> None:
        """Write the manifest, signature and members into ``directory``, durably (fsync)."""
        _write_files(
            Path(directory),
            {MANIFEST_FILE: self.manifest_bytes, SIGNATURE_FILE: self.signature, **self.members},
        )


@dataclass(frozen=True)
class ExtractedBundle:
    """A bundle file that :func:`extract_bundle` verified while writing it out to ``directory``.
    ``members`` holds every member but the model, whose bytes are on disk only (a runtime maps
    the file instead of holding a copy)."""

    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    signer: str
    members: Mapping[str, bytes]
    directory: Path
    size: int

    @property
    def bundle_id(self) -> str:
        return manifest_id(self.manifest_bytes)


def _write_files(directory: Path, files: Mapping[str, bytes | memoryview]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        with open(directory / name, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    fsync_dir(directory)


# -- reading ----------------------------------------------------------------------------------


def _octal(field: bytes, what: str) -> int:
    text = field.rstrip(b"\0 ").lstrip(b" ")
    if not text:
        return 0
    if not re.fullmatch(rb"[0-7]+", text):
        raise BundleError(f"the bundle's tar header has an invalid {what} field; the file is corrupt")
    return int(text, 8)


def _read_tar(data: bytes | memoryview) -> dict[str, Any]:
    """Members by name: slices of ``data`` (bytes of bytes, zero-copy views of a memoryview)."""
    members: dict[str, Any] = {}
    pos = 0
    size = len(data)
    while True:
        if pos + _BLOCK > size:
            raise BundleError("the bundle is truncated (it ends inside a tar header); copy it again")
        header = bytes(data[pos : pos + _BLOCK])
        if header == bytes(_BLOCK):
            if any(data[pos:]):
                raise BundleError("the bundle has data after its end-of-archive marker; it was tampered with")
            if size - pos < 2 * _BLOCK or size % _BLOCK:
                raise BundleError(
                    "the bundle is truncated (its end-of-archive marker is cut short); copy it again"
                )
            break
        if header[257:262] != b"ustar":
            raise BundleError(
                "not an edgekit bundle (no POSIX tar header); create one with `edgekit bundle create`"
            )
        stored = _octal(header[148:156], "checksum")
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise BundleError("the bundle's tar header checksum is wrong; the file is corrupt")
        raw_name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\x00" else b""
        name = (prefix + b"/" + raw_name if prefix else raw_name).decode("utf-8", errors="replace")
        kind = header[156:157]
        if kind not in (b"0", b"\0"):
            what = _TYPE_NAMES.get(kind, f"an entry of type {kind!r}")
            raise BundleError(f"the bundle member {name!r} is {what}; bundles hold regular files only")
        if name.startswith("/"):
            raise BundleError(f"the bundle member {name!r} has an absolute path; refusing it")
        if ".." in name.split("/"):
            raise BundleError(f"the bundle member {name!r} escapes the bundle (path traversal); refusing it")
        if not MEMBER.match(name):
            raise BundleError(
                f"the bundle member {name!r} has an invalid name; bundles hold plain file names only"
            )
        if name in members:
            raise BundleError(f"the bundle holds member {name!r} twice; refusing it")
        if len(members) >= MAX_MEMBERS:
            raise BundleError(f"the bundle holds more than {MAX_MEMBERS} members; refusing it")
        length = _octal(header[124:136], "size")
        start = pos + _BLOCK
        if start + length > size:
            raise BundleError(f"the bundle is truncated (member {name!r} is cut short); copy it again")
        members[name] = data[start : start + length]
        pos = start + -(-length // _BLOCK) * _BLOCK
    return members


def _load(source: str | os.PathLike[str] | bytes, max_size: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_size:
            raise BundleError(f"the bundle is {len(data)} bytes, over the {max_size}-byte limit")
        return data
    path = Path(source)
    with _open_bundle(path) as handle:
        length = os.fstat(handle.fileno()).st_size
        if length > max_size:
            raise BundleError(f"{path} is {length} bytes, over the {max_size}-byte bundle limit")
        try:
            data = handle.read(max_size + 1)
        except OSError as exc:
            raise BundleError(f"cannot read bundle {path}: {exc.strerror}") from None
    if len(data) > max_size:
        raise BundleError(f"{path} grew past the {max_size}-byte bundle limit while being read")
    return data


def _open_bundle(path: Path) -> BinaryIO:
    """``path`` opened for reading; BundleError saying what is wrong with it otherwise."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise BundleError(f"bundle file {path} does not exist") from None
    except IsADirectoryError:
        raise BundleError(f"{path} is a directory, not a bundle file") from None
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path}: {exc.strerror}") from None


def _split(data: bytes | memoryview) -> tuple[dict[str, Any], bytes, bytes]:
    if not len(data):
        raise BundleError("the bundle file is empty")
    members = _read_tar(data)
    manifest_view = members.pop(MANIFEST_FILE, None)
    signature_view = members.pop(SIGNATURE_FILE, None)
    manifest_bytes = None if manifest_view is None else bytes(manifest_view)
    signature = None if signature_view is None else bytes(signature_view)
    if manifest_bytes is None:
        raise BundleError("the bundle has no manifest.json; it is not an edgekit bundle")
    if signature is None:
        raise SignatureError("the bundle has no manifest.sig; it is unsigned and cannot be trusted")
    if len(manifest_bytes) > MAX_MANIFEST_SIZE:
        raise BundleError(f"manifest.json is over the {MAX_MANIFEST_SIZE}-byte limit; refusing it")
    return members, manifest_bytes, signature


def verify_manifest_signature(manifest_bytes: bytes, signature: bytes, trusted: TrustedKeys) -> str:
    """The id of the trusted key that signed ``manifest_bytes``; SignatureError (or
    UntrustedKeyError, naming the signer the manifest claims) otherwise."""
    try:
        return trusted.verify(manifest_bytes, signature, None, "the bundle's manifest")
    except SignatureError as exc:
        # Tell "signed by someone we don't trust" from "altered": only then read the claim.
        try:
            claimed = Manifest.from_json(manifest_bytes).signer
        except BundleError:
            raise exc from None
        if claimed not in trusted:
            raise UntrustedKeyError(
                f"the bundle is signed by key {claimed[:16]}, which is not trusted here; "
                "pass the signer's public key with --key, or re-sign the bundle with a trusted key"
            ) from None
        raise


def manifest_id(manifest_bytes: bytes) -> str:
    """The id of the bundle whose manifest is ``manifest_bytes`` (see :attr:`Bundle.bundle_id`)."""
    return hashlib.sha256(manifest_bytes).hexdigest()


def chunk_plan(payload: bytes, chunk_size: int) -> ChunkPlan:
    """How ``payload`` (the members concatenated in manifest order) is cut for transport."""
    digests = tuple(
        hashlib.sha256(payload[i : i + chunk_size]).hexdigest() for i in range(0, len(payload), chunk_size)
    )
    return ChunkPlan(chunk_size=chunk_size, total_size=len(payload), sha256=digests)


def check_members(manifest: Manifest, members: Mapping[str, bytes | memoryview]) -> None:
    """BundleError unless ``members`` are exactly the files ``manifest`` lists, each with its
    signed size and SHA-256 (the one member check, for archives and extracted directories)."""
    listed = {f.name for f in manifest.files}
    extra = sorted(set(members) - listed)
    if extra:
        raise BundleError(f"the bundle holds {extra[0]!r}, which its manifest does not list; refusing it")
    for entry in manifest.files:
        data = members.get(entry.name)
        if data is None:
            raise BundleError(f"the bundle is missing {entry.name!r}, which its manifest lists")
        if len(data) != entry.size:
            raise BundleError(
                f"{entry.name!r} is {len(data)} bytes but the signed manifest says {entry.size}; refusing it"
            )
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise BundleError(
                f"{entry.name!r} does not match its SHA-256 in the signed manifest; refusing it"
            )
    # The chunk plan is not re-derived here: it is signed with the member hashes, and a device
    # that fetches by chunks checks each chunk against it before checking these hashes.


def _read(source: str | os.PathLike[str] | bytes, trusted: TrustedKeys | None, max_size: int) -> Bundle:
    data = _load(source, max_size)
    members, manifest_bytes, signature = _split(data)
    signer = None
    if trusted is not None:
        signer = verify_manifest_signature(manifest_bytes, signature, trusted)
    manifest = Manifest.from_json(manifest_bytes)
    check_members(manifest, members)
    return Bundle(
        manifest=manifest,
        manifest_bytes=manifest_bytes,
        signature=signature,
        signer=signer,
        members=members,
        size=len(data),
    )


def extract_bundle(
    path: str | os.PathLike[str],
    trusted: TrustedKeys,
    directory: str | os.PathLike[str],
    max_size: int = MAX_BUNDLE_SIZE,
) -> ExtractedBundle:
    """Verify the bundle file at ``path`` as :func:`read_bundle` does and write its manifest,
    signature and members into ``directory`` (every file and the directory fsync'ed), reading
    the file once through a memory map: no copy of the bundle is held in memory, so a device
    installs a model of any size in the memory that serving it takes. Nothing is written unless
    everything verified; raises what :func:`read_bundle` raises, and OSError if ``directory``
    cannot be written (e.g. a full disk)."""
    path = Path(path)
    with _open_bundle(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_size:
            raise BundleError(f"{path} is {size} bytes, over the {max_size}-byte bundle limit")
        if size == 0:
            raise BundleError("the bundle file is empty")
        try:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise BundleError(f"cannot read bundle {path}: {exc.strerror}") from None
        with mapped:
            view = memoryview(mapped)
            try:  # an OSError from here on is writing ``directory`` (a full disk): the caller's
                return _extract_view(view, trusted, Path(directory))
            finally:
                view.release()


def _extract_view(view: memoryview, trusted: TrustedKeys, directory: Path) -> ExtractedBundle:
    members, manifest_bytes, signature = _split(view)
    try:
        signer = verify_manifest_signature(manifest_bytes, signature, trusted)
        manifest = Manifest.from_json(manifest_bytes)
        check_members(manifest, members)
        _write_files(directory, {MANIFEST_FILE: manifest_bytes, SIGNATURE_FILE: signature, **members})
        model = manifest.model_file.name
        kept = {name: bytes(data) for name, data in members.items() if name != model}
    finally:
        for data in members.values():
            data.release()  # the map closes only once no view of it is left
    return ExtractedBundle(manifest, manifest_bytes, signature, signer, kept, directory, len(view))


def read_bundle(
    source: str | os.PathLike[str] | bytes, trusted: TrustedKeys, max_size: int = MAX_BUNDLE_SIZE
) -> Bundle:
    """Read and fully verify a bundle (signature by a trusted key, every member's hash)."""
    return _read(source, trusted, max_size)


def inspect_bundle(
    source: str | os.PathLike[str] | bytes,
    trusted: TrustedKeys | None = None,
    max_size: int = MAX_BUNDLE_SIZE,
) -> tuple[Bundle, str | None]:
    """Read a bundle for display: members are checked against the manifest, and the signature
    against ``trusted`` if given. Returns the bundle and, when the signature was not accepted,
    why (so an untrusted bundle can still be looked at, never installed)."""
    bundle = _read(source, None, max_size)
    if trusted is None:
        return bundle, "no trusted key given"
    try:
        signer = verify_manifest_signature(bundle.manifest_bytes, bundle.signature, trusted)
    except SignatureError as exc:
        return bundle, str(exc)
    return Bundle(**{**bundle.__dict__, "signer": signer}), None


# -- creating ---------------------------------------------------------------------------------


def _created_at() -> tuple[str, int]:
    """Now in UTC, or ``$SOURCE_DATE_EPOCH`` for reproducible bundles."""
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", int(time.time())))
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), epoch


def _tar(files: list[tuple[str, bytes]], mtime: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = mtime
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _read_input_file(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise BundleError(f"{what} {path} is a directory, expected a file") from None
    except OSError as exc:
        raise BundleError(f"cannot read {what} {path}: {exc.strerror}") from None


def _model_outputs(
    model: Model,
    inputs: np.ndarray,
    manifest_inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    limit: int = BASELINE_MODEL_SAMPLES,
) -> np.ndarray:
    """The model's first output (real values) for each sample of its first input (at most
    ``limit`` samples)."""
    spec = manifest_inputs[0]
    rows = []
    for sample in inputs[:limit]:
        raw = model.run([quantize(sample.reshape(spec.shape), spec)])
        rows.append(dequantize(raw[0], outputs[0]).reshape(-1))
    return np.stack(rows)


def _calibrate(
    model: Model,
    path: str | os.PathLike[str],
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
) -> Calibration:
    """Temperature scaling fitted on the model's outputs for labeled held-out DATA."""
    dataset = load_data(path, image_shape=tuple(inputs[0].shape[1:]))
    if dataset.y is None:
        raise DataError(
            f"{dataset.source} has no labels; --calibration-eval needs labeled held-out data "
            "(a .npz with x= and y=, or a folder of class sub-folders)"
        )
    x = fit_to_input(dataset.x, inputs[0], dataset.source).astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{dataset.source} holds NaN or infinite values")
    scores = _model_outputs(model, x, inputs, outputs, limit=CALIBRATION_MAX_SAMPLES)
    labels = dataset.y[:CALIBRATION_MAX_SAMPLES]
    return fit_calibration(scores, labels, dataset.source)


def create_bundle(
    model_path: str | os.PathLike[str],
    *,
    name: str,
    version: str,
    key: SigningKey,
    output: str | os.PathLike[str],
    labels: str | os.PathLike[str] | None = None,
    baseline: str | os.PathLike[str] | None = None,
    calibration_eval: str | os.PathLike[str] | None = None,
    model_card: str | os.PathLike[str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    runtime: str = "auto",
) -> Manifest:
    """Build, sign and atomically write a bundle; returns its manifest.

    Runs the model once per health-check sample (and on the baseline data, to record the
    reference output distribution, and on the labeled ``calibration_eval`` data, to calibrate
    its confidence), so a TFLite runtime must be installed.
    """
    check_name(name)
    check_version(version)
    if not 1024 <= chunk_size <= MAX_CHUNK_SIZE:
        raise BundleError(f"chunk size {chunk_size} is out of range; use 1024 to {MAX_CHUNK_SIZE} bytes")
    model_bytes = _read_input_file(model_path, "model file")
    if len(model_bytes) > MAX_BUNDLE_SIZE:
        raise BundleError(f"model file {model_path} is over the {MAX_BUNDLE_SIZE}-byte bundle limit")
    try:
        info = inspect_tflite(model_bytes)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{model_path}: {exc}") from None
    if not info.inputs or not info.outputs:
        raise ModelFormatError(f"{model_path}: the model has no inputs or no outputs")
    model = Model(model_bytes, runtime=runtime, threads=1)

    files: list[tuple[str, str, bytes]] = [(MODEL_FILE, "model", model_bytes)]
    if labels is not None:
        text = _read_input_file(labels, "labels file")
        try:
            names = [line for line in text.decode("utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise BundleError(f"labels file {labels} is not UTF-8 text; give one label per line") from None
        classes = int(np.prod(info.outputs[0].shape[1:])) if len(info.outputs[0].shape) > 1 else 0
        if not names or (classes > 1 and len(names) != classes):
            raise BundleError(
                f"labels file {labels} has {len(names)} labels but the model outputs {classes} classes; "
                "give one label per class, one per line"
            )
        files.append((LABELS_FILE, "labels", ("\n".join(names) + "\n").encode()))

    real_samples = None
    if baseline is not None:
        spec = info.inputs[0]
        dataset = load_data(baseline, image_shape=tuple(spec.shape[1:]))
        x = fit_to_input(dataset.x, spec, dataset.source).astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise DataError(f"{dataset.source} holds NaN or infinite values")
        outputs = _model_outputs(model, x, info.inputs, info.outputs)
        stats = compute_baseline(x, outputs)
        files.append((BASELINE_FILE, "baseline", stats.to_json()))
        real_samples = x
    if calibration_eval is not None:
        if baseline is None:
            raise DataError(
                "--calibration-eval needs --baseline DATA as well: a device estimates accuracy in its "
                "drift windows, which need a baseline (the same held-out data can serve as both)"
            )
        calibration = _calibrate(model, calibration_eval, info.inputs, info.outputs)
        files.append((CALIBRATION_FILE, "calibration", calibration.to_json()))

    healthcheck, hc_spec = make_healthcheck(model, info.inputs, info.outputs, real_samples)
    files.append((HEALTHCHECK_FILE, "healthcheck", healthcheck))
    if model_card is not None:
        files.append((MODEL_CARD_FILE, "model_card", _read_input_file(model_card, "model card")))

    created_at, epoch = _created_at()
    manifest = Manifest(
        name=name,
        version=version,
        created_at=created_at,
        signer=key.key_id,
        files=tuple(
            FileEntry(name=fname, role=role, size=len(data), sha256=hashlib.sha256(data).hexdigest())
            for fname, role, data in files
        ),
        inputs=info.inputs,
        outputs=info.outputs,
        ops=info.ops,
        chunks=chunk_plan(b"".join(data for _, _, data in files), chunk_size),
        healthcheck=hc_spec,
        tflite_schema_version=info.schema_version,
    )
    manifest_bytes = manifest.to_json()
    archive = _tar(
        [(MANIFEST_FILE, manifest_bytes), (SIGNATURE_FILE, key.sign(manifest_bytes))]
        + [(fname, data) for fname, _, data in files],
        epoch,
    )
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, archive)
    return manifest
