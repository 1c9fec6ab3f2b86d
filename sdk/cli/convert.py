"""``edgekit convert``: a trained model to a quantized, measured, gated .tflite (and bundle).

The converter (and TensorFlow) is imported inside the command, so ``import edgekit.cli`` stays light.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..config import edgekit_home
from ..errors import AccuracyGateError, ConfigError
from ._app import console, err_console, print_json

if TYPE_CHECKING:
    from edgekit.keys import SigningKey

MODES_HELP = "fp32, fp16, dynamic, int8 or int16x8."
# Options `convert` and `distill` share.
REPORT_OPTION: Any = typer.Option(None, "--report", help="Write every figure to this JSON file.")
KEY_NAME_OPTION: Any = typer.Option(
    "default", "--key-name", help="Which signing key under $EDGEKIT_HOME/keys signs --bundle."
)
LATENCY_RUNS_OPTION: Any = typer.Option(
    100, "--latency-runs", help="Timed single-sample runs per model for latency."
)
JSON_OPTION: Any = typer.Option(False, "--json", help="Print the report as JSON on stdout.")


class _RichSteps:
    """Progress bars on stderr for the converter's slow steps (only on a terminal)."""

    def __init__(self) -> None:
        self._file = os.fdopen(os.dup(2), "w")
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            # A console of its own on a copy of stderr: the converter silences fd 2 while
            # TensorFlow runs, and the bars must keep drawing meanwhile.
            console=Console(file=self._file, force_terminal=err_console.is_terminal),
            transient=True,
        )
        self._task: Any = None

    def __enter__(self) -> _RichSteps:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
        self._file.close()

    def begin(self, description: str, total: Optional[int] = None) -> None:
        self._task = self._progress.add_task(description, total=total)

    def advance(self, amount: int = 1) -> None:
        if self._task is not None:
            self._progress.advance(self._task, amount)

    def end(self) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None


def parse_number(text: Optional[str], flag: str) -> Optional[float]:
    if text is None:
        return None
    try:
        value = float(text.rstrip("%")) / (100.0 if text.endswith("%") else 1.0)
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{flag} {text!r} is not a finite number")
    return value


def load_key(key_name: str) -> SigningKey:
    """The signing key for --bundle, asking for its passphrase on a terminal."""
    # Absolute: the key is handed to edgekit.converters, which names the class edgekit.keys.SigningKey.
    from edgekit.keys import key_needs_passphrase, load_signing_key

    home = edgekit_home()
    passphrase = None
    if key_needs_passphrase(home, key_name):
        passphrase = typer.prompt(f"Passphrase for key {key_name}", hide_input=True).encode()
    return load_signing_key(home, key_name, passphrase)


def pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def num(value: Optional[float], fmt: str = ".4g") -> str:
    return "-" if value is None else format(value, fmt)


def _print_report(doc: dict[str, Any]) -> None:
    ref, conv = doc["reference"], doc["converted"]
    table = Table(
        title=f"{doc['source']['path']} → {doc['output']['path']} ({doc['quantize']}, io {doc['io']})"
    )
    table.add_column("")
    table.add_column("float reference", justify="right")
    table.add_column(doc["quantize"], justify="right")
    table.add_column("ratio", justify="right")

    def ratio(a: Optional[float], b: Optional[float]) -> str:
        return f"{b / a:.3f}x" if a and b is not None else "-"

    table.add_row("file size (bytes)", str(ref["size"]), str(conv["size"]), ratio(ref["size"], conv["size"]))
    table.add_row(
        "gzip size (bytes)",
        str(ref["gzip_size"]),
        str(conv["gzip_size"]),
        ratio(ref["gzip_size"], conv["gzip_size"]),
    )
    table.add_row(
        "latency median (ms)",
        num(ref["latency_ms_median"], ".3f"),
        num(conv["latency_ms_median"], ".3f"),
        ratio(ref["latency_ms_median"], conv["latency_ms_median"]),
    )
    table.add_row(
        "latency p95 (ms)", num(ref["latency_ms_p95"], ".3f"), num(conv["latency_ms_p95"], ".3f"), ""
    )
    if ref["samples"]:
        table.add_row("accuracy", pct(ref["accuracy"]), pct(conv["accuracy"]), "")
        table.add_row("top-1 agreement", "", pct(conv["agreement"]), "")
        table.add_row("mean |output error|", "", num(conv["mean_abs_error"]), "")
        table.add_row("max |output error|", "", num(conv["max_abs_error"]), "")
    table.add_row("weight sparsity", pct(ref["weight_sparsity"]), pct(conv["weight_sparsity"]), "")
    console.print(table)
    console.print(f"latency measured on {doc['latency_machine']}", highlight=False)
    if doc["accuracy_drop_points"] is not None:
        console.print(f"accuracy drop: {doc['accuracy_drop_points']:.2f} points", highlight=False)
    if doc["pruning"]:
        p = doc["pruning"]
        console.print(
            f"pruning: {p['pattern']} {p['sparsity']:.1%} of {len(p['layers'])} layers' weights are zero "
            f"({p['epochs']} epochs, {p['seconds']:.1f}s); dense: {', '.join(p['dense_layers']) or 'none'}",
            highlight=False,
        )
    if doc["qat"]:
        q = doc["qat"]
        console.print(
            f"quantization-aware training: int8 accuracy {pct(q['ptq']['accuracy'])} without, "
            f"{pct(conv['accuracy'])} with ({q['epochs']} epochs, {q['seconds']:.1f}s)",
            highlight=False,
        )
    if doc["calibration_data"]:
        console.print(f"int8 ranges calibrated from {doc['calibration_data']}", highlight=False)
    if doc["worst_layers"]:
        worst = Table(title="largest int8 quantization error")
        worst.add_column("op")
        worst.add_column("tensor", overflow="fold")
        worst.add_column("rmse/scale", justify="right")
        worst.add_column("max |error|", justify="right")
        for layer in doc["worst_layers"]:
            worst.add_row(
                layer["op"],
                layer["tensor"],
                f"{layer['rmse_over_scale']:.3f}",
                f"{layer['max_abs_error']:.4g}",
            )
        console.print(worst)
        console.print("keep a layer in float with --float-layers TENSOR[,TENSOR]", highlight=False)
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in doc["timings_s"].items())
    console.print(f"time: {timings}", highlight=False)
    if doc["output"]["written"]:
        console.print(f"[green]wrote[/] {doc['output']['path']} ({conv['size']} bytes)", highlight=False)
    if doc["bundle"]:
        print_bundle(doc["bundle"])


def print_bundle(b: dict[str, Any]) -> None:
    """The line a written bundle gets (``convert`` and ``distill``)."""
    console.print(
        f"[green]wrote[/] bundle {b['name']} {b['version']} at {b['path']} ({b['size']} bytes, "
        f"id {b['bundle_id'][:16]}, baseline {'yes' if b['baseline'] else 'no'})",
        highlight=False,
    )


def convert(
    model: Path = typer.Argument(
        ..., help="The model: a Keras 3 .keras file, a legacy .h5 file, or a SavedModel directory."
    ),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write the .tflite model."),
    quantize: str = typer.Option("fp32", "--quantize", "-q", help=f"Quantization mode: {MODES_HELP}"),
    io: Optional[str] = typer.Option(
        None,
        "--io",
        help="int8 or float input/output for --quantize int8 (default int8; other modes are float).",
    ),
    calibration: Optional[Path] = typer.Option(
        None,
        "--calibration",
        help="DATA of typical inputs (.npy, .npz, image folder, or a folder from `edgekit capture pull`); "
        "needed by int8 and int16x8 (with --qat, --train is used when this is not given).",
    ),
    prune: Optional[str] = typer.Option(
        None, "--prune", help="Target sparsity, a fraction (0.75) or percent (75%); needs --train."
    ),
    qat: bool = typer.Option(
        False,
        "--qat",
        help="Quantization-aware training for --quantize int8 (fine-tunes on --train; calibrates from it "
        "unless --calibration is given).",
    ),
    train: Optional[Path] = typer.Option(
        None,
        "--train",
        help="Labelled DATA (.npz with x and y, class folders, or a `capture pull` folder with labels.csv) "
        "to fine-tune on (--prune, --qat; --qat also calibrates from it without --calibration).",
    ),
    epochs: int = typer.Option(8, "--epochs", help="Fine-tuning epochs (--prune, --qat)."),
    sparsity_pattern: str = typer.Option(
        "unstructured",
        "--sparsity-pattern",
        help="unstructured (magnitude) or 2:4 (2 of every 4 weights kept).",
    ),
    eval_data: Optional[Path] = typer.Option(
        None,
        "--eval",
        help="DATA to compare the converted model with the float reference (.npy, .npz, image folder or "
        "`capture pull` folder; labels give accuracy).",
    ),
    max_accuracy_drop: Optional[str] = typer.Option(
        None,
        "--max-accuracy-drop",
        help="Refuse (exit 20, write nothing) if accuracy drops by more than PTS points.",
    ),
    float_layers: Optional[str] = typer.Option(
        None, "--float-layers", help="Comma-separated tensors (or layer names) to keep in float with int8."
    ),
    report: Optional[Path] = REPORT_OPTION,
    baseline: Optional[Path] = typer.Option(
        None,
        "--baseline",
        help="DATA for the bundle's drift baseline (default: --calibration, else --train).",
    ),
    bundle: Optional[str] = typer.Option(
        None, "--bundle", help="NAME:VERSION: also write a signed bundle OUT.ekb next to the .tflite."
    ),
    key_name: str = KEY_NAME_OPTION,
    latency_runs: int = LATENCY_RUNS_OPTION,
    json_out: bool = JSON_OPTION,
) -> None:
    """Convert a trained model to TFLite: quantize, optionally prune, measure against the float reference."""
    if output is None:
        raise ConfigError("give the output file with -o OUT.tflite")
    from edgekit.converters import ConvertOptions, parse_bundle_spec
    from edgekit.converters import convert as run_convert

    if bundle is not None:
        parse_bundle_spec(bundle)  # a bad NAME:VERSION is reported before asking for a passphrase
    signing_key = load_key(key_name) if bundle is not None else None

    options = ConvertOptions(
        model=model,
        output=output,
        quantize=quantize,
        io=io,
        calibration=calibration,
        prune=parse_number(prune, "--prune"),
        qat=qat,
        train=train,
        epochs=epochs,
        sparsity_pattern=sparsity_pattern,
        eval=eval_data,
        max_accuracy_drop=parse_number(max_accuracy_drop, "--max-accuracy-drop"),
        float_layers=tuple(s.strip() for s in float_layers.split(",") if s.strip()) if float_layers else (),
        report=report,
        baseline=baseline,
        bundle=bundle,
        latency_runs=latency_runs,
    )
    doc = run_with_steps(lambda steps: run_convert(options, steps, signing_key).to_dict(), json_out)
    if json_out:
        print_json(doc)
    else:
        _print_report(doc)


def run_with_steps(work: Callable[[Any], dict[str, Any]], json_out: bool) -> dict[str, Any]:
    """Run ``work(steps)`` with progress bars on a terminal; a refused model's report goes to ``--json``."""
    from edgekit.converters import Steps

    try:
        if sys.stderr.isatty() and not json_out:
            with _RichSteps() as steps:
                return work(steps)
        return work(Steps())
    except AccuracyGateError as exc:
        if json_out and exc.report is not None:
            print_json(exc.report.to_dict())  # type: ignore[attr-defined]
        raise
