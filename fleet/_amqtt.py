"""The amqtt broker that ``fleet up`` embeds: amqtt 0.11 with two faults fixed, and retained
messages kept in a SQLite file.

:class:`Broker` is amqtt's broker, sending retained messages only to the clients that
subscribed to them, and answering an MQTT 5 CONNECT with "unacceptable protocol version" (so
clients fall back to 3.1.1 at once) instead of hanging. :class:`RetainedStore` is an amqtt
broker plugin that keeps retained messages in a SQLite file (the embedded broker's
``data_dir``), so signed desired states, bundle chunks and device states survive a restart.

Loaded only inside the embedded broker's own process (it imports amqtt). amqtt's own
``SessionDBPlugin`` (contrib) also stores sessions, needs aiosqlite and async SQLAlchemy, and
decodes session-queued payloads as text; edgekit needs only the retained messages, binary, with
the standard library's sqlite3.

Each change is one small transaction (WAL, ``synchronous=NORMAL``): a kill -9 of the broker
loses at most the change being written; a power loss at most the last few.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker as _AmqttBroker
from amqtt.broker import BrokerContext, RetainedApplicationMessage
from amqtt.errors import MQTTError, NoDataError
from amqtt.plugins.base import BasePlugin
from amqtt.session import Session

log = logging.getLogger(__name__)

#: A CONNECT's variable header starts with the protocol name "MQTT", then the protocol level.
_MQTT_NAME = b"\x00\x04MQTT"
_LEVEL_3_1_1 = 4
#: CONNACK: session present 0, return code 1 ("unacceptable protocol version", MQTT-3.2.2-4).
_REFUSE_VERSION = b"\x20\x02\x00\x01"


class _Replay(ReaderAdapter):  # type: ignore[misc]  # amqtt ships no types
    """A reader that first returns ``head`` (bytes already read from the stream), then the rest."""

    def __init__(self, head: bytes, reader: ReaderAdapter) -> None:
        self._head = head
        self._reader = reader

    async def read(self, n: int = -1) -> bytes:
        if not self._head:
            return bytes(await self._reader.read(n))
        if n == -1:
            data, self._head = self._head + bytes(await self._reader.read(-1)), b""
            return data
        data, self._head = self._head[:n], self._head[n:]
        if len(data) < n:
            data += bytes(await self._reader.read(n - len(data)))
        return data

    def feed_eof(self) -> None:
        self._reader.feed_eof()


class Broker(_AmqttBroker):  # type: ignore[misc]  # amqtt ships no types
    """amqtt's broker, without its leak of retained messages across topics.

    On every new connection amqtt 0.11.4 (``Broker._client_connected``) means to re-send the
    retained messages of a reconnecting session's own subscriptions, but it loops over the
    filters of *every* session (``for topic in self._subscriptions``) and sends the matches to
    the new client. So once ``fleet up``'s ingest subscribed to ``edgekit/devices/+/state``, any
    client that connected got every retained device state, whatever it subscribed to (and a
    ``.../#`` subscriber got each one twice). Here a filter's retained messages go to a session
    only if that session holds the filter, which leaves the subscribe path as it was (the
    session has just been added) and restricts the connect path to the session's own filters.
    """

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> Any:
        """amqtt 0.11.4 parses an MQTT 5 CONNECT as a 3.1.1 one before it looks at the protocol
        level: the properties read as a client id length of a thousand bytes or more, and it
        waits for them until the client gives up. Here the first bytes of the CONNECT are read
        first: a level other than 3.1.1's is answered "unacceptable protocol version" (what the
        3.1.1 standard asks) and the connection closed; anything else goes to amqtt as it came."""
        try:
            head = await reader.read(1)
            length, shift = 0, 0
            for _ in range(4):  # the remaining length: a variable byte integer
                byte = (await reader.read(1))[0]
                head += bytes([byte])
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            start = await reader.read(min(length, len(_MQTT_NAME) + 1))
        except (asyncio.IncompleteReadError, IndexError, OSError) as exc:
            raise NoDataError(f"{remote_address}:{remote_port} closed before its CONNECT") from exc
        if start[: len(_MQTT_NAME)] == _MQTT_NAME and start[len(_MQTT_NAME) :] != bytes([_LEVEL_3_1_1]):
            writer.write(_REFUSE_VERSION)
            await writer.drain()
            await writer.close()
            raise MQTTError(
                f"{remote_address}:{remote_port} asked for MQTT protocol level "
                f"{start[len(_MQTT_NAME) :].hex()}; refused (this broker speaks 3.1.1 only)"
            )
        return await super()._initialize_client_session(
            _Replay(head + start, reader), writer, remote_address, remote_port
        )

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        holders = self._subscriptions.get(subscription[0], ())
        if any(holder is session for holder, _ in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)


_SCHEMA = "CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER)"


class RetainedStore(BasePlugin[BrokerContext]):  # type: ignore[misc]  # amqtt ships no types
    """Mirror every retained message (and every clearing) into ``Config.path``; load them back
    before the broker accepts its first connection."""

    @dataclass
    class Config:
        path: str = "retained.sqlite"

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)
        self._db = sqlite3.connect(self.config.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._loaded = {
            topic: RetainedApplicationMessage(None, topic, bytes(payload), qos)
            for topic, payload, qos in self._db.execute("SELECT topic, payload, qos FROM retained")
        }

    async def on_broker_pre_start(self) -> None:
        # Broker.start() empties the retained messages, then fires this event and opens its
        # listeners. amqtt 0.12 awaits the event; 0.11 queues it first, and it never awaits,
        # so either way it is done before the first connection is served.
        self.context.retained_messages.update(self._loaded)
        log.info("restored %d retained message(s) from %s", len(self._loaded), self.config.path)
        self._loaded = {}

    async def on_broker_retained_message(
        self, *, client_id: str | None, retained_message: RetainedApplicationMessage, **_: Any
    ) -> None:
        if client_id is not None:
            return  # queued for one offline persistent session: not a topic's retained message
        topic, data = retained_message.topic, retained_message.data
        if data:
            self._db.execute(
                "INSERT INTO retained (topic, payload, qos) VALUES (?, ?, ?) "
                "ON CONFLICT(topic) DO UPDATE SET payload = excluded.payload, qos = excluded.qos",
                (topic, bytes(data), retained_message.qos),
            )
        else:
            self._db.execute("DELETE FROM retained WHERE topic = ?", (topic,))

    async def close(self) -> None:
        self._db.close()
