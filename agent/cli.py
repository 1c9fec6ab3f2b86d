"""``edgekit-agent``: the device-side command.

edgekit-agent install FILE.ekb --config agent.toml [--allow-downgrade] [--json]
edgekit-agent status --config agent.toml [--json]
edgekit-agent rollback --config agent.toml [--json]
edgekit-agent run --config agent.toml
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Optional

import typer
from edgekit.cli._app import console, new_app, print_json, run, setup_logging, version_callback

from .agent import Agent
from .config import AgentConfig, parse_listen
from .daemon import AgentDaemon
from .serve import InferenceServer
from .systemd import Notifier

app = new_app("edgekit-agent: verify, install and serve edgekit bundles on a device.")
log = logging.getLogger("edgekit.agent")

CONFIG_HELP = "The agent config (TOML), e.g. written by `edgekit device add`."


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit."
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    log_json: bool = typer.Option(False, "--log-json", help="Log JSON lines to stderr."),
) -> None:
    setup_logging(log_level, log_json)


def _agent(config: Path) -> Agent:
    return Agent(AgentConfig.load(config), background=False)


@app.command("install")
def install(
    file: Path = typer.Argument(..., help="The .ekb bundle to install (e.g. from a USB stick)."),
    config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP),
    allow_downgrade: bool = typer.Option(
        False,
        "--allow-downgrade",
        help="Install even if the bundle's version is lower than (or equal to but different from) the installed one.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Verify a bundle against the trusted keys, install it atomically, health-check it, serve it."""
    agent = _agent(config)
    try:
        result = agent.install(file, allow_downgrade=allow_downgrade)
    finally:
        agent.close()
    if json_out:
        print_json(result.to_dict())
    elif not result.changed:
        console.print(f"{result.name}@{result.version} is already installed; nothing to do")
    else:
        was = f" (was {result.previous})" if result.previous else ""
        console.print(f"Installed [bold]{result.name}@{result.version}[/]{was}; id {result.bundle_id[:16]}")


_DRIFT_CHECKS = {
    "off": "not watched (the bundle has no baseline; create it with --baseline DATA)",
    "inputs and outputs": "inputs and outputs watched; no accuracy estimate "
    "(the bundle has no calibration; create it with --calibration-eval DATA)",
    "inputs, outputs and accuracy": "inputs and outputs watched, accuracy estimated from calibrated confidence",
}


@app.command("status")
def status(
    config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Show the installed bundle, its runtime, the previous bundle and the queued reports."""
    agent = _agent(config)
    try:
        info = agent.status()
    finally:
        agent.close()
    if json_out:
        print_json(info.to_dict())
        return
    if info.serving:
        console.print(
            f"device {info.device} (fleet {info.fleet}): serving [bold]{info.name}@{info.version}[/]"
        )
        console.print(f"  id       {info.bundle_id}")
        kernels = "XNNPACK" if info.xnnpack else "built-in kernels"
        console.print(f"  runtime  {info.runtime} ({kernels}), {info.threads} thread(s)")
        console.print(f"  drift    {_DRIFT_CHECKS[info.drift_checks]}")
    else:
        console.print(f"device {info.device} (fleet {info.fleet}): [yellow]no model installed[/]")
    console.print(f"  previous {info.previous or '-'}")
    console.print(f"  queued   {info.telemetry_queued} telemetry records, {info.events_queued} events")


@app.command("rollback")
def rollback(
    config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Serve the previous bundle again (the current one becomes the previous)."""
    agent = _agent(config)
    try:
        loaded = agent.rollback()
    finally:
        agent.close()
    if json_out:
        print_json({**loaded.identity(), "directory": loaded.directory.name})
    else:
        console.print(f"Rolled back to [bold]{loaded.manifest.label}[/]")


@app.command("run")
def run_(config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP)) -> None:
    """Run the agent daemon: follow the fleet's signed desired state, install what it names,
    report state, events and telemetry over MQTT; serve the installed bundle; stop on SIGTERM.
    Under systemd (Type=notify) it sends READY=1, WATCHDOG=1 pings and STOPPING=1."""
    stop = threading.Event()

    def _on_signal(signum: int, frame: Optional[FrameType]) -> None:
        log.info("received signal %d; stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    notifier = Notifier()  # systemd (Type=notify): READY, WATCHDOG, STOPPING; else a no-op
    agent = Agent(AgentConfig.load(config), background=True)
    info = agent.status()
    if info.serving:
        serving = f"serving {info.name}@{info.version}"
        log.info("agent %s ready: %s", info.device, serving)
    else:
        serving = "no model installed yet"
        log.warning("agent %s ready: %s", info.device, serving)
    server: Optional[InferenceServer] = None
    daemon: Optional[AgentDaemon] = None
    try:
        if agent.config.serve_listen:
            host, port = parse_listen(agent.config.serve_listen, f"{config}: serve.listen")
            server = InferenceServer(agent, host, port, agent.config.serve_token).start()
        daemon = AgentDaemon(agent).start() if agent.config.broker else None
        if daemon is None:
            log.warning("agent %s: no broker configured; serving locally, reports stay queued", info.device)
        notifier.ready(f"{info.device}: {serving}")
        # The watchdog is fed from this loop, and only while the daemon's threads are alive: a
        # hung loop or a dead worker stops the pings, and systemd restarts the service.
        tick = min(1.0, notifier.watchdog_interval or 1.0)  # short enough for signals and the watchdog
        stalled = False
        while not stop.wait(tick):
            if not notifier.watchdog_due():
                continue
            if daemon is None or daemon.alive():
                notifier.watchdog()
            elif not stalled:
                stalled = True
                log.error("agent %s: a daemon thread died; no more watchdog pings", info.device)
    finally:
        notifier.stopping(f"{info.device}: stopping")
        if server is not None:
            server.stop()
        if daemon is not None:
            daemon.stop()
        agent.close()
        notifier.close()
    log.info("agent %s stopped; %d telemetry records queued", info.device, len(agent.telemetry))


def main(argv: Optional[Sequence[str]] = None) -> None:
    run(app, argv, prog="edgekit-agent")


if __name__ == "__main__":
    main()
