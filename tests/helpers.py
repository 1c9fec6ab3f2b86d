"""Helpers shared by test packages (on sys.path through pytest's ``pythonpath``)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import socket
import tarfile
from pathlib import Path

import numpy as np
from edgekit import SigningKey
from edgekit.bundle import chunk_plan, read_bundle
from edgekit.trust import TrustedKeys


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive.getmembers()]  # type: ignore[union-attr]


def retar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_unhealthy(source: Path, key: SigningKey, out: Path) -> None:
    """Re-sign ``source`` with its health check's recorded outputs shifted by 1.0.

    The model is untouched and the bundle is signed by a trusted key, so only the health check
    can catch it: the model cannot reproduce outputs its author never got from it.
    """
    bundle = read_bundle(source, TrustedKeys([key.public]))
    with np.load(io.BytesIO(bundle.members["healthcheck.npz"])) as archive:
        arrays = {name: archive[name] for name in archive.files}
    for name, value in list(arrays.items()):
        if name.startswith("output_"):
            arrays[name] = (value.astype(np.float32) + 1.0).astype(value.dtype)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    members = dict(bundle.members)
    members["healthcheck.npz"] = buffer.getvalue()
    files = tuple(
        dataclasses.replace(f, size=len(members[f.name]), sha256=hashlib.sha256(members[f.name]).hexdigest())
        for f in bundle.manifest.files
    )
    payload = b"".join(members[f.name] for f in files)
    manifest = dataclasses.replace(
        bundle.manifest,
        version="9.0.0",
        files=files,
        chunks=chunk_plan(payload, bundle.manifest.chunks.chunk_size),
    )
    manifest_bytes = manifest.to_json()
    out.write_bytes(
        retar(
            [("manifest.json", manifest_bytes), ("manifest.sig", key.sign(manifest_bytes))]
            + [(f.name, members[f.name]) for f in files]
        )
    )
