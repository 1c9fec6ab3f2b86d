"""Shadow evaluation on the device: a candidate beside the serving model, statistics only.

Real agents, real TFLite runtimes, the digits models: fp32 serves, the int8 candidate shadows.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from edgekit import create_bundle
from edgekit.agent import Agent
from edgekit.agent.shadow import Shadow, ShadowError
from edgekit.bundle import read_bundle
from edgekit.errors import EdgekitError, MessageError
from edgekit.reports import TelemetryRecord
from edgekit.runtime import Model
from edgekit.trust import TrustedKeys


def offline_top1(model_path: Path, xs: np.ndarray) -> np.ndarray:
    """Each input's top-1 class from a bare runtime, outside the agent."""
    model = Model(model_path)
    detail = model.input_details[0]
    scale, zero = detail["quantization"]
    classes = []
    for x in xs:
        feed = x[None].astype(np.float32)
        if detail["dtype"] != np.float32:
            feed = np.clip(np.round(feed / scale + zero), -128, 127).astype(detail["dtype"])
        (out,) = model.run([feed])
        classes.append(int(np.argmax(out)))
    return np.array(classes)


def feed(agent: Agent, shadow: Shadow, xs: np.ndarray, batch: int = 16) -> list[np.ndarray]:
    """predict() every input, letting the shadow catch up between batches (no drops)."""
    outputs = []
    for start in range(0, len(xs), batch):
        for x in xs[start : start + batch]:
            outputs.append(agent.predict(x)[0])
        assert shadow.wait_idle()
    return outputs


def events(agent: Agent) -> list[dict[str, object]]:
    return agent.events.peek()


def test_int8_candidate_agreement_matches_the_truth_computed_offline(make_config, bundles, models):
    xs = models.x_test
    truth = offline_top1(models.int8, xs) == offline_top1(models.fp32, xs)
    with Agent.from_config(make_config("agree"), background=False) as agent:
        agent.install(bundles.v1)  # fp32 serves
        alone = [agent.predict(x)[0] for x in xs]
        shadow = agent.start_shadow(bundles.v2, sample=1.0, cpu_budget=1.0)  # int8 candidate
        served = feed(agent, shadow, xs)
        record = agent.flush_telemetry()
    # Callers get the serving model's answers, bit for bit, never the candidate's.
    assert all(np.array_equal(a, b) for a, b in zip(alone, served))
    assert record is not None and record.shadow is not None
    figures = record.shadow
    assert figures["state"] == "running"
    assert figures["compared"] == len(xs) and figures["dropped"] == 0
    assert figures["classified"] == len(xs)
    assert abs(figures["agreed"] - int(truth.sum())) <= 1  # one borderline rounding at most
    assert figures["candidate"]["version"] == "2.0.0"
    assert 0 < figures["abs_error_mean"] <= figures["abs_error_max"] <= 1
    for key in ("serving_latency_ms", "candidate_latency_ms"):
        assert figures[key]["p50"] > 0 and figures[key]["p95"] >= figures[key]["p50"]
    # Statistics only: nothing of the inputs or outputs travels.
    wire = json.dumps(record.to_dict())
    assert len(wire) < 4096 and TelemetryRecord.from_json(wire.encode()).shadow == figures
    kinds = [e["kind"] for e in events(agent)]
    assert "shadow_started" in kinds


def test_identical_candidate_agrees_fully_and_the_next_window_starts_afresh(make_config, bundles, models):
    with Agent.from_config(make_config("same"), background=False) as agent:
        agent.install(bundles.v1)
        shadow = agent.start_shadow(bundles.v3, sample=1.0, cpu_budget=1.0)  # same fp32 model
        feed(agent, shadow, models.x_test[:64])
        first = agent.flush_telemetry()
        second = agent.flush_telemetry()
    assert first is not None and first.shadow is not None
    assert first.shadow["agreement"] == 1.0 and first.shadow["abs_error_max"] == 0.0
    assert second is not None and second.shadow is not None and second.shadow["compared"] == 0


def test_a_shadow_that_falls_behind_drops_and_counts_without_slowing_callers(make_config, bundles, models):
    xs = np.repeat(models.x_test[:100], 5, axis=0)
    with Agent.from_config(make_config("behind"), background=False) as agent:
        agent.install(bundles.v1)
        shadow = agent.start_shadow(bundles.v2, sample=1.0, cpu_budget=0.01)  # 1% of a core
        for x in xs:
            agent.predict(x)
        figures = agent.stop_shadow()
    assert figures is not None
    assert figures["dropped"] > 0
    assert figures["compared"] + figures["dropped"] <= len(xs)
    assert figures["compared"] + figures["dropped"] >= len(xs) - 33  # a queue's worth was in flight
    assert shadow.state == "stopped"


def nan_model(fp32: Path, out: Path) -> Path:
    """The digits model with its last bias set to NaN: every output is NaN (a real broken model)."""
    model = Model(fp32)
    content = bytearray(fp32.read_bytes())
    patched = False
    for detail in model.interpreter.get_tensor_details():
        if tuple(detail["shape"]) == (10,) and detail["dtype"] == np.float32:
            try:
                bias = model.interpreter.get_tensor(detail["index"])
            except ValueError:
                continue
            at = bytes(content).find(bias.tobytes())
            if at >= 0 and bias.any():
                content[at : at + 40] = np.full(10, np.nan, np.float32).tobytes()
                patched = True
                break
    assert patched, "the digits model's last bias was not found"
    out.write_bytes(bytes(content))
    return out


def test_a_candidate_returning_nan_is_unloaded_and_serving_continues(
    make_config, bundles, models, key, tmp_path
):
    broken = tmp_path / "nan.ekb"
    create_bundle(
        nan_model(models.fp32, tmp_path / "nan.tflite"),
        name="digits",
        version="4.0.0",
        key=key,
        output=broken,
    )
    with Agent.from_config(make_config("nan"), background=False) as agent:
        agent.install(bundles.v1)
        expected = [agent.predict(x)[0] for x in models.x_test[:40]]
        shadow = agent.start_shadow(broken, sample=1.0, cpu_budget=1.0)
        served = [agent.predict(x)[0] for x in models.x_test[:40]]
        shadow.wait_idle()
        record = agent.flush_telemetry()
        after = agent.flush_telemetry()
    assert all(np.array_equal(a, b) for a, b in zip(expected, served))
    assert all(np.isfinite(s).all() for s in served)
    assert record is not None and record.errors == 0
    assert shadow.state == "failed" and not shadow.active
    assert record.shadow is not None and record.shadow["state"] == "failed"
    assert "NaN" in record.shadow["error"]
    assert after is not None and after.shadow is None  # reported once, then gone
    failed = [e for e in events(agent) if e["kind"] == "shadow_failed"]
    assert len(failed) == 1 and "unloaded" in str(failed[0]["message"])


def test_any_exception_from_a_candidate_run_unloads_it_and_the_worker_says_so(make_config, bundles, models):
    """Whatever a candidate's run raises, not only the errors the runtime raises today: the
    candidate is unloaded, reported with the exception's type, and serving goes on. A fake: the
    candidate's run replaced by one raising LookupError, an error no runtime here raises (a real
    failure of the runtime, a RuntimeError, is the crashing candidate of
    tests/fleet/test_shadow_agents.py)."""
    xs = models.x_test[:24]
    with Agent.from_config(make_config("oops"), background=False) as agent:
        agent.install(bundles.v1)
        expected = [agent.predict(x)[0] for x in xs]
        shadow = agent.start_shadow(bundles.v2, sample=1.0, cpu_budget=1.0)
        candidate = shadow._model
        assert candidate is not None

        def run(feeds: list[np.ndarray]) -> list[np.ndarray]:
            raise LookupError("a tensor index the candidate does not have")

        candidate.run = run  # type: ignore[method-assign]
        served = [agent.predict(x)[0] for x in xs]
        assert shadow.wait_idle()
        shadow._thread.join(10)
        record = agent.flush_telemetry()
    assert all(np.array_equal(a, b) for a, b in zip(expected, served))
    assert shadow.state == "failed" and shadow._model is None  # unloaded
    assert not shadow._thread.is_alive() and shadow.alive()  # it ended by failing the shadow, not silently
    assert record is not None and record.errors == 0 and record.shadow is not None
    assert record.shadow["state"] == "failed"
    assert "failed on a live input: LookupError: a tensor index" in record.shadow["error"]
    (failed,) = [e for e in events(agent) if e["kind"] == "shadow_failed"]
    assert "LookupError" in str(failed["message"]) and "unloaded" in str(failed["message"])


def test_a_board_short_of_memory_refuses_the_shadow_and_says_how_much_it_needs(bundles, key):
    # A fake for a fault the test machine cannot cause: the board's available memory is given
    # as 70 MiB (serving keeps 64 MiB), so the candidate cannot fit.
    bundle = read_bundle(bundles.v2, TrustedKeys([key.public]))
    told: list[tuple[str, str]] = []
    with pytest.raises(ShadowError) as refused:
        Shadow(
            bundle,
            bundle.manifest.inputs,
            bundle.manifest.outputs,
            available=lambda: 64 * 1024 * 1024 + 1024,
            on_event=lambda kind, message, ident: told.append((kind, message)),
        )
    message = str(refused.value)
    assert "would need about" in message and "MiB" in message and "serving model was left alone" in message
    assert told == [("shadow_refused", message)]


def test_an_untrusted_candidate_is_refused_with_an_event(make_config, bundles):
    with Agent.from_config(make_config("untrusted"), background=False) as agent:
        agent.install(bundles.v1)
        with pytest.raises(EdgekitError):
            agent.start_shadow(bundles.untrusted)
        assert agent.shadow_status() is None
        assert [e["kind"] for e in events(agent)][-1] == "shadow_refused"


@pytest.mark.parametrize("traffic", [True, False])
def test_a_shadow_ends_at_its_end_time(make_config, bundles, models, traffic):
    with Agent.from_config(make_config(f"until-{traffic}"), background=False) as agent:
        agent.install(bundles.v1)
        shadow = agent.start_shadow(bundles.v2, sample=1.0, until=1.0)  # already past
        if traffic:
            agent.predict(models.x_test[0])
        record = agent.flush_telemetry()
        after = agent.flush_telemetry()
    assert shadow.state == "expired"
    assert record is not None and record.shadow is not None and record.shadow["state"] == "expired"
    assert after is not None and after.shadow is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"compared": -1}, "compared"),
        ({"agreed": 5, "classified": 4}, "agreed"),
        ({"state": "exploded"}, "state"),
        ({"candidate": {"name": "digits"}}, "candidate"),
        ({"serving_latency_ms": {"p50": "fast"}}, "serving_latency_ms"),
        ({"agreement": "high"}, "agreement"),
        ({"peak_memory_bytes": -1}, "peak_memory_bytes"),
        ({"peak_memory_bytes": 1.5}, "peak_memory_bytes"),
    ],
)
def test_a_malformed_shadow_window_is_refused_by_the_telemetry_decoder(make_config, bundles, change, field):
    with Agent.from_config(make_config("decode"), background=False) as agent:
        agent.install(bundles.v1)
        agent.start_shadow(bundles.v2)
        record = agent.flush_telemetry()
    assert record is not None and record.shadow is not None
    doc = record.to_dict()
    doc["shadow"] = {**doc["shadow"], **change}
    with pytest.raises(MessageError, match=field):
        TelemetryRecord.from_json(json.dumps(doc).encode())


@pytest.mark.parametrize("low_memory", [True, False])
def test_installing_another_serving_model_stops_the_shadow(make_config, bundles, models, low_memory):
    config = make_config(f"swap-{low_memory}", low_memory_install=str(low_memory).lower())
    with Agent.from_config(config, background=False) as agent:
        agent.install(bundles.v1)
        shadow = agent.start_shadow(bundles.v2, sample=1.0)
        agent.install(bundles.v3)
        assert shadow.state == "stopped" and agent.shadow is None
        agent.predict(models.x_test[0])
        agent.flush_telemetry()
        shadows = [r["shadow"] for r in agent.telemetry.peek() if r.get("shadow")]
    assert [s["state"] for s in shadows][-1:] == ["stopped"]  # its last window, reported once
    assert [s["state"] for s in shadows].count("stopped") == 1


def test_under_concurrent_http_and_embedded_calls_every_answer_is_the_serving_models(
    make_config, bundles, models
):
    from edgekit.agent.serve import InferenceServer
    from test_agent_serve import call

    xs = models.x_test[:48]
    with Agent.from_config(make_config("concurrent"), background=False) as agent:
        agent.install(bundles.v2)  # int8 serves; the fp32 candidate would answer otherwise
        expected = [agent.predict(x[None], as_dict=True) for x in xs]
        shadow = agent.start_shadow(bundles.v1, sample=1.0, cpu_budget=1.0)
        server = InferenceServer(agent, "127.0.0.1", 0).start()
        failures: list[str] = []

        def embedded(offset: int) -> None:
            for round_ in range(5):
                for i in range(len(xs)):
                    j = (i + offset + round_) % len(xs)
                    got = agent.predict(xs[j][None], as_dict=True)
                    if any(not np.array_equal(got[k], expected[j][k]) for k in got):
                        failures.append(f"embedded call {j} got another answer")

        def http(offset: int) -> None:
            for i in range(0, len(xs), 3):
                j = (i + offset) % len(xs)
                status, doc = call(
                    f"{server.url}/v1/predict", json.dumps({"inputs": xs[j][None].tolist()}).encode()
                )
                ((name, out),) = doc["outputs"].items()
                if status != 200 or not np.allclose(np.asarray(out), expected[j][name], rtol=1e-6, atol=0):
                    failures.append(f"http call {j} got another answer")

        def guarded(work: Callable[[int], None], offset: int) -> None:
            try:
                work(offset)
            except Exception as exc:  # a caller that died would otherwise go unnoticed
                failures.append(f"{work.__name__} caller {offset} raised {exc!r}")

        threads = [threading.Thread(target=guarded, args=(embedded, k * 5)) for k in range(3)]
        threads += [threading.Thread(target=guarded, args=(http, k)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        server.stop()
        assert shadow.wait_idle()
        figures = agent.stop_shadow()
    assert failures == []
    assert figures is not None and figures["compared"] > 0 and figures["state"] == "stopped"


def test_the_candidate_is_judged_on_the_devices_inputs_with_its_own_baseline(make_config, bundles, models):
    """Drift severity of the candidate, from its bundle's baseline (issue 20: shadow criteria use
    severity): the digits it was built on leave it unaffected; inverted digits (0% right) make it
    `model affected`, which `edgekit shadow promote` refuses (tests/fleet/test_fleet_shadow.py)."""
    clean, inverted = models.x_test, (1.0 - models.x_test).astype(np.float32)
    verdicts = {}
    for name, xs in (("clean", clean), ("inverted", inverted)):
        config = make_config(f"severity-{name}", drift_window=100)
        with Agent.from_config(config, background=False) as agent:
            agent.install(bundles.v1)
            shadow = agent.start_shadow(bundles.v2, sample=1.0, cpu_budget=1.0)
            feed(agent, shadow, xs[:300])
            record = agent.flush_telemetry()
        assert record is not None and record.shadow is not None and record.shadow["compared"] == 300
        verdicts[name] = record.shadow["severity"]
    assert verdicts["clean"] in ("ok", "inputs changed") and verdicts["inverted"] == "model affected", (
        verdicts
    )


def test_each_window_reports_the_peak_memory_with_both_models_loaded(make_config, bundles, models):
    with Agent.from_config(make_config("peak"), background=False) as agent:
        agent.install(bundles.v1)
        shadow = agent.start_shadow(bundles.v2, sample=1.0, cpu_budget=1.0)
        feed(agent, shadow, models.x_test[:64])
        rss_now = agent.flush_telemetry()
        assert rss_now is not None and rss_now.shadow is not None
        first = rss_now.shadow["peak_memory_bytes"]
        # The agent's own RSS, sampled while both are loaded: about what the record says now.
        assert rss_now.memory_rss_bytes is not None and first >= 0.9 * rss_now.memory_rss_bytes > 0
        # Memory taken in the next window (the worker samples after each comparison) raises it.
        ballast = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, touched
        feed(agent, shadow, models.x_test[64:96])
        second = agent.flush_telemetry()
        del ballast
        assert second is not None and second.shadow is not None
        assert second.shadow["peak_memory_bytes"] >= first + 48 * 1024 * 1024
        assert TelemetryRecord.from_json(json.dumps(second.to_dict()).encode()).shadow == second.shadow
        agent.stop_shadow()
        stopped = agent.flush_telemetry()  # the stopped shadow's last window: not both loaded any more
    assert stopped is not None and stopped.shadow is not None
    assert stopped.shadow["state"] == "stopped"
