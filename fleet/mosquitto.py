"""The Mosquitto broker of ``edgekit fleet up``, when Mosquitto is installed.

:class:`FleetMosquitto` writes a Mosquitto configuration for the fleet of ``home`` (the same
one ``edgekit broker mosquitto-config`` writes: no anonymous access, the operator account and
one account per device with its ACL, MQTT 5, ``set_tcp_nodelay``, retained messages persisted)
into ``data_dir``, runs ``mosquitto -c`` as a child process, and returns once it listens.
While it runs, a thread watches the device accounts under ``home/broker/devices``: a device
added (``edgekit device add``, ``fleet simulate``) is in the password file and the ACL a
second later, and Mosquitto reloads them (SIGHUP), so a new device connects without a restart.
:meth:`FleetMosquitto.stop` stops it with SIGTERM (Mosquitto saves its retained messages),
and it dies with its parent (Linux ``PR_SET_PDEATHSIG``), so a killed ``fleet up`` leaves no
broker holding the port.

:func:`mosquitto_binary` says whether Mosquitto is installed; ``fleet up`` runs it when it is,
else the embedded amqtt broker (:mod:`edgekit.fleet.embedded`, no accounts, no ACLs).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from edgekit.broker import write_mosquitto_config
from edgekit.errors import BrokerError
from edgekit.mqtt import parse_broker_url

from .embedded import client_url

__all__ = ["FleetMosquitto", "mosquitto_binary"]

log = logging.getLogger(__name__)

#: How often the device accounts are looked at for changes, in seconds.
WATCH_INTERVAL = 1.0


def mosquitto_binary() -> Optional[str]:
    """The ``mosquitto`` executable, if installed (on PATH, or Debian's /usr/sbin)."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, between fork and exec
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class FleetMosquitto:
    """Mosquitto for the fleet of ``home`` on ``host:port``, configured and kept in ``data_dir``
    (``mosquitto.conf``, ``passwd``, ``acl``, ``data/`` for persistence, ``mosquitto.log``).
    Use it as a context manager, or call :meth:`start` and :meth:`stop`."""

    def __init__(
        self,
        home: Path,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        startup_timeout: float = 15.0,
        stop_timeout: float = 10.0,
    ) -> None:
        if not 0 < port < 65536:
            raise BrokerError(f"invalid port {port} for Mosquitto; use 1..65535")
        self.home = Path(home)
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._watcher: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        #: How many times the accounts changed and Mosquitto reloaded them.
        self.reloads = 0

    @property
    def url(self) -> str:
        return client_url(self.host, self.port)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self.running and self._process is not None else None

    @property
    def log_file(self) -> Path:
        return self.data_dir / "mosquitto.log"

    def _accounts(self) -> tuple[tuple[str, int, int], ...]:
        """What the generated files depend on: each device account file, its size and mtime."""
        root = self.home / "broker" / "devices"
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except FileNotFoundError:
            return ()
        return tuple(
            (e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.name.endswith(".json")
        )

    def _configure(self) -> None:
        write_mosquitto_config(
            self.data_dir,
            self.port,
            home=self.home,
            host=self.host,
            # Started by root, Mosquitto would drop to user mosquitto, which cannot reach an
            # EDGEKIT_HOME under /root; `fleet up` runs as whoever started it, and so does it.
            run_as="root" if hasattr(os, "geteuid") and os.geteuid() == 0 else None,
            log_file=self.log_file,
        )

    def start(self) -> FleetMosquitto:
        """Configure and start Mosquitto; return once it accepts connections. BrokerError in one
        line if it cannot (the port is taken, the config refused, ...)."""
        if self.running:
            return self
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerError("Mosquitto is not installed; install it (apt-get install mosquitto)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        accounts = self._accounts()
        self._configure()
        started = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.data_dir / "mosquitto.stderr", "wb") as stderr:
            self._process = subprocess.Popen(
                [binary, "-c", str(self.data_dir / "mosquitto.conf")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # Ctrl-C reaches `fleet up`, which stops the broker last
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            )
        self._wait_listening(started)
        log.info("Mosquitto (pid %d) listening on %s:%d", self._process.pid, self.host, self.port)
        self._stopping.clear()
        self._watcher = threading.Thread(
            target=self._watch, args=(accounts,), name="edgekit-mosquitto-accounts", daemon=True
        )
        self._watcher.start()
        return self

    def _wait_listening(self, log_offset: int) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                reason = self._why_it_died(log_offset)
                self._process = None
                raise BrokerError(reason)
            try:
                with socket.create_connection((parse_broker_url(self.url).host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)  # polling the port is the readiness signal Mosquitto offers
        self.stop()
        raise BrokerError(
            f"Mosquitto did not listen on port {self.port} within {self.startup_timeout:g}s; see {self.log_file}"
        )

    def _why_it_died(self, log_offset: int) -> str:
        text = ""
        for path, offset in ((self.log_file, log_offset), (self.data_dir / "mosquitto.stderr", 0)):
            try:
                with open(path, "rb") as stream:
                    stream.seek(offset)
                    text += stream.read().decode(errors="replace")
            except OSError:
                pass
        if "address already in use" in text.lower():
            return (
                f"port {self.port} on {self.host} is already in use; stop what listens there, pick "
                f"another --port, or use that broker with --broker mqtt://{self.host}:{self.port}"
            )
        errors = [line.split(": ", 1)[-1] for line in text.splitlines() if "Error" in line]
        detail = errors[-1] if errors else f"exit code {self._process.returncode if self._process else '?'}"
        return f"Mosquitto did not start: {detail.strip()} (see {self.log_file})"

    def _watch(self, seen: tuple[tuple[str, int, int], ...]) -> None:
        while not self._stopping.wait(WATCH_INTERVAL):
            now = self._accounts()
            if now == seen:
                continue
            seen = now
            try:
                self.reload()
            except Exception as exc:  # noqa: BLE001 - logged; the broker keeps its last accounts
                log.error("could not give Mosquitto the new device accounts: %s", exc)

    def reload(self) -> None:
        """Write the accounts and ACL again and have Mosquitto reload them (SIGHUP)."""
        self._configure()
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGHUP)
            self.reloads += 1
            log.info("Mosquitto reloaded the device accounts")

    def stop(self) -> None:
        """SIGTERM (Mosquitto saves its retained messages), killed after ``stop_timeout``."""
        self._stopping.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(5)
        self._watcher = None
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("Mosquitto did not stop within %gs; killing it", self.stop_timeout)
                process.kill()
                process.wait(10)

    def __enter__(self) -> FleetMosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
