"""Helpers for tests that talk to a real broker: collect messages and wait for them (no sleeps)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

from edgekit.mqtt import Message


class Inbox:
    """A subscription handler that records messages (and the thread they arrived on)."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.threads: set[str] = set()
        self._cond = threading.Condition()

    def __call__(self, message: Message) -> None:
        with self._cond:
            self.messages.append(message)
            self.threads.add(threading.current_thread().name)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[Message]], bool], timeout: float = 10.0) -> list[Message]:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.messages), timeout):
                raise AssertionError(f"timed out; got {[(m.topic, m.payload[:40]) for m in self.messages]}")
            return list(self.messages)

    def wait_topic(self, topic: str, timeout: float = 10.0) -> Message:
        found = self.wait_for(lambda ms: any(m.topic == topic for m in ms), timeout)
        return next(m for m in found if m.topic == topic)

    def topics(self) -> list[str]:
        with self._cond:
            return [m.topic for m in self.messages]


class Events:
    """A connection listener that records (connected, reason) and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[bool] = []
        self._cond = threading.Condition()

    def __call__(self, connected: bool, reason: str) -> None:
        with self._cond:
            self.events.append(connected)
            self._cond.notify_all()

    def wait_count(self, value: bool, count: int, timeout: float = 20.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.events.count(value) >= count, timeout):
                raise AssertionError(f"timed out waiting for {count}x connected={value}: {self.events}")


def varint(value: int) -> bytes:
    """An MQTT variable byte integer (a remaining length)."""
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def mqtt_packet(header: int, body: bytes) -> bytes:
    """A control packet: its first byte, the remaining length, the rest."""
    return bytes([header]) + varint(len(body)) + body


class Mqtt5Gate:
    """A TCP forwarder to a real broker that closes every connection whose CONNECT asks for
    MQTT 5, as some 3.1.1-only brokers and cloud gateways do: the one fault here is that refusal
    (everything else is the real broker). ``refused`` counts the dropped MQTT 5 CONNECTs."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.refused = 0
        self.forwarded = 0
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="mqtt5-gate", daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            head = b""
            while len(head) < 9:  # fixed header (2 bytes for a small CONNECT), "\0\4MQTT", level
                chunk = client.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
            if head[2:8] == b"\x00\x04MQTT" and head[8] == 5:
                with self._lock:
                    self.refused += 1
                client.close()
                continue
            upstream = socket.create_connection(self.upstream)
            upstream.sendall(head)
            with self._lock:
                self.forwarded += 1
                self._open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def drop_connections(self) -> None:
        """Close every forwarded connection (the clients reconnect)."""
        with self._lock:
            victims, self._open = self._open, []
        for sock in victims:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.drop_connections()
        self._server.close()
