"""kill -9 at any moment of an install leaves a device that boots into a complete, verified model.

A real ``edgekit-agent install`` process is killed with SIGKILL at a random moment of its run,
many times in a row on the same state directory, alternating bundles and versions; after every
kill a fresh Agent (a reboot) must serve one of the bundles, verified against its signed
manifest, giving exactly that bundle's model outputs.

Each install is its own process, forked from a server that has already imported edgekit and
the model runtime (a zygote), so an iteration costs the install, not Python's start-up: the
kill lands in the install itself, and 60 iterations take seconds, not minutes.

The deployment over MQTT (agent/deployment.py) is killed in each of its states, deterministically:
a real ``edgekit-agent run`` process started with ``EDGEKIT_FAULT_PAUSE_AT=STATE`` (the agent's
fault-injection point) persists STATE, says so on stderr and waits; the test kills it with
SIGKILL there, checks what was persisted, starts the agent again, and waits until it serves
the right bundle with nothing half-installed left in its state directory.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from edgekit import TrustedKeys
from edgekit.agent import Agent
from edgekit.agent.deployment import FAULT_PAUSE_ENV
from edgekit.bundle import read_bundle
from edgekit.runtime import Model, dequantize, quantize
from edgekit.tflite import inspect_tflite
from watcher import watcher

__all__ = ["watcher"]

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


class AgentRun:
    """A real ``edgekit-agent run`` process; its stderr is collected line by line, so a test
    waits for a line (the fault point's) instead of sleeping."""

    def __init__(self, config: Path, pause_at: str | None = None) -> None:
        env = {**os.environ, "EDGEKIT_THREADS": "1"}
        env.pop(FAULT_PAUSE_ENV, None)
        if pause_at is not None:
            env[FAULT_PAUSE_ENV] = pause_at
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgekit.agent.cli", "run", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<exited>")
            self._changed.notify_all()

    def wait_line(self, text: str, timeout: float = 60.0) -> None:
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(text in line for line in self.lines) or "<exited>" in self.lines, timeout
            )
            assert found and any(text in line for line in self.lines), "\n".join(self.lines[-30:])

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(timeout=30) == -signal.SIGKILL
        self._reader.join(30)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0, "\n".join(self.lines[-30:])
        self._reader.join(30)
        assert not any("Traceback" in line for line in self.lines), "\n".join(self.lines)


def persisted_state(state_dir: Path) -> str:
    return json.loads((state_dir / "deployment.json").read_text())["state"]


def assert_nothing_half_installed(config: Path, state_dir: Path, version: str) -> None:
    """After the agent stopped: it serves ``version`` from a complete, verified directory; no
    extraction, download, unpacking directory or third bundle is left."""
    with Agent.from_config(config, background=False) as agent:
        status = agent.status()
        assert status.version == version
        current = agent.store.pointer()["current"]
        assert current is not None
        agent.store.read_installed(current)
        names = sorted(p.name for p in agent.store.bundles.iterdir())
        assert not [n for n in names if n.startswith(".")] and len(names) <= 2, names
    for leftover in ("downloads", "unpacking"):
        directory = state_dir / leftover
        assert not directory.exists() or not list(directory.iterdir()), list(directory.iterdir())


@pytest.mark.parametrize(
    "state", ["idle", "fetching", "verifying", "installing", "health-checking", "serving"]
)
def test_kill_9_in_each_deployment_state_resumes_and_serves_the_desired_bundle(
    state, mosquitto, watcher, make_config, bundles, key
):
    config = make_config("pi-01", broker=mosquitto.url, telemetry_interval=3600)
    state_dir = config.parent / "pi-01-state"
    with Agent.from_config(config, background=False) as agent:
        agent.install(bundles.v1)
    watcher.publish_bundle(bundles.v2, key)
    if state != "idle":
        watcher.desire(key, bundles.v2, seq=1)
    first = AgentRun(config, pause_at=state)
    try:
        first.wait_line(f"edgekit fault point: paused at {state}")
    finally:
        first.kill9()
    if state != "idle":  # persisted before it ran
        assert persisted_state(state_dir) == state
    else:
        watcher.desire(key, bundles.v2, seq=1)
    again = AgentRun(config)
    try:
        watcher.wait_for(watcher.serving("2.0.0"), timeout=60)
    finally:
        again.stop()
    assert persisted_state(state_dir) == "serving"
    assert_nothing_half_installed(config, state_dir, "2.0.0")


def test_a_health_check_killed_twice_is_rolled_back_and_the_old_bundle_serves(
    mosquitto, watcher, make_config, bundles, key
):
    """A model that kills the agent while it loads (out of memory, a crash in the runtime) must
    not put the device in a restart loop: one interruption is retried, the second rolls back."""
    config = make_config("pi-01", broker=mosquitto.url, telemetry_interval=3600)
    state_dir = config.parent / "pi-01-state"
    with Agent.from_config(config, background=False) as agent:
        agent.install(bundles.v1)
    watcher.publish_bundle(bundles.v2, key)
    watcher.desire(key, bundles.v2, seq=1)
    for _ in range(2):
        run = AgentRun(config, pause_at="health-checking")
        try:
            run.wait_line("edgekit fault point: paused at health-checking")
        finally:
            run.kill9()
    again = AgentRun(config)
    try:
        failed = watcher.wait_for(lambda _: [s for s in watcher.states() if s.status == "failed"], timeout=60)
        report = failed[-1]  # type: ignore[index]
        assert report.bundle_version == "1.0.0"
        assert "stopped dead 2 times while checking the health of digits@2.0.0" in (report.error or "")
        events = watcher.wait_for(
            lambda _: [e for e in watcher.records("events") if e["kind"] == "install_failed"]
        )
        assert "digits@2.0.0" in events[0]["message"]  # type: ignore[index]
    finally:
        again.stop()
    assert persisted_state(state_dir) == "rolled-back"
    assert_nothing_half_installed(config, state_dir, "1.0.0")


def test_kill_9_after_a_rollback_keeps_it_rolled_back(mosquitto, watcher, make_config, bundles, key):
    """Killed once the deployment of an unhealthy bundle was rolled back: the agent starts
    serving the old bundle and does not try the unhealthy one again; a new desired state does."""
    config = make_config("pi-01", broker=mosquitto.url, telemetry_interval=3600)
    state_dir = config.parent / "pi-01-state"
    with Agent.from_config(config, background=False) as agent:
        agent.install(bundles.v1)
    unhealthy = read_bundle(bundles.unhealthy, TrustedKeys([key.public])).bundle_id
    watcher.publish_bundle(bundles.unhealthy, key)
    watcher.publish_bundle(bundles.v2, key)
    watcher.desire(key, bundles.unhealthy, seq=1)
    first = AgentRun(config, pause_at="rolled-back")
    try:
        first.wait_line("edgekit fault point: paused at rolled-back")
    finally:
        first.kill9()
    assert persisted_state(state_dir) == "rolled-back"
    seen = len(watcher.states())
    again = AgentRun(config)
    try:
        watcher.desire(key, bundles.v2, seq=2)
        watcher.wait_for(watcher.serving("2.0.0"), timeout=60)
    finally:
        again.stop()
    retried = [s for s in watcher.states()[seen:] if s.target_id == unhealthy]
    assert retried == []
    assert_nothing_half_installed(config, state_dir, "2.0.0")


def test_sigterm_cancels_a_download_in_progress_and_the_agent_exits_cleanly(
    mosquitto, watcher, make_config, bundles, key
):
    """The chunks never come and the inactivity timeout is an hour: SIGTERM still stops the
    agent, cancelling the download (the log says so), and the next start resumes it."""
    from edgekit.transfer import start_upload

    config = make_config("pi-01", broker=mosquitto.url, telemetry_interval=3600, download_stall_timeout=3600)
    state_dir = config.parent / "pi-01-state"
    with Agent.from_config(config, background=False) as agent:
        agent.install(bundles.v1)
    start_upload(watcher.client, read_bundle(bundles.v2, TrustedKeys([key.public])))  # manifest only
    watcher.desire(key, bundles.v2, seq=1)
    run = AgentRun(config)
    watcher.wait_for(lambda _: any(s.status == "downloading" for s in watcher.states()), timeout=60)
    run.stop()  # SIGTERM; exit code 0 within a generous bound
    assert any("the download of digits@2.0.0 stops with the agent" in line for line in run.lines)
    assert persisted_state(state_dir) == "fetching"
    watcher.publish_bundle(bundles.v2, key)
    again = AgentRun(config)
    try:
        watcher.wait_for(watcher.serving("2.0.0"), timeout=60)
    finally:
        again.stop()
    assert_nothing_half_installed(config, state_dir, "2.0.0")
