"""A replay publisher: recorded device messages sent to a broker as fast as it takes them.

Benchmarks need a publisher faster than what they measure. paho (and so edgekit's MqttClient)
spends tens of microseconds of Python per published message, which caps one publisher process
at a few thousand messages a second on this machine: an ingest benchmark fed by it measures the
publisher. This one encodes every PUBLISH packet (QoS 1) before the clock starts, writes them
in large blocks on one connection, and counts the broker's PUBACKs on a second thread; it
returns when every message was acknowledged, so the broker holds all of them.

MQTT 3.1.1: one connection may have any number of QoS 1 messages in flight (an MQTT 5
connection to Mosquitto is held to the broker's receive maximum, 20 by default). The messages
are the same bytes on the same topics as the devices' own.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from mqtt_helpers import mqtt_packet

__all__ = ["ReplayResult", "replay"]


def _string(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def _connect_packet(client_id: str, username: Optional[str], password: Optional[str]) -> bytes:
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", 60) + _string(client_id)
    if username is not None:
        body += _string(username)
    if password is not None:
        body += _string(password)
    return mqtt_packet(0x10, body)


def _publish_packet(topic: str, payload: bytes, mid: int) -> bytes:
    body = _string(topic) + struct.pack("!H", mid) + payload
    return mqtt_packet(0x32, body)


@dataclass(frozen=True)
class ReplayResult:
    messages: int
    started: float  # time.perf_counter() of the first byte written
    written: float  # ... when the last message was written
    acknowledged: float  # ... when the broker had acknowledged every message

    @property
    def rate(self) -> float:
        """Messages per second, acknowledged by the broker."""
        return self.messages / (self.acknowledged - self.started)


def replay(
    host: str,
    port: int,
    items: list[tuple[str, bytes]],
    *,
    client_id: str = "edgekit-replay",
    username: Optional[str] = None,
    password: Optional[str] = None,
    block: int = 256,
    timeout: float = 600.0,
) -> ReplayResult:
    """Publish ``items`` ((topic, payload), QoS 1, in order) and wait for every PUBACK."""
    packets = [_publish_packet(topic, payload, i % 65535 + 1) for i, (topic, payload) in enumerate(items)]
    sock = socket.create_connection((host, port), timeout=30)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(_connect_packet(client_id, username, password))
        connack = sock.recv(4)
        if len(connack) < 4 or connack[0] != 0x20 or connack[3] != 0:
            raise RuntimeError(f"the broker refused the replay publisher: CONNACK {connack!r}")
        sock.settimeout(timeout)
        acked = threading.Event()
        failure: list[BaseException] = []

        def count_acks() -> None:
            expected, buffered = 4 * len(packets), 0
            try:
                while buffered < expected:  # PUBACKs are 4 bytes each; nothing else comes
                    data = sock.recv(65536)
                    if not data:
                        raise RuntimeError("the broker closed the connection")
                    buffered += len(data)
            except (OSError, RuntimeError) as exc:  # handed to the caller
                failure.append(exc)
            acked.set()

        reader = threading.Thread(target=count_acks, name="replay-acks", daemon=True)
        reader.start()
        started = time.perf_counter()
        for index in range(0, len(packets), block):
            sock.sendall(b"".join(packets[index : index + block]))
        written = time.perf_counter()
        if not acked.wait(timeout) or failure:
            raise RuntimeError(f"the replay was not acknowledged: {failure[0] if failure else 'timeout'}")
        acknowledged = time.perf_counter()
        sock.sendall(b"\xe0\x00")  # DISCONNECT
        return ReplayResult(len(packets), started, written, acknowledged)
    finally:
        sock.close()
