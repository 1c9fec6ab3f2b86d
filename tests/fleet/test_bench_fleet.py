"""`edgekit bench` and `edgekit bench results` end to end: the real CLI, a real Mosquitto, ingest
into the registry (SQLite and PostgreSQL), and real agents on real runtimes: two in this process
(LiteRT with XNNPACK, and LiteRT with its built-in kernels: two board classes on one machine)
and, where the lean venv is set up (`make test-agent-lean`), one `edgekit-agent run` process on
tflite-runtime: a third class, another runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from edgekit import create_bundle
from edgekit.agent import Agent
from edgekit.agent.daemon import AgentDaemon
from edgekit.fleet.registry import Registry
from edgekit.keys import load_own_public_key, load_signing_key

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "agent"))
from helpers import device_on_generated_broker, make_unhealthy
from test_daemon import Watcher
from test_push import edgekit

ROOT = Path(__file__).resolve().parents[2]
LEAN_AGENT = ROOT / ".venv-lean" / "bin" / "edgekit-agent"


def config_text(device: str, tmp_path: Path, url: str, pem: str, xnnpack: bool) -> str:
    return (
        f'device = "{device}"\nfleet = "lab"\nstate_dir = "{tmp_path / device}"\n'
        f'broker = "{url}"\nthreads = 1\nxnnpack = {str(xnnpack).lower()}\n'
        f"trusted_keys = '''\n{pem}'''\n[telemetry]\ninterval = 3600\n"
    )


@pytest.fixture
def devices(mosquitto, edgekit_home, tmp_path) -> Iterator[list[str]]:
    assert edgekit("keys", "init").returncode == 0
    pem = load_own_public_key(edgekit_home).pem().decode()
    daemons = []
    names = []
    for device, xnnpack in (("cam-1", True), ("cam-2", False)):
        config = tmp_path / f"{device}.toml"
        config.write_text(config_text(device, tmp_path, mosquitto.url, pem, xnnpack))
        agent = Agent.from_config(config, background=False)
        daemons.append(AgentDaemon(agent, upload_interval=0.1).start())
        names.append(device)
    lean = None
    if LEAN_AGENT.exists():  # another runtime: tflite-runtime, in its own venv without TensorFlow
        config = tmp_path / "pi-lean.toml"
        config.write_text(
            config_text("pi-lean", tmp_path, mosquitto.url, pem, True).replace(
                "[telemetry]", 'runtime = "tflite_runtime"\n[telemetry]'
            )
        )
        lean = subprocess.Popen(
            [str(LEAN_AGENT), "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
        names.append("pi-lean")
    else:  # `make test` builds the lean venv before pytest, so this only happens outside it
        warnings.warn(
            f"SKIPPED the tflite-runtime board class: {LEAN_AGENT} is missing (make test-agent-lean)",
            stacklevel=1,
        )
    watcher = Watcher(mosquitto.url)
    try:
        watcher.wait_for(lambda _: all(watcher.states(d) for d in names), timeout=60)
    finally:
        watcher.close()
    yield names
    if lean is not None:
        lean.terminate()
        lean.wait(30)
    for daemon in daemons:
        daemon.stop()
        daemon.agent.close()


def test_push_then_bench_reports_each_board_class_apart_and_results_come_from_the_registry(
    mosquitto, edgekit_home, devices, digits_models, start_ingest, registry_url, tmp_path
):
    where = ["--broker", mosquitto.url, "--registry", registry_url]
    pushed = edgekit(
        "push", str(digits_models.fp32), "--fleet", "lab", "--name", "digits", "--version", "1.0.0",
        "--wait", "--timeout", "120", *where,
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    registry = Registry(registry_url)
    ingest = start_ingest(registry)
    int8 = tmp_path / "digits-int8.ekb"
    create_bundle(
        digits_models.int8, name="digits", version="2.0.0", key=load_signing_key(edgekit_home), output=int8
    )
    benched = edgekit(
        "bench", "digits", str(int8), "--fleet", "lab", "--threads", "1,2", "--runs", "10",
        "--wait", "--timeout", "300", "--json", *where,
    )  # fmt: skip
    assert benched.returncode == 0, benched.stderr
    doc = json.loads(benched.stdout)
    assert doc["devices"] == sorted(devices) and doc["missing"] == []
    assert doc["candidates"] == ["digits@1.0.0", "digits@2.0.0"]
    classes = {(c["runtime"], c["xnnpack"]): c for c in doc["classes"]}
    expected = {("ai_edge_litert", True), ("ai_edge_litert", False)}
    if "pi-lean" in devices:
        expected.add(("tflite_runtime", True))
    assert set(classes) == expected  # each runtime and kernel choice is a class of its own
    for group in doc["classes"]:
        assert len(group["devices"]) == 1
        assert [c["candidate"] for c in group["candidates"]] == ["digits@1.0.0", "digits@2.0.0"]
        for candidate in group["candidates"]:
            assert candidate["correct"] is True and candidate["failed"] == []
            assert [t["threads"] for t in candidate["threads"]] == [1, 2]
            assert all(t["p50_ms"] > 0 and t["per_second"] > 0 for t in candidate["threads"])
            assert candidate["load_ms"] > 0 and candidate["peak_rss_mb"] > 0
    assert "XNNPACK" in classes[("ai_edge_litert", True)]["board_class"]
    assert "built-in kernels" in classes[("ai_edge_litert", False)]["board_class"]

    assert ingest.wait_for(lambda stats: stats.bench >= 2 * len(devices))
    stored = edgekit("bench", "results", "--fleet", "lab", "--json", "--registry", registry_url)
    assert stored.returncode == 0, stored.stderr
    again = json.loads(stored.stdout)
    assert again["bench_seq"] == doc["bench_seq"]
    assert {(c["runtime"], c["xnnpack"]) for c in again["classes"]} == expected
    table = edgekit("bench", "results", "--fleet", "lab", "--registry", registry_url)
    assert table.returncode == 0 and "answers match workstation" in table.stdout
    assert "built-in kernels" in table.stdout and "digits@2.0.0" in table.stdout
    # Nothing was switched: the fleet serves what was pushed.
    watcher = Watcher(mosquitto.url)
    try:
        watcher.wait_for(lambda _: all(watcher.serving("1.0.0", d)(_) for d in devices))
    finally:
        watcher.close()

    # A candidate whose answers on the device differ from the workstation's is shown as such.
    # (The real-world case, int8 kernels going wrong on one aarch64 CPU, cannot be caused on this
    # runner; the same disagreement is caused for real by a bundle whose recorded health-check
    # outputs are not what its model computes.)
    key = load_signing_key(edgekit_home)
    nine = tmp_path / "nine.ekb"
    create_bundle(digits_models.fp32, name="odd", version="9.0.0", key=key, output=nine)
    unhealthy = tmp_path / "odd.ekb"
    make_unhealthy(nine, key, unhealthy)
    wrong = edgekit(
        "bench", str(unhealthy), "--fleet", "lab", "--device", "cam-1", "--runs", "3", "--wait", *where
    )
    assert wrong.returncode == 0, wrong.stderr
    assert "NO (0/" in wrong.stdout and "gave other answers than on the workstation on cam-1" in wrong.stdout
    assert ingest.wait_for(lambda stats: stats.bench >= 2 * len(devices) + 1)
    newest = json.loads(
        edgekit("bench", "results", "--fleet", "lab", "--json", "--registry", registry_url).stdout
    )
    (group,) = newest["classes"]
    assert group["candidates"][0]["correct"] is False
    assert group["candidates"][0]["disagreeing_devices"] == ["cam-1"]
    registry.close()


def test_bench_refuses_unknown_devices_and_bad_flags_in_one_line(
    mosquitto, edgekit_home, devices, digits_models
):
    broker = ["--broker", mosquitto.url]
    model = str(digits_models.fp32)
    cases = [
        (["--device", "cam-9"], "fleet lab has no device cam-9 (devices heard from: cam-1, cam-2"),
        (["--devices", "9"], "--devices 9: fleet lab has only"),
        (["--devices", "1", "--device", "cam-1"], "give --devices N or --device NAME, not both"),
        (["--threads", "1,x"], "is not a list of thread counts; write it like 1,2,4"),
        (["--threads", "0"], "each thread count must be from 1 to 64"),
        (["--runs", "0"], "give a number of timed runs from 1 to"),
    ]
    for flags, said in cases:
        result = edgekit("bench", model, "--fleet", "lab", *flags, *broker)
        assert result.returncode == 19, (flags, result.stderr)
        assert said in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # More than MAX_CANDIDATES (8) models: refused before any is bundled or published.
    nine = edgekit("bench", *[model] * 9, "--fleet", "lab", *broker)
    assert nine.returncode == 19 and "Traceback" not in nine.stderr
    assert "9 models given, and one benchmark measures at most 8" in nine.stderr, nine.stderr
    assert len(nine.stderr.strip().splitlines()) == 1, nine.stderr
    empty = edgekit("bench", model, "--fleet", "nobody", *broker)
    assert empty.returncode == 19 and "no device of fleet nobody has been heard from" in empty.stderr


def test_results_of_a_fleet_without_a_benchmark_say_how_to_start_one(edgekit_home):
    assert edgekit("keys", "init").returncode == 0
    result = edgekit("bench", "results", "--fleet", "lab")
    assert result.returncode == 0 and "edgekit bench MODEL ... --fleet lab" in result.stdout


def test_bench_works_through_the_generated_broker_acl(mosquitto, edgekit_home, tmp_path, digits_models):
    """A device with its own broker account (`edgekit device add`, `broker mosquitto-config`)
    may read its fleet's bench request and publish its own reports."""
    assert edgekit("keys", "init").returncode == 0
    config = device_on_generated_broker(mosquitto, tmp_path, "cam-1")
    acl = next(mosquitto.directory.glob("*acl*")).read_text()
    assert "topic read edgekit/fleets/lab/bench" in acl and "pattern write edgekit/devices/%u/bench" in acl
    mosquitto.stop()
    mosquitto.start()
    agent = subprocess.Popen(
        [str(Path(sys.executable).parent / "edgekit-agent"), "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        from edgekit.fleet.push import connect_operator

        heard = threading.Event()
        operator = connect_operator(mosquitto.url, home=edgekit_home)
        operator.subscribe("edgekit/devices/cam-1/state", lambda m: heard.set() if m.payload else None)
        assert heard.wait(60), "cam-1 never said its state"
        operator.close()
        benched = edgekit(
            "bench", str(digits_models.int8), "--fleet", "lab", "--runs", "5", "--wait", "--timeout", "120",
            "--json", "--broker", mosquitto.url,
        )  # fmt: skip
        assert benched.returncode == 0, benched.stderr
        (group,) = json.loads(benched.stdout)["classes"]
        assert group["devices"] == ["cam-1"] and group["candidates"][0]["correct"] is True
    finally:
        agent.terminate()
        agent.wait(30)


def test_more_devices_than_one_request_holds_are_refused_before_anything_is_published():
    # choose_devices reads only the fleet's name and its devices' states: a FleetLink's two
    # fields, given here with real state reports of 501 devices (no broker holds 501 agents here).
    from types import SimpleNamespace

    from edgekit.errors import BenchError
    from edgekit.fleet.bench import choose_devices
    from edgekit.reports import DeviceStateReport

    states = {f"cam-{i:03d}": DeviceStateReport(f"cam-{i:03d}", "big", "serving") for i in range(501)}
    link = SimpleNamespace(fleet="big", states=states)
    with pytest.raises(BenchError) as caught:
        choose_devices(link, [], None)  # the default: every device heard from
    said = str(caught.value)
    assert "fleet big has 501 devices and one benchmark asks at most 500" in said
    assert "--devices N" in said and "\n" not in said
    assert len(choose_devices(link, [], 500)) == 500
    with pytest.raises(BenchError, match="at most 500"):
        choose_devices(link, [], 501)
