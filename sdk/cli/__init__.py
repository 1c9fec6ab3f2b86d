"""The ``edgekit`` command line (workstation side)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

try:
    import typer
except ModuleNotFoundError as exc:  # a device's install (edgekit[agent]) has no workstation command
    raise SystemExit(
        "error: the `edgekit` command belongs to the workstation: install it with "
        "pip install 'edgekit[cli]' (a device needs only `edgekit-agent`)"
    ) from exc

from ..logs import setup_logging
from . import (
    alerts,
    bench,
    broker,
    bundle,
    capture,
    convert,
    device,
    distill,
    fleet,
    keys,
    push,
    server,
    shadow,
    trust,
)
from ._app import new_app, run, version_callback

__all__ = ["app", "main"]

app = new_app("edgekit: take a trained model to a fleet of small Linux devices, and keep watching it there.")
app.add_typer(keys.app, name="keys")
app.add_typer(bundle.app, name="bundle")
app.command("convert")(convert.convert)
app.command("distill")(distill.distill)
app.add_typer(device.app, name="device")
app.add_typer(broker.app, name="broker")
app.add_typer(fleet.app, name="fleet")
app.add_typer(alerts.app, name="alerts")
app.add_typer(capture.app, name="capture")
app.add_typer(push.rollout_app, name="rollout")
app.add_typer(trust.app, name="trust")
app.add_typer(shadow.app, name="shadow")
app.add_typer(bench.app, name="bench")
app.command("push")(push.push)
fleet.app.command("rollback")(push.rollback)
app.command("login")(server.login)
app.command("logout")(server.logout)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit."
    ),
    log_level: str = typer.Option("warning", "--log-level", help="debug, info, warning or error."),
    log_json: bool = typer.Option(False, "--log-json", help="Log JSON lines to stderr."),
) -> None:
    setup_logging(log_level, log_json)


def main(argv: Optional[Sequence[str]] = None) -> None:
    run(app, argv, prog="edgekit")
