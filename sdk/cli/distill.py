"""``edgekit distill``: train a small student to mimic a trained teacher, then measure both as TFLite.

The converter (and TensorFlow) is imported inside the command, so ``import edgekit.cli`` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..errors import ConfigError
from ._app import console, print_json
from .convert import (
    JSON_OPTION,
    KEY_NAME_OPTION,
    LATENCY_RUNS_OPTION,
    MODES_HELP,
    REPORT_OPTION,
    load_key,
    num,
    parse_number,
    pct,
    print_bundle,
    run_with_steps,
)


def _parse_depth(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(
            f"--depth {text!r} is not a whole number; give how many Conv/Dense layers the student keeps, e.g. --depth 4"
        ) from None


def _print_report(doc: dict[str, Any]) -> None:
    t, s = doc["teacher"], doc["student"]
    table = Table(title=f"{t['path']} → {doc['output']['path']} (student: {s['source']}, {doc['quantize']})")
    table.add_column("")
    table.add_column("teacher", justify="right")
    table.add_column("student", justify="right")
    table.add_column("ratio", justify="right")

    def ratio(a: Optional[float], b: Optional[float]) -> str:
        return f"{b / a:.3f}x" if a and b is not None else "-"

    for label, key, fmt in (
        ("depth (Conv/Dense layers)", "depth", "d"),
        ("parameters", "params", "d"),
        ("multiply-accumulates", "macs", "d"),
        (f"{doc['quantize']} file size (bytes)", "size", "d"),
        ("latency median (ms)", "latency_ms_median", ".3f"),
    ):
        table.add_row(label, num(t[key], fmt), num(s[key], fmt), ratio(t[key], s[key]))
    if t["samples"]:
        table.add_row("accuracy", pct(t["accuracy"]), pct(s["accuracy"]), "")
        table.add_row("agreement with the teacher", "", pct(s["agreement"]), "")
    console.print(table)
    console.print(f"latency measured on {doc['latency_machine']}", highlight=False)
    if s["removed_blocks"]:
        names = ", ".join(
            b["layers"][0] if len(b["layers"]) == 1 else f"{b['layers'][0]}..{b['layers'][-1]}"
            for b in s["removed_blocks"]
        )
        console.print(f"removed from the teacher: {names}", highlight=False)
    if doc["accuracy_drop_points"] is not None:
        console.print(f"accuracy drop: {doc['accuracy_drop_points']:.2f} points", highlight=False)
    tr = doc["training"]
    console.print(
        f"training: {tr['epochs_run']} epochs ({tr['seconds']:.1f}s), weights of epoch {tr['best_epoch']} kept; "
        f"{tr['labelled_samples']} labelled and {tr['unlabelled_samples']} unlabelled samples, "
        f"{tr['validation_samples']} held out to choose the epoch",
        highlight=False,
    )
    if doc["output"]["written"]:
        written = [doc["output"]["path"]] + ([doc["output"]["tflite"]] if doc["output"]["tflite"] else [])
        console.print(f"[green]wrote[/] {' and '.join(written)}", highlight=False)
    if doc["bundle"]:
        print_bundle(doc["bundle"])


def distill(
    teacher: Path = typer.Argument(
        ..., help="The trained teacher: a Keras 3 .keras file, a legacy .h5 file, or a SavedModel directory."
    ),
    output: Optional[Path] = typer.Option(
        None,
        "-o",
        "--output",
        help="Where to write the student (.keras); its .tflite goes next to it with -q.",
    ),
    data: Optional[Path] = typer.Option(
        None,
        "--data",
        help="Training DATA (.npy, .npz with x and optional y, an image folder, or a folder from "
        "`edgekit capture pull`, labelled by its labels.csv if it has one).",
    ),
    student: Optional[Path] = typer.Option(
        None, "--student", help="The student's architecture (.keras or .h5), trained from its weights."
    ),
    width: Optional[str] = typer.Option(
        None,
        "--width",
        help="Derive the student from the teacher: every Conv/Dense layer but the last W times as wide.",
    ),
    depth: Optional[str] = typer.Option(
        None,
        "--depth",
        help="Derive the student from the teacher: remove its shape-keeping blocks, deepest first, "
        "until at most D Conv/Dense layers are left (with --width: then narrowed).",
    ),
    unlabeled: Optional[Path] = typer.Option(
        None,
        "--unlabeled",
        help="More inputs without labels (e.g. captured field data): learned from the teacher.",
    ),
    temperature: float = typer.Option(
        4.0, "--temperature", help="Softening of the teacher's outputs (2 to 8)."
    ),
    alpha: float = typer.Option(
        0.5,
        "--alpha",
        help="Weight of the teacher's soft targets against the labels (0 labels only, 1 teacher only).",
    ),
    epochs: int = typer.Option(
        30, "--epochs", help="Training epochs at most (stops earlier when no better)."
    ),
    eval_data: Optional[Path] = typer.Option(
        None,
        "--eval",
        help="DATA to compare student and teacher on (.npy, .npz, image folder or `capture pull` folder; "
        "labels give accuracy).",
    ),
    max_accuracy_drop: Optional[str] = typer.Option(
        None,
        "--max-accuracy-drop",
        help="Refuse (exit 20, write nothing) if the student is more than PTS points below the teacher.",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed (initial weights, shuffling, validation split)."),
    quantize: Optional[str] = typer.Option(
        None,
        "--quantize",
        "-q",
        help=f"Also convert the student to TFLite: {MODES_HELP} (--data calibrates int8).",
    ),
    io: Optional[str] = typer.Option(None, "--io", help="int8 or float input/output for --quantize int8."),
    report: Optional[Path] = REPORT_OPTION,
    bundle: Optional[str] = typer.Option(
        None, "--bundle", help="NAME:VERSION: also write a signed bundle of the student's .tflite (needs -q)."
    ),
    key_name: str = KEY_NAME_OPTION,
    latency_runs: int = LATENCY_RUNS_OPTION,
    json_out: bool = JSON_OPTION,
) -> None:
    """Distill a trained teacher into a smaller student; measure both, converted, on the same runtime."""
    if output is None:
        raise ConfigError("give the student's file with -o STUDENT.keras")
    if data is None:
        raise ConfigError("give the training inputs with --data DATA (labels optional)")
    from edgekit.converters.distill import DistillOptions, check_options
    from edgekit.converters.distill import distill as run_distill

    options = DistillOptions(
        teacher=teacher,
        output=output,
        data=data,
        student=student,
        width=parse_number(width, "--width"),
        depth=_parse_depth(depth),
        unlabeled=unlabeled,
        temperature=temperature,
        alpha=alpha,
        epochs=epochs,
        eval=eval_data,
        max_accuracy_drop=parse_number(max_accuracy_drop, "--max-accuracy-drop"),
        seed=seed,
        quantize=quantize,
        io=io,
        report=report,
        bundle=bundle,
        latency_runs=latency_runs,
    )
    check_options(options)  # bad flags are reported before asking for a passphrase
    signing_key = load_key(key_name) if bundle is not None else None
    doc = run_with_steps(lambda steps: run_distill(options, steps, signing_key).to_dict(), json_out)
    if json_out:
        print_json(doc)
    else:
        _print_report(doc)
