"""`edgekit push --shadow`, `edgekit shadow status` and `shadow stop` end to end: the real CLI,
a real Mosquitto, ingest into the registry, and real agents (in this process, so the test can
feed their predict() the digits test set) serving fp32 while the int8 candidate shadows it."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from edgekit.agent import Agent
from edgekit.agent.daemon import AgentDaemon
from edgekit.fleet.registry import Registry
from edgekit.fleet.shadow import judge, summarize, wilson_interval
from edgekit.keys import load_own_public_key
from edgekit.runtime import Model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "agent"))
from device_fixtures import key, make_config  # noqa: F401 - fixtures
from test_daemon import Watcher
from test_push import edgekit

DEVICES = ["cam-1", "cam-2"]


def top1(path: Path, xs: np.ndarray) -> np.ndarray:
    model = Model(path)
    detail = model.input_details[0]
    scale, zero = detail["quantization"]
    classes = []
    for x in xs:
        feed = x[None].astype(np.float32)
        if detail["dtype"] != np.float32:
            feed = np.clip(np.round(feed / scale + zero), -128, 127).astype(detail["dtype"])
        classes.append(int(np.argmax(model.run([feed])[0])))
    return np.array(classes)


def fleet_of_agents(
    mosquitto, edgekit_home: Path, tmp_path: Path, names: list[str]
) -> Iterator[dict[str, AgentDaemon]]:
    """Real agents of fleet ``lab`` in this process, one daemon each on the broker, trusting a
    new workstation key (for the ``devices`` fixtures of the shadow tests)."""
    assert edgekit("keys", "init").returncode == 0
    pem = load_own_public_key(edgekit_home).pem().decode()
    daemons = {}
    for device in names:
        config = tmp_path / f"{device}.toml"
        config.write_text(
            f'device = "{device}"\nfleet = "lab"\nstate_dir = "{tmp_path / device}"\n'
            f"broker = \"{mosquitto.url}\"\nthreads = 1\ntrusted_keys = '''\n{pem}'''\n"
            "[telemetry]\ninterval = 3600\n"
        )
        agent = Agent.from_config(config, background=False)
        daemons[device] = AgentDaemon(agent, upload_interval=0.1).start()
    yield daemons
    for daemon in daemons.values():
        daemon.stop()
        daemon.agent.close()


@pytest.fixture
def devices(mosquitto, edgekit_home, tmp_path) -> Iterator[dict[str, AgentDaemon]]:
    yield from fleet_of_agents(mosquitto, edgekit_home, tmp_path, DEVICES)


def test_push_shadow_measures_the_candidate_on_every_device_and_status_sums_it_up(
    mosquitto, edgekit_home, devices, digits_models, start_ingest
):
    broker = ["--broker", mosquitto.url]
    xs = digits_models.x_test
    truth = float((top1(digits_models.int8, xs) == top1(digits_models.fp32, xs)).mean())
    watcher = Watcher(mosquitto.url)
    try:
        pushed = edgekit(
            "push", str(digits_models.fp32), "--fleet", "lab", "--name", "digits", "--version", "1.0.0",
            "--wait", "--timeout", "120", "--json", *broker,
        )  # fmt: skip
        assert pushed.returncode == 0, pushed.stderr
        registry = Registry(f"sqlite:///{edgekit_home / 'registry.db'}")
        ingest = start_ingest(registry)
        shadowed = edgekit(
            "push", str(digits_models.int8), "--fleet", "lab", "--name", "digits", "--version", "2.0.0",
            "--shadow", "--sample", "1", "--for", "1h", "--json", *broker,
        )  # fmt: skip
        assert shadowed.returncode == 0, shadowed.stderr
        started = json.loads(shadowed.stdout)
        assert started["serving"] == "digits@1.0.0" and started["candidate"] == "digits@2.0.0"

        def all_say(kind: str):
            return lambda _: all(
                any(e["kind"] == kind for e in watcher.records("events", d)) for d in DEVICES
            )

        watcher.wait_for(all_say("shadow_started"))
        for daemon in devices.values():
            agent, shadow = daemon.agent, daemon.agent.shadow
            assert shadow is not None
            for start in range(0, len(xs), 16):
                for x in xs[start : start + 16]:
                    (out,) = agent.predict(x)
                    assert out.dtype == np.float32  # the fp32 serving model's answer
                assert shadow.wait_idle()
            agent.flush_telemetry()
            assert agent.status().version == "1.0.0"  # nothing was switched
        assert ingest.wait_for(lambda stats: stats.telemetry >= len(DEVICES))

        status = edgekit("shadow", "status", "--fleet", "lab", "--json")
        assert status.returncode == 0, status.stderr
        doc = json.loads(status.stdout)
        assert doc["candidate"] == "digits@2.0.0"
        assert [d["device"] for d in doc["devices"]] == DEVICES
        total = doc["total"]
        assert total["compared"] == len(DEVICES) * len(xs) and total["dropped"] == 0
        assert abs(total["agreement"] - truth) <= 2 / len(xs)
        assert total["agreement_low"] <= truth <= total["agreement_high"]
        assert total["latency_ratio"] is not None and total["latency_ratio"] > 0
        for figures in (total, *doc["devices"]):  # p50 and p95 of both models, as measured
            for model in ("serving", "candidate"):
                assert 0 < figures[f"{model}_p50_ms"] <= figures[f"{model}_p95_ms"], figures
        table = edgekit("shadow", "status", "--fleet", "lab")
        assert table.returncode == 0 and "total" in table.stdout and "digits@2.0.0" in table.stdout
        assert "serving p50 / p95" in table.stdout and "candidate p50 / p95" in table.stdout
        p50, p95 = total["candidate_p50_ms"], total["candidate_p95_ms"]
        assert p95 < 1  # the digits model: microseconds, shown as such (not 0.0 ms)
        assert f"{p50:.3f} / {p95:.3f} ms" in table.stdout, table.stdout

        stopped = edgekit("shadow", "stop", "--fleet", "lab", "--json", *broker)
        assert stopped.returncode == 0, stopped.stderr
        watcher.wait_for(all_say("shadow_stopped"))
        assert all(d.agent.shadow is None for d in devices.values())

        # promote: refused while a device's figures fail, naming it; nothing is published.
        refused = edgekit("shadow", "promote", "--fleet", "lab", "--min-agreement", "1.0", *broker)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        if truth < 1.0:
            assert "cam-1: agreement" in refused.stderr and "was not promoted" in refused.stderr
        slow = edgekit(
            "shadow", "promote", "--fleet", "lab", "--max-latency-ratio", "0.0001", "--json", *broker
        )
        assert slow.returncode != 0
        verdict = json.loads(slow.stdout)
        assert not verdict["passed"] and any("as slow" in r for r in verdict["reasons"])
        assert all(d.agent.status().version == "1.0.0" for d in devices.values())
        # ... and a normal rollout when they pass.
        passed = edgekit(
            "shadow", "promote", "--fleet", "lab", "--min-agreement", "0.9", "--max-latency-ratio", "1000",
            "--json", *broker,
        )  # fmt: skip
        assert passed.returncode == 0, passed.stderr
        assert json.loads(passed.stdout)["rollout"]["bundle"] == "digits@2.0.0"
        watcher.wait_for(lambda _: all(watcher.serving("2.0.0", d)(_) for d in DEVICES))
        registry.close()
    finally:
        watcher.close()


def test_push_shadow_refuses_a_fleet_that_serves_nothing_yet(mosquitto, edgekit_home, digits_models):
    assert edgekit("keys", "init").returncode == 0
    result = edgekit("push", str(digits_models.int8), "--fleet", "lab", "--shadow", "--broker", mosquitto.url)
    assert result.returncode != 0
    assert "nothing was pushed to fleet lab yet" in result.stderr and "Traceback" not in result.stderr


def test_sample_without_shadow_is_refused(edgekit_home, digits_models):
    result = edgekit("push", str(digits_models.int8), "--fleet", "lab", "--sample", "0.5")
    assert result.returncode != 0 and "--sample and --for go with --shadow" in result.stderr


def test_promote_without_figures_is_refused(edgekit_home):
    result = edgekit("shadow", "promote", "--fleet", "lab")
    assert result.returncode != 0 and "no device has reported a shadow evaluation" in result.stderr


def test_status_of_a_fleet_without_shadow_says_how_to_start_one(edgekit_home):
    result = edgekit("shadow", "status", "--fleet", "lab")
    assert result.returncode == 0 and "edgekit push CANDIDATE --fleet lab --shadow" in result.stdout


def test_wilson_interval_and_summary_of_no_windows():
    low, high = wilson_interval(95, 100)
    assert 0.88 < low < 0.89 and 0.97 < high < 0.99
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(10, 10)[1] == 1.0
    assert summarize([])["devices"] == []


def row(device: str, **extra: object) -> SimpleNamespace:
    fields = {
        "device": device, "candidate_id": "c" * 64, "candidate_label": "digits@2.0.0",
        "serving_version": "1.0.0", "state": "running", "sample_rate": 0.1, "compared": 200,
        "dropped": 0, "classified": 200, "agreed": 199, "abs_error_mean": 0.01, "abs_error_max": 0.1,
        "serving_p50_ms": 1.0, "serving_p95_ms": 2.0, "candidate_p50_ms": 1.1, "candidate_p95_ms": 2.2,
        "error": None, "candidate_severity": "ok",
    }  # fmt: skip
    return SimpleNamespace(**{**fields, **extra})


def test_judge_names_each_failing_device_and_why():
    windows = [
        row("cam-1"),
        row("cam-2", state="failed", error="it returned NaN or infinity"),
        row("cam-3", compared=0, classified=0, agreed=0),
        row("cam-4", agreed=20),
        row("cam-5", candidate_p95_ms=8.0),
        row("cam-6", candidate_severity="model affected"),
        row("cam-6", candidate_severity=None),  # a window not judged yet keeps the last verdict
    ]
    reasons = judge(summarize(windows), 0.98, 1.2)
    assert reasons == [
        "cam-2: the candidate failed there (it returned NaN or infinity)",
        "cam-3: no input was compared yet",
        "cam-4: agreement 10.0% is below 98.0% (20 of 200 inputs)",
        "cam-5: the candidate is 4.00x as slow (p95), over 1.20x",
        "cam-6: this device's inputs affect the candidate (drift: model affected): "
        "its answers or confidence moved away from the data it was built on",
    ]
    assert judge(summarize([row("cam-7", candidate_severity="inputs changed")]), 0.98, 1.2) == []
    assert judge(summarize([row("cam-1")]), 0.98, 1.2) == []
    total = summarize(windows)["total"]
    assert total["compared"] == 1200 and total["agreed"] == 199 + 199 + 20 + 199 + 0 + 199 + 199
    # Latency per device and in total: p50 and p95 of each model (the median of the windows').
    cam5 = summarize(windows)["devices"][4]
    assert (cam5["serving_p50_ms"], cam5["serving_p95_ms"], cam5["candidate_p50_ms"]) == (1.0, 2.0, 1.1)
    assert cam5["candidate_p95_ms"] == 8.0
    faster = [row("cam-1", candidate_p50_ms=0.5), row("cam-2", candidate_p50_ms=0.7), row("cam-3")]
    total = summarize(faster)["total"]
    assert (total["serving_p50_ms"], total["candidate_p50_ms"], total["candidate_p95_ms"]) == (1.0, 0.7, 2.2)


def test_a_regression_candidate_is_judged_by_its_output_error_not_by_latency_alone(
    diabetes_regressor,
    key,  # noqa: F811 - the fixture imported above
    make_config,  # noqa: F811 - the fixture imported above
    tmp_path,
):
    """A real agent serves a regressor and tries one that answers 0.5 higher: no agreement can
    be computed, so judge() refuses unless --max-error is given, and then the error decides."""
    from edgekit import create_bundle
    from edgekit.fleet.ingest import _shadow_row

    reg = diabetes_regressor
    for model, version in ((reg.fp32, "1.0.0"), (reg.shifted, "2.0.0")):
        create_bundle(model, name="diabetes", version=version, key=key, output=tmp_path / f"{version}.ekb")
    with Agent.from_config(make_config("regress"), background=False) as agent:
        agent.install(tmp_path / "1.0.0.ekb")
        shadow = agent.start_shadow(tmp_path / "2.0.0.ekb", sample=1.0, cpu_budget=1.0)
        for start in range(0, 40, 8):  # letting the shadow catch up: nothing dropped
            for x in reg.x[start : start + 8]:
                agent.predict(x[None])
            assert shadow.wait_idle()
        record = agent.flush_telemetry()
    assert record is not None and record.shadow is not None
    summary = summarize([_shadow_row(record, record.shadow)])
    (device,) = summary["devices"]
    assert device["compared"] == 40 and device["classified"] == 0 and device["agreement"] is None
    assert device["abs_error_max"] == pytest.approx(0.5, abs=1e-3)
    name = record.device
    assert judge(summary, 0.98, 1000) == [
        f"{name}: its outputs are not classes, so agreement could not be judged; give --max-error "
        "(the largest output difference you accept) to judge them"
    ]
    (over,) = judge(summary, 0.98, 1000, max_error=0.1)
    assert over.startswith(f"{name}: the outputs differ by up to 0.5") and "over the 0.1 allowed" in over
    assert judge(summary, 0.98, 1000, max_error=0.6) == []
