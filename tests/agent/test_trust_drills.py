"""Trust drills (issue 16) with a real Mosquitto and real agents following their fleet's TUF
metadata (edgekit.roles): a stolen online key, root rotation 2 of 3, a targets key rotated out, a
freeze, a rollback, mix-and-match, fast-forward, and the one-time move from single-key trust
(from a state directory the pre-TUF release wrote). Each attack is also a test without a broker
in tests/sdk/test_roles.py; docs/security.md names each test."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from device_fixtures import Bundles
from edgekit import SigningKey, TrustedKeys
from edgekit.agent import Agent
from edgekit.agent.daemon import AgentDaemon
from edgekit.bench import BenchCandidate, new_bench_request, sign_bench_request
from edgekit.bundle import read_bundle
from edgekit.desired import ShadowRequest, new_desired_state, sign_desired_state
from edgekit.fleet.trustrepo import Expiry
from edgekit.mqtt import MqttClient
from edgekit.roles import sign_trust_upgrade
from trust_sim import BundleRef, TrustSim, authorise_bundles, desire_bundle
from watcher import TOPICS, Watcher, watcher

__all__ = ["watcher"]

FLEET = "lab"
PRETUF = Path(__file__).resolve().parents[1] / "fixtures" / "pretuf_state"


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

    def start(self, device: str, *, tuf: bool = True, also_trust: Optional[SigningKey] = None) -> AgentDaemon:
        extra = {"trust_root": str(self.root_file)} if tuf else {}
        path = self.make_config(device, broker=self.broker, telemetry_interval=3600, **extra)
        text = path.read_text().replace('device = "pi-01"', f'device = "{device}"')
        if also_trust is not None:
            text = text.replace(
                "trusted_keys = '''\n", f"trusted_keys = '''\n{also_trust.public.pem().decode()}"
            )
        path.write_text(text)
        agent = Agent.from_config(path, background=False)
        daemon = AgentDaemon(agent, upload_interval=0.2).start()
        self.daemons[device] = daemon
        return daemon

    def publish(self, files: dict[str, bytes] | None = None) -> None:
        publish_trust(self.watcher.client, self.sim.files() if files is None else files)

    def two_devices_serving_v1(self, bundles: Bundles, key: SigningKey) -> tuple[BundleRef, BundleRef]:
        """Bundles 1.0.0 and 2.0.0 on the broker and authorised by targets, 1.0.0 desired, and
        pi-01 and pi-02 started and serving it: where most drills begin. Returns their refs."""
        v1, v2 = ref(bundles.v1, key), ref(bundles.v2, key)
        for path in (bundles.v1, bundles.v2):
            self.watcher.publish_bundle(path, key)
        authorise_bundles(self.sim, v1, v2)
        desire_bundle(self.sim, v1)
        self.publish()
        for device in ("pi-01", "pi-02"):
            self.start(device)
        for device in ("pi-01", "pi-02"):
            self.watcher.wait_for(self.watcher.serving("1.0.0", device))
        return v1, v2

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
    v1, v2 = fleet.two_devices_serving_v1(bundles, key)
    devices = list(fleet.daemons)
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
    # Nor can it re-delegate the desired role to itself without the offline keys: a targets it
    # signs, even pinned by a snapshot and timestamp the current online key signed, is refused.
    current = fleet.sim.files()
    targets_version = json.loads(current["targets"])["signed"]["version"] + 1
    forged_targets = resign(current["targets"], stolen, lambda t: setattr(t, "version", targets_version))
    snapshot, timestamp = pin_targets(current, fresh, targets_version, bump=50)
    fleet.publish({**current, "targets": forged_targets, "snapshot": snapshot, "timestamp": timestamp})
    for device in devices:
        refused = fleet.wait_event(device, "trust_refused", count=2)
        assert "targets" in refused[-1]["message"] and "signed by 0/1" in refused[-1]["message"]
        assert fleet.daemons[device].agent.status().version == "1.0.0"


def pin_targets(
    current: dict[str, bytes], key: SigningKey, targets_version: int, bump: int = 1
) -> tuple[bytes, bytes]:
    """A snapshot pinning targets at ``targets_version`` and a timestamp pinning that snapshot,
    each ``bump`` versions past ``current``'s and signed by ``key`` alone (:func:`resign`)."""
    snapshot = resign(
        current["snapshot"],
        key,
        lambda s: (
            setattr(s, "version", s.version + bump),
            setattr(s.meta["targets.json"], "version", targets_version),
        ),
    )
    snapshot_version = json.loads(snapshot)["signed"]["version"]
    timestamp = resign(
        current["timestamp"],
        key,
        lambda t: (
            setattr(t, "version", t.version + bump),
            setattr(t.snapshot_meta, "version", snapshot_version),
        ),
    )
    return snapshot, timestamp


def resign(data: bytes, key: SigningKey, change: Callable[[object], object]) -> bytes:
    """``data`` (TUF metadata) changed and signed by ``key`` alone: what an attacker holding
    ``key`` and the broker can publish."""
    from edgekit.fleet.trustrepo import _signer
    from tuf.api.metadata import Metadata

    md = Metadata.from_bytes(data)
    change(md.signed)
    md.signatures.clear()
    md.sign(_signer(key))
    return md.to_bytes()


def test_drill_root_rotation_2_of_3_reaches_every_device_and_one_signature_is_refused(fleet, bundles, key):
    v1 = ref(bundles.v1, key)
    fleet.watcher.publish_bundle(bundles.v1, key)
    authorise_bundles(fleet.sim, v1)
    desire_bundle(fleet.sim, v1)
    fleet.publish()
    devices = ["pi-01", "pi-02", "pi-03"]
    for device in devices:
        fleet.start(device)
    for device in devices:
        fleet.watcher.wait_for(fleet.watcher.serving("1.0.0", device))
    # A root v2 signed by one of the two keys needed (an attacker with one root key and the
    # broker, or an operator in a hurry): every device refuses it and stays on v1.
    keys = fleet.sim.root_keys
    a, b = SigningKey.generate(), SigningKey.generate()
    fleet.sim.repo.rotate("root", add=[a.public], remove=[keys[0].key_id], now=fleet.sim.now)
    fleet.sim.repo.sign("root", keys[1])
    one_signature = fleet.sim.repo.pending["root"].to_bytes()
    fleet.publish({"root/2": one_signature})
    for device in devices:
        refused = fleet.wait_event(device, "trust_refused")
        assert "root v2" in refused[-1]["message"] and "signed by 1/2 keys" in refused[-1]["message"]
        assert fleet.daemons[device]._tuf.root_version == 1  # type: ignore[union-attr]
    # pi-02 is off during two rotations.
    late = fleet.daemons.pop("pi-02")
    late.stop()
    late.agent.close()
    online = [fleet.daemons[d] for d in ("pi-01", "pi-03")]
    # With the second signature (and the new key's), the same change goes through.
    fleet.sim.repo.sign("root", keys[2])
    fleet.sim.repo.sign("root", a)
    fleet.sim.repo.submit("root", online=[fleet.sim.online], now=fleet.sim.now)
    fleet.sim.root_keys = [keys[1], keys[2], a]
    fleet.publish()
    for daemon in online:
        fleet.wait_event(daemon.device, "trust_root_updated")
        fleet.watcher.wait_for(lambda _, d=daemon: d._tuf.root_version == 2)  # type: ignore[union-attr]
    keys = fleet.sim.root_keys
    fleet.sim.rotate_root(add=[b], remove=[keys[0]], signers=[keys[1], keys[2], b])
    fleet.publish()
    for daemon in online:
        fleet.wait_event(daemon.device, "trust_root_updated", count=2)
        fleet.watcher.wait_for(lambda _, d=daemon: d._tuf.root_version == 3)  # type: ignore[union-attr]
    # The device that was off starts from root v1 on its disk and walks the chain to v3
    # (no signature of root 3 is by a key root 1 lists but keys[1]: only the chain leads there).
    again = fleet.start("pi-02")
    fleet.watcher.wait_for(fleet.watcher.serving("1.0.0", "pi-02"))
    fleet.watcher.wait_for(lambda _: again._tuf.root_version == 3)  # type: ignore[union-attr]
    # Every device says so in its state, with when its timestamp expires (what the fleet watches).
    for device in devices:
        fleet.watcher.wait_for(lambda _, d=device: fleet.watcher.states(d)[-1].trust_root == 3)
        assert fleet.watcher.states(device)[-1].trust_expires > time.time()


def test_drill_a_targets_key_rotated_out_devices_install_under_the_new_key_and_refuse_the_old(
    fleet, bundles, key
):
    v1, v2, v3 = ref(bundles.v1, key), ref(bundles.v2, key), ref(bundles.v3, key)
    for path in (bundles.v1, bundles.v2, bundles.v3):
        fleet.watcher.publish_bundle(path, key)
    authorise_bundles(fleet.sim, v1)
    desire_bundle(fleet.sim, v1)
    fleet.publish()
    devices = ["pi-01", "pi-02"]
    for device in devices:
        fleet.start(device)
    for device in devices:
        fleet.watcher.wait_for(fleet.watcher.serving("1.0.0", device))
    # The targets key is lost: `trust revoke OLD --replacement NEW` makes a new root (root
    # threshold) and a re-signed targets (the new key), applied together by `trust submit root`.
    old, new = fleet.sim.targets_key, SigningKey.generate()
    assert fleet.sim.repo.revoke(old.key_id, replacement=new.public, now=fleet.sim.now) == ["root", "targets"]
    for root_key in fleet.sim.root_keys[:2]:
        fleet.sim.repo.sign("root", root_key)
    fleet.sim.repo.sign("targets", new)
    fleet.sim.repo.submit("root", online=[fleet.sim.online], now=fleet.sim.now)
    assert fleet.sim.repo.pending == {}
    fleet.sim.targets_key = new
    fleet.publish()
    for device in devices:
        fleet.wait_event(device, "trust_root_updated")
    # Devices keep installing what the new targets key authorises.
    authorise_bundles(fleet.sim, v2)
    desire_bundle(fleet.sim, v2)
    fleet.publish()
    for device in devices:
        fleet.watcher.wait_for(fleet.watcher.serving("2.0.0", device))
        assert not fleet.events(device, "trust_refused")
    # Whoever holds the old key signs a targets listing its own bundle (v3), and a snapshot and
    # timestamp pinning it (with the online key too): every device refuses it and keeps v2.
    current = fleet.sim.files()
    version = json.loads(current["targets"])["signed"]["version"] + 1

    def add_v3(targets: object) -> None:
        from tuf.api.metadata import TargetFile

        targets.version = version  # type: ignore[attr-defined]
        path = f"bundles/{v3.sha256}"
        targets.targets[path] = TargetFile(v3.length, {"sha256": v3.sha256}, path)  # type: ignore[attr-defined]

    forged = resign(current["targets"], old, add_v3)
    snapshot, timestamp = pin_targets(current, fleet.sim.online, version)
    fleet.sim.seq += 1
    state = new_desired_state(
        FLEET,
        bundle_sha256=v3.sha256,
        bundle_name=v3.name,
        bundle_version=v3.version,
        seq=fleet.sim.seq,
        now=fleet.sim.now,
    )
    fleet.publish({**current, "targets": forged, "snapshot": snapshot, "timestamp": timestamp})
    for device in devices:
        refused = fleet.wait_event(device, "trust_refused")
        assert "targets" in refused[-1]["message"] and "signed by 0/1" in refused[-1]["message"]
        assert fleet.daemons[device].agent.status().version == "2.0.0"
    assert state.bundle_sha256 not in fleet.daemons["pi-01"].trust_report.authorised  # type: ignore[union-attr]


def test_drill_mix_and_match_a_desired_of_another_snapshot_is_not_taken(fleet, bundles, key):
    _v1, v2 = fleet.two_devices_serving_v1(bundles, key)
    devices = list(fleet.daemons)
    old_desired = fleet.sim.files()["desired"]
    # The broker holds the new timestamp and snapshot but the desired role of the older snapshot
    # (v1 again, under a version number the new snapshot does not pin): not taken.
    desire_bundle(fleet.sim, v2)
    new = fleet.sim.files()
    before = {d: fleet.daemons[d].trust_report.versions["desired"] for d in devices}  # type: ignore[union-attr]
    fleet.publish({"desired": old_desired, "snapshot": new["snapshot"], "timestamp": new["timestamp"]})
    for device in devices:
        # The device verified the new timestamp and snapshot and waits for the desired they pin.
        fleet.watcher.wait_for(
            lambda _, d=device: fleet.daemons[d]._tuf.local.get("snapshot") == new["snapshot"]  # type: ignore[union-attr]
        )
        assert fleet.daemons[device].trust_report.versions["desired"] == before[device]  # type: ignore[union-attr]
        assert fleet.daemons[device].agent.status().version == "1.0.0"
    # The pinned desired arrives: taken.
    fleet.publish({"desired": new["desired"]})
    for device in devices:
        fleet.watcher.wait_for(fleet.watcher.serving("2.0.0", device))


def test_drill_fast_forward_then_recovery_by_rotating_the_timestamp_key(fleet, bundles, key):
    _v1, v2 = fleet.two_devices_serving_v1(bundles, key)
    devices = list(fleet.daemons)
    # The stolen online key signs a timestamp with a huge version: valid, so devices take it ...
    stolen = fleet.sim.online
    current = fleet.sim.files()
    ff = resign(current["timestamp"], stolen, lambda t: setattr(t, "version", 10**6))
    fleet.publish({"timestamp": ff})
    for device in devices:
        fleet.watcher.wait_for(
            lambda _, d=device: fleet.daemons[d].trust_report.versions["timestamp"] == 10**6  # type: ignore[union-attr]
        )
    # ... and from then on refuse the real ones, lower numbers, as rollbacks.
    desire_bundle(fleet.sim, v2, key=stolen)
    fleet.publish()
    for device in devices:
        refused = fleet.wait_event(device, "trust_refused")
        assert "timestamp" in refused[-1]["message"]
        assert fleet.daemons[device].agent.status().version == "1.0.0"
    # Recovery: root (2 of 3) rotates the timestamp and snapshot key; the devices drop the
    # fast-forwarded timestamp (the new key does not verify it) and follow the fleet again.
    fresh = SigningKey.generate()
    fleet.sim.repo.rotate("timestamp", add=[fresh.public], remove=[stolen.key_id], now=fleet.sim.now)
    fleet.sim.repo.rotate("snapshot", add=[fresh.public], remove=[stolen.key_id], now=fleet.sim.now)
    for root_key in fleet.sim.root_keys[:2]:
        fleet.sim.repo.sign("root", root_key)
    fleet.sim.repo.submit("root", online=[fresh, stolen], now=fleet.sim.now)
    fleet.publish()
    for device in devices:
        fleet.watcher.wait_for(fleet.watcher.serving("2.0.0", device))
        report = fleet.daemons[device].trust_report
        assert report.root_version == 2 and report.versions["timestamp"] < 10**6  # type: ignore[union-attr]


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


def test_drill_a_device_state_from_the_pre_tuf_release_moves_to_tuf_with_a_signed_upgrade_once(
    fleet, bundles, key, other_key
):
    # The state directory the release before the key hierarchy wrote (tests/fixtures/pretuf_state:
    # its agent installed digits 1.0.0 from a desired state seq 7 signed by its single key).
    old_key = SigningKey(load_pem_private_key((PRETUF / "signing.key.pem").read_bytes(), None))  # type: ignore[arg-type]
    shutil.copytree(PRETUF / "state", fleet.tmp_path / "pi-01-state")
    installed = next((PRETUF / "state" / "bundles").iterdir())
    manifest = (installed / "manifest.json").read_bytes()
    v1 = BundleRef(hashlib.sha256(manifest).hexdigest(), "digits", "1.0.0", len(manifest))
    v2 = ref(bundles.v2, key)
    fleet.watcher.publish_bundle(bundles.v2, key)
    # Today's agent on that directory, trusting the old single key (and the key of the test's bundles).
    device = fleet.start("pi-01", tuf=False, also_trust=old_key)
    fleet.watcher.wait_for(fleet.watcher.serving("1.0.0"))
    assert not device.tuf_mode and device.last_seq == 7
    assert device.agent.status().bundle_id == v1.sha256
    # An upgrade signed by a key the device does not trust is refused.
    upgrade = TOPICS.fleet_trust(FLEET, "upgrade")
    fleet.watcher.client.publish(
        upgrade, sign_trust_upgrade(FLEET, fleet.sim.root1, other_key), retain=True
    ).wait(10)
    fleet.wait_event("pi-01", "trust_refused")
    assert not device.tuf_mode
    # Signed by the release's single key: the device takes the TUF root, then follows TUF metadata only.
    authorise_bundles(fleet.sim, v1, v2)
    fleet.sim.seq = 7
    desire_bundle(fleet.sim, v2)
    fleet.publish()
    fleet.watcher.client.publish(
        upgrade, sign_trust_upgrade(FLEET, fleet.sim.root1, old_key), retain=True
    ).wait(10)
    fleet.wait_event("pi-01", "trust_upgraded")
    fleet.watcher.wait_for(fleet.watcher.serving("2.0.0"))
    refused = device.refused
    # Single-key documents (the release's key) are ignored from now on.
    old_doc = new_desired_state(
        FLEET, bundle_sha256=v1.sha256, bundle_name="digits", bundle_version="1.0.0", seq=50
    )
    fleet.watcher.client.publish(
        TOPICS.fleet_desired(FLEET), sign_desired_state(old_doc, old_key), retain=True
    ).wait(10)
    fleet.watcher.wait_for(lambda _: device.refused > refused)
    assert device.agent.status().version == "2.0.0"
    # After a restart it is still in TUF mode (the root is in its state directory).
    device.stop()
    device.agent.close()
    again = fleet.start("pi-01", tuf=False, also_trust=old_key)
    assert again.tuf_mode


def shadow_state(sim: TrustSim, serving: BundleRef, candidate: BundleRef) -> None:
    """What the online desired role signs for `push --shadow`: serve ``serving``, try ``candidate``."""
    shadow = ShadowRequest(candidate.sha256, candidate.name, candidate.version, 1.0, int(time.time()) + 600)
    desire_bundle(sim, serving, shadow=shadow)


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


def test_on_tuf_a_capture_policy_must_be_signed_by_the_online_key_and_the_single_key_is_refused(
    fleet, bundles, key
):
    from edgekit.capture import CaptureKey, new_capture_policy, sign_capture_policy

    v1 = ref(bundles.v1, key)
    fleet.watcher.publish_bundle(bundles.v1, key)
    authorise_bundles(fleet.sim, v1)
    desire_bundle(fleet.sim, v1)
    fleet.publish()
    daemon = fleet.start("pi-01")
    fleet.watcher.wait_for(fleet.watcher.serving("1.0.0"))
    owner, thief = CaptureKey.generate(), CaptureKey.generate()
    topic = TOPICS.fleet_capture(FLEET)

    def policy(seq: int, recipient: bytes) -> object:
        return new_capture_policy(FLEET, seq=seq, recipient=recipient, triggers=("sample",), sample_rate=1.0)

    # The single key the device still lists in trusted_keys (stolen, say) tries to turn capture
    # on, sealed to the thief's key: refused with an event, nothing captured.
    stolen = sign_capture_policy(policy(5, thief.public_raw), key)  # type: ignore[arg-type]
    fleet.watcher.client.publish(topic, stolen, qos=1, retain=True).wait(10)
    refused = fleet.wait_event("pi-01", "capture_policy_refused")[-1]
    assert "not signed by the fleet's online key" in refused["message"]
    assert not daemon.agent.capture.armed and daemon.agent.capture.policy is None
    # Signed by the fleet's online key (the desired role's, in the verified targets): applied.
    good = sign_capture_policy(policy(6, owner.public_raw), fleet.sim.online)  # type: ignore[arg-type]
    fleet.watcher.client.publish(topic, good, qos=1, retain=True).wait(10)
    fleet.wait_event("pi-01", "capture_policy_applied")
    assert daemon.agent.capture.armed
    assert daemon.agent.capture.policy.recipient_id == owner.key_id  # type: ignore[union-attr]
    # After a restart the saved policy holds again once the metadata is verified.
    daemon.stop()
    daemon.agent.close()
    fleet.daemons.pop("pi-01")
    again = fleet.start("pi-01")
    assert again.agent.capture.wait_for(lambda c: c.armed, 30)
    assert again.agent.capture.policy.seq == 6  # type: ignore[union-attr]
    # The online key is revoked: once the device verifies the new keys, the policy the old key
    # signed no longer holds (said as an event); the replacement key sets it again.
    fresh = SigningKey.generate()
    fleet.sim.repo.revoke(fleet.sim.online.key_id, replacement=fresh.public, now=fleet.sim.now)
    for root_key in fleet.sim.root_keys[:2]:
        fleet.sim.repo.sign("root", root_key)
    fleet.sim.repo.submit("root", now=fleet.sim.now)
    fleet.sim.repo.sign("targets", fleet.sim.targets_key)
    fleet.sim.online = fresh
    fleet.sim.repo.submit("targets", online=[fresh], now=fleet.sim.now)
    fleet.publish()
    assert again.agent.capture.wait_for(lambda c: not c.armed, 30)
    dropped = fleet.wait_event("pi-01", "capture_policy_refused", count=2)[-1]
    assert "not signed by the fleet's online key" in dropped["message"]
    renewed = sign_capture_policy(policy(7, owner.public_raw), fresh)  # type: ignore[arg-type]
    fleet.watcher.client.publish(topic, renewed, qos=1, retain=True).wait(10)
    assert again.agent.capture.wait_for(lambda c: c.armed, 30)
    assert again.agent.capture.policy.seq == 7  # type: ignore[union-attr]
