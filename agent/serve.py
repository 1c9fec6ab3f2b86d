"""Local inference over HTTP, for device apps that do not embed :class:`~edgekit.agent.Agent`.

``edgekit-agent run`` starts it when the config says where to listen::

    [serve]
    listen = "127.0.0.1:8500"   # host:port; loopback unless a token is set
    token = ""                  # required when listening beyond this machine

Endpoints (JSON in, JSON out; errors are ``{"error": "..."}`` with a 4xx/5xx status):

- ``POST /v1/predict`` with ``{"inputs": X}`` runs the model once: X is one array (nested
  lists) for a single-input model, a list of arrays in input order, or an object by input name.
  With ``{"instances": [X1, X2, ...]}`` it runs once per instance. ``"raw": true`` skips the
  (de)quantization, as ``Agent.predict(raw=True)``. The reply is ``{"outputs": {name: array}}``
  (or ``{"predictions": [...]}`` for instances) with the serving bundle's name and version.
  A body of ``Content-Type: application/x-npy`` is one array in NumPy's ``.npy`` format.
- ``GET /v1/status``: what ``edgekit-agent status --json`` prints. ``GET /v1/drift``: the drift
  report (``null`` when the bundle carries no baseline).

Every request goes through ``Agent.predict``, so it is counted in telemetry and sampled for drift
exactly like an embedded call.

What a device meets on its network does not starve it (a slowloris, idle sockets, a huge body):
one thread reads every connection without blocking (``selectors``) and hands only *complete*
requests to a bounded pool of ``workers`` threads; each connection has ``request_timeout``
seconds to deliver each whole request (headers and body) or is closed; at most
``max_connections`` are open (more get a 503 and are closed); a body over ``max_body`` is
refused (413) before it is read, and the bodies being received may together reserve at most
``body_budget`` bytes (beyond: 503, try again), so the agent's memory stays bounded whatever
the clients do. Standard library only.
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import http.client
import io
import json
import logging
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Optional

import numpy as np
from edgekit.errors import ConfigError, EdgekitError, InstallError

from .agent import Agent, _return_freed_memory

__all__ = ["InferenceServer"]

log = logging.getLogger(__name__)

MAX_BODY = 8 * 1024 * 1024  # one request; a 224x224x3 float image is 0.6 MB as .npy, ~2 MB as JSON
BODY_BUDGET = 32 * 1024 * 1024  # all bodies being received at once
MAX_HEADER = 16 * 1024
MAX_CONNECTIONS = 256
WORKERS = 4
REQUEST_TIMEOUT = 30.0
TRIM_AFTER = 256 * 1024  # bodies from this size on: freed pages go back to the OS after the reply
LOCAL_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class _Connection:
    """One client socket while the reader thread owns it: bytes so far, and its deadline."""

    sock: socket.socket
    peer: str
    deadline: float
    buffer: bytearray = field(default_factory=bytearray)
    head: Optional[tuple[str, str, http.client.HTTPMessage, bool]] = None  # method, path, headers, keep-alive
    body_length: int = 0
    reserved: int = 0
    busy: bool = False  # a worker owns it (running the request, writing the reply)
    closing: bool = False  # the worker is done and the connection ends


@dataclass(frozen=True)
class _Request:
    conn: _Connection
    method: str
    path: str
    headers: http.client.HTTPMessage
    body: bytes
    keep_alive: bool


class InferenceServer:
    """Serves ``agent`` on ``host:port`` from background threads. ``port=0`` picks a free one.

    ``workers`` threads run requests; ``request_timeout`` seconds per request (from the
    connection's first byte, or the end of its previous reply); ``max_connections`` open at once;
    ``max_body`` bytes per request and ``body_budget`` bytes for all bodies being received."""

    def __init__(
        self,
        agent: Agent,
        host: str,
        port: int,
        token: Optional[str] = None,
        *,
        workers: int = WORKERS,
        request_timeout: float = REQUEST_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        max_body: int = MAX_BODY,
        body_budget: int = BODY_BUDGET,
    ) -> None:
        if host not in LOCAL_HOSTS and not token:
            raise ConfigError(
                f"the inference server would listen on {host}, reachable from other machines; "
                "set serve.token in the agent config or listen on 127.0.0.1"
            )
        self.agent = agent
        self.token = token or None
        self.workers = max(1, workers)
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.max_body = max_body
        self.body_budget = max(body_budget, max_body)
        self.requests = 0  # complete requests answered
        self.rejected = 0  # of which refused (4xx/5xx)
        self.timed_out = 0  # connections closed for not delivering a request in time
        self.turned_away = 0  # connections refused over max_connections
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._listener = socket.create_server((host, port), family=family, backlog=128)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} for inference: {exc.strerror}") from None
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)  # a worker never blocks on waking the reader
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._connections: set[_Connection] = set()
        self._returned: collections.deque[_Connection] = collections.deque()  # from workers
        self._reserved = 0
        self._jobs: queue.Queue[Optional[_Request]] = queue.Queue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def start(self) -> InferenceServer:
        self._threads = [threading.Thread(target=self._read_loop, name="edgekit-inference", daemon=True)]
        self._threads += [
            threading.Thread(target=self._work, name=f"edgekit-inference-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()
        log.info("agent %s: serving inference on %s", self.agent.config.device, self.url)
        return self

    def stop(self) -> None:
        """Stop accepting, close every connection and the listening socket, end the threads."""
        self._stopping.set()
        for _ in range(self.workers):
            self._jobs.put(None)
        self._wake()
        for thread in self._threads:
            thread.join(timeout=10)
        for conn in list(self._connections):
            self._close(conn)
        self._selector.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # the pipe is full (already woken) or closed (stopping)
            self._wake_w.send(b"x")

    # -- the reader thread: owns every idle or receiving connection --------------------------

    def _read_loop(self) -> None:
        while not self._stopping.is_set():
            deadlines = [c.deadline for c in self._connections if not c.busy]
            timeout = min([1.0, *(d - time.monotonic() for d in deadlines)])
            for key, _ in self._selector.select(timeout=max(0.0, timeout)):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj is self._wake_r:
                    self._drain_wake()
                else:
                    self._receive(key.data)
            self._expire(time.monotonic())

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while self._returned:
            conn = self._returned.popleft()
            conn.busy = False
            if conn.closing:
                self._close(conn)
            elif conn in self._connections:
                self._selector.register(conn.sock, selectors.EVENT_READ, conn)
                if conn.buffer:  # pipelined bytes already here
                    self._parse(conn)

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors: keep serving who is connected
                log.warning("inference: cannot accept a connection: %s", exc)
                return
            sock.setblocking(False)
            if len(self._connections) >= self.max_connections:
                self.turned_away += 1
                self._send_now(sock, 503, {"error": "too many connections; try again shortly"})
                sock.close()
                continue
            conn = _Connection(sock, str(addr[0]), time.monotonic() + self.request_timeout)
            self._connections.add(conn)
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _receive(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.buffer += data
        self._parse(conn)

    def _parse(self, conn: _Connection) -> None:
        """Move ``conn`` on: headers complete -> checked; body complete -> to the workers."""
        try:
            if conn.head is None:
                end = conn.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(conn.buffer) > MAX_HEADER:
                        raise _Refused(431, f"the request headers are over {MAX_HEADER} bytes")
                    return
                self._read_head(conn, bytes(conn.buffer[: end + 4]))
                del conn.buffer[: end + 4]
            if len(conn.buffer) < conn.body_length:
                return
        except _Refused as exc:
            self.requests += 1
            self.rejected += 1
            self._send_now(conn.sock, exc.status, {"error": str(exc)})
            self._close(conn)
            return
        assert conn.head is not None
        method, path, headers, keep_alive = conn.head
        body = bytes(conn.buffer[: conn.body_length])
        del conn.buffer[: conn.body_length]
        self._release(conn)
        conn.head = None
        self._selector.unregister(conn.sock)  # a worker owns it until the reply is sent
        conn.busy = True
        self._jobs.put(_Request(conn, method, path, headers, body, keep_alive))

    def _read_head(self, conn: _Connection, raw: bytes) -> None:
        line, _, rest = raw.partition(b"\r\n")
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _Refused(400, "bad request line; this server speaks HTTP/1.1")
        method, path, version = parts
        headers = http.client.parse_headers(io.BytesIO(rest))
        connection = (headers.get("Connection") or "").lower()
        keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
        if headers.get("Transfer-Encoding"):
            raise _Refused(411, "send the body with a Content-Length (chunked bodies are not accepted)")
        try:
            length = int(headers.get("Content-Length") or 0)
        except ValueError:
            raise _Refused(400, "bad request: a malformed Content-Length") from None
        if length < 0:
            raise _Refused(400, "bad request: a negative Content-Length")
        if length > self.max_body:
            raise _Refused(413, f"the body is over {self.max_body} bytes; send a smaller batch")
        if self._reserved + length > self.body_budget:
            raise _Refused(503, "the device is receiving too much at once; try again shortly")
        self._reserved += length
        conn.reserved, conn.body_length = length, length
        conn.head = (method, path, headers, keep_alive)
        if (headers.get("Expect") or "").lower() == "100-continue":
            self._send_raw(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")

    def _release(self, conn: _Connection) -> None:
        self._reserved -= conn.reserved
        conn.reserved = 0

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._connections if c.deadline <= now and not c.busy]:
            self.timed_out += 1
            if conn.head is not None or conn.buffer:  # a request started and did not finish
                self.requests += 1
                self.rejected += 1
                self._send_now(conn.sock, 408, {"error": f"the request took over {self.request_timeout:g} s"})
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        self._release(conn)
        self._connections.discard(conn)
        if not conn.busy:
            with contextlib.suppress(KeyError, ValueError):  # not registered (a worker had it)
                self._selector.unregister(conn.sock)
        conn.sock.close()

    @staticmethod
    def _send_raw(sock: socket.socket, data: bytes) -> None:
        """Best effort from the reader thread, which never blocks on a client."""
        with contextlib.suppress(OSError):
            sock.send(data)

    def _send_now(self, sock: socket.socket, status: int, doc: Any) -> None:
        self._send_raw(sock, _response(status, doc, keep_alive=False))

    # -- the workers: run complete requests, write replies -----------------------------------

    def _work(self) -> None:
        while True:
            request = self._jobs.get()
            if request is None:
                return
            status, doc = self._answer(request)
            self.requests += 1
            if status >= 400:
                self.rejected += 1
            conn = request.conn
            try:
                conn.sock.settimeout(self.request_timeout)  # a client that does not read its reply
                conn.sock.sendall(_response(status, doc, request.keep_alive))
                conn.sock.setblocking(False)
                conn.closing = not request.keep_alive
            except OSError:
                conn.closing = True
            conn.deadline = time.monotonic() + self.request_timeout
            self._returned.append(conn)  # the reader thread, which owns the selector, takes it back
            self._wake()
            if len(request.body) >= TRIM_AFTER:  # a big JSON body leaves its lists' pages behind
                _return_freed_memory()

    def _answer(self, request: _Request) -> tuple[int, Any]:
        try:
            if not self._authorized(request.headers.get("Authorization")):
                raise _Refused(401, "missing or wrong token: send Authorization: Bearer TOKEN")
            route = (request.method, request.path.split("?", 1)[0])
            if route == ("POST", "/v1/predict"):
                return 200, self._predict(request.body, request.headers.get("Content-Type", ""))
            if route == ("GET", "/v1/status"):
                return 200, self.agent.status().to_dict()
            if route == ("GET", "/v1/drift"):
                report = self.agent.drift()
                return 200, report.to_dict() if report is not None else None
            raise _Refused(404, "unknown endpoint; see POST /v1/predict, GET /v1/status")
        except _Refused as exc:
            return exc.status, {"error": str(exc)}
        except InstallError as exc:
            return 503, {"error": str(exc)}
        except EdgekitError as exc:  # DataError and the like: the request was wrong
            return 400, {"error": str(exc)}
        except ValueError as exc:  # a ragged array
            return 400, {"error": f"bad request: {exc}"}

    def _authorized(self, header: Optional[str]) -> bool:
        if self.token is None:
            return True
        expected = f"Bearer {self.token}"
        return header is not None and hmac.compare_digest(header.encode(), expected.encode())

    def _predict(self, body: bytes, content_type: str) -> dict[str, Any]:
        if content_type.startswith("application/x-npy"):
            try:
                array = np.load(io.BytesIO(body), allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise _Refused(400, f"the body is not a .npy array: {exc}") from None
            request: dict[str, Any] = {"inputs": array}
        else:
            try:
                request = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise _Refused(400, 'the body is not JSON; send {"inputs": [...]}') from None
            if not isinstance(request, dict) or ("inputs" in request) == ("instances" in request):
                raise _Refused(400, 'send a JSON object with either "inputs" or "instances"')
        raw = request.get("raw", False) is True
        loaded = self.agent.served_bundle()
        single = loaded is None or len(loaded.manifest.inputs) == 1

        def run(x: Any) -> Any:
            # JSON has no arrays: for a one-input model a nested list is that one array.
            value = np.asarray(x) if single and isinstance(x, list) else x
            return _jsonable(self.agent.predict(value, as_dict=True, raw=raw))

        reply: dict[str, Any] = {
            "bundle": {"name": loaded.manifest.name, "version": loaded.manifest.version} if loaded else None
        }
        if "instances" in request:
            instances = request["instances"]
            if not isinstance(instances, list):
                raise _Refused(400, '"instances" must be a list of inputs')
            reply["predictions"] = [run(x) for x in instances]
        else:
            reply["outputs"] = run(request["inputs"])
        return reply


def _response(status: int, doc: Any, keep_alive: bool) -> bytes:
    data = json.dumps(doc).encode()
    reason = HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {reason}\r\nServer: edgekit-agent\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode("latin-1") + data
