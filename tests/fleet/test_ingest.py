"""Ingest: device state, telemetry and events move from a real Mosquitto into the registry."""

from __future__ import annotations

import psycopg
import pytest
from edgekit.fleet.registry import Registry
from edgekit.reports import MAX_REPORT_SIZE
from edgekit.topics import Topics
from fleet_messages import POSTGRES, event_doc, state_doc, telemetry_doc

T = Topics()


def tele(device: str) -> str:
    return T.device_telemetry(device)


def test_state_telemetry_and_events_land_in_the_registry(registry_url, start_ingest, publisher):
    registry = Registry(registry_url)
    ingest = start_ingest(registry)
    publisher.send(T.device_state("cam-1"), state_doc("cam-1"), retain=True)
    publisher.send_many([(tele("cam-1"), telemetry_doc("cam-1", seq)) for seq in (1, 2, 3)])
    publisher.send(T.device_events("cam-1"), event_doc("cam-1", 1))
    # A device heard from by telemetry only is registered with the fleet its records name. Its
    # agent judges drift severity (cam-1's, like an older agent, sends none).
    accuracy = {"estimate": 0.6, "low": 0.5, "high": 0.7, "reference": 0.85, "method": "confidence"}
    scores = {"x": {"psi": 0.4, "ks": 0.1, "psi_limit": 0.3}, "y": {"psi": 0.1, "ks": 0.0, "psi_limit": 0.2}}
    drift = {"drifted": True, "scores": scores, "severity": "model affected", "accuracy": accuracy}
    drift["psi_threshold"] = 0.2
    board = {"memory_used_percent": 97.5, "disk_used_percent": 42.0}
    publisher.send(tele("cam-2"), telemetry_doc("cam-2", 7, fleet="yard", drift=drift, **board))
    assert ingest.wait_for(lambda s: s.telemetry == 4 and s.events == 1 and s.states == 1)

    devices = {d.id: d for d in registry.devices()}
    cam = devices["cam-1"]
    assert (cam.fleet, cam.online, cam.status, cam.bundle_version) == ("lab", True, "serving", "1.0.0")
    assert cam.last_seq == 3 and cam.latency_p95_ms == 5.0 and cam.drift_score == pytest.approx(0.1)
    assert cam.first_seen is not None and cam.last_seen is not None
    assert devices["cam-2"].fleet == "yard"
    assert (devices["cam-2"].drift_severity, devices["cam-2"].accuracy_estimate) == ("model affected", 0.6)
    assert (cam.drift_severity, cam.accuracy_estimate) == (None, None)
    assert registry.telemetry("cam-2")[0].accuracy_low == 0.5
    (board_row,) = registry.telemetry("cam-2")
    assert (board_row.memory_used_percent, board_row.disk_used_percent) == (97.5, 42.0)
    # The worst feature's limit (its threshold or noise floor), drawn on the drift chart; an
    # older agent's record has none.
    assert board_row.drift_threshold == 0.3 and registry.telemetry("cam-1")[0].drift_threshold is None
    rows = registry.telemetry("cam-1")
    assert [r.seq for r in rows] == [1, 2, 3] and rows[0].memory_mb == 50.0
    assert [e.message for e in registry.events(device="cam-1")] == ["installed digits@1.0.0 (1)"]

    # The MQTT will says "offline" with the time the device connected: it keeps its bundle and
    # its last_seen never goes back.
    seen = registry.devices()[0].last_seen
    will = state_doc("cam-1", "offline", time=1.0, bundle_id=None, bundle_name=None, bundle_version=None)
    publisher.send(T.device_state("cam-1"), will, retain=True)
    assert ingest.wait_for(lambda s: s.states == 2)
    cam = next(d for d in registry.devices() if d.id == "cam-1")
    assert (cam.online, cam.bundle_version, cam.last_seen) == (False, "1.0.0", seen)
    registry.close()


def test_a_new_ingest_gets_every_devices_retained_state(registry_url, start_ingest, publisher):
    for device in ("cam-1", "cam-2"):
        publisher.send(T.device_state(device), state_doc(device), retain=True)
    registry = Registry(registry_url)
    ingest = start_ingest(registry)
    assert ingest.wait_for(lambda s: s.states == 2)
    assert [d.id for d in registry.devices()] == ["cam-1", "cam-2"]
    registry.close()


def bad_messages(kind: str, good: dict) -> list[tuple[str, bytes | dict]]:
    """Every way a message of ``kind`` can be wrong, with the reason ingest must count."""
    cases: list[tuple[str, bytes | dict]] = [
        ("not_json", b"{not json"),
        ("not_json", b"\xff\xfe binary"),
        # Strict JSON: no NaN or Infinity, no number that overflows a double, no lone surrogate.
        ("not_json", b'{"schema": "x", "count": NaN}'),
        ("not_json", b'{"schema": "x", "count": -Infinity}'),
        ("not_json", b'{"schema": "x", "count": 1e400}'),
        ("not_json", b'{"schema": "x", "device": "\\ud800"}'),
        ("wrong_schema", {**good, "schema": "edgekit.other"}),
        ("wrong_schema", b"[1, 2, 3]"),
        ("wrong_version", {**good, "schema_version": 2}),
        ("oversized", b" " * (MAX_REPORT_SIZE + 1)),
        ("device_mismatch", {**good, "device": "cam-9"}),
    ]
    if kind == "telemetry":
        cases += [
            ("bad_field", {**good, "seq": "7"}),
            ("bad_field", {**good, "count": -1}),
            ("bad_field", {**good, "count": 2**40}),
            ("bad_field", {**good, "latency_ms": {"p95": "fast"}}),
            ("bad_field", {**good, "window_end": 1e300}),
            ("bad_field", {**good, "drift": {"drifted": "yes"}}),
            ("bad_field", {**good, "drift": {**good["drift"], "severity": "panic"}}),
            ("bad_field", {**good, "disk_used_percent": 140}),
            (
                "bad_field",
                {**good, "drift": {**good["drift"], "severity": "ok", "accuracy": {"estimate": 2}}},
            ),
            ("bad_field", {**good, "bundle": {"version": "x" * 65}}),
            ("bad_field", {**good, "fleet": "no/slash"}),
        ]
    elif kind == "events":
        cases += [
            ("bad_field", {**good, "seq": True}),
            ("bad_field", {**good, "message": "nul \u0000 byte"}),  # PostgreSQL cannot store it
            ("bad_field", {**good, "kind": "k" * 33}),
            ("bad_field", {**good, "time": "yesterday"}),
        ]
    else:
        cases += [
            ("bad_field", {**good, "status": "dancing"}),
            ("bad_field", {**good, "progress": 2}),
            ("bad_field", {**good, "bundle_version": 1}),
            ("bad_field", {**good, "fleet": None}),
        ]
    return cases


def test_malformed_messages_on_every_topic_are_counted_and_dropped(registry_url, start_ingest, publisher):
    registry = Registry(registry_url)
    ingest = start_ingest(registry)
    expected: dict[tuple[str, str], int] = {}
    messages = []
    for kind, topic, good in (
        ("telemetry", tele("cam-1"), telemetry_doc("cam-1", 1)),
        ("events", T.device_events("cam-1"), event_doc("cam-1", 1)),
        ("state", T.device_state("cam-1"), state_doc("cam-1")),
    ):
        for reason, payload in bad_messages(kind, good):
            messages.append((topic, payload))
            expected[(kind, reason)] = expected.get((kind, reason), 0) + 1
    # A topic that matches the subscription but names no valid device.
    messages.append(("edgekit/devices/-bad-id/telemetry", telemetry_doc("cam-1", 1)))
    expected[("unknown", "unknown_topic")] = 1
    # Good messages among the bad ones still land.
    messages += [
        (tele("cam-1"), telemetry_doc("cam-1", 1)),
        (T.device_events("cam-1"), event_doc("cam-1", 1)),
        (T.device_state("cam-1"), state_doc("cam-1")),
    ]
    publisher.send_many(messages)
    total = sum(expected.values())
    assert ingest.wait_for(lambda s: s.rejected_total == total and s.telemetry == 1 and s.events == 1)
    assert ingest.wait_for(lambda s: s.states == 1)
    assert ingest.snapshot().rejected == expected
    assert registry.telemetry_count() == 1 and len(registry.events()) == 1
    assert [(d.id, d.status) for d in registry.devices()] == [("cam-1", "serving")]
    assert ingest.client.handler_errors == 0
    registry.close()


def test_a_replayed_or_redelivered_seq_is_stored_and_counted_once(registry_url, start_ingest, publisher):
    registry = Registry(registry_url)
    ingest = start_ingest(registry)
    batch = [(tele("cam-1"), telemetry_doc("cam-1", seq)) for seq in range(1, 11)]
    events = [(T.device_events("cam-1"), event_doc("cam-1", seq)) for seq in (1, 2)]
    publisher.send_many(batch + events + batch[:3])  # duplicates within one batch
    assert ingest.wait_for(lambda s: s.telemetry + s.telemetry_duplicates == 13 and s.events == 2)
    publisher.send_many(batch + events)  # the device's outbox replays after an outage
    assert ingest.wait_for(lambda s: s.telemetry_duplicates == 13 and s.event_duplicates == 2)
    stats = ingest.snapshot()
    assert (stats.telemetry, stats.events) == (10, 2)
    assert registry.telemetry_count() == 10 and len(registry.events()) == 2
    registry.close()


def test_two_workers_split_a_shared_subscription_and_ingest_each_message_once(
    registry_url, start_ingest, publisher
):
    registry = Registry(registry_url)
    first = start_ingest(registry, shared_group="edgekit-test")
    second = start_ingest(registry, shared_group="edgekit-test", owns_state=False)
    assert first.filters()[0] == T.all_devices_filter("state")  # state is never shared (retained)
    assert all(f.startswith("$share/edgekit-test/") for f in second.filters())
    messages = [(tele(f"cam-{i % 20}"), telemetry_doc(f"cam-{i % 20}", i // 20 + 1)) for i in range(400)]
    publisher.send_many(messages)
    assert first.wait_for(lambda _: first.snapshot().telemetry + second.snapshot().telemetry == 400)
    a, b = first.snapshot(), second.snapshot()
    assert a.telemetry > 0 and b.telemetry > 0  # both worked
    assert a.received + b.received == 400 and a.telemetry_duplicates + b.telemetry_duplicates == 0
    assert registry.telemetry_count() == 400
    registry.close()


@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_ingest_survives_a_broker_restart(registry_url, start_ingest, publisher, mosquitto):
    registry = Registry(registry_url)
    ingest = start_ingest(registry)
    publisher.send_many([(tele("cam-1"), telemetry_doc("cam-1", seq)) for seq in range(1, 6)])
    assert ingest.wait_for(lambda s: s.telemetry == 5)
    mosquitto.stop()
    mosquitto.start()
    assert ingest.client.wait_connected(30) and publisher.wait_connected(30)
    publisher.send_many([(tele("cam-1"), telemetry_doc("cam-1", seq)) for seq in range(6, 11)])
    assert ingest.wait_for(lambda s: s.telemetry == 10)
    assert registry.telemetry_count() == 10
    registry.close()


# -- the database going away (PostgreSQL: refuse connections, then allow them again) ---------------


def set_connections(url: str, allowed: bool) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )


def test_a_database_outage_keeps_the_batch_and_loses_nothing(postgres_url, start_ingest, publisher):
    registry = Registry(postgres_url)
    ingest = start_ingest(registry, retry_min=0.05, retry_max=0.5)
    set_connections(postgres_url, False)
    try:
        publisher.send_many([(tele("cam-1"), telemetry_doc("cam-1", seq)) for seq in range(1, 51)])
        assert ingest.wait_for(lambda s: s.db_errors >= 2, timeout=30)
    finally:
        set_connections(postgres_url, True)
    assert ingest.wait_for(lambda s: s.telemetry == 50)
    assert ingest.snapshot().telemetry_duplicates == 0
    assert registry.telemetry_count() == 50
    registry.close()


def test_unacknowledged_messages_come_back_to_a_persistent_session(postgres_url, start_ingest, publisher):
    """Acks follow the commit: what a worker received but never committed is re-sent by the
    broker to the next worker with the same session, and stored once."""
    registry = Registry(postgres_url)
    crashed = start_ingest(registry, client_id="ingest-w0", session_expiry=60, retry_min=0.05, retry_max=0.1)
    set_connections(postgres_url, False)
    try:
        publisher.send_many([(tele("cam-1"), telemetry_doc("cam-1", seq)) for seq in range(1, 21)])
        assert crashed.wait_for(lambda s: s.db_errors >= 1 and s.received == 20, timeout=30)
        crashed.stop()  # gives up on the batch: the database is still away
        assert crashed.snapshot().telemetry == 0
    finally:
        set_connections(postgres_url, True)
    again = start_ingest(registry, client_id="ingest-w0", session_expiry=60)
    assert again.wait_for(lambda s: s.telemetry == 20)
    assert registry.telemetry_count() == 20
    registry.close()


def test_bad_ingest_settings_are_config_errors(mosquitto):
    from edgekit.errors import ConfigError
    from edgekit.fleet.ingest import Ingest, ingest_client

    with pytest.raises(ConfigError, match="needs a fixed client_id"):
        ingest_client(mosquitto.url, session_expiry=10)
    registry = None
    with pytest.raises(ConfigError, match="need MQTT 5"):
        Ingest(registry, ingest_client(mosquitto.url, protocol="3.1.1"), shared_group="g")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="invalid shared subscription group"):
        Ingest(registry, ingest_client(mosquitto.url), shared_group="a/b")  # type: ignore[arg-type]
