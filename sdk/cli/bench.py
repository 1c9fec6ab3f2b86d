"""``edgekit bench``: measure candidate models on the fleet's own boards before choosing one,
and ``edgekit bench results``: the side-by-side table by board class. docs/bench.md."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any, Optional

import click
import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from ..bench import DEFAULT_RUNS, MAX_CANDIDATES, MAX_RUNS, BenchReport, parse_threads
from ..config import WorkstationConfig
from ..errors import BenchError, MessageError
from ._app import console, err_console, print_json, signing_key
from .push import BROKER_HELP, REGISTRY_HELP, fleet_link, open_control, resolve_target


class _RunByDefault(TyperGroup):
    """``edgekit bench MODEL ...`` is ``edgekit bench run MODEL ...``; ``results`` is its own command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_RunByDefault,
    help=(
        "Measure models on the fleet's own boards: latency, throughput per thread count, load "
        "time, memory, temperature, and whether their answers match the workstation's. "
        "`edgekit bench MODEL ... --fleet F` is `edgekit bench run`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command("run")
def run(
    candidates: list[str] = typer.Argument(
        ...,
        help=f"Models to measure, each in turn (at most {MAX_CANDIDATES}): bundles (.ekb, or a name "
        "in the catalog), .tflite or Keras models (bundled with defaults, signed with your key).",
        show_default=False,
    ),
    fleet: str = typer.Option(..., "--fleet", help="Whose devices measure."),
    devices: Optional[int] = typer.Option(
        None,
        "--devices",
        help="How many devices measure (online ones first); default: every device heard from.",
    ),
    device: list[str] = typer.Option(
        [], "--device", help="A device that measures, by name; repeat for more. Not with --devices."
    ),
    threads: str = typer.Option("1", "--threads", help="Interpreter thread counts to try, like 1,2,4."),
    runs: int = typer.Option(DEFAULT_RUNS, "--runs", help=f"Timed runs per thread count (1 to {MAX_RUNS})."),
    wait: bool = typer.Option(False, "--wait", help="Wait for every device's reports and print the table."),
    timeout: float = typer.Option(600.0, "--timeout", help="With --wait: seconds to wait for the reports."),
    key_name: str = typer.Option("default", "--key-name", help="Signing key under $EDGEKIT_HOME/keys."),
    broker: Optional[str] = typer.Option(None, "--broker", help=BROKER_HELP),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    json_out: bool = typer.Option(
        False, "--json", help="Print what was asked (and with --wait, the results) as JSON."
    ),
) -> None:
    """Ask devices to measure each candidate at quiet moments, beside the model they serve (which
    keeps priority and is never replaced). Each device also runs the bundle's health-check
    inputs and says whether its answers match the workstation's. Results arrive in the registry
    (`edgekit bench results`); `--wait` prints them here as they come."""
    from edgekit.fleet.bench import choose_devices, row_of_report, start_bench, summarize, too_many_candidates

    if len(candidates) > MAX_CANDIDATES:  # before bundling and publishing any of them
        raise BenchError(too_many_candidates(len(candidates)))
    counts = parse_threads(threads)
    if not 1 <= runs <= MAX_RUNS:
        raise BenchError(f"--runs {runs}: give a number of timed runs from 1 to {MAX_RUNS}")
    if devices is not None and device:
        raise BenchError("give --devices N or --device NAME, not both")
    cfg = WorkstationConfig.load(broker=broker, registry=registry)
    key = signing_key(key_name)
    with open_control(cfg, key) as control:
        bundles = [resolve_target(target, control.catalog, key, None) for target in candidates]
        with fleet_link(cfg, control, key, fleet) as link:
            chosen = choose_devices(link, device, devices)
            heard = _Reports(link.client, link.topics.all_devices_filter("bench")) if wait else None
            seq = start_bench(control, link, bundles, chosen, threads=counts, runs=runs)
            labels = [b.manifest.label for b in bundles]
            asked: dict[str, Any] = {
                "fleet": fleet,
                "bench_seq": seq,
                "devices": chosen,
                "candidates": labels,
                "threads": list(counts),
                "runs": runs,
            }
            if not json_out:
                console.print(
                    f"asked {len(chosen)} device(s) of fleet {fleet} ({', '.join(chosen)}) to measure "
                    f"{', '.join(labels)} (benchmark {seq}); they run it between requests"
                )
            if heard is None:
                if json_out:
                    print_json(asked)
                else:
                    console.print(f"results as they arrive: edgekit bench results --fleet {fleet}")
                return
            reports, missing = heard.wait(fleet, seq, chosen, len(bundles), timeout)
    summary = summarize([row_of_report(r) for r in reports])
    if json_out:
        print_json({**asked, **summary, "missing": missing})
    else:
        print_summary(fleet, summary)
    if missing:
        raise BenchError(
            f"no report from {', '.join(missing)} within {timeout:g} s; they run the benchmark when "
            f"they are online and idle: see `edgekit bench results --fleet {fleet}` later"
        )


class _Reports:
    """Bench reports heard on the broker (a plain subscription: ingest still gets its copy)."""

    def __init__(self, client: Any, topic_filter: str) -> None:
        self._reports: list[BenchReport] = []
        self._changed = threading.Condition()
        client.subscribe(topic_filter, self._on_report, qos=1, timeout=10)

    def _on_report(self, message: Any) -> None:
        try:
            report = BenchReport.from_json(message.payload)
        except MessageError as exc:
            err_console.print(
                escape(f"ignored a malformed bench report on {message.topic}: {exc}"), highlight=False
            )
            return
        with self._changed:
            self._reports.append(report)
            self._changed.notify_all()

    def wait(
        self, fleet: str, seq: int, devices: Sequence[str], candidates: int, timeout: float
    ) -> tuple[list[BenchReport], list[str]]:
        """The reports of ``fleet``'s benchmark ``seq`` from ``devices`` once every device sent one per candidate (or at
        ``timeout``), and the devices still missing."""
        deadline = time.monotonic() + timeout

        chosen = set(devices)

        def mine() -> list[BenchReport]:
            # Only the chosen devices' reports for this fleet's benchmark: a device of another
            # fleet with the same bench seq, or one not asked, is not part of this table.
            return [
                r for r in self._reports if r.bench_seq == seq and r.fleet == fleet and r.device in chosen
            ]

        def missing() -> list[str]:
            got: dict[str, set[str]] = {}
            for r in mine():
                got.setdefault(r.device, set()).add(r.candidate["bundle_id"])
            return [d for d in devices if len(got.get(d, ())) < candidates]

        with self._changed:
            while missing() and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())
            ours = {(r.device, r.candidate["bundle_id"]): r for r in mine()}
            return list(ours.values()), missing()


@app.command("results")
def results(
    fleet: str = typer.Option(..., "--fleet", help="Whose benchmark."),
    bench: Optional[int] = typer.Option(
        None, "--bench", help="Which benchmark (its number); default: the newest."
    ),
    registry: Optional[str] = typer.Option(None, "--registry", help=REGISTRY_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """The side-by-side table by board class: for each candidate, latency (p50/p95/p99), runs
    per second for each thread count, load time, peak memory, temperature, and whether its
    answers matched the workstation's on every device."""
    from edgekit.fleet.bench import row_of_result, summarize
    from edgekit.fleet.registry import Registry

    reg = Registry(WorkstationConfig.load(registry=registry).registry)
    try:
        summary = summarize([row_of_result(r) for r in reg.bench_results(fleet, bench)])
    finally:
        reg.close()
    if json_out:
        print_json({"fleet": fleet, **summary})
        return
    if not summary["classes"]:
        console.print(
            f"No device of fleet {fleet} has reported a benchmark yet. Start one with "
            f"`edgekit bench MODEL ... --fleet {fleet}`; devices report when they have measured."
        )
        return
    print_summary(fleet, summary)


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _memory(peak: Optional[float], added: Optional[float]) -> str:
    if peak is None:
        return "-"
    return f"{peak:.0f} MiB" if added is None else f"{peak:.0f} MiB (+{added:.1f} MiB)"


def print_summary(fleet: str, summary: dict[str, Any]) -> None:
    """One table per board class, a row per candidate, then what the owner must know."""
    notes = []
    for group in summary["classes"]:
        # Every string below that a device reported (board class, candidate label, device names,
        # errors) is escaped: "[/x]" in an error is text, not Rich markup.
        board = escape(group["board_class"])
        table = Table(
            "model",
            "devices",
            "answers match workstation",
            "load",
            "p50",
            "p95",
            "p99",
            "runs/s by threads",
            "peak memory (candidate added)",
            "hottest",
            title=f"benchmark {summary['bench_seq']} of fleet {escape(fleet)}: {board}",
        )
        for c in group["candidates"]:
            label = escape(c["candidate"])
            first = c["threads"][0] if c["threads"] else {}
            if c["correct"] is None:
                correct = "not checked" if not c["failed"] else "[bold red]failed[/]"
            elif c["correct"]:
                correct = f"yes ({c['health_check_agreed']}/{c['health_check_samples']})"
            else:
                correct = f"[bold red]NO ({c['health_check_agreed']}/{c['health_check_samples']})[/]"
            table.add_row(
                label,
                str(len(c["devices"])),
                correct,
                _ms(c["load_ms"]),
                _ms(first.get("p50_ms")),
                _ms(first.get("p95_ms")),
                _ms(first.get("p99_ms")),
                "  ".join(f"{t['threads']}t: {t['per_second']:.0f}/s" for t in c["threads"]) or "-",
                _memory(c["peak_rss_mb"], c["added_rss_mb"]),
                "not reported" if c["temperature_c"] is None else f"{c['temperature_c']:.0f} °C",
            )
            if c["correct"] is False:
                notes.append(
                    f"[bold red]{label} gave other answers than on the workstation on "
                    f"{escape(', '.join(c['disagreeing_devices']))} ({board}): do not roll it out "
                    "to these boards; try another quantization mode or runtime there[/]"
                )
            for failed in c["failed"]:
                notes.append(f"[bold red]{escape(failed['device'])}[/]: {escape(failed['error'] or '')}")
            forced = sum(t["forced"] for t in c["threads"])
            if forced:
                notes.append(
                    f"{forced} timed runs of {label} on {board} went ahead while the "
                    "device was busy serving (no quiet moment for 2 s): those latencies include that load"
                )
            if c["throttled_devices"]:
                notes.append(
                    f"{escape(', '.join(c['throttled_devices']))} reported CPU throttling while measuring "
                    f"{label}: its figures there are pessimistic (check cooling and power)"
                )
        console.print(table)
    console.print(
        "latency columns: the smallest thread count asked for; figures are medians of a class's devices"
    )
    for note in notes:
        console.print(note)
