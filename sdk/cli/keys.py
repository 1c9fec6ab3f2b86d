"""``edgekit keys``: the workstation's signing keys."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from ..atomic import atomic_write
from ..config import edgekit_home
from ..errors import KeyStoreError
from ..keys import PASSPHRASE_ENV, export_public_key, init_key, list_keys
from ._app import console, new_app, print_json

ROLES = ("root", "targets", "online")


def _role_path(name: str) -> Path:
    return edgekit_home() / "keys" / f"{name}.role"


def _role_of(name: str) -> Optional[str]:
    try:
        role = _role_path(name).read_text().strip()
    except OSError:
        return None
    return role if role in ROLES else None


app = new_app("Create and show the Ed25519 keys that sign bundles and desired states.")


@app.command("init")
def init(
    name: str = typer.Option(
        "default", "--name", help="Key name; bundles are signed with 'default' unless told."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing key of that name."),
    passphrase: bool = typer.Option(
        False, "--passphrase", help=f"Encrypt the key with a passphrase (prompted; or set {PASSPHRASE_ENV})."
    ),
    role: Optional[str] = typer.Option(
        None,
        "--role",
        help="root, targets or online: what the key is for in a fleet's trust (`edgekit trust`); "
        "names it after the role unless --name is given. Keep root and targets keys offline.",
    ),
    threshold: Optional[int] = typer.Option(
        None,
        "--threshold",
        help="With --role root: make a set of root keys of which this many must sign a new root "
        "(NAME-1 ... NAME-N; keep each on different media), for `edgekit trust init --threshold`.",
    ),
    count: Optional[int] = typer.Option(
        None,
        "--count",
        help="With --threshold: how many root keys to make (default: threshold + 1, so one may be lost).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Create a signing key under $EDGEKIT_HOME/keys (mode 0600); with --role root --threshold K,
    a set of root keys."""
    if role is not None and role not in ROLES:
        raise KeyStoreError(f"unknown key role {role!r}; use one of {', '.join(ROLES)}")
    names = _key_names(name, role, threshold, count)
    secret: Optional[bytes] = None
    if os.environ.get(PASSPHRASE_ENV):
        secret = os.environ[PASSPHRASE_ENV].encode()
    elif passphrase:
        secret = typer.prompt("Passphrase", hide_input=True, confirmation_prompt=True).encode()
    made = []
    for key_name in names:
        info = init_key(edgekit_home(), name=key_name, passphrase=secret, force=force)
        if role is not None:
            atomic_write(_role_path(info.name), role.encode())
        made.append(info)
    docs = [
        {"name": i.name, "key_id": i.key_id, "path": str(i.path), "encrypted": i.encrypted, "role": role}
        for i in made
    ]
    if json_out:
        print_json(docs[0] if threshold is None else {"threshold": threshold, "keys": docs})
        return
    for info in made:
        console.print(f"Created signing key [bold]{info.name}[/] ({info.key_id[:16]}) at {info.path}")
    if threshold is not None:
        console.print(
            f"Any {threshold} of these {len(made)} root keys can sign a new root. Create the fleet's trust "
            f"with `edgekit trust init --fleet F --root-keys {','.join(names)} --threshold {threshold}`, "
            "then move each root key to its own offline medium."
        )


def _key_names(name: str, role: Optional[str], threshold: Optional[int], count: Optional[int]) -> list[str]:
    """The key(s) ``keys init`` makes: one, named after its role unless named, or a root set."""
    base = role if role is not None and name == "default" else name
    if threshold is None:
        if count is not None:
            raise KeyStoreError("--count needs --threshold: use --role root --threshold K --count N")
        return [base]
    if role != "root":
        raise KeyStoreError("--threshold makes a set of root keys; add --role root")
    if threshold < 1:
        raise KeyStoreError(f"--threshold {threshold} is not a number of keys; use 1 or more")
    total = threshold + 1 if count is None else count
    if total < threshold:
        raise KeyStoreError(f"--count {total} is below --threshold {threshold}: a root could never be signed")
    return [f"{base}-{i}" for i in range(1, total + 1)]


@app.command("export-public")
def export_public(
    name: str = typer.Option("default", "--name", help="Which key to export."),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output", help="Write to this file instead of stdout."
    ),
) -> None:
    """Print (or write) the public key as PEM SubjectPublicKeyInfo, for devices and OpenSSL."""
    pem = export_public_key(edgekit_home(), name)
    if output is None:
        sys.stdout.write(pem.decode())
    else:
        atomic_write(output, pem)
        console.print(f"Wrote public key to {output}")


@app.command("list")
def list_(json_out: bool = typer.Option(False, "--json", help="Print the keys as JSON.")) -> None:
    """Show the signing keys and their ids (SHA-256 fingerprints of the public keys)."""
    keys = list_keys(edgekit_home())
    if json_out:
        print_json(
            [
                {
                    "name": k.name,
                    "key_id": k.key_id,
                    "path": str(k.path),
                    "encrypted": k.encrypted,
                    "role": _role_of(k.name),
                }
                for k in keys
            ]
        )
        return
    if not keys:
        console.print("No keys yet; create one with `edgekit keys init`.")
    for k in keys:
        role = _role_of(k.name)
        console.print(
            f"{k.name:<12} {k.key_id}{'  (encrypted)' if k.encrypted else ''}{f'  role {role}' if role else ''}"
        )
