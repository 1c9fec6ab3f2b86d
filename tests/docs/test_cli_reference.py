"""docs/cli-reference.md is generated from the CLI; it must match the code that is committed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_committed_cli_reference_matches_the_cli():
    result = subprocess.run(
        [sys.executable, str(REPO / "docs" / "gen_cli.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr  # stale: run `make docs` and commit the result


def test_every_command_and_flag_is_in_the_reference():
    text = (REPO / "docs" / "cli-reference.md").read_text()
    for needle in ("### `edgekit push`", "### `edgekit-agent run`", "`--canary`", "`--allow-downgrade`"):
        assert needle in text
