"""The dashboard's bench view: its JSON on SQLite and PostgreSQL, and the page in headless Chromium."""

from __future__ import annotations

import json

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
    from edgekit.reports import DeviceStateReport

    ingest = start_ingest(registry)
    # vm-1 is in fleet shop (its state first: ingest files bench reports under the device's fleet)
    publisher.send("edgekit/devices/vm-1/state", DeviceStateReport("vm-1", "shop", "serving").to_json())
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


def test_the_bench_api_refuses_a_bench_number_that_is_not_one_in_one_line(registry):
    client = TestClient(create_app(registry))
    for text in ("²", "-1", "x", "1e3"):  # "²".isdigit() is True, int("²") is not a number
        answer = client.get("/api/fleets/shop/bench", params={"bench": text})
        assert answer.status_code == 400, text
        assert "is not a benchmark number; give one like ?bench=12" in answer.json()["error"]
    stored(registry)
    assert client.get("/api/fleets/shop/bench?bench=7").json()["bench_seq"] == 7


def test_ingest_drops_bench_reports_filed_under_another_fleet_than_the_devices_own(
    registry, publisher, start_ingest
):
    # The registry has cam-1 in fleet shop and door-1 in fleet lobby (tests/fleet/conftest.py).
    ingest = start_ingest(registry)
    mine = report("cam-1", X86, "1.0.0", 1).to_dict()
    intruder = {**report("door-1", X86, "1.0.0", 1).to_dict()}  # door-1 of lobby claims fleet shop
    ghost = report("ghost-1", X86, "1.0.0", 1).to_dict()  # never heard from: no fleet known
    publisher.send("edgekit/devices/door-1/bench", intruder)
    publisher.send("edgekit/devices/ghost-1/bench", ghost)
    publisher.send("edgekit/devices/cam-1/bench", mine)
    assert ingest.wait_for(lambda s: s.rejected_total >= 2 and s.bench >= 1)
    assert ingest.snapshot().rejected == {("bench", "other_fleet"): 2}
    assert [row.device for row in registry.bench_results("shop")] == ["cam-1"]
    assert registry.bench_results("lobby") == []


def test_bench_wait_keeps_only_the_chosen_devices_reports_for_its_fleet(mosquitto, publisher):
    from edgekit.cli.bench import _Reports
    from edgekit.mqtt import MqttClient

    client = MqttClient(mosquitto.url).connect()
    try:
        heard = _Reports(client, "edgekit/devices/+/bench")
        elsewhere = {**report("door-1", X86, "1.0.0", 1).to_dict(), "fleet": "lobby"}  # same seq 7
        publisher.send("edgekit/devices/door-1/bench", elsewhere)
        publisher.send("edgekit/devices/pi-9/bench", report("pi-9", PI, "1.0.0", 1).to_dict())  # not asked
        publisher.send("edgekit/devices/vm-1/bench", report("vm-1", X86, "1.0.0", 1).to_dict())
        reports, missing = heard.wait("shop", 7, ["vm-1"], 1, timeout=30)
    finally:
        client.close()
    assert [(r.device, r.fleet) for r in reports] == [("vm-1", "shop")] and missing == []


@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_bench_results_prints_what_devices_sent_as_text_not_markup(registry, registry_url, edgekit_home):
    from test_push import edgekit

    odd = {**PI, "model": "[bold]Pi[/bold] [/x]"}
    reports = [
        report("pi-1", odd, "1.0.0", 1),
        report("pi-1", odd, "2.0.0", 2),
    ]
    failed = BenchReport(
        device="pi-1",
        fleet="shop",
        bench_seq=7,
        candidate={"bundle_id": "3" * 64, "name": "digits", "version": "3.0.0"},
        board={**odd, "runtime": "ai_edge_litert", "xnnpack": True},
        state="failed",
        error="device pi-1 could not measure digits@3.0.0: bad tensor [/x] [red]",
        seq=3,
    )
    registry.write_batch(bench=[_bench_row(r) for r in [*reports, failed]])
    shown = edgekit("bench", "results", "--fleet", "shop", "--registry", registry_url)
    assert shown.returncode == 0, shown.stderr
    assert "Traceback" not in shown.stderr
    assert "bad tensor [/x] [red]" in shown.stdout and "[bold]Pi[/bold] [/x]" in shown.stdout
    assert "90 MiB (+3.0 MiB)" in shown.stdout  # what the candidate added, beside the peak
    as_json = edgekit("bench", "results", "--fleet", "shop", "--json", "--registry", registry_url)
    (group,) = json.loads(as_json.stdout)["classes"]
    assert group["candidates"][0]["peak_rss_mb"] == 90 and group["candidates"][0]["added_rss_mb"] == 3
