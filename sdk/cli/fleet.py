"""``edgekit fleet``: what the fleet is doing, from the registry."""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..config import WorkstationConfig
from ._app import console, new_app, print_json, print_json_line

app = new_app("Watch the fleet: device status, versions, latency, drift and events.")

REGISTRY_HELP = "Registry URL (sqlite:///PATH or postgresql://...); else $EDGEKIT_REGISTRY, else config."
BROKER_HELP = "Broker URL (mqtt://host:1883 or mqtts://...); else $EDGEKIT_BROKER, else config."
PUBLIC_URL: Any = typer.Option(
    None, "--public-url", help="The dashboard's address as the owner reaches it, for the links in alerts."
)
ALERT_INTERVAL: Any = typer.Option(
    2.0, "--alert-interval", min=0.05, max=3600, help="Seconds between two evaluations of the alert rules."
)


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
    """Every device: fleet, version, online/offline, last seen, p95 latency, and drift: ok,
    inputs changed (shown, not alarming) or model affected (with the estimated accuracy)."""
    from edgekit.fleet.registry.views import device_json, drift_text

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
        drift = drift_text(d)
        if d.drift_severity == "model affected" or (d.drift_severity is None and d.drifted):
            drift = f"[bold red]{drift}[/]"
        elif d.drift_severity == "inputs changed":
            drift = f"[yellow]{drift}[/]"
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


user_app = new_app("Accounts of the fleet service's API and dashboard: operators act, viewers look.")
app.add_typer(user_app, name="user")


@user_app.command("add")
def user_add(
    name: str = typer.Argument(..., help="Account name (letters, digits, . _ @ -)."),
    role: str = typer.Option(
        "viewer", "--role", help="operator (may push, abort, roll back) or viewer (may look)."
    ),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from stdin (scripts)."
    ),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
) -> None:
    """Create an account (or change its role and password; its sessions end)."""
    from edgekit.fleet.accounts import Accounts

    from .server import read_password

    password = read_password(f"Password for {name}", password_stdin, confirm=True)
    reg = _registry(registry)
    try:
        Accounts(reg).add(name, role, password)
    finally:
        reg.close()
    console.print(
        f"account {name} ({role}) ready; sign in with `edgekit login --server URL --account {name}`"
    )


@user_app.command("list")
def user_list(
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    json_out: bool = typer.Option(
        False, "--json", help="Print the accounts as JSON (never their passwords)."
    ),
) -> None:
    """Every account and its role."""
    from edgekit.fleet.accounts import Accounts

    reg = _registry(registry)
    rows = [
        {"account": a.name, "role": a.role, "created_at": a.created_at.isoformat()}
        for a in Accounts(reg).list()
    ]
    reg.close()
    if json_out:
        print_json(rows)
        return
    table = Table("account", "role", "created")
    for row in rows:
        table.add_row(row["account"], row["role"], row["created_at"][:16].replace("T", " "))
    console.print(table if rows else "No accounts yet: `edgekit fleet user add NAME --role operator`.")


@user_app.command("remove")
def user_remove(
    name: str = typer.Argument(..., help="The account to remove (its sessions end at once)."),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
) -> None:
    """Remove an account."""
    from edgekit.fleet.accounts import Accounts

    reg = _registry(registry)
    try:
        Accounts(reg).remove(name)
    finally:
        reg.close()
    console.print(f"account {name} removed")


@app.command("audit")
def audit(
    fleet: Optional[str] = typer.Option(None, "--fleet", help="Only this fleet."),
    limit: int = typer.Option(50, "--limit", min=1, max=1000, help="How many, newest first."),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the entries as JSON."),
) -> None:
    """Who pushed, rolled back, resumed or aborted what, when, and how it went, newest first."""
    from edgekit.fleet.control import ControlPlane
    from edgekit.fleet.registry.views import audit_json

    reg = _registry(registry)
    rows = [audit_json(entry) for entry in ControlPlane(reg).audit_log(fleet, limit)]
    reg.close()
    if json_out:
        print_json(rows)
        return
    if not rows:
        console.print("Nothing has been done to " + (f"fleet {fleet}" if fleet else "any fleet") + " yet.")
        return
    table = Table("when", "who", "what", "fleet", "bundle", "result")
    for row in rows:
        result = row["result"] if row["result"] == "ok" else f"[bold red]{row['result']}[/]: {row['detail']}"
        table.add_row(
            row["at"], row["actor"], row["action"], row["fleet"] or "-", row["target"] or "-", result
        )
    console.print(table)


@app.command("simulate")
def simulate(
    devices: int = typer.Option(..., "--devices", min=1, max=10000, help="How many devices to simulate."),
    fleet: str = typer.Option(..., "--fleet", help="The fleet they belong to."),
    broker: Optional[str] = typer.Option(
        None,
        "--broker",
        help="Broker URL (mqtt://host:1883, mqtts://...); else $EDGEKIT_BROKER, else config.",
    ),
    state_dir: Optional[Path] = typer.Option(
        None,
        "--state-dir",
        help="Where the devices' configs (DEVICE.toml) and state directories go; default "
        "$EDGEKIT_HOME/simulate/FLEET. Devices found there are reused (they reboot).",
    ),
    processes: int = typer.Option(
        1, "--processes", min=1, max=256, help="Spread the devices over P processes (one runtime each)."
    ),
    predict_rate: float = typer.Option(
        0.0,
        "--predict-rate",
        min=0.0,
        help="predict() calls per device and second, so telemetry flows (0: none).",
    ),
    inputs: Optional[Path] = typer.Option(
        None,
        "--inputs",
        help="DATA (.npy, or .npz with x) to feed; default: the serving bundle's health-check inputs.",
    ),
    drift_device: Optional[list[str]] = typer.Option(
        None, "--drift-device", help="Feed this device shifted inputs, so it reports drift (repeatable)."
    ),
    drift_shift: float = typer.Option(
        0.3,
        "--drift-shift",
        help="How far a drifting device's inputs move, as a fraction of their value range.",
    ),
    telemetry_interval: Optional[float] = typer.Option(
        None,
        "--telemetry-interval",
        min=0.1,
        help="Seconds per telemetry window (default: the config's, 60).",
    ),
    xnnpack: bool = typer.Option(
        False,
        "--xnnpack/--no-xnnpack",
        help="Run models through XNNPACK, as devices do by default. Off: the built-in kernels, "
        "which keep no packed copy of the weights per device (lighter for hundreds of devices).",
    ),
    duration: Optional[float] = typer.Option(
        None, "--duration", min=0.0, help="Stop after S seconds (default: run until Ctrl-C)."
    ),
    json_out: bool = typer.Option(
        False,
        "--json",
        help="Print JSON lines: one when every device has started, one with each device at the end.",
    ),
) -> None:
    """Run N real device agents (Agent + AgentDaemon) in few processes, for trying a fleet of
    hundreds on one machine. Each device is provisioned like `edgekit device add` does it (its
    own config, state directory, broker account and device id); they share the interpreter and
    the runtime, and run models with the runtime's built-in kernels unless --xnnpack. Ctrl-C
    stops them cleanly (each reports itself offline)."""
    import signal
    import threading

    from ..config import edgekit_home
    from ..data import load_data
    from ..provision import provision_device

    cfg = WorkstationConfig.load(broker=broker)
    root = state_dir or edgekit_home() / "simulate" / fleet
    width = max(3, len(str(devices - 1)))
    names = [f"{fleet}-sim-{i:0{width}d}" for i in range(devices)]
    paths = []
    created = 0
    for name in names:
        path = root / f"{name}.toml"
        if not path.exists():
            provision_device(
                name, fleet, path, broker=cfg.broker, state_dir=name
            )  # relative: beside the config
            created += 1
        paths.append(path)
    samples = load_data(inputs).x if inputs is not None else None
    overrides: dict[str, Any] = {"threads": 1, "broker": cfg.broker, "xnnpack": xnnpack}
    if telemetry_interval is not None:
        overrides["telemetry_interval"] = telemetry_interval

    from edgekit.agent.simulate import run_simulation  # the agent extra is needed only here

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if duration is not None:
        timer = threading.Timer(duration, stop.set)
        timer.daemon = True
        timer.start()

    def ready(connected: int) -> None:
        if json_out:
            print_json_line(
                {
                    "event": "ready",
                    "fleet": fleet,
                    "broker": cfg.broker,
                    "state_dir": str(root),
                    "processes": processes,
                    "devices": names,
                    "connected": connected,
                    "provisioned": created,
                }
            )
        else:
            console.print(
                f"simulating {devices} device(s) of fleet [bold]{fleet}[/] in {processes} process(es) "
                f"({created} provisioned now), {connected} connected to {cfg.broker}; state in {root}. "
                "Ctrl-C stops."
            )

    summaries = run_simulation(
        paths,
        processes=processes,
        predict_rate=predict_rate,
        inputs=samples,
        drift_devices=drift_device or (),
        drift_shift=drift_shift,
        overrides=overrides,
        stop=stop,
        on_ready=ready,
    )
    if json_out:
        print_json_line({"event": "stopped", "devices": [s.to_dict() for s in summaries]})
        return
    versions: dict[str, int] = {}
    for s in summaries:
        versions[s.version or "nothing"] = versions.get(s.version or "nothing", 0) + 1
    served = ", ".join(f"{n} on {v}" for v, n in sorted(versions.items()))
    console.print(f"stopped {len(summaries)} device(s): {served}")


@app.command("devices")
def devices(
    fleet: Optional[str] = typer.Option(None, "--fleet", help="Only this fleet."),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the inventory as JSON."),
) -> None:
    """The inventory: every device, its fleet, the bundle it runs, first and last seen, online."""
    from edgekit.fleet.registry.views import device_json

    reg = _registry(registry)
    found = reg.devices(fleet)
    reg.close()
    keys = ("device", "fleet", "bundle", "version", "bundle_id", "first_seen", "last_seen", "online")
    if json_out:
        print_json([{k: device_json(d)[k] for k in keys} for d in found])
        return
    if not found:
        console.print("No devices have reported yet." + (f" (fleet {fleet})" if fleet else ""))
        return
    table = Table("device", "fleet", "bundle", "version", "bundle id", "first seen", "last seen", "online")
    for d in found:
        row = device_json(d)
        table.add_row(
            d.id,
            d.fleet,
            d.bundle_name or "-",
            d.bundle_version or "-",
            (d.bundle_id or "-")[:12],
            row["first_seen"] or "-",
            _ago(d.last_seen),
            "[green]yes[/]" if d.online else "[bold red]no[/]",
        )
    console.print(table)


@app.command("serve")
def serve(
    broker: Optional[str] = typer.Option(None, "--broker", help=BROKER_HELP),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    workers: int = typer.Option(
        1,
        "--workers",
        min=1,
        max=64,
        help="Ingest processes; above 1 they split the load with MQTT 5 shared subscriptions.",
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Dashboard address; anything but localhost needs --token."
    ),
    http_port: int = typer.Option(8765, "--http-port", help="Dashboard port (0: any free port)."),
    token: Optional[str] = typer.Option(
        None, "--token", envvar="EDGEKIT_DASHBOARD_TOKEN", help="Dashboard token ($EDGEKIT_DASHBOARD_TOKEN)."
    ),
    group: str = typer.Option("edgekit-ingest", "--group", help="Shared subscription group of the workers."),
    batch_size: int = typer.Option(
        2000, "--batch-size", min=1, help="Messages per database transaction, at most."
    ),
    batch_delay: float = typer.Option(
        0.2, "--batch-delay", min=0.001, help="Seconds a message waits for its batch to fill, at most."
    ),
    session_expiry: int = typer.Option(
        0,
        "--session-expiry",
        min=0,
        help="Keep each worker's MQTT session this many seconds across disconnects (fixed client ids), "
        "so the broker holds messages for a worker that restarts; 0: clean sessions.",
    ),
    public_url: Optional[str] = PUBLIC_URL,
    alert_interval: float = ALERT_INTERVAL,
    json_out: bool = typer.Option(
        False, "--json", help="Print the URLs, then the final counts, as JSON lines."
    ),
) -> None:
    """Run the fleet service: ingest (MQTT -> registry), the rollout controller, alerts (see
    `edgekit alerts`) and the dashboard, until Ctrl-C or SIGTERM."""
    from edgekit.fleet.service import FleetService, ServiceConfig

    ws = WorkstationConfig.load(broker=broker, registry=registry)
    config = ServiceConfig(
        broker=ws.broker,
        registry=ws.registry,
        workers=workers,
        host=host,
        http_port=http_port,
        token=token,
        group=group,
        batch_size=batch_size,
        max_delay=batch_delay,
        session_expiry=session_expiry,
        log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()),
        home=str(ws.home),
        public_url=public_url,
        alert_interval=alert_interval,
    )
    _run_service(FleetService(config), json_out)


def _safe_url(url: str) -> str:
    """A URL without its password, fit to print."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


@app.command("up")
def up(
    port: int = typer.Option(1883, "--port", min=1, max=65535, help="Port of the broker `fleet up` starts."),
    http_port: int = typer.Option(8765, "--http-port", help="Dashboard port (0: any free port)."),
    registry: Optional[str] = typer.Option(
        None, "--registry", help=REGISTRY_HELP + " Default: SQLite under $EDGEKIT_HOME."
    ),
    broker: Optional[str] = typer.Option(
        None, "--broker", help="Use this broker instead of starting one (mqtt://host:1883)."
    ),
    embedded: bool = typer.Option(
        False,
        "--embedded",
        help="Start the embedded broker (amqtt: no accounts, no ACLs) even when Mosquitto is installed.",
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Dashboard address; anything but localhost needs --token."
    ),
    token: Optional[str] = typer.Option(
        None, "--token", envvar="EDGEKIT_DASHBOARD_TOKEN", help="Dashboard token ($EDGEKIT_DASHBOARD_TOKEN)."
    ),
    public_url: Optional[str] = PUBLIC_URL,
    alert_interval: float = ALERT_INTERVAL,
    json_out: bool = typer.Option(
        False, "--json", help="Print the URLs, then the final counts, as JSON lines."
    ),
) -> None:
    """One command on a laptop: a broker (unless --broker), the registry (SQLite under
    $EDGEKIT_HOME by default), ingest, the rollout controller, alerts and the dashboard. The broker is
    Mosquitto when it is installed (an account and ACL per device, MQTT 5, retained messages
    kept in $EDGEKIT_HOME/mosquitto), else the embedded amqtt broker (no accounts, no ACLs).
    Prints the URLs; Ctrl-C stops everything, the broker last."""
    from edgekit.fleet.service import FleetService, ServiceConfig

    ws = WorkstationConfig.load(registry=registry)
    started: Any = None
    kind = "external"
    url = broker
    if url is None:
        from edgekit.fleet.mosquitto import FleetMosquitto, mosquitto_binary

        if mosquitto_binary() is not None and not embedded:
            started, kind = FleetMosquitto(ws.home, ws.home / "mosquitto", "127.0.0.1", port), "mosquitto"
        else:
            from edgekit.fleet.embedded import EmbeddedBroker

            started = EmbeddedBroker("127.0.0.1", port, data_dir=ws.home / "embedded-broker")
            kind = "embedded"
        url = started.start().url
    try:
        config = ServiceConfig(
            broker=url,
            registry=ws.registry,
            workers=1,
            host=host,
            http_port=http_port,
            token=token,
            log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()),
            home=str(ws.home),
            public_url=public_url,
            alert_interval=alert_interval,
        )
        _run_service(FleetService(config), json_out, broker_kind=kind)
    finally:
        if started is not None:
            started.stop()


#: What `fleet up` says about the broker it started (or not).
_BROKER_WORDS = {
    "mosquitto": "Mosquitto (an account and ACL per device)",
    "embedded": "embedded broker (amqtt: NO accounts, NO ACLs: anyone who reaches it may publish)",
    "external": "broker",
}


def _run_service(service: Any, json_out: bool, broker_kind: str = "external") -> None:
    """Start ``service``, print its URLs, wait for Ctrl-C or SIGTERM, stop it, print the totals."""
    import signal
    import threading

    config = service.config
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    service.start()
    info = {
        "dashboard": service.url,
        "metrics": f"{service.url}metrics",
        "api": f"{service.url}api/",
        "broker": _safe_url(config.broker),
        "embedded_broker": broker_kind != "external",  # started by `fleet up`
        "broker_kind": broker_kind,
        "broker_acl": broker_kind != "embedded" if broker_kind != "external" else None,
        "registry": _safe_url(service.registry.url),
        "workers": config.workers,
    }
    if json_out:
        print_json_line(info)
    else:
        console.print(
            f"edgekit fleet: {config.workers} ingest worker(s) on the {_BROKER_WORDS[broker_kind]} "
            f"{info['broker']} -> {info['registry']}",
            soft_wrap=True,
        )
        console.print(
            f"  dashboard  {info['dashboard']}\n  metrics    {info['metrics']}\n  api        {info['api']}"
        )
        if broker_kind != "external":
            console.print(f"  devices and commands: --broker {info['broker']}")
        if broker_kind == "mosquitto":
            console.print("  new devices (edgekit device add) get their broker account within a second")
        console.print("Ctrl-C stops it.")
    sys.stdout.flush()
    stop.wait()
    totals = service.stop()
    final = {
        "stopped": True,
        "telemetry": totals.telemetry,
        "duplicates": totals.telemetry_duplicates,
        "events": totals.events,
        "states": totals.states,
        "rejected": totals.rejected_total,
    }
    if json_out:
        print_json_line(final)
    else:
        console.print(
            f"stopped: {totals.telemetry} telemetry records, {totals.events} events, {totals.states} states "
            f"stored; {totals.telemetry_duplicates} duplicates and {totals.rejected_total} rejected messages dropped"
        )
