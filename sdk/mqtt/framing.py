"""MQTT packets as bytes: splitting a broker's stream into packets, and the few packets edgekit
encodes itself (PUBACKs). Pure: no socket, no paho; the fuzz targets drive it directly."""

from __future__ import annotations

import struct
from typing import Optional, Union

__all__ = [
    "CONNACK",
    "PUBLISH",
    "WRONG_VERSION",
    "MalformedPacketError",
    "PacketReader",
    "PacketTooLargeError",
    "pubacks",
    "varint",
]


class MalformedPacketError(ValueError):
    """The broker sent bytes that are not a well-formed MQTT packet (the connection is dropped)."""


class PacketTooLargeError(MalformedPacketError):
    """The broker sent a packet larger than the client's ``max_packet_size``: refused as soon as
    its fixed header says so, before any of it is buffered (the connection is dropped)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"the broker sent a {size}-byte packet, over this client's max_packet_size of {limit}"
        )
        self.size = size
        self.limit = limit


PUBLISH = 0x30
CONNACK = 0x20
#: The CONNACK return codes meaning "not this protocol version": 3.1.1's 1, MQTT 5's 0x84.
WRONG_VERSION = (0x01, 0x84)
_PUBACK = struct.Struct("!BBH")


class PacketReader:
    """Splits the byte stream from a broker into MQTT control packets. Pure: no socket.

    :meth:`feed` takes the next bytes received and returns a buffer and the ``(first byte,
    start, end)`` of every packet completed in it (``buffer[start:end]`` is the packet after
    its fixed header); an incomplete tail is kept, without copying, for the next call. With
    ``max_packet_size``, a packet whose fixed header announces more bytes in all raises
    :class:`PacketTooLargeError` before anything of it is kept."""

    __slots__ = ("_have", "_max", "_need", "_pieces")

    def __init__(self, max_packet_size: Optional[int] = None) -> None:
        self._max = max_packet_size or 0
        self._pieces: list[Union[bytes, memoryview]] = []
        self._have = 0  # bytes held in _pieces
        self._need = 0  # bytes the held packet needs in all (0: its length is not known yet)

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, int, int]]]:
        if self._pieces:
            self._pieces.append(data)
            self._have += len(data)
            if self._have < self._need:
                return data, []
            data = b"".join(self._pieces)
            self._pieces = []
        packets: list[tuple[int, int, int]] = []
        pos, size = 0, len(data)
        while pos < size:
            index, length, shift = pos + 1, 0, 0
            while True:
                if index >= size:  # the remaining length itself is cut
                    length = -1
                    break
                byte = data[index]
                index += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise MalformedPacketError("an MQTT remaining length longer than four bytes")
            end = index + length
            if self._max and length >= 0 and end - pos > self._max:
                raise PacketTooLargeError(end - pos, self._max)
            if length < 0 or end > size:
                self._pieces = [memoryview(data)[pos:]]
                self._have = size - pos
                self._need = 0 if length < 0 else end - pos
                return data, packets
            packets.append((data[pos], index, end))
            pos = end
        self._have = self._need = 0
        return data, packets


def varint(buffer: bytes, index: int, end: int) -> tuple[int, int]:
    """An MQTT variable byte integer at ``buffer[index:end]``: (value, index after it)."""
    value, shift = 0, 0
    while True:
        if index >= end or shift > 21:
            raise MalformedPacketError("a malformed variable byte integer")
        byte = buffer[index]
        index += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index
        shift += 7


def pubacks(mids: list[int]) -> bytes:
    """PUBACK packets (MQTT 3.1.1 form, which MQTT 5 accepts: success, no properties)."""
    return b"".join([_PUBACK.pack(0x40, 2, mid) for mid in mids])
