"""Telemetry records and the bounded on-disk outbox: seq only grows, drops are counted, restarts survive."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from edgekit.agent import Agent, Outbox, TelemetryRecord
from edgekit.agent.telemetry import LATENCY_CAP, LatencyRecorder


def test_outbox_drops_the_oldest_and_counts_them_in_the_next_record(tmp_path):
    box = Outbox(tmp_path / "q", max_records=3)
    for i in range(3):
        assert box.put({"i": i})["dropped"] == 0
    fourth = box.put({"i": 3})
    assert (fourth["seq"], fourth["dropped"], fourth["dropped_total"]) == (4, 1, 1)
    fifth = box.put({"i": 4})
    assert (fifth["dropped"], fifth["dropped_total"]) == (1, 2)
    assert [r["i"] for r in box.peek()] == [2, 3, 4]
    assert box.ack(4) == 2
    sixth = box.put({"i": 5})
    assert (sixth["dropped"], sixth["dropped_total"]) == (0, 2)


def test_outbox_survives_a_restart_in_order_and_seq_keeps_growing(tmp_path):
    box = Outbox(tmp_path / "q", max_records=2)
    for i in range(5):
        box.put({"i": i})
    (tmp_path / "q" / ".0000000000000099.json.abc.tmp").write_bytes(b"{half")  # a write cut by a crash
    again = Outbox(tmp_path / "q", max_records=2)
    assert [r["seq"] for r in again.peek()] == [4, 5]
    nxt = again.put({"i": 5})
    assert nxt["seq"] == 6 and nxt["dropped"] == 1 and nxt["dropped_total"] == 4
    assert not list((tmp_path / "q").glob(".*.tmp"))
    # Even if the meta file is lost, seq never goes back below the newest record.
    (tmp_path / "q" / "meta.json").unlink()
    assert Outbox(tmp_path / "q", max_records=2).put({})["seq"] == 7


def test_outbox_is_thread_safe(tmp_path):
    box = Outbox(tmp_path / "q", max_records=1000)
    threads = [threading.Thread(target=lambda: [box.put({}) for _ in range(25)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = [r["seq"] for r in box.peek()]
    assert seqs == list(range(1, 101))


def test_agent_windows_become_records_with_growing_seq_across_restarts(make_config, bundles, models):
    path = make_config("tele", telemetry_queue_max=3)
    with Agent.from_config(path, background=False) as agent:
        agent.install(bundles.v1)
        for x in models.x_test[:50]:
            agent.predict(x)
        record = agent.flush_telemetry()
    assert record is not None
    assert (record.count, record.errors, record.device, record.fleet) == (50, 0, "pi-01", "lab")
    assert record.bundle is not None and record.bundle["version"] == "1.0.0"
    p50, p95, p99 = record.latency_ms["p50"], record.latency_ms["p95"], record.latency_ms["p99"]
    assert p50 is not None and p95 is not None and p99 is not None and 0 < p50 <= p95 <= p99
    assert record.throughput > 0 and record.window_end >= record.window_start
    assert record.memory_rss_bytes is not None and record.memory_rss_bytes > 10_000_000
    assert record.cpu_percent is not None
    # The board's RAM and the state directory's disk in use, as Linux says (/proc/meminfo, statvfs).
    assert record.memory_used_percent is not None and 0 < record.memory_used_percent < 100
    assert record.disk_used_percent is not None and 0 < record.disk_used_percent <= 100
    first_seq = record.seq
    with Agent.from_config(path, background=False) as agent:
        for _ in range(4):
            agent.predict(models.x_test[0])
            last = agent.flush_telemetry()
        queued = agent.telemetry.peek()
    assert last is not None and last.seq > first_seq + 3
    assert len(queued) == 3 and queued[-1]["seq"] == last.seq
    assert sum(r["dropped"] for r in queued) >= 1 and queued[-1]["dropped_total"] >= 2
    assert TelemetryRecord.from_dict(queued[-1]) == last


def test_background_thread_closes_windows(make_config, bundles, models):
    path = make_config("bg", telemetry_interval=0.05)
    with Agent.from_config(path, background=False) as setup:
        setup.install(bundles.v1)
    agent = Agent.from_config(path)
    try:
        agent.predict(models.x_test[0])
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                if any(r["count"] >= 1 for r in agent.telemetry.peek()):
                    done.set()
                    return
                done.wait(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        assert done.wait(30)
        watcher.join()
    finally:
        agent.close()


@pytest.mark.parametrize("n", [10, LATENCY_CAP * 2 + 7])
def test_latency_percentiles_are_exact_then_within_two_percent(n):
    rng = np.random.default_rng(0)
    values = rng.lognormal(mean=-7, sigma=0.5, size=n)
    recorder = LatencyRecorder()
    for v in values:
        recorder.samples.append(float(v))
        if len(recorder.samples) >= LATENCY_CAP:
            recorder.fold()
    got = recorder.percentiles_ms()
    assert recorder.count == n
    for name, q in (("p50", 50), ("p95", 95), ("p99", 99)):
        want = float(np.percentile(values, q)) * 1000
        assert got[name] == pytest.approx(want, rel=0.001 if n < LATENCY_CAP else 0.03)
