"""The ARM lane's fixtures: one emulated arm64 board per session, the agent installed on it by
examples/raspberry-pi/install.sh, as on a Raspberry Pi. See board.py for the tree and how
commands run in it; `make test-arm` builds the tree first and says SKIPPED where it cannot."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
from board import REPO, Board, Installed, build_tree, fetch_wheels, missing
from device_fixtures import mobilenet_model, models

__all__ = ["mobilenet_model", "models"]  # the digits and MobileNetV2 models, shared with tests/agent


@pytest.fixture(scope="session")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    reason = missing()
    if reason:
        pytest.skip(f"SKIPPED: the ARM lane cannot run here: {reason}")
    where = tmp_path_factory.mktemp("arm64-board")
    board = Board.copy_of(build_tree(), where)
    yield board
    shutil.rmtree(board.root, ignore_errors=True)  # ~0.5 GB with the agent's venv


@pytest.fixture(scope="session")
def installed(board: Board) -> Installed:
    """install.sh run on the board, offline: edgekit from a wheel built here from the current
    sources, its dependencies from the arm64 wheels fetched with the tree."""
    host = board.host
    shutil.copytree(fetch_wheels(), host / "wheels")
    built = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"),
            *("-w", str(host / "dist"), str(REPO)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (host / "dist").glob("edgekit-*.whl")
    shutil.copytree(REPO / "examples" / "raspberry-pi", host / "raspberry-pi")
    result = board.run(
        *("bash", "/host/raspberry-pi/install.sh", "--source", f"/host/dist/{wheel.name}"),
        env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/host/wheels", "PIP_NO_COMPILE": "1"},
        timeout=900,
    )
    return Installed(board, result)
