"""A small real file system to fill up: tmpfs, else an ext4 loop file system (both need root,
which CI has). Without either, tests that need one are skipped with the reason."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


def _run(*args: str) -> bool:
    return subprocess.run(args, capture_output=True, check=False).returncode == 0


@contextlib.contextmanager
def small_filesystem(where: Path, size_kib: int) -> Iterator[tuple[Path, str]]:
    """Mount a ``size_kib`` file system at ``where``; yields (mount point, kind)."""
    where.mkdir(parents=True, exist_ok=True)
    kind = ""
    if _run("mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", str(where)):
        kind = "tmpfs"
    else:
        image = where.with_suffix(".img")
        with open(image, "wb") as handle:
            handle.truncate(max(size_kib, 1024) * 1024)
        if _run("mkfs.ext4", "-q", "-F", str(image)) and _run("mount", "-o", "loop", str(image), str(where)):
            kind = "ext4 loop"
    if not kind:
        import pytest

        pytest.skip("cannot mount a tmpfs or a loop file system here (needs root); CI runs as root")
    try:
        yield where, kind
    finally:
        _run("umount", "-l", str(where))


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill ``directory``'s file system until at most ``leave`` bytes are free; returns the filler."""
    filler = directory / "filler"
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as handle:
        while True:
            free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
            if free <= leave:
                break
            try:
                handle.write(block[: max(1, min(len(block), free - leave))])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return filler
