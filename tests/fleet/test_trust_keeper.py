"""`fleet serve` keeps each fleet's online TUF roles fresh (edgekit.fleet.trustrepo.keep_fresh):
re-signed before they expire and published retained, so devices never see a freeze while the
service runs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from edgekit.fleet.service import FleetService, ServiceConfig
from edgekit.fleet.trustrepo import Expiry, TrustRepository, keep_fresh, load_repository
from edgekit.keys import init_key, load_signing_key
from edgekit.mqtt import MqttClient
from edgekit.roles import DeviceTrust
from edgekit.topics import Topics
from trust_sim import Retained


def make_fleet(home: Path, *, now: float) -> TrustRepository:
    """Fleet ``lab`` under ``home/trust``, its online key ``online`` in ``home/keys``."""
    for name in ("root", "targets", "online"):
        init_key(home, name)
    keys = {name: load_signing_key(home, name) for name in ("root", "targets", "online")}
    repo = TrustRepository.create(
        "lab",
        root_keys=[keys["root"].public],
        threshold=1,
        targets_keys=[keys["targets"].public],
        online_keys=[keys["online"].public],
        now=now,
    )
    repo.online_key = "online"
    repo.sign("root", keys["root"])
    repo.submit("root", now=now)
    repo.sign("targets", keys["targets"])
    repo.submit("targets", online=[keys["online"]], now=now)
    repo.save(home / "trust" / "lab")
    return repo


def test_online_roles_are_re_signed_before_they_expire_and_a_device_never_sees_a_freeze(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    start = time.time()
    repo = make_fleet(home, now=start)
    broker: dict[str, bytes] = repo.files()
    device = DeviceTrust("lab", "cam-1", broker["root/1"])
    expiry = Expiry()

    def publish(fleet: str, role: str, data: bytes) -> None:
        assert fleet == "lab"
        broker[role] = data

    def keep(now: float) -> dict[str, list[str]]:
        return keep_fresh(home, publish, lambda name: load_signing_key(home, name), now=now)

    assert keep(start) == {}  # everything is fresh
    # 13 hours later the timestamp (1 day) is past half its life: it alone is re-signed.
    assert keep(start + 13 * 3600) == {"lab": ["timestamp"]}
    assert not device.refresh(Retained(broker), now=start + 30 * 3600).freeze_suspected
    # 4 days later desired and snapshot (7 days) are too.
    assert keep(start + 4 * 86400) == {"lab": ["desired", "snapshot", "timestamp"]}
    report = device.refresh(Retained(broker), now=start + 4 * 86400 + expiry.timestamp - 60)
    assert not report.freeze_suspected
    assert load_repository(home / "trust" / "lab").roles["timestamp"].signed.version == 3
    # Without the service, the device notices.
    assert device.refresh(Retained(broker), now=start + 6 * 86400).freeze_suspected


def test_fleet_serve_publishes_a_fresh_timestamp_to_the_broker(tmp_path: Path, mosquitto) -> None:
    home = tmp_path / "home"
    make_fleet(home, now=time.time() - 20 * 3600)  # its timestamp expires in 4 hours
    got: list[bytes] = []
    arrived = threading.Event()
    watcher = MqttClient(mosquitto.url, client_id="trust-watch").connect(timeout=10)

    def on(message) -> None:  # type: ignore[no-untyped-def]
        got.append(message.payload)
        arrived.set()

    watcher.subscribe(Topics().fleet_trust("lab", "timestamp"), on)
    service = FleetService(
        ServiceConfig(
            broker=mosquitto.url,
            registry=f"sqlite:///{tmp_path / 'registry.db'}",
            dashboard=False,
            controller=False,
            home=str(home),
        )
    ).start()
    try:
        assert arrived.wait(30), "fleet serve published no timestamp"
    finally:
        service.stop()
        watcher.close()
    device = DeviceTrust("lab", "cam-1", load_repository(home / "trust" / "lab").files()["root/1"])
    report = device.refresh(Retained(load_repository(home / "trust" / "lab").files()))
    assert not report.freeze_suspected and report.expires["timestamp"] > time.time() + 23 * 3600
    assert got[-1] == load_repository(home / "trust" / "lab").files()["timestamp"]
