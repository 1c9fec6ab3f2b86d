"""Bundle transfer over MQTT vs a raw paho fan-out of the same bytes, measured in the same run.

    .venv/bin/python benchmarks/bench_transfer.py --subscribers 6 [--subscribers 50] [--runs 3]
        [--broker mosquitto|embedded|both] [--push [--xnnpack]]

Both paths use one local Mosquitto and the same payload: a real ~30 MB bundle (a dense Keras
model converted to .tflite, built once with TensorFlow and cached in .cache/bench/), cut into
its manifest's 128 KiB chunks, QoS 1.

- raw: N plain paho subscribers on ``bench/raw/#`` count bytes; one paho publisher publishes
  the chunks. Time: from the first publish until every subscriber has every byte.
- edgekit: N devices (edgekit MqttClient) wait on their fleet's desired-state topic. The
  workstation publishes the bundle as retained chunks (``publish_bundle``, waits for every
  PUBACK), then a signed desired state naming it. Each device verifies the desired state,
  fetches the manifest, verifies its signature and digest, then every chunk (SHA-256 against
  the signed plan, stored to disk), rebuilds the bundle and verifies it in full
  (``read_bundle``). Time: from the first publish until every device holds a verified bundle.

``--broker embedded`` runs the same paths through the embedded broker of ``edgekit fleet up``
(amqtt in a child process, MQTT 3.1.1); ``both`` measures Mosquitto and it in the same run, and
prints each one's ratio to Mosquitto's raw fan-out.

Subscribers run in worker processes (``--processes``): by default up to 8 devices each is a
process of its own, as on a real fleet (and each raw subscriber likewise); beyond 8 they share
two processes per CPU. The ``--push`` agents are lightweight agents, as ``edgekit fleet
simulate`` runs them: the model runs on the runtime's built-in kernels, not XNNPACK
(``--xnnpack`` to load it as a device does by default), since every XNNPACK load packs its own
copy of the weights (30 MB here) into fresh memory, N times over on the same 2 CPUs. The broker
has ``set_tcp_nodelay`` on, as ``edgekit broker mosquitto-config`` writes it.
Devices store bundles in a temporary directory (``BENCH_WORKDIR`` to choose where, e.g.
/dev/shm). Two transport figures are printed: when every device had every chunk hash-checked
and stored, and when every device had verified its rebuilt bundle with ``read_bundle``. Issue
5's figure is ``--push``: what ``edgekit push --wait`` does, to real agents that also install,
load and health-check the model, timed until every one serves it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench"
RAW_PREFIX = "bench/raw"


# -- fixtures: a 30 MB bundle and a broker --------------------------------------------------------


def build_bundle(target_mb: int) -> tuple[Path, Path]:
    """A real bundle of about ``target_mb`` MB and its signing key's public PEM (cached)."""
    from edgekit import SigningKey
    from edgekit.bundle import create_bundle
    from edgekit.keys import load_signing_key

    CACHE.mkdir(parents=True, exist_ok=True)
    bundle = CACHE / f"dense-{target_mb}mb.ekb"
    key_home = CACHE / "home"
    public = key_home / "keys" / "default.pub.pem"
    if bundle.exists() and public.exists():
        return bundle, public
    from edgekit.keys import init_key

    if not public.exists():
        init_key(key_home)
    key: SigningKey = load_signing_key(key_home)
    model_path = CACHE / f"dense-{target_mb}mb.tflite"
    if not model_path.exists():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import tensorflow as tf

        keras.utils.set_random_seed(0)
        width = 2048
        inputs = max(16, target_mb * 1024 * 1024 // 4 // width)
        model = keras.Sequential(
            [keras.Input(shape=(inputs,), batch_size=1), keras.layers.Dense(width), keras.layers.Dense(10)]
        )
        model_path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    create_bundle(model_path, name="dense", version="1.0.0", key=key, output=bundle)
    return bundle, public


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_broker(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    conf = directory / "mosquitto.conf"
    # set_tcp_nodelay as `edgekit broker mosquitto-config` writes it (both paths run on this broker)
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\nlog_type error\n"
    )
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"mqtt://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise SystemExit("mosquitto did not start")


# -- worker processes ---------------------------------------------------------------------------


def paho_address(url: str) -> tuple[str, int, Any]:
    """Host, port and paho protocol constant of a broker URL (``?protocol=3.1.1`` honoured)."""
    import paho.mqtt.client as paho
    from edgekit.mqtt import parse_broker_url

    address = parse_broker_url(url)
    return address.host, address.port, paho.MQTTv311 if address.protocol == "3.1.1" else paho.MQTTv5


def raw_worker(url: str, ids: list[str], total: int, ready: Any, results: Any) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    host, port, protocol = paho_address(url)
    clients = []
    done = threading.Semaphore(0)
    for ident in ids:
        received = [0]

        def on_message(
            _c: Any, _u: Any, msg: Any, received: list[int] = received, ident: str = ident
        ) -> None:
            received[0] += len(msg.payload)
            if received[0] == total:
                now = time.monotonic()
                results.put((ident, now, now))
                done.release()

        subscribed = threading.Event()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=ident, protocol=protocol)
        client.on_message = on_message
        client.on_subscribe = lambda *_a, ev=subscribed: ev.set()
        client.on_connect = lambda c, *_a: c.subscribe(f"{RAW_PREFIX}/#", qos=1)
        client.connect(host, int(port))
        client.loop_start()
        subscribed.wait(30)
        clients.append(client)
    ready.put(len(ids))
    for _ in ids:
        done.acquire()
    for client in clients:
        client.disconnect()
        client.loop_stop()


def edgekit_worker(
    url: str, ids: list[str], fleet: str, public_pem: bytes, workdir: str, ready: Any, results: Any
) -> None:
    from edgekit import DesiredStateError, TrustedKeys
    from edgekit.desired import verify_desired_state
    from edgekit.mqtt import Message, MqttClient
    from edgekit.topics import Topics
    from edgekit.transfer import fetch_bundle

    trusted = TrustedKeys.from_pem(public_pem)
    topics = Topics()
    threads = []

    def device(ident: str) -> None:
        wanted: queue.Queue[str] = queue.Queue()

        def on_desired(message: Message) -> None:
            try:
                state = verify_desired_state(message.payload, trusted, fleet=fleet, device=ident)
            except DesiredStateError:
                return
            wanted.put(state.bundle_sha256)

        with MqttClient(url, client_id=ident) as client:
            client.subscribe(topics.fleet_desired(fleet), on_desired)
            ready.put(1)
            digest = wanted.get()
            received: list[float] = []

            def progress(got: int, total: int) -> None:
                if got == total:
                    received.append(time.monotonic())

            fetch_bundle(
                client, digest, trusted, Path(workdir) / ident, topics, timeout=600, progress=progress
            )
            results.put((ident, received[0], time.monotonic()))

    for ident in ids:
        thread = threading.Thread(target=device, args=(ident,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()


def agent_worker(
    url: str,
    ids: list[str],
    fleet: str,
    public_pem: bytes,
    workdir: str,
    xnnpack: bool,
    ready: Any,
    results: Any,
) -> None:
    """Real device agents (Agent + AgentDaemon, one interpreter thread each) in this process:
    what `edgekit fleet simulate` runs (``SimulatedFleet``)."""
    import logging

    logging.basicConfig(level=logging.ERROR)  # the agents' per-device connection notices are noise here
    from edgekit.agent.simulate import SimulatedFleet
    from edgekit.agent_config import AgentConfig

    marks = _mark_device_steps(Path(workdir))
    configs = [
        AgentConfig.load(
            None,
            device=ident,
            fleet=fleet,
            state_dir=Path(workdir) / ident,
            trusted_keys=public_pem.decode(),
            broker=url,
            threads=1,
            xnnpack=xnnpack,
            telemetry_interval=3600.0,
        )
        for ident in ids
    ]
    with SimulatedFleet(configs, upload_interval=60.0) as simulated:
        simulated.wait_connected(60)
        ready.put(len(ids))
        simulated.wait_serving(timeout=900)
        for ident in ids:
            results.put((ident, time.monotonic(), time.monotonic(), marks.get(ident, {})))


def _mark_device_steps(workdir: Path) -> dict[str, dict[str, float]]:
    """When each device reached each step of an install ({device: {step: monotonic time}}),
    recorded by wrapping the agent's functions in this benchmark process (CLOCK_MONOTONIC is
    system-wide, so the times compare with the workstation's)."""
    import edgekit.agent.daemon as daemon_module
    from edgekit.agent.install import BundleStore
    from edgekit.transfer import ChunkAssembler

    marks: dict[str, dict[str, float]] = {}
    devices: dict[str, str] = {}  # directory -> device: marking runs for every chunk, keep it cheap

    def mark(path: Path, step: str) -> None:
        device = devices.get(str(path))
        if device is None:
            device = devices[str(path)] = Path(path).relative_to(workdir).parts[0]
        steps = marks.setdefault(device, {})
        if step not in steps:
            steps[step] = time.monotonic()

    fetch, init, add, install = (
        daemon_module.fetch_staged_bundle,
        ChunkAssembler.__init__,
        ChunkAssembler.add,
        BundleStore.install,
    )

    def fetch_bundle(client: Any, digest: str, trusted: Any, directory: Path, *a: Any, **k: Any) -> Any:
        mark(directory, "fetch")
        try:
            return fetch(client, digest, trusted, directory, *a, **k)
        finally:
            mark(directory, "fetched+verified")

    def assembler_init(self: Any, directory: Path, *a: Any, **k: Any) -> None:
        init(self, directory, *a, **k)
        mark(directory, "manifest verified")

    def assembler_add(self: Any, index: int, data: bytes) -> str:
        mark(self.directory, "first chunk")
        result = add(self, index, data)
        if self.complete:
            mark(self.directory, "last chunk")
        return result

    def store_install(self: Any, source: Any, **k: Any) -> Any:
        mark(self.state_dir, "install")
        try:
            return install(self, source, **k)
        finally:
            mark(self.state_dir, "installed")

    daemon_module.fetch_staged_bundle = fetch_bundle  # type: ignore[assignment]
    ChunkAssembler.__init__ = assembler_init  # type: ignore[method-assign]
    ChunkAssembler.add = assembler_add  # type: ignore[method-assign]
    BundleStore.install = store_install  # type: ignore[method-assign]
    return marks


# -- one measurement -----------------------------------------------------------------------------


def spawn(target: Any, groups: list[list[str]], extra: tuple[Any, ...], ctx: Any) -> tuple[list[Any], Any]:
    ready, results = ctx.Queue(), ctx.Queue()
    procs = [
        # daemon: a failed run ends the benchmark without waiting for stuck workers
        ctx.Process(target=target, args=(*extra[:1], group, *extra[1:], ready, results), daemon=True)
        for group in groups
    ]
    for proc in procs:
        proc.start()
    expected = sum(len(g) for g in groups)
    count = 0
    while count < expected:
        count += ready.get(timeout=120)
    return procs, results


def collect(procs: list[Any], results: Any, expected: int) -> tuple[float, float]:
    """(when the last subscriber had every chunk, when the last one had a verified bundle)."""
    found = [results.get(timeout=900) for _ in range(expected)]
    for proc in procs:
        proc.join(60)
    return max(f[1] for f in found), max(f[2] for f in found)


def run_raw(url: str, chunks: list[bytes], groups: list[list[str]], ctx: Any) -> float:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    total = sum(len(c) for c in chunks)
    procs, results = spawn(raw_worker, groups, (url, total), ctx)
    host, port, protocol = paho_address(url)
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw-pub", protocol=protocol)
    pub.connect(host, int(port))
    pub.loop_start()
    start = time.monotonic()
    infos = [pub.publish(f"{RAW_PREFIX}/{i}", chunk, qos=1) for i, chunk in enumerate(chunks)]
    for info in infos:
        info.wait_for_publish(600)
    _, end = collect(procs, results, sum(len(g) for g in groups))
    pub.disconnect()
    pub.loop_stop()
    return end - start


def run_edgekit(
    url: str, bundle: Any, public_pem: bytes, key: Any, groups: list[list[str]], run: int, ctx: Any
) -> tuple[float, float]:
    from edgekit.desired import new_desired_state, sign_desired_state
    from edgekit.mqtt import MqttClient
    from edgekit.topics import Topics
    from edgekit.transfer import clear_bundle, start_upload

    fleet = f"bench-{run}"
    workdir = tempfile.mkdtemp(prefix="edgekit-bench-", dir=os.environ.get("BENCH_WORKDIR"))
    try:
        procs, results = spawn(edgekit_worker, groups, (url, fleet, public_pem, workdir), ctx)
        with MqttClient(url, client_id="workstation") as workstation:
            start = time.monotonic()
            upload = start_upload(workstation, bundle)  # manifest, desired state, chunks: as push does
            digest = upload.digest
            state = new_desired_state(
                fleet,
                bundle_sha256=digest,
                bundle_name=bundle.manifest.name,
                bundle_version=bundle.manifest.version,
                seq=1,
            )
            workstation.publish(
                Topics().fleet_desired(fleet), sign_desired_state(state, key), retain=True
            ).wait(60)
            upload.finish()
            received, verified = collect(procs, results, sum(len(g) for g in groups))
            workstation.publish(Topics().fleet_desired(fleet), b"", retain=True).wait(60)
            clear_bundle(workstation, bundle.bundle_id, len(bundle.manifest.chunks.sha256))
        return received - start, verified - start
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_push(
    url: str,
    bundle: Any,
    public_pem: bytes,
    key: Any,
    groups: list[list[str]],
    run: int,
    ctx: Any,
    phases: list[dict[str, Any]],
    xnnpack: bool,
) -> float:
    """What `edgekit push --wait` does, timed as it sees it: publish the bundle, tell the fleet,
    follow every agent until it serves the bundle (fetched, verified, installed, health-checked)."""
    from edgekit.errors import EdgekitError
    from edgekit.fleet.control import ControlPlane
    from edgekit.fleet.push import FleetLink, begin_rollout, run_rollout
    from edgekit.fleet.rollout import RolloutPolicy
    from edgekit.mqtt import Message, MqttClient
    from edgekit.reports import DeviceStateReport
    from edgekit.trust import TrustedKeys

    fleet = f"push-{run}"
    workdir = tempfile.mkdtemp(prefix="edgekit-bench-", dir=os.environ.get("BENCH_WORKDIR"))
    try:
        procs, results = spawn(agent_worker, groups, (url, fleet, public_pem, workdir, xnnpack), ctx)
        with (
            MqttClient(url, client_id="workstation") as workstation,
            ControlPlane.open(f"sqlite:///{workdir}/registry.db", TrustedKeys([key.public])) as control,
        ):
            link = FleetLink(workstation, fleet, key, control)
            expected = sum(len(g) for g in groups)
            while len(link.devices()) < expected:
                link.wait_change(10.0)
            seen: dict[str, dict[str, float]] = {}  # status -> device -> when it first said it

            def on_state(message: Message) -> None:
                try:
                    report = DeviceStateReport.from_json(message.payload)
                except EdgekitError:
                    return
                if bundle.bundle_id in (report.target_id, report.bundle_id):
                    status = report.status
                    if status == "downloading" and report.progress:
                        status = "receiving"  # the first chunk is stored
                    seen.setdefault(status, {}).setdefault(report.device, time.monotonic())

            workstation.subscribe(link.topics.all_devices_filter("state"), on_state)
            start = time.monotonic()
            upload = link.start_upload(bundle)  # as `edgekit push` does it
            policy = RolloutPolicy(canary=0, install_timeout_s=1800)
            rollout, labels = begin_rollout(link, bundle, policy)
            told = time.monotonic()
            upload.finish()
            uploaded = time.monotonic()
            rollout = run_rollout(link, rollout, policy, labels, timeout=1800)
            end = time.monotonic()
            phases.append(
                {
                    "told": told - start,
                    "uploaded": uploaded - start,
                    **{
                        f"{status} (first/last)": (
                            min(firsts.values()) - start,
                            max(firsts.values()) - start,
                        )
                        for status, firsts in seen.items()
                    },
                    "done": end - start,
                }
            )
            if rollout.phase != "done" or rollout.failed:
                raise SystemExit(f"push did not complete: {rollout.phase} {dict(rollout.failed)}")
            found = [results.get(timeout=900) for _ in range(expected)]
            for proc in procs:
                proc.join(60)
            steps: dict[str, list[float]] = {}
            for *_, marks in found:
                for step, when in marks.items():
                    steps.setdefault(step, []).append(when - start)
            phases[-1].update({f"[{step}]": (min(ts), max(ts)) for step, ts in steps.items()})
            workstation.publish(link.topics.fleet_desired(fleet), b"", retain=True).wait(60)
            link.clear_bundle(bundle.bundle_id, len(bundle.manifest.chunks.sha256))
        return end - start
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _phases(phase: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        return f"{value[0]:.2f}-{value[1]:.2f}" if isinstance(value, tuple) else f"{value:.2f}"

    return ", ".join(f"{name} {fmt(value)}" for name, value in phase.items())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subscribers", type=int, action="append", help="N (repeat for several); default 6")
    parser.add_argument("--runs", type=int, default=3, help="Runs per path and N; the median is reported.")
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="Worker processes per path (default: one per device up to 8 devices, else 2 per CPU).",
    )
    parser.add_argument("--size-mb", type=int, default=30, help="Bundle size in MB.")
    parser.add_argument(
        "--broker",
        choices=("mosquitto", "embedded", "both"),
        default="mosquitto",
        help="Which broker: Mosquitto, the embedded one of `fleet up` (amqtt), or both in one run.",
    )
    parser.add_argument(
        "--push",
        action="store_true",
        help="Also time what `edgekit push --wait` does, to real agents (Agent + AgentDaemon, as "
        "`edgekit fleet simulate` runs them) in worker processes.",
    )
    parser.add_argument(
        "--xnnpack",
        action="store_true",
        help="With --push: the agents load the model through XNNPACK, as devices do by default "
        "(`fleet simulate --xnnpack`); else on the built-in kernels, as `fleet simulate` does.",
    )
    args = parser.parse_args()
    sizes = args.subscribers or [6]

    from edgekit import TrustedKeys, read_bundle
    from edgekit.keys import load_signing_key
    from edgekit.topics import Topics
    from edgekit.transfer import bundle_messages

    bundle_path, public = build_bundle(args.size_mb)
    public_pem = public.read_bytes()
    bundle = read_bundle(bundle_path, TrustedKeys.from_pem(public_pem))
    key = load_signing_key(CACHE / "home")
    chunks = [data for topic, data in bundle_messages(bundle, Topics()) if "/chunks/" in topic]
    mb = bundle.manifest.chunks.total_size / 1e6
    print(
        f"bundle: {bundle_path.name}, {mb:.1f} MB payload in {len(chunks)} chunks of "
        f"{bundle.manifest.chunks.chunk_size // 1024} KiB; {os.cpu_count()} CPUs; python {sys.version.split()[0]}"
    )

    ctx = mp.get_context("spawn")
    names = ["mosquitto", "embedded"] if args.broker == "both" else [args.broker]
    baseline: dict[int, float] = {}  # Mosquitto's raw fan-out per N, when measured in this run
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-broker-") as broker_dir:
        for name in names:
            stop, url = start_named_broker(name, Path(broker_dir))
            print(f"-- broker: {name} ({url})", flush=True)
            try:
                for n in sizes:
                    measure(url, n, args, bundle, public_pem, key, chunks, mb, ctx, name, baseline)
            finally:
                stop()


def start_named_broker(name: str, directory: Path) -> tuple[Any, str]:
    if name == "mosquitto":
        proc, url = start_broker(directory)

        def stop() -> None:
            proc.kill()
            proc.wait()

        return stop, url
    from edgekit.fleet.embedded import EmbeddedBroker

    embedded = EmbeddedBroker(port=free_port()).start()
    return embedded.stop, embedded.url


def measure(
    url: str,
    n: int,
    args: Any,
    bundle: Any,
    public_pem: bytes,
    key: Any,
    chunks: list[bytes],
    mb: float,
    ctx: Any,
    name: str,
    baseline: dict[int, float],
) -> None:
    ids = [f"dev-{i}" for i in range(n)]
    procs = min(n, args.processes or (n if n <= 8 else 2 * (os.cpu_count() or 1)))
    per = -(-n // procs)
    groups = [ids[i : i + per] for i in range(0, n, per)]
    xnnpack = args.xnnpack  # lightweight agents run as `edgekit fleet simulate` runs them
    raw_times, fetched, verified, pushed = [], [], [], []
    phases: list[dict[str, Any]] = []
    for run in range(args.runs):  # alternate so drift in machine load hits both
        got, done = run_edgekit(url, bundle, public_pem, key, groups, run, ctx)
        fetched.append(got)
        verified.append(done)
        # The raw fan-out right before the push it is compared with (its workers have exited):
        # the machine is shared, so each push gets the baseline measured in the same minute.
        raw_times.append(run_raw(url, chunks, groups, ctx))
        if args.push:
            pushed.append(run_push(url, bundle, public_pem, key, groups, run, ctx, phases, xnnpack))
    raw = statistics.median(raw_times)
    got, done = statistics.median(fetched), statistics.median(verified)
    if name == "mosquitto":
        baseline[n] = raw
    print(
        f"N={n} ({len(groups)} worker processes): raw paho fan-out {raw:.2f} s "
        f"({n * mb / raw:.0f} MB/s delivered); edgekit: every chunk hash-checked and stored "
        f"{got:.2f} s (ratio {got / raw:.2f}x), every bundle verified (read_bundle) "
        f"{done:.2f} s (ratio {done / raw:.2f}x)\n"
        f"    runs: raw {', '.join(f'{t:.2f}' for t in raw_times)}; "
        f"stored {', '.join(f'{t:.2f}' for t in fetched)}; "
        f"verified {', '.join(f'{t:.2f}' for t in verified)}",
        flush=True,
    )
    if name != "mosquitto" and n in baseline:
        print(
            f"N={n} {name} vs Mosquitto's raw fan-out ({baseline[n]:.2f} s): raw {raw / baseline[n]:.2f}x, "
            f"stored {got / baseline[n]:.2f}x, verified {done / baseline[n]:.2f}x",
            flush=True,
        )
    if pushed:
        wait = statistics.median(pushed)
        paired = [p / r for p, r in zip(pushed, raw_times)]
        kernels = "XNNPACK" if xnnpack else "built-in kernels"
        print(
            f"N={n}: push --wait to real agents (fetch, verify, install, health check; {kernels}) {wait:.2f} s "
            f"(ratio {wait / raw:.2f}x; median of each run's push / its raw: "
            f"{statistics.median(paired):.2f}x); runs: {', '.join(f'{t:.2f}' for t in pushed)} "
            f"(ratios {', '.join(f'{q:.2f}' for q in paired)})",
            flush=True,
        )
        for index, phase in enumerate(phases):
            print(f"    run {index} phases (s from the first publish): {_phases(phase)}", flush=True)


if __name__ == "__main__":
    main()
