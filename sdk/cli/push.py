"""``edgekit push``, ``edgekit rollout`` and ``edgekit fleet rollback``: ship a model to a fleet."""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Optional

import typer
from rich.live import Live
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from ..config import WorkstationConfig
from ..errors import ModelFormatError, RolloutError
from ..keys import SigningKey
from ..trust import TrustedKeys
from ._app import console, new_app, print_json, signing_key
from .server import SERVER_HELP, ServerClient, server_client

rollout_app = new_app("Follow, resume or abort a canary rollout (after a crash or a sleep, too).")

BROKER_HELP = "Broker URL (mqtt://host:1883, mqtts://...); else $EDGEKIT_BROKER, else config."
REGISTRY_HELP = (
    "Registry database holding the catalog and rollouts (sqlite:///PATH, postgresql://...); "
    "else $EDGEKIT_REGISTRY, else config, else SQLite under $EDGEKIT_HOME."
)
KEYS_FORMATS = (".keras", ".h5", ".hdf5")


def _bundle_name(stem: str) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "model"
    return name[:64]


def resolve_target(
    target: str, catalog: Any, key: SigningKey, version: Optional[str], name: Optional[str] = None
) -> Any:
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


def open_control(cfg: WorkstationConfig, key: Optional[SigningKey]) -> Any:
    """The control plane in the registry database (what ``$EDGEKIT_HOME`` kept in files before
    is brought in on first use)."""
    from edgekit.fleet.control import ControlPlane

    trusted = TrustedKeys([key.public]) if key is not None else None
    cfg.home.mkdir(parents=True, exist_ok=True)  # the default registry lives there
    return ControlPlane.open(cfg.registry, trusted, home=cfg.home)


@contextmanager
def fleet_link(cfg: WorkstationConfig, control: Any, key: SigningKey, fleet: str) -> Iterator[Any]:
    """The fleet as the broker shows it (:class:`edgekit.fleet.push.FleetLink`): connected as
    the operator, the devices' retained states collected (``link.devices()``); closed after."""
    from edgekit.fleet.push import FleetLink

    client = _connect(cfg)
    try:
        link = FleetLink(client, fleet, key, control)
        link.discover()
        yield link
    finally:
        client.close()


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


def _judge(outcome: dict[str, Any], timeout: float, waiting: list[str], json_out: bool) -> None:
    """Print the outcome of a driven rollout; RolloutError (one line) unless it is done everywhere."""
    if json_out:
        print_json(outcome)
    fleet, label, phase = outcome["fleet"], outcome["bundle"], outcome["phase"]
    if phase == "aborted":
        raise RolloutError(
            f"rollout of {label} to fleet {fleet} aborted: {outcome['reason']}; "
            "the canaries were sent back to the previous bundle"
        )
    if phase != "done":
        raise RolloutError(
            f"timed out in phase {phase} ({timeout:g} s after its own time was up); still waiting for "
            f"{', '.join(waiting) or 'no device'}; `edgekit rollout resume --fleet {fleet}` goes on"
        )
    if outcome["failed"]:
        named = ", ".join(f"{d} ({why})" for d, why in sorted(outcome["failed"].items()))
        raise RolloutError(
            f"{label} reached fleet {fleet} but {len(outcome['failed'])} device(s) failed: {named}"
        )
    if not json_out:
        console.print(f"[green]done[/]: every device of fleet {fleet} serves {label}")


def _drive(link: Any, rollout: Any, labels: dict[str, str], timeout: float, json_out: bool) -> Any:
    """Run the rollout to its end with a live view on a terminal; raise RolloutError if it failed."""
    from edgekit.fleet.api import outcome_json
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
            labels,
            timeout=timeout,
            on_change=(lambda r, lk: live.update(_device_table(lk, r))) if live is not None else None,
        )
    finally:
        if live is not None:
            live.stop()
    waiting = [d for d in link.devices() if link.states[d].bundle_id != rollout.bundle_id]
    _judge(outcome_json(rollout, link), timeout, waiting, json_out)
    return rollout


def _follow(server: ServerClient, fleet: str, timeout: float, json_out: bool) -> None:
    """``--wait`` through a fleet service: its rollout controller drives; watch until the end."""
    doc = server.request("GET", f"api/v1/fleets/{fleet}/rollout")
    phase, deadline = doc["phase"], time.monotonic() + timeout + _own_time(doc)
    with console.status(f"{doc['bundle']} → fleet {fleet}: {doc['phase']}", spinner="dots") as status:
        while doc["phase"] not in ("done", "aborted") and time.monotonic() < deadline:
            time.sleep(1.0)  # polling a remote API: no event reaches us from the service
            doc = server.request("GET", f"api/v1/fleets/{fleet}/rollout")
            if doc["phase"] != phase:  # --timeout is per phase: a new phase, a new deadline
                phase, deadline = doc["phase"], time.monotonic() + timeout + _own_time(doc)
            status.update(f"{doc['bundle']} → fleet {fleet}: {doc['phase']}")
    _judge(doc, timeout, [], json_out)


def _own_time(doc: dict[str, Any]) -> float:
    """The seconds a remote rollout's phase lasts by itself (the shadow phase, the soak), which
    ``--timeout`` comes on top of (edgekit.fleet.rollout.phase_deadline, for a local drive)."""
    if doc["phase"] == "shadow":
        return float(doc.get("shadow_first_s") or 0.0)
    if doc["phase"] == "soak":
        return float(doc.get("soak_s") or 0.0)
    return 0.0


def _started_remotely(
    server: ServerClient, started: dict[str, Any], said: str, wait: bool, timeout: float, json_out: bool
) -> None:
    """After the service started a rollout: say so, and with ``wait`` follow it to the end."""
    if not json_out:
        console.print(said)
    if wait and started["devices"]:
        _follow(server, started["fleet"], timeout, json_out)
    elif json_out:
        print_json(started)


def _clear_superseded(link: Any, catalog: Any) -> None:
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
            link.clear_bundle(entry["id"], len(found.manifest.chunks.sha256))
        link.record.history.remove(entry)
    link.control.save_record(link.record)


def _push_through(
    server: ServerClient,
    target: str,
    fleet: str,
    query: dict[str, Any],
    name: Optional[str],
    version: Optional[str],
    endpoint: str = "push",
) -> dict[str, Any]:
    """Upload (or name) what to push to the fleet service; it starts the rollout (``endpoint``
    ``shadow``: the shadow evaluation)."""
    path = Path(target)
    if path.suffix == ".ekb" and path.is_file():
        kind, body = "bundle", path.read_bytes()
    elif (path.suffix == ".tflite" and path.is_file()) or path.suffix in KEYS_FORMATS or path.is_dir():
        if not path.exists():
            raise ModelFormatError(f"model file {path} does not exist")
        name = name or _bundle_name(path.stem if path.is_file() else path.name)
        if path.suffix == ".tflite":
            body = path.read_bytes()
        else:
            from edgekit.converters import ConvertOptions, convert  # needs edgekit[convert]

            with tempfile.TemporaryDirectory() as tmp:
                model = Path(tmp) / f"{name}.tflite"
                convert(ConvertOptions(model=path, output=model))
                body = model.read_bytes()
        kind = "tflite"  # the service bundles and signs it
    elif path.exists():
        raise ModelFormatError(
            f"cannot push {path}: give a .ekb bundle, a .tflite model, a Keras model (.keras, .h5, "
            "a SavedModel folder) or the name of a bundle in the catalog"
        )
    else:
        kind, body, name = "catalog", b"", target
    doc: dict[str, Any] = server.request(
        "POST",
        f"api/v1/fleets/{fleet}/{endpoint}",
        query={**query, "kind": kind, "name": name, "version": version},
        body=body,
    )
    return doc


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
        600.0,
        "--timeout",
        min=1,
        help="Seconds to wait for installs, per phase (after a phase's own time: --shadow-first, --soak).",
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
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    server: Optional[str] = typer.Option(None, "--server", help=SERVER_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
    shadow: bool = typer.Option(
        False,
        "--shadow",
        help="Do not switch: devices try it beside the serving model on live inputs (docs/shadow.md).",
    ),
    sample: float = typer.Option(
        0.1, "--sample", min=0.0001, max=1.0, help="With --shadow: the share of live inputs compared."
    ),
    duration: str = typer.Option(
        "30m", "--for", help="With --shadow: how long devices keep trying it (90s, 30m, 2h, 1d)."
    ),
    shadow_count: Optional[int] = typer.Option(
        None,
        "--devices",
        min=1,
        help="With --shadow: only N devices try it (online ones first, by name, like canaries).",
    ),
    shadow_names: Optional[list[str]] = typer.Option(
        None, "--device", help="With --shadow: only this device tries it (repeat for several)."
    ),
    shadow_first: Optional[str] = typer.Option(
        None,
        "--shadow-first",
        help="With --canary N: the canaries first try it in the shadow this long (15m); the "
        "rollout goes on only if their figures pass, else it aborts.",
    ),
    min_agreement: float = typer.Option(
        0.98, "--min-agreement", min=0, max=1, help="With --shadow-first: each canary's top-1 agreement."
    ),
    max_latency_ratio: float = typer.Option(
        1.2,
        "--max-latency-ratio",
        min=0,
        help="With --shadow-first: at most this candidate p95 / serving p95 on each canary.",
    ),
    max_error: Optional[float] = typer.Option(
        None,
        "--max-error",
        min=0,
        help="With --shadow-first: largest absolute output difference allowed on each canary "
        "(dequantized); needed for outputs that are not classes.",
    ),
) -> None:
    """Ship a model to a fleet: publish the signed bundle, tell the devices, follow them.
    With --shadow: devices only try it beside the model they serve (`edgekit shadow status`).
    With --canary N --shadow-first 15m: the canaries try it in the shadow before installing it."""
    _check_shadow_options(
        shadow, canary, wait, sample, duration, shadow_count, shadow_names, shadow_first,
        min_agreement, max_latency_ratio, max_error,
    )  # fmt: skip
    if shadow:
        _push_shadow(
            target, fleet, sample, duration, name, version, key_name, broker, registry, server, json_out,
            shadow_count, shadow_names or [],
        )  # fmt: skip
        return
    from edgekit.fleet.actions import pushing
    from edgekit.fleet.api import outcome_json
    from edgekit.fleet.rollout import RolloutPolicy

    policy = RolloutPolicy(
        canary=canary,
        soak_s=soak,
        install_timeout_s=timeout,
        max_error_rate=max_error_rate,
        max_p95_regression=max_p95_regression,
        abort_on_drift=not ignore_drift,
        **_shadow_phase(shadow_first, sample, min_agreement, max_latency_ratio, max_error),
    )
    remote = server_client(server)
    if remote is not None:
        query = {
            **_shadow_phase(shadow_first, sample, min_agreement, max_latency_ratio, max_error),
            "canary": canary,
            "soak": soak,
            "timeout": timeout,
            "max_error_rate": max_error_rate,
            "max_p95_regression": max_p95_regression,
            "ignore_drift": str(ignore_drift).lower(),
        }
        started = _push_through(remote, target, fleet, query, name, version)
        said = f"{remote.url} started {started['bundle']} → fleet {fleet} ({started['phase']})"
        _started_remotely(remote, started, said, wait, timeout, json_out)
        return
    cfg = WorkstationConfig.load(broker=broker, registry=registry)
    key = signing_key(key_name)
    with open_control(cfg, key) as control:
        bundle = resolve_target(target, control.catalog, key, version, name)
        with fleet_link(cfg, control, key, fleet) as link:
            devices = link.devices()
            total = bundle.manifest.chunks.total_size
            holder = "edgekit push --wait" if wait else "edgekit push"
            with ExitStack() as held:  # the fleet's driving lock, from the start to the end of the drive
                with Progress(
                    TextColumn("publishing {task.description}"),
                    BarColumn(),
                    DownloadColumn(),
                    TransferSpeedColumn(),
                    console=console,
                    disable=not console.is_terminal or json_out,
                ) as bar:
                    task = bar.add_task(bundle.manifest.label, total=total)
                    rollout, labels = held.enter_context(
                        pushing(
                            control,
                            link,
                            bundle,
                            policy,
                            holder,
                            lambda sent, _: bar.update(task, completed=sent),
                        )
                    )
                if not json_out:
                    console.print(
                        f"published {bundle.manifest.label} (id {bundle.bundle_id[:16]}) to fleet {fleet}: "
                        f"{len(devices)} device(s) known"
                        + (f", {len(rollout.canaries)} canary" if canary else "")
                    )
                if wait and devices:
                    _drive(link, rollout, labels, timeout, json_out)
                    _clear_superseded(link, control.catalog)
                elif json_out:
                    print_json(outcome_json(rollout, link))
                elif not devices:
                    console.print(
                        f"no device of fleet {fleet} has reported yet; devices that join later fetch "
                        f"{bundle.manifest.label} from the broker"
                    )
                elif rollout.phase == "shadow":
                    console.print(
                        f"the canaries ({', '.join(rollout.canaries)}) try it in the shadow of the bundle "
                        f"they serve first; the rollout controller of `edgekit fleet up` (or `edgekit "
                        f"rollout resume --fleet {fleet}`) judges their figures and goes on or aborts"
                    )
                elif rollout.canaries:
                    console.print(
                        f"the canaries install it now; `edgekit rollout resume --fleet {fleet}` (or the "
                        "rollout controller of `edgekit fleet up`) takes the rollout on to the fleet"
                    )


def _check_shadow_options(
    shadow: bool,
    canary: int,
    wait: bool,
    sample: float,
    duration: str,
    count: Optional[int],
    names: Optional[list[str]],
    shadow_first: Optional[str],
    min_agreement: float,
    max_latency_ratio: float,
    max_error: Optional[float] = None,
) -> None:
    """Which shadow options go together (typer.BadParameter: one line naming the fix)."""
    if not shadow and duration != "30m":
        raise typer.BadParameter("--for goes with --shadow")
    if not shadow and shadow_first is None and sample != 0.1:
        raise typer.BadParameter("--sample and --for go with --shadow (--sample also with --shadow-first)")
    if shadow and (canary or wait or shadow_first is not None):
        raise typer.BadParameter(
            "--shadow switches nothing: it takes no --canary, --wait or --shadow-first "
            "(for a rollout with a shadow phase: --canary N --shadow-first 15m, without --shadow)"
        )
    if (count is not None or names) and not shadow:
        raise typer.BadParameter("--devices and --device go with --shadow (a rollout's canaries: --canary N)")
    if count is not None and names:
        raise typer.BadParameter("give --devices N or --device D (repeatable), not both")
    if shadow_first is not None and not canary:
        raise typer.BadParameter("--shadow-first needs --canary N: the canaries try it in the shadow first")
    if shadow_first is None and (min_agreement != 0.98 or max_latency_ratio != 1.2 or max_error is not None):
        raise typer.BadParameter(
            "--min-agreement, --max-latency-ratio and --max-error go with --shadow-first "
            "(or `edgekit shadow promote`)"
        )


def _shadow_phase(
    shadow_first: Optional[str],
    sample: float,
    min_agreement: float,
    max_latency_ratio: float,
    max_error: Optional[float] = None,
) -> dict[str, Any]:
    """The rollout policy's shadow-phase fields for ``--shadow-first`` (none without it)."""
    if shadow_first is None:
        return {}
    from .shadow import parse_duration

    return {
        "shadow_s": parse_duration(shadow_first),
        "shadow_sample": sample,
        "min_agreement": min_agreement,
        "max_latency_ratio": max_latency_ratio,
        "max_error": max_error,
    }


def _push_shadow(
    target: str,
    fleet: str,
    sample: float,
    duration: str,
    name: Optional[str],
    version: Optional[str],
    key_name: str,
    broker: Optional[str],
    registry: Optional[str],
    server: Optional[str],
    json_out: bool,
    count: Optional[int] = None,
    names: Optional[list[str]] = None,
) -> None:
    """``push --shadow``: the candidate's chunks and a desired state asking devices (all, or
    ``count`` of them, or those ``names``) to try it (edgekit.fleet.actions.start_shadow)."""
    from edgekit.fleet.actions import shadow_devices, start_shadow

    from .shadow import parse_duration

    seconds = parse_duration(duration)
    remote = server_client(server)
    if remote is not None:  # the service bundles, signs and asks the fleet
        query = {
            "sample": sample,
            "seconds": seconds,
            "devices": count,
            "device": ",".join(names) if names else None,  # device ids have no commas
        }
        doc = _push_through(remote, target, fleet, query, name, version, "shadow")
    else:
        from edgekit.fleet.api import shadow_started_json

        cfg = WorkstationConfig.load(broker=broker, registry=registry)
        key = signing_key(key_name)
        with open_control(cfg, key) as control, fleet_link(cfg, control, key, fleet) as link:
            devices = link.devices()
            asked = shadow_devices(link, count, names or ())  # before anything is catalogued or sent
            bundle = resolve_target(target, control.catalog, key, version, name)
            seq = start_shadow(control, link, bundle, sample, seconds, "edgekit push --shadow", asked)
            doc = shadow_started_json(link, bundle, sample, seconds, seq, len(devices), asked)
    if json_out:
        print_json(doc)
        return
    asked = doc.get("asked")
    who = (
        f"fleet {fleet} ({doc['devices']} device(s) known) tries"
        if asked is None
        else f"{', '.join(asked)} of fleet {fleet} (of {doc['devices']} known) try"
    )
    console.print(
        f"{who} {doc['candidate']} beside {doc['serving']} "
        f"on {sample:.0%} of live inputs for {duration}; nothing is switched. "
        f"Follow it with `edgekit shadow status --fleet {fleet}`"
    )


def _print_rollout(doc: dict[str, Any]) -> None:
    console.print(
        f"{doc['bundle']} → fleet {doc['fleet']}: [bold]{doc['phase']}[/]"
        + (f" ({doc['reason']})" if doc["reason"] else "")
    )
    console.print(f"started by {doc['started_by']} at {doc['started_at'][:16].replace('T', ' ')} UTC")
    console.print(f"canaries: {', '.join(doc['canaries']) or '-'}; devices: {len(doc['devices'])}")
    if doc.get("shadow_first_s"):
        console.print(
            f"shadow phase: the canaries try it beside the bundle they serve for {doc['shadow_first_s']:g} s "
            "first; it goes on only if their shadow figures pass"
        )
    for device, why in sorted(doc["failed"].items()):
        console.print(f"  failed: {device}: {why}")


@rollout_app.command("status")
def rollout_status(
    fleet: str = typer.Option(..., "--fleet", help="Whose rollout."),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    server: Optional[str] = typer.Option(None, "--server", help=SERVER_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the saved rollout as JSON."),
) -> None:
    """Show the fleet's current rollout as saved (no broker needed)."""
    from edgekit.fleet.api import rollout_json

    remote = server_client(server)
    if remote is not None:
        doc = remote.request("GET", f"api/v1/fleets/{fleet}/rollout")
    else:
        with open_control(WorkstationConfig.load(registry=registry), None) as control:
            doc = rollout_json(control, fleet)
    if json_out:
        print_json(doc)
    else:
        _print_rollout(doc)


@rollout_app.command("resume")
def rollout_resume(
    fleet: str = typer.Option(..., "--fleet", help="Whose rollout."),
    timeout: float = typer.Option(600.0, "--timeout", min=1, help="Seconds to wait before giving up."),
    key_name: str = typer.Option("default", "--key-name", help="Signing key under $EDGEKIT_HOME/keys."),
    broker: Optional[str] = typer.Option(None, "--broker", help=BROKER_HELP),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    server: Optional[str] = typer.Option(None, "--server", help=SERVER_HELP),
    json_out: bool = typer.Option(
        False,
        "--json",
        help="Print the outcome as JSON (a rollout already over: as `rollout status --json`).",
    ),
) -> None:
    """Drive a saved rollout on to its end (after `push` without --wait, a crash or a sleep).
    With --server the service's rollout controller drives it; this follows it to the end."""
    from edgekit.fleet.actions import resuming
    from edgekit.fleet.push import FleetLink, labels_of

    remote = server_client(server)
    if remote is not None:
        _follow(remote, fleet, timeout, json_out)
        return
    cfg = WorkstationConfig.load(broker=broker, registry=registry)
    key = signing_key(key_name)
    with open_control(cfg, key) as control:
        rollout = control.rollout(fleet)
        if rollout.finished:
            if json_out:  # nothing to drive: what `rollout status --json` says
                from edgekit.fleet.api import rollout_json

                print_json(rollout_json(control, fleet))
            else:
                console.print(f"the rollout of {rollout.label} is already {rollout.phase}")
            return
        client = _connect(cfg)
        try:
            link = FleetLink(client, fleet, key, control)
            link.discover()
            # The dashboard's "Resume now" (one step, audited), then on to the end under its lock.
            with resuming(control, link, "edgekit rollout resume") as rollout:
                _drive(link, rollout, labels_of(rollout, link.record), timeout, json_out)
        finally:
            client.close()


@rollout_app.command("abort")
def rollout_abort(
    fleet: str = typer.Option(..., "--fleet", help="Whose rollout."),
    key_name: str = typer.Option("default", "--key-name", help="Signing key under $EDGEKIT_HOME/keys."),
    broker: Optional[str] = typer.Option(None, "--broker", help=BROKER_HELP),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    server: Optional[str] = typer.Option(None, "--server", help=SERVER_HELP),
    json_out: bool = typer.Option(
        False,
        "--json",
        help="Print the outcome as JSON (as `push --json`: phase, reason, each device's state).",
    ),
) -> None:
    """Stop a rollout and send the devices it reached back to the previous bundle."""
    from edgekit.fleet.actions import abort_rollout
    from edgekit.fleet.api import outcome_json
    from edgekit.fleet.push import FleetLink

    remote = server_client(server)
    if remote is not None:
        doc = remote.request("POST", f"api/v1/fleets/{fleet}/abort")
    else:
        cfg = WorkstationConfig.load(broker=broker, registry=registry)
        key = signing_key(key_name)
        with open_control(cfg, key) as control:
            control.rollout(fleet)  # a missing or corrupt one is reported before connecting
            client = _connect(cfg)
            try:
                link = FleetLink(client, fleet, key, control)
                doc = outcome_json(abort_rollout(control, link, "edgekit rollout abort"), link)
            finally:
                client.close()
    if json_out:
        print_json(doc)
    else:
        console.print(f"rollout of {doc['bundle']} to fleet {fleet}: {doc['phase']}")


def rollback(
    fleet: str = typer.Option(..., "--fleet", help="The fleet to roll back."),
    to: Optional[str] = typer.Option(
        None, "--to", help="VERSION (of the current bundle's name) or NAME@VERSION (default: the one before)."
    ),
    device: Optional[str] = typer.Option(
        None, "--device", help="Only this device (a desired state for it alone, until the next push)."
    ),
    wait: bool = typer.Option(False, "--wait", help="Wait until every device serves it."),
    timeout: float = typer.Option(600.0, "--timeout", min=1, help="Seconds to wait with --wait."),
    key_name: str = typer.Option("default", "--key-name", help="Signing key under $EDGEKIT_HOME/keys."),
    broker: Optional[str] = typer.Option(None, "--broker", help=BROKER_HELP),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    server: Optional[str] = typer.Option(None, "--server", help=SERVER_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
) -> None:
    """Send the whole fleet (or one --device) back to an earlier bundle (a new, higher-numbered
    desired state)."""
    from edgekit.fleet.actions import previous_bundle, rolling_back
    from edgekit.fleet.api import outcome_json

    if device is not None:
        _rollback_device(fleet, device, to, key_name, broker, registry, server, json_out)
        return
    remote = server_client(server)
    if remote is not None:
        doc = remote.request("POST", f"api/v1/fleets/{fleet}/rollback", query={"to": to, "timeout": timeout})
        _started_remotely(
            remote, doc, f"fleet {fleet} told to go back to {doc['bundle']}", wait, timeout, json_out
        )
        return
    cfg = WorkstationConfig.load(broker=broker, registry=registry)
    key = signing_key(key_name)
    with open_control(cfg, key) as control:
        bundle = previous_bundle(control, fleet, to)
        with fleet_link(cfg, control, key, fleet) as link:
            devices = link.devices()
            with rolling_back(control, link, bundle, timeout, "edgekit fleet rollback") as (rollout, labels):
                if not json_out:
                    console.print(f"fleet {fleet} told to go back to {bundle.manifest.label}")
                if wait and devices:
                    _drive(link, rollout, labels, timeout, json_out)
                elif json_out:
                    print_json(outcome_json(rollout, link))


def _rollback_device(
    fleet: str,
    device: str,
    to: Optional[str],
    key_name: str,
    broker: Optional[str],
    registry: Optional[str],
    server: Optional[str],
    json_out: bool,
) -> None:
    """``fleet rollback --device``: one device back (edgekit.fleet.actions.rollback_device)."""
    from edgekit.fleet.actions import previous_bundle, rollback_device

    remote = server_client(server)
    if remote is not None:
        doc = remote.request("POST", f"api/v1/fleets/{fleet}/rollback", query={"to": to, "device": device})
    else:
        cfg = WorkstationConfig.load(broker=broker, registry=registry)
        key = signing_key(key_name)
        with open_control(cfg, key) as control:
            bundle = previous_bundle(control, fleet, to)
            with fleet_link(cfg, control, key, fleet) as link:
                seq = rollback_device(control, link, device, bundle, "edgekit fleet rollback --device")
        doc = {"fleet": fleet, "device": device, "bundle": bundle.manifest.label, "seq": seq}
    if json_out:
        print_json(doc)
    else:
        console.print(f"device {device} of fleet {fleet} told to go back to {doc['bundle']}")
