"""Alerts: rules the fleet service evaluates, and the channels (email, webhooks) that tell the
owner. See docs/alerts.md."""

from __future__ import annotations

from .channels import ChannelSpec, Secrets, describe, email_channel, webhook_channel
from .delivery import Dispatcher
from .evaluator import Alerting, Evaluator, TickResult
from .rules import RULES, drift_flagged
from .store import AlertStore, ChannelRow, alert_json

__all__ = [
    "RULES",
    "AlertStore",
    "Alerting",
    "ChannelRow",
    "ChannelSpec",
    "Dispatcher",
    "Evaluator",
    "Secrets",
    "TickResult",
    "alert_json",
    "describe",
    "drift_flagged",
    "email_channel",
    "webhook_channel",
]
