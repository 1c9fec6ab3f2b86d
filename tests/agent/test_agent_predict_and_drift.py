"""predict() under threads, and drift: quiet on unshifted inputs, loud on shifted ones."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from edgekit.agent import Agent, DriftMonitor
from edgekit.baseline import Baseline, bin_counts, compute_baseline
from hypothesis import given, settings
from hypothesis import strategies as st


def test_predict_is_thread_safe(make_config, bundles, models):
    path = make_config("threads")
    with Agent.from_config(path, background=False, drift_sample_rate=0.5) as agent:
        agent.install(bundles.v1)
        xs = models.x_test[:64]
        expected = [agent.predict(x)[0] for x in xs]
        failures: list[str] = []
        barrier = threading.Barrier(6)

        def worker(offset: int) -> None:
            barrier.wait()
            for round_ in range(20):
                for i in range(len(xs)):
                    j = (i + offset + round_) % len(xs)
                    (out,) = agent.predict(xs[j])
                    if not np.array_equal(out, expected[j]):
                        failures.append(f"thread {offset}: sample {j} got another sample's output")

        threads = [threading.Thread(target=worker, args=(k * 7,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        record = agent.flush_telemetry()
        assert record is not None and record.count == 64 + 6 * 20 * 64


def drifted_after(agent: Agent, xs: np.ndarray) -> bool:
    for x in xs:
        agent.predict(x)
    report = agent.drift()
    assert report is not None and report.complete
    return report.drifted


SHIFTS = {
    "brightness": lambda x, rng: np.clip(x + 0.3, 0, 1),
    "noise": lambda x, rng: np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1).astype(np.float32),
    "inverted": lambda x, rng: 1.0 - x,
    "blank camera": lambda x, rng: np.zeros_like(x),
}


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_drift_is_caught_within_one_window(make_config, bundles, models, shift):
    rng = np.random.default_rng(1)
    path = make_config(shift.replace(" ", "-"), drift_sample_rate=1.0)
    with Agent.from_config(path, background=False) as agent:
        agent.install(bundles.v1)
        report = agent.drift()
        assert report is not None and not report.complete and not report.drifted
        xs = models.x_test[rng.integers(0, len(models.x_test), 200)]
        assert drifted_after(agent, SHIFTS[shift](xs, rng))
        names = {f.name for f in agent.drift().features if f.drifted}
        assert names, "a drifted report names the features that drifted"


def test_unshifted_inputs_do_not_alarm(make_config, bundles, models):
    rng = np.random.default_rng(2)
    path = make_config("calm", drift_sample_rate=1.0)
    with Agent.from_config(path, background=False) as agent:
        agent.install(bundles.v1)
        alarms = 0
        for _ in range(5):
            alarms += drifted_after(agent, models.x_test[rng.integers(0, len(models.x_test), 200)])
        assert alarms == 0
        report = agent.drift()
        assert report.windows == 5 and report.samples == 200
        assert {f.name for f in report.features} == {"channel0", "output.class", "output.confidence"}
        assert report.to_dict()["psi_threshold"] == agent.config.drift_psi_threshold


def test_drift_sampling_follows_the_configured_rate(make_config, bundles, models):
    path = make_config("rate", drift_sample_rate=0.1)
    with Agent.from_config(path, background=False) as agent:
        agent.install(bundles.v1)
        for _ in range(30):
            for x in models.x_test[:100]:
                agent.predict(x)
        sampled = agent._served.drift.sampled  # type: ignore[union-attr]
        assert 200 <= sampled <= 400  # 3000 calls at 10%


@settings(max_examples=40, deadline=None)
@given(
    features=st.integers(1, 20),
    rows=st.integers(2, 60),
    seed=st.integers(0, 2**16),
)
def test_vectorized_binning_matches_bin_counts(features, rows, seed):
    rng = np.random.default_rng(seed)
    reference = rng.normal(size=(50, features)).astype(np.float32)
    reference[:, 0] = 1.0  # a constant feature has its own bin layout
    baseline = compute_baseline(reference)
    monitor = DriftMonitor(baseline, window=1000, psi_threshold=0.25, ks_threshold=0.15)
    data = rng.normal(scale=2.0, size=(rows, features)).astype(np.float32)
    for row in data:
        monitor.add(row)
    monitor.flush()
    counts = monitor._current.counts
    for i, feature in enumerate(baseline.features):
        want = bin_counts(data[:, i], np.asarray(feature.cuts))
        np.testing.assert_array_equal(counts[i, : len(feature.cuts) + 1], want)
        assert counts[i, len(feature.cuts) + 1 :].sum() == 0


def test_baseline_json_round_trip_is_unchanged():
    baseline = compute_baseline(np.random.default_rng(0).random((20, 4, 4, 1)).astype(np.float32))
    assert Baseline.from_json(baseline.to_json()) == baseline


def test_drift_on_a_quantized_model_judges_real_values(make_config, bundles, models):
    rng = np.random.default_rng(3)
    path = make_config("int8", drift_sample_rate=1.0, drift_window=100)
    with Agent.from_config(path, background=False) as agent:
        agent.install(bundles.v2)  # int8 input: the monitor dequantizes what it samples
        assert not drifted_after(agent, models.x_test[rng.integers(0, len(models.x_test), 100)])
        report = agent.drift()
        channel = next(f for f in report.features if f.name == "channel0")
        assert channel.mean == pytest.approx(float(models.x_test.mean()), abs=0.05)
        assert drifted_after(agent, 1.0 - models.x_test[rng.integers(0, len(models.x_test), 100)])


def test_quantized_inputs_land_in_the_bins_the_baseline_counted_them_in(models):
    from edgekit.agent.drift import on_quantized_grid
    from edgekit.runtime import quantize
    from edgekit.tflite import TensorSpec

    spec = TensorSpec(
        name="x", index=0, shape=(1, 8, 8, 1), dtype="int8", scale=(1 / 255,), zero_point=(-128,)
    )
    x = models.x_test
    baseline = compute_baseline(x)
    monitor = DriftMonitor(baseline, window=len(x), psi_threshold=0.1, ks_threshold=0.1, input_spec=spec)
    for sample in x:
        monitor.add(quantize(sample[None], spec))
    report = monitor.report()
    (channel,) = report.features
    assert report.complete and channel.psi < 1e-3 and channel.ks == 0.0
    mapped = on_quantized_grid(baseline.features[0], spec)
    assert sum(mapped.counts) == sum(baseline.features[0].counts)
    # Black pixels keep a bin of their own: the one grid point 0.0 quantizes to.
    assert mapped.cuts[:2] == pytest.approx((-0.5 / 255, 0.5 / 255))
    assert mapped.counts[1] == baseline.features[0].counts[1] == int(np.count_nonzero(x == 0))
