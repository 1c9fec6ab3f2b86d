"""A shadow for some devices only (`push --shadow --devices N | --device D`) and canary rollouts
with a shadow phase (`push --canary N --shadow-first`): the real CLI, a real Mosquitto, ingest
into the registry (SQLite and PostgreSQL), the rollout controller, and real agents in this
process (so the test feeds their predict() the digits test set)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgekit.agent.daemon import AgentDaemon
from edgekit.fleet.controller import RolloutController
from edgekit.fleet.registry import Registry
from test_fleet_shadow import fleet_of_agents
from test_push import control_of, edgekit
from test_serve import serve  # noqa: F401 - serve is a fixture
from watcher import Watcher

DEVICES = ["cam-1", "cam-2", "cam-3"]


@pytest.fixture(scope="module")
def shuffled_digits(digits_models, tmp_path_factory) -> Path:
    """The digits model with its output classes shuffled: a candidate that disagrees ~90% of the time."""
    import keras
    import tensorflow as tf

    model = keras.models.load_model(digits_models.keras_path)
    last = model.layers[-1]
    kernel, bias = last.get_weights()
    order = np.roll(np.arange(kernel.shape[1]), 3)
    last.set_weights([kernel[:, order], bias[order]])
    path = tmp_path_factory.mktemp("shuffled") / "digits_shuffled.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return path


@pytest.fixture
def devices(mosquitto, edgekit_home, tmp_path) -> Iterator[dict[str, AgentDaemon]]:
    yield from fleet_of_agents(mosquitto, edgekit_home, tmp_path, DEVICES)


def said(watcher: Watcher, device: str, kind: str) -> bool:
    return any(e["kind"] == kind for e in watcher.records("events", device))


def feed(daemon: AgentDaemon, xs: np.ndarray) -> None:
    """predict() every input (answers from the serving model), let the shadow catch up, report."""
    agent = daemon.agent
    for start in range(0, len(xs), 16):
        for x in xs[start : start + 16]:
            agent.predict(x)
        if agent.shadow is not None:
            assert agent.shadow.wait_idle()
    agent.flush_telemetry()


def push_v1(mosquitto, registry_url: str, digits_models) -> None:
    pushed = edgekit(
        "push", str(digits_models.fp32), "--fleet", "lab", "--name", "digits", "--version", "1.0.0",
        "--wait", "--timeout", "120", "--broker", mosquitto.url, "--registry", registry_url,
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr


def test_a_shadow_for_named_devices_only_leaves_the_others_alone(
    mosquitto, edgekit_home, devices, digits_models, start_ingest, registry_url
):
    where = ["--broker", mosquitto.url, "--registry", registry_url]
    watcher = Watcher(mosquitto.url)
    registry = Registry(registry_url)
    try:
        push_v1(mosquitto, registry_url, digits_models)
        ingest = start_ingest(registry)
        control = control_of(edgekit_home, registry_url)
        seq = control.record("lab").seq
        # An unknown device, or more devices than the fleet has: one line, nothing published.
        for wrong, words in (
            (["--device", "cam-9"], "fleet lab has no device cam-9"),
            (["--devices", "4"], "--devices 4 asks for more devices than fleet lab has (3 heard from)"),
        ):
            refused = edgekit(
                "push", str(digits_models.int8), "--fleet", "lab", "--name", "digits", "--version", "2.0.0",
                "--shadow", *wrong, *where,
            )  # fmt: skip
            assert refused.returncode != 0 and words in refused.stderr, refused.stderr
            assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
        assert control.record("lab").seq == seq  # nothing was published

        shadowed = edgekit(
            "push", str(digits_models.int8), "--fleet", "lab", "--name", "digits", "--version", "2.0.0",
            "--shadow", "--sample", "1", "--device", "cam-2", "--json", *where,
        )  # fmt: skip
        assert shadowed.returncode == 0, shadowed.stderr
        started = json.loads(shadowed.stdout)
        assert started["asked"] == ["cam-2"]
        watcher.wait_for(lambda _: said(watcher, "cam-2", "shadow_started"))
        before = ingest.stats.telemetry
        for daemon in devices.values():
            feed(daemon, digits_models.x_test[:48])
        assert ingest.wait_for(lambda stats: stats.telemetry >= before + len(DEVICES))
        # The others took the same desired state in and loaded nothing: no candidate, no figures.
        for device in ("cam-1", "cam-3"):
            assert devices[device].last_seq == started["seq"] and devices[device].agent.shadow is None
        assert not any(said(watcher, d, "shadow_started") for d in ("cam-1", "cam-3"))
        assert {w.device for w in registry.shadow_windows("lab")} == {"cam-2"}
        status = json.loads(edgekit("shadow", "status", "--fleet", "lab", "--json", *where[2:]).stdout)
        assert [d["device"] for d in status["devices"]] == ["cam-2"]
        assert status["total"]["compared"] == 48
        assert status["total"]["peak_memory_bytes"] > 0  # both models loaded on cam-2
        table = edgekit("shadow", "status", "--fleet", "lab", *where[2:])
        assert table.returncode == 0 and "peak memory" in table.stdout and "MiB" in table.stdout

        # --devices 2: chosen like canaries (online first, by name); a device asked that has not
        # reported yet fails promote by name.
        again = edgekit(
            "push", "digits", "--version", "1.0.0", "--fleet", "lab", "--shadow", "--devices", "2",
            "--json", *where,
        )  # fmt: skip
        assert again.returncode != 0 and "serves already" in again.stderr  # 1.0.0 is what they serve
        control.save_shadow_asked("lab", status["candidate_id"], ["cam-2", "cam-3"])
        refused = edgekit("shadow", "promote", "--fleet", "lab", "--min-agreement", "0", "--max-latency-ratio",
                          "1000", *where)  # fmt: skip
        assert refused.returncode != 0
        assert "cam-3: it was asked to try the candidate and has not reported yet" in refused.stderr
        control.close()
    finally:
        registry.close()
        watcher.close()


def test_devices_are_chosen_like_canaries(mosquitto, edgekit_home, devices, digits_models, registry_url):
    where = ["--broker", mosquitto.url, "--registry", registry_url]
    watcher = Watcher(mosquitto.url)
    try:
        push_v1(mosquitto, registry_url, digits_models)
        shadowed = edgekit(
            "push", str(digits_models.int8), "--fleet", "lab", "--name", "digits", "--version", "2.0.0",
            "--shadow", "--devices", "2", "--json", *where,
        )  # fmt: skip
        assert shadowed.returncode == 0, shadowed.stderr
        assert json.loads(shadowed.stdout)["asked"] == ["cam-1", "cam-2"]
        watcher.wait_for(
            lambda _: said(watcher, "cam-1", "shadow_started") and said(watcher, "cam-2", "shadow_started")
        )
        assert devices["cam-3"].last_seq == json.loads(shadowed.stdout)["seq"]  # it took the state in
        assert devices["cam-3"].agent.shadow is None and not said(watcher, "cam-3", "shadow_started")
    finally:
        watcher.close()


def rollout_status(registry_url: str) -> dict[str, Any]:
    result = edgekit("rollout", "status", "--fleet", "lab", "--json", "--registry", registry_url)
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_a_shadow_first_rollout_that_passes_installs_and_one_that_disagrees_aborts(
    mosquitto, edgekit_home, devices, digits_models, shuffled_digits, start_ingest, registry_url
):
    where = ["--broker", mosquitto.url, "--registry", registry_url]
    watcher = Watcher(mosquitto.url)
    registry = Registry(registry_url)
    control = control_of(edgekit_home, registry_url)
    controller = RolloutController(mosquitto.url, edgekit_home, control, interval=0.2)
    try:
        push_v1(mosquitto, registry_url, digits_models)
        ingest = start_ingest(registry)
        pushed = edgekit(
            "push", str(digits_models.int8), "--fleet", "lab", "--name", "digits", "--version", "2.0.0",
            "--canary", "1", "--soak", "0", "--shadow-first", "1s", "--sample", "1",
            "--min-agreement", "0.5", "--max-latency-ratio", "1000", *where,
        )  # fmt: skip
        assert pushed.returncode == 0, pushed.stderr
        assert "try it in the shadow" in pushed.stdout
        status = rollout_status(registry_url)
        assert status["phase"] == "shadow" and status["canaries"] == ["cam-1"]
        assert status["shadow_first_s"] == 1.0
        watcher.wait_for(lambda _: said(watcher, "cam-1", "shadow_started"))
        assert devices["cam-2"].agent.shadow is None  # only the canary tries it

        # A controller sees too few inputs compared and waits; it stops (a restart) mid-phase.
        controller.start()
        assert controller.leading.wait(30)
        controller.stop()
        assert rollout_status(registry_url)["phase"] == "shadow"
        before = ingest.stats.telemetry
        feed(devices["cam-1"], digits_models.x_test[:64])
        assert ingest.wait_for(lambda stats: stats.telemetry > before)
        # A new controller takes it on from the saved phase: the figures pass, the canary
        # installs, soaks, then the fleet.
        controller = RolloutController(mosquitto.url, edgekit_home, control, interval=0.2).start()
        assert controller.wait_finished("lab", timeout=120) == ("done", None)
        watcher.wait_for(lambda _: all(watcher.serving("2.0.0", d)(_) for d in DEVICES))

        # A candidate with other answers: the canary's agreement fails, the rollout aborts naming
        # it and the figure, and every device serves 2.0.0 still.
        controller.finished.clear()
        bad = edgekit(
            "push", str(shuffled_digits), "--fleet", "lab", "--name", "digits", "--version", "3.0.0",
            "--canary", "1", "--shadow-first", "1s", "--sample", "1", *where,
        )  # fmt: skip
        assert bad.returncode == 0, bad.stderr
        watcher.wait_for(
            lambda _: sum(e["kind"] == "shadow_started" for e in watcher.records("events", "cam-1")) == 2
        )
        feed(devices["cam-1"], digits_models.x_test[:64])
        phase, reason = controller.wait_finished("lab", timeout=120) or ("", "")
        assert phase == "aborted", reason
        assert "in the shadow phase, digits@3.0.0 did not pass: canary cam-1: agreement" in (reason or "")
        assert "below 98.0%" in (reason or "")
        status = rollout_status(registry_url)
        assert status["phase"] == "aborted" and "canary cam-1: agreement" in status["reason"]
        shown = edgekit("rollout", "status", "--fleet", "lab", "--registry", registry_url)
        assert "aborted" in shown.stdout and "cam-1" in shown.stdout
        watcher.wait_for(lambda _: said(watcher, "cam-1", "shadow_stopped"))
        assert all(d.agent.status().version == "2.0.0" for d in devices.values())
        assert all(watcher.states(d)[-1].bundle_version == "2.0.0" for d in DEVICES)
        assert controller.errors == 0
    finally:
        controller.stop()
        control.close()
        registry.close()
        watcher.close()


def test_shadow_options_that_do_not_go_together_are_refused(edgekit_home, digits_models):
    model = str(digits_models.int8)
    for args, words in (
        (["--devices", "2"], "--devices and --device go with --shadow"),
        (["--shadow", "--devices", "2", "--device", "cam-1"], "not both"),
        (["--shadow-first", "15m"], "--shadow-first needs --canary N"),
        (["--shadow", "--shadow-first", "15m"], "--shadow switches nothing"),
        (["--canary", "1", "--min-agreement", "0.9"], "go with --shadow-first"),
        (["--canary", "1", "--shadow-first", "soon"], "is not a duration"),
        # A desired state's times must stay in the calendar: at most a year, said in one line.
        (["--canary", "1", "--shadow-first", "99999999d"], "'99999999d' is too long: give at most 365d"),
        (["--shadow", "--for", "99999999d"], "'99999999d' is too long: give at most 365d"),
        (["--canary", "1", "--max-error", "0.1"], "--max-error go with --shadow-first"),
    ):
        result = edgekit("push", model, "--fleet", "lab", *args)
        assert result.returncode != 0 and words in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_a_shadow_first_rollout_needs_a_served_bundle(mosquitto, edgekit_home, digits_models):
    assert edgekit("keys", "init").returncode == 0
    result = edgekit(
        "push", str(digits_models.int8), "--fleet", "lab", "--canary", "1", "--shadow-first", "1m",
        "--broker", mosquitto.url,
    )  # fmt: skip
    assert result.returncode != 0 and "a shadow phase compares" in result.stderr
    assert "Traceback" not in result.stderr


def test_named_devices_through_the_fleet_service(
    serve,  # noqa: F811 - the fixture imported above
    mosquitto,
    edgekit_home,
    devices,
    digits_models,
    registry_url,
    tmp_path,
):
    from edgekit.topics import Topics
    from test_api import laptop, one_line
    from test_dashboard_accounts import retained_desired_state
    from test_shadow_server import add_user

    watcher = Watcher(mosquitto.url)
    try:
        push_v1(mosquitto, registry_url, digits_models)
        served = serve("--registry", registry_url)
        url = served.urls["dashboard"]
        add_user(registry_url, "alice", "operator", "alice-secret")
        alice = tmp_path / "alice-laptop"
        signed = laptop(alice, url, "login", "--account", "alice", "--password-stdin", stdin="alice-secret\n")
        assert signed.returncode == 0, signed.stderr
        unknown = laptop(alice, url, "push", str(digits_models.int8), "--fleet", "lab", "--name", "digits",
                         "--version", "2.0.0", "--shadow", "--device", "cam-9")  # fmt: skip
        one_line(unknown, unknown.returncode or 1, "fleet lab has no device cam-9")
        shadowed = laptop(alice, url, "push", str(digits_models.int8), "--fleet", "lab", "--name", "digits",
                          "--version", "2.0.0", "--shadow", "--device", "cam-2", "--json")  # fmt: skip
        assert shadowed.returncode == 0, shadowed.stderr
        started = json.loads(shadowed.stdout)
        assert started["asked"] == ["cam-2"]
        told = retained_desired_state(mosquitto.url, Topics().fleet_desired("lab"))
        assert told["seq"] == started["seq"] and told["shadow"]["devices"] == ["cam-2"]
        watcher.wait_for(lambda _: said(watcher, "cam-2", "shadow_started"))
        words = laptop(alice, url, "push", "digits", "--fleet", "lab", "--version", "2.0.0", "--shadow",
                       "--devices", "1")  # fmt: skip
        assert words.returncode == 0 and "cam-1 of fleet lab (of 3 known) try digits@2.0.0" in words.stdout
        # A canary rollout with a shadow phase, through the service too: the canary tries it first.
        first = laptop(alice, url, "push", "digits", "--fleet", "lab", "--version", "2.0.0", "--canary", "1",
                       "--shadow-first", "15m", "--sample", "0.5", "--min-agreement", "0.9", "--json")  # fmt: skip
        assert first.returncode == 0, first.stderr
        rollout = json.loads(first.stdout)
        assert rollout["phase"] == "shadow" and rollout["canaries"] == ["cam-1"]
        told = retained_desired_state(mosquitto.url, Topics().device_desired("cam-1"))  # the canary's own
        assert told["shadow"]["name"] == "digits" and told["shadow"]["sample"] == 0.5
        assert rollout_status(registry_url)["shadow_first_s"] == 900.0
        assert served.stop()["stopped"]
    finally:
        watcher.close()
