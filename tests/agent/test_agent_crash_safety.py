"""kill -9 at any moment of an install leaves a device that boots into a complete, verified model.

A real ``edgekit-agent install`` process is killed with SIGKILL at a random moment of its run,
many times in a row on the same state directory, alternating bundles and versions; after every
kill a fresh Agent (a reboot) must serve one of the bundles, verified against its signed
manifest, giving exactly that bundle's model outputs.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from edgekit.agent import Agent
from edgekit.runtime import Model, dequantize, quantize
from edgekit.tflite import inspect_tflite

ITERATIONS = 32
DRIVER = (
    "import sys\n"
    "from edgekit.agent.cli import main\n"
    "print('ready', flush=True)\n"  # imports are done: what follows is the install itself
    "main(sys.argv[1:])\n"
)


def expected(model_path: Path, x: np.ndarray) -> np.ndarray:
    content = model_path.read_bytes()
    info = inspect_tflite(content)
    (spec,), (out,) = info.inputs, info.outputs
    return dequantize(Model(content, threads=1).run([quantize(x.reshape(spec.shape), spec)])[0], out)


def start_install(bundle: Path, config: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-c", DRIVER, "install", str(bundle), "--config", str(config), "--allow-downgrade"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "EDGEKIT_THREADS": "1"},
    )
    assert process.stdout is not None
    assert process.stdout.readline() == b"ready\n"
    return process


def test_kill_9_at_random_moments_of_installs_never_leaves_a_broken_device(config_path, bundles, models):
    with Agent.from_config(config_path, background=False) as agent:
        agent.install(bundles.v1)
    outputs = {
        "1.0.0": expected(models.fp32, models.x_test[0]),
        "2.0.0": expected(models.int8, models.x_test[0]),
        "3.0.0": expected(models.fp32, models.x_test[0]),
    }
    versions = {bundles.v1: "1.0.0", bundles.v2: "2.0.0", bundles.v3: "3.0.0"}

    # How long an install takes here from the end of imports to its commit (the pointer's mtime).
    pointer = config_path.parent / "state" / "installed.json"
    offsets = []
    for bundle in (bundles.v2, bundles.v3, bundles.v1):
        process = start_install(bundle, config_path)
        began = time.time()
        assert process.wait(timeout=120) == 0
        offsets.append(pointer.stat().st_mtime - began)
    span = max(offsets) * 1.3
    serving = "1.0.0"

    rng = random.Random(1234)
    early = late = completed = streak = interrupted = 0
    for _ in range(ITERATIONS):
        target = rng.choice([b for b, v in versions.items() if v != serving])
        process = start_install(target, config_path)
        # A random moment from the end of imports to a little after the commit: startup recovery,
        # verification, extraction, load, health check, commit, clean-up.
        time.sleep(rng.uniform(0.0, span))
        process.send_signal(signal.SIGKILL)
        code = process.wait(timeout=60)
        bundles_dir = config_path.parent / "state" / "bundles"
        names = pointer.read_text()
        if any(p.name.startswith(".") or p.name not in names for p in bundles_dir.iterdir()):
            interrupted += 1  # killed between extraction and commit, or during clean-up
        with Agent.from_config(config_path, background=False) as agent:
            status = agent.status()
            assert status.serving, "the device lost its model"
            (out,) = agent.predict(models.x_test[0])
            np.testing.assert_allclose(out, outputs[status.version], rtol=0, atol=1e-6)
            current = agent.store.pointer()["current"]
            agent.store.read_installed(current)  # complete and verified on disk
            leftovers = [p.name for p in agent.store.bundles.iterdir() if p.name.startswith(".")]
            assert leftovers == []
            assert len(list(agent.store.bundles.iterdir())) <= 2
        assert status.version in (serving, versions[target])
        if code != -signal.SIGKILL:
            completed += 1
        elif status.version == serving:
            early += 1  # killed before the commit: the old bundle serves
        else:
            late += 1  # killed after the commit: the new bundle serves
        # Under load an install can take longer than measured: widen the span if kills keep
        # landing before the commit.
        streak = streak + 1 if status.version == serving else 0
        if streak >= 4:
            span *= 1.5
            streak = 0
        serving = status.version
    assert early >= 1 and late + completed >= 1, (early, late, completed)
    print(f"killed before commit {early}, after {late}, completed {completed}, mid-install {interrupted}")
