"""Capture's cost on the device: predict() throughput with a capture policy active vs none, and
the bytes on the wire per captured input vs its raw size.

    .venv/bin/python benchmarks/bench_capture.py [--rounds 15] [--seconds 0.3] [--json]

Throughput: two agents serving the same bundle in one process, one with no policy, one with a
signed ``sample`` policy (rate 0.001, the CLI's default limits: 20 an hour), ``predict()`` in
rounds that alternate which goes first; the ratio is the median over pairs of rounds (one of
each order) of the summed times (goal >= 0.97). The capturing agent
really captures (the first 20 sampled inputs are sealed and written; the rest are counted as
over the hourly cap, which is what a device does all day).

Wire bytes: one 224x224x3 uint8 input captured through the real path (trigger, seal with HPKE,
record file) and uploaded by the device's real uploader (:class:`edgekit.agent.capture.CaptureLink`,
MQTT 5, QoS 1) to a real Mosquitto through a byte-counting TCP relay: the bytes the device sent
from the first chunk until the broker acknowledged the last (every PUBLISH packet whole: fixed
header, topic, packet id, properties, payload; nothing else is sent meanwhile), against the raw
input (150,528 bytes); goal <= 1.01x. With 10 and with 1000 model outputs (the outputs travel
with the input, inside the ciphertext). ``--wire-only`` measures only these.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _models import digits_models, face_baseline_data, face_detector
from edgekit import SigningKey, create_bundle
from edgekit.agent import Agent
from edgekit.agent.capture import CaptureLink, Capturer
from edgekit.capture import CaptureKey, new_capture_policy, sign_capture_policy, split_chunks
from edgekit.mqtt import MqttClient
from edgekit.topics import Topics
from edgekit.trust import TrustedKeys
from helpers import Mosquitto, free_port


def write_config(path: Path, key: SigningKey, state: Path) -> Path:
    path.write_text(
        f'device = "bench"\nfleet = "bench"\nstate_dir = "{state}"\nruntime = "ai_edge_litert"\n'
        f"threads = 1\ntrusted_keys = '''\n{key.public.pem().decode()}'''\n"
    )
    return path


def throughput(model: Path, data: Path, tmp: Path, rounds: int, seconds: float) -> dict[str, float]:
    key, owner = SigningKey.generate(), CaptureKey.generate()
    bundle = tmp / f"{model.stem}.ekb"
    create_bundle(model, name="bench", version="1.0.0", key=key, output=bundle, baseline=data)
    agents = {}
    for name in ("none", "sample"):
        # background=True: as on a device, captures are sealed and written by the capture thread
        config = write_config(tmp / f"{model.stem}-{name}.toml", key, tmp / f"{model.stem}-{name}")
        agent = Agent.from_config(config, background=True, telemetry_interval=3600)
        agent.install(bundle)
        agents[name] = agent
    policy = new_capture_policy(
        "bench", seq=1, recipient=owner.public_raw, triggers=("sample",), sample_rate=0.001
    )
    agents["sample"].capture.apply(sign_capture_policy(policy, key))
    shape = agents["none"].status().inputs[0]["shape"]
    x = np.random.default_rng(0).random(shape).astype(np.float32)

    def run(agent: Agent, n: int) -> float:
        predict = agent.predict
        start = time.perf_counter()
        for _ in range(n):
            predict(x)
        return time.perf_counter() - start

    n = max(200, int(seconds / (run(agents["none"], 100) / 100)))
    # Rounds alternate which agent goes first (the second of a round runs warmer here, by up to
    # 10% on the tiny model); each ratio is over a pair of rounds, one of each order.
    base, cap, times = [], [], []
    for i in range(rounds * 2):
        order = ("none", "sample") if i % 2 == 0 else ("sample", "none")
        took = {name: run(agents[name], n) for name in order}
        times.append(took)
        base.append(n / took["none"])
        cap.append(n / took["sample"])
    ratios = [(a["none"] + b["none"]) / (a["sample"] + b["sample"]) for a, b in zip(times[0::2], times[1::2])]
    stats = agents["sample"].capture.stats
    for agent in agents.values():
        agent.close()
    return {
        "none_per_s": statistics.median(base),
        "capture_per_s": statistics.median(cap),
        "ratio": statistics.median(ratios),
        "captured": stats.captured,
        "capped": stats.capped,
    }


class CountingRelay:
    """A TCP relay in front of the broker that counts the bytes the client sends through it."""

    def __init__(self, broker_port: int) -> None:
        self.broker_port = broker_port
        self.sent = 0  # client -> broker
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.broker_port))
            for source, target, counted in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(source, target, counted), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, counted: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if counted:
                    with self._lock:
                        self.sent += len(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.close()

    def close(self) -> None:
        self._server.close()


def wire_bytes(tmp: Path, outputs: int, broker_port: int) -> dict[str, float]:
    key, owner = SigningKey.generate(), CaptureKey.generate()
    capturer = Capturer(
        tmp / f"wire-{outputs}", device="cam-01", fleet="shop", trusted=TrustedKeys([key.public])
    )
    policy = new_capture_policy(
        "shop", seq=1, recipient=owner.public_raw, triggers=("sample",), sample_rate=1.0
    )
    capturer.apply(sign_capture_policy(policy, key))
    image = np.random.default_rng(1).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    scores = np.random.default_rng(2).dirichlet(np.ones(outputs)).astype(np.float32)[None, :]
    assert capturer.offer(
        image, [scores], "sample", {"name": "shelf", "version": "1.0.0", "bundle_id": "ab" * 32}
    )
    (seq,) = capturer.held()
    record = capturer.read(seq) or b""
    relay = CountingRelay(broker_port)
    client = MqttClient(f"mqtt://127.0.0.1:{relay.port}", client_id="cam-01").connect(timeout=10)
    try:
        before = relay.sent  # CONNECT (and anything else of the session's start) not counted
        sent = CaptureLink(capturer, client, Topics()).upload()  # waits for every PUBACK
        wire = relay.sent - before
    finally:
        client.close()
        relay.close()
    assert sent == 1
    raw = image.nbytes
    return {
        "outputs": outputs,
        "raw": raw,
        "record": len(record),
        "wire": wire,
        "ratio": wire / raw,
        "chunks": len(split_chunks(record)),
    }


def wire(tmp: Path) -> list[dict[str, float]]:
    """:func:`wire_bytes` with 10 and 1000 outputs, through a Mosquitto of its own."""
    if not shutil.which("mosquitto") and not Path("/usr/sbin/mosquitto").exists():
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    broker = Mosquitto(port=free_port(), directory=tmp / "mosquitto")
    broker.directory.mkdir()
    broker.start()
    try:
        return [wire_bytes(tmp, 10, broker.port), wire_bytes(tmp, 1000, broker.port)]
    finally:
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="pairs of rounds (one of each order)")
    parser.add_argument(
        "--seconds", type=float, default=0.3, help="length of one round of the no-policy agent"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--wire-only", action="store_true", help="measure the bytes on the wire only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if args.wire_only:
            result = wire(tmp)
            if args.json:
                print(json.dumps({"wire": result}, indent=2))
            else:
                _print_wire(result)
            return
        digits = digits_models()
        face = face_detector(tmp)
        speed = [
            (
                "face detector (128x128x3)",
                throughput(face, face_baseline_data(tmp), tmp, args.rounds, args.seconds),
            ),
            (
                "digits CNN (8x8x1, 3 us)",
                throughput(
                    digits / "digits_fp32.tflite", digits / "digits_test.npz", tmp, args.rounds, args.seconds
                ),
            ),
        ]
        measured = wire(tmp)
    if args.json:
        print(json.dumps({"throughput": dict(speed), "wire": measured}, indent=2))
        return
    for label, r in speed:
        print(
            f"{label}: no policy {r['none_per_s']:,.0f}/s, sample policy {r['capture_per_s']:,.0f}/s, "
            f"ratio {r['ratio']:.3f} (goal >= 0.97: {'met' if r['ratio'] >= 0.97 else 'NOT met'}; "
            f"{r['captured']} captured, {r['capped']} over the hourly cap)"
        )
    _print_wire(measured)


def _print_wire(measured: list[dict[str, float]]) -> None:
    for w in measured:
        print(
            f"224x224x3 uint8, {w['outputs']} outputs: raw {w['raw']:,} B, record {w['record']:,} B, "
            f"on the wire {w['wire']:,} B in {w['chunks']} message(s): {w['ratio']:.4f}x "
            f"(goal <= 1.01: {'met' if w['ratio'] <= 1.01 else 'NOT met'})"
        )


if __name__ == "__main__":
    main()
