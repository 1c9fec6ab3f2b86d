"""`edgekit-agent run` under systemd's notify protocol: a real process, a real AF_UNIX socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from edgekit.agent import Agent
from edgekit.agent.systemd import Notifier


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket, a path or an abstract ``@name``."""

    def __init__(self, directory: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"edgekit-test-{uuid.uuid4().hex}"
            self.sock.bind(b"\0" + name.encode())
            self.env_value = "@" + name
        else:
            self.env_value = str(directory / "notify")
            self.sock.bind(self.env_value)
        self.sock.settimeout(60)  # a bound on waiting for the next datagram, not a delay
        self.received: list[str] = []

    def wait_for(self, line: str) -> list[str]:
        """Read datagrams until one holds ``line``; returns that datagram's lines."""
        while True:
            fields = self.sock.recv(4096).decode().split("\n")
            self.received.append("|".join(fields))
            if line in fields:
                return fields

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path, abstract=request.param == "abstract")
    yield sock
    sock.close()


def test_run_says_ready_feeds_the_watchdog_and_says_stopping(notify_socket, config_path, bundles):
    with Agent.from_config(config_path, background=False) as agent:
        agent.install(bundles.v1)
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.env_value, "WATCHDOG_USEC": "200000"}
    process = subprocess.Popen(
        [sys.executable, "-m", "edgekit.agent.cli", "run", "--config", str(config_path)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = notify_socket.wait_for("READY=1")
        assert "STATUS=pi-01: serving digits@1.0.0" in ready
        notify_socket.wait_for("WATCHDOG=1")
        notify_socket.wait_for("WATCHDOG=1")  # pinged again from the loop, not once at start
        process.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING=1")
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        _, err = process.communicate(timeout=60)
    assert "Traceback" not in err, err


def test_without_notify_socket_everything_is_a_no_op():
    notifier = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled and notifier.watchdog_interval is None
    assert not notifier.ready("x") and not notifier.watchdog() and not notifier.stopping()


def test_the_watchdog_interval_is_half_the_timeout_and_only_for_its_pid(tmp_path):
    sock = str(tmp_path / "notify")
    assert Notifier({"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    mine = {"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval == 15.0
    assert Notifier({**mine, "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "soon"}).watchdog_interval is None


def test_a_vanished_socket_is_counted_not_raised(tmp_path):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled and not notifier.ready() and notifier.failures == 1
    notifier.close()
