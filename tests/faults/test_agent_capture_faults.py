"""Capture under faults: a full disk never stops serving; kill -9 in the middle of captures
leaves whole records only and never lets more through than the policy's hourly cap."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from edgekit.agent import Agent
from edgekit.capture import CaptureKey, new_capture_policy, open_record, sign_capture_policy
from small_fs import fill, small_filesystem

CHILD = """
import sys
from edgekit.agent import Agent
import numpy as np
agent = Agent.from_config(sys.argv[1], background=False)
x = np.load(sys.argv[2])
agent.predict(x[0])
print("ready", flush=True)
i = 0
while True:
    agent.predict(x[i % len(x)])
    i += 1
"""


def _apply(agent: Agent, key, owner: CaptureKey, **kw: object) -> None:
    kw.setdefault("max_per_hour", 1000)
    policy = new_capture_policy(
        "lab", seq=1, recipient=owner.public_raw, triggers=("sample",), sample_rate=1.0, **kw
    )  # type: ignore[arg-type]
    agent.capture.apply(sign_capture_policy(policy, key))


def test_a_full_disk_during_capture_never_stops_serving(make_config, bundles, models, key, tmp_path):
    owner = CaptureKey.generate()
    with small_filesystem(tmp_path / "small", 2048) as (mount, _):
        path = make_config("full")
        with Agent.from_config(path, background=False, state_dir=str(mount / "state")) as agent:
            agent.install(bundles.v1)
            _apply(agent, key, owner)
            filler = fill(mount)
            outs = [agent.predict(x)[0] for x in models.x_test[:20]]
            assert len(outs) == 20 and agent.capture.stats.failed > 0  # served all, kept none
            filler.unlink()
            agent.predict(models.x_test[0])
            assert agent.capture.stats.captured >= 1
            for seq in agent.capture.pending(100, 0):
                open_record(agent.capture.read(seq) or b"", owner)  # whole records only


def test_kill_9_during_capture_leaves_whole_records_and_never_exceeds_the_cap(
    make_config, bundles, models, key, tmp_path
):
    owner = CaptureKey.generate()
    path = make_config("kill9")
    with Agent.from_config(path, background=False) as agent:
        agent.install(bundles.v1)
        _apply(agent, key, owner, max_per_hour=60)
        state = agent.capture.directory
    inputs = tmp_path / "x.npy"
    import numpy as np

    np.save(inputs, models.x_test[:50])
    rng = random.Random(7)
    for _ in range(8):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(inputs)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "EDGEKIT_THREADS": "1"},
            text=True,
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.3))  # the random moment of the kill: no event to wait for
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        with Agent.from_config(path, background=False) as agent:  # a reboot
            cap = agent.capture
            assert not any(p.name.endswith(".tmp") for p in cap.records.iterdir())
            for seq in cap.pending(10_000, 0):
                open_record(cap.read(seq) or b"", owner)
            slots = json.loads((state / "hour.json").read_bytes())["slots"]
            assert len(cap) <= len(slots) <= 60
    with Agent.from_config(path, background=False) as agent:  # fill the hour, then try for more
        for x in models.x_test[:200]:
            agent.predict(x)
        assert len(agent.capture) <= 60 and agent.capture.stats.capped > 0
    assert len(json.loads((state / "hour.json").read_bytes())["slots"]) == 60  # reached, and held
