"""The armhf half of the ARM lane, against the package index: why 32-bit Bookworm cannot run the
agent, and why the 32-bit board (test_armhf_board.py) is bullseye with Debian's numpy.

A 32-bit Raspberry Pi OS (armv7l; Pi Zero 2 W and Pi 3 on their 32-bit image) needs a TFLite
runtime, numpy and cryptography as wheels: pip on a Pi cannot build TensorFlow Lite. This asks
the package index this machine installs from, as pip on such a board would ask it, on every run,
and asserts what examples/raspberry-pi/README.md tells owners. The day the index changes (a LiteRT
armv7l wheel appears, say), this fails, and the 32-bit route can change.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

#: The platform tags pip on a 32-bit Raspberry Pi OS (glibc 2.31 on bullseye, 2.36 on bookworm) accepts.
ARMV7 = ("linux_armv7l", "manylinux2014_armv7l", "manylinux_2_31_armv7l", "manylinux_2_36_armv7l")


def wheel_for(requirement: str, python: str, into: Path) -> bool:
    """Whether the index has a wheel of ``requirement`` an armv7l board with ``python`` could install."""
    platforms = [arg for tag in ARMV7 for arg in ("--platform", tag)]
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"),
            *platforms,
            *("--python-version", python, "-d", str(into), requirement),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode == 0:
        return True
    if "No matching distribution found" in result.stderr or "Could not find a version" in result.stderr:
        return False
    pytest.skip(f"SKIPPED: the package index cannot be asked here: {result.stderr.strip().splitlines()[-1:]}")


@pytest.mark.parametrize("python", ["3.11", "3.9"])  # bookworm's Python; bullseye's
def test_no_tflite_runtime_has_a_32_bit_arm_wheel_for_a_numpy_the_index_has(
    python: str, tmp_path: Path
) -> None:
    assert not wheel_for("ai-edge-litert", python, tmp_path), (
        "LiteRT has an armv7l wheel now: build the armhf board"
    )
    assert not wheel_for("tflite-runtime>=2.14", python, tmp_path), (
        "tflite-runtime >= 2.14 has an armv7l wheel now"
    )
    # What is left, tflite-runtime 2.13.0 (cp39 only), needs numpy >= 1.21.2, and the index has
    # no armv7l numpy at all: Raspberry Pi OS takes it from piwheels, which this network does not
    # reach, and Debian's own is too old for that wheel (measured: README.md).
    assert wheel_for("tflite-runtime==2.13.0", python, tmp_path) is (python == "3.9")
    assert not wheel_for("numpy>=1.21.2", python, tmp_path), (
        "numpy has an armv7l wheel now: try the armhf board"
    )
