"""kill -9 at any moment of an install leaves a device that boots into a complete, verified model.

A real ``edgekit-agent install`` process is killed with SIGKILL at a random moment of its run,
many times in a row on the same state directory, alternating bundles and versions; after every
kill a fresh Agent (a reboot) must serve one of the bundles, verified against its signed
manifest, giving exactly that bundle's model outputs.

Each install is its own process, forked from a server that has already imported edgekit and
the model runtime (a zygote), so an iteration costs the install, not Python's start-up: the
kill lands in the install itself, and 60 iterations take seconds, not minutes.
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

ITERATIONS = 60
# Reads one line per install (its CLI arguments, tab-separated), forks a child that runs the
# real `edgekit-agent` CLI in a fresh process, prints the child's pid, and on the next line
# (sent after the kill) reaps it and prints how it ended (exit code, or minus the signal).
ZYGOTE = """
import os, sys
from edgekit.agent.cli import main
from edgekit.runtime import available_runtimes
available_runtimes()  # import the model runtime once, here, not in every install
print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the CLI's output is not the protocol's
        code = 0
        try:
            main(line.rstrip("\\n").split("\\t"))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        os._exit(code)
    print(pid, flush=True)
    sys.stdin.readline()  # reaped only when told: until then a kill -9 cannot hit a reused pid
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


class Installer:
    """The zygote: ``start(bundle)`` forks an install and returns its pid; ``wait()`` its end."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.process = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "EDGEKIT_THREADS": "1"},
            text=True,
        )
        assert self.readline() == "ready"

    def readline(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def start(self, bundle: Path) -> int:
        assert self.process.stdin is not None
        args = ["install", str(bundle), "--config", str(self.config), "--allow-downgrade"]
        self.process.stdin.write("\t".join(args) + "\n")
        self.process.stdin.flush()
        return int(self.readline())

    def wait(self) -> int:
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        return int(self.readline())

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


def expected(model_path: Path, x: np.ndarray) -> np.ndarray:
    content = model_path.read_bytes()
    info = inspect_tflite(content)
    (spec,), (out,) = info.inputs, info.outputs
    return dequantize(Model(content, threads=1).run([quantize(x.reshape(spec.shape), spec)])[0], out)


def test_kill_9_at_random_moments_of_installs_never_leaves_a_broken_device(config_path, bundles, models):
    with Agent.from_config(config_path, background=False) as agent:
        agent.install(bundles.v1)
    outputs = {
        "1.0.0": expected(models.fp32, models.x_test[0]),
        "2.0.0": expected(models.int8, models.x_test[0]),
        "3.0.0": expected(models.fp32, models.x_test[0]),
    }
    versions = {bundles.v1: "1.0.0", bundles.v2: "2.0.0", bundles.v3: "3.0.0"}
    pointer = config_path.parent / "state" / "installed.json"
    bundles_dir = pointer.parent / "bundles"
    installer = Installer(config_path)
    try:
        # How long an install takes here from the fork to its commit (the pointer's mtime).
        offsets = []
        for bundle in (bundles.v2, bundles.v3, bundles.v1):
            began = time.time()
            installer.start(bundle)
            assert installer.wait() == 0
            offsets.append(pointer.stat().st_mtime - began)
        span = sorted(offsets)[1] * 1.2  # the median: the first install warms caches
        serving = "1.0.0"

        rng = random.Random(1234)
        early = late = completed = streak = interrupted = 0
        for _ in range(ITERATIONS):
            target = rng.choice([b for b, v in versions.items() if v != serving])
            pid = installer.start(target)
            # A random moment from the fork to a little after the commit: startup recovery,
            # verification, extraction, load, health check, commit, clean-up. The sleep IS the
            # random moment; there is no event to wait for.
            time.sleep(rng.uniform(0.0, span))
            os.kill(pid, signal.SIGKILL)
            code = installer.wait()
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
    finally:
        installer.close()
    assert early >= 1 and late + completed >= 1, (early, late, completed)
    print(
        f"{ITERATIONS} kills: before commit {early}, after {late}, completed {completed}, "
        f"mid-install leftovers {interrupted}"
    )
