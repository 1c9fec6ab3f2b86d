"""``edgekit bundle``: create, inspect and verify signed model bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..bundle import Bundle, create_bundle, inspect_bundle, read_bundle
from ..config import edgekit_home
from ..keys import load_own_public_key
from ..manifest import DEFAULT_CHUNK_SIZE
from ..trust import TrustedKeys
from ._app import console, new_app, print_json
from ._app import signing_key as load_key

app = new_app("Create, inspect and verify signed model bundles (.ekb).")


def _trusted(keys: Optional[list[Path]]) -> TrustedKeys:
    if keys:
        return TrustedKeys.from_files(keys)
    return TrustedKeys([load_own_public_key(edgekit_home())])


def _summary(bundle: Bundle) -> dict[str, Any]:
    return {
        "name": bundle.manifest.name,
        "version": bundle.manifest.version,
        "bundle_id": bundle.bundle_id,
        "size": bundle.size,
        "signer": bundle.manifest.signer,
    }


@app.command("create")
def create(
    model: Path = typer.Argument(..., help="The .tflite model to bundle."),
    name: str = typer.Option(..., "--name", help="Bundle name (lowercase letters, digits, '.', '_', '-')."),
    version: str = typer.Option(..., "--version", help="Semantic version, e.g. 1.2.0."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the .ekb file."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="labels.txt: one class name per line."),
    baseline: Optional[Path] = typer.Option(
        None,
        "--baseline",
        help="DATA (.npy, .npz or image folder) to compute drift reference statistics from.",
    ),
    calibration_eval: Optional[Path] = typer.Option(
        None,
        "--calibration-eval",
        help="Labeled held-out DATA (.npz with x= and y=, or a folder of class sub-folders) to calibrate "
        "the model's confidence on, so devices can estimate their accuracy without labels (classifiers only; "
        "needs --baseline).",
    ),
    model_card: Optional[Path] = typer.Option(None, "--model-card", help="A Markdown model card to include."),
    key: str = typer.Option(
        "default", "--key-name", help="Which signing key under $EDGEKIT_HOME/keys signs."
    ),
    chunk_size: int = typer.Option(
        DEFAULT_CHUNK_SIZE, "--chunk-size", help="Transport chunk size in bytes (brokers may cap payloads)."
    ),
    runtime: str = typer.Option(
        "auto",
        "--runtime",
        help="TFLite runtime for the health check: auto, ai_edge_litert, tflite_runtime or tensorflow.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Bundle a .tflite model with its manifest, health check and optional baseline, and sign it."""
    signing_key = load_key(key)
    manifest = create_bundle(
        model,
        name=name,
        version=version,
        key=signing_key,
        output=output,
        labels=labels,
        baseline=baseline,
        calibration_eval=calibration_eval,
        model_card=model_card,
        chunk_size=chunk_size,
        runtime=runtime,
    )
    bundle = read_bundle(output, TrustedKeys([signing_key.public]))
    if json_out:
        print_json({**_summary(bundle), "path": str(output), "files": [f.name for f in manifest.files]})
    else:
        console.print(
            f"Created [bold]{manifest.label}[/] at {output} ({bundle.size} bytes, id {bundle.bundle_id[:16]}), "
            f"signed by {signing_key.key_id[:16]}"
        )


@app.command("inspect")
def inspect(
    file: Path = typer.Argument(..., help="The .ekb bundle to show."),
    key: Optional[list[Path]] = typer.Option(
        None, "--key", help="Trusted public key PEM (repeatable); default: your own key, if you have one."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest and signature status as JSON."),
) -> None:
    """Show a bundle's manifest. Members are always checked; the signature is reported, not required."""
    trusted = None
    if key or (edgekit_home() / "keys" / "default.pub.pem").exists():
        trusted = _trusted(key)
    bundle, problem = inspect_bundle(file, trusted)
    if json_out:
        print_json(
            {
                **_summary(bundle),
                "signature": {"verified": problem is None, "key_id": bundle.signer, "problem": problem},
                "manifest": bundle.manifest.to_dict(),
            }
        )
        return
    m = bundle.manifest
    console.print(f"[bold]{m.label}[/]  created {m.created_at}  {bundle.size} bytes  id {bundle.bundle_id}")
    if problem is None:
        console.print(f"signature: [green]verified[/] by key {bundle.signer}")
    else:
        console.print(f"signature: [yellow]not verified[/] ({problem})", soft_wrap=True)
    files = Table("member", "role", "bytes", "sha256", title="members")
    for f in m.files:
        files.add_row(f.name, f.role, str(f.size), f.sha256[:16])
    console.print(files)
    tensors = Table("", "shape", "dtype", "scale / zero point", "name", title="signature")
    for kind, specs in (("input", m.inputs), ("output", m.outputs)):
        for t in specs:
            quant = f"{t.scale[0]:.6g} / {t.zero_point[0]}" if t.quantized else "-"
            tensors.add_row(kind, str(list(t.shape)), t.dtype, quant, t.name)
    tensors.columns[-1].overflow = "fold"
    console.print(tensors)
    console.print(f"ops: {', '.join(m.ops)}", soft_wrap=True)
    console.print(f"transport: {len(m.chunks.sha256)} chunks of {m.chunks.chunk_size} bytes")


@app.command("verify")
def verify(
    file: Path = typer.Argument(..., help="The .ekb bundle to verify."),
    key: Optional[list[Path]] = typer.Option(
        None, "--key", help="Trusted public key PEM (repeatable); default: your own key."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check that a trusted key signed the bundle and every member matches; exit non-zero if not."""
    bundle = read_bundle(file, _trusted(key))
    if json_out:
        print_json({**_summary(bundle), "verified": True, "key_id": bundle.signer})
    else:
        console.print(
            f"[green]OK[/] {bundle.manifest.label}: signed by trusted key {bundle.signer}, "
            f"{len(bundle.members)} members match the manifest"
        )
