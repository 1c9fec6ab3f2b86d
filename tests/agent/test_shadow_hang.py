"""Shadow evaluation when the candidate hangs, and when one candidate replaces another: real
agents, real TFLite runtimes, the digits bundles (fp32 serves; the int8 or another fp32 candidate
shadows it)."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
from edgekit.agent import Agent
from edgekit.runtime import Model


def test_a_candidate_that_hangs_on_one_input_is_unloaded_while_predict_keeps_answering(
    make_config, bundles, models, monkeypatch: pytest.MonkeyPatch
):
    # A FAKE for a fault a real model cannot be made to show on one chosen input: the candidate
    # (the real int8 model, loaded by the shadow) has its run on the 5th input it compares held
    # on an event, as a kernel stuck in a loop would hold it, until the test lets it go.
    xs = models.x_test[:64]
    stuck, release = threading.Event(), threading.Event()
    held: dict[str, Any] = {"model": None, "runs": 0}
    real_run = Model.run

    def run(self: Model, feeds: Any) -> list[np.ndarray]:
        if self is held["model"]:
            held["runs"] += 1
            if held["runs"] == 5:
                stuck.set()
                release.wait(60)
        return real_run(self, feeds)

    monkeypatch.setattr(Model, "run", run)
    with Agent.from_config(make_config("hang"), background=False) as agent:
        agent.install(bundles.v1)
        expected = [agent.predict(x)[0] for x in xs]
        shadow = agent.start_shadow(bundles.v2, sample=1.0, cpu_budget=1.0, hang_seconds=0.2)
        assert shadow._model is not None
        held["model"] = shadow._model
        answers, wrong = 0, []
        deadline = time.monotonic() + 60
        # predict() goes on while the candidate is stuck: inputs queue up to QUEUE_MAX, then are
        # dropped; past hang_seconds the next one finds the candidate hung and it is unloaded.
        while shadow.state == "running" and time.monotonic() < deadline:
            i = answers % len(xs)
            (out,) = agent.predict(xs[i])
            answers += 1
            if not np.array_equal(out, expected[i]):
                wrong.append(i)
        assert stuck.is_set() and shadow.state == "failed", shadow.state
        assert not shadow.active and agent.predict(xs[0])[0].tolist() == expected[0].tolist()
        record = agent.flush_telemetry()
        after = agent.flush_telemetry()
        release.set()  # the abandoned run returns; its thread ends and the interpreter is freed
        shadow._thread.join(timeout=30)
        assert not shadow._thread.is_alive()
    assert wrong == [] and answers > 0  # every answer was the serving model's
    assert record is not None and record.errors == 0 and record.count >= answers
    assert record.shadow is not None and record.shadow["state"] == "failed"
    assert record.shadow["compared"] == 4 and record.shadow["dropped"] > 0
    assert "ran for over 0.2 s on one input (hung)" in record.shadow["error"]
    assert after is not None and after.shadow is None  # reported once, then gone
    failed = [e for e in agent.events.peek() if e["kind"] == "shadow_failed"]
    assert len(failed) == 1
    assert "digits@2.0.0 ran for over 0.2 s on one input (hung)" in str(failed[0]["message"])
    assert "it was unloaded and the serving model answered every request" in str(failed[0]["message"])
    assert failed[0]["bundle"]["version"] == "2.0.0"


def test_a_replaced_candidates_last_window_is_reported_before_the_next_candidates(
    make_config, bundles, models
):
    """Else the old candidate's last window, sent after the new one ended, would be the fleet's
    newest and `shadow status` / `promote` would judge the old candidate."""
    xs = models.x_test[:20]
    with Agent.from_config(make_config("replace"), background=False) as agent:
        agent.install(bundles.v1)
        first = agent.start_shadow(bundles.v2, sample=1.0, cpu_budget=1.0)
        for x in xs:
            agent.predict(x)
        assert first.wait_idle()
        agent.start_shadow(bundles.v3, sample=1.0, until=1.0)  # replaces it; already past its end
        agent.predict(xs[0])
        records = [agent.flush_telemetry() for _ in range(3)]
    shadows = [r.shadow if r is not None else None for r in records]
    assert shadows[0] is not None and shadows[1] is not None
    assert (shadows[0]["candidate"]["version"], shadows[0]["state"]) == ("2.0.0", "stopped")
    assert shadows[0]["compared"] == len(xs)
    assert (shadows[1]["candidate"]["version"], shadows[1]["state"]) == ("3.0.0", "expired")
    assert shadows[2] is None
