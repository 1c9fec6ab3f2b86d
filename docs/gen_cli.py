"""Write docs/cli-reference.md from the CLI itself: every command, argument and option of
``edgekit`` and ``edgekit-agent``, with the help text, defaults and environment variables the
code declares.

    python docs/gen_cli.py            # rewrite docs/cli-reference.md  (make docs)
    python docs/gen_cli.py --check    # exit 1 if the committed file is stale (the tests do this)
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import typer

OUT = Path(__file__).resolve().parent / "cli-reference.md"

HEADER = """\
# CLI reference

Generated from the code by `docs/gen_cli.py` (`make docs`); do not edit by hand, a test fails
when this file and the CLI disagree. Errors, exit codes and `--json`: [cli.md](cli.md).
"""


def _apps() -> list[tuple[str, typer.Typer | argparse.ArgumentParser]]:
    from edgekit.agent.cli import build_parser
    from edgekit.cli import app as edgekit_app

    return [("edgekit", edgekit_app), ("edgekit-agent", build_parser())]


def _walk(command: click.Command, ctx: click.Context) -> Iterator[tuple[click.Command, click.Context]]:
    yield command, ctx
    if isinstance(command, click.Group):
        for name in sorted(command.list_commands(ctx)):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from _walk(sub, click.Context(sub, info_name=name, parent=ctx))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _default(param: click.Parameter) -> str:
    if param.required or getattr(param, "is_flag", False) or isinstance(param, click.Argument):
        return ""
    default = param.default
    if default is None or default in ("", ()) or callable(default):
        return ""
    return f"`{default}`"


def _param_row(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        name = f"`{param.make_metavar()}`"
        kind = "argument"
    else:
        assert isinstance(param, click.Option)
        flags = [*param.opts, *param.secondary_opts]
        name = ", ".join(f"`{flag}`" for flag in flags)
        if not param.is_flag:
            name += f" {param.make_metavar()}"
        kind = "flag" if param.is_flag else "option"
        if param.multiple:
            kind += ", repeatable"
    if param.required:
        kind += ", required"
    help_text = _cell(getattr(param, "help", None) or "")
    envvar = param.envvar if isinstance(param.envvar, str) else None
    if envvar:
        help_text += f" Env: `{envvar}`."
    return f"| {name} | {kind} | {_default(param)} | {help_text} |"


def _argparse_row(action: argparse.Action) -> str:
    """A row of the table for one argparse argument (``edgekit-agent`` is plain argparse)."""
    metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    if not action.option_strings:
        name, kind = f"`{metavar}`", "argument"
    else:
        name = ", ".join(f"`{flag}`" for flag in action.option_strings)
        is_flag = action.nargs == 0
        if not is_flag:
            name += f" {metavar}"
        kind = "flag" if is_flag else "option"
    if action.required or not action.option_strings:
        kind += ", required"
    default = ""
    if action.option_strings and action.nargs != 0 and action.default not in (None, "", ()):
        default = f"`{action.default}`"
    return f"| {name} | {kind} | {default} | {_cell(action.help or '')} |"


def _render_argparse(prog: str, parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    commands: dict[str, argparse.ArgumentParser] = dict(sorted(subs[0].choices.items())) if subs else {}
    for path, command in [(prog, parser), *((f"{prog} {n}", p) for n, p in commands.items())]:
        lines.append(f"{'##' if command is parser else '###'} `{path}`\n")
        usage = " ".join(command.format_usage().split()[1:])
        lines.append(f"```\n{usage}\n```\n")
        if command.description:
            lines.append(command.description + "\n")
        rows = [
            _argparse_row(a)
            for a in command._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
        ]
        if rows:
            lines += ["| name | kind | default | meaning |\n|---|---|---|---|", *rows, ""]
        if command is parser and commands:
            lines.append("Commands: " + ", ".join(f"`{name}`" for name in commands) + ".\n")
    return lines


def render() -> str:
    lines = [HEADER]
    for prog, app in _apps():
        if isinstance(app, argparse.ArgumentParser):
            lines += _render_argparse(prog, app)
            continue
        root = typer.main.get_command(app)
        root_ctx = click.Context(root, info_name=prog)
        for command, ctx in _walk(root, root_ctx):
            path = ctx.command_path
            level = "##" if command is root else "###"
            lines.append(f"{level} `{path}`\n")
            usage = " ".join(command.collect_usage_pieces(ctx))
            lines.append(f"```\n{path} {usage}\n```\n")
            if command.help:
                lines.append(inspect.cleandoc(command.help).replace("\b\n", "") + "\n")
            params = [
                p
                for p in command.get_params(ctx)
                if not getattr(p, "hidden", False) and "--help" not in getattr(p, "opts", [])
            ]
            if params:
                lines.append("| name | kind | default | meaning |\n|---|---|---|---|")
                lines.extend(_param_row(p) for p in params)
                lines.append("")
            if isinstance(command, click.Group):
                subs = sorted(command.list_commands(ctx))
                lines.append("Commands: " + ", ".join(f"`{name}`" for name in subs) + ".\n")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale; write nothing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run `make docs` (python docs/gen_cli.py) and commit it", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
