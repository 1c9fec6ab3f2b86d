"""``edgekit fleet``: what the fleet is doing, from the registry."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

import typer
from rich.table import Table

from ..config import WorkstationConfig
from ._app import console, new_app, print_json

app = new_app("Watch the fleet: device status, versions, latency, drift and events.")

REGISTRY_HELP = "Registry URL (sqlite:///PATH or postgresql://...); else $EDGEKIT_REGISTRY, else config."


def _registry(url: Optional[str]) -> Any:
    from edgekit.fleet.registry import Registry  # the fleet extra is needed only here

    return Registry(WorkstationConfig.load(registry=url).registry)


def _ago(value: Optional[datetime]) -> str:
    if value is None:
        return "never"
    value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    seconds = max(0.0, (datetime.now(timezone.utc) - value).total_seconds())
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


@app.command("status")
def status(
    fleet: Optional[str] = typer.Option(None, "--fleet", help="Only this fleet."),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the devices as JSON."),
) -> None:
    """Every device: fleet, version, online/offline, last seen, p95 latency, drift flag."""
    from edgekit.fleet.registry.views import device_json

    reg = _registry(registry)
    devices = reg.devices(fleet)
    reg.close()
    if json_out:
        print_json([device_json(d) for d in devices])
        return
    if not devices:
        console.print("No devices have reported yet." + (f" (fleet {fleet})" if fleet else ""))
        return
    table = Table("device", "fleet", "version", "state", "last seen", "p95", "drift")
    for d in devices:
        state = f"[green]{d.status}[/]" if d.online else "[bold red]offline[/]"
        drift = "[bold yellow]drifted[/]" if d.drifted else ("ok" if d.drift_score is not None else "-")
        p95 = f"{d.latency_p95_ms:.1f} ms" if d.latency_p95_ms is not None else "-"
        table.add_row(d.id, d.fleet, d.bundle_version or "-", state, _ago(d.last_seen), p95, drift)
    console.print(table)


@app.command("events")
def events(
    device: Optional[str] = typer.Option(None, "--device", help="Only this device."),
    limit: int = typer.Option(50, "--limit", min=1, max=1000, help="How many, newest first."),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the events as JSON."),
) -> None:
    """Installs, refusals, health checks, rollbacks and errors, newest first."""
    from edgekit.fleet.registry.views import event_json

    reg = _registry(registry)
    rows = reg.events(device=device, limit=limit)
    reg.close()
    if json_out:
        print_json([event_json(e) for e in rows])
        return
    table = Table("when", "device", "event", "message")
    for e in rows:
        table.add_row(event_json(e)["at"], e.device, e.kind, e.message)
    console.print(table)
