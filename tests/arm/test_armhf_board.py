"""The agent on an emulated 32-bit Raspberry Pi (Debian bullseye armhf under qemu-arm, a Pi 3's
/proc/cpuinfo on the 32-bit OS): the route that works there, and why the obvious ones do not.

The package index has no armv7l wheel of LiteRT, numpy or cryptography (test_armhf_index.py), so
the board uses Debian's python3-numpy (1.19.5) and python3-cryptography (3.3.2) through a
``--system-site-packages`` venv, and tflite-runtime 2.11.0 from the index: the newest armv7l
wheel that runs with them (the test below shows why 2.12.0 and 2.13.0 do not). edgekit declares
numpy >= 1.21 and cryptography >= 41 for what the workstation does; the agent runs with
Debian's, which this lane proves by running it. Run with `make test-arm` (part of `make test`).
"""

from __future__ import annotations

import json

from board import ARMHF_TFLITE_NEWER, Installed
from edgekit import SigningKey
from lane import assert_board_predicts_like_x86, bundles_job


def test_the_32_bit_route_installs_the_agent_with_debians_numpy_and_tflite_runtime_2_11(armhf: Installed):
    result, board = armhf.result, armhf.board
    assert result.returncode == 0, result.stdout + result.stderr
    probe = board.python(
        "-c",
        "import json, platform, sys, numpy, cryptography, tflite_runtime, edgekit.runtime as r;"
        "print(json.dumps([platform.machine(), sys.version_info[:2], numpy.__version__, numpy.__file__,"
        " cryptography.__version__, tflite_runtime.__version__, r.available_runtimes()]))",
    )
    assert probe.returncode == 0, probe.stderr
    machine, python, numpy_version, numpy_file, crypto, tflite, runtimes = json.loads(probe.stdout)
    assert (machine, python) == ("armv7l", [3, 9])
    assert numpy_version == "1.19.5" and numpy_file.startswith("/usr/lib/python3/dist-packages/")
    assert crypto == "3.3.2" and tflite == "2.11.0"
    assert runtimes == ["tflite_runtime"]
    version = board.run("/opt/edgekit/bin/edgekit-agent", "--version")
    assert version.returncode == 0 and version.stdout.startswith("edgekit"), version.stderr


def test_x86_digits_bundles_install_on_armhf_pass_their_health_checks_and_predict_like_x86(
    armhf: Installed, models, tmp_path
):
    board = armhf.board
    assert armhf.result.returncode == 0, armhf.result.stdout + armhf.result.stderr
    key = SigningKey.generate()
    sources = {
        "digits-int8": (models.int8, models.data_npz, models.x_test[:40, None]),
        "digits-fp32": (models.fp32, models.data_npz, models.x_test[:40, None]),
    }
    bundles_job(board.host / "job", sources, key)
    # tflite-runtime 2.11's armv7 int8 kernels round differently from LiteRT's on x86: measured,
    # one output value in 400 two steps of the output scale away (2/256), past the health check's
    # 1.5 steps; the health check's own samples pass, and every input gets the same class. So the
    # int8 outputs are held to 2 steps and the same class; fp32 to the health-check tolerance.
    worst = assert_board_predicts_like_x86(
        board, board.host / "job", list(sources), key, tmp_path, "tflite_runtime", quanta=2
    )
    print(f"largest difference from x86 on armhf: {worst}")


LOAD = """
import sys
from tflite_runtime.interpreter import Interpreter
Interpreter(model_path=sys.argv[1]).allocate_tensors()
print("loaded")
"""


def test_the_newer_tflite_runtime_wheels_cannot_run_on_bullseye_armhf(armhf: Installed, models):
    """Why the route stops at 2.11.0: the two newer armv7l wheels on the index, each in a
    directory of its own on the same board, fail to load the digits model."""
    board = armhf.board
    assert armhf.result.returncode == 0, armhf.result.stdout + armhf.result.stderr
    (board.host / "digits.tflite").write_bytes(models.fp32.read_bytes())
    failures = {}
    for requirement in ARMHF_TFLITE_NEWER:
        target = f"/opt/{requirement.replace('==', '-')}"
        put = board.python(
            *("-m", "pip", "install", "--no-index", "--find-links", "/host/wheels", "--no-deps"),
            *("--target", target, requirement),
        )
        assert put.returncode == 0, put.stderr
        loaded = board.run(
            "/opt/edgekit/bin/python", "-c", LOAD, "/host/digits.tflite", env={"PYTHONPATH": target}
        )
        assert loaded.returncode != 0 and "loaded" not in loaded.stdout, loaded.stdout
        failures[requirement] = loaded.stderr
    # bullseye's libstdc++ is GCC 10's; 2.12.0 was built with a newer one.
    assert "version `GLIBCXX_3.4.29' not found" in failures["tflite-runtime==2.12.0"]
    # 2.13.0 was built against numpy >= 1.20 (C API 0xe); Debian bullseye's numpy is 1.19.5 (0xd).
    assert (
        "module compiled against API version 0xe but this version of numpy is 0xd"
        in failures["tflite-runtime==2.13.0"]
    )
