"""Helpers for tests that talk to a real broker: collect messages and wait for them (no sleeps)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from edgekit.mqtt import Message
from netcut import NetCut


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


class Mqtt5Gate(NetCut):
    """A TCP forwarder to a real broker that closes every connection whose CONNECT asks for
    MQTT 5, as some 3.1.1-only brokers and cloud gateways do: the one fault here is that refusal
    (everything else is the real broker). ``refused`` counts the dropped MQTT 5 CONNECTs,
    ``forwarded`` the connections let through."""

    def __init__(self, upstream_port: int) -> None:
        self.refused = 0
        self.forwarded = 0
        super().__init__("127.0.0.1", upstream_port, first=self._admit)

    def _admit(self, client: socket.socket) -> bytes | None:
        head = b""
        while len(head) < 9:  # fixed header (2 bytes for a small CONNECT), "\0\4MQTT", level
            chunk = client.recv(9 - len(head))
            if not chunk:
                break
            head += chunk
        if head[2:8] == b"\x00\x04MQTT" and head[8:9] == b"\x05":
            self.refused += 1
            return None
        self.forwarded += 1
        return head

    def drop_connections(self) -> None:
        """Close every forwarded connection (the clients reconnect)."""
        self.cut()
        self.restore()
