"""The dashboard's bench view: its JSON on SQLite and PostgreSQL, and the page in headless Chromium."""

from __future__ import annotations

import pytest
from edgekit.bench import BenchReport
from edgekit.fleet.dashboard import create_app
from edgekit.fleet.ingest import _bench_row
from starlette.testclient import TestClient
from test_dashboard import chromium_dom, served

__all__ = ["served"]

PI = {"model": "Raspberry Pi 4 Model B Rev 1.4", "cpu": "Cortex-A72", "machine": "aarch64", "cores": 4}
X86 = {"model": "Standard PC (Q35 + ICH9, 2009)", "cpu": "AMD EPYC 7B13", "machine": "x86_64", "cores": 2}


def report(device: str, board: dict, version: str, seq: int, agreed: int = 4, **extra: object) -> BenchReport:
    return BenchReport(
        device=device,
        fleet="shop",
        bench_seq=7,
        candidate={"bundle_id": version[0] * 64, "name": "digits", "version": version},
        board={**board, "runtime": "ai_edge_litert", "xnnpack": True},
        state="done",
        load_ms=12.5,
        peak_rss_bytes=90 * 2**20,
        added_rss_bytes=3 * 2**20,
        by_threads=[
            {
                "threads": 1,
                "runs": 50,
                "p50_ms": 2.0,
                "p95_ms": 2.5,
                "p99_ms": 3.0,
                "mean_ms": 2.1,
                "per_second": 476.0,
            },
            {
                "threads": 2,
                "runs": 50,
                "p50_ms": 1.2,
                "p95_ms": 1.6,
                "p99_ms": 2.0,
                "mean_ms": 1.3,
                "per_second": 769.0,
            },
        ],
        correctness={
            "samples": 4,
            "agreed": agreed,
            "max_abs_error": 0.0 if agreed == 4 else 0.9,
            "tolerance": 1e-4,
        },
        seq=seq,
        **extra,
    )


def stored(registry) -> None:
    reports = [
        report("pi-1", PI, "1.0.0", 1, temperature_c=51.0, throttled="0x0"),
        report("pi-1", PI, "2.0.0", 2, agreed=0, temperature_c=53.0, throttled="0x50005"),
        report("vm-1", X86, "1.0.0", 1),
        report("vm-1", X86, "2.0.0", 2),
    ]
    registry.write_batch(bench=[_bench_row(r) for r in reports])
    # a redelivered report is stored once
    registry.write_batch(bench=[_bench_row(reports[0])])


def test_the_bench_view_groups_candidates_by_board_class(registry):
    client = TestClient(create_app(registry))
    assert client.get("/api/fleets/shop/bench").json() == {"fleet": "shop", "bench_seq": None, "classes": []}
    stored(registry)
    doc = client.get("/api/fleets/shop/bench").json()
    assert doc["bench_seq"] == 7
    pi, vm = doc["classes"]
    assert pi["board_class"] == "Raspberry Pi 4 Model B Rev 1.4 · Cortex-A72 · ai_edge_litert · XNNPACK"
    assert vm["devices"] == ["vm-1"] and "AMD EPYC 7B13" in vm["board_class"]
    fp32, int8 = pi["candidates"]
    assert fp32["correct"] is True and fp32["temperature_c"] == 51.0 and fp32["throttled_devices"] == []
    assert int8["correct"] is False and int8["disagreeing_devices"] == ["pi-1"]
    assert int8["throttled_devices"] == ["pi-1"]
    assert [t["per_second"] for t in int8["threads"]] == [476.0, 769.0]
    assert all(c["correct"] for c in vm["candidates"])


@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_the_bench_page_renders_in_headless_chromium(served, registry):
    empty = chromium_dom(served + "/fleets/shop/bench")
    assert "No device of fleet shop has reported a benchmark yet" in empty
    stored(registry)
    page = chromium_dom(served + "/fleets/shop/bench")
    assert (
        "benchmark 7: Raspberry Pi 4 Model B Rev 1.4 · Cortex-A72 · ai_edge_litert · XNNPACK (pi-1)" in page
    )
    assert 'data-candidate="digits@2.0.0"' in page and "NO (0/4)" in page and "yes (4/4)" in page
    assert "1t: 476/s  2t: 769/s" in page and "2.00 ms" in page and "90 MiB" in page
    assert "51 °C" in page and "not reported" in page  # the VM has no thermal zone
    assert "digits@2.0.0 gave other answers than on the workstation on pi-1" in page
    assert "pi-1 reported CPU throttling while measuring digits@2.0.0" in page
    fleet_page = chromium_dom(served + "/fleets/shop")  # the fleet's page links to it
    assert 'id="bench-link" href="/fleets/shop/bench"' in fleet_page


def test_ingest_stores_bench_reports_once_and_counts_and_drops_malformed_ones(
    registry, publisher, start_ingest
):
    ingest = start_ingest(registry)
    good = report("vm-1", X86, "1.0.0", 1).to_dict()
    bad_field = {**good, "seq": 2, "by_threads": [{"threads": 0}]}
    other_device = {**good, "seq": 3, "device": "vm-2"}
    publisher.send("edgekit/devices/vm-1/bench", good)
    publisher.send("edgekit/devices/vm-1/bench", good)  # a redelivery: stored once
    publisher.send("edgekit/devices/vm-1/bench", b"{not json")
    publisher.send("edgekit/devices/vm-1/bench", bad_field)
    publisher.send("edgekit/devices/vm-1/bench", other_device)
    assert ingest.wait_for(lambda s: s.rejected_total >= 3 and s.bench >= 1)
    assert ingest.snapshot().rejected == {
        ("bench", "not_json"): 1,
        ("bench", "bad_field"): 1,
        ("bench", "device_mismatch"): 1,
    }
    (row,) = registry.bench_results("shop")
    assert (row.device, row.candidate_label, row.hc_agreed) == ("vm-1", "digits@1.0.0", 4)
