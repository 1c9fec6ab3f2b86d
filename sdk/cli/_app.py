"""The ``edgekit`` command: one typer app, and the one place errors become exit codes."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape

from .._version import __version__
from ..config import edgekit_home
from ..errors import EdgekitError
from ..keys import SigningKey, key_needs_passphrase, load_signing_key

console = Console(soft_wrap=True)
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    """Stable, scriptable output for ``--json``: one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def print_json_line(data: Any) -> None:
    """One compact JSON document per line, flushed (for long-running commands' ``--json``)."""
    sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    sys.stdout.flush()


def signing_key(name: str = "default") -> SigningKey:
    """The workstation's signing key; an encrypted one's passphrase comes from
    ``$EDGEKIT_KEY_PASSPHRASE`` or, on a terminal, a prompt."""
    home = edgekit_home()
    passphrase = None
    if key_needs_passphrase(home, name) and sys.stdin.isatty():
        passphrase = typer.prompt(f"Passphrase for key {name}", hide_input=True).encode()
    return load_signing_key(home, name, passphrase)


def new_app(help_text: str) -> typer.Typer:
    return typer.Typer(
        help=help_text,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"edgekit {__version__}")
        raise typer.Exit()


def run(app: typer.Typer, argv: Optional[Sequence[str]] = None, prog: str = "edgekit") -> None:
    """Run ``app``; an EdgekitError becomes one line on stderr and its exit code, never a traceback."""
    try:
        code = app(args=list(argv) if argv is not None else None, prog_name=prog, standalone_mode=False)
    except EdgekitError as exc:
        # Escaped: messages name things in brackets (smtp://[user@]host[:port], edgekit[convert])
        # that rich would otherwise take for its markup and drop.
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err_console.print("aborted", highlight=False)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted", highlight=False)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
