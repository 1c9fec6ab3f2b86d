"""A TCP forwarder between a client and the broker that a test can cut and restore: a network
partition for one device, while the broker and everyone else stay up."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Optional

from helpers import free_port


class NetCut:
    """Forwards ``127.0.0.1:port`` to ``upstream``. ``cut()`` drops every connection and
    refuses new ones until ``restore()``. ``first``, if given, sees each new client before
    anything is forwarded: it reads what it needs and returns those bytes (sent upstream
    first), or None to close the client."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        first: Callable[[socket.socket], Optional[bytes]] | None = None,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._first = first
        self.port = free_port()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._down = False
        self._closed = False
        threading.Thread(target=self._accept, name="netcut-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            with self._lock:
                down = self._down or self._closed
            head = b""
            if not down and self._first is not None:
                found = self._first(client)
                down, head = found is None, found or b""
            if down:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.sendall(head)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                down = self._down or self._closed
                if not down:  # a cut() while we connected upstream must take this pair too
                    self._open += [client, upstream]
            if down:
                client.close()
                upstream.close()
                continue
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            self._down = True
            victims, self._open = self._open, []
        for sock in victims:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        with self._lock:
            self._down = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.cut()
        self._server.close()
