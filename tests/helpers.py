"""Helpers shared by test packages (on sys.path through pytest's ``pythonpath``)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
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


@dataclass
class Mosquitto:
    """A Mosquitto broker of the caller's own (a test, the soak), on a free loopback port."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"
    extra_config: str = ""

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.directory / "mosquitto.conf"

    def write_config(self) -> None:
        base = (
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "set_tcp_nodelay true\n"  # as `edgekit broker mosquitto-config` writes it
            # Started as root, Mosquitto drops to user mosquitto, which cannot write its log here.
            + ("user root\n" if os.geteuid() == 0 else "")
            + f"log_dest file {self.directory / 'mosquitto.log'}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        self.config_path.write_text(base + self.extra_config)

    def start(self) -> None:
        if self.process is None or self.process.poll() is not None:
            if not self.config_path.exists():
                self.write_config()
            self.process = subprocess.Popen(
                ["mosquitto", "-c", str(self.config_path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}: {err}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                # Polling the port is the readiness signal Mosquitto offers; bounded by the deadline.
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s")

    def stop(self, graceful: bool = False) -> None:
        """kill -9 (default), or SIGTERM as `systemctl restart` does (persistence is saved)."""
        if self.process is not None and self.process.poll() is None:
            if graceful:
                self.process.terminate()
            else:
                self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


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


def make_unhealthy(source: Path, key: SigningKey, out: Path, version: str = "9.0.0") -> None:
    """Re-sign ``source`` as ``version`` with its health check's recorded outputs shifted by 1.0.

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
        version=version,
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


# -- the edgekit command as a user runs it (converter tests) ---------------------------------------

EDGEKIT = Path(sys.executable).parent / "edgekit"  # the console script pip installed


def edgekit(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EDGEKIT), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
