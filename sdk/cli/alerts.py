"""``edgekit alerts``: where alerts go (channels), when they fire (rules), and what is open.

The fleet service (``edgekit fleet up`` / ``fleet serve``) evaluates the rules and sends the
alerts; these commands change its settings in the registry (and the channels' secrets under
$EDGEKIT_HOME) and read what it found. See docs/alerts.md.
"""

from __future__ import annotations

import getpass
import os
import sys
from datetime import datetime, timezone
from typing import Any, Optional
from urllib.parse import urlsplit

import typer
from rich.markup import escape
from rich.table import Table

from ..config import WorkstationConfig
from ..errors import ConfigError, DeliveryError
from ._app import console, new_app, print_json

app = new_app("Alerts by mail and webhook: channels, rules, and the alerts the fleet service raised.")
channel_app = new_app("Where alerts go: email (SMTP) and webhooks (JSON, Slack, Mattermost).")
rule_app = new_app("When alerts fire: each rule's settings, with defaults a small business can live with.")
app.add_typer(channel_app, name="channel")
app.add_typer(rule_app, name="rule")

REGISTRY_HELP = "Registry URL (sqlite:///PATH or postgresql://...); else $EDGEKIT_REGISTRY, else config."
PASSWORD_ENV = "EDGEKIT_SMTP_PASSWORD"


def _store(registry: Optional[str]) -> Any:
    from edgekit.fleet.alerts import AlertStore
    from edgekit.fleet.registry import Registry

    ws = WorkstationConfig.load(registry=registry)
    return AlertStore(Registry(ws.registry), ws.home)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _free_name(store: Any, kind: str) -> str:
    taken = {c.name for c in store.channels()}
    return next(f"{kind}-{i}" for i in range(1, len(taken) + 2) if f"{kind}-{i}" not in taken)


@channel_app.command("add")
def channel_add(
    email: Optional[list[str]] = typer.Option(
        None, "--email", help="Send alerts to this address (repeatable: several recipients)."
    ),
    smtp: Optional[str] = typer.Option(
        None,
        "--smtp",
        help="Mail server: smtp://[user@]host[:port] (STARTTLS), smtps://... (TLS); ?tls=none for a local "
        "relay, ?ca=PATH for a private CA. The password: $EDGEKIT_SMTP_PASSWORD, else asked.",
    ),
    sender: Optional[str] = typer.Option(None, "--from", help="The sender address of the mails."),
    webhook: Optional[str] = typer.Option(
        None, "--webhook", help="POST alerts to this http(s) URL (a secret: it is stored, never printed)."
    ),
    form: Optional[str] = typer.Option(
        None,
        "--format",
        help='Webhook body: json (the edgekit.alert document) or text ({"text": ...}, Slack and Mattermost); '
        "default text for hooks.slack.com, else json.",
    ),
    name: Optional[str] = typer.Option(
        None, "--name", help="The channel's name (default email-N or webhook-N)."
    ),
    per_hour: int = typer.Option(
        20, "--per-hour", min=1, max=10000, help="At most this many messages an hour; beyond, one digest."
    ),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
) -> None:
    """Add a channel: --email ADDR --smtp URL, or --webhook URL."""
    from edgekit.fleet.alerts import describe, email_channel, webhook_channel

    if bool(email or smtp) == bool(webhook):
        raise ConfigError("give either --email ADDR --smtp smtp://user@host:port, or --webhook URL")
    store = _store(registry)
    try:
        if webhook:
            spec = webhook_channel(name or _free_name(store, "webhook"), webhook, form, per_hour)
        else:
            if not smtp:
                raise ConfigError("an email channel needs the mail server: --smtp smtp://user@host:587")
            if not email:
                raise ConfigError("an email channel needs at least one address: --email owner@example.com")
            password = os.environ.get(PASSWORD_ENV)
            parts = urlsplit(smtp)
            if parts.username and not parts.password and not password and sys.stdin.isatty():
                password = getpass.getpass("SMTP password: ")
            spec = email_channel(name or _free_name(store, "email"), email, smtp, sender, password, per_hour)
        row = store.add_channel(spec, _now())
    finally:
        store.registry.close()
    console.print(f"Channel {row.name} added: {escape(describe(row.kind, row.settings))}.")
    console.print("Run `edgekit alerts test` to check that it works.")


@channel_app.command("list")
def channel_list(
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the channels as JSON (no secrets)."),
) -> None:
    """The channels alerts go to (secrets are never shown)."""
    store = _store(registry)
    channels = store.channels()
    store.registry.close()
    if json_out:
        print_json([c.to_json() for c in channels])
        return
    if not channels:
        console.print(
            "No alert channels yet: `edgekit alerts channel add --email ADDR --smtp URL` or `--webhook URL`."
        )
        return
    table = Table("name", "kind", "goes to", "per hour", "state")
    for c in channels:
        doc = c.to_json()
        state = f"[bold red]failing since {doc['failing_since']}[/]" if c.failing_since else "[green]ok[/]"
        table.add_row(c.name, c.kind, escape(doc["target"]), str(c.per_hour), state)
    console.print(table)


@channel_app.command("remove")
def channel_remove(
    name: str = typer.Argument(..., help="The channel's name (see `edgekit alerts channel list`)."),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
) -> None:
    """Remove a channel, its secrets and its messages not yet sent."""
    store = _store(registry)
    try:
        store.remove_channel(name)
    finally:
        store.registry.close()
    console.print(f"Channel {name} removed.")


@app.command("test")
def test(
    timeout: float = typer.Option(
        15.0, "--timeout", min=0.1, max=600, help="Seconds a channel may take to take the message."
    ),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print each channel's result as JSON."),
) -> None:
    """Send a test alert through every channel now, and say which worked."""
    from edgekit.fleet.alerts import Dispatcher

    store = _store(registry)
    try:
        results = Dispatcher(store.registry, store.home, timeout=timeout).test_all()
    finally:
        store.registry.close()
    if json_out:
        print_json([{"channel": name, "ok": error is None, "error": error} for name, error in results])
    elif not results:
        console.print(
            "No alert channels yet: `edgekit alerts channel add --email ADDR --smtp URL` or `--webhook URL`."
        )
    else:
        for name, error in results:
            console.print(
                f"{name}: " + ("[green]sent[/]" if error is None else f"[bold red]failed[/]: {escape(error)}")
            )
    failed = [name for name, error in results if error is not None]
    if failed:
        raise DeliveryError(f"the test alert did not go through {', '.join(failed)}; see above")


@rule_app.command("list")
def rule_list(
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print every rule's settings as JSON."),
) -> None:
    """Every rule, what it watches and its settings."""
    from edgekit.fleet.alerts import RULES

    store = _store(registry)
    settings = store.rule_settings()
    store.registry.close()
    if json_out:
        print_json(
            {name: {"description": RULES[name].description, "settings": s} for name, s in settings.items()}
        )
        return
    table = Table("rule", "watches", "settings")
    for name, values in settings.items():
        shown = ", ".join(f"{k}={_show(v)}" for k, v in values.items())
        table.add_row(name, escape(RULES[name].description), escape(shown))
    console.print(table)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@rule_app.command("set")
def rule_set(
    name: str = typer.Argument(..., help="The rule (see `edgekit alerts rule list`)."),
    settings: list[str] = typer.Argument(
        ..., help="KEY=VALUE settings, e.g. offline_after=10m (s, m, h, d)."
    ),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
) -> None:
    """Change a rule's settings; the fleet service picks them up at its next round."""
    store = _store(registry)
    try:
        values = store.set_rule(name, settings, _now())
    finally:
        store.registry.close()
    console.print(escape(f"{name}: " + ", ".join(f"{k}={_show(v)}" for k, v in values.items())))


@app.command("list")
def list_alerts(
    open_only: bool = typer.Option(False, "--open", help="Only alerts still open."),
    limit: int = typer.Option(100, "--limit", min=1, max=10000, help="How many, newest first."),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the alerts as JSON."),
) -> None:
    """The alerts the fleet service raised, newest first."""
    from edgekit.fleet.alerts import alert_json

    store = _store(registry)
    rows = [alert_json(a) for a in store.alerts(open_only=open_only, limit=limit)]
    store.registry.close()
    if json_out:
        print_json(rows)
        return
    if not rows:
        console.print("No open alerts." if open_only else "No alerts yet.")
        return
    table = Table("id", "state", "since", "what", "acknowledged")
    for a in rows:
        state = "[bold red]open[/]" if a["state"] == "open" else f"resolved {a['resolved_at']}"
        acked = f"{a['acked_by']} {a['acked_at']}" if a["acked_at"] else "-"
        table.add_row(str(a["id"]), state, a["since"], escape(a["summary"]), escape(acked))
    console.print(table)


@app.command("ack")
def ack(
    alert_id: int = typer.Argument(..., help="The alert's id (see `edgekit alerts list`)."),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
) -> None:
    """Acknowledge an alert: you know about it (it still resolves, and says so, when it clears)."""
    from edgekit.fleet.control import operator_name

    store = _store(registry)
    try:
        row = store.ack(alert_id, operator_name(), _now())
    finally:
        store.registry.close()
    console.print(f"Alert {row.id} acknowledged: {escape(row.summary)}")
