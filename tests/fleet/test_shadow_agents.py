"""Shadow evaluation on a fleet of real agent processes (issue 14, "Tests"): `edgekit-agent run`
processes on a real Mosquitto, fed through their local HTTP inference server (`[serve] listen`),
their telemetry ingested into the registry, and the real `edgekit push --shadow`, `shadow
status` and `shadow promote`. The models are real, built from the digits Keras model
(tests/conftest.py ``digits_candidates``): the fleet serves it paced to ~1 ms per input; the
candidates are the same model, its output classes shuffled, the same outputs behind ~3x the
compute, a broken export that returns NaN, and one whose run the runtime fails on live inputs."""

from __future__ import annotations

import json
import signal
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgekit.fleet.registry import Registry
from edgekit.fleet.shadow import summarize
from edgekit.mqtt import Message, MqttClient
from edgekit.runtime import Model
from edgekit.topics import Topics
from helpers import free_port
from test_push import Fleet, edgekit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "agent"))
from test_daemon import Watcher

DEVICES = ["cam-1", "cam-2"]
INPUTS = 160  # per device and candidate: enough for ~10% agreement to show, small enough to be quick


class ServingFleet(Fleet):
    """`edgekit-agent run` processes that also answer HTTP on a port of their own."""

    def __init__(self, root: Path, broker: str, home: Path) -> None:
        super().__init__(root, broker, home)
        self.ports: dict[str, int] = {}

    def config(self, device: str) -> Path:
        path = super().config(device)
        port = self.ports.setdefault(device, free_port())
        path.write_text(path.read_text() + f'[serve]\nlisten = "127.0.0.1:{port}"\n')
        return path

    def predict(self, device: str, x: np.ndarray) -> np.ndarray:
        """One POST /v1/predict; raises on anything but a 200 with one output."""
        body = json.dumps({"inputs": x[None].tolist()}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ports[device]}/v1/predict", data=body, method="POST"
        )
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
            ((_, out),) = json.loads(response.read())["outputs"].items()
        return np.asarray(out, dtype=np.float32)[0]

    def restart(self, device: str) -> None:
        process = self.processes[device]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        self.start(device)


@dataclass
class Answers:
    """What the devices' HTTP servers answered during an episode."""

    served: int = 0
    failed: list[str] = field(default_factory=list)  # a non-200, a refused connection, ...
    not_serving_models: list[str] = field(default_factory=list)  # an answer other than the serving model's


@pytest.fixture
def lab(mosquitto, edgekit_home, tmp_path, digits_candidates, start_ingest) -> Iterator[dict[str, Any]]:
    """Two agents serving digits@1.0.0 (the paced fp32 digits model), a watcher, and the registry
    fed by ingest."""
    assert edgekit("keys", "init").returncode == 0
    fleet = ServingFleet(tmp_path / "devices", mosquitto.url, edgekit_home)
    fleet.root.mkdir()
    watcher = Watcher(mosquitto.url)
    registry = Registry(f"sqlite:///{edgekit_home / 'registry.db'}")
    try:
        for device in DEVICES:
            fleet.start(device)
        watcher.wait_for(lambda _: all(watcher.states(d) for d in DEVICES), timeout=60)
        pushed = edgekit(
            "push", str(digits_candidates.serving), "--fleet", "lab", "--name", "digits", "--version", "1.0.0",
            "--wait", "--timeout", "120", "--broker", mosquitto.url,
        )  # fmt: skip
        assert pushed.returncode == 0, pushed.stderr
        ingest = start_ingest(registry)
        yield {
            "fleet": fleet,
            "watcher": watcher,
            "registry": registry,
            "ingest": ingest,
            "broker": mosquitto.url,
        }
    finally:
        fleet.stop()
        watcher.close()
        registry.close()


def serving_outputs(model: Path, xs: np.ndarray) -> np.ndarray:
    """What the serving model answers, from a bare runtime outside the agents."""
    runtime = Model(model, threads=1)
    return np.array([runtime.run([x[None]])[0][0] for x in xs])


def feed(fleet: ServingFleet, xs: np.ndarray, expected: np.ndarray) -> Answers:
    """Every input to every device over HTTP (one thread per device), checking each answer."""
    answers = Answers()
    lock = threading.Lock()

    def one_device(device: str) -> None:
        for i, x in enumerate(xs):
            try:
                out = fleet.predict(device, x)
            except (OSError, AssertionError, ValueError, KeyError) as exc:
                with lock:
                    answers.failed.append(f"{device} input {i}: {exc}")
                continue
            with lock:
                answers.served += 1
                if not np.allclose(out, expected[i], rtol=1e-5, atol=1e-6):
                    answers.not_serving_models.append(f"{device} input {i}")

    threads = [threading.Thread(target=one_device, args=(d,)) for d in DEVICES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def push_shadow(broker: str, model: Path, version: str) -> dict[str, Any]:
    result = edgekit(
        "push", str(model), "--fleet", "lab", "--name", "digits", "--version", version,
        "--shadow", "--sample", "1", "--for", "1h", "--json", "--broker", broker,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def events_of(watcher: Watcher, kind: str, device: str, candidate_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in watcher.records("events", device)
        if e["kind"] == kind and (e.get("bundle") or {}).get("bundle_id") == candidate_id
    ]


def wait_started(watcher: Watcher, candidate_id: str) -> None:
    watcher.wait_for(lambda _: all(events_of(watcher, "shadow_started", d, candidate_id) for d in DEVICES))


def status(candidate_id: str, registry: Registry) -> dict[str, Any]:
    return summarize(registry.shadow_windows("lab", candidate_id))


def wait_registry(lab: dict[str, Any], done: Callable[[dict[str, Any]], bool]) -> None:
    """Wait (on ingest's commits, not a sleep) until the registry's shadow figures satisfy ``done``."""
    registry: Registry = lab["registry"]
    ok = lab["ingest"].wait_for(lambda _: done(summarize(registry.shadow_windows("lab"))), timeout=60)
    assert ok, summarize(registry.shadow_windows("lab"))


def every_input_accounted_for(candidate_id: str, n: int) -> Callable[[dict[str, Any]], bool]:
    """Each device's windows of this candidate count all ``n`` inputs, compared or dropped."""

    def check(summary: dict[str, Any]) -> bool:
        by_device = {d["device"]: d for d in summary["devices"]}
        return summary["candidate_id"] == candidate_id and all(
            d in by_device and by_device[d]["compared"] + by_device[d]["dropped"] == n for d in DEVICES
        )

    return check


def retained_desired(broker: str) -> bytes:
    """The fleet's retained desired state, as the broker holds it now."""
    got: list[Message] = []
    arrived = threading.Event()

    def on_message(message: Message) -> None:
        got.append(message)
        arrived.set()

    client = MqttClient(broker, client_id="test-desired-reader").connect(timeout=10)
    try:
        client.subscribe(Topics().fleet_desired("lab"), on_message)
        assert arrived.wait(10), "the broker holds no desired state for fleet lab"
    finally:
        client.close()
    return got[0].payload


def test_an_identical_candidate_agrees_fully_is_not_resumed_by_a_restart_and_is_promoted(
    lab, digits_models, digits_candidates
):
    fleet, watcher, broker = lab["fleet"], lab["watcher"], lab["broker"]
    xs = digits_models.x_test[:INPUTS]
    expected = serving_outputs(digits_candidates.serving, xs)
    candidate = push_shadow(broker, digits_candidates.serving, "2.0.0")["candidate_id"]
    wait_started(watcher, candidate)

    answers = feed(fleet, xs, expected)
    assert answers.failed == [] and answers.not_serving_models == []
    assert answers.served == len(DEVICES) * INPUTS
    wait_registry(lab, every_input_accounted_for(candidate, INPUTS))
    shown = edgekit("shadow", "status", "--fleet", "lab", "--json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["candidate"] == "digits@2.0.0" and [d["device"] for d in doc["devices"]] == DEVICES
    for device in doc["devices"]:
        assert device["state"] == "running" and device["compared"] > 0
        assert device["agreement"] == 1.0 and device["abs_error_max"] == 0.0

    # A restarted agent does not resume the shadow the retained desired state still asks for
    # (docs/shadow.md): its last window says `stopped`, and no candidate is loaded again.
    fleet.restart("cam-2")
    watcher.wait_for(
        lambda _: any(
            (r.get("shadow") or {}).get("state") == "stopped" for r in watcher.records("telemetry", "cam-2")
        )
    )
    before = len(watcher.records("telemetry", "cam-2"))
    assert all(fleet.predict("cam-2", x) is not None for x in xs[:8])  # it serves, fresh from the start
    watcher.wait_for(lambda _: len(watcher.records("telemetry", "cam-2")) >= before + 2)
    assert all(r.get("shadow") is None for r in watcher.records("telemetry", "cam-2")[before:])
    assert len(events_of(watcher, "shadow_started", "cam-2", candidate)) == 1
    assert "Traceback" not in (fleet.root / "cam-2.log").read_text()  # nor half resumed, nor an error
    wait_registry(lab, lambda s: {d["device"]: d["state"] for d in s["devices"]}.get("cam-2") == "stopped")

    # The default agreement gate (98%); the latency gate widened to 2x: on this shared two-core
    # machine an identical candidate, run at nice 19 after its CPU-budget pause, measured 1.0-1.4x
    # the serving model's p95 CPU time (docs/shadow.md, "Limits"). The slow candidate of the next
    # test is held to the default 1.2x.
    promoted = edgekit(
        "shadow", "promote", "--fleet", "lab", "--max-latency-ratio", "2", "--json", "--broker", broker
    )
    assert promoted.returncode == 0, promoted.stderr
    verdict = json.loads(promoted.stdout)
    assert verdict["passed"] and verdict["rollout"]["bundle"] == "digits@2.0.0"
    watcher.wait_for(lambda _: all(watcher.serving("2.0.0", d)(_) for d in DEVICES), timeout=60)


def test_shuffled_slow_nan_and_crashing_candidates_are_refused_naming_each_device(
    lab, digits_models, digits_candidates
):
    fleet, watcher, broker, registry = lab["fleet"], lab["watcher"], lab["broker"], lab["registry"]
    xs = digits_models.x_test[:INPUTS]
    expected = serving_outputs(digits_candidates.serving, xs)

    def refused(*gates: str) -> tuple[dict[str, Any], str]:
        """`shadow promote` refuses: non-zero, one line, no traceback, nothing published."""
        desired = retained_desired(broker)
        result = edgekit("shadow", "promote", "--fleet", "lab", *gates, "--json", "--broker", broker)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert "was not promoted on fleet lab" in result.stderr
        assert retained_desired(broker) == desired  # no rollout: the same signed document
        verdict: dict[str, Any] = json.loads(result.stdout)
        assert not verdict["passed"]
        return verdict, result.stderr

    # Shuffled output classes: it agrees only on inputs the serving model calls 0 (~10%).
    shuffled = push_shadow(broker, digits_candidates.shuffled, "2.0.0")["candidate_id"]
    wait_started(watcher, shuffled)
    answers = feed(fleet, xs, expected)
    assert answers.failed == [] and answers.not_serving_models == []  # never the candidate's answers
    wait_registry(lab, every_input_accounted_for(shuffled, INPUTS))
    fixed = digits_candidates.classes.index(0)  # its one fixed point
    share = float((expected.argmax(-1) == fixed).mean())
    for device in status(shuffled, registry)["devices"]:
        assert 0.03 <= device["agreement"] <= 0.2 and abs(device["agreement"] - share) < 0.1, device
    verdict, stderr = refused("--max-latency-ratio", "2")  # as fast as serving, +- noise: see above
    assert [r.split(":")[0] for r in verdict["reasons"]] == DEVICES, verdict["reasons"]
    assert all("agreement" in r and "below 98.0%" in r for r in verdict["reasons"]), verdict["reasons"]
    assert "cam-1: agreement" in stderr and "cam-2: agreement" in stderr

    # The same answers behind ~3x the compute: it agrees fully and fails the latency gate.
    slow = push_shadow(broker, digits_candidates.slow, "3.0.0")["candidate_id"]
    wait_started(watcher, slow)
    answers = feed(fleet, xs, expected)
    assert answers.failed == [] and answers.not_serving_models == []
    wait_registry(lab, every_input_accounted_for(slow, INPUTS))
    for device in status(slow, registry)["devices"]:
        assert (
            device["agreement"] == 1.0 and device["abs_error_max"] == 0.0 and device["latency_ratio"] > 1.2
        ), device
    verdict, _ = refused("--max-latency-ratio", "1.2")
    assert [r.split(":")[0] for r in verdict["reasons"]] == DEVICES, verdict["reasons"]
    assert all("as slow (p95), over 1.20x" in r for r in verdict["reasons"]), verdict["reasons"]  # only that

    # A broken export returning NaN: unloaded and reported, and every request still answered
    # by the serving model during the episode.
    broken = push_shadow(broker, digits_candidates.nan, "4.0.0")["candidate_id"]
    wait_started(watcher, broken)
    answers = feed(fleet, xs, expected)
    assert answers.served == len(DEVICES) * INPUTS
    assert answers.failed == [] and answers.not_serving_models == []
    watcher.wait_for(lambda _: all(events_of(watcher, "shadow_failed", d, broken) for d in DEVICES))
    for device in DEVICES:
        (event,) = events_of(watcher, "shadow_failed", device, broken)
        assert "NaN" in event["message"] and "unloaded" in event["message"]
    wait_registry(
        lab, lambda s: s["candidate_id"] == broken and all(d["state"] == "failed" for d in s["devices"])
    )
    table = edgekit("shadow", "status", "--fleet", "lab")
    assert table.returncode == 0 and "digits@4.0.0" in table.stdout and "failed" in table.stdout
    assert all(f"{d}: the candidate digits@4.0.0 failed on a live input" in table.stdout for d in DEVICES)
    verdict, _ = refused()
    assert verdict["candidate"] == "digits@4.0.0"
    assert [r.split(":")[0] for r in verdict["reasons"]] == DEVICES
    assert all("the candidate failed there" in r and "NaN" in r for r in verdict["reasons"])
    assert all(watcher.states(d)[-1].bundle_version == "1.0.0" for d in DEVICES)

    # A candidate the runtime itself fails: it loads (the same shapes and dtypes, its tensors
    # allocate), then on live inputs its GATHER kernel looks up a row out of bounds and the run
    # raises inside the runtime. Unloaded and reported; every request answered by the serving
    # model, none failed; the agents keep running.
    crashing = push_shadow(broker, digits_candidates.crash, "5.0.0")["candidate_id"]
    wait_started(watcher, crashing)  # not refused at load
    answers = feed(fleet, xs, expected)
    assert answers.served == len(DEVICES) * INPUTS
    assert answers.failed == [] and answers.not_serving_models == []
    watcher.wait_for(lambda _: all(events_of(watcher, "shadow_failed", d, crashing) for d in DEVICES))
    for device in DEVICES:
        (event,) = events_of(watcher, "shadow_failed", device, crashing)
        message = event["message"]
        assert "digits@5.0.0 failed on a live input: the runtime could not run it" in message, message
        assert "gather index out of bounds" in message and "unloaded" in message, message
        assert fleet.processes[device].poll() is None  # the agent lives on
    wait_registry(
        lab, lambda s: s["candidate_id"] == crashing and all(d["state"] == "failed" for d in s["devices"])
    )
    verdict, _ = refused()
    assert verdict["candidate"] == "digits@5.0.0"
    assert [r.split(":")[0] for r in verdict["reasons"]] == DEVICES
    assert all("the candidate failed there" in r and "gather index" in r for r in verdict["reasons"])
    assert all(watcher.states(d)[-1].bundle_version == "1.0.0" for d in DEVICES)
    assert all("Traceback" not in (fleet.root / f"{d}.log").read_text() for d in DEVICES)
