"""The TUF key hierarchy on the device (edgekit.roles), against a real repository in memory.

Each attack of the TUF specification's list is a test here, named in docs/security.md; each is
also a drill with a real Mosquitto and real agents in tests/agent/test_trust_drills.py (stolen
online key, root rotation 2 of 3, targets key rotation, freeze, rollback, mix-and-match,
fast-forward). The broker here is the in-memory :class:`trust_sim.Retained` dict: the property
test at the end runs hundreds of broker actions per example, which a real broker and agent
could not do in the suite's time.
"""

from __future__ import annotations

import json

import pytest
from edgekit.errors import TrustMetadataError
from edgekit.keys import SigningKey
from edgekit.roles import DeviceTrust
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trust_sim import Retained, TrustSim, digest


def device_of(sim: TrustSim) -> DeviceTrust:
    return DeviceTrust(sim.fleet, "cam-1", sim.root1)


def refused(device: DeviceTrust, files: dict[str, bytes], now: float) -> TrustMetadataError:
    with pytest.raises(TrustMetadataError) as info:
        device.refresh(Retained(files), now=now)
    return info.value


@pytest.fixture
def sim() -> TrustSim:
    sim = TrustSim()
    sim.authorise("1.0.0", "1.1.0")
    sim.desire("1.0.0")
    return sim


def test_a_device_follows_the_desired_state_the_online_role_signs(sim: TrustSim) -> None:
    device = device_of(sim)
    report = device.refresh(Retained(sim.files()), now=sim.now)
    assert report.desired is not None and report.desired.bundle_sha256 == digest("1.0.0")
    sim.desire("1.1.0")
    report = device.refresh(Retained(sim.files()), now=sim.now)
    assert report.desired is not None and report.desired.bundle_version == "1.1.0"
    assert report.changed == {"timestamp", "snapshot", "desired"}
    # Nothing new: the same report, no signature checked again.
    assert device.refresh(Retained(sim.files()), now=sim.now).changed == frozenset()


def test_a_per_device_desired_state_is_for_that_device_only(sim: TrustSim) -> None:
    sim.desire("1.1.0", device="cam-1")
    mine = device_of(sim).refresh(Retained(sim.files()), now=sim.now)
    other = DeviceTrust(sim.fleet, "cam-2", sim.root1).refresh(Retained(sim.files()), now=sim.now)
    assert mine.desired is not None and mine.desired.bundle_version == "1.1.0"
    assert other.desired is not None and other.desired.bundle_version == "1.0.0"
    # A newer fleet-wide state supersedes the canary's, which leaves the role.
    sim.desire("1.1.0")
    assert set(json.loads(sim.files()["desired"])["signed"]["targets"]) == {"fleet"}
    assert device_of(sim).refresh(Retained(sim.files()), now=sim.now).desired.seq == sim.seq  # type: ignore[union-attr]


def test_the_online_key_cannot_name_a_bundle_targets_does_not_authorise(sim: TrustSim) -> None:
    device = device_of(sim)
    device.refresh(Retained(sim.files()), now=sim.now)
    sim.desire("6.6.6-evil")
    assert refused(device, sim.files(), sim.now).reason == "unauthorised"


def test_a_desired_state_with_a_shadow_section_is_signed_and_read_back_with_its_fraction(
    sim: TrustSim,
) -> None:
    # TUF's canonical JSON cannot sign a fraction (the sample rate): the document travels as its text.
    from dataclasses import replace

    from edgekit.desired import ShadowRequest

    device = device_of(sim)
    device.refresh(Retained(sim.files()), now=sim.now)
    state = sim.state("1.0.0")
    shadow = ShadowRequest(digest("1.1.0"), "model", "1.1.0", 0.25, int(sim.now) + 600)
    sim.repo.set_desired([replace(state, shadow=shadow)], [sim.online], now=sim.now)
    report = device.refresh(Retained(sim.files()), now=sim.now)
    assert report.desired is not None and report.desired.shadow == shadow
    assert sim.repo.last_seq() == state.seq  # the registry's floor reads the text form too
    # The text is signed like any document: altered in transit, it is refused.
    files = sim.files()
    assert b"0.25" in files["desired"]
    files["desired"] = files["desired"].replace(b"0.25", b"0.75")
    assert refused(device_of(sim), files, sim.now).reason in {"refused", "malformed", "mismatch"}


def test_a_stolen_online_key_works_until_revoked_then_never(sim: TrustSim) -> None:
    device = device_of(sim)
    stolen = sim.online
    # The attacker (with the stolen key and the broker) signs a desired state: accepted
    # (among the bundles targets authorised), as docs/security.md says.
    sim.desire("1.1.0", key=stolen)
    attack = sim.files()
    assert device.refresh(Retained(attack), now=sim.now).desired.bundle_version == "1.1.0"  # type: ignore[union-attr]
    # The operators revoke it: a new root (root threshold) and a new targets (targets key).
    fresh = SigningKey.generate()
    pending = sim.repo.revoke(stolen.key_id, replacement=fresh.public, now=sim.now)
    assert pending == ["root", "targets"]
    for key in sim.root_keys[:2]:
        sim.repo.sign("root", key)
    sim.repo.submit("root", now=sim.now)
    sim.repo.sign("targets", sim.targets_key)
    sim.online = fresh
    sim.repo.submit("targets", online=[fresh], now=sim.now)
    sim.desire("1.0.0")
    report = device.refresh(Retained(sim.files()), now=sim.now)
    assert report.root_version == 2 and report.desired.bundle_version == "1.0.0"  # type: ignore[union-attr]
    # The attacker signs new desired, snapshot and timestamp with the stolen key: refused.
    attacker = TrustSimView(sim, stolen)
    error = refused(device, attacker.forge_timestamp(version=999), sim.now)
    assert error.reason == "refused"
    # ... and cannot re-delegate: a targets signed by the stolen key is refused, even with a
    # snapshot and timestamp that pin it signed by the current online key.
    forged = attacker.forge_targets()
    targets_version = json.loads(forged["targets"])["signed"]["version"]
    current = TrustSimView(sim, fresh)
    snapshot = current._resign("snapshot", {"version": 50})
    snapshot = TrustSimView.edit(
        snapshot, fresh, lambda s: setattr(s.meta["targets.json"], "version", targets_version)
    )
    timestamp = current._resign("timestamp", {"version": 50})
    timestamp = TrustSimView.edit(timestamp, fresh, lambda s: setattr(s.snapshot_meta, "version", 50))
    error = refused(device, {**forged, "snapshot": snapshot, "timestamp": timestamp}, sim.now)
    assert error.reason == "refused" and "targets" in str(error)
    # The attacker's copy of the metadata signed before the revocation is refused too.
    assert refused(device, {**sim.files(), "timestamp": attack["timestamp"]}, sim.now).reason == "refused"


class TrustSimView:
    """What an attacker holding one key can forge on top of the broker's current files."""

    def __init__(self, sim: TrustSim, key: SigningKey) -> None:
        self.sim, self.key = sim, key

    def _resign(self, role: str, change: dict[str, object]) -> bytes:
        from edgekit.fleet.trustrepo import _signer
        from tuf.api.metadata import Metadata

        md = Metadata.from_bytes(self.sim.files()[role])
        for name, value in change.items():
            setattr(md.signed, name, value)
        md.signatures.clear()
        md.sign(_signer(self.key))
        return md.to_bytes()

    @staticmethod
    def edit(data: bytes, key: SigningKey, change: object) -> bytes:
        from edgekit.fleet.trustrepo import _signer
        from tuf.api.metadata import Metadata

        md = Metadata.from_bytes(data)
        change(md.signed)  # type: ignore[operator]
        md.signatures.clear()
        md.sign(_signer(key))
        return md.to_bytes()

    def forge_timestamp(self, version: int) -> dict[str, bytes]:
        return {**self.sim.files(), "timestamp": self._resign("timestamp", {"version": version})}

    def forge_targets(self) -> dict[str, bytes]:
        files = self.sim.files()
        version = json.loads(files["targets"])["signed"]["version"]
        return {**files, "targets": self._resign("targets", {"version": version + 1})}


def test_root_rotation_with_two_of_three_signatures_is_followed(sim: TrustSim) -> None:
    device = device_of(sim)
    device.refresh(Retained(sim.files()), now=sim.now)
    new = SigningKey.generate()
    sim.rotate_root(add=[new], remove=[sim.root_keys[0]], signers=[sim.root_keys[1], sim.root_keys[2], new])
    report = device.refresh(Retained(sim.files()), now=sim.now)
    assert report.root_version == 2 and "root" in report.changed


def test_a_root_with_one_signature_of_two_needed_is_refused_by_the_workstation_and_the_device(
    sim: TrustSim,
) -> None:
    device = device_of(sim)
    device.refresh(Retained(sim.files()), now=sim.now)
    sim.repo.rotate("root", remove=[sim.root_keys[0].key_id], add=[SigningKey.generate().public], now=sim.now)
    sim.repo.sign("root", sim.root_keys[1])
    with pytest.raises(TrustMetadataError) as info:
        sim.repo.submit("root", now=sim.now)
    assert info.value.reason == "threshold" and "1 valid signature(s) of the 2 needed" in str(info.value)
    # Published anyway (an attacker with one root key and the broker): the device refuses it.
    forged = {**sim.files(), "root/2": sim.repo.pending["root"].to_bytes()}
    assert refused(device, forged, sim.now).reason == "refused"
    assert device.root_version == 1


def test_a_device_offline_through_two_rotations_catches_up_through_the_chain(sim: TrustSim) -> None:
    device = device_of(sim)
    device.refresh(Retained(sim.files()), now=sim.now)
    a, b = SigningKey.generate(), SigningKey.generate()
    sim.rotate_root(add=[a], remove=[sim.root_keys[0]], signers=[sim.root_keys[1], sim.root_keys[2], a])
    sim.rotate_root(add=[b], remove=[sim.root_keys[0]], signers=[sim.root_keys[1], a, b])
    # None of the original first two keys signs root 3: only the chain leads there.
    report = device.refresh(Retained(sim.files()), now=sim.now)
    assert report.root_version == 3
    # Without root 2 on the broker (dropped), the device cannot jump to 3.
    late = DeviceTrust(sim.fleet, "cam-9", sim.root1)
    files = {k: v for k, v in sim.files().items() if k != "root/2"}
    assert late.refresh(Retained(files), now=sim.now).root_version == 1  # stuck, reported as such
    assert late.refresh(Retained(sim.files()), now=sim.now).root_version == 3  # root 2 is back


def test_freeze_timestamp_expiry_is_suspected_and_the_last_state_is_kept(sim: TrustSim) -> None:
    device = device_of(sim)
    first = device.refresh(Retained(sim.files()), now=sim.now)
    assert not first.freeze_suspected
    later = sim.now + sim.repo.expiry.timestamp + 1
    report = device.refresh(Retained(sim.files()), now=later)  # the broker withholds anything new
    assert report.freeze_suspected and report.desired == first.desired
    # A fresh timestamp ends it.
    sim.now = later
    sim.repo.refresh_timestamp([sim.online], now=later)
    assert not device.refresh(Retained(sim.files()), now=later).freeze_suspected


def test_rollback_of_the_timestamp_is_refused(sim: TrustSim) -> None:
    device = device_of(sim)
    old = sim.files()
    sim.desire("1.1.0")
    device.refresh(Retained(sim.files()), now=sim.now)
    assert refused(device, old, sim.now).reason == "rollback"


def test_rollback_of_the_snapshot_is_refused(sim: TrustSim) -> None:
    device = device_of(sim)
    old = sim.files()
    sim.desire("1.1.0")
    device.refresh(Retained(sim.files()), now=sim.now)
    # A fresh timestamp (the attacker holds the online key) pinning the old snapshot.
    old_version = json.loads(old["snapshot"])["signed"]["version"]
    forged = TrustSimView(sim, sim.online)._resign("timestamp", {"version": 99})
    forged = TrustSimView.edit(forged, sim.online, lambda s: setattr(s.snapshot_meta, "version", old_version))
    assert refused(device, {**old, "timestamp": forged}, sim.now).reason == "rollback"


def test_a_snapshot_that_rolls_targets_back_is_refused(sim: TrustSim) -> None:
    device = device_of(sim)
    old_targets = sim.files()["targets"]
    sim.authorise("1.2.0")  # targets v3: what the device trusts now
    device.refresh(Retained(sim.files()), now=sim.now)
    # The online key (stolen) signs a snapshot and timestamp that pin the older targets again.
    key = sim.online
    version = json.loads(old_targets)["signed"]["version"]
    snapshot = TrustSimView(sim, key)._resign("snapshot", {"version": 70})
    snapshot = TrustSimView.edit(snapshot, key, lambda s: setattr(s.meta["targets.json"], "version", version))
    timestamp = TrustSimView(sim, key)._resign("timestamp", {"version": 70})
    timestamp = TrustSimView.edit(timestamp, key, lambda s: setattr(s.snapshot_meta, "version", 70))
    forged = {**sim.files(), "targets": old_targets, "snapshot": snapshot, "timestamp": timestamp}
    assert refused(device, forged, sim.now).reason == "rollback"


def test_mix_and_match_a_desired_of_another_snapshot_is_not_taken(sim: TrustSim) -> None:
    device = device_of(sim)
    old = sim.files()
    sim.desire("1.1.0")
    new = sim.files()
    mixed = {**new, "desired": old["desired"]}
    error = refused(device, mixed, sim.now)
    assert error.reason == "incomplete"  # waits for the pinned version; freeze if it never comes
    assert device.refresh(Retained(new), now=sim.now).desired.bundle_version == "1.1.0"  # type: ignore[union-attr]


def test_fast_forward_recovery_after_the_timestamp_key_is_rotated(sim: TrustSim) -> None:
    device = device_of(sim)
    device.refresh(Retained(sim.files()), now=sim.now)
    stolen = sim.online
    # Fast-forward attack: a timestamp v10**6 signed with the stolen key is accepted (it is valid).
    attacker = TrustSimView(sim, stolen)
    ff = attacker.forge_timestamp(version=10**6)
    assert device.refresh(Retained(ff), now=sim.now).versions["timestamp"] == 10**6
    # From now on the real timestamps (lower versions) are rollbacks to this device.
    sim.repo.refresh_timestamp([stolen], now=sim.now)
    assert refused(device, sim.files(), sim.now).reason == "rollback"
    # Recovery: rotate the timestamp (and snapshot) key in root; the device drops its
    # fast-forwarded timestamp because the new root's key no longer verifies it.
    fresh = SigningKey.generate()
    sim.repo.rotate("timestamp", add=[fresh.public], remove=[stolen.key_id], now=sim.now)
    sim.repo.rotate("snapshot", add=[fresh.public], remove=[stolen.key_id], now=sim.now)
    for key in sim.root_keys[:2]:
        sim.repo.sign("root", key)
    sim.repo.submit("root", online=[fresh, stolen], now=sim.now)
    report = device.refresh(Retained(sim.files()), now=sim.now)
    assert report.root_version == 2 and report.versions["timestamp"] < 10**6


def test_metadata_tampered_in_transit_is_refused(sim: TrustSim) -> None:
    device = device_of(sim)
    files = sim.files()
    doc = json.loads(files["timestamp"])
    doc["signed"]["expires"] = "2099-01-01T00:00:00Z"
    assert refused(device, {**files, "timestamp": json.dumps(doc).encode()}, sim.now).reason == "refused"
    assert refused(device, {**files, "timestamp": b"\x00garbage"}, sim.now).reason == "malformed"


def test_a_targets_key_rotation_re_signs_targets_and_needs_the_new_key_before_the_root(sim: TrustSim) -> None:
    device = device_of(sim)
    old = sim.files()
    device.refresh(Retained(old), now=sim.now)
    new = SigningKey.generate()
    assert (
        sim.repo.rotate("targets", add=[new.public], remove=[sim.targets_key.key_id], now=sim.now) == "root"
    )
    assert sorted(sim.repo.pending) == ["root", "targets"]
    for key in sim.root_keys[:2]:
        sim.repo.sign("root", key)
    # Without the new key's signature on the re-signed targets, the root is not applied: devices
    # would refuse the fleet's targets (signed by the old key only).
    with pytest.raises(TrustMetadataError) as info:
        sim.repo.submit("root", online=[sim.online], now=sim.now)
    assert info.value.reason == "threshold" and "changes the targets keys" in str(info.value)
    # Nor is the re-signed targets before its root.
    sim.repo.sign("targets", new)
    with pytest.raises(TrustMetadataError) as info:
        sim.repo.submit("targets", online=[sim.online], now=sim.now)
    assert "submit that root first" in str(info.value)
    sim.repo.submit("root", online=[sim.online], now=sim.now)
    assert sim.repo.pending == {}
    # The new root reaches the device before the re-signed targets: it waits for it ...
    early = {**old, "root/2": sim.files()["root/2"]}
    assert refused(device, early, sim.now).reason == "incomplete"
    # ... but a newer timestamp still pinning the old targets is refused (nothing was re-signed).
    stale = TrustSimView.edit(old["timestamp"], sim.online, lambda t: setattr(t, "version", t.version + 1))
    error = refused(device, {**early, "timestamp": stale}, sim.now)
    assert error.reason == "refused" and "targets" in str(error)
    sim.targets_key = new
    sim.authorise("1.2.0")
    sim.desire("1.2.0")
    report = device.refresh(Retained(sim.files()), now=sim.now)
    assert report.root_version == 2 and report.desired.bundle_version == "1.2.0"  # type: ignore[union-attr]


def test_a_desired_role_listing_a_path_targets_did_not_delegate_is_refused(sim: TrustSim) -> None:
    # Targets delegates only the fleet's document to the desired role (no per-device paths).
    targets = sim.repo._new_targets(sim.now)
    assert targets.delegations is not None and targets.delegations.roles is not None
    targets.delegations.roles["desired"].paths = ["fleet"]
    sim.repo.sign("targets", sim.targets_key)
    sim.repo.submit("targets", online=[sim.online], now=sim.now)
    device = device_of(sim)
    assert device.refresh(Retained(sim.files()), now=sim.now).desired.bundle_version == "1.0.0"  # type: ignore[union-attr]
    # The online key lists a per-device document (an authorised bundle): refused.
    sim.desire("1.1.0", device="cam-1")
    error = refused(device, sim.files(), sim.now)
    assert error.reason == "unauthorised" and "'device/cam-1'" in str(error) and "not delegate" in str(error)


# -- property: whatever the broker does -----------------------------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "publish",
                "evil",
                "drop",
                "replay",
                "reorder",
                "corrupt",
                "refresh",
                "rotate",
                "revoke",
                "weak-root",
                "stolen",
            ]
        ),
        st.integers(0, 50),
    ),
    min_size=1,
    max_size=25,
)
STOLEN_SEQ = 10**6


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_whatever_the_broker_does_a_device_only_ever_runs_an_authorised_bundle(
    ops: list[tuple[str, int]],
) -> None:
    """Root 2 of 3; among the broker's actions the operators rotate root keys and revoke the
    online key, an attacker publishes a root signed by one root key only, and replays what the
    revoked online key can sign. In memory (Retained): many examples of many actions each."""
    import copy

    sim = TrustSim(n=3, k=2)
    sim.authorise("1.0.0", "1.1.0", "1.2.0")
    sim.desire("1.0.0")
    allowed = {digest(v) for v in ("1.0.0", "1.1.0", "1.2.0")}
    outsider = SigningKey.generate()  # holds no role
    history: list[dict[str, bytes]] = [sim.files()]
    broker = Retained(sim.files())
    device = device_of(sim)
    applied_seq = 0
    #: (a copy of the repository as the thief of the online key knows it, the key, the root
    #: version that revoked it)
    stolen: list[tuple[object, SigningKey, int]] = []

    def published() -> None:
        history.append(sim.files())
        broker.files.update(sim.files())

    for op, n in ops:
        if op == "publish":
            sim.desire(["1.0.0", "1.1.0", "1.2.0"][n % 3])
            published()
        elif op == "rotate":  # 2 of the 3 current root keys and 2 of the new set sign
            new = SigningKey.generate()
            keys = sim.root_keys
            sim.rotate_root(
                add=[new], remove=[keys[n % 3]], signers=[k for k in keys if k is not keys[n % 3]] + [new]
            )
            published()
        elif op == "revoke":  # the online key is revoked and replaced (root 2 of 3, targets)
            before, old = copy.deepcopy(sim.repo), sim.online
            fresh = SigningKey.generate()
            sim.repo.revoke(old.key_id, replacement=fresh.public, now=sim.now)
            for key in sim.root_keys[:2]:
                sim.repo.sign("root", key)
            sim.repo.submit("root", now=sim.now)
            sim.repo.sign("targets", sim.targets_key)
            sim.online = fresh
            sim.repo.submit("targets", online=[fresh], now=sim.now)
            stolen.append((before, old, sim.repo.root.signed.version))
            published()
        elif op == "weak-root":  # the next root, adding an attacker's targets key, signed by 1 of 2
            attacker = copy.deepcopy(sim.repo)
            attacker.rotate("targets", add=[outsider.public], now=sim.now)
            attacker.sign("root", sim.root_keys[n % 3])
            attacker.sign("targets", outsider)
            pending = attacker.pending["root"]
            broker.files[f"root/{pending.signed.version}"] = pending.to_bytes()
        elif op == "stolen":  # what the revoked online key signs, with version numbers far ahead
            if not stolen or device.root_version < stolen[0][2]:
                continue  # the key is not revoked yet for this device: it may still sign
            repo, key, _ = stolen[0]
            repo = copy.deepcopy(repo)
            for role in ("desired", "snapshot", "timestamp"):
                repo.roles[role].signed.version = 10**5  # type: ignore[attr-defined]
            state = sim.state(["1.0.0", "1.1.0", "1.2.0"][n % 3])
            from dataclasses import replace

            repo.set_desired([replace(state, seq=STOLEN_SEQ)], [key], now=sim.now)  # type: ignore[attr-defined]
            files = repo.files()  # type: ignore[attr-defined]
            broker.files.update({r: files[r] for r in ("desired", "snapshot", "timestamp")})
        elif op == "evil":  # an outsider's metadata
            view = TrustSimView(sim, outsider)
            role = ["timestamp", "snapshot", "desired", "targets"][n % 4]
            broker.files[role] = view._resign(role, {"version": 10 + n})
        elif op == "drop":
            broker.files.pop(["timestamp", "snapshot", "desired", "targets", "root/2"][n % 5], None)
        elif op == "replay":
            broker.files.update(history[n % len(history)])
        elif op == "reorder":
            role = ["timestamp", "snapshot", "desired"][n % 3]
            broker.files[role] = history[n % len(history)][role]
        elif op == "corrupt":
            role = ["timestamp", "snapshot", "desired", "targets"][n % 4]
            data = bytearray(broker.files.get(role, b"{}"))
            if data:
                data[n % len(data)] ^= 0x01
            broker.files[role] = bytes(data)
        try:
            report = device.refresh(broker, now=sim.now)
        except TrustMetadataError:
            continue
        finally:
            # The device's root is always one the root threshold signed (never the weak one).
            assert device.root == sim.repo.files()[f"root/{device.root_version}"]
        state = report.desired
        if state is not None:
            assert state.bundle_sha256 in allowed
            assert state.seq >= applied_seq  # never goes back
            assert state.seq != STOLEN_SEQ  # the revoked key's documents, never
            applied_seq = state.seq
