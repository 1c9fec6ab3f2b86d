"""``edgekit-agent``: the device-side command.

edgekit-agent install FILE.ekb --config agent.toml [--allow-downgrade] [--json]
edgekit-agent status --config agent.toml [--json]
edgekit-agent rollback --config agent.toml [--json]
edgekit-agent run --config agent.toml

Plain argparse, so a device installs and imports nothing of the workstation's command line
(typer, click, rich): ``edgekit-agent --help`` starts in a fraction of the time (BENCHMARKS.md).
Errors are mapped like ``edgekit``'s: an :class:`~edgekit.errors.EdgekitError` becomes one
``error:`` line on stderr and its exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Optional

from edgekit._version import __version__
from edgekit.agent_config import AgentConfig, parse_listen
from edgekit.errors import EdgekitError
from edgekit.logs import LOG_LEVELS, setup_logging

from .agent import Agent
from .daemon import AgentDaemon
from .serve import InferenceServer
from .systemd import Notifier

__all__ = ["build_parser", "main"]

log = logging.getLogger("edgekit.agent")

CONFIG_HELP = "The agent config (TOML), e.g. written by `edgekit device add`."


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _agent(config: Path) -> Agent:
    return Agent(AgentConfig.load(config), background=False)


def install(args: argparse.Namespace) -> None:
    agent = _agent(args.config)
    try:
        result = agent.install(args.file, allow_downgrade=args.allow_downgrade)
    finally:
        agent.close()
    if args.json:
        _print_json(result.to_dict())
    elif not result.changed:
        print(f"{result.name}@{result.version} is already installed; nothing to do")
    else:
        was = f" (was {result.previous})" if result.previous else ""
        print(f"Installed {result.name}@{result.version}{was}; id {result.bundle_id[:16]}")


_DRIFT_CHECKS = {
    "off": "not watched (the bundle has no baseline; create it with --baseline DATA)",
    "inputs and outputs": "inputs and outputs watched; no accuracy estimate "
    "(the bundle has no calibration; create it with --calibration-eval DATA)",
    "inputs, outputs and accuracy": "inputs and outputs watched, accuracy estimated from calibrated confidence",
}


def status(args: argparse.Namespace) -> None:
    agent = _agent(args.config)
    try:
        info = agent.status()
    finally:
        agent.close()
    if args.json:
        _print_json(info.to_dict())
        return
    if info.serving:
        print(f"device {info.device} (fleet {info.fleet}): serving {info.name}@{info.version}")
        print(f"  id       {info.bundle_id}")
        kernels = "XNNPACK" if info.xnnpack else "built-in kernels"
        print(f"  runtime  {info.runtime} ({kernels}), {info.threads} thread(s)")
        print(f"  drift    {_DRIFT_CHECKS[info.drift_checks]}")
    else:
        print(f"device {info.device} (fleet {info.fleet}): no model installed")
    print(f"  previous {info.previous or '-'}")
    print(f"  queued   {info.telemetry_queued} telemetry records, {info.events_queued} events")


def rollback(args: argparse.Namespace) -> None:
    agent = _agent(args.config)
    try:
        loaded = agent.rollback()
    finally:
        agent.close()
    if args.json:
        _print_json({**loaded.identity(), "directory": loaded.directory.name})
    else:
        print(f"Rolled back to {loaded.manifest.label}")


def run(args: argparse.Namespace) -> None:
    config: Path = args.config
    stop = threading.Event()
    received: list[int] = []

    def _on_signal(signum: int, frame: Optional[FrameType]) -> None:
        # No logging here: a signal that lands while the main thread writes a log line to stderr
        # would re-enter the stream, raise inside logging (which swallows it) and never set stop.
        received.append(signum)
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
        if received:
            log.info("agent %s: received %s; stopping", info.device, signal.Signals(received[0]).name)
        notifier.stopping(f"{info.device}: stopping")
        if server is not None:
            server.stop()
        if daemon is not None:
            daemon.stop()
        agent.close()
        notifier.close()
    log.info("agent %s stopped; %d telemetry records queued", info.device, len(agent.telemetry))


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (docs/gen_cli.py renders docs/cli-reference.md from it)."""
    parser = argparse.ArgumentParser(
        prog="edgekit-agent",
        description="edgekit-agent: verify, install and serve edgekit bundles on a device.",
    )
    parser.add_argument(
        "--version", action="version", version=f"edgekit {__version__}", help="Print the version and exit."
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=LOG_LEVELS,
        metavar="LEVEL",
        help="debug, info, warning or error.",
    )
    parser.add_argument("--log-json", action="store_true", help="Log JSON lines to stderr.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func: Any, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text.split("\n", maxsplit=1)[0], description=text)
        sub.set_defaults(func=func)
        return sub

    def config_and_json(sub: argparse.ArgumentParser, json_help: Optional[str]) -> None:
        sub.add_argument("--config", "-c", type=Path, required=True, metavar="PATH", help=CONFIG_HELP)
        if json_help:
            sub.add_argument("--json", action="store_true", help=json_help)

    sub = command(
        "install",
        install,
        "Verify a bundle against the trusted keys, install it atomically, health-check it, serve it.",
    )
    sub.add_argument(
        "file", type=Path, metavar="FILE", help="The .ekb bundle to install (e.g. from a USB stick)."
    )
    config_and_json(sub, "Print the result as JSON.")
    sub.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="Install even if the bundle's version is lower than (or equal to but different from) the installed one.",
    )
    sub = command(
        "status",
        status,
        "Show the installed bundle, its runtime, the previous bundle and the queued reports.",
    )
    config_and_json(sub, "Print the status as JSON.")
    sub = command(
        "rollback", rollback, "Serve the previous bundle again (the current one becomes the previous)."
    )
    config_and_json(sub, "Print the result as JSON.")
    sub = command(
        "run",
        run,
        "Run the agent daemon: follow the fleet's signed desired state, install what it names, "
        "report state, events and telemetry over MQTT; serve the installed bundle; stop on SIGTERM. "
        "Under systemd (Type=notify) it sends READY=1, WATCHDOG=1 pings and STOPPING=1.",
    )
    config_and_json(sub, None)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the command; an EdgekitError becomes one line on stderr and its exit code."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command is None:
        parser.print_help()
        sys.exit(2)
    setup_logging(args.log_level, args.log_json)
    try:
        args.func(args)
    except EdgekitError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    sys.exit(0)


if __name__ == "__main__":
    main()
