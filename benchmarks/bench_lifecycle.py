"""How fast `AgentDaemon.stop()` (what SIGTERM to `edgekit-agent run` calls) ends an agent whose
download is in progress, against stopping an idle agent, same run.

    .venv/bin/python benchmarks/bench_lifecycle.py [--runs 5] [--json]

Each run: a fresh agent (digits fp32 served) follows a real Mosquitto; the bundle it is told to
install has only its manifest on the broker (an upload cut short), and the inactivity timeout
is an hour, so the download would wait that long for its chunks. Measured from calling
``stop()`` until it returns with the worker thread ended (the download cancelled, the last
``offline`` state published, the client closed). Baseline: ``stop()`` of the same agent with no
download. Issue 17's bound: a download is cancelled within 2 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
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

BOUND = 2.0


def wait(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the agent")
        time.sleep(0.01)


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
            operator.publish(Topics().fleet_desired("lab"), sign_desired_state(state, key), retain=True).wait(
                10
            )
        downloads = daemon.state_dir / "downloads" / bundle.bundle_id
        wait(downloads.is_dir)  # the manifest came: the download is under way
    workers = list(daemon._threads)
    began = time.perf_counter()
    daemon.stop(timeout=30)
    took = time.perf_counter() - began
    if any(thread.is_alive() for thread in workers):
        raise SystemExit("stop() returned with the worker still running")
    agent.close()
    return took


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
            idle, cancel = [], []
            for run in range(args.runs):
                idle.append(one_stop(broker.url, key, v1, v2, work, run, downloading=False))
                with MqttClient(broker.url) as operator:  # the next run starts with no desired state
                    operator.publish(Topics().fleet_desired("lab"), b"", retain=True).wait(10)
                cancel.append(one_stop(broker.url, key, v1, v2, work, run, downloading=True))
                with MqttClient(broker.url) as operator:
                    operator.publish(Topics().fleet_desired("lab"), b"", retain=True).wait(10)
        finally:
            broker.stop()
    result = {
        "runs": args.runs,
        "stop_idle_s": statistics.median(idle),
        "stop_downloading_s": statistics.median(cancel),
        "stop_downloading_max_s": max(cancel),
        "ratio": statistics.median(cancel) / statistics.median(idle),
        "bound_s": BOUND,
        "within_bound": max(cancel) <= BOUND,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"stop() of an idle agent, median of {args.runs}:        {result['stop_idle_s']:.3f} s")
    print(
        f"stop() cancelling a download, median of {args.runs}:  {result['stop_downloading_s']:.3f} s "
        f"(max {result['stop_downloading_max_s']:.3f} s; runs {', '.join(f'{t:.3f}' for t in cancel)})"
    )
    print(
        f"ratio downloading / idle: {result['ratio']:.2f}x; bound {BOUND:g} s: "
        f"{'held' if result['within_bound'] else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
