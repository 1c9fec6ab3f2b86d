"""Telemetry ingest throughput: a replay publisher -> real Mosquitto -> ingest -> registry.

    .venv/bin/python benchmarks/bench_ingest.py [--messages 50000] [--devices 100]
    .venv/bin/python benchmarks/bench_ingest.py --fleet-up [--messages 20000]

A replay publisher (benchmarks/replay.py: pre-encoded PUBLISH packets, tens of thousands a
second, so it never limits what is measured) sends M telemetry records (QoS 1, as agents do,
100 devices) from a process of its own to a Mosquitto of the benchmark's own. Measured from
the first publish until the last record is committed (the registry's row count reaches M),
for: the ingest service on SQLite with 1 worker, and on PostgreSQL (a throwaway database) with
1 and 2 workers (MQTT 5 shared subscription). Each run then checks the database: exactly M
rows (zero lost), zero duplicates, zero rejected.

The baseline, measured in the same run with the same publisher: a raw paho subscriber that
only counts (QoS 1, acknowledges on receipt), live and draining a backlog. Ratios are ingest
rate / baseline rate. For reference, edgekit's MqttClient subscribed as ingest is (manual acks
in batches), counting only: the ceiling of ingest's MQTT side.

``--fleet-up``: ingest through `edgekit fleet up` as a user starts it (its own Mosquitto with
accounts, the publisher logged in as the operator; then `fleet up --embedded`, the amqtt
broker), each checked for zero lost, duplicated or rejected from `fleet up`'s own final counts;
the baseline, in the same run, is the ingest service (SQLite, 1 worker) on a bare Mosquitto.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import Mosquitto, free_port

POSTGRES = os.environ.get("EDGEKIT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def payloads(messages: int, devices: int, run: str) -> list[tuple[str, bytes]]:
    now = time.time()
    out = []
    for i in range(messages):
        device = f"{run}-{i % devices}"
        seq = i // devices + 1
        doc = {
            "schema": "edgekit.telemetry",
            "schema_version": 1,
            "device": device,
            "fleet": "bench",
            "window_start": now - 60 + seq,
            "window_end": now + seq,
            "count": 600,
            "errors": 0,
            "latency_ms": {"p50": 1.2, "p95": 2.5, "p99": 4.0},
            "throughput": 10.0,
            "drift": {
                "drifted": False,
                "complete": True,
                "samples": 60,
                "scores": {"pixels": {"psi": 0.02, "ks": 0.05}},
            },
            "bundle": {"name": "digits", "version": "1.0.0", "bundle_id": "a" * 64},
            "cpu_percent": 12.5,
            "memory_rss_bytes": 60_000_000,
            "temperature_c": 48.2,
            "runtime": "ai_edge_litert",
            "seq": seq,
            "dropped": 0,
            "dropped_total": 0,
        }
        out.append((f"edgekit/devices/{device}/telemetry", json.dumps(doc, separators=(",", ":")).encode()))
    return out


def publish(
    broker: str,
    items: list[tuple[str, bytes]],
    marks: multiprocessing.Queue,  # type: ignore[type-arg]
    login: tuple[str, str] | None = None,
) -> None:
    from edgekit.mqtt import parse_broker_url
    from replay import replay

    address = parse_broker_url(broker)
    username, password = login or (None, None)
    result = replay(
        address.host,
        address.port,
        items,
        client_id=f"replay-{uuid.uuid4().hex[:8]}",
        username=username,
        password=password,
    )
    marks.put((result.started, result.acknowledged))


def run_publisher(
    broker: str, items: list[tuple[str, bytes]], login: tuple[str, str] | None = None
) -> tuple[multiprocessing.Process, multiprocessing.Queue]:  # type: ignore[type-arg]
    """The replay publisher (benchmarks/replay.py) in a process of its own; its queue gets
    (first byte written, every message acknowledged by the broker) in perf_counter time."""
    ctx = multiprocessing.get_context("spawn")
    marks = ctx.Queue()
    process = ctx.Process(target=publish, args=(broker, items, marks, login))
    process.start()
    return process, marks


def baseline(broker: str, messages: int, devices: int) -> float:
    """A raw paho subscriber that only counts: the ceiling this machine and publisher allow."""
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    done = threading.Event()
    subscribed = threading.Event()
    count = [0, 0.0]

    def on_message(_c, _u, _m) -> None:  # type: ignore[no-untyped-def]
        count[0] += 1
        if count[0] == messages:
            count[1] = time.perf_counter()
            done.set()

    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    host, port = broker.removeprefix("mqtt://").split(":")
    client.connect(host, int(port))
    client.subscribe("edgekit/devices/+/telemetry", qos=1)
    client.loop_start()
    subscribed.wait(10)
    process, marks = run_publisher(broker, payloads(messages, devices, "base"))
    done.wait(600)
    start, _ = marks.get(timeout=600)
    process.join()
    client.loop_stop()
    client.disconnect()
    assert count[0] == messages, f"baseline got {count[0]} of {messages}"
    return messages / (count[1] - start)


def baseline_edgekit(broker: str, messages: int, devices: int, fast_read: bool = True) -> float:
    """edgekit's own MqttClient subscribed the way ingest is (MQTT 5, manual acks sent in
    batches of 2,000), counting only: the ceiling of ingest's MQTT side (``fast_read``: with
    edgekit's read side, as ingest has it, or paho's)."""
    import threading

    from edgekit.mqtt import Message, MqttClient

    done = threading.Event()
    held: list[Message] = []
    count = [0, 0.0]

    def on_message(message: Message) -> None:
        count[0] += 1
        held.append(message)
        if len(held) >= 2000 or count[0] == messages:
            client.ack_many(held)
            held.clear()
        if count[0] == messages:
            count[1] = time.perf_counter()
            done.set()

    client = MqttClient(broker, manual_ack=True, receive_maximum=20000, fast_read=fast_read)
    client.subscribe("edgekit/devices/+/telemetry", on_message)
    client.connect()
    process, marks = run_publisher(broker, payloads(messages, devices, "ebase"))
    done.wait(600)
    start, _ = marks.get(timeout=600)
    process.join()
    client.close()
    assert count[0] == messages, f"edgekit baseline got {count[0]} of {messages}"
    return messages / (count[1] - start)


def publish_all(broker: str, items: list[tuple[str, bytes]]) -> None:
    process, marks = run_publisher(broker, items)
    marks.get(timeout=600)
    process.join()


def baseline_backlog(broker: str, messages: int, devices: int) -> float:
    """The raw paho subscriber draining a backlog the broker queued for its persistent session."""
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    host, port = broker.removeprefix("mqtt://").split(":")
    stamps: list[float] = []
    done = threading.Event()

    def on_message(_c, _u, _m) -> None:  # type: ignore[no-untyped-def]
        stamps.append(time.perf_counter())
        if len(stamps) == messages:
            done.set()

    def session(subscribe: bool) -> paho.Client:
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-base", protocol=paho.MQTTv5
        )
        client.on_message = on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        props.ReceiveMaximum = 20000
        client.connect(host, int(port), clean_start=False, properties=props)
        client.loop_start()
        if subscribe:
            client.subscribe("edgekit/devices/+/telemetry", qos=1)[1]
            time.sleep(0.5)
        return client

    first = session(True)
    first.loop_stop()
    first.disconnect()
    publish_all(broker, payloads(messages, devices, "bbase"))
    again = session(False)
    done.wait(600)
    again.loop_stop()
    again.disconnect()
    assert len(stamps) == messages, f"backlog baseline got {len(stamps)} of {messages}"
    return (messages - 1) / (stamps[-1] - stamps[0])


def wait_stored(reader: Any, messages: int, devices: int, run: str) -> float:
    """When the registry holds all ``messages`` rows (perf_counter time). Polling the database
    is the end-to-end signal; it looks up each device's last record by key until all are
    there (a count(*) of a growing table every few ms would compete with what is measured),
    then counts rows until none is missing (a second worker may commit an earlier one later)."""
    from edgekit.fleet.registry.models import Telemetry
    from sqlalchemy import func, select, tuple_

    keys = {(f"{run}-{i % devices}", i // devices + 1) for i in range(messages - devices, messages)}
    last = select(func.count()).where(tuple_(Telemetry.device, Telemetry.seq).in_(sorted(keys)))
    with reader.session() as session:
        while session.execute(last).scalar_one() < len(keys):
            session.rollback()  # a fresh snapshot each time
            time.sleep(0.005)
    while reader.telemetry_count() < messages:
        time.sleep(0.005)
    return time.perf_counter()


def ingest_backlog(
    broker: str,
    registry_url: str,
    workers: int,
    messages: int,
    devices: int,
    run: str,
    fast_read: bool = True,
) -> dict:
    """Ingest with persistent sessions: stop it, let the broker queue M records, start it again
    and time the drain into the registry (first row to last)."""
    from edgekit.fleet.registry import Registry
    from edgekit.fleet.service import FleetService, ServiceConfig

    config = ServiceConfig(
        broker=broker,
        registry=registry_url,
        workers=workers,
        group=f"bench-{run}",
        dashboard=False,
        report_interval=0.2,
        session_expiry=600,
        fast_read=fast_read,
    )
    FleetService(config).start().stop()  # the sessions (and subscriptions) stay on the broker
    publish_all(broker, payloads(messages, devices, run))
    reader = Registry(registry_url)
    service = FleetService(config).start()
    while (count := reader.telemetry_count()) == 0:
        time.sleep(0.005)  # polling the database is the end-to-end signal here
    first = (time.perf_counter(), count)
    now = wait_stored(reader, messages, devices, run)
    totals = service.stop()
    stored = reader.telemetry_count()
    reader.close()
    assert stored == messages, f"{messages - stored} records lost"
    assert totals.telemetry_duplicates == 0 and totals.rejected_total == 0, totals
    return {"rate": (messages - first[1]) / (now - first[0]), "stored": stored, "duplicates": 0}


def ingest_run(
    broker: str, registry_url: str, workers: int, messages: int, devices: int, run: str, **service_config: Any
) -> dict:
    """One live run; ``service_config``: more ServiceConfig fields (bench_alerts turns alerts on/off)."""
    from edgekit.fleet.registry import Registry
    from edgekit.fleet.service import FleetService, ServiceConfig

    service = FleetService(
        ServiceConfig(
            broker=broker,
            registry=registry_url,
            workers=workers,
            group=f"bench-{run}",
            dashboard=False,
            report_interval=0.2,
            **service_config,
        )
    ).start()
    reader = Registry(registry_url, migrate=False)
    process, marks = run_publisher(broker, payloads(messages, devices, run))
    end = wait_stored(reader, messages, devices, run)
    start, published = marks.get(timeout=600)
    process.join()
    totals = service.stop()
    stored = reader.telemetry_count()
    reader.close()
    lost = messages - stored
    assert lost == 0, f"{lost} records lost"
    assert totals.telemetry == messages and totals.telemetry_duplicates == 0, totals
    assert totals.rejected_total == 0 and totals.db_errors == 0, totals
    return {
        "rate": messages / (end - start),
        "publish_rate": messages / (published - start),
        "stored": stored,
        "duplicates": totals.telemetry_duplicates,
    }


def fleet_up_run(tmp: Path, messages: int, devices: int, run: str, embedded: bool) -> dict:
    """`edgekit fleet up` as a user starts it (its own broker: Mosquitto, or with ``embedded``
    the amqtt one; SQLite; one ingest worker), fed by the replay publisher with the operator
    account; from the first publish until the registry holds every record. Then `fleet up` is
    stopped (SIGINT, as Ctrl-C) and its final counts checked: all stored, none twice, none
    rejected."""
    import signal
    import subprocess

    from edgekit.fleet.registry import Registry

    home = tmp / f"home-{run}"
    home.mkdir()
    env = {**os.environ, "EDGEKIT_HOME": str(home)}
    registry_url = f"sqlite:///{home / 'registry.db'}"
    command = [str(Path(sys.executable).with_name("edgekit")), "fleet", "up", "--port", str(free_port())]
    command += ["--http-port", "0", "--registry", registry_url, "--json"] + (
        ["--embedded"] if embedded else []
    )
    up = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert up.stdout is not None
        info = json.loads(up.stdout.readline())
        assert info["broker_kind"] == ("embedded" if embedded else "mosquitto"), info
        login = None
        if (home / "broker" / "operator.json").exists():
            doc = json.loads((home / "broker" / "operator.json").read_text())
            login = (doc["username"], doc["password"])
        reader = Registry(registry_url, migrate=False)
        process, marks = run_publisher(info["broker"], payloads(messages, devices, run), login)
        end = wait_stored(reader, messages, devices, run)
        start, published = marks.get(timeout=600)
        process.join()
        stored = reader.telemetry_count()
        reader.close()
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=120)
        final = json.loads(out.strip().splitlines()[-1])
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
    assert stored == messages, f"{messages - stored} records lost"
    assert final["telemetry"] == messages and final["duplicates"] == 0 and final["rejected"] == 0, final
    return {
        "rate": messages / (end - start),
        "publish_rate": messages / (published - start),
        "stored": stored,
        "duplicates": final["duplicates"],
    }


def main_fleet_up(messages: int, devices: int) -> None:
    """Ingest through `fleet up`, with Mosquitto and with the embedded amqtt broker; the baseline
    in the same run is the ingest service on a bare Mosquitto of the benchmark's own."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-up-"))
    mosquitto = Mosquitto(port=free_port(), directory=tmp, extra_config="max_queued_messages 0\n")
    mosquitto.start()
    try:
        base = ingest_run(mosquitto.url, f"sqlite:///{tmp / 'base.db'}", 1, messages, devices, "base")
        mosquitto.stop()
        print(
            f"baseline: fleet serve on a bare Mosquitto, SQLite, 1 worker  {base['rate']:>9,.0f} msg/s  "
            f"(stored {base['stored']:,} of {messages:,}, duplicates {base['duplicates']})",
            flush=True,
        )
        for label, embedded in (("fleet up (Mosquitto)", False), ("fleet up --embedded (amqtt)", True)):
            got = fleet_up_run(tmp, messages, devices, "amqtt" if embedded else "mosq", embedded)
            print(
                f"{label:58s} {got['rate']:>9,.0f} msg/s  ({got['rate'] / base['rate']:.2f}x baseline; "
                f"publisher {got['publish_rate']:,.0f} msg/s; stored {got['stored']:,} of {messages:,}, "
                f"duplicates {got['duplicates']})",
                flush=True,
            )
    finally:
        mosquitto.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"messages {messages:,} over {devices} devices; python {sys.version.split()[0]}; cores {os.cpu_count()}"
    )


def main_read_sides(messages: int, devices: int) -> None:
    """Ingest (SQLite, 1 worker) with edgekit's read side and with paho's, live and draining a
    backlog, alternating, twice each, in one run; the counting-only clients too."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-read-"))
    mosquitto = Mosquitto(port=free_port(), directory=tmp, extra_config="max_queued_messages 0\n")
    mosquitto.start()
    rates: dict[str, list[float]] = {}
    try:
        for round_ in range(2):
            for fast in (False, True):
                side = "edgekit read side" if fast else "paho read side"
                rates.setdefault(f"counting only, {side}", []).append(
                    baseline_edgekit(mosquitto.url, messages, devices, fast_read=fast)
                )
                url = f"sqlite:///{tmp / uuid.uuid4().hex}.db"
                live = ingest_run(
                    mosquitto.url, url, 1, messages, devices, f"l{round_}{fast}", fast_read=fast
                )
                rates.setdefault(f"live ingest, {side}", []).append(live["rate"])
                url = f"sqlite:///{tmp / uuid.uuid4().hex}.db"
                drain = ingest_backlog(
                    mosquitto.url, url, 1, messages, devices, f"b{round_}{fast}", fast_read=fast
                )
                rates.setdefault(f"backlog ingest, {side}", []).append(drain["rate"])
    finally:
        mosquitto.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    for what in ("counting only", "live ingest", "backlog ingest"):
        paho_rate = statistics.median(rates[f"{what}, paho read side"])
        own = statistics.median(rates[f"{what}, edgekit read side"])
        print(
            f"{what:15s} paho read side {paho_rate:>9,.0f} msg/s   edgekit read side {own:>9,.0f} msg/s   "
            f"ratio {own / paho_rate:.2f}x  (median of 2; 0 lost, 0 duplicated)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument(
        "--fleet-up",
        action="store_true",
        help="Measure ingest through `edgekit fleet up` (Mosquitto, then --embedded amqtt) instead.",
    )
    parser.add_argument(
        "--read-sides",
        action="store_true",
        help="Measure ingest with edgekit's MQTT read side against paho's, same run, instead.",
    )
    args = parser.parse_args()
    if args.read_sides:
        main_read_sides(args.messages, args.devices)
        return
    if not shutil.which("mosquitto"):
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    if args.fleet_up:
        main_fleet_up(args.messages, args.devices)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    # No per-client queue cap: a burst faster than a subscriber must queue, not be dropped.
    mosquitto = Mosquitto(port=free_port(), directory=tmp, extra_config="max_queued_messages 0\n")
    mosquitto.start()
    broker = mosquitto.url
    try:
        base = baseline(broker, args.messages, args.devices)
        backlog_base = baseline_backlog(broker, args.messages, args.devices)
        ceiling = baseline_edgekit(broker, args.messages, args.devices)
        print(f"baseline, live (raw paho subscriber, counts only):     {base:>9,.0f} msg/s", flush=True)
        print(f"reference, live (edgekit MqttClient, counts and acks):  {ceiling:>9,.0f} msg/s", flush=True)
        print(
            f"baseline, backlog (raw paho, persistent session drain): {backlog_base:>9,.0f} msg/s", flush=True
        )
        runs = [("SQLite, 1 worker", lambda: f"sqlite:///{tmp / uuid.uuid4().hex}.db", 1)]
        databases: list[str] = []
        if not args.skip_postgres:
            import psycopg

            def pg() -> str:
                name = f"edgekit_bench_{uuid.uuid4().hex[:8]}"
                with psycopg.connect(POSTGRES, autocommit=True) as admin:
                    admin.execute(f'CREATE DATABASE "{name}"')
                databases.append(name)
                return f"{POSTGRES.rsplit('/', 1)[0]}/{name}"

            runs += [("PostgreSQL, 1 worker", pg, 1), ("PostgreSQL, 2 workers", pg, 2)]
        try:
            for index, (label, url, workers) in enumerate(runs):
                live = ingest_run(broker, url(), workers, args.messages, args.devices, f"r{index}")
                print(
                    f"live    {label:22s} {live['rate']:>9,.0f} msg/s  ({live['rate'] / base:.2f}x live baseline; "
                    f"publisher {live['publish_rate']:,.0f} msg/s; stored {live['stored']:,} of "
                    f"{args.messages:,}, duplicates {live['duplicates']})",
                    flush=True,
                )
                drain = ingest_backlog(broker, url(), workers, args.messages, args.devices, f"b{index}")
                print(
                    f"backlog {label:22s} {drain['rate']:>9,.0f} msg/s  ({drain['rate'] / backlog_base:.2f}x backlog "
                    f"baseline; stored {drain['stored']:,} of {args.messages:,}, duplicates {drain['duplicates']})",
                    flush=True,
                )
        finally:
            if databases:
                import psycopg

                with psycopg.connect(POSTGRES, autocommit=True) as admin:
                    for name in databases:
                        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        mosquitto.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"messages {args.messages:,} over {args.devices} devices; python {sys.version.split()[0]}; cores {os.cpu_count()}"
    )


if __name__ == "__main__":
    main()
