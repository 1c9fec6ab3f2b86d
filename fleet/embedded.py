"""The embedded MQTT broker of ``edgekit fleet up``: amqtt, in a child process of its own.

:class:`EmbeddedBroker` starts `amqtt <https://github.com/Yakifo/amqtt>`_ (an asyncio MQTT 3.1.1
broker in pure Python) as ``python -m edgekit.fleet.embedded`` and returns once it accepts
connections; :meth:`EmbeddedBroker.stop` shuts it down cleanly. Why a child process and not a
thread of the caller: amqtt moves every byte in Python, and ``fleet up`` runs ingest (which must
keep up with thousands of telemetry messages a second), the rollout controller and the dashboard
in its own process; a broker thread would share their one GIL, and a broker bug (an unhandled
exception, a stuck shutdown) would take them down with it. A child process gets its own core,
can always be killed, and exits by itself when the parent dies (it watches its stdin).

What it is for: a laptop, a demo, a first few devices on a LAN. It speaks MQTT 3.1.1 only (it
answers an MQTT 5 CONNECT with "unacceptable protocol version", and edgekit's clients fall back
to 3.1.1 by themselves); it has no accounts and no topic ACLs (anyone who reaches the port may
publish), so it binds to 127.0.0.1 unless told otherwise; it has no MQTT 5 shared
subscriptions, so one ingest worker. Production is Mosquitto
with per-device accounts and ACLs (``edgekit broker mosquitto-config``, docs/broker.md).

With a ``data_dir``, retained messages (signed desired states, bundle chunks, device states)
are kept in ``data_dir/retained.sqlite`` and survive a restart; without one they live in memory.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Optional

from edgekit.errors import BrokerError

__all__ = ["EmbeddedBroker"]

log = logging.getLogger(__name__)

_READY = "ready"
_ERROR = "error"


def client_url(host: str, port: int) -> str:
    """The URL a client on this machine uses for a broker listening on ``host:port``."""
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"mqtt://{host}:{port}"


class EmbeddedBroker:
    """An amqtt broker in a child process, listening on ``host:port``.

    ``data_dir`` (created if missing) keeps retained messages across restarts and holds the
    broker's log (``broker.log``); without it nothing is written to disk. Use it as a context
    manager, or call :meth:`start` and :meth:`stop`; it can be started again after a stop.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        data_dir: Optional[Path] = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        if not 0 < port < 65536:
            raise BrokerError(f"invalid port {port} for the embedded broker; use 1..65535")
        self.host = host
        self.port = port
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._log: Optional[IO[bytes]] = None

    @property
    def url(self) -> str:
        """The URL clients use (they find out by themselves that it speaks MQTT 3.1.1)."""
        return client_url(self.host, self.port)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self.running and self._process is not None else None

    def start(self) -> EmbeddedBroker:
        """Start the broker; return once it accepts connections. BrokerError if it cannot
        (the port is taken, amqtt is not installed, ...), with the reason in one line."""
        if self.running:
            return self
        command = [sys.executable, "-m", "edgekit.fleet.embedded", "--host", self.host]
        command += ["--port", str(self.port)]
        stderr: Any = subprocess.DEVNULL
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            command += ["--data-dir", str(self.data_dir)]
            self._log = open(self.data_dir / "broker.log", "ab")  # noqa: SIM115 - closed in stop()
            stderr = self._log
        # A session of its own: Ctrl-C on `fleet up` reaches the parent, which stops the
        # broker last, after ingest and the controller are done with it.
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
        self._process = process
        line = self._read_line(process, self.startup_timeout)
        if line.startswith(_READY):
            log.info("embedded broker (pid %d) listening on %s:%d", process.pid, self.host, self.port)
            return self
        self.stop()
        if line.startswith(_ERROR):
            raise BrokerError(line[len(_ERROR) :].strip(": "))
        if not line:
            raise BrokerError(
                f"the embedded broker did not start within {self.startup_timeout:g}s"
                + (f"; see {self.data_dir / 'broker.log'}" if self.data_dir else "")
            )
        raise BrokerError(f"the embedded broker failed to start: {line}")

    @staticmethod
    def _read_line(process: subprocess.Popen[bytes], timeout: float) -> str:
        """The child's first line on stdout, or "" if it said nothing in time or died silently."""
        assert process.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return ""
            ready, _, _ = select.select([process.stdout], [], [], remaining)
            if ready:
                return process.stdout.readline().decode(errors="replace").strip()

    def stop(self) -> None:
        """Shut the broker down cleanly (it closes every connection; retained messages are on
        disk already with a ``data_dir``); killed if it takes longer than ``stop_timeout``."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                try:
                    assert process.stdin is not None
                    process.stdin.close()  # the child's signal to shut down
                except OSError:
                    pass
                try:
                    process.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    log.warning("the embedded broker did not stop within %gs; killing it", self.stop_timeout)
                    process.kill()
                    process.wait(10)
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the child process ----------------------------------------------------------------------------


def _broker_config(host: str, port: int, data_dir: Optional[Path]) -> dict[str, Any]:
    plugins: dict[str, Any] = {
        "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
    }
    if data_dir is not None:
        plugins["edgekit.fleet._amqtt.RetainedStore"] = {"path": str(data_dir / "retained.sqlite")}
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # Without the packet and event loggers and $SYS: they cost time on every message.
        "plugins": plugins,
    }


async def _serve(host: str, port: int, data_dir: Optional[Path]) -> int:
    import asyncio
    import signal
    import threading

    try:
        from amqtt.errors import AMQTTError, PluginError
        from amqtt.errors import BrokerError as AmqttBrokerError

        from ._amqtt import Broker  # amqtt's, without its leak of retained messages
    except ImportError:
        _say(
            f"{_ERROR}: amqtt is not installed; install edgekit[fleet], or run your own broker and pass --broker"
        )
        return 2
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)

    def watch_parent() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the parent closed the pipe, or died
        loop.call_soon_threadsafe(stopping.set)

    try:
        broker = Broker(_broker_config(host, port, data_dir))
        await broker.start()
    except (AMQTTError, AmqttBrokerError, PluginError, OSError, ValueError) as exc:
        reason = str(exc.__cause__ or exc)
        if "address already in use" in reason.lower():
            reason = (
                f"port {port} on {host} is already in use; stop what listens there, pick another "
                f"--port, or use that broker with --broker mqtt://{host}:{port}"
            )
        _say(f"{_ERROR}: cannot start the embedded broker: {reason}")
        return 2
    threading.Thread(target=watch_parent, name="edgekit-broker-parent", daemon=True).start()
    _say(f"{_READY} {port}")
    await stopping.wait()
    try:
        await asyncio.wait_for(broker.shutdown(), 5)
    except Exception as exc:  # noqa: BLE001 - exiting anyway; the parent kills a stuck child
        logging.getLogger(__name__).warning("the broker did not shut down cleanly: %r", exc)
    return 0


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: Optional[list[str]] = None) -> int:
    import asyncio

    parser = argparse.ArgumentParser(description="The embedded MQTT broker of `edgekit fleet up`.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("EDGEKIT_BROKER_LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(_serve(args.host, args.port, args.data_dir))


if __name__ == "__main__":
    sys.exit(main())
