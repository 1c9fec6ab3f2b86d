"""The registry on SQLite and PostgreSQL: schema, idempotent writes, retention, reads."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from edgekit import ConfigError
from edgekit.fleet.registry import DeviceState, EventRow, Registry, ShadowRow, TelemetryRow
from edgekit.fleet.registry.models import Base
from edgekit.fleet.registry.store import _bind_processor
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Boolean, DateTime, Float, inspect
from sqlalchemy.dialects import sqlite

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


def window(device: str, seq: int, minutes: int = 1, **extra) -> TelemetryRow:
    start = T0 + timedelta(minutes=seq * minutes)
    return TelemetryRow(
        device=device,
        seq=seq,
        window_start=start,
        window_end=start + timedelta(minutes=minutes),
        count=100 + seq,
        errors=seq % 3,
        latency_p50_ms=2.0,
        latency_p95_ms=3.0 + seq,
        latency_p99_ms=9.0,
        **extra,
    )


def test_migrations_create_exactly_the_model_schema(registry_url):
    registry = Registry(registry_url)
    inspector = inspect(registry.engine)
    for table in Base.metadata.sorted_tables:
        columns = {c["name"] for c in inspector.get_columns(table.name)}
        assert columns == {c.name for c in table.columns}, table.name
    registry.migrate()  # idempotent
    registry.close()


def test_state_messages_create_and_update_devices(registry_url):
    registry = Registry(registry_url)
    registry.record_states(
        [
            DeviceState("cam-1", "shop", True, "serving", T0, "a" * 64, "digits", "1.0.0"),
            DeviceState("cam-2", "shop", True, "installing", T0),
        ]
    )
    registry.record_states([DeviceState("cam-1", "shop", False, "offline", T0 + timedelta(minutes=5))])
    devices = {d.id: d for d in registry.devices()}
    assert set(devices) == {"cam-1", "cam-2"}
    assert devices["cam-1"].online is False and devices["cam-1"].status == "offline"
    # Going offline (the will) keeps what the device last ran.
    assert devices["cam-1"].bundle_version == "1.0.0"
    assert registry.devices(fleet="other") == []
    registry.close()


def test_redelivered_telemetry_is_never_counted_twice(registry_url):
    registry = Registry(registry_url)
    registry.record_states([DeviceState("cam-1", "shop", True, "serving", T0)])
    first = registry.add_telemetry([window("cam-1", s) for s in range(10)])
    assert (first.inserted, first.duplicates) == (10, 0)
    again = registry.add_telemetry([window("cam-1", s) for s in range(5, 15)])
    assert (again.inserted, again.duplicates) == (5, 5)
    assert registry.telemetry_count("cam-1") == 15
    rows = registry.telemetry("cam-1")
    assert [r.seq for r in rows] == list(range(15))
    (device,) = registry.devices()
    assert device.last_seq == 14 and device.latency_p95_ms == 17.0
    registry.close()


def test_an_idle_window_keeps_the_last_measured_latency(registry_url):
    registry = Registry(registry_url)
    registry.record_states([DeviceState("cam-1", "shop", True, "serving", T0)])
    registry.add_telemetry([window("cam-1", 0)])
    idle = window("cam-1", 1)._replace(count=0, latency_p50_ms=None, latency_p95_ms=None)
    registry.add_telemetry([idle])
    (device,) = registry.devices()
    assert device.last_seq == 1 and device.latency_p95_ms == 3.0
    registry.close()


def test_telemetry_of_an_unknown_device_needs_its_fleet(registry_url):
    registry = Registry(registry_url)
    registry.add_telemetry([window("cam-9", 0)])
    assert registry.devices() == []  # kept, but no device row until a state or a fleet is known
    assert registry.telemetry_count("cam-9") == 1
    registry.add_telemetry([window("cam-9", 1, drifted=True, drift_score=0.4)], fleets={"cam-9": "shop"})
    (device,) = registry.devices()
    assert device.fleet == "shop" and device.drifted and device.drift_score == 0.4
    registry.close()


def test_events_dedupe_and_list_newest_first(registry_url):
    registry = Registry(registry_url)
    rows = [EventRow("cam-1", s, T0 + timedelta(seconds=s), "install", f"installed {s}") for s in range(5)]
    assert registry.add_events(rows).inserted == 5
    assert registry.add_events(rows[3:]).duplicates == 2
    assert [e.seq for e in registry.events(device="cam-1", limit=3)] == [4, 3, 2]
    registry.close()


def test_retention_downsamples_old_telemetry(registry_url):
    registry = Registry(registry_url)
    registry.add_telemetry([window("cam-1", s) for s in range(120)])  # two hours of 1-minute windows
    now = T0 + timedelta(minutes=121)
    folded = registry.apply_retention(now, keep_raw=timedelta(minutes=30), bucket=timedelta(hours=1))
    assert folded == 90
    rows = registry.telemetry("cam-1")
    coarse = [r for r in rows if r.resolution_s == 3600]
    raw = [r for r in rows if r.resolution_s == 0]
    assert len(raw) == 30 and len(coarse) == 2
    assert sum(r.count for r in rows) == sum(100 + s for s in range(120))  # nothing lost
    assert max(r.latency_p95_ms or 0 for r in coarse) == 3.0 + 89
    # A late duplicate of a folded window is still recognised as seen.
    assert registry.add_telemetry([window("cam-1", 59)]).duplicates in (0, 1)
    registry.close()


def test_bad_registry_urls_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="only SQLite and PostgreSQL"):
        Registry("mysql://nobody@localhost/x")
    with pytest.raises(ConfigError, match="cannot open the registry"):
        Registry(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")


@settings(max_examples=300, deadline=None)
@given(
    value=st.one_of(
        st.datetimes(min_value=datetime(1000, 1, 1), timezones=st.just(timezone.utc)),
        st.datetimes(
            min_value=datetime(1000, 1, 2), timezones=st.sampled_from([None, timezone(timedelta(hours=-5))])
        ),
        st.booleans(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(-(2**40), 2**40),
    )
)
def test_sqlite_bulk_writes_store_what_sqlalchemy_would(value) -> None:
    """Ingest's SQLite fast path converts values itself (store._bind_processor): the stored
    value must be exactly SQLAlchemy's own, or reads through the ORM would differ."""
    dialect = sqlite.dialect()
    column = (
        DateTime(timezone=True)
        if isinstance(value, datetime)
        else Boolean()
        if isinstance(value, bool)
        else Float()
    )
    if isinstance(value, int) and not isinstance(value, bool):
        column = Float()
    ours = _bind_processor(column, dialect)
    theirs = column.dialect_impl(dialect).bind_processor(dialect)
    expected = theirs(value) if theirs else value
    assert (ours(value) if ours else value) == expected


def shadow_row(device: str, seq: int, candidate: str = "c" * 64, **extra) -> ShadowRow:
    fields = {
        "device": device,
        "seq": seq,
        "window_end": T0 + timedelta(minutes=seq + 1),
        "candidate_id": candidate,
        "candidate_label": "digits@2.0.0",
        "serving_version": "1.0.0",
        "state": "running",
        "sample_rate": 0.1,
        "compared": 100,
        "dropped": 2,
        "classified": 100,
        "agreed": 97,
        "abs_error_mean": 0.01,
        "abs_error_max": 0.2,
        "serving_p50_ms": 1.0,
        "serving_p95_ms": 2.0,
        "candidate_p50_ms": 1.5,
        "candidate_p95_ms": 3.0,
        **extra,
    }
    return ShadowRow(**fields)


def test_shadow_windows_are_stored_once_and_read_by_fleet_and_candidate(registry_url):
    registry = Registry(registry_url)
    registry.record_states(
        [
            DeviceState("cam-1", "shop", True, "serving", T0),
            DeviceState("door-1", "lobby", True, "serving", T0),
        ]
    )
    telemetry = [window("cam-1", s) for s in range(4)] + [window("door-1", 0)]
    shadows = [shadow_row("cam-1", s, "a" * 64 if s < 2 else "b" * 64) for s in range(4)]
    shadows.append(shadow_row("door-1", 0, "b" * 64))
    registry.write_batch(telemetry=telemetry, shadows=shadows)
    registry.write_batch(telemetry=telemetry[:2], shadows=shadows[:2])  # redelivered: ignored
    newest = registry.shadow_windows("shop")
    assert [(w.device, w.seq) for w in newest] == [("cam-1", 2), ("cam-1", 3)]  # the newest candidate
    assert [w.seq for w in registry.shadow_windows("shop", "a" * 64)] == [0, 1]
    assert registry.shadow_windows("nowhere") == []
    registry.delete_device("cam-1")
    assert registry.shadow_windows("shop") == []
    registry.close()


def test_shadow_peak_memory_is_stored_and_only_the_devices_asked_are_summed(registry_url):
    from edgekit.fleet.control import ControlPlane

    registry = Registry(registry_url)
    registry.record_states([DeviceState(d, "shop", True, "serving", T0) for d in ("cam-1", "cam-2", "cam-3")])
    registry.write_batch(
        telemetry=[window("cam-1", 0), window("cam-1", 1), window("cam-2", 0)],
        shadows=[
            shadow_row("cam-1", 0, peak_memory_bytes=300 * 2**20),
            shadow_row("cam-1", 1, peak_memory_bytes=310 * 2**20),
            shadow_row("cam-2", 0),  # an agent from before the figure
        ],
    )
    assert [w.peak_memory_bytes for w in registry.shadow_windows("shop")] == [300 * 2**20, None, 310 * 2**20]
    control = ControlPlane(registry)
    everyone = control.shadow_summary("shop")  # not asked through this control plane: every device
    assert [d["device"] for d in everyone["devices"]] == ["cam-1", "cam-2"]
    assert everyone["devices"][0]["peak_memory_bytes"] == 310 * 2**20
    assert everyone["devices"][1]["peak_memory_bytes"] is None
    assert everyone["total"]["peak_memory_bytes"] == 310 * 2**20
    control.save_shadow_asked("shop", "c" * 64, ["cam-1", "cam-3"])
    asked = control.shadow_summary("shop")
    assert [(d["device"], d["state"]) for d in asked["devices"]] == [
        ("cam-1", "running"),
        ("cam-3", "not reported"),
    ]
    assert asked["total"]["compared"] == 200  # cam-2 was not asked: not counted
    from edgekit.fleet.shadow import judge

    assert judge(asked, 0.9, 2.0) == ["cam-3: it was asked to try the candidate and has not reported yet"]
    control.save_shadow_asked("shop", "d" * 64, None)  # another candidate: every device again
    assert len(control.shadow_summary("shop")["devices"]) == 2
    registry.close()
