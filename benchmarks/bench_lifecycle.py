"""How fast `AgentDaemon.stop()`, and SIGTERM to an `edgekit-agent run` process, end an agent whose
download is in progress, against stopping an idle agent, same run.

    .venv/bin/python benchmarks/bench_lifecycle.py [--runs 5] [--json]

Each run: a fresh agent (digits fp32 served) follows a real Mosquitto; the bundle it is told to
install has only its manifest on the broker (an upload cut short), and the inactivity timeout
is an hour, so the download would wait that long for its chunks. Measured from calling
``stop()`` until it returns with the worker thread ended (the download cancelled, the last
``offline`` state published, the client closed). Baseline: ``stop()`` of the same agent with no
download. Issue 17's bound: a download is cancelled within 2 s.

The SIGTERM case: the same, with the agent a real ``edgekit-agent run --config`` process (this
venv's console script) followed through the broker; measured from ``kill(SIGTERM)`` until the
process has exited (its exit code must be 0). Baseline: SIGTERM to the same kind of process with
no download.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import digits_models
from device_fixtures import write_config
from edgekit import SigningKey, TrustedKeys, create_bundle
from edgekit.agent import Agent
from edgekit.agent.daemon import AgentDaemon
from edgekit.bundle import read_bundle
from edgekit.desired import new_desired_state, sign_desired_state
from edgekit.mqtt import MqttClient
from edgekit.topics import Topics
from edgekit.transfer import start_upload
from helpers import Mosquitto, free_port
from watcher import Watcher

BOUND = 2.0


def wait(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the agent")
        time.sleep(0.01)


def start_endless_download(broker: str, key: SigningKey, v2: Path, run: int, state_dir: Path) -> None:
    """Desire v2 (as 2.0.RUN) with only its manifest on the broker, and wait until the agent
    whose state directory is ``state_dir`` is downloading it: its chunks never come."""
    bundle = read_bundle(v2, TrustedKeys([key.public]))
    with MqttClient(broker) as operator:
        start_upload(operator, bundle)  # the manifest only
        state = new_desired_state(
            "lab",
            bundle_sha256=bundle.bundle_id,
            bundle_name="digits",
            bundle_version=f"2.0.{run}",
            seq=run + 1,
        )
        operator.publish(Topics().fleet_desired("lab"), sign_desired_state(state, key), retain=True).wait(10)
    wait((state_dir / "downloads" / bundle.bundle_id).is_dir)  # the manifest came: under way


def one_stop(
    broker: str, key: SigningKey, v1: Path, v2: Path, work: Path, run: int, downloading: bool
) -> float:
    config = write_config(
        work / f"agent-{run}-{downloading}.toml",
        key,
        work / f"state-{run}-{downloading}",
        broker=broker,
        telemetry_interval=3600,
        download_stall_timeout=3600,
    )
    agent = Agent.from_config(config, background=False)
    agent.install(v1)
    daemon = AgentDaemon(agent).start()
    wait(daemon.client.wait_connected)
    if downloading:
        start_endless_download(broker, key, v2, run, daemon.state_dir)
    workers = list(daemon._threads)
    began = time.perf_counter()
    daemon.stop(timeout=30)
    took = time.perf_counter() - began
    if any(thread.is_alive() for thread in workers):
        raise SystemExit("stop() returned with the worker still running")
    agent.close()
    return took


def one_sigterm(
    broker: str, key: SigningKey, v1: Path, v2: Path, work: Path, run: int, downloading: bool
) -> float:
    """SIGTERM to `edgekit-agent run` serving v1 (and, when ``downloading``, fetching v2 whose
    chunks never come): seconds until the process has exited."""
    name = f"cli-{run}-{downloading}"
    state_dir = work / f"state-{name}"
    config = write_config(
        work / f"agent-{name}.toml",
        key,
        state_dir,
        broker=broker,
        telemetry_interval=3600,
        download_stall_timeout=3600,
    )
    with Agent.from_config(config, background=False) as agent:
        agent.install(v1)
    agent_cli = Path(sys.executable).with_name("edgekit-agent")
    watcher = Watcher(broker)
    log = (work / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [str(agent_cli), "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        watcher.wait_for(watcher.serving("1.0.0"), timeout=60)
        if downloading:
            start_endless_download(broker, key, v2, run, state_dir)
        began = time.perf_counter()
        os.kill(process.pid, signal.SIGTERM)
        code = process.wait(timeout=60)
        took = time.perf_counter() - began
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
        watcher.client.close()
    if code != 0:
        raise SystemExit(
            f"edgekit-agent run exited {code} on SIGTERM: {(work / f'{name}.log').read_text()[-2000:]}"
        )
    return took


def clear_desired(broker: str) -> None:
    """The next run starts with no desired state."""
    with MqttClient(broker) as operator:
        operator.publish(Topics().fleet_desired("lab"), b"", retain=True).wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    models = digits_models()
    with tempfile.TemporaryDirectory() as tmp_name:
        work = Path(tmp_name)
        broker = Mosquitto(port=free_port(), directory=work / "mosquitto")
        broker.directory.mkdir()
        broker.start()
        try:
            key = SigningKey.generate()
            v1, v2 = work / "v1.ekb", work / "v2.ekb"
            create_bundle(models / "digits_fp32.tflite", name="digits", version="1.0.0", key=key, output=v1)
            create_bundle(models / "digits_int8.tflite", name="digits", version="2.0.0", key=key, output=v2)
            idle, cancel, term_idle, term_cancel = [], [], [], []
            for run in range(args.runs):
                idle.append(one_stop(broker.url, key, v1, v2, work, run, downloading=False))
                clear_desired(broker.url)
                cancel.append(one_stop(broker.url, key, v1, v2, work, run, downloading=True))
                clear_desired(broker.url)
                term_idle.append(one_sigterm(broker.url, key, v1, v2, work, run, downloading=False))
                clear_desired(broker.url)
                term_cancel.append(one_sigterm(broker.url, key, v1, v2, work, run, downloading=True))
                clear_desired(broker.url)
        finally:
            broker.stop()
    result = {
        "runs": args.runs,
        "stop_idle_s": statistics.median(idle),
        "stop_downloading_s": statistics.median(cancel),
        "stop_downloading_max_s": max(cancel),
        "ratio": statistics.median(cancel) / statistics.median(idle),
        "sigterm_idle_s": statistics.median(term_idle),
        "sigterm_downloading_s": statistics.median(term_cancel),
        "sigterm_downloading_max_s": max(term_cancel),
        "sigterm_ratio": statistics.median(term_cancel) / statistics.median(term_idle),
        "bound_s": BOUND,
        "within_bound": max(cancel) <= BOUND and max(term_cancel) <= BOUND,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"stop() of an idle agent, median of {args.runs}:        {result['stop_idle_s']:.3f} s")
    print(
        f"stop() cancelling a download, median of {args.runs}:  {result['stop_downloading_s']:.3f} s "
        f"(max {result['stop_downloading_max_s']:.3f} s; runs {', '.join(f'{t:.3f}' for t in cancel)})"
    )
    print(f"ratio downloading / idle: {result['ratio']:.2f}x")
    print(f"SIGTERM to an idle `edgekit-agent run`, median of {args.runs}: {result['sigterm_idle_s']:.3f} s")
    print(
        f"SIGTERM cancelling a download, median of {args.runs}:       {result['sigterm_downloading_s']:.3f} s "
        f"(max {result['sigterm_downloading_max_s']:.3f} s; runs {', '.join(f'{t:.3f}' for t in term_cancel)})"
    )
    print(
        f"ratio downloading / idle: {result['sigterm_ratio']:.2f}x; bound {BOUND:g} s (both cases): "
        f"{'held' if result['within_bound'] else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
