"""The ARM lane's fixtures: one emulated arm64 board per session, the agent installed on it by
examples/raspberry-pi/install.sh, as on a Raspberry Pi; and one 32-bit (armhf) board with the
agent installed by the 32-bit route (ARMHF_INSTALL). See board.py for the tree and how
commands run in it; `make test-arm` builds the tree first and says SKIPPED where it cannot."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from board import (
    ARMHF,
    ARMHF_TFLITE,
    CPUINFO_PI3_ARMV7,
    REPO,
    Board,
    Installed,
    build_tree,
    fetch_wheels,
    missing,
)
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
    wheel = _edgekit_wheel(host / "dist")
    shutil.copytree(REPO / "examples" / "raspberry-pi", host / "raspberry-pi")
    result = board.run(
        *("bash", "/host/raspberry-pi/install.sh", "--source", f"/host/dist/{wheel.name}"),
        env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/host/wheels", "PIP_NO_COMPILE": "1"},
        timeout=900,
    )
    return Installed(board, result)


#: The 32-bit route, as examples/raspberry-pi/README.md gives it: a venv that sees Debian's numpy
#: and cryptography, and edgekit, tflite-runtime 2.11.0 and edgekit's other dependencies without
#: theirs (pip would want numpy >= 1.21 and cryptography >= 41, of which the index has no armv7l
#: wheel). Offline here: the wheels come from the cache.
ARMHF_INSTALL = r"""
set -e
python3 -m venv --system-site-packages /opt/edgekit
/opt/edgekit/bin/python -m pip install --no-index --find-links /host/wheels --no-deps \
  "/host/dist/$1" "$2" "paho-mqtt>=2.2,<2.3" "orjson>=3.9" "tomli>=2.0"
"""


@pytest.fixture(scope="session")
def armhf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """A 32-bit Raspberry Pi (Debian bullseye armhf, a Pi 3's /proc/cpuinfo on the 32-bit OS,
    QEMU_CPU=cortex-a7: qemu-arm has no Cortex-A53; the A7 is the Pi 2's core, with the same
    32-bit features, NEON and VFPv4) with the agent installed by the 32-bit route."""
    reason = missing(ARMHF)
    if reason:
        pytest.skip(f"SKIPPED: the armhf board cannot run here: {reason}")
    where = tmp_path_factory.mktemp("armhf-board")
    board = replace(Board.copy_of(build_tree(ARMHF), where), cpu="cortex-a7", cpuinfo=CPUINFO_PI3_ARMV7)
    shutil.copytree(fetch_wheels(ARMHF), board.host / "wheels")
    wheel = _edgekit_wheel(board.host / "dist")
    result = board.run(
        "bash",
        "-c",
        ARMHF_INSTALL,
        "install",
        wheel.name,
        ARMHF_TFLITE,
        env={"PIP_NO_COMPILE": "1"},
        timeout=900,
    )
    yield Installed(board, result)
    shutil.rmtree(board.root, ignore_errors=True)


def _edgekit_wheel(into: Path) -> Path:
    """A wheel of edgekit built here from the current sources."""
    built = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"),
            *("-w", str(into), str(REPO)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = into.glob("edgekit-*.whl")
    return wheel
