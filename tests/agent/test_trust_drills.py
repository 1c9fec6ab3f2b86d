"""Trust drills (issue 16) with a real Mosquitto and real agents following their fleet's TUF
metadata (edgekit.roles): a stolen online key, root rotation 2 of 3, a freeze, a rollback, and
the one-time move from single-key trust. The same attacks without a broker, one by one, are in
tests/sdk/test_roles.py; docs/security.md names each test."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from edgekit import SigningKey, TrustedKeys
from edgekit.agent import Agent
from edgekit.agent.daemon import AgentDaemon
from edgekit.bench import BenchCandidate, new_bench_request, sign_bench_request
from edgekit.bundle import read_bundle
from edgekit.desired import ShadowRequest, new_desired_state
from edgekit.fleet.trustrepo import Expiry
from edgekit.mqtt import MqttClient
from edgekit.roles import sign_trust_upgrade
from trust_sim import BundleRef, TrustSim, authorise_bundles, desire_bundle
from watcher import TOPICS, Watcher, watcher

__all__ = ["watcher"]

FLEET = "lab"


def ref(path: Path, key: SigningKey) -> BundleRef:
    bundle = read_bundle(path, TrustedKeys([key.public]))
    return BundleRef(
        bundle.bundle_id, bundle.manifest.name, bundle.manifest.version, len(bundle.manifest_bytes)
    )


def publish_trust(client: MqttClient, files: dict[str, bytes]) -> None:
    """What `edgekit trust publish` does: every root, then targets, desired, snapshot, timestamp."""
    order = sorted((n for n in files if n.startswith("root/")), key=lambda n: int(n.split("/")[1]))
    order += [n for n in ("targets", "desired", "snapshot", "timestamp") if n in files]
    for name in order:
        client.publish(TOPICS.fleet_trust(FLEET, name), files[name], retain=True).wait(10)


class Fleet:
    """A TUF repository for fleet ``lab``, devices that follow it, and a way to publish."""

    def __init__(
        self, tmp_path: Path, make_config: Callable[..., Path], broker: str, watcher: Watcher
    ) -> None:
        self.tmp_path, self.make_config, self.broker, self.watcher = tmp_path, make_config, broker, watcher
        self.daemons: dict[str, AgentDaemon] = {}
        self.sim = TrustSim(FLEET)
        self.root_file = tmp_path / "root.json"
        self.root_file.write_bytes(self.sim.root1)

    def start(self, device: str, *, tuf: bool = True) -> AgentDaemon:
        extra = {"trust_root": str(self.root_file)} if tuf else {}
        path = self.make_config(device, broker=self.broker, telemetry_interval=3600, **extra)
        path.write_text(path.read_text().replace('device = "pi-01"', f'device = "{device}"'))
        agent = Agent.from_config(path, background=False)
        daemon = AgentDaemon(agent, upload_interval=0.2).start()
        self.daemons[device] = daemon
        return daemon

    def publish(self, files: dict[str, bytes] | None = None) -> None:
        publish_trust(self.watcher.client, self.sim.files() if files is None else files)

    def events(self, device: str, kind: str) -> list[dict]:
        return [e for e in self.watcher.records("events", device) if e["kind"] == kind]

    def wait_event(self, device: str, kind: str, count: int = 1) -> list[dict]:
        return self.watcher.wait_for(
            lambda _: len(self.events(device, kind)) >= count and self.events(device, kind)
        )  # type: ignore[return-value]

    def close(self) -> None:
        for daemon in self.daemons.values():
            daemon.stop()
            daemon.agent.close()


@pytest.fixture
def fleet(tmp_path, make_config, mosquitto, watcher) -> Iterator[Fleet]:
    f = Fleet(tmp_path, make_config, mosquitto.url, watcher)
    yield f
    f.close()


def test_drill_a_stolen_online_key_works_until_revoked_then_every_device_refuses_it(fleet, bundles, key):
    v1, v2 = ref(bundles.v1, key), ref(bundles.v2, key)
    for path in (bundles.v1, bundles.v2):
        fleet.watcher.publish_bundle(path, key)
    authorise_bundles(fleet.sim, v1, v2)
    desire_bundle(fleet.sim, v1)
    fleet.publish()
    devices = ["pi-01", "pi-02"]
    for device in devices:
        fleet.start(device)
    for device in devices:
        fleet.watcher.wait_for(fleet.watcher.serving("1.0.0", device))
    # The attacker holds the online key (and can publish on the broker): devices accept what it
    # signs, among the bundles targets authorised, until the key is revoked.
    stolen = fleet.sim.online
    desire_bundle(fleet.sim, v2, key=stolen)
    fleet.publish()
    for device in devices:
        fleet.watcher.wait_for(fleet.watcher.serving("2.0.0", device))
    attacker_copy = fleet.sim.files()
    # The operators revoke it: root (2 of 3) and targets (offline key) sign the change.
    fresh = SigningKey.generate()
    assert fleet.sim.repo.revoke(stolen.key_id, replacement=fresh.public, now=fleet.sim.now) == [
        "root",
        "targets",
    ]
    for root_key in fleet.sim.root_keys[:2]:
        fleet.sim.repo.sign("root", root_key)
    fleet.sim.repo.submit("root", now=fleet.sim.now)
    fleet.sim.repo.sign("targets", fleet.sim.targets_key)
    fleet.sim.online = fresh
    fleet.sim.repo.submit("targets", online=[fresh], now=fleet.sim.now)
    desire_bundle(fleet.sim, v1)
    fleet.publish()
    for device in devices:
        fleet.watcher.wait_for(fleet.watcher.serving("1.0.0", device))
        assert fleet.daemons[device].trust_report.root_version == 2  # type: ignore[union-attr]
    # The attacker signs a newer desired state (and snapshot, timestamp) with the stolen key.
    forged = json.loads(attacker_copy["timestamp"])
    forged["signed"]["version"] += 100
    from edgekit.fleet.trustrepo import _signer
    from tuf.api.metadata import Metadata

    md = Metadata.from_bytes(json.dumps(forged).encode())
    md.signatures.clear()
    md.sign(_signer(stolen))
    fleet.publish({**attacker_copy, "timestamp": md.to_bytes()})
    for device in devices:
        refused = fleet.wait_event(device, "trust_refused")
        assert "timestamp" in refused[-1]["message"] and device in refused[-1]["message"]
        assert fleet.daemons[device].agent.status().version == "1.0.0"


def test_drill_root_rotation_2_of_3_reaches_every_device_and_one_signature_is_refused(fleet, bundles, key):
    v1 = ref(bundles.v1, key)
    fleet.watcher.publish_bundle(bundles.v1, key)
    authorise_bundles(fleet.sim, v1)
    desire_bundle(fleet.sim, v1)
    fleet.publish()
    online = fleet.start("pi-01")
    fleet.watcher.wait_for(fleet.watcher.serving("1.0.0", "pi-01"))
    # pi-02 is off during two rotations.
    a, b = SigningKey.generate(), SigningKey.generate()
    keys = fleet.sim.root_keys
    fleet.sim.rotate_root(add=[a], remove=[keys[0]], signers=[keys[1], keys[2], a])
    fleet.publish()
    fleet.wait_event("pi-01", "trust_root_updated")
    assert online.trust_report.root_version == 2  # type: ignore[union-attr]
    # A root v3 signed by one of the two keys needed: refused by the device, which stays on v2.
    keys = fleet.sim.root_keys
    fleet.sim.repo.rotate("root", add=[b.public], remove=[keys[0].key_id], now=fleet.sim.now)
    fleet.sim.repo.sign("root", keys[1])
    one_signature = fleet.sim.repo.pending["root"].to_bytes()
    fleet.publish({"root/3": one_signature})
    refused = fleet.wait_event("pi-01", "trust_refused")
    assert "root v3" in refused[-1]["message"] and "signed by 1/2 keys" in refused[-1]["message"]
    assert online._tuf.root_version == 2  # type: ignore[union-attr]
    # With the second signature (and the new key's), the same change goes through.
    fleet.sim.repo.sign("root", b)
    fleet.sim.repo.sign("root", a)
    fleet.sim.repo.submit("root", online=[fleet.sim.online], now=fleet.sim.now)
    fleet.sim.root_keys = [keys[1], a, b]
    fleet.publish()
    fleet.wait_event("pi-01", "trust_root_updated", count=2)
    assert online._tuf.root_version == 3  # type: ignore[union-attr]
    # The device that was off starts with root v1 and walks the chain to v3.
    late = fleet.start("pi-02")
    fleet.watcher.wait_for(fleet.watcher.serving("1.0.0", "pi-02"))
    assert late._tuf.root_version == 3  # type: ignore[union-attr]
    # Both say so in their state, with when their timestamp expires (what the fleet watches).
    for device in ("pi-01", "pi-02"):
        fleet.watcher.wait_for(lambda _, d=device: fleet.watcher.states(d)[-1].trust_root == 3)
        assert fleet.watcher.states(device)[-1].trust_expires > time.time()


def test_drill_freeze_raises_freeze_suspected_and_the_device_keeps_serving(fleet, bundles, key, models):
    fleet.sim = TrustSim(FLEET, expiry=Expiry(timestamp=60))
    fleet.root_file.write_bytes(fleet.sim.root1)
    v1 = ref(bundles.v1, key)
    fleet.watcher.publish_bundle(bundles.v1, key)
    authorise_bundles(fleet.sim, v1)
    desire_bundle(fleet.sim, v1)
    # Signed as if 57 s ago: the timestamp expires 3 s from now, and the broker withholds anything new.
    fleet.sim.now = time.time() - 57
    fleet.sim.repo.refresh_timestamp([fleet.sim.online], now=fleet.sim.now)
    fleet.publish()
    daemon = fleet.start("pi-01")
    fleet.watcher.wait_for(fleet.watcher.serving("1.0.0"))
    event = fleet.wait_event("pi-01", "freeze_suspected")[0]
    assert "keeps serving" in event["message"] and "pi-01" in event["message"]
    assert daemon.agent.predict(models.x_test[:1])[0].shape == (1, 10)
    assert fleet.watcher.states()[-1].status == "serving"
    stale = fleet.watcher.states("pi-01")[-1].trust_expires
    assert stale is not None and stale <= time.time()  # what the fleet's alerts see
    # Fresh metadata ends it, and the device's state carries the new expiry (the fleet's
    # trust_expiry alert resolves on it).
    fleet.sim.now = time.time()
    fleet.sim.repo.refresh_timestamp([fleet.sim.online], now=fleet.sim.now)
    fleet.publish()
    fleet.wait_event("pi-01", "freeze_ended")
    fleet.watcher.wait_for(lambda _: (fleet.watcher.states("pi-01")[-1].trust_expires or 0) > stale + 30)


def test_drill_a_replayed_older_timestamp_is_refused_and_changes_nothing(fleet, bundles, key):
    v1, v2 = ref(bundles.v1, key), ref(bundles.v2, key)
    for path in (bundles.v1, bundles.v2):
        fleet.watcher.publish_bundle(path, key)
    authorise_bundles(fleet.sim, v1, v2)
    desire_bundle(fleet.sim, v2)
    old = fleet.sim.files()
    desire_bundle(fleet.sim, v1)
    fleet.publish()
    daemon = fleet.start("pi-01")
    fleet.watcher.wait_for(fleet.watcher.serving("1.0.0"))
    fleet.publish(old)  # the broker (or someone with operator access) replays the older set
    refused = fleet.wait_event("pi-01", "trust_refused")
    assert "rollback" in refused[-1]["message"] or "older" in refused[-1]["message"]
    assert daemon.agent.status().version == "1.0.0"


def test_drill_a_device_on_single_key_trust_moves_to_tuf_with_a_signed_upgrade_once(
    fleet, bundles, key, other_key
):
    v1, v2 = ref(bundles.v1, key), ref(bundles.v2, key)
    for path in (bundles.v1, bundles.v2):
        fleet.watcher.publish_bundle(path, key)
    # Today's format: a desired state signed by the single key, applied by a device without TUF.
    device = fleet.start("pi-01", tuf=False)
    fleet.watcher.desire(key, bundles.v1, seq=7)
    fleet.watcher.wait_for(fleet.watcher.serving("1.0.0"))
    assert not device.tuf_mode
    # An upgrade signed by a key the device does not trust is refused.
    upgrade = TOPICS.fleet_trust(FLEET, "upgrade")
    fleet.watcher.client.publish(
        upgrade, sign_trust_upgrade(FLEET, fleet.sim.root1, other_key), retain=True
    ).wait(10)
    fleet.wait_event("pi-01", "trust_refused")
    assert not device.tuf_mode
    # Signed by the current key: the device takes the TUF root, then follows TUF metadata only.
    authorise_bundles(fleet.sim, v1, v2)
    fleet.sim.seq = 7
    desire_bundle(fleet.sim, v2)
    fleet.publish()
    fleet.watcher.client.publish(upgrade, sign_trust_upgrade(FLEET, fleet.sim.root1, key), retain=True).wait(
        10
    )
    fleet.wait_event("pi-01", "trust_upgraded")
    fleet.watcher.wait_for(fleet.watcher.serving("2.0.0"))
    fleet.watcher.desire(key, bundles.v1, seq=50)  # single-key documents are ignored from now on
    fleet.watcher.wait_for(lambda _: device.refused >= 1)
    assert device.agent.status().version == "2.0.0"
    # After a restart it is still in TUF mode (the root is in its state directory).
    device.stop()
    device.agent.close()
    again = fleet.start("pi-01", tuf=False)
    assert again.tuf_mode


def shadow_state(sim: TrustSim, serving: BundleRef, candidate: BundleRef) -> None:
    """What the online desired role signs for `push --shadow`: serve ``serving``, try ``candidate``."""
    sim.seq += 1
    shadow = ShadowRequest(candidate.sha256, candidate.name, candidate.version, 1.0, int(time.time()) + 600)
    state = new_desired_state(
        sim.fleet,
        bundle_sha256=serving.sha256,
        bundle_name=serving.name,
        bundle_version=serving.version,
        seq=sim.seq,
        now=sim.now,
        shadow=shadow,
    )
    sim.repo.set_desired([state], [sim.online], now=sim.now)


def test_a_shadow_candidate_targets_does_not_authorise_is_refused_and_an_authorised_one_is_tried(
    fleet, bundles, key, models
):
    v1, v2 = ref(bundles.v1, key), ref(bundles.v2, key)
    for path in (bundles.v1, bundles.v2):
        fleet.watcher.publish_bundle(path, key)
    authorise_bundles(fleet.sim, v1)
    # The online desired role (alone: a stolen online key) names a candidate targets never listed.
    shadow_state(fleet.sim, v1, v2)
    fleet.publish()
    daemon = fleet.start("pi-01")
    fleet.watcher.wait_for(fleet.watcher.serving("1.0.0"))
    refused = fleet.wait_event("pi-01", "shadow_refused")[-1]
    assert "targets role does not authorise" in refused["message"] and "2.0.0" in refused["message"]
    assert refused["bundle"]["bundle_id"] == v2.sha256
    assert daemon.agent.shadow_status() is None
    assert daemon.agent.predict(models.x_test[:1])[0].shape == (1, 10)
    assert daemon.agent.status().version == "1.0.0"
    # Once targets (the offline key) authorises it, the same request is followed.
    authorise_bundles(fleet.sim, v2)
    shadow_state(fleet.sim, v1, v2)
    fleet.publish()
    fleet.wait_event("pi-01", "shadow_started")
    assert daemon.agent.shadow_status()["candidate"]["bundle_id"] == v2.sha256  # type: ignore[index]
    assert len(fleet.events("pi-01", "shadow_refused")) == 1


def test_a_bench_request_naming_a_bundle_targets_does_not_authorise_is_refused_before_any_fetch(
    fleet, bundles, key
):
    v1, v3 = ref(bundles.v1, key), ref(bundles.v3, key)
    for path in (bundles.v1, bundles.v3):
        fleet.watcher.publish_bundle(path, key)
    authorise_bundles(fleet.sim, v1)
    desire_bundle(fleet.sim, v1)
    fleet.publish()
    daemon = fleet.start("pi-01")
    fleet.watcher.wait_for(fleet.watcher.serving("1.0.0"))

    def request(seq: int, *refs: BundleRef) -> bytes:
        candidates = [BenchCandidate(r.sha256, r.name, r.version) for r in refs]
        return sign_bench_request(
            new_bench_request(FLEET, seq=seq, devices=["pi-01"], candidates=candidates, threads=(1,), runs=3),
            key,  # the single key this device trusts too: not enough for a bundle targets never listed
        )

    topic = TOPICS.fleet_bench(FLEET)
    fleet.watcher.client.publish(topic, request(1, v1, v3), qos=1, retain=True).wait(10)
    refused = fleet.wait_event("pi-01", "bench_refused")[-1]
    assert "3.0.0" in refused["message"] and "targets role does not authorise" in refused["message"]
    assert "1.0.0" not in refused["message"].split("names")[1].split("which")[0]
    assert daemon.bench.refused == 1
    assert not (daemon.state_dir / "downloads" / f"bench-{v1.sha256}").exists()
    # A request naming only authorised candidates is followed.
    fleet.watcher.client.publish(topic, request(2, v1), qos=1, retain=True).wait(10)
    fleet.watcher.wait_for(lambda _: fleet.watcher.records("bench"))
    assert [r["bench_seq"] for r in fleet.watcher.records("bench")] == [2]
    assert not fleet.events("pi-01", "bench_started")[0]["message"].count("3.0.0")
