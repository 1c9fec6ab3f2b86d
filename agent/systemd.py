"""systemd's notify protocol (``sd_notify``), in the standard library only.

Under a ``Type=notify`` unit, systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the
abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``). The
agent daemon sends ``READY=1`` once it serves, ``WATCHDOG=1`` from its own main loop every half
of ``WATCHDOG_USEC`` (so a hung loop stops the pings and systemd restarts the service), and
``STOPPING=1`` when it shuts down. Outside systemd (``NOTIFY_SOCKET`` unset) every call is a
no-op. See ``sd_notify(3)`` and ``sd_watchdog_enabled(3)``; this module sends the same datagrams.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Optional

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


def _address(value: str) -> Optional[bytes]:
    """The socket address ``NOTIFY_SOCKET`` names, or None if unset or not an AF_UNIX address."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # the abstract namespace: no file behind it
    if value.startswith("/"):
        return os.fsencode(value)
    if value:
        log.warning("NOTIFY_SOCKET=%r is not an AF_UNIX socket address; not notifying systemd", value)
    return None


def _watchdog_interval(environ: Mapping[str, str]) -> Optional[float]:
    """Half of ``WATCHDOG_USEC`` in seconds, if the watchdog is meant for this process."""
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # set for another process (we were started by the one it is meant for)
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class Notifier:
    """Tell systemd about this service's state; a no-op when not started by systemd.

    A send that fails is counted in ``failures`` and logged, never raised: a service must not
    die because its supervisor's socket went away.
    """

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        #: Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), None without watchdog.
        self.watchdog_interval = _watchdog_interval(env) if self._address is not None else None
        self._socket: Optional[socket.socket] = None
        self._last_ping = float("-inf")
        self.failures = 0

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``VAR=value`` lines in one datagram; True if systemd's socket took it."""
        if self._address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(assignments).encode(), self._address)
        except OSError as exc:
            self.failures += 1
            log.warning("could not notify systemd (%d failures so far): %s", self.failures, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog_due(self) -> bool:
        """True when a watchdog is set and half of its timeout passed since the last ping."""
        interval = self.watchdog_interval
        return interval is not None and time.monotonic() - self._last_ping >= interval

    def watchdog(self) -> bool:
        """Send ``WATCHDOG=1`` now (call it from the loop whose health it vouches for)."""
        if self.watchdog_interval is None:
            return False
        self._last_ping = time.monotonic()
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
