"""The rollout controller of `fleet up`: it finishes rollouts that `push` left running, with real
agents on the embedded broker, and never drives a rollout someone else is driving."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from edgekit.errors import RolloutError
from edgekit.fleet.controller import RolloutController
from edgekit.fleet.push import driving, rollout_path
from edgekit.fleet.rollout import Rollout, RolloutPolicy, start
from test_push import all_serving, edgekit, push_and_wait
from watcher import Watcher

DEVICES = ["cam-1", "cam-2", "cam-3"]


def push_canary(target: Path, broker: str, *extra: str) -> None:
    """`edgekit push TARGET --canary 1 --soak 1` without --wait: it tells the canary and exits."""
    result = edgekit(
        "push", str(target), "--fleet", "lab", "--canary", "1", "--soak", "1", "--broker", broker, *extra
    )
    assert result.returncode == 0, result.stderr


def test_the_controller_finishes_a_canary_rollout_and_aborts_a_bad_one(
    embedded, agents, digits_models, edgekit_home, tmp_path
):
    watcher = Watcher(embedded.url)
    controller = RolloutController(embedded.url, edgekit_home, interval=0.2)
    try:
        for device in DEVICES:
            agents.start(device)
        watcher.wait_for(lambda _: all(watcher.states(d) for d in DEVICES))
        push_and_wait(digits_models.fp32, embedded.url, "--name", "digits", "--version", "1.0.0")
        push_canary(digits_models.int8, embedded.url, "--name", "digits", "--version", "2.0.0")
        status = json.loads(edgekit("rollout", "status", "--fleet", "lab", "--json").stdout)
        assert status["phase"] == "canary"  # and nobody drives it on

        controller.start()
        assert controller.wait_finished("lab", timeout=120) == ("done", None)
        watcher.wait_for(all_serving(watcher, DEVICES, "2.0.0"))
        assert Rollout.load(rollout_path(edgekit_home, "lab")).phase == "done"

        # A bundle whose health check cannot pass: the controller aborts, the canary goes back.
        from edgekit import TrustedKeys
        from edgekit.catalog import Catalog
        from edgekit.keys import load_signing_key
        from helpers import make_unhealthy

        key = load_signing_key(edgekit_home)
        bad = tmp_path / "bad.ekb"
        make_unhealthy(Catalog(edgekit_home, TrustedKeys([key.public])).path("digits", "1.0.0"), key, bad)
        controller.finished.clear()
        push_canary(bad, embedded.url)
        phase, reason = controller.wait_finished("lab", timeout=120) or ("", "")
        assert phase == "aborted" and "cam-1 failed to install" in (reason or "")
        watcher.wait_for(watcher.serving("2.0.0", "cam-1"))
        assert all(watcher.states(d)[-1].bundle_version == "2.0.0" for d in DEVICES)
        assert controller.errors == 0
    finally:
        controller.stop()
        watcher.close()


def saved_rollout(home: Path) -> Path:
    """An unfinished rollout of a fleet with no devices: one step finishes it."""
    rollout, _ = start("lab", "b" * 64, "digits@1.0.0", [], None, RolloutPolicy(canary=0), time.time())
    path = rollout_path(home, "lab")
    rollout.save(path)
    return path


def test_a_rollout_with_a_driver_is_left_alone_until_the_driver_is_gone(mosquitto, edgekit_home):
    assert edgekit("keys", "init").returncode == 0
    path = saved_rollout(edgekit_home)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from edgekit.fleet.push import driving\n"
            "with driving(Path(sys.argv[1]), 'lab', 'edgekit push --wait'):\n"
            "    print('held', flush=True); sys.stdin.read()",
            str(edgekit_home),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with RolloutController(mosquitto.url, edgekit_home, interval=0.2) as controller:
            controller.tick()  # as its own thread does, which is refused the same way
            assert Rollout.load(path).phase == "fleet"  # not touched: someone drives it
            assert controller.finished == [] and controller.errors == 0
            resumed = edgekit("rollout", "resume", "--fleet", "lab", "--broker", mosquitto.url, timeout=60)
            assert resumed.returncode == 15
            assert f"driven by pid {holder.pid} (edgekit push --wait)" in resumed.stderr
            assert len(resumed.stderr.strip().splitlines()) == 1
            with (
                pytest.raises(RolloutError, match="being driven by"),
                driving(edgekit_home, "lab", "another"),
            ):
                pass
            holder.kill()  # a driver that dies (kill -9) leaves no stale lock behind
            holder.wait(10)
            assert controller.wait_finished("lab", timeout=30) == ("done", None)
            assert Rollout.load(path).phase == "done"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
