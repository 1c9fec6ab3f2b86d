"""Real receivers for alert tests and benchmarks: an SMTP server (aiosmtpd), an HTTP webhook
receiver (http.server), and misbehaving servers (silent, speaking garbage).

Each receiver records what it got and lets a test wait for it (a condition variable), never
sleep."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from helpers import free_port


class _Inbox:
    def __init__(self) -> None:
        self.items: list[Any] = []
        self.arrived: list[float] = []
        self._cond = threading.Condition()

    def add(self, item: Any) -> None:
        with self._cond:
            self.items.append(item)
            self.arrived.append(time.monotonic())
            self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[list[Any]], bool], timeout: float = 60.0, what: str = ""
    ) -> list[Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.items), timeout):
                raise AssertionError(
                    f"{what or 'the expected messages'} never arrived; got {len(self.items)}: {self.items[-5:]}"
                )
            return list(self.items)


class SmtpServer:
    """aiosmtpd on a free port. ``users`` enables AUTH LOGIN/PLAIN; ``tls`` (cert, key) offers
    STARTTLS (and requires it), or with ``implicit_tls`` speaks TLS from the first byte;
    ``refuse`` makes it answer DATA with that reply."""

    def __init__(
        self,
        users: Optional[dict[str, str]] = None,
        tls: Optional[tuple[Path, Path]] = None,
        port: Optional[int] = None,
        implicit_tls: bool = False,
    ) -> None:
        """``implicit_tls``: TLS from the first byte (smtps) instead of STARTTLS."""
        self.port = port or free_port()
        self.inbox = _Inbox()
        self.refuse: Optional[str] = None
        server = self

        class Handler:
            async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
                if server.refuse:
                    return server.refuse
                mail = message_from_bytes(envelope.content)
                server.inbox.add(mail)
                return "250 OK"

        def authenticate(
            _server: Any, _session: Any, _envelope: Any, _mechanism: str, data: Any
        ) -> AuthResult:
            ok = (
                isinstance(data, LoginPassword)
                and (users or {}).get(data.login.decode()) == data.password.decode()
            )
            return AuthResult(success=ok, handled=False)

        options: dict[str, Any] = {}
        if users:
            # (aiosmtpd counts only STARTTLS as TLS for AUTH; a smtps connection is TLS anyway.)
            options.update(authenticator=authenticate, auth_require_tls=tls is not None and not implicit_tls)
        if tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            options.update(
                {"ssl_context": context}
                if implicit_tls
                else {"tls_context": context, "require_starttls": True}
            )
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port, **options)

    def start(self) -> SmtpServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def mails(self) -> list[Message]:
        return list(self.inbox.items)

    def wait_for(
        self, predicate: Callable[[list[Message]], bool], timeout: float = 60.0, what: str = ""
    ) -> list[Message]:
        return self.inbox.wait_for(predicate, timeout, what)


def body(mail: Message) -> str:
    payload = mail.get_payload(decode=True)
    return payload.decode() if isinstance(payload, bytes) else str(mail.get_payload())


class WebhookReceiver:
    """An HTTP server recording each POSTed JSON body; ``status`` is what it answers, and
    ``hang`` makes it never answer (until stopped)."""

    def __init__(self) -> None:
        self.inbox = _Inbox()
        self.status = 200
        self.hang = threading.Event()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if receiver.hang.is_set():
                    receiver._release.wait(120)
                    return
                if receiver.status == 200:
                    receiver.inbox.add(json.loads(data))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/edgekit-secret-token"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    def bodies(self) -> list[dict[str, Any]]:
        return list(self.inbox.items)

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 60.0, what: str = ""
    ) -> list[dict[str, Any]]:
        return self.inbox.wait_for(predicate, timeout, what)


class RawServer:
    """A TCP server that accepts and either says ``greeting`` (garbage) or nothing at all."""

    def __init__(self, greeting: Optional[bytes] = None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.greeting = greeting
        self._conns: list[socket.socket] = []
        #: Set once a client connected.
        self.accepted = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            self.accepted.set()
            if self.greeting is not None:
                conn.sendall(self.greeting)

    def stop(self) -> None:
        for sock in (self.sock, *self._conns):
            with contextlib.suppress(OSError):  # never connected, or gone already
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on it
            sock.close()
