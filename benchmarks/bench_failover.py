"""Rollout-controller failover: two `edgekit fleet serve` on one PostgreSQL registry, the leader
killed with -9 (its whole process group: the machine is gone), until the other leads.

    .venv/bin/python benchmarks/bench_failover.py [--runs 5] [--json]

Each run: the surviving service of the previous run leads; a new one starts beside it as the
follower; the leader is killed; measured from the kill until the follower holds the
``rollout-controller`` role (the pid written with it). Median of the runs.

The baseline, measured in the same run: a cold election, from starting a service on a database
with no leader until it leads (connect, migrate-check, ingest up, first try of the role). The
ratio failover / cold election says how much of a takeover is waiting for the dead leader's lock
to be freed, as against starting up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import Mosquitto, free_port

POSTGRES = os.environ.get("EDGEKIT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
BIN = Path(sys.executable).parent
COMMAND = [str(BIN / "edgekit"), "--log-level", "info", "fleet", "serve", "--http-port", "0", "--json"]


def serve(broker: str, registry: str, home: Path, log: Path) -> subprocess.Popen[str]:
    """A `fleet serve` in a process group of its own; returns once it printed its URLs."""
    process = subprocess.Popen(
        [*COMMAND, "--broker", broker, "--registry", registry, "--group", f"g{uuid.uuid4().hex[:6]}"],
        stdout=subprocess.PIPE,
        stderr=log.open("ab"),
        text=True,
        env={**os.environ, "EDGEKIT_HOME": str(home)},
        start_new_session=True,
    )
    assert process.stdout is not None
    if not process.stdout.readline():
        raise SystemExit(f"fleet serve did not start; see {log}")
    return process


def leader_pid(control: Any) -> Optional[int]:
    return control.lock_pid("role:rollout-controller")


def wait_leader(control: Any, pid: int, timeout: float = 60.0) -> float:
    """Seconds until ``pid`` holds the role (polled every 10 ms: the lock lives in the database,
    and nothing announces it to another process)."""
    start = time.monotonic()
    while leader_pid(control) != pid:
        if time.monotonic() - start > timeout:
            raise SystemExit(f"pid {pid} did not lead within {timeout:g}s")
        time.sleep(0.01)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import psycopg
    from edgekit.fleet.control import ControlPlane

    work = Path(tempfile.mkdtemp(prefix="edgekit-failover-"))
    home = work / "home"
    subprocess.run(
        [str(BIN / "edgekit"), "keys", "init"], env={**os.environ, "EDGEKIT_HOME": str(home)}, check=True
    )
    name = f"edgekit_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    registry = f"{POSTGRES.rsplit('/', 1)[0]}/{name}"
    broker = Mosquitto(port=free_port(), directory=work / "mosquitto")
    broker.directory.mkdir()
    broker.start()
    processes: list[subprocess.Popen[str]] = []
    try:
        control = ControlPlane.open(registry)
        started = time.monotonic()
        leader = serve(broker.url, registry, home, work / "serve.log")
        processes.append(leader)
        wait_leader(control, leader.pid)
        cold = time.monotonic() - started  # start and election
        takeovers = []
        for run in range(args.runs):
            follower = serve(broker.url, registry, home, work / "serve.log")
            processes.append(follower)
            os.killpg(leader.pid, signal.SIGKILL)
            killed = time.monotonic()
            leader.wait(10)
            wait_leader(control, follower.pid)
            takeovers.append(time.monotonic() - killed)
            print(f"run {run + 1}: the follower led {takeovers[-1]:.2f} s after the kill", file=sys.stderr)
            leader = follower
        median = statistics.median(takeovers)
        result = {
            "runs": args.runs,
            "failover_s": [round(t, 3) for t in takeovers],
            "failover_median_s": round(median, 3),
            "cold_election_s": round(cold, 3),
            "ratio_failover_to_cold": round(median / cold, 3),
        }
        control.close()
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        broker.stop()
        with psycopg.connect(POSTGRES, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"failover (kill -9 of the leader -> the other leads), median of {args.runs}: "
            f"{result['failover_median_s']:.2f} s (runs {', '.join(f'{t:.2f}' for t in takeovers)}); "
            f"cold election {cold:.2f} s; ratio {result['ratio_failover_to_cold']:.2f}x"
        )


if __name__ == "__main__":
    main()
