"""Alerts: how soon a killed device reaches the owner's mailbox, and what evaluating alerts costs
ingest.

    .venv/bin/python benchmarks/bench_alerts.py [--kills 10] [--messages 50000] [--repeats 3]

1. **Alert latency.** A real Mosquitto, the fleet service (one ingest worker, alerts evaluated
   every 2 s, the default), a real agent process (``edgekit-agent run``) and a real SMTP server
   (aiosmtpd), with ``offline_after=10s`` and ``clear_after=0``. Each round kills the agent with
   SIGKILL and times until the "offline" mail is in the SMTP server, then restarts the agent
   and waits for the "back online" mail. Median of ``--kills`` rounds; the floor (baseline) is
   ``offline_after`` itself, so the overhead is latency - 10 s (goal: latency <= 15 s).
2. **Ingest with evaluation on vs off.** The telemetry ingest run of bench_ingest.py (a replay
   publisher, M records, 100 devices, SQLite, one worker) with the service's alerts on
   (evaluated every 0.5 s, four times the default rate, a webhook channel) and off, alternated
   ``--repeats`` times in the same run; the ratio of the medians (goal >= 0.95).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fleet"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from alert_receivers import SmtpServer, WebhookReceiver
from bench_ingest import ingest_run
from helpers import Mosquitto, free_port

BIN = Path(sys.executable).parent
OFFLINE_AFTER = 10.0


def agent_config(root: Path, device: str, broker: str, pem: str) -> Path:
    path = root / f"{device}.toml"
    path.write_text(
        f'device = "{device}"\nfleet = "bench"\nstate_dir = "{root / device}"\nbroker = "{broker}"\n'
        f"threads = 1\ntrusted_keys = '''\n{pem}'''\n"
    )
    return path


def start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "edgekit-agent"), "run", "--config", str(config)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def alert_latency(broker: str, tmp: Path, kills: int) -> list[float]:
    from edgekit.fleet.alerts import AlertStore, email_channel
    from edgekit.fleet.registry import Registry
    from edgekit.fleet.service import FleetService, ServiceConfig
    from edgekit.keys import load_own_public_key

    home = tmp / "home"
    home.mkdir()
    env = {**os.environ, "EDGEKIT_HOME": str(home)}
    subprocess.run([str(BIN / "edgekit"), "keys", "init"], env=env, check=True, capture_output=True)
    registry_url = f"sqlite:///{tmp / 'alerts.db'}"
    smtp = SmtpServer().start()
    store = AlertStore(Registry(registry_url), home)
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    store.add_channel(
        email_channel("mail", ["owner@shop.example"], f"smtp://127.0.0.1:{smtp.port}?tls=none"), now
    )
    store.set_rule("offline", [f"offline_after={OFFLINE_AFTER}", "clear_after=0"], now)
    store.registry.close()
    service = FleetService(
        ServiceConfig(broker=broker, registry=registry_url, dashboard=False, controller=False, home=str(home))
    ).start()
    config = agent_config(tmp, "cam-1", broker, load_own_public_key(home).pem().decode())
    log = tmp / "agent.log"
    latencies = []
    try:
        agent = start_agent(config, log)
        reader = Registry(registry_url, migrate=False)
        while not any(d.online for d in reader.devices()):
            time.sleep(0.05)  # polling the registry: the device's first state, once
        for round_ in range(kills):
            count = len(smtp.mails())
            killed = time.monotonic()
            agent.send_signal(signal.SIGKILL)
            agent.wait()
            smtp.wait_for(lambda m, c=count: len(m) > c, timeout=OFFLINE_AFTER + 60, what="the offline mail")
            latency = smtp.inbox.arrived[count] - killed
            latencies.append(latency)
            print(f"  kill {round_ + 1:2d}: offline mail after {latency:5.2f} s", flush=True)
            agent = start_agent(config, log)
            smtp.wait_for(lambda m, c=count: len(m) > c + 1, timeout=120, what="the back-online mail")
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        reader.close()
    finally:
        service.stop()
        smtp.stop()
    subjects = [m["Subject"] for m in smtp.mails()]
    assert subjects.count("[edgekit] cam-1 is offline") == kills, subjects
    return latencies


def ingest_rate(
    broker: str, tmp: Path, alerts: bool, messages: int, devices: int, run: str, hook: Any
) -> float:
    """bench_ingest's live run (1 worker, SQLite) with the service's alerts on or off."""
    from datetime import datetime, timezone

    from edgekit.fleet.alerts import AlertStore, webhook_channel
    from edgekit.fleet.registry import Registry

    home = tmp / f"home-{run}"
    home.mkdir()
    registry_url = f"sqlite:///{tmp / uuid.uuid4().hex}.db"
    store = AlertStore(Registry(registry_url), home)
    store.add_channel(webhook_channel("hook", hook.url), datetime.now(timezone.utc))
    store.registry.close()
    result = ingest_run(
        broker, registry_url, 1, messages, devices, run,
        controller=False, home=str(home), alerts=alerts, alert_interval=0.5,
    )  # fmt: skip
    return float(result["rate"])


def round_cost(tmp: Path, devices: int, rounds: int = 50) -> tuple[float, float]:
    """CPU (ms, this process) of one evaluation round and one delivery round with nothing due,
    over a registry of ``devices`` devices with telemetry (a steady fleet: nothing to alert)."""
    from datetime import datetime, timedelta, timezone

    from edgekit.fleet.alerts import Dispatcher, Evaluator
    from edgekit.fleet.registry import DeviceState, Registry, TelemetryRow

    registry = Registry(f"sqlite:///{tmp / 'rounds.db'}")
    now = datetime.now(timezone.utc)
    names = [f"cam-{i}" for i in range(devices)]
    registry.record_states([DeviceState(d, "bench", True, "serving", now) for d in names])
    registry.add_telemetry(
        [TelemetryRow(d, 1, now - timedelta(seconds=60), now, 600, 0, 1.2, 2.5, 4.0, 0.02) for d in names]
    )
    home = tmp / "rounds-home"
    evaluator, dispatcher = Evaluator(registry, home), Dispatcher(registry, home)
    evaluator.tick(now)
    start = time.process_time()
    for i in range(rounds):
        evaluator.tick(now + timedelta(seconds=i))
    evaluate = (time.process_time() - start) / rounds * 1000
    start = time.process_time()
    for i in range(rounds):
        dispatcher.run_once(now + timedelta(seconds=i))
    deliver = (time.process_time() - start) / rounds * 1000
    registry.close()
    return evaluate, deliver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-ingest", action="store_true")
    args = parser.parse_args()
    if not shutil.which("mosquitto"):
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-alerts-"))
    mosquitto = Mosquitto(port=free_port(), directory=tmp, extra_config="max_queued_messages 0\n")
    mosquitto.start()
    try:
        if not args.skip_latency:
            print(
                f"alert latency: SIGKILL of an agent -> offline mail, offline_after={OFFLINE_AFTER:g}s",
                flush=True,
            )
            latencies = alert_latency(mosquitto.url, tmp, args.kills)
            median = statistics.median(latencies)
            print(
                f"alert latency: median {median:.2f} s, min {min(latencies):.2f} s, max {max(latencies):.2f} s "
                f"over {len(latencies)} kills; baseline offline_after {OFFLINE_AFTER:g} s "
                f"({median / OFFLINE_AFTER:.2f}x, overhead {median - OFFLINE_AFTER:.2f} s; goal <= 15 s)",
                flush=True,
            )
        if not args.skip_ingest:
            evaluate, deliver = round_cost(tmp, 1000)
            print(
                f"one evaluation round over 1,000 devices: {evaluate:.1f} ms CPU ({evaluate / 20:.1f}% of a core "
                f"every 2 s, the default; {evaluate / 5:.1f}% every 0.5 s); one delivery round with nothing due: "
                f"{deliver:.1f} ms CPU (every 1 s: {deliver / 10:.1f}% of a core)",
                flush=True,
            )
            hook = WebhookReceiver().start()
            rates: dict[bool, list[float]] = {True: [], False: []}
            try:
                for repeat in range(args.repeats):
                    for alerts in (True, False) if repeat % 2 == 0 else (False, True):
                        rate = ingest_rate(
                            mosquitto.url,
                            tmp,
                            alerts,
                            args.messages,
                            args.devices,
                            f"a{repeat}{int(alerts)}",
                            hook,
                        )
                        rates[alerts].append(rate)
                        print(
                            f"  ingest, alerts {'on ' if alerts else 'off'}: {rate:>9,.0f} msg/s", flush=True
                        )
            finally:
                hook.stop()
            on, off = statistics.median(rates[True]), statistics.median(rates[False])
            pairs = [a / b for a, b in zip(rates[True], rates[False])]
            print(
                f"ingest (SQLite, 1 worker): alerts on {on:,.0f} msg/s, off {off:,.0f} msg/s (medians of "
                f"{args.repeats}): {on / off:.2f}x; on/off of each back-to-back pair: "
                f"{', '.join(f'{r:.2f}' for r in pairs)} (median {statistics.median(pairs):.2f}x; goal >= 0.95)",
                flush=True,
            )
    finally:
        mosquitto.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"python {sys.version.split()[0]}; cores {os.cpu_count()}")


if __name__ == "__main__":
    main()
