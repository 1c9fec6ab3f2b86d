"""Helpers shared by test packages (on sys.path through pytest's ``pythonpath``)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    def persist(self) -> None:
        """Restart with retained messages kept on disk (``persistence true``, as `edgekit broker
        mosquitto-config` writes it), so they survive a graceful :meth:`stop` and :meth:`start`."""
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        self.extra_config += f"persistence true\npersistence_location {data}/\nautosave_interval 60\n"
        self.write_config()
        self.stop()
        self.start()

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


class RabbitMq:
    """RabbitMQ's MQTT plugin (RabbitMQ 3.x, Debian's rabbitmq-server) on a free loopback port of
    our own, on the node already running on this machine (started by `make rabbitmq`).

    The plugin is enabled with its listener on that port, and disabled again by :meth:`close`
    of the last test session using it: sessions running at once (two worktrees, CI) share it,
    registered by pid in a file under /tmp (``flock``), so one never disables it under another,
    and a plugin enabled by anybody else is never disabled. Broker accounts made by
    :meth:`add_user` are deleted by :meth:`close`. AMQP users of the node are not touched.
    RabbitMQ 3.x speaks MQTT 3.1.1 only and sends retained messages to exact-topic
    subscriptions only."""

    SHARED = Path(tempfile.gettempdir()) / "edgekit-rabbitmq-mqtt.json"

    def __init__(self, ctl: str) -> None:
        self.ctl = ctl
        self.plugins = str(Path(ctl).with_name("rabbitmq-plugins"))
        self.users: list[str] = []
        self.port = 0

    def _run(self, *args: str, tool: str = "") -> str:
        result = subprocess.run(
            [tool or self.ctl, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    @contextlib.contextmanager
    def _shared(self) -> Iterator[dict]:
        """The sessions using the plugin (live pids) and whether one of them enabled it, under
        an exclusive lock; what the block leaves in the dict is written back."""
        with open(self.SHARED.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                doc = json.loads(self.SHARED.read_text())
            except (OSError, ValueError):
                doc = {}
            doc["pids"] = [pid for pid in doc.get("pids", []) if _alive(pid)]
            doc.setdefault("ours", False)
            yield doc
            self.SHARED.write_text(json.dumps(doc))

    def start(self) -> RabbitMq:
        with self._shared() as shared:
            enabled = "[E" in self._run("-q", "list", "-e", "rabbitmq_mqtt", tool=self.plugins)
            running = "true" in self._run(
                "eval", "lists:keymember(rabbitmq_mqtt, 1, application:which_applications())."
            )
            if enabled and not running and not shared["pids"]:  # left by a run that died
                self._run("disable", "rabbitmq_mqtt", tool=self.plugins)
                enabled = False
            if enabled:  # another session's, or someone else's: use the port it listens on
                listeners = self._run("eval", "application:get_env(rabbitmq_mqtt, tcp_listeners).")
                found = re.search(r"(\d{2,5})\}?\]", listeners)
                if not found:
                    raise RuntimeError(f"rabbitmq_mqtt is enabled but its port is unknown: {listeners}")
                self.port = int(found.group(1))
            else:
                self.port = free_port()
                self._run(
                    "eval",
                    "application:load(rabbitmq_mqtt), "
                    f'application:set_env(rabbitmq_mqtt, tcp_listeners, [{{"127.0.0.1", {self.port}}}]).',
                )
                self._run("enable", "rabbitmq_mqtt", tool=self.plugins)
                shared["ours"] = True
            shared["pids"].append(os.getpid())
        self._wait_listening()
        return self

    def _wait_listening(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)  # the plugin's listener comes up a moment after `enable` returns
        raise RuntimeError(f"RabbitMQ's MQTT plugin did not listen on {self.port} within {timeout:g}s")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def add_user(self, name: str, password: str) -> None:
        """A broker account (MQTT username/password) with every permission on vhost /."""
        self._run("add_user", name, password)
        self.users.append(name)
        self._run("set_permissions", "-p", "/", name, ".*", ".*", ".*")

    def restart_mqtt(self) -> None:
        """Stop and start the MQTT plugin: every MQTT connection drops, retained messages stay
        (RabbitMQ keeps them on disk), the node and its AMQP users carry on."""
        self._run("eval", "application:stop(rabbitmq_mqtt).")
        self._run("eval", "application:start(rabbitmq_mqtt).")
        self._wait_listening()

    def close(self) -> None:
        for name in self.users:
            subprocess.run([self.ctl, "-q", "delete_user", name], capture_output=True, check=False)
        self.users = []
        with self._shared() as shared:
            shared["pids"] = [pid for pid in shared["pids"] if pid != os.getpid()]
            if shared["ours"] and not shared["pids"]:  # the last session out turns it off
                subprocess.run(
                    [self.plugins, "-q", "disable", "rabbitmq_mqtt"], capture_output=True, check=False
                )
                shared["ours"] = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def device_on_generated_broker(mosquitto: Any, directory: Path, device: str, fleet: str = "lab") -> Path:
    """`edgekit device add DEVICE --fleet FLEET` (its config in DIRECTORY) and `edgekit broker
    mosquitto-config` written into the test broker's directory: accounts and ACLs as a user gets
    them. Returns the device's config; the caller restarts the broker to apply it."""
    config = directory / f"{device}.toml"
    added = edgekit(
        "device", "add", device, "--fleet", fleet, "--broker", mosquitto.url,
        "--state-dir", directory / device, "-o", config,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    written = edgekit(
        "broker", "mosquitto-config", "--port", str(mosquitto.port), "--host", "127.0.0.1",
        "--user", "root", "--no-persistence", "-o", mosquitto.directory,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    return config


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
