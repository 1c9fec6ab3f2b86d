"""The rollout controller of `fleet up`: it finishes rollouts that `push` left running, with real
agents on the embedded broker, and never drives a rollout someone else is driving."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from edgekit.errors import RolloutError
from edgekit.fleet.controller import RolloutController
from edgekit.fleet.rollout import RolloutPolicy, start
from test_push import all_serving, catalogued, control_of, edgekit, push_and_wait
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
    control = control_of(edgekit_home)
    controller = RolloutController(embedded.url, edgekit_home, control, interval=0.2)
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
        assert control.rollout("lab").phase == "done"

        # A bundle whose health check cannot pass: the controller aborts, the canary goes back.
        from edgekit.keys import load_signing_key
        from helpers import make_unhealthy

        key = load_signing_key(edgekit_home)
        bad = tmp_path / "bad.ekb"
        make_unhealthy(catalogued(edgekit_home, "digits", "1.0.0", tmp_path / "good.ekb"), key, bad)
        controller.finished.clear()
        push_canary(bad, embedded.url)
        phase, reason = controller.wait_finished("lab", timeout=120) or ("", "")
        assert phase == "aborted" and "cam-1 failed to install" in (reason or "")
        watcher.wait_for(watcher.serving("2.0.0", "cam-1"))
        assert all(watcher.states(d)[-1].bundle_version == "2.0.0" for d in DEVICES)
        assert controller.errors == 0
    finally:
        controller.stop()
        control.close()
        watcher.close()


def saved_rollout(control: Any) -> None:
    """An unfinished rollout of a fleet with no devices: one step finishes it."""
    rollout, _ = start("lab", "b" * 64, "digits@1.0.0", [], None, RolloutPolicy(canary=0), time.time())
    control.save_rollout(rollout, new=True)


HOLD = (
    "import sys; from edgekit.fleet.control import ControlPlane\n"
    "with ControlPlane.open(sys.argv[1], actor=sys.argv[2]).driving(sys.argv[3], sys.argv[4]):\n"
    "    print('held', flush=True); sys.stdin.read()"
)


def hold_lock(url: str, actor: str, fleet: str, holder: str) -> subprocess.Popen[bytes]:
    """A process that holds ``fleet``'s driving lock until killed or its stdin closes."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, url, actor, fleet, holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdout is not None and process.stdout.readline() == b"held\n"
    return process


def test_a_rollout_with_a_driver_is_left_alone_until_the_driver_is_gone(mosquitto, edgekit_home):
    assert edgekit("keys", "init").returncode == 0
    control = control_of(edgekit_home)
    saved_rollout(control)
    holder = hold_lock(control.registry.url, "alice@laptop", "lab", "edgekit push --wait")
    try:
        with RolloutController(mosquitto.url, edgekit_home, control, interval=0.2) as controller:
            controller.tick()  # as its own thread does, which is refused the same way
            assert control.rollout("lab").phase == "fleet"  # not touched: someone drives it
            assert controller.finished == [] and controller.errors == 0
            resumed = edgekit("rollout", "resume", "--fleet", "lab", "--broker", mosquitto.url, timeout=60)
            assert resumed.returncode == 15
            assert f"driven by edgekit push --wait (alice@laptop, pid {holder.pid})" in resumed.stderr
            assert len(resumed.stderr.strip().splitlines()) == 1
            with pytest.raises(RolloutError, match="being driven by"), control.driving("lab", "another"):
                pass
            holder.kill()  # a driver that dies (kill -9) leaves no stale lock behind
            holder.wait(10)
            assert controller.wait_finished("lab", timeout=30) == ("done", None)
            assert control.rollout("lab").phase == "done"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        control.close()
