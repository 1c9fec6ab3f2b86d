"""``edgekit shadow``: what the fleet's devices measured of a candidate tried in the shadow of
the serving model (``edgekit push CANDIDATE --shadow``), and stopping it. docs/shadow.md."""

from __future__ import annotations

import re
from typing import Any, Optional

import typer
from rich.table import Table

from ..config import WorkstationConfig
from ..errors import PromotionRefusedError
from ._app import console, new_app, print_json, signing_key
from .push import BROKER_HELP, REGISTRY_HELP, fleet_link, open_control
from .server import SERVER_HELP, server_client

app = new_app("Try a candidate beside the serving model on live inputs: status, promote, stop.")

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``1d`` in seconds, at most 365 days; typer.BadParameter otherwise."""
    from edgekit.desired import LONGEST_S

    match = _DURATION.match(text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 30m, 2h or 1d")
    seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if seconds > LONGEST_S:
        raise typer.BadParameter(f"{text!r} is too long: give at most {LONGEST_S // 86400}d")
    return seconds


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _latency(figures: dict[str, Any], model: str) -> str:
    """``model``'s (``serving`` or ``candidate``) p50 / p95 latency: ``1.0 / 2.1 ms``."""
    p50, p95 = figures.get(f"{model}_p50_ms"), figures.get(f"{model}_p95_ms")  # p50: not from an older server
    if p50 is None and p95 is None:
        return "-"
    return " / ".join("-" if v is None else _ms(v) for v in (p50, p95)) + " ms"


def _ms(value: float) -> str:
    """Milliseconds, with three decimals below 1 ms (a tiny model's 0.004 ms is not 0.0)."""
    return f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def _mib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / (1024 * 1024):.1f} MiB"


def _agreement(figures: dict[str, Any]) -> str:
    if figures["agreement"] is None:
        return "-"
    return (
        f"{_percent(figures['agreement'])} "
        f"({_percent(figures['agreement_low'])}-{_percent(figures['agreement_high'])})"
    )


@app.command("status")
def status(
    fleet: str = typer.Option(..., "--fleet", help="Whose shadow evaluation."),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    server: Optional[str] = typer.Option(None, "--server", help=SERVER_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Per device and in total: inputs compared and dropped, top-1 agreement with its 95%
    confidence interval (Wilson), output error, p50 and p95 latency of the candidate against
    the serving model on the same inputs, and whether the candidate failed."""
    from edgekit.fleet.api import shadow_json
    from edgekit.fleet.registry import Registry

    remote = server_client(server)
    if remote is not None:
        summary: dict[str, Any] = remote.request("GET", f"api/v1/fleets/{fleet}/shadow")
    else:
        reg = Registry(WorkstationConfig.load(registry=registry).registry)
        try:
            summary = shadow_json(reg, fleet)
        finally:
            reg.close()
    if json_out:
        print_json(summary)
        return
    if summary["candidate"] is None:
        console.print(
            f"No device of fleet {fleet} has reported a shadow evaluation yet. Start one with "
            f"`edgekit push CANDIDATE --fleet {fleet} --shadow`; devices report every telemetry window."
        )
        return
    table = Table(
        "device",
        "state",
        "compared",
        "dropped",
        "agreement (95% CI)",
        "max error",
        "serving p50 / p95",
        "candidate p50 / p95",
        "peak memory",
        "candidate on these inputs",
        title=f"{summary['candidate']} in the shadow of fleet {fleet}",
    )
    for d in summary["devices"]:
        state = d["state"] if d["state"] != "failed" else "[bold red]failed[/]"
        table.add_row(
            d["device"],
            state,
            str(d["compared"]),
            str(d["dropped"]),
            _agreement(d),
            "-" if d["abs_error_max"] is None else f"{d['abs_error_max']:.4g}",
            _latency(d, "serving"),
            _latency(d, "candidate"),
            _mib(d["peak_memory_bytes"]),
            d["severity"] or "not judged yet",
        )
    total = summary["total"]
    table.add_row(
        "[bold]total[/]",
        "",
        str(total["compared"]),
        str(total["dropped"]),
        _agreement(total),
        "-" if total["abs_error_max"] is None else f"{total['abs_error_max']:.4g}",
        _latency(total, "serving"),
        _latency(total, "candidate"),
        _mib(total["peak_memory_bytes"]),
        "",
    )
    console.print(table)
    for d in summary["devices"]:
        if d["error"]:
            console.print(f"[bold red]{d['device']}[/]: {d['error']}")


@app.command("stop")
def stop(
    fleet: str = typer.Option(..., "--fleet", help="Whose shadow evaluation."),
    key_name: str = typer.Option("default", "--key-name", help="Signing key under $EDGEKIT_HOME/keys."),
    broker: Optional[str] = typer.Option(None, "--broker", help=BROKER_HELP),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    server: Optional[str] = typer.Option(None, "--server", help=SERVER_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
) -> None:
    """End the fleet's shadow evaluation: devices unload the candidate (a new desired state
    naming the served bundle, without a shadow section); their last figures stay readable."""
    from edgekit.fleet.actions import stop_shadow

    remote = server_client(server)
    if remote is not None:
        seq = int(remote.request("POST", f"api/v1/fleets/{fleet}/shadow/stop")["seq"])
    else:
        cfg = WorkstationConfig.load(broker=broker, registry=registry)
        key = signing_key(key_name)
        with open_control(cfg, key) as control, fleet_link(cfg, control, key, fleet) as link:
            seq = stop_shadow(control, link, "edgekit shadow stop")
    if json_out:
        print_json({"fleet": fleet, "seq": seq, "shadow": None})
    else:
        console.print(f"fleet {fleet} told to stop its shadow evaluation (desired state seq {seq})")


@app.command("promote")
def promote(
    fleet: str = typer.Option(..., "--fleet", help="Whose candidate."),
    min_agreement: float = typer.Option(
        0.98, "--min-agreement", min=0, max=1, help="Every device's top-1 agreement must reach this."
    ),
    max_latency_ratio: float = typer.Option(
        1.2,
        "--max-latency-ratio",
        min=0,
        help="Candidate p95 / serving p95 on each device must not exceed this.",
    ),
    canary: int = typer.Option(
        0, "--canary", min=0, help="Roll out to N devices first, soak, then the rest."
    ),
    max_error: Optional[float] = typer.Option(
        None,
        "--max-error",
        min=0,
        help="Largest absolute output difference allowed (dequantized); needed for outputs that are not classes.",
    ),
    key_name: str = typer.Option("default", "--key-name", help="Signing key under $EDGEKIT_HOME/keys."),
    broker: Optional[str] = typer.Option(None, "--broker", help=BROKER_HELP),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    server: Optional[str] = typer.Option(None, "--server", help=SERVER_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the verdict (and the rollout) as JSON."),
) -> None:
    """Start a normal rollout of the candidate only when every device's figures pass; else say
    which failed on which devices and exit non-zero (nothing is published)."""
    from edgekit.fleet.actions import promote_shadow, shadow_verdict

    remote = server_client(server)
    try:
        if remote is not None:
            query = {
                "min_agreement": min_agreement,
                "max_latency_ratio": max_latency_ratio,
                "canary": canary,
                "max_error": max_error,
            }
            done: dict[str, Any] = remote.request(
                "POST", f"api/v1/fleets/{fleet}/shadow/promote", query=query
            )
        else:
            cfg = WorkstationConfig.load(broker=broker, registry=registry)
            with open_control(cfg, None) as judging:  # no key, no broker: a refusal publishes nothing
                verdict = shadow_verdict(judging, fleet, min_agreement, max_latency_ratio, max_error)
            key = signing_key(key_name)
            with open_control(cfg, key) as control, fleet_link(cfg, control, key, fleet) as link:
                done = promote_shadow(control, link, verdict, canary, "edgekit shadow promote")
    except PromotionRefusedError as refused:
        if json_out:
            print_json(refused.verdict)
        raise
    if json_out:
        print_json(done)
    else:
        console.print(
            f"{done['candidate']} passed on every device (agreement >= {min_agreement:.1%}, p95 <= "
            f"{max_latency_ratio:.2f}x"
            + ("" if max_error is None else f", outputs within {max_error:.4g}")
            + f"): rollout to fleet {fleet} started ({done['rollout']['phase']}); "
            f"follow it with `edgekit rollout status --fleet {fleet}`"
        )
