"""``edgekit push``, ``edgekit rollout`` and ``edgekit fleet rollback``: ship a model to a fleet."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import typer
from rich.live import Live
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from ..catalog import Catalog
from ..config import WorkstationConfig
from ..errors import ModelFormatError, RolloutError
from ..keys import SigningKey
from ..trust import TrustedKeys
from ._app import console, new_app, print_json, signing_key

rollout_app = new_app("Follow, resume or abort a canary rollout (after a crash or a sleep, too).")

BROKER_HELP = "Broker URL (mqtt://host:1883, mqtts://...); else $EDGEKIT_BROKER, else config."
KEYS_FORMATS = (".keras", ".h5", ".hdf5")
# Seconds to wait for a fleet's rollout lock: the rollout controller of `fleet up` holds it for
# one step at a time; `push --wait` and `rollout resume` hold it until they are done.
LOCK_WAIT = 15.0


def _bundle_name(stem: str) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "model"
    return name[:64]


def resolve_target(
    target: str, catalog: Catalog, key: SigningKey, version: Optional[str], name: Optional[str] = None
) -> tuple[Path, Any]:
    """A bundle file, a .tflite (bundled with defaults), a Keras model (converted with defaults)
    or a name in the catalog (its newest version); the result is verified and catalogued."""
    from ..bundle import create_bundle

    path = Path(target)
    if path.suffix == ".ekb" and path.is_file():
        return catalog.add(path)
    if (
        (path.suffix == ".tflite" and path.is_file())
        or path.suffix in KEYS_FORMATS
        or (path.is_dir() and (path / "saved_model.pb").exists())
    ):
        if not path.exists():
            raise ModelFormatError(f"model file {path} does not exist")
        name = name or _bundle_name(path.stem if path.is_file() else path.name)
        with tempfile.TemporaryDirectory() as tmp:
            model = path
            if path.suffix != ".tflite":
                from edgekit.converters import ConvertOptions, convert  # needs edgekit[convert]

                model = Path(tmp) / f"{name}.tflite"
                convert(ConvertOptions(model=path, output=model))
            out = Path(tmp) / f"{name}.ekb"
            create_bundle(
                model, name=name, version=version or catalog.next_version(name), key=key, output=out
            )
            return catalog.add(out)
    if path.exists():
        raise ModelFormatError(
            f"cannot push {path}: give a .ekb bundle, a .tflite model, a Keras model (.keras, .h5, "
            "a SavedModel folder) or the name of a bundle in the catalog"
        )
    return catalog.read(target, version)


def _connect(cfg: WorkstationConfig) -> Any:
    from edgekit.fleet.push import connect_operator

    return connect_operator(cfg.broker, home=cfg.home)


def _device_table(link: Any, rollout: Any) -> Table:
    table = Table(
        "device",
        "state",
        "version",
        "detail",
        title=f"{rollout.label} → fleet {rollout.fleet}: {rollout.phase}",
    )
    for device in link.devices():
        state = link.states[device]
        detail = state.error or ""
        status = state.status
        if status == "downloading" and state.progress is not None:
            status = f"downloading {state.progress:.0%}"
        if state.status == "serving" and state.bundle_id == rollout.bundle_id:
            status = "[green]serving[/]"
        elif state.status == "failed":
            status = "[red]failed[/]"
        elif state.status == "offline":
            status = "[bold red]offline[/]"
        if device in rollout.canaries:
            device = f"{device} (canary)"
        table.add_row(device, status, state.bundle_version or "-", detail)
    return table


def _summary(rollout: Any, link: Any) -> dict[str, Any]:
    return {
        "fleet": rollout.fleet,
        "bundle_id": rollout.bundle_id,
        "bundle": rollout.label,
        "phase": rollout.phase,
        "reason": rollout.reason,
        "canaries": list(rollout.canaries),
        "failed": dict(rollout.failed),
        "devices": {
            d: {"status": s.status, "version": s.bundle_version, "bundle_id": s.bundle_id, "error": s.error}
            for d, s in sorted(link.states.items())
        },
    }


def _drive(
    link: Any, rollout: Any, labels: dict[str, str], state_path: Path, timeout: float, json_out: bool
) -> Any:
    """Run the rollout to its end with a live view on a terminal; raise RolloutError if it failed."""
    from edgekit.fleet.push import run_rollout

    live = (
        Live(_device_table(link, rollout), console=console, refresh_per_second=4, transient=False)
        if console.is_terminal and not json_out
        else None
    )
    try:
        if live is not None:
            live.start()
        rollout = run_rollout(
            link,
            rollout,
            rollout.rollout_policy,
            state_path,
            labels,
            timeout=timeout,
            on_change=(lambda r, lk: live.update(_device_table(lk, r))) if live is not None else None,
        )
    finally:
        if live is not None:
            live.stop()
    if json_out:
        print_json(_summary(rollout, link))
    if rollout.phase == "aborted":
        raise RolloutError(
            f"rollout of {rollout.label} to fleet {rollout.fleet} aborted: {rollout.reason}; "
            "the canaries were sent back to the previous bundle"
        )
    if not rollout.finished:
        waiting = [d for d in link.devices() if link.states[d].bundle_id != rollout.bundle_id]
        raise RolloutError(
            f"timed out after {timeout:g}s in phase {rollout.phase}; still waiting for "
            f"{', '.join(waiting) or 'no device'}; `edgekit rollout resume --fleet {rollout.fleet}` "
            "goes on"
        )
    if rollout.failed:
        named = ", ".join(f"{d} ({why})" for d, why in sorted(rollout.failed.items()))
        raise RolloutError(
            f"{rollout.label} reached fleet {rollout.fleet} but {len(rollout.failed)} device(s) "
            f"failed: {named}"
        )
    if not json_out:
        console.print(f"[green]done[/]: every device of fleet {rollout.fleet} serves {rollout.label}")
    return rollout


def _clear_superseded(link: Any, catalog: Catalog) -> None:
    """Clear the retained chunks of bundles the fleet no longer needs (all but current and previous)."""
    keep = {link.record.bundle_id}
    previous = link.record.previous()
    if previous:
        keep.add(previous["id"])
    for entry in list(link.record.history):
        if entry["id"] in keep:
            continue
        found = catalog.find(entry["id"])
        if found is not None:
            link.clear_bundle(entry["id"], len(found[1].manifest.chunks.sha256))
        link.record.history.remove(entry)
    link.record.save(link.home)


def push(
    target: str = typer.Argument(
        ..., help="A .ekb bundle, a .tflite or Keras model, or a bundle name in the catalog."
    ),
    fleet: str = typer.Option(..., "--fleet", help="The fleet to ship to."),
    canary: int = typer.Option(0, "--canary", min=0, help="Ship to N devices first, soak, then to the rest."),
    wait: bool = typer.Option(
        False, "--wait", help="Wait until every device serves it; non-zero exit if not."
    ),
    timeout: float = typer.Option(
        600.0, "--timeout", min=1, help="Seconds to wait for installs (per phase)."
    ),
    soak: float = typer.Option(
        60.0, "--soak", min=0, help="Seconds the canaries serve before the fleet gets it."
    ),
    max_error_rate: float = typer.Option(
        0.05, "--max-error-rate", min=0, max=1, help="Abort if a canary's error rate exceeds this."
    ),
    max_p95_regression: float = typer.Option(
        0.5, "--max-p95-regression", min=0, help="Abort if a canary's p95 latency grows by more (0.5 = 50%)."
    ),
    ignore_drift: bool = typer.Option(
        False, "--ignore-drift", help="Do not abort when a canary reports drift."
    ),
    name: Optional[str] = typer.Option(
        None, "--name", help="Bundle name for a model bundled here (default: from the file name)."
    ),
    version: Optional[str] = typer.Option(
        None,
        "--version",
        help="Version for a model bundled here (default: next patch), or which catalogued version to push.",
    ),
    key_name: str = typer.Option("default", "--key-name", help="Signing key under $EDGEKIT_HOME/keys."),
    broker: Optional[str] = typer.Option(None, "--broker", help=BROKER_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
) -> None:
    """Ship a model to a fleet: publish the signed bundle, tell the devices, follow them."""
    from edgekit.fleet.push import FleetLink, FleetRecord, begin_rollout, driving, rollout_path
    from edgekit.fleet.rollout import RolloutPolicy

    cfg = WorkstationConfig.load(broker=broker)
    key = signing_key(key_name)
    catalog = Catalog(cfg.home, TrustedKeys([key.public]))
    _, bundle = resolve_target(target, catalog, key, version, name)
    policy = RolloutPolicy(
        canary=canary,
        soak_s=soak,
        install_timeout_s=timeout,
        max_error_rate=max_error_rate,
        max_p95_regression=max_p95_regression,
        abort_on_drift=not ignore_drift,
    )
    client = _connect(cfg)
    try:
        link = FleetLink(client, fleet, key, cfg.home)
        devices = link.discover()
        total = bundle.manifest.chunks.total_size
        state_path = rollout_path(cfg.home, fleet)
        with driving(cfg.home, fleet, "edgekit push --wait" if wait else "edgekit push", wait=LOCK_WAIT):
            link.record = FleetRecord.load(cfg.home, fleet)  # as the last driver left it
            # Manifest, desired state, then the chunks: devices fetch while the upload goes on.
            upload = link.start_upload(bundle)
            rollout, labels = begin_rollout(link, bundle, policy, state_path)
            with Progress(
                TextColumn("publishing {task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=console,
                disable=not console.is_terminal or json_out,
            ) as bar:
                task = bar.add_task(bundle.manifest.label, total=total)
                upload.finish(progress=lambda sent, _total: bar.update(task, completed=sent))
            if not json_out:
                console.print(
                    f"published {bundle.manifest.label} (id {bundle.bundle_id[:16]}) to fleet {fleet}: "
                    f"{len(devices)} device(s) known"
                    + (f", {len(rollout.canaries)} canary" if canary else "")
                )
            if not wait:
                if json_out:
                    print_json(_summary(rollout, link))
                elif rollout.canaries:
                    console.print(
                        f"the canaries install it now; `edgekit rollout resume --fleet {fleet}` (or the "
                        "rollout controller of `edgekit fleet up`) takes the rollout on to the fleet"
                    )
                return
            if not devices:
                if not json_out:
                    console.print(
                        f"no device of fleet {fleet} has reported yet; devices that join later fetch "
                        f"{bundle.manifest.label} from the broker"
                    )
                else:
                    print_json(_summary(rollout, link))
                return
            _drive(link, rollout, labels, state_path, timeout, json_out)
            _clear_superseded(link, catalog)
    finally:
        client.close()


@rollout_app.command("status")
def rollout_status(
    fleet: str = typer.Option(..., "--fleet", help="Whose rollout."),
    json_out: bool = typer.Option(False, "--json", help="Print the saved rollout as JSON."),
) -> None:
    """Show the fleet's last rollout as saved (no broker needed)."""
    from edgekit.fleet.push import rollout_path
    from edgekit.fleet.rollout import Rollout

    rollout = Rollout.load(rollout_path(WorkstationConfig.load().home, fleet))
    if json_out:
        print_json(
            {
                "fleet": rollout.fleet,
                "bundle": rollout.label,
                "bundle_id": rollout.bundle_id,
                "phase": rollout.phase,
                "canaries": list(rollout.canaries),
                "devices": list(rollout.devices),
                "failed": dict(rollout.failed),
                "reason": rollout.reason,
            }
        )
        return
    console.print(
        f"{rollout.label} → fleet {rollout.fleet}: [bold]{rollout.phase}[/]"
        + (f" ({rollout.reason})" if rollout.reason else "")
    )
    console.print(f"canaries: {', '.join(rollout.canaries) or '-'}; devices: {len(rollout.devices)}")
    for device, why in sorted(rollout.failed.items()):
        console.print(f"  failed: {device}: {why}")


@rollout_app.command("resume")
def rollout_resume(
    fleet: str = typer.Option(..., "--fleet", help="Whose rollout."),
    timeout: float = typer.Option(600.0, "--timeout", min=1, help="Seconds to wait before giving up."),
    key_name: str = typer.Option("default", "--key-name", help="Signing key under $EDGEKIT_HOME/keys."),
    broker: Optional[str] = typer.Option(None, "--broker", help=BROKER_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
) -> None:
    """Drive a saved rollout on to its end (after `push` without --wait, a crash or a sleep)."""
    from edgekit.fleet.push import FleetLink, driving, labels_of, rollout_path
    from edgekit.fleet.rollout import Rollout

    cfg = WorkstationConfig.load(broker=broker)
    state_path = rollout_path(cfg.home, fleet)
    rollout = Rollout.load(state_path)
    if rollout.finished:
        console.print(f"the rollout of {rollout.label} is already {rollout.phase}")
        return
    key = signing_key(key_name)
    client = _connect(cfg)
    try:
        with driving(cfg.home, fleet, "edgekit rollout resume", wait=LOCK_WAIT):
            rollout = Rollout.load(state_path)  # as the last driver left it
            link = FleetLink(client, fleet, key, cfg.home)
            link.discover()
            _drive(link, rollout, labels_of(rollout, link.record), state_path, timeout, json_out)
    finally:
        client.close()


@rollout_app.command("abort")
def rollout_abort(
    fleet: str = typer.Option(..., "--fleet", help="Whose rollout."),
    key_name: str = typer.Option("default", "--key-name", help="Signing key under $EDGEKIT_HOME/keys."),
    broker: Optional[str] = typer.Option(None, "--broker", help=BROKER_HELP),
) -> None:
    """Stop a rollout and send the devices it reached back to the previous bundle."""

    from edgekit.fleet.push import abort_saved_rollout, rollout_path
    from edgekit.fleet.rollout import Rollout

    cfg = WorkstationConfig.load(broker=broker)
    Rollout.load(rollout_path(cfg.home, fleet))  # a missing or corrupt one is reported before connecting
    key = signing_key(key_name)
    client = _connect(cfg)
    try:
        rollout = abort_saved_rollout(client, cfg.home, fleet, key, "edgekit rollout abort", wait=LOCK_WAIT)
    finally:
        client.close()
    console.print(f"rollout of {rollout.label} to fleet {fleet}: {rollout.phase}")


def rollback(
    fleet: str = typer.Option(..., "--fleet", help="The fleet to roll back."),
    to: Optional[str] = typer.Option(
        None, "--to", help="VERSION (of the current bundle's name) or NAME@VERSION (default: the one before)."
    ),
    wait: bool = typer.Option(False, "--wait", help="Wait until every device serves it."),
    timeout: float = typer.Option(600.0, "--timeout", min=1, help="Seconds to wait with --wait."),
    key_name: str = typer.Option("default", "--key-name", help="Signing key under $EDGEKIT_HOME/keys."),
    broker: Optional[str] = typer.Option(None, "--broker", help=BROKER_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
) -> None:
    """Send the whole fleet back to an earlier bundle (a new, higher-numbered desired state)."""
    from edgekit.fleet.push import FleetLink, driving, rollback_target, rollout_path, start_rollback

    cfg = WorkstationConfig.load(broker=broker)
    key = signing_key(key_name)
    bundle = rollback_target(Catalog(cfg.home, TrustedKeys([key.public])), cfg.home, fleet, to)
    client = _connect(cfg)
    try:
        link = FleetLink(client, fleet, key, cfg.home)
        devices = link.discover()
        state_path = rollout_path(cfg.home, fleet)
        with driving(cfg.home, fleet, "edgekit fleet rollback", wait=LOCK_WAIT):
            rollout, labels = start_rollback(link, bundle, timeout)
            if not json_out:
                console.print(f"fleet {fleet} told to go back to {bundle.manifest.label}")
            if wait and devices:
                _drive(link, rollout, labels, state_path, timeout, json_out)
            elif json_out:
                print_json(_summary(rollout, link))
    finally:
        client.close()
