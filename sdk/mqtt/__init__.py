"""The one MQTT client of edgekit: a small wrapper over paho-mqtt 2.x.

The package, by concept: :mod:`~edgekit.mqtt.address` (broker URLs, TLS settings),
:mod:`~edgekit.mqtt.matching` (topic filters), :mod:`~edgekit.mqtt.framing` (MQTT packets as
bytes: pure), :mod:`~edgekit.mqtt.message` (what handlers get), :mod:`~edgekit.mqtt.client`
(:class:`MqttClient`, its dispatcher), and ``_paho`` (the paho subclasses: the only place that
knows paho's internals).

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
- **A read side of edgekit's own, where it pays** (``fast_read=True``; the fleet's ingest).
  paho keeps the connection, the session, keepalive, TLS and every outgoing flow; incoming
  bytes are read in large blocks and split into packets by
  :class:`~edgekit.mqtt.framing.PacketReader`, and QoS 0/1 PUBLISH packets are decoded here
  (one copy of the payload, no per-packet ``Properties`` object, one PUBACK write for many
  messages) and handed to the dispatcher in batches; every other packet goes to paho's own
  handlers, in order. paho reads each packet with three or more ``recv`` calls and copies a
  payload several times; a telemetry-sized message costs several times more CPU there
  (BENCHMARKS.md, "Telemetry ingest": ingest with and without it, same run). It works through
  paho's private members (:mod:`edgekit.mqtt._paho` lists them; the tests check them against
  the installed paho), so devices, which receive a few messages a minute and a bundle now and
  then, use paho's own read side.
- **Acknowledging later.** With ``manual_ack=True`` a QoS 1 message is acknowledged to the
  broker only when the application calls :meth:`MqttClient.ack` (e.g. once it is committed to
  a database); until then the broker counts it against the client's ``receive_maximum``
  (MQTT 5) and stops sending more, which is the backpressure. An ack only goes out on the
  connection that delivered the message: after a reconnect, a persistent session
  (``session_expiry`` > 0) gets the unacknowledged messages again, a clean one never does.

Errors are :class:`~edgekit.errors.BrokerError`.
"""

from __future__ import annotations

from .address import DEFAULT_PORT, DEFAULT_TLS_PORT, BrokerAddress, TlsConfig, parse_broker_url
from .client import ConnectionListener, Delivery, Handler, MqttClient, Payload
from .framing import MalformedPacketError
from .matching import topic_matches
from .message import Message, Will

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_TLS_PORT",
    "BrokerAddress",
    "ConnectionListener",
    "Delivery",
    "Handler",
    "MalformedPacketError",
    "Message",
    "MqttClient",
    "Payload",
    "TlsConfig",
    "Will",
    "parse_broker_url",
    "topic_matches",
]
