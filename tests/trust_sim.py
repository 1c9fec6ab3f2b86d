"""A fleet's TUF repository with its keys, in memory (python-tuf's RepositorySimulator is the model).

Real metadata, real Ed25519 signatures: :class:`TrustSim` drives
:class:`edgekit.fleet.trustrepo.TrustRepository` the way an operator and the fleet service do,
and :class:`Retained` is a broker's retained store as a device's metadata source.
"""

from __future__ import annotations

import hashlib
import time
from typing import Optional

from edgekit.desired import DesiredState, ShadowRequest, new_desired_state
from edgekit.fleet.trustrepo import Expiry, TrustRepository
from edgekit.keys import SigningKey


def digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


class Retained:
    """What the broker holds, per topic suffix (``root/<v>``, ``timestamp``, ...)."""

    def __init__(self, files: Optional[dict[str, bytes]] = None) -> None:
        self.files: dict[str, bytes] = dict(files or {})

    def root(self, version: int) -> Optional[bytes]:
        return self.files.get(f"root/{version}")

    def metadata(self, role: str) -> Optional[bytes]:
        return self.files.get(role)


class TrustSim:
    """Root keys (n, threshold k), one targets key, one online key; a clock the test moves."""

    def __init__(self, fleet: str = "shop", *, n: int = 3, k: int = 2, expiry: Expiry = Expiry()) -> None:
        self.now = time.time()
        self.fleet = fleet
        self.root_keys = [SigningKey.generate() for _ in range(n)]
        self.targets_key = SigningKey.generate()
        self.online = SigningKey.generate()
        self.seq = 0
        self.repo = TrustRepository.create(
            fleet,
            root_keys=[key.public for key in self.root_keys],
            threshold=k,
            targets_keys=[self.targets_key.public],
            online_keys=[self.online.public],
            expiry=expiry,
            now=self.now,
        )
        for key in self.root_keys[:k]:
            self.repo.sign("root", key)
        self.repo.submit("root", now=self.now)
        self.repo.sign("targets", self.targets_key)
        self.repo.submit("targets", online=[self.online], now=self.now)

    @property
    def root1(self) -> bytes:
        return self.repo.files()["root/1"]

    def files(self) -> dict[str, bytes]:
        return self.repo.files()

    def authorise(self, *names: str) -> None:
        for name in names:
            self.repo.authorise_bundle(digest(name), name="model", version=name, length=100, now=self.now)
        self.repo.sign("targets", self.targets_key)
        self.repo.submit("targets", online=[self.online], now=self.now)

    def state(self, name: str, device: Optional[str] = None) -> DesiredState:
        self.seq += 1
        return new_desired_state(
            self.fleet,
            bundle_sha256=digest(name),
            bundle_name="model",
            bundle_version=name,
            seq=self.seq,
            device=device,
            now=self.now,
        )

    def desire(self, name: str, device: Optional[str] = None, *, key: Optional[SigningKey] = None) -> None:
        self.repo.set_desired([self.state(name, device)], [key or self.online], now=self.now)

    def rotate_root(self, add: list[SigningKey], remove: list[SigningKey], signers: list[SigningKey]) -> None:
        self.repo.rotate("root", add=[k.public for k in add], remove=[k.key_id for k in remove], now=self.now)
        for key in signers:
            self.repo.sign("root", key)
        self.repo.submit("root", online=[self.online], now=self.now)
        self.root_keys = [k for k in self.root_keys if k not in remove] + add


class BundleRef:
    """What targets needs of a real bundle: its digest, name, version and manifest length."""

    def __init__(self, sha256: str, name: str, version: str, length: int) -> None:
        self.sha256, self.name, self.version, self.length = sha256, name, version, length


def authorise_bundles(sim: TrustSim, *bundles: BundleRef) -> None:
    for b in bundles:
        sim.repo.authorise_bundle(b.sha256, name=b.name, version=b.version, length=b.length, now=sim.now)
    sim.repo.sign("targets", sim.targets_key)
    sim.repo.submit("targets", online=[sim.online], now=sim.now)


def desire_bundle(
    sim: TrustSim,
    bundle: BundleRef,
    *,
    key: Optional[SigningKey] = None,
    shadow: Optional[ShadowRequest] = None,
) -> DesiredState:
    """The online desired role (signed by ``key``, else the online key) naming ``bundle``, with
    a shadow candidate when ``shadow`` is given."""
    sim.seq += 1
    state = new_desired_state(
        sim.fleet,
        bundle_sha256=bundle.sha256,
        bundle_name=bundle.name,
        bundle_version=bundle.version,
        seq=sim.seq,
        now=sim.now,
        shadow=shadow,
    )
    sim.repo.set_desired([state], [key or sim.online], now=sim.now)
    return state
