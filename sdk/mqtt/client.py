"""The client itself: :class:`MqttClient` (see :mod:`edgekit.mqtt` for what it does and why)."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Optional, Union

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ..errors import BrokerError
from ._paho import PROTOCOL_VERSIONS, FastReadClient, PahoClient
from .address import PROTOCOLS, TlsConfig, parse_broker_url
from .framing import MalformedPacketError
from .matching import topic_matches
from .message import Message, Will

__all__ = ["ConnectionListener", "Delivery", "Handler", "MqttClient", "Payload"]

log = logging.getLogger("edgekit.mqtt")
_paho_log = logging.getLogger("edgekit.mqtt.paho")

Payload = Union[bytes, bytearray, str, None]
_UNPIN = "leave the protocol out of the broker URL and edgekit will use the version the broker speaks"


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
    ``fast_read``: edgekit's own read side (for clients that receive thousands of messages a
    second, such as the fleet's ingest) instead of paho's (see :mod:`edgekit.mqtt._paho`).
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
        fast_read: bool = False,
    ) -> None:
        self.address = parse_broker_url(url)
        #: No version given: fall back between 5 and 3.1.1 until the broker accepts one.
        self._negotiating = protocol is None and self.address.protocol is None
        protocol = protocol or self.address.protocol or "5"
        if protocol not in PROTOCOLS:
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
        self.fast_read = fast_read
        self._paho = (FastReadClient if fast_read else PahoClient)(
            self,
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if self._v5 else session_expiry == 0,
            protocol=PROTOCOL_VERSIONS[protocol],
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
        #: A caller waits in connect(timeout) and reports a failed first connection itself, in one
        #: line (BrokerError): until then paho's complaints about it are debug, not warnings.
        self._awaited = False
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
        #: Reads that failed (a malformed packet, one over ``max_packet_size``, an exception
        #: anywhere in the read side or the network loop): each dropped the connection, was
        #: logged, and the client connected again.
        self.read_errors = 0

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
        self._awaited = timeout is not None
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
        done = self._first_done.wait(timeout)
        self._awaited = False
        if not done:
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
            # connect()'s caller says it in its error when it waits for this first answer.
            level = logging.DEBUG if self._awaited and not self._first_done.is_set() else logging.WARNING
            log.log(level, "broker %s refused the connection: %s", self.url, reason)
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
            self._drop_unroutable(message.qos, message.mid)
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

    def _read_failed(self, exc: Exception) -> None:
        """The network thread could not go on reading (it drops the connection and reconnects)."""
        self.read_errors += 1
        expected = isinstance(exc, MalformedPacketError)  # the broker's bytes, not edgekit's code
        log.error(
            "dropped the connection to %s: reading from it failed (%s: %s); reconnecting",
            self.url,
            type(exc).__name__,
            exc,
            exc_info=not expected,
        )

    def _drop_unroutable(self, qos: int, mid: int) -> None:
        """A message whose topic is not UTF-8 (network thread, either read side): counted, logged and, when the
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
    warnings info; the socket it closes itself during close() is noise (debug), and so is what it
    says while connect() waits for the first connection (connect's BrokerError says it once)."""

    def __init__(self, client: MqttClient) -> None:
        self._client = client

    def log(self, level: int, fmt: str, *args: Any) -> None:
        client = self._client
        # Closed, or the first connection still awaited by connect() (whose BrokerError says why
        # in one line): paho's complaints are detail, for --log-level debug.
        closed = client._closed or (client._awaited and not client._first_done.is_set())
        if level >= logging.ERROR and not client._closed and not client._first_done.is_set():
            text = fmt % args if args else fmt
            if "[SSL" in text:
                # "failed to receive on socket: [SSL: CODE] what went wrong (_ssl.c:2580)"
                client._tls_failure = text.partition("]")[2].partition("(_ssl")[0].strip() or text
        if level >= logging.ERROR and not closed:
            target = logging.WARNING
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
