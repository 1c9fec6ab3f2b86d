"""The dispatcher: it sends the messages the evaluator queued, with retries, an hourly limit
per channel and a digest beyond it.

Deliveries are rows of ``alert_deliveries`` (state ``pending``), so a message queued before a
restart of the service is sent after it. Each round (:meth:`Dispatcher.run_once`) takes the
deliveries that are due and sends them, one thread per channel, outside any database
transaction (a mail server that hangs holds no lock and delays no other channel beyond the
round):

- **sent**: done; the channel counts as working again;
- **failed attempt**: tried again after 10 s, 20 s, 40 s, ... (at most an hour apart), up to
  ``max_attempts`` times, then given up (``failed``); the channel is marked failing from its
  first failure until a delivery through it succeeds, and the ``channel`` rule alerts on a
  channel that keeps failing;
- **over the limit**: a channel sends at most ``per_hour`` messages in any hour; beyond that a
  message is ``held``, and once the hour has room again the held messages go out as ONE
  digest (their subjects, with the count).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

from edgekit.errors import ConfigError, DeliveryError
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from ..registry import Registry
from ..registry.models import AlertChannel, AlertDelivery
from .channels import DEFAULT_TIMEOUT, send
from .messages import digest_message, test_message
from .store import AlertStore, ChannelRow, utc

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

HOUR = timedelta(hours=1)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Dispatcher:
    """Sends due deliveries of one registry through their channels."""

    def __init__(
        self,
        registry: Registry,
        home: Path,
        *,
        link_base: Optional[str] = None,
        retry_base: float = 10.0,
        retry_max: float = 3600.0,
        max_attempts: int = 12,
        timeout: float = DEFAULT_TIMEOUT,
        poll: float = 1.0,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.store = AlertStore(registry, home)
        self.registry = registry
        self.link_base = link_base
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.poll = poll
        self.clock = clock
        #: Counters: messages sent, attempts failed, messages given up, rounds that failed.
        self.sent = 0
        self.failures = 0
        self.given_up = 0
        self.errors = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # -- the thread -------------------------------------------------------------------------

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except (SQLAlchemyError, OSError, ConfigError) as exc:
                self.errors += 1
                log.error("alerts: a delivery round failed (%s); trying again", exc)
            except Exception:  # counted and logged: deliveries must outlive any one bad message
                self.errors += 1
                log.exception("alerts: a delivery round failed; trying again")
            self._wake.wait(self.poll)
            self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # -- one round --------------------------------------------------------------------------

    def run_once(self, now: Optional[datetime] = None) -> int:
        """Send what is due at ``now``; how many messages went out."""
        now = utc(now or self.clock())
        channels = {c.id: c for c in self.store.channels()}
        self._digest(channels, now)
        with self.registry.session() as session:
            due = list(
                session.execute(
                    select(AlertDelivery)
                    .where(AlertDelivery.state == "pending", AlertDelivery.next_attempt_at <= now)
                    .order_by(AlertDelivery.id)
                    .limit(500)
                ).scalars()
            )
        by_channel: dict[int, list[AlertDelivery]] = {}
        for delivery in due:
            by_channel.setdefault(delivery.channel_id, []).append(delivery)
        jobs = [(channels[cid], rows) for cid, rows in by_channel.items() if cid in channels]
        if not jobs:
            return 0
        secrets = self.store.secrets.load()
        if len(jobs) == 1:
            return self._send_channel(jobs[0][0], jobs[0][1], secrets.get(jobs[0][0].name, {}), now)
        with ThreadPoolExecutor(
            max_workers=min(8, len(jobs)), thread_name_prefix="edgekit-alerts-send"
        ) as pool:
            futures = [
                pool.submit(self._send_channel, c, rows, secrets.get(c.name, {}), now) for c, rows in jobs
            ]
            return sum(f.result() for f in futures)

    def _send_channel(
        self, channel: ChannelRow, rows: list[AlertDelivery], secrets: dict[str, str], now: datetime
    ) -> int:
        room = channel.per_hour - self.store.sent_count(channel.id, now - HOUR)
        sent = 0
        over = [d.id for d in rows if d.kind in ("opened", "resolved")][max(0, room) :]
        if over:  # beyond the hourly limit: held for the digest
            with self.registry.session() as session, session.begin():
                session.execute(update(AlertDelivery).where(AlertDelivery.id.in_(over)).values(state="held"))
            held = set(over)
            rows = [d for d in rows if d.id not in held]
        for delivery in rows:
            try:
                send(channel.kind, channel.settings, secrets, delivery.message, self.timeout)
            except (ValueError, TypeError, KeyError) as exc:
                # A message that cannot even be built: a failed attempt of its own (given up in
                # the end); the channel is fine, the others go on.
                self._failed(
                    channel, delivery, f"the message cannot be sent: {exc!r}", now, channel_down=False
                )
                continue
            except DeliveryError as exc:
                self._failed(channel, delivery, str(exc), now)
                # The channel is down: keep the order, try the rest at the next round.
                for later in rows[rows.index(delivery) + 1 :]:
                    self._update(later.id, next_attempt_at=utc(later.next_attempt_at) + timedelta(seconds=1))
                break
            sent += 1
            self._update(
                delivery.id, state="sent", sent_at=now, attempts=delivery.attempts + 1, last_error=None
            )
            self._channel_state(channel.id, None)
        with self._lock:
            self.sent += sent
        return sent

    def _failed(
        self,
        channel: ChannelRow,
        delivery: AlertDelivery,
        error: str,
        now: datetime,
        channel_down: bool = True,
    ) -> None:
        attempts = delivery.attempts + 1
        with self._lock:
            self.failures += 1
        if attempts >= self.max_attempts:
            with self._lock:
                self.given_up += 1
            log.error(
                "alerts: gave up sending %s message %d through channel %s after %d attempts: %s",
                delivery.kind,
                delivery.id,
                channel.name,
                attempts,
                error,
            )
            self._update(delivery.id, state="failed", attempts=attempts, last_error=error)
        else:
            delay = min(self.retry_base * 2 ** (attempts - 1), self.retry_max)
            log.warning(
                "alerts: channel %s: %s; trying again in %.0f s (attempt %d of %d)",
                channel.name,
                error,
                delay,
                attempts,
                self.max_attempts,
            )
            self._update(
                delivery.id,
                attempts=attempts,
                last_error=error,
                next_attempt_at=now + timedelta(seconds=delay),
            )
        if channel_down and channel.failing_since is None:
            self._channel_state(channel.id, now)

    def _update(self, delivery_id: int, **values: Any) -> None:
        with self.registry.session() as session, session.begin():
            row = session.get(AlertDelivery, delivery_id)
            if row is not None:
                for key, value in values.items():
                    setattr(row, key, value)

    def _channel_state(self, channel_id: int, failing_since: Optional[datetime]) -> None:
        with self.registry.session() as session, session.begin():
            row = session.get(AlertChannel, channel_id)
            if row is not None and (row.failing_since is None) != (failing_since is None):
                row.failing_since = failing_since

    def _digest(self, channels: dict[int, ChannelRow], now: datetime) -> None:
        """Held messages of a channel whose hour has room again become one digest."""
        with self.registry.session() as session, session.begin():
            held = list(
                session.execute(
                    select(AlertDelivery).where(AlertDelivery.state == "held").order_by(AlertDelivery.id)
                ).scalars()
            )
            by_channel: dict[int, list[AlertDelivery]] = {}
            for row in held:
                by_channel.setdefault(row.channel_id, []).append(row)
            for channel_id, rows in by_channel.items():
                channel = channels.get(channel_id)
                if channel is None or self.store.sent_count(channel_id, now - HOUR) >= channel.per_hour:
                    continue
                message = digest_message([r.message for r in rows], now, channel.per_hour)
                session.add(
                    AlertDelivery(
                        channel_id=channel_id,
                        alert_id=None,
                        kind="digest",
                        state="pending",
                        created_at=now,
                        next_attempt_at=now,
                        attempts=0,
                        message=message,
                    )
                )
                for row in rows:
                    row.state = "digested"

    # -- edgekit alerts test ----------------------------------------------------------------

    def test_all(self, now: Optional[datetime] = None) -> list[tuple[str, Optional[str]]]:
        """Send a test message through every channel, now; (channel, error or None) each."""
        now = utc(now or self.clock())
        secrets = self.store.secrets.load()
        results: list[tuple[str, Optional[str]]] = []
        for channel in self.store.channels():
            try:
                send(
                    channel.kind,
                    channel.settings,
                    secrets.get(channel.name, {}),
                    test_message(channel.name, now, self.link_base),
                    self.timeout,
                )
            except DeliveryError as exc:
                results.append((channel.name, str(exc)))
                continue
            results.append((channel.name, None))
        return results
