"""Registry fixtures: every registry test runs on SQLite and on PostgreSQL.

PostgreSQL is the server on this machine (127.0.0.1:5432, or $EDGEKIT_TEST_POSTGRES); each test
gets a throwaway database that is dropped afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from edgekit.fleet.embedded import EmbeddedBroker
from edgekit.fleet.registry import DeviceState, EventRow, Registry, TelemetryRow
from fleet_messages import POSTGRES
from helpers import free_port
from test_push import Fleet, edgekit


@pytest.fixture
def postgres_url() -> Iterator[str]:
    import psycopg

    name = f"edgekit_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES} ({exc}); start it or set EDGEKIT_TEST_POSTGRES"
        )
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return str(request.getfixturevalue("postgres_url"))


NOW = datetime.now(timezone.utc).replace(microsecond=0)


def populate(registry: Registry) -> None:
    registry.record_states(
        [
            DeviceState("cam-1", "shop", True, "serving", NOW, "a" * 64, "digits", "1.1.0"),
            DeviceState(
                "cam-2", "shop", False, "offline", NOW - timedelta(hours=1), "b" * 64, "digits", "1.0.0"
            ),
            DeviceState("door-1", "lobby", True, "serving", NOW, "a" * 64, "digits", "1.1.0"),
        ]
    )
    rows = []
    for seq in range(30):
        end = NOW - timedelta(minutes=30 - seq)
        rows.append(
            TelemetryRow(
                "cam-1",
                seq,
                end - timedelta(minutes=1),
                end,
                50,
                0,
                1.5,
                2.0 + seq / 10,
                4.0,
                drift_score=0.01 * seq,
                drifted=seq == 29,
                drift_threshold=0.25,
                bundle_version="1.1.0",
            )
        )
    # door-1 runs an agent that judges severity: its model is affected, by its own estimate.
    rows.append(
        TelemetryRow(
            "door-1",
            0,
            NOW - timedelta(minutes=2),
            NOW - timedelta(minutes=1),
            40,
            0,
            1.0,
            2.0,
            3.0,
            drift_score=0.8,
            drifted=True,
            bundle_version="1.1.0",
            drift_severity="model affected",
            accuracy_estimate=0.61,
            accuracy_low=0.52,
            accuracy_high=0.7,
        )
    )
    registry.add_telemetry(rows)
    registry.add_events([EventRow("cam-1", 1, NOW, "install", "installed digits@1.1.0")])


@pytest.fixture
def registry(registry_url: str) -> Iterator[Registry]:
    reg = Registry(registry_url)
    populate(reg)
    yield reg
    reg.close()


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """The embedded broker of `edgekit fleet up` (amqtt, a child process) on a free port,
    keeping retained messages in a data_dir."""
    broker = EmbeddedBroker(port=free_port(), data_dir=tmp_path / "broker")
    with broker:
        yield broker


@pytest.fixture
def agents(embedded: EmbeddedBroker, edgekit_home: Path, tmp_path: Path) -> Iterator[Fleet]:
    """`edgekit-agent run` processes of fleet "lab" on the embedded broker; a signing key."""
    assert edgekit("keys", "init").returncode == 0
    fleet = Fleet(tmp_path / "devices", embedded.url, edgekit_home)
    fleet.root.mkdir()
    yield fleet
    fleet.stop()


# -- ingest ------------------------------------------------------------------------------------


@pytest.fixture
def publisher(mosquitto) -> Iterator[Any]:
    """A connected MqttClient; `publisher.send(topic, doc_or_bytes, retain=False)` waits for the ack."""
    import json

    from edgekit.mqtt import MqttClient

    client = MqttClient(mosquitto.url, max_inflight=1000).connect()

    def send(topic: str, payload: object, retain: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        client.publish(topic, data, qos=1, retain=retain).wait(30)

    def send_many(items: list[tuple[str, object]]) -> None:
        deliveries = [
            client.publish(t, p if isinstance(p, bytes) else json.dumps(p).encode(), qos=1) for t, p in items
        ]
        for delivery in deliveries:
            delivery.wait(60)

    client.send = send  # type: ignore[attr-defined]
    client.send_many = send_many  # type: ignore[attr-defined]
    yield client
    client.close()


@pytest.fixture
def start_ingest(mosquitto) -> Iterator[Any]:
    """`start_ingest(registry, **options)`: a started in-process Ingest, stopped at the end."""
    from edgekit.fleet.ingest import Ingest, ingest_client

    started: list[Ingest] = []

    def start(
        registry: Registry, client_id: str | None = None, session_expiry: int = 0, **options: Any
    ) -> Ingest:
        client = ingest_client(mosquitto.url, client_id=client_id, session_expiry=session_expiry)
        ingest = Ingest(registry, client, **{"max_delay": 0.05, **options}).start(connect_timeout=10)
        started.append(ingest)
        return ingest

    yield start
    for ingest in started:
        ingest.stop()
