"""Retained messages in the embedded broker (amqtt 0.11): kept in a SQLite file, and sent only
to the clients that subscribed to them.

:class:`RetainedStore` is an amqtt broker plugin that keeps retained messages in a SQLite file
(the embedded broker's ``data_dir``), so signed desired states, bundle chunks and device states
survive a restart. :class:`Broker` is amqtt's broker with one bug fixed (below).

Loaded only inside the embedded broker's own process (it imports amqtt). amqtt's own
``SessionDBPlugin`` (contrib) also stores sessions, needs aiosqlite and async SQLAlchemy, and
decodes session-queued payloads as text; edgekit needs only the retained messages, binary, with
the standard library's sqlite3.

Each change is one small transaction (WAL, ``synchronous=NORMAL``): a kill -9 of the broker
loses at most the change being written; a power loss at most the last few.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker as _AmqttBroker
from amqtt.broker import BrokerContext, RetainedApplicationMessage
from amqtt.plugins.base import BasePlugin
from amqtt.session import Session

log = logging.getLogger(__name__)


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
