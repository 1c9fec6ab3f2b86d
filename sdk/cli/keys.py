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
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Create a signing key under $EDGEKIT_HOME/keys (mode 0600)."""
    if role is not None and role not in ROLES:
        raise KeyStoreError(f"unknown key role {role!r}; use one of {', '.join(ROLES)}")
    if role is not None and name == "default":
        name = role
    secret: Optional[bytes] = None
    if os.environ.get(PASSPHRASE_ENV):
        secret = os.environ[PASSPHRASE_ENV].encode()
    elif passphrase:
        secret = typer.prompt("Passphrase", hide_input=True, confirmation_prompt=True).encode()
    info = init_key(edgekit_home(), name=name, passphrase=secret, force=force)
    if role is not None:
        atomic_write(_role_path(info.name), role.encode())
    if json_out:
        print_json(
            {
                "name": info.name,
                "key_id": info.key_id,
                "path": str(info.path),
                "encrypted": info.encrypted,
                "role": role,
            }
        )
    else:
        console.print(f"Created signing key [bold]{info.name}[/] ({info.key_id[:16]}) at {info.path}")


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
