"""Helpers for tests that talk to a real broker: collect messages and wait for them (no sleeps)."""

from __future__ import annotations

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
