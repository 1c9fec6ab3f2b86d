"""Capture on a real agent serving the real digits model: nothing without a valid signed policy,
never over its limits (a flood, a restart, a clock jump), retention on time, the app's filter."""

from __future__ import annotations

import time

import numpy as np
import pytest
from edgekit.agent import Agent
from edgekit.agent.capture import CaptureClock
from edgekit.capture import CaptureKey, CapturePolicy, new_capture_policy, open_record, sign_capture_policy
from edgekit.errors import CaptureError
from edgekit.keys import SigningKey


class FakeClock(CaptureClock):
    """Wall and monotonic time the test moves, and a boot id it changes (a reboot)."""

    def __init__(self) -> None:
        self.now = time.time()
        self.mono_now = 1000.0
        self.boot_id = "boot-1"

    def wall(self) -> float:
        return self.now

    def mono(self) -> float:
        return self.mono_now

    def boot(self) -> str:
        return self.boot_id

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono_now += seconds


@pytest.fixture(scope="module")
def owner() -> CaptureKey:
    return CaptureKey.generate()


def policy(owner: CaptureKey, seq: int = 1, now: float | None = None, **kw: object) -> CapturePolicy:
    kw.setdefault("triggers", ("sample",))
    kw.setdefault("sample_rate", 1.0)
    return new_capture_policy("lab", seq=seq, recipient=owner.public_raw, now=now, **kw)  # type: ignore[arg-type]


def signed(key: SigningKey, p: CapturePolicy) -> bytes:
    return sign_capture_policy(p, key)


def held(agent: Agent, owner: CaptureKey) -> list:
    cap = agent.capture
    return [open_record(cap.read(seq) or b"", owner) for seq in cap.pending(10**6, 0.0)]


def test_nothing_is_captured_without_a_valid_policy(make_config, bundles, models, key, other_key, owner):
    with Agent.from_config(make_config("none"), background=False) as agent:
        agent.install(bundles.v1)
        for x in models.x_test[:200]:
            agent.predict(x)
        assert len(agent.capture) == 0 and agent.capture.stats.captured == 0
        refusals = {
            "unsigned": policy(owner).to_json(),
            "untrusted": signed(other_key, policy(owner)),
            "other-fleet": sign_capture_policy(
                new_capture_policy("elsewhere", seq=1, recipient=owner.public_raw, triggers=("sample",)), key
            ),
            "expired": signed(key, policy(owner, now=time.time() - 10, ttl=5)),
        }
        for reason, envelope in refusals.items():
            with pytest.raises(CaptureError) as info:
                agent.capture.apply(envelope)
            assert info.value.reason == reason  # type: ignore[attr-defined]
        agent.capture.apply(signed(key, policy(owner, seq=3)))
        with pytest.raises(CaptureError) as info:
            agent.capture.apply(signed(key, policy(owner, seq=2)))
        assert info.value.reason == "replayed"  # type: ignore[attr-defined]


def test_a_flood_of_triggers_stays_within_the_hourly_cap_across_restarts_and_clock_jumps(
    make_config, bundles, models, key, owner
):
    clock = FakeClock()
    path = make_config("flood")
    with Agent.from_config(path, background=False) as first:
        first.install(bundles.v1)
    agent = Agent(first.config, background=False, capture_clock=clock)
    agent.capture.apply(signed(key, policy(owner, max_per_hour=20, now=clock.now)))
    xs = models.x_test
    for i in range(10_000):  # every prediction is a trigger (sample_rate 1.0)
        agent.predict(xs[i % len(xs)])
    assert len(agent.capture) == 20 and agent.capture.stats.capped == 10_000 - 20
    agent.close()
    # A restart on the same state: the hour's captures are remembered.
    agent = Agent(first.config, background=False, capture_clock=clock)
    for x in xs[:500]:
        agent.predict(x)
    assert len(agent.capture) == 20 and agent.capture.stats.captured == 0
    # The wall clock jumps back a day, then forward two hours: the monotonic clock still says
    # less than an hour passed, so nothing more is taken.
    clock.now -= 86400
    for x in xs[:100]:
        agent.predict(x)
    clock.now += 86400 + 7200
    for x in xs[:100]:
        agent.predict(x)
    assert len(agent.capture) == 20
    # A reboot with the wall clock set back: the captures are "in the future", still counted.
    agent.close()
    clock.boot_id, clock.mono_now, clock.now = "boot-2", 5.0, clock.now - 7200 - 86400
    agent = Agent(first.config, background=False, capture_clock=clock)
    for x in xs[:100]:
        agent.predict(x)
    assert len(agent.capture) == 20
    clock.advance(3000)
    for x in xs[:100]:
        agent.predict(x)
    assert len(agent.capture) == 20
    # Once the wall clock is an hour past them, the next 20 are allowed, no more.
    clock.advance(86400 + 3601 - 3000)
    for i in range(1000):
        agent.predict(xs[i % len(xs)])
    assert len(agent.capture) == 40
    records = held(agent, owner)
    assert len({r.header.seq for r in records}) == 40 and {r.trigger for r in records} == {"sample"}
    agent.close()


def test_bytes_on_disk_stay_under_the_cap_oldest_dropped_first(make_config, bundles, models, key, owner):
    clock = FakeClock()
    with Agent.from_config(make_config("bytes"), background=False, capture_clock=clock) as agent:
        agent.install(bundles.v1)
        agent.capture.apply(signed(key, policy(owner, max_per_hour=1000, max_bytes=3000, now=clock.now)))
        for x in models.x_test[:50]:
            agent.predict(x)
        assert 0 < agent.capture.bytes_held() <= 3000
        assert agent.capture.stats.captured == 50
        assert agent.capture.stats.dropped_oldest == 50 - len(agent.capture)
        seqs = [r.header.seq for r in held(agent, owner)]
        assert seqs == sorted(seqs) and seqs[-1] == max(seqs)  # the newest are kept


def test_retention_deletes_on_time_whether_sent_or_not(make_config, bundles, models, key, owner):
    clock = FakeClock()
    with Agent.from_config(make_config("retain"), background=False, capture_clock=clock) as agent:
        agent.install(bundles.v1)
        agent.capture.apply(signed(key, policy(owner, retain_s=86400, now=clock.now)))
        for x in models.x_test[:5]:
            agent.predict(x)
        agent.capture.sent(agent.capture.pending(10, 0)[0])  # one was sent, none acknowledged
        clock.advance(86400 - 1)
        assert agent.capture.sweep() == 0 and len(agent.capture) == 5
        clock.advance(1)
        assert agent.capture.sweep() == 5 and len(agent.capture) == 0
        assert list((agent.capture.records).iterdir()) == []


def test_policy_off_or_expired_stops_capture_at_once(make_config, bundles, models, key, owner):
    clock = FakeClock()
    with Agent.from_config(make_config("off"), background=False, capture_clock=clock) as agent:
        agent.install(bundles.v1)
        agent.capture.apply(signed(key, policy(owner, seq=1, max_per_hour=1000, now=clock.now, ttl=3600)))
        agent.predict(models.x_test[0])
        off = new_capture_policy("lab", seq=2, enabled=False, now=clock.now)
        agent.capture.apply(signed(key, off))
        for x in models.x_test[:20]:
            agent.predict(x)
        assert len(agent.capture) == 1
        agent.capture.apply(signed(key, policy(owner, seq=3, max_per_hour=1000, now=clock.now, ttl=3600)))
        agent.predict(models.x_test[0])
        clock.advance(3600)
        for x in models.x_test[:20]:
            agent.predict(x)
        assert len(agent.capture) == 2
        agent.capture.sweep()
        assert agent.events.peek()[-1]["kind"] == "capture_policy_expired"


def test_the_apps_filter_can_transform_or_veto(make_config, bundles, models, key, owner):
    seen: list[str] = []

    def blur_or_drop(x: np.ndarray, trigger: str) -> np.ndarray | None:
        seen.append(trigger)
        return None if len(seen) % 2 else np.zeros_like(x)

    path = make_config("filter")
    with Agent.from_config(path, background=False, capture_filter=blur_or_drop) as agent:
        agent.install(bundles.v1)
        agent.capture.apply(signed(key, policy(owner, max_per_hour=1000)))
        for x in models.x_test[:10]:
            agent.predict(x)
        assert agent.capture.stats.vetoed == 5 and len(agent.capture) == 5
        for record in held(agent, owner):
            assert not any(record.input_bytes or b"\1")  # what the filter returned: zeros
            assert record.bundle["name"] == "digits" and record.input_shape == (1, 8, 8, 1)


def test_low_confidence_trigger(make_config, bundles, models, key, owner):
    with Agent.from_config(make_config("triggers"), background=False) as agent:
        agent.install(bundles.v1)
        agent.capture.apply(
            signed(key, policy(owner, triggers=("low-confidence",), confidence_below=0.9, max_per_hour=10**5))
        )
        for x in models.x_test[:100]:
            agent.predict(x)
        low = held(agent, owner)
        assert low and all(r.trigger == "low-confidence" and (r.top_score or 1) < 0.9 for r in low)
        assert len(low) < 100  # confident answers are not kept


def _inputs(records: list) -> set[bytes]:
    return {r.input_bytes for r in records}


def test_drift_captures_the_inputs_of_the_flagged_window_within_the_filter_and_the_cap(
    make_config, bundles, models, key, owner
):
    vetoed: set[bytes] = set()

    def no_odd_frames(x: np.ndarray, trigger: str) -> np.ndarray | None:
        assert trigger == "drift"
        return None if x.tobytes() in vetoed else x

    config = make_config("drift", drift_window=100, drift_sample_rate=1.0, telemetry_interval=3600)
    with Agent.from_config(config, background=False, capture_filter=no_odd_frames) as agent:
        agent.install(bundles.v1)
        agent.capture.apply(signed(key, policy(owner, triggers=("drift",), max_per_hour=80)))
        normal, inverted = models.x_test, (1.0 - models.x_test).astype(np.float32)
        for x in normal[:100]:  # a window like the baseline: not flagged, nothing kept
            agent.predict(x)
        assert agent.drift().complete and not agent.drift().drifted and len(agent.capture) == 0
        window = inverted[:100]
        vetoed.update(x[None].tobytes() for x in window[1::2])  # the app drops every other frame
        for x in window[:99]:
            agent.predict(x)
        assert len(agent.capture) == 0  # held in memory until the window is judged
        agent.predict(window[99])  # fills the window: flagged, its inputs are captured
        assert agent.drift().drifted
        first = held(agent, owner)
        # Exactly the drifted window's inputs the filter let through: the 50 even frames (the
        # window of 100 fits the policy's 80 a hour only as a uniform sample of 80 of them).
        assert {r.trigger for r in first} == {"drift"}
        assert _inputs(first) <= {x[None].tobytes() for x in window[::2]}
        stats = agent.capture.stats
        assert len(first) == stats.captured and stats.captured + stats.vetoed == 80
        # The next drifted window: only what is left of the hour's 80 is taken, from that window.
        for x in inverted[100:200]:
            agent.predict(x)
        second = [r for r in held(agent, owner) if r.input_bytes not in _inputs(first)]
        assert len(second) == 80 - len(first) and stats.capped == 80 - len(second)
        assert _inputs(second) <= {x[None].tobytes() for x in inverted[100:200]}
        assert agent.capture.windows_captured == 2


def test_with_the_capture_thread_predict_never_writes_and_the_cap_still_holds(
    make_config, bundles, models, key, owner
):
    path = make_config("writer", telemetry_interval=3600)
    with Agent.from_config(path, background=False) as first:
        first.install(bundles.v1)
    with Agent.from_config(path, background=True) as agent:
        agent.capture.apply(signed(key, policy(owner, max_per_hour=15)))
        xs = models.x_test
        for i in range(3000):
            agent.predict(xs[i % len(xs)])
        agent.capture.flush()
        stats = agent.capture.stats
        assert stats.captured + stats.busy == 15 and stats.capped == 3000 - 15
        assert len(agent.capture) == stats.captured and len(held(agent, owner)) == stats.captured
