"""The two paho clients under :class:`edgekit.mqtt.MqttClient` (the only module that imports paho,
with ``client.py``).

:class:`PahoClient` is paho as it comes, with what edgekit needs on top: ``TCP_NODELAY`` on the
socket, switching the protocol version between connection attempts (negotiation), and an
immediate retry after such a switch. It touches six private members of ``paho.Client``:
``_protocol`` and ``_clean_session`` (written between connections, as its constructor does),
``_reconnect_wait`` (overridden), ``_create_socket_connection`` (wrapped), and
``_packet_handle`` with the ``_in_packet`` it reads (wrapped: a 3.1.1 broker's answer to an MQTT
5 CONNECT is told apart before paho misreads it). Devices use it.

:class:`FastReadClient` also replaces paho's read side (the module documentation of
:mod:`edgekit.mqtt` says why and what it gains): it reads paho's connection state and hands
packets to paho's handlers through about a dozen more private members (``_sock``,
``_sock_recv``, ``_out_packet``, ``_packet_queue``,
``_loop_rc_handle``, ``_msgtime_mutex``, ``_last_bytes_received``, ``_manual_ack``,
``_easy_log``). It pays where thousands of messages a second arrive (the fleet's ingest:
BENCHMARKS.md measures both) and is used there only. ``tests/sdk/test_mqtt_read.py`` checks
every private member either client uses against the installed paho, so an upgrade that moves
one fails the suite, not a fleet; pyproject.toml pins paho to the minors tested.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import MQTTException  # type: ignore[attr-defined]  # (2.1 defines it there, 2.2 re-exports)

from .framing import (
    CONNACK,
    PUBLISH,
    WRONG_VERSION,
    MalformedPacketError,
    PacketReader,
    PacketTooLargeError,
    pubacks,
    varint,
)
from .message import Message

if TYPE_CHECKING:
    from .client import MqttClient

__all__ = ["FAST_READ_MEMBERS", "PAHO_MEMBERS", "PROTOCOL_VERSIONS", "FastReadClient", "PahoClient"]

PROTOCOL_VERSIONS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}
#: Bytes asked of the socket per read: many telemetry messages, or a whole bundle chunk.
RECV_SIZE = 256 * 1024
#: Reads per wake-up of paho's loop before it gets a turn to write (acks) and keep alive.
READS_PER_WAKE = 16
#: The private members of ``paho.Client`` each client relies on (checked by the tests).
PAHO_MEMBERS = (
    "_protocol",
    "_clean_session",
    "_reconnect_wait",
    "_create_socket_connection",
    "_in_packet",
    "_packet_handle",
    "_sock_recv",
    "_loop_rc_handle",
    "_thread_main",
    "_thread_terminate",
)
FAST_READ_MEMBERS = (
    "_sock",
    "_sock_recv",
    "_out_packet",
    "_packet_queue",
    "_loop_rc_handle",
    "_msgtime_mutex",
    "_last_bytes_received",
    "_manual_ack",
    "_easy_log",
)


class PahoClient(paho.Client):
    """paho's client, with Nagle off, the protocol version switchable between attempts, and a
    read side that cannot die: any exception while reading (a packet paho cannot parse, an
    exception out of a callback, a packet over ``max_packet_size``) drops the connection, is
    counted (``owner.read_errors``) and logged, and paho connects again; the network thread
    itself goes on should anything else escape paho's loop."""

    def __init__(self, owner: MqttClient, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.owner = owner
        #: Reconnect at once (not after the backoff): the next attempt tries another protocol.
        self.retry_now = False

    def _reconnect_wait(self) -> None:
        if self.retry_now:
            self.retry_now = False
            return
        super()._reconnect_wait()

    def speak(self, protocol: str, clean_session: bool) -> None:
        """Use ``protocol`` from the next CONNECT on (the connection is not open)."""
        self._protocol = PROTOCOL_VERSIONS[protocol]
        self._clean_session = clean_session  # read by paho for 3.1.1 only
        self.retry_now = True

    def _create_socket_connection(self) -> socket.socket:
        sock = super()._create_socket_connection()
        # MQTT is request/response in small packets (SUBSCRIBE after a PUBLISH, PUBACKs): with
        # Nagle's algorithm a small write waits for the ACK of the one before, which the
        # broker's delayed ACK holds up to 40 ms (paho leaves Nagle on).
        with contextlib.suppress(OSError):  # not TCP (a proxy's socket, say): nothing to tune
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def send_pubacks(self, mids: list[int]) -> None:
        """Acknowledge QoS 1 messages by packet id (thread-safe)."""
        for mid in mids:
            self.ack(mid, 1)

    # -- a read side that cannot die --------------------------------------------------------

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        try:
            return self._loop_read(max_packets)
        except Exception as exc:  # noqa: BLE001 - counted and logged in _read_failed, never silent
            return self._read_failed(exc)

    def _loop_read(self, max_packets: int) -> MQTTErrorCode:
        return super().loop_read(max_packets)

    def _read_failed(self, exc: Exception) -> MQTTErrorCode:
        """Reading raised: count and log it, forget the packet being read, drop the connection
        (``_loop_rc_handle`` closes the socket and calls on_disconnect; paho's loop reconnects)."""
        self.owner._read_failed(exc)
        self._in_packet = _in_packet(0, b"")
        return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_PROTOCOL)

    def _sock_recv(self, bufsize: int) -> bytes:
        """paho reads a packet's body right after its fixed header: a packet over
        ``max_packet_size`` is refused there, before any of it is read, and no read asks for
        more than ``RECV_SIZE`` bytes (Python allocates what a recv asks for up front)."""
        packet = self._in_packet
        limit = self.owner._max_packet_size
        if limit and packet["have_remaining"]:
            size = 1 + len(packet["remaining_count"]) + packet["remaining_length"]
            if size > limit:
                raise PacketTooLargeError(size, limit)
        return super()._sock_recv(min(bufsize, RECV_SIZE))

    def _thread_main(self) -> None:
        """paho's network thread, kept alive: an exception out of its loop (not the read side's,
        handled above) is counted and logged, the connection dropped, and the loop goes on."""
        try:
            while True:
                try:
                    self.loop_forever(retry_first_connection=True)
                    return
                except Exception as exc:  # noqa: BLE001 - counted and logged, then the loop goes on
                    if self._thread_terminate:
                        return
                    self.owner._read_failed(exc)
                    with contextlib.suppress(Exception):
                        self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
                    self._reconnect_wait()
        finally:
            self._thread = None

    def _packet_handle(self) -> MQTTErrorCode:
        """Every packet read goes through here (paho's read side, or ours): a 3.1.1 broker's
        CONNACK to an MQTT 5 CONNECT (2 bytes that paho would misread as MQTT 5) closes the
        connection, and the owner's disconnect handler tries 3.1.1."""
        packet = self._in_packet
        body = packet["packet"]
        if (
            packet["command"] & 0xF0 == CONNACK
            and self._protocol == paho.MQTTv5
            and self.owner._negotiating
            and len(body) >= 2
            and body[1] in WRONG_VERSION
        ):
            return MQTTErrorCode.MQTT_ERR_CONN_REFUSED
        return super()._packet_handle()


class FastReadClient(PahoClient):
    """paho's client with edgekit's read side (see the module documentation).

    Only reading is replaced: :meth:`loop_read` reads big blocks, :class:`PacketReader`
    splits them, QoS 0/1 PUBLISH packets become :class:`~edgekit.mqtt.Message` objects for
    ``owner._deliver`` (a list per read), and every other packet (CONNACK, SUBACK, PUBACK,
    PINGRESP, QoS 2 flows, DISCONNECT) goes through ``_in_packet`` to paho's own
    ``_packet_handle``, after the messages that came before it were delivered."""

    def __init__(self, owner: MqttClient, **kwargs: Any) -> None:
        super().__init__(owner, **kwargs)
        self._reader = PacketReader(owner._max_packet_size)
        self._reader_sock: Any = None
        self._acks_queued = False

    def _loop_read(self, max_packets: int) -> MQTTErrorCode:
        rc = self._read_blocks()
        if self._acks_queued:  # the PUBACKs of what was just read: written now, on this thread
            self._acks_queued = False
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None:
                return self.loop_write()
        return rc

    def _read_blocks(self) -> MQTTErrorCode:
        for _ in range(READS_PER_WAKE):
            sock = self._sock
            if sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            if sock is not self._reader_sock:  # a new connection starts a new stream
                self._reader, self._reader_sock = PacketReader(self.owner._max_packet_size), sock
            try:
                data = self._sock_recv(RECV_SIZE)
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            except OSError as err:
                self._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
            if not data:
                return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
            with self._msgtime_mutex:
                self._last_bytes_received = time.monotonic()
            try:
                rc = self._take(data)
            except (MalformedPacketError, MQTTException, struct.error, IndexError, ValueError) as exc:
                return self._read_failed(exc)  # counted and logged; the connection is dropped
            if rc > 0:  # as paho's own loop_read: MQTT_ERR_AGAIN (-1) is not an error
                return self._loop_rc_handle(rc)
            if len(data) < RECV_SIZE and not getattr(sock, "pending", lambda: 0)():
                return MQTTErrorCode.MQTT_ERR_SUCCESS  # drained: let paho write and keep alive
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _take(self, data: bytes) -> MQTTErrorCode:
        buffer, packets = self._reader.feed(data)
        owner = self.owner
        v5 = self._protocol == paho.MQTTv5
        auto_ack = not self._manual_ack
        connection = owner.connections
        messages: list[Message] = []
        acks: list[int] = []
        for header, start, end in packets:
            qos = (header >> 1) & 3
            if header & 0xF0 != PUBLISH or qos == 2:
                if messages:
                    self._flush(messages, acks)
                    messages, acks = [], []
                rc = self._paho_handle(header, buffer[start:end])
                if rc > 0 or self._sock is None:  # an error, or paho closed the connection
                    return rc
                continue
            if qos == 3:
                raise MalformedPacketError("a PUBLISH with QoS 3")
            index = start + 2 + (buffer[start] << 8 | buffer[start + 1])
            topic = buffer[start + 2 : index]
            mid = 0
            if qos:
                mid = buffer[index] << 8 | buffer[index + 1]
                index += 2
            if v5:
                length, index = varint(buffer, index, end)
                index += length  # PUBLISH properties: none of them concerns a subscriber here
            if index > end or not topic or (qos and not mid):
                raise MalformedPacketError("a PUBLISH shorter than its topic, packet id and properties")
            if qos and auto_ack:
                acks.append(mid)
            try:
                name = topic.decode()
            except UnicodeDecodeError:
                owner._drop_unroutable(qos, mid)
                continue
            messages.append(Message(name, buffer[index:end], qos, bool(header & 1), mid, connection))
        if messages or acks:
            self._flush(messages, acks)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _flush(self, messages: list[Message], acks: list[int]) -> None:
        if messages:
            self.owner._deliver(messages)
        if acks:
            # On the network thread: queued for the write at the end of loop_read. paho's
            # _packet_queue would also wake its own loop through the socket pair, for one more
            # select() round per read just to send them.
            self._out_packet.append(_out_packet(paho.PUBACK, pubacks(acks)))
            self._acks_queued = True

    def sendpubacks(self, mids: list[int]) -> None:
        """Acknowledge QoS 1 messages by packet id, in one write (thread-safe)."""
        self._packet_queue(paho.PUBACK, pubacks(mids), 0, 0)

    def _paho_handle(self, header: int, body: bytes) -> MQTTErrorCode:
        self._in_packet = _in_packet(header, body)
        try:
            return self._packet_handle()
        finally:
            self._in_packet = _in_packet(0, b"")  # as paho leaves it between packets


def _out_packet(command: int, packet: bytes) -> Any:
    """An entry of paho's outgoing queue (``_out_packet``), as its ``_packet_queue`` makes it."""
    return {
        "command": command,
        "mid": 0,
        "qos": 0,
        "pos": 0,
        "to_process": len(packet),
        "packet": packet,
        "info": None,
    }


def _in_packet(header: int, body: bytes) -> Any:
    """paho's ``_in_packet`` for a whole packet read here (``header`` 0: no packet)."""
    return {
        "command": header,
        "have_remaining": 1 if header else 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": len(body),
        "packet": bytearray(body),
        "to_process": 0,
        "pos": 0,
    }
