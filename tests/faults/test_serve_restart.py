"""The fleet service is killed (-9, with its ingest workers) while agents keep publishing, and
started again against the same registry: with persistent sessions (`--session-expiry`) the
broker kept what arrived meanwhile, so the registry ends with every telemetry seq of every
device, none missing and none counted twice. Real agent processes, a real Mosquitto, the real
`edgekit fleet serve`."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from edgekit.fleet.registry import Registry
from edgekit.fleet.registry.models import Telemetry
from sqlalchemy import select
from watcher import Watcher

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fleet"))
from test_push import Fleet, edgekit, push_and_wait
from test_serve import Served, wait_until

DEVICES = ["cam-1", "cam-2"]


def stored_seqs(url: str) -> dict[str, list[int]]:
    registry = Registry(url, migrate=False)
    try:
        with registry.session() as session:
            rows = session.execute(select(Telemetry.device, Telemetry.seq)).all()
    finally:
        registry.close()
    seqs: dict[str, list[int]] = {d: [] for d in DEVICES}
    for device, seq in rows:
        seqs[device].append(seq)
    return {d: sorted(s) for d, s in seqs.items()}


def published_seqs(watcher: Watcher, device: str) -> list[int]:
    return [r["seq"] for r in watcher.records("telemetry", device)]


def test_a_killed_fleet_service_resumes_ingest_with_no_gap_and_nothing_counted_twice(
    mosquitto, edgekit_home, tmp_path, models
):
    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    args = ["--broker", mosquitto.url, "--registry", registry, "--session-expiry", "60"]
    assert edgekit("keys", "init").returncode == 0
    watcher = Watcher(mosquitto.url)  # sees every telemetry record the agents publish
    fleet = Fleet(tmp_path, mosquitto.url, edgekit_home)
    first = Served(args, tmp_path / "serve-0.log", new_session=True)
    second = None
    try:
        for device in DEVICES:
            fleet.start(device)
        push_and_wait(models.fp32, mosquitto.url, "--version", "1.0.0")  # serving: windows every 0.5 s
        wait_until(
            lambda: all(len(s) >= 2 for s in stored_seqs(registry).values()), first, "telemetry stored"
        )

        os.killpg(first.process.pid, signal.SIGKILL)  # the service and its workers, mid-batch or not
        first.process.wait(10)
        committed = sum(len(s) for s in stored_seqs(registry).values())
        at_kill = {d: len(published_seqs(watcher, d)) for d in DEVICES}
        # The agents go on: several windows each are published while no ingest is connected.
        watcher.wait_for(lambda _: all(len(published_seqs(watcher, d)) >= at_kill[d] + 4 for d in DEVICES))
        while_down = {d: published_seqs(watcher, d)[at_kill[d] :] for d in DEVICES}

        second = Served(args, tmp_path / "serve-1.log", new_session=True)
        wait_until(
            lambda: all(set(while_down[d]) <= set(stored_seqs(registry)[d]) for d in DEVICES),
            second,
            "the windows published while the service was down stored",
        )
        fleet.stop()  # no more telemetry; the last windows reach the registry before the service stops
        wait_until(
            lambda: all(set(published_seqs(watcher, d)) <= set(stored_seqs(registry)[d]) for d in DEVICES),
            second,
            "every published window stored",
        )
        final = second.stop()
    finally:
        fleet.stop()
        watcher.close()
        for served in (first, second):
            if served is not None and served.process.poll() is None:
                os.killpg(served.process.pid, signal.SIGKILL)
                served.process.wait(10)
    stored = stored_seqs(registry)
    for device in DEVICES:
        seqs = stored[device]
        # No gap: every seq from the first stored to the last, and each exactly once.
        assert seqs == list(range(seqs[0], seqs[-1] + 1)), device
        assert set(while_down[device]) <= set(seqs)
    # Nothing counted twice: the restarted service counted as new exactly the rows that were not
    # committed before the kill; redeliveries of committed ones are duplicates, not ingested.
    assert committed + final["telemetry"] == sum(len(s) for s in stored.values())
    assert final["rejected"] == 0
