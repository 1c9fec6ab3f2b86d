"""Alerts in the registry: rules' settings, channels, alerts, deliveries still to make, and the
evaluator's lease. What the CLI, the dashboard and the evaluator share."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edgekit.errors import ConfigError
from sqlalchemy import delete, func, or_, select, update

from ..registry import Registry
from ..registry.models import Alert, AlertChannel, AlertDelivery, AlertLease, AlertRule
from ..registry.views import iso
from .channels import ChannelSpec, Secrets, describe
from .rules import RULES, merged_settings, parse_setting

__all__ = ["AlertStore", "ChannelRow", "alert_json"]

log = logging.getLogger(__name__)

PENDING, OPEN, RESOLVED = "pending", "open", "resolved"


def utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class ChannelRow:
    id: int
    name: str
    kind: str
    settings: Mapping[str, Any]
    failing_since: datetime | None

    @property
    def per_hour(self) -> int:
        return int(self.settings.get("per_hour", 20))

    def to_json(self) -> dict[str, Any]:
        """What ``alerts channel list --json`` prints: no secret in it."""
        return {
            "name": self.name,
            "kind": self.kind,
            "target": describe(self.kind, self.settings),
            "per_hour": self.per_hour,
            "failing_since": iso(self.failing_since),
        }


def alert_json(a: Alert) -> dict[str, Any]:
    return {
        "id": a.id,
        "rule": a.rule,
        "state": a.state,
        "fleet": a.fleet,
        "device": a.device,
        "subject": a.subject,
        "summary": a.summary,
        "since": iso(a.since),
        "opened_at": iso(a.opened_at),
        "resolved_at": iso(a.resolved_at),
        "acked_at": iso(a.acked_at),
        "acked_by": a.acked_by,
        "facts": a.facts,
    }


class AlertStore:
    """Alert tables of one :class:`~edgekit.fleet.registry.Registry`; secrets under ``home``."""

    def __init__(self, registry: Registry, home: Path | None) -> None:
        self.registry = registry
        self.home = Path(home) if home is not None else None
        self._secrets = Secrets(self.home) if self.home is not None else None

    @property
    def secrets(self) -> Secrets:
        """The channels' secrets (ConfigError for a store opened without EDGEKIT_HOME)."""
        if self._secrets is None:
            raise ConfigError(
                "the alert channels' secrets are under EDGEKIT_HOME, which this service was not given"
            )
        return self._secrets

    # -- rules ------------------------------------------------------------------------------

    def rule_settings(self) -> dict[str, dict[str, Any]]:
        with self.registry.session() as session:
            stored = {r.name: dict(r.settings) for r in session.execute(select(AlertRule)).scalars()}
        return merged_settings(stored)

    def set_rule(self, rule: str, assignments: list[str], now: datetime) -> dict[str, Any]:
        """Apply ``KEY=VALUE`` settings to ``rule``; its settings after."""
        changes = {}
        for item in assignments:
            key, eq, value = item.partition("=")
            if not eq:
                raise ConfigError(f"{item!r}: write settings as KEY=VALUE, e.g. offline_after=10m")
            name, typed = parse_setting(rule, key.strip(), value)
            changes[name] = typed
        with self.registry.session() as session, session.begin():
            row = session.get(AlertRule, rule)
            if row is None:
                session.add(AlertRule(name=rule, settings=changes, updated_at=now))
            else:
                row.settings = {**row.settings, **changes}
                row.updated_at = now
        return self.rule_settings()[rule]

    # -- channels ---------------------------------------------------------------------------

    def channels(self) -> list[ChannelRow]:
        with self.registry.session() as session:
            rows = session.execute(select(AlertChannel).order_by(AlertChannel.id)).scalars()
            return [ChannelRow(c.id, c.name, c.kind, dict(c.settings), c.failing_since) for c in rows]

    def add_channel(self, spec: ChannelSpec, now: datetime) -> ChannelRow:
        if any(c.name == spec.name for c in self.channels()):
            raise ConfigError(
                f"there is already a channel named {spec.name}; pick another --name or remove it first"
            )
        self.secrets.put(spec.name, spec.secrets)  # first: a channel never exists without them
        with self.registry.session() as session, session.begin():
            row = AlertChannel(name=spec.name, kind=spec.kind, settings=dict(spec.settings), created_at=now)
            session.add(row)
            session.flush()
            return ChannelRow(row.id, row.name, row.kind, dict(row.settings), None)

    def remove_channel(self, name: str) -> None:
        with self.registry.session() as session, session.begin():
            row = session.execute(select(AlertChannel).where(AlertChannel.name == name)).scalar_one_or_none()
            if row is None:
                known = ", ".join(c.name for c in self.channels()) or "none yet"
                raise ConfigError(f"no alert channel named {name!r} (channels: {known})")
            session.execute(delete(AlertDelivery).where(AlertDelivery.channel_id == row.id))
            session.delete(row)
        self.secrets.remove(name)

    # -- alerts -----------------------------------------------------------------------------

    def alerts(self, open_only: bool = False, limit: int = 200) -> list[Alert]:
        with self.registry.session() as session:
            query = select(Alert).where(Alert.state != PENDING)
            if open_only:
                query = query.where(Alert.state == OPEN)
            query = query.order_by(Alert.id.desc()).limit(limit)
            return list(session.execute(query).scalars())

    def ack(self, alert_id: int, who: str, now: datetime) -> Alert:
        """Acknowledge an alert (``edgekit alerts ack`` and the dashboard's button); the
        attempt goes to the audit log either way."""
        from ..control import ControlPlane

        audit = ControlPlane(self.registry).audit
        try:
            with self.registry.session() as session, session.begin():
                row = session.get(Alert, alert_id)
                if row is None or row.state == PENDING:
                    raise ConfigError(f"no alert {alert_id}; `edgekit alerts list` shows their ids")
                if row.acked_at is None:
                    row.acked_at, row.acked_by = now, who[:64]
        except ConfigError as exc:
            audit("alert-ack", target=f"alert {alert_id}", result="failed", detail=str(exc), actor=who)
            raise
        audit("alert-ack", fleet=row.fleet, target=f"alert {alert_id}: {row.summary}", actor=who)
        return row

    # -- deliveries -------------------------------------------------------------------------

    def deliveries(self, state: str | None = None) -> list[AlertDelivery]:
        with self.registry.session() as session:
            query = select(AlertDelivery).order_by(AlertDelivery.id)
            if state is not None:
                query = query.where(AlertDelivery.state == state)
            return list(session.execute(query).scalars())

    def sent_count(self, channel_id: int, since: datetime) -> int:
        with self.registry.session() as session:
            query = select(func.count()).where(
                AlertDelivery.channel_id == channel_id,
                AlertDelivery.state == "sent",
                AlertDelivery.kind != "test",
                AlertDelivery.sent_at >= since,
            )
            return int(session.execute(query).scalar_one())

    # -- the lease --------------------------------------------------------------------------

    def take_lease(self, holder: str, now: datetime, ttl: float, *, force: bool = False) -> bool:
        """Hold (or keep) the evaluator's lease until ``now + ttl``; False if another holds it.
        ``force``: take it whoever holds it (the caller holds the evaluator's leader lock, so
        any other holder is dead)."""
        free = or_(
            AlertLease.holder.is_(None),
            AlertLease.holder == holder,
            AlertLease.expires_at < now,
        )
        with self.registry.session() as session, session.begin():
            result = session.execute(
                update(AlertLease)
                .where(AlertLease.name == "evaluator", *(() if force else (free,)))
                .values(holder=holder, expires_at=now + timedelta(seconds=ttl))
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def drop_lease(self, holder: str) -> None:
        with self.registry.session() as session, session.begin():
            session.execute(
                update(AlertLease)
                .where(AlertLease.name == "evaluator", AlertLease.holder == holder)
                .values(holder=None, expires_at=None)
            )


def known_rule(name: str) -> str:
    if name not in RULES:
        raise ConfigError(f"no alert rule {name!r}; the rules are: {', '.join(RULES)}")
    return name
