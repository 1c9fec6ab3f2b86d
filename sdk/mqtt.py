"""The one MQTT client of edgekit: a small wrapper over paho-mqtt 2.x.

Nothing else in edgekit imports paho. :class:`MqttClient` hides paho's network thread and
callback API versions behind connect / subscribe / publish / close:

- ``mqtt://host[:port]`` (default port 1883) or ``mqtts://host[:port]`` (TLS, default 8883),
  username/password, a CA and a client certificate, a last will.
- **Protocol version, negotiated.** A client tries MQTT 5 first; when the broker closes the
  connection without a CONNACK, or refuses the protocol version (a 3.1.1 CONNACK with return
  code 1, or MQTT 5's 0x84), it tries MQTT 3.1.1 at once, and back, until one is accepted
  (the embedded broker of ``edgekit fleet up`` and RabbitMQ 3.x's MQTT plugin speak 3.1.1
  only). The version that worked is remembered by that client, for every reconnect; a new
  client (a new process) asks again, which costs one refused connection (about a
  millisecond on a LAN), so a broker upgraded in place (amqtt, then Mosquitto, on the same
  port) is spoken to in MQTT 5 at once. ``protocol="5"`` / ``"3.1.1"``, or
  ``?protocol=5|3.1.1`` in the URL, pins the version instead (no fallback).
- Reconnects by itself after the connection drops, with exponential backoff between
  ``reconnect_min`` and ``reconnect_max`` seconds, and re-subscribes every filter on each new
  connection (sessions are clean by default, and a renewed subscription gets the retained messages again; that is how a
  device resumes a bundle download after a broker outage). It reports itself connected
  (:attr:`MqttClient.connected`, listeners) only once the broker acknowledged those renewed
  subscriptions, so a message published after that point is not missed.
- **Threading.** paho's network thread only moves bytes. Every callback this client calls
  (message handlers given to :meth:`MqttClient.subscribe` and connection listeners given to
  :meth:`MqttClient.on_connection_change`) runs on ONE dispatcher thread per client, named
  ``edgekit-mqtt-<client id>``, in the order messages arrived. A handler may publish,
  subscribe, and even wait for a delivery; a slow handler delays the next handler, never the
  network. An exception in a handler is logged and counted (:attr:`MqttClient.handler_errors`),
  and the loop goes on.
- :meth:`MqttClient.publish` returns a :class:`Delivery`; ``Delivery.wait()`` blocks until the
  broker acknowledged it (QoS 1/2; QoS 0: written to the socket), surviving reconnects (paho
  re-sends unacknowledged QoS 1/2 messages), and raises if an MQTT 5 broker refused it.
- :meth:`MqttClient.close` disconnects cleanly (the will is not sent), stops both threads.
- Nagle's algorithm is off on every connection (``TCP_NODELAY``): small packets in a row (a
  state report, then a SUBSCRIBE) go out at once instead of waiting for a delayed ACK.
- **The read side is edgekit's own.** paho keeps the connection, the session, keepalive, TLS
  and every outgoing flow; incoming bytes are read in large blocks and split into packets by
  :class:`_PacketReader`, and QoS 0/1 PUBLISH packets are decoded here (one copy of the
  payload, no per-packet ``Properties`` object, one PUBACK write for many messages) and handed
  to the dispatcher in batches. Every other packet goes to paho's own handlers, in order. paho
  reads each packet with three or more ``recv`` calls and copies a payload several times; a
  telemetry-sized message cost about 75 µs of CPU there and about a tenth of that here, and a
  128 KiB bundle chunk is copied once instead of four times (BENCHMARKS.md). This uses paho's
  internals, hence the narrow ``paho-mqtt`` pin in pyproject.toml.
- **Acknowledging later.** With ``manual_ack=True`` a QoS 1 message is acknowledged to the
  broker only when the application calls :meth:`MqttClient.ack` (e.g. once it is committed to
  a database); until then the broker counts it against the client's ``receive_maximum``
  (MQTT 5) and stops sending more, which is the backpressure. An ack only goes out on the
  connection that delivered the message: after a reconnect, a persistent session
  (``session_expiry`` > 0) gets the unacknowledged messages again, a clean one never does.

Errors are :class:`~edgekit.errors.BrokerError`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import parse_qsl, unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MQTTException, Properties  # type: ignore[attr-defined]  # (2.1 defines it there, 2.2 re-exports)
from paho.mqtt.reasoncodes import ReasonCode

from .errors import BrokerError

__all__ = [
    "Delivery",
    "Message",
    "MqttClient",
    "TlsConfig",
    "Will",
    "parse_broker_url",
    "topic_matches",
]

log = logging.getLogger(__name__)
_paho_log = logging.getLogger(f"{__name__}.paho")

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
_PROTOCOLS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}

Payload = Union[bytes, bytearray, str, None]


@dataclass(frozen=True)
class Message:
    """A message as delivered to a subscription handler."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    #: The packet id (QoS 1/2), for :meth:`MqttClient.ack`.
    mid: int = 0
    #: Which connection (:attr:`MqttClient.connections`) delivered it.
    connection: int = 0


@dataclass(frozen=True)
class Will:
    """The last will: what the broker publishes for this client if it vanishes without a
    clean :meth:`MqttClient.close` (a device marks itself ``offline`` this way)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings for ``mqtts://``: a CA bundle to trust (None: the system's), and an
    optional client certificate and key (PEM) for brokers that require one."""

    ca_file: Optional[Path] = None
    cert_file: Optional[Path] = None
    key_file: Optional[Path] = None
    check_hostname: bool = True

    def context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            ctx.check_hostname = self.check_hostname
            if self.cert_file is not None:
                ctx.load_cert_chain(str(self.cert_file), str(self.key_file) if self.key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(
                f"cannot load the TLS files ({exc}); check the CA, certificate and key paths"
            ) from None
        return ctx


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    protocol: Optional[str] = None  # "5" or "3.1.1" when the URL says (``?protocol=3.1.1``)


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://[user[:password]@]host[:port][?protocol=5|3.1.1]`` or ``mqtts://...``;
    BrokerError if malformed."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BrokerError(
            f"invalid broker URL {url!r} ({exc}); use mqtt://host:1883 or mqtts://host:8883"
        ) from None
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise BrokerError(f"invalid broker URL {url!r}; use mqtt://host:1883 or mqtts://host:8883")
    if parts.path not in ("", "/") or parts.fragment:
        raise BrokerError(f"invalid broker URL {url!r}: it must not have a path")
    protocol = _url_protocol(url, parts.query)
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname,
        port=port or (DEFAULT_TLS_PORT if tls else DEFAULT_PORT),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        protocol=protocol,
    )


def _url_protocol(url: str, query: str) -> Optional[str]:
    try:
        params = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        params = [("", "")]
    if any(key != "protocol" for key, _ in params) or len(params) > 1:
        raise BrokerError(
            f"invalid broker URL {url!r}: the only query it may have is ?protocol=5 or ?protocol=3.1.1"
        )
    if not params:
        return None
    value = params[0][1]
    if value not in _PROTOCOLS:
        raise BrokerError(f"invalid broker URL {url!r}: protocol must be 5 or 3.1.1, not {value!r}")
    return value


@functools.lru_cache(maxsize=65536)
def topic_matches(topic_filter: str, topic: str) -> bool:
    """True if ``topic`` matches ``topic_filter`` (``+`` and ``#`` wildcards, ``$share/g/``),
    by the rules of MQTT (a ``#`` also matches its parent level; a wildcard at the first level
    does not match a ``$`` topic). Cached: a fleet publishes on the same topics again and again.
    (paho's ``topic_matches_sub`` builds a matcher tree per call, about 100 µs: too slow for a
    dispatcher that asks for every new topic, such as every chunk of a bundle.)"""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    levels, names = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and levels[0] in ("+", "#"):
        return False
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if level == "#":
            return index == last
        if index >= len(names) or (level != "+" and level != names[index]):
            return False
    return len(levels) == len(names)


class Delivery:
    """A published message on its way to the broker."""

    def __init__(self, client: MqttClient, info: paho.MQTTMessageInfo, qos: int, topic: str) -> None:
        self._client = client
        self._info = info
        self.qos = qos
        self.topic = topic

    @property
    def done(self) -> bool:
        return bool(self._info._published)

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until the broker has the message; BrokerError on timeout or refusal.

        A QoS 1/2 message published while disconnected is sent after the reconnect, so waiting
        across a broker outage works. A QoS 0 message published while disconnected is lost.
        """
        rc = self._info.rc
        if rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise BrokerError(f"the outgoing queue is full; {self.topic} was not queued")
        if self.qos == 0 and rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerError(f"not connected to the broker; the QoS 0 message to {self.topic} was dropped")
        deadline = None if timeout is None else time.monotonic() + timeout
        # paho's own wait_for_publish() gives up at once when the message was queued during an
        # outage (rc NO_CONN) although paho re-sends it on reconnect, so wait on its condition.
        condition = self._info._condition
        with condition:
            while not self._info._published:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise BrokerError(
                        f"the broker did not acknowledge {self.topic} within {timeout:g}s; is it reachable?"
                    )
                condition.wait(0.5 if remaining is None else min(remaining, 0.5))
        reason = self._client._take_publish_failure(self._info.mid)
        if reason is not None:
            raise BrokerError(
                f"the broker refused the message to {self.topic} ({reason}); "
                "check this account's ACL (topics it may publish to)"
            )


Handler = Callable[[Message], None]
ConnectionListener = Callable[[bool, str], None]


class MalformedPacketError(ValueError):
    """The broker sent bytes that are not a well-formed MQTT packet (the connection is dropped)."""


_PUBLISH = 0x30
_CONNACK = 0x20
#: The CONNACK return codes meaning "not this protocol version": 3.1.1's 1, MQTT 5's 0x84.
_WRONG_VERSION = (0x01, 0x84)
_UNPIN = "leave the protocol out of the broker URL and edgekit will use the version the broker speaks"
_PUBACK = struct.Struct("!BBH")
#: Bytes asked of the socket per read: many telemetry messages, or a whole bundle chunk.
_RECV_SIZE = 256 * 1024
#: Reads per wake-up of paho's loop before it gets a turn to write (acks) and keep alive.
_READS_PER_WAKE = 16


class _PacketReader:
    """Splits the byte stream from a broker into MQTT control packets. Pure: no socket.

    :meth:`feed` takes the next bytes received and returns a buffer and the ``(first byte,
    start, end)`` of every packet completed in it (``buffer[start:end]`` is the packet after
    its fixed header); an incomplete tail is kept, without copying, for the next call."""

    __slots__ = ("_have", "_need", "_pieces")

    def __init__(self) -> None:
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
            if length < 0 or end > size:
                self._pieces = [memoryview(data)[pos:]]
                self._have = size - pos
                self._need = 0 if length < 0 else end - pos
                return data, packets
            packets.append((data[pos], index, end))
            pos = end
        self._have = self._need = 0
        return data, packets


def _varint(buffer: bytes, index: int, end: int) -> tuple[int, int]:
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


class _PahoClient(paho.Client):
    """paho's client with edgekit's read side (see the module documentation).

    Only reading is replaced: :meth:`loop_read` reads big blocks, :class:`_PacketReader`
    splits them, QoS 0/1 PUBLISH packets become :class:`Message` objects for
    ``owner._deliver`` (a list per read), and every other packet (CONNACK, SUBACK, PUBACK,
    PINGRESP, QoS 2 flows, DISCONNECT) goes through ``_in_packet`` to paho's own
    ``_packet_handle``, after the messages that came before it were delivered."""

    def __init__(self, owner: MqttClient, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._edgekit = owner
        self._reader = _PacketReader()
        self._reader_sock: Any = None
        self._acks_queued = False
        #: Reconnect at once (not after the backoff): the next attempt tries another protocol.
        self.retry_now = False

    def _reconnect_wait(self) -> None:
        if self.retry_now:
            self.retry_now = False
            return
        super()._reconnect_wait()

    def speak(self, protocol: str, clean_session: bool) -> None:
        """Use ``protocol`` from the next CONNECT on (the connection is not open)."""
        self._protocol = _PROTOCOLS[protocol]
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

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = self._read_blocks()
        if self._acks_queued:  # the PUBACKs of what was just read: written now, on this thread
            self._acks_queued = False
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None:
                return self.loop_write()
        return rc

    def _read_blocks(self) -> MQTTErrorCode:
        for _ in range(_READS_PER_WAKE):
            sock = self._sock
            if sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            if sock is not self._reader_sock:  # a new connection starts a new stream
                self._reader, self._reader_sock = _PacketReader(), sock
            try:
                data = self._sock_recv(_RECV_SIZE)
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
                self._easy_log(paho.MQTT_LOG_ERR, "received a malformed packet: %s", exc)
                rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
            if rc > 0:  # as paho's own loop_read: MQTT_ERR_AGAIN (-1) is not an error
                return self._loop_rc_handle(rc)
            if len(data) < _RECV_SIZE and not getattr(sock, "pending", lambda: 0)():
                return MQTTErrorCode.MQTT_ERR_SUCCESS  # drained: let paho write and keep alive
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _take(self, data: bytes) -> MQTTErrorCode:
        buffer, packets = self._reader.feed(data)
        owner = self._edgekit
        v5 = self._protocol == paho.MQTTv5
        auto_ack = not self._manual_ack
        connection = owner.connections
        messages: list[Message] = []
        acks: list[int] = []
        for header, start, end in packets:
            qos = (header >> 1) & 3
            if header & 0xF0 != _PUBLISH or qos == 2:
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
                length, index = _varint(buffer, index, end)
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
            self._edgekit._deliver(messages)
        if acks:
            # On the network thread: queued for the write at the end of loop_read. paho's
            # _packet_queue would also wake its own loop through the socket pair, for one more
            # select() round per read just to send them.
            self._out_packet.append(_out_packet(paho.PUBACK, _pubacks(acks)))
            self._acks_queued = True

    def send_pubacks(self, mids: list[int]) -> None:
        """Acknowledge QoS 1 messages by packet id, in one write (thread-safe)."""
        self._packet_queue(paho.PUBACK, _pubacks(mids), 0, 0)

    def _paho_handle(self, header: int, body: bytes) -> MQTTErrorCode:
        if (
            header == _CONNACK
            and self._protocol == paho.MQTTv5
            and self._edgekit._negotiating
            and len(body) >= 2
            and body[1] in _WRONG_VERSION
        ):
            # A 3.1.1 broker's answer to an MQTT 5 CONNECT (paho would misread its 2 bytes):
            # close, and the owner's disconnect handler tries 3.1.1.
            return MQTTErrorCode.MQTT_ERR_CONN_REFUSED
        self._in_packet = _in_packet(header, body)
        try:
            return self._packet_handle()
        finally:
            self._in_packet = _in_packet(0, b"")  # as paho leaves it between packets


def _pubacks(mids: list[int]) -> bytes:
    return b"".join([_PUBACK.pack(0x40, 2, mid) for mid in mids])


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


class MqttClient:
    """A connection to one MQTT broker. See the module documentation for the threading rules.

    ``url``: ``mqtt://host:port`` or ``mqtts://host:port`` (credentials in the URL are used when
    ``username`` is not given). ``protocol``: ``"5"`` or ``"3.1.1"``; None (the default) takes
    the URL's ``?protocol=``, else negotiates (MQTT 5, else 3.1.1; :attr:`protocol` says which
    once connected). ``max_packet_size``
    (MQTT 5) asks the broker never to send this client a larger packet. ``manual_ack``: QoS 1
    messages are acknowledged by :meth:`ack`, not on delivery. ``session_expiry`` > 0 keeps the
    broker-side session (subscriptions, unacknowledged and queued messages) that many seconds
    after a disconnect, for a client that reconnects with the same ``client_id``; 0 (default)
    means a clean session. ``receive_maximum`` (MQTT 5): how many unacknowledged QoS 1/2
    messages the broker may have in flight to this client (default: the broker's choice).
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: Optional[str] = None,
        protocol: Optional[str] = None,
        username: Optional[str] = None,
        password: Optional[str] = None,
        tls: Optional[TlsConfig] = None,
        will: Optional[Will] = None,
        keepalive: int = 30,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        max_inflight: int = 20,
        max_packet_size: Optional[int] = None,
        manual_ack: bool = False,
        session_expiry: int = 0,
        receive_maximum: Optional[int] = None,
    ) -> None:
        self.address = parse_broker_url(url)
        #: No version given: fall back between 5 and 3.1.1 until the broker accepts one.
        self._negotiating = protocol is None and self.address.protocol is None
        protocol = protocol or self.address.protocol or "5"
        if protocol not in _PROTOCOLS:
            raise BrokerError(f"unknown MQTT protocol version {protocol!r}; use '5' or '3.1.1'")
        self.url = f"{'mqtts' if self.address.tls else 'mqtt'}://{self.address.host}:{self.address.port}"
        self.client_id = client_id or f"edgekit-{uuid.uuid4().hex[:12]}"
        self.protocol = protocol
        self._v5 = protocol == "5"
        self._keepalive = keepalive
        self._max_packet_size = max_packet_size
        if session_expiry < 0 or (receive_maximum is not None and not 0 < receive_maximum <= 65535):
            raise BrokerError("session_expiry must be >= 0 and receive_maximum from 1 to 65535")
        self._session_expiry = session_expiry
        self._receive_maximum = receive_maximum
        self.manual_ack = manual_ack
        self._paho = _PahoClient(
            self,
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if self._v5 else session_expiry == 0,
            protocol=_PROTOCOLS[protocol],
            reconnect_on_failure=True,
            manual_ack=manual_ack,
        )
        self._paho.enable_logger(_PahoLogger(self))  # type: ignore[arg-type]  # paho calls only .log()
        self._paho.reconnect_delay_set(reconnect_min, reconnect_max)  # type: ignore[arg-type]
        self._paho.max_inflight_messages_set(max_inflight)
        user = username if username is not None else self.address.username
        secret = password if username is not None else self.address.password
        if user is not None:
            self._paho.username_pw_set(user, secret)
        if self.address.tls:
            self._paho.tls_set_context((tls or TlsConfig()).context())
        elif tls is not None:
            raise BrokerError(f"TLS settings were given but {url!r} is not mqtts://; use mqtts://")
        if will is not None:
            self._paho.will_set(will.topic, will.payload, will.qos, will.retain)

        self._lock = threading.Lock()
        self._subscriptions: dict[str, tuple[int, list[Handler]]] = {}
        #: The handlers of each topic seen (dispatcher thread; emptied when subscriptions change).
        self._routes: dict[str, list[Handler]] = {}
        self._listeners: list[ConnectionListener] = []
        self._connected = threading.Event()
        # The transport is up (CONNACK received); `connected` waits for renewed subscriptions too.
        self._link_up = False
        self._renewing: dict[int, str] = {}
        self._first_result: Optional[str] = None
        self._first_done = threading.Event()
        self._dropped_unanswered = False  # the broker closed the socket before any CONNACK
        self._connack = False  # a CONNACK came on the current connection
        self._tls_failure: Optional[str] = None  # why the TLS handshake failed, before any CONNACK
        self._acks = threading.Condition()
        self._suback: dict[int, list[ReasonCode]] = {}
        self._publish_failures: dict[int, str] = {}
        self._queue: queue.SimpleQueue[Optional[tuple[Callable[..., None], tuple[Any, ...]]]] = (
            queue.SimpleQueue()
        )
        self._dispatcher: Optional[threading.Thread] = None
        self._started = False
        self._closed = False
        #: Handler exceptions (logged, then ignored so the loop goes on).
        self.handler_errors = 0
        #: Messages that matched no subscription, or whose topic was not UTF-8.
        self.unroutable = 0
        #: How many times the connection was (re-)established.
        self.connections = 0

        self._paho.on_connect = self._on_connect
        self._paho.on_disconnect = self._on_disconnect
        self._paho.on_message = self._on_message
        self._paho.on_subscribe = self._on_subscribe
        self._paho.on_publish = self._on_publish

    # -- lifecycle ------------------------------------------------------------------------------

    def connect(self, timeout: Optional[float] = 10.0) -> MqttClient:
        """Start the client. With a ``timeout``, wait for the first connection and raise
        BrokerError if it is refused or not made in time (the client is then closed); with
        ``timeout=None``, return at once and keep trying in the background."""
        if self._started:
            raise BrokerError("this client is already started; create a new MqttClient")
        self._started = True
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, name=f"edgekit-mqtt-{self.client_id}", daemon=True
        )
        self._dispatcher.start()
        properties = None
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._session_expiry
            if self._max_packet_size:
                properties.MaximumPacketSize = self._max_packet_size
            if self._receive_maximum:
                properties.ReceiveMaximum = self._receive_maximum
        self._paho.connect_async(
            self.address.host,
            self.address.port,
            keepalive=self._keepalive,
            clean_start=self._session_expiry == 0,
            properties=properties,
        )
        self._paho.loop_start()
        if timeout is None:
            return self
        if not self._first_done.wait(timeout):
            self.close()
            if self._tls_failure is not None:
                raise BrokerError(
                    f"could not connect to the broker at {self.url}: TLS failed ({self._tls_failure}); "
                    "check the CA, the client certificate and its key in the config"
                )
            if self._dropped_unanswered:
                raise BrokerError(
                    f"the broker at {self.url} closed the connection without accepting "
                    + (
                        "MQTT 5 or MQTT 3.1.1; is this the broker's MQTT port?"
                        if self._negotiating
                        else f"MQTT {self.protocol}; {_UNPIN}"
                    )
                )
            raise BrokerError(
                f"could not connect to the broker at {self.url} within {timeout:g}s; is it running and reachable?"
            )
        if self._first_result is not None:
            self.close()
            reason = self._first_result
            if "protocol version" in reason.lower():
                reason += f" (MQTT {self.protocol}); {_UNPIN}"
            raise BrokerError(f"the broker at {self.url} refused the connection: {reason}")
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the will is not published), stop the network and dispatcher
        threads. Messages still queued for handlers are delivered first. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            self._paho.disconnect()
            self._paho.loop_stop()
            self._queue.put(None)
            if self._dispatcher is not None and self._dispatcher is not threading.current_thread():
                self._dispatcher.join(timeout)
        self._connected.clear()

    def __enter__(self) -> MqttClient:
        if not self._started:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        """Block until connected (e.g. again after an outage); False on timeout."""
        return self._connected.wait(timeout)

    def on_connection_change(self, listener: ConnectionListener) -> None:
        """Call ``listener(connected, reason)`` on the dispatcher thread at every (dis)connect."""
        with self._lock:
            self._listeners.append(listener)

    # -- subscribe / publish --------------------------------------------------------------------

    def subscribe(
        self, topic_filter: str, handler: Handler, qos: int = 1, timeout: Optional[float] = 10.0
    ) -> None:
        """Deliver messages matching ``topic_filter`` to ``handler`` (on the dispatcher thread).

        Subscribing again to a filter adds the handler and asks the broker to re-send the
        retained messages. With a ``timeout`` and a connection, waits for the broker's SUBACK
        and raises BrokerError if it refused. The subscription is renewed on every reconnect.
        """
        if qos not in (0, 1, 2):
            raise BrokerError(f"invalid QoS {qos}; use 0, 1 or 2")
        with self._lock:
            current = self._subscriptions.get(topic_filter)
            handlers = [*current[1], handler] if current else [handler]
            self._subscriptions[topic_filter] = (max(qos, current[0]) if current else qos, handlers)
            self._routes = {}
            link_up = self._link_up
        if not link_up:
            return  # sent with the others when the connection is (re-)established
        rc, mid = self._paho.subscribe(topic_filter, qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None or timeout is None:
            return  # sent again on reconnect
        codes = self._wait_ack(self._suback, mid, timeout, f"SUBACK for {topic_filter}")
        if codes and codes[0].is_failure:
            with self._lock:
                self._subscriptions.pop(topic_filter, None)
                self._routes = {}
            raise BrokerError(
                f"the broker refused the subscription to {topic_filter} ({codes[0]}); "
                "check this account's ACL (topics it may read)"
            )

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop delivering ``topic_filter`` to any handler."""
        with self._lock:
            if self._subscriptions.pop(topic_filter, None) is None:
                return
            self._routes = {}
            link_up = self._link_up
        if link_up:
            self._paho.unsubscribe(topic_filter)

    def ack(self, message: Message) -> bool:
        """Acknowledge ``message`` to the broker (``manual_ack`` clients; QoS 1/2 only).

        Thread-safe. Returns False, sending nothing, when the connection that delivered it is
        gone: a persistent session re-delivers such a message, a clean one dropped it."""
        if not self.manual_ack or message.qos == 0:
            return True
        if message.connection != self.connections or not self._link_up:
            return False
        return self._paho.ack(message.mid, message.qos) == MQTTErrorCode.MQTT_ERR_SUCCESS

    def ack_many(self, messages: list[Message]) -> int:
        """Acknowledge many messages at once (``manual_ack`` clients): one write for all the
        QoS 1 ones. Thread-safe. Returns how many were acknowledged; those of a connection
        that is gone are skipped, as :meth:`ack` does."""
        if not self.manual_ack:
            return len(messages)
        connection, done = self.connections, 0
        mids = []
        for message in messages:
            if message.qos == 0:
                done += 1
            elif message.connection == connection and message.qos == 1:
                mids.append(message.mid)
            elif message.qos == 2 and self.ack(message):
                done += 1
        if mids and self._link_up:
            self._paho.send_pubacks(mids)
            done += len(mids)
        return done

    def publish(self, topic: str, payload: Payload = b"", qos: int = 1, retain: bool = False) -> Delivery:
        """Queue a message; returns a :class:`Delivery` to wait on. An empty retained payload
        clears the retained message of ``topic``."""
        if qos not in (0, 1, 2):
            raise BrokerError(f"invalid QoS {qos}; use 0, 1 or 2")
        if not self._started or self._closed:
            raise BrokerError("the MQTT client is not started; call connect() first")
        try:
            info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:
            raise BrokerError(f"cannot publish to {topic!r}: {exc}") from None
        return Delivery(self, info, qos, topic)

    # -- paho callbacks (network thread): hand everything to the dispatcher -----------------------

    def _on_connect(
        self, _c: paho.Client, _u: Any, _flags: Any, reason: ReasonCode, _p: Optional[Properties]
    ) -> None:
        self._connack = True
        if reason.is_failure:
            log.warning("broker %s refused the connection: %s", self.url, reason)
            if not self._first_done.is_set():
                self._first_result = str(reason)
                self._first_done.set()
            return
        self.connections += 1
        if self._negotiating:
            self._negotiating = False  # this client speaks this version from now on
            log.info("the broker at %s speaks MQTT %s", self.url, self.protocol)
        with self._lock:
            self._link_up = True
            subs = [(f, qos) for f, (qos, _) in self._subscriptions.items()]
        # Renew every subscription (a clean session has none), and report "connected" only once the
        # broker acknowledged them all, so nothing published after that is missed.
        renewing = {}
        for topic_filter, qos in subs:
            rc, mid = self._paho.subscribe(topic_filter, qos)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                renewing[mid] = topic_filter
        self._renewing = renewing  # paho calls _on_subscribe on this same thread, later
        if not renewing:
            self._mark_connected()

    def _mark_connected(self) -> None:
        self._connected.set()
        self._first_done.set()
        log.info("connected to %s as %s", self.url, self.client_id)
        self._queue.put((self._notify, (True, "connected")))

    def _on_disconnect(
        self, _c: paho.Client, _u: Any, _flags: Any, reason: ReasonCode, _p: Optional[Properties]
    ) -> None:
        with self._lock:
            self._link_up = False
        self._renewing = {}
        answered, self._connack = self._connack, False
        if not self._first_done.is_set() and not answered:
            self._dropped_unanswered = True
            if self._negotiating and not self._closed:
                self._fall_back()
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            if not self._closed:
                log.warning("lost the connection to %s (%s); reconnecting", self.url, reason)
            self._queue.put((self._notify, (False, str(reason))))

    def _fall_back(self) -> None:
        """The broker closed the connection before accepting this protocol version: try the
        other one, at once (network thread, between two connections)."""
        self.protocol = "3.1.1" if self._v5 else "5"
        self._v5 = self.protocol == "5"
        self._paho.speak(self.protocol, clean_session=self._session_expiry == 0)
        log.debug(
            "the broker at %s closed the connection unanswered; trying MQTT %s", self.url, self.protocol
        )

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self.unroutable += 1
            log.warning("dropped a message whose topic is not UTF-8")
            return
        msg = Message(
            topic=topic,
            payload=bytes(message.payload),
            qos=message.qos,
            retain=bool(message.retain),
            mid=message.mid,
            connection=self.connections,
        )
        self._queue.put((self._route, (msg,)))

    def _deliver(self, messages: list[Message]) -> None:
        """Messages decoded by the read side (network thread), in arrival order."""
        self._queue.put((self._route_all, (messages,)))

    def _drop_unroutable(self, qos: int, mid: int) -> None:
        """A message whose topic is not UTF-8 (network thread): counted, logged and, when the
        application acknowledges, acknowledged here (nothing would, and it would hold a slot
        of the broker's in-flight window for ever)."""
        self.unroutable += 1
        log.warning("dropped a message whose topic is not UTF-8")
        if qos == 1 and self.manual_ack:
            self._paho.send_pubacks([mid])

    def _on_subscribe(
        self, _c: paho.Client, _u: Any, mid: int, codes: list[ReasonCode], _p: Optional[Properties]
    ) -> None:
        renewed = self._renewing.pop(mid, None)
        if renewed is not None:
            if codes and codes[0].is_failure:
                log.warning("the broker refused the renewed subscription to %s (%s)", renewed, codes[0])
            if not self._renewing:
                self._mark_connected()
            return
        with self._acks:
            self._suback[mid] = list(codes)
            _trim(self._suback)
            self._acks.notify_all()

    def _on_publish(
        self, _c: paho.Client, _u: Any, mid: int, reason: ReasonCode, _p: Optional[Properties]
    ) -> None:
        # Runs before paho marks the message published, so Delivery.wait() sees the failure.
        if reason.is_failure:
            with self._acks:
                self._publish_failures[mid] = str(reason)
                _trim(self._publish_failures)

    def _take_publish_failure(self, mid: int) -> Optional[str]:
        with self._acks:
            return self._publish_failures.pop(mid, None)

    def _wait_ack(
        self, table: dict[int, list[ReasonCode]], mid: int, timeout: float, what: str
    ) -> list[ReasonCode]:
        with self._acks:
            if not self._acks.wait_for(lambda: mid in table, timeout):
                raise BrokerError(f"no {what} from {self.url} within {timeout:g}s; is the broker reachable?")
            return table.pop(mid)

    # -- dispatcher thread ------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            function, args = item
            function(*args)

    def _route_all(self, messages: list[Message]) -> None:
        for message in messages:
            self._route(message)

    def _handlers(self, topic: str) -> list[Handler]:
        with self._lock:
            routes = self._routes
            handlers = routes.get(topic)
            if handlers is None:
                matching = [
                    h for f, (_, hs) in self._subscriptions.items() if topic_matches(f, topic) for h in hs
                ]
                # One call per handler even when several of its filters match (overlapping ones).
                handlers = list(dict.fromkeys(matching))
                if len(routes) >= 65536:
                    routes.clear()
                routes[topic] = handlers
        return handlers

    def _route(self, message: Message) -> None:
        handlers = self._handlers(message.topic)
        if not handlers:
            self.unroutable += 1
            return
        for handler in handlers:
            try:
                handler(message)
            except Exception:
                self.handler_errors += 1
                log.exception("message handler for %s failed", message.topic)

    def _notify(self, connected: bool, reason: str) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(connected, reason)
            except Exception:
                self.handler_errors += 1
                log.exception("connection listener failed")


class _PahoLogger:
    """paho's logger hook (``enable_logger``): paho formats nothing unless the level is on.

    (An ``on_log`` callback would make paho format a debug line, properties and all, for every
    packet: a third of the cost of receiving a message.) paho's errors become warnings and its
    warnings info; the socket it closes itself during close() is noise (debug)."""

    def __init__(self, client: MqttClient) -> None:
        self._client = client

    def log(self, level: int, fmt: str, *args: Any) -> None:
        client = self._client
        closed = client._closed
        if level >= logging.ERROR and not closed:
            target = logging.WARNING
            text = fmt % args if args else fmt
            if "[SSL" in text and not client._first_done.is_set():
                # "failed to receive on socket: [SSL: CODE] what went wrong (_ssl.c:2580)"
                client._tls_failure = text.partition("]")[2].partition("(_ssl")[0].strip() or text
        elif level >= logging.WARNING and not closed:
            target = logging.INFO
        else:
            target = logging.DEBUG
        if _paho_log.isEnabledFor(target):
            _paho_log.log(target, f"%s: {fmt}", self._client.client_id, *args)


def _trim(table: dict[int, Any], limit: int = 4096) -> None:
    """Acks nobody waits for (renewed subscriptions, unawaited deliveries) must not pile up."""
    while len(table) > limit:
        table.pop(next(iter(table)))
