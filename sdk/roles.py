"""What a device trusts under the TUF key hierarchy (python-tuf), decided without any I/O.

A fleet's trust is one TUF repository (https://theupdateframework.github.io/specification/):

- **root** (offline, k of n keys): names the keys and thresholds of every top-level role, and
  signs its own successors (``N+1.root`` must verify under root N *and* under itself).
- **targets** (offline, may be a threshold): lists the bundles the fleet may run, as target
  paths ``bundles/<sha256 of manifest.json>``, and delegates ``fleet`` and ``device/*`` to
- **desired** (online, held by the fleet service, short expiry): its targets ``fleet`` and
  ``device/<id>`` carry the desired state (:class:`edgekit.desired.DesiredState`, as the
  target's ``custom["edgekit"]``, hashed like a file; a document with a shadow section as its
  exact text, since TUF's canonical JSON has no fractions), which may name only a bundle
  targets lists, and a shadow candidate the device tries only if targets lists it too;
- **snapshot** and **timestamp** (online, short expiry): pin the versions of targets and
  desired, and of snapshot, so a device notices rollback, mix-and-match and a freeze.

:class:`DeviceTrust` is handed bytes (its trusted root and last verified copies from its disk,
the newest copies from a :class:`MetadataSource` that holds what the transport delivered) and
either returns a :class:`TrustReport` or raises :class:`~edgekit.errors.TrustMetadataError`
with a ``reason``. The order and the checks are python-tuf's ``TrustedMetadataSet`` (the
specification's client workflow): roots one version at a time, then timestamp, snapshot,
targets, desired. Transport lives elsewhere (``edgekit.agent.daemon``: MQTT retained topics).

python-tuf needs Python 3.10 or later; on 3.9 :class:`DeviceTrust` raises ConfigError.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional, Protocol

from .desired import DesiredState
from .errors import ConfigError, DesiredStateError, SignatureError, TrustMetadataError
from .keys import PublicKey, SigningKey
from .schema import canonical_json, refuse
from .trust import TrustedKeys

if sys.version_info >= (3, 10):  # python-tuf needs 3.10; on 3.9 DeviceTrust says so
    from tuf.api import exceptions as tuf_errors
    from tuf.api.metadata import Root, Snapshot, Targets, Timestamp
    from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet
    from tuf.ngclient.config import EnvelopeType

__all__ = [
    "DESIRED_ROLE",
    "MAX_ROOT_ROTATIONS",
    "ROLES",
    "DeviceTrust",
    "MetadataSource",
    "TrustReport",
    "bundle_target_path",
    "desired_target_path",
    "sign_trust_upgrade",
    "verify_trust_upgrade",
]

DESIRED_ROLE = "desired"
#: Every role, in the order a device loads them.
ROLES = ("root", "timestamp", "snapshot", "targets", DESIRED_ROLE)
#: The most root versions a device walks in one refresh (python-tuf's default is 256).
MAX_ROOT_ROTATIONS = 256
#: Refuse any metadata document larger than this before parsing it.
MAX_METADATA_SIZE = 512 * 1024
_BUNDLE_PREFIX = "bundles/"


def bundle_target_path(sha256: str) -> str:
    """The target path under which targets authorises a bundle (by its manifest digest)."""
    return f"{_BUNDLE_PREFIX}{sha256}"


def desired_target_path(device: Optional[str] = None) -> str:
    """``fleet`` for the fleet's desired state, ``device/<id>`` for one device's."""
    return "fleet" if device is None else f"device/{device}"


class MetadataSource(Protocol):
    """The newest metadata the transport holds (bytes, unverified); None when it has none."""

    def root(self, version: int) -> Optional[bytes]: ...

    def metadata(self, role: str) -> Optional[bytes]: ...


@dataclass(frozen=True)
class TrustReport:
    """What a device trusts after a refresh."""

    root_version: int
    versions: Mapping[str, int]
    #: UNIX seconds at which each loaded role's metadata expires.
    expires: Mapping[str, int]
    #: Digests of the bundles targets authorises.
    authorised: frozenset[str]
    fleet_state: Optional[DesiredState] = None
    device_state: Optional[DesiredState] = None
    #: The newest timestamp the device holds has expired: someone may be withholding metadata.
    freeze_suspected: bool = False
    #: Roles whose verified copy changed in this refresh (root included when it rotated).
    changed: frozenset[str] = field(default_factory=frozenset)
    #: The keys of the desired role (the online keys), as the verified targets delegates it:
    #: what may sign the fleet's other online documents (a capture policy).
    desired_keys: tuple[PublicKey, ...] = ()

    @property
    def desired(self) -> Optional[DesiredState]:
        """The state this device should run: its own document, else its fleet's, by seq."""
        states = [s for s in (self.device_state, self.fleet_state) if s is not None]
        return max(states, key=lambda s: s.seq) if states else None


def _epoch(moment: datetime) -> int:
    return int(moment.timestamp())


def _why(exc: Exception) -> str:
    if isinstance(exc, tuf_errors.UnsignedMetadataError):
        return "refused"
    if isinstance(exc, tuf_errors.BadVersionNumberError):
        return "rollback"
    if isinstance(exc, tuf_errors.ExpiredMetadataError):
        return "expired"
    if isinstance(exc, tuf_errors.LengthOrHashMismatchError):
        return "mismatch"
    return "malformed"


_FIX = {
    "refused": "it lacks enough signatures from the keys the device trusts; sign it with the role's threshold "
    "(`edgekit trust sign`) and publish it again",
    "rollback": "it is older than what the device already trusts (a replay or a rollback); publish the current "
    "metadata (`edgekit trust publish`)",
    "expired": "it has expired; the fleet service must publish fresh metadata (or the device clock is wrong)",
    "mismatch": "it does not match the version or hash the snapshot pins (mix-and-match); publish the "
    "metadata of one snapshot together",
    "malformed": "it is not valid TUF metadata; publish it again with `edgekit trust publish`",
}


def _refused(role: str, exc: Exception) -> TrustMetadataError:
    reason = _why(exc)
    return refuse(
        TrustMetadataError, reason, f"the fleet's {role} metadata was refused: {exc}; {_FIX[reason]}"
    )


def _version_of(data: bytes) -> Optional[int]:
    """The version a metadata document claims (unverified), to tell a late one from a bad one."""
    try:
        version = json.loads(data)["signed"]["version"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def _delegated_keys(targets: Targets) -> tuple[PublicKey, ...]:
    """The Ed25519 keys the targets delegates the desired role to (under edgekit's key ids)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    delegations = targets.delegations
    if delegations is None or delegations.roles is None or DESIRED_ROLE not in delegations.roles:
        return ()
    found = []
    for keyid in delegations.roles[DESIRED_ROLE].keyids:
        key = (delegations.keys or {}).get(keyid)
        if key is None or key.keytype != "ed25519":
            continue
        try:
            public = PublicKey(Ed25519PublicKey.from_public_bytes(bytes.fromhex(key.keyval["public"])))
        except (KeyError, ValueError, TypeError):
            continue
        if public.key_id == keyid:
            found.append(public)
    return tuple(found)


def _size_ok(data: Optional[bytes]) -> Optional[bytes]:
    if data is None or len(data) > MAX_METADATA_SIZE:
        return None
    return bytes(data)


class DeviceTrust:
    """The verified TUF metadata of one device's fleet.

    ``root`` is the root the device trusts (the one provisioned, or the last it verified);
    ``local`` the last verified copy of each other role (``timestamp``, ``snapshot``,
    ``targets``, ``desired``), used, as in python-tuf's updater, for rollback protection and
    to avoid fetching what did not change. After a refresh, :attr:`root` and :attr:`local`
    are what to persist.
    """

    def __init__(
        self, fleet: str, device: str, root: bytes, local: Optional[Mapping[str, bytes]] = None
    ) -> None:
        if sys.version_info < (3, 10):  # pragma: no cover - checked by the 3.9 layout test
            raise ConfigError(
                "TUF trust needs Python 3.10 or later on the device (python-tuf); upgrade Python"
            )
        self.fleet = fleet
        self.device = device
        try:
            self._root_version = TrustedMetadataSet(bytes(root), EnvelopeType.METADATA).root.version
        except (tuf_errors.RepositoryError, ValueError, TypeError) as exc:
            raise refuse(
                TrustMetadataError,
                "malformed",
                f"the trusted root given to device {device} is not a valid self-signed TUF root ({exc}); "
                "provision it again with `edgekit trust export-root`",
            ) from None
        self.root = bytes(root)
        self.local: dict[str, bytes] = {k: bytes(v) for k, v in (local or {}).items() if k in ROLES[1:]}
        #: The report of the last refresh that loaded everything; None after one that stopped short.
        self._last: Optional[TrustReport] = None
        #: After a root rotation, until a refresh completes: the timestamp the transport held then.
        self._rotated: Optional[tuple[Optional[bytes]]] = None

    @property
    def root_version(self) -> int:
        return self._root_version

    def refresh(self, source: MetadataSource, now: Optional[float] = None) -> TrustReport:
        """Load what ``source`` holds on top of what is trusted; return what is trusted now.

        Raises TrustMetadataError (the reason: refused, rollback, expired, mismatch, malformed,
        unauthorised) when the transport holds metadata that must not be trusted; what was
        verified before the refused document (roots along a chain) is kept.
        """
        reference = (
            datetime.fromtimestamp(now, tz=timezone.utc) if now is not None else datetime.now(timezone.utc)
        )
        last = self._last
        if last is not None and source.root(self._root_version + 1) is None:
            remote = source.metadata(Timestamp.type)
            if remote is None or remote == self.local.get(Timestamp.type):
                # Nothing new since a complete refresh: no signature to check again.
                frozen = last.expires.get(Timestamp.type, 0) <= reference.timestamp()
                return TrustReport(**{**last.__dict__, "changed": frozenset(), "freeze_suspected": frozen})
        self._last = None
        trusted = TrustedMetadataSet(self.root, EnvelopeType.METADATA)
        trusted.reference_time = reference
        changed: set[str] = set()

        # 1. Roots, one version at a time: each signed by the previous root's threshold and its own.
        for _ in range(MAX_ROOT_ROTATIONS):
            data = _size_ok(source.root(trusted.root.version + 1))
            if data is None:
                break
            try:
                trusted.update_root(data)
            except (tuf_errors.RepositoryError, ValueError) as exc:
                raise _refused(f"root v{trusted.root.version + 1}", exc) from None
            self.root, self._root_version = data, trusted.root.version
            changed.add(Root.type)
            self._rotated = (source.metadata(Timestamp.type),)

        # 2. Timestamp: the local copy (ignored if the rotated keys no longer verify it: the
        # fast-forward recovery of the specification, 5.3.11), then the transport's.
        self._load_local(Timestamp.type, trusted.update_timestamp)
        remote = _size_ok(source.metadata(Timestamp.type))
        frozen = False
        if remote is not None and remote != self.local.get(Timestamp.type):
            try:
                trusted.update_timestamp(remote)
                self.local[Timestamp.type] = remote
                changed.add(Timestamp.type)
            except tuf_errors.EqualVersionNumberError:
                pass
            except tuf_errors.ExpiredMetadataError:
                self.local[Timestamp.type] = remote  # newer, but expired: kept for rollback protection
                frozen = True
            except (tuf_errors.RepositoryError, ValueError) as exc:
                raise _refused(Timestamp.type, exc) from None
        if Timestamp.type not in trusted:
            return self._report(trusted, changed, frozen)
        if trusted.timestamp.is_expired(reference):
            return self._report(trusted, changed, True)

        # 3. Snapshot, targets and desired: the local copy when it is the one pinned, else the transport's.
        self._load(
            trusted, source, Snapshot.type, lambda d, t: trusted.update_snapshot(d, trusted=t), changed
        )
        self._load(trusted, source, Targets.type, lambda d, t: trusted.update_targets(d), changed)
        if f"{DESIRED_ROLE}.json" in trusted.snapshot.meta:
            self._load(
                trusted,
                source,
                DESIRED_ROLE,
                lambda d, t: trusted.update_delegated_targets(d, DESIRED_ROLE, Targets.type),
                changed,
            )
        self._last = self._report(trusted, changed, False)
        self._rotated = None
        return self._last

    def _load_local(self, role: str, update: Callable[[bytes], object]) -> None:
        data = self.local.get(role)
        if data is None:
            return
        # python-tuf: a local copy that does not load as final is only a floor, or nothing.
        with contextlib.suppress(tuf_errors.RepositoryError, ValueError):
            update(data)

    def _load(
        self,
        trusted: TrustedMetadataSet,
        source: MetadataSource,
        role: str,
        update: Callable[[bytes, bool], object],
        changed: set[str],
    ) -> None:
        local = self.local.get(role)
        pinned = self._pinned(trusted, role)
        # A stale targets or desired copy is not needed (the snapshot's versions only grow); a
        # stale snapshot is: it is what a new snapshot's versions are checked against.
        if local is not None and (role == Snapshot.type or _version_of(local) == pinned):
            try:
                update(local, True)
                return
            except (tuf_errors.RepositoryError, ValueError):
                pass  # not valid as the pinned version: take the transport's
        remote = _size_ok(source.metadata(role))
        if (
            remote is not None
            and remote == local
            and self._rotated is not None
            and source.metadata(Timestamp.type) == self._rotated[0]
        ):
            # A new root no longer verifies the copy held, and the transport holds nothing newer
            # yet, nor a newer timestamp: the documents re-signed for that root (a targets key
            # rotation) are published after it and on their way. Once a newer timestamp
            # arrives without them, the old copy is refused.
            raise refuse(
                TrustMetadataError,
                "incomplete",
                f"the fleet's {role} metadata is re-signed under root v{trusted.root.version}; waiting for it",
            )
        if remote is None or _version_of(remote) != pinned:
            # Retained messages arrive in any order: the snapshot may name a version the
            # transport does not hold yet. Not an attack by itself: a device waits (and a
            # withheld document shows as a freeze once the timestamp expires).
            raise refuse(
                TrustMetadataError,
                "incomplete",
                f"the fleet's {role} metadata v{pinned} is not on the broker yet; waiting for it",
            )
        try:
            update(remote, False)
        except (tuf_errors.RepositoryError, ValueError) as exc:
            raise _refused(role, exc) from None
        self.local[role] = remote
        changed.add(role)

    @staticmethod
    def _pinned(trusted: TrustedMetadataSet, role: str) -> int:
        if role == Snapshot.type:
            return trusted.timestamp.snapshot_meta.version
        meta = trusted.snapshot.meta.get(f"{role}.json")
        if meta is None:
            raise refuse(
                TrustMetadataError,
                "malformed",
                f"the fleet's snapshot does not list {role}; publish it again",
            )
        return meta.version

    def _report(self, trusted: TrustedMetadataSet, changed: set[str], frozen: bool) -> TrustReport:
        versions = {role: trusted[role].version for role in ROLES if role in trusted}
        expires = {role: _epoch(trusted[role].expires) for role in ROLES if role in trusted}
        authorised: frozenset[str] = frozenset()
        fleet_state = device_state = None
        if Targets.type in trusted:
            targets = trusted.targets
            authorised = frozenset(
                info.hashes.get("sha256", "")
                for path, info in targets.targets.items()
                if path.startswith(_BUNDLE_PREFIX)
                and path[len(_BUNDLE_PREFIX) :] == info.hashes.get("sha256")
            )
            if DESIRED_ROLE in trusted:
                delegated = trusted[DESIRED_ROLE]
                assert isinstance(delegated, Targets)
                role = (
                    targets.delegations.roles.get(DESIRED_ROLE)
                    if targets.delegations and targets.delegations.roles
                    else None
                )
                fleet_state = self._desired(delegated, role, None, authorised)
                device_state = self._desired(delegated, role, self.device, authorised)
        return TrustReport(
            desired_keys=_delegated_keys(trusted.targets) if Targets.type in trusted else (),
            root_version=trusted.root.version,
            versions=versions,
            expires=expires,
            authorised=authorised,
            fleet_state=fleet_state,
            device_state=device_state,
            freeze_suspected=frozen,
            changed=frozenset(changed),
        )

    def _desired(
        self, delegated: Targets, role: object, device: Optional[str], authorised: frozenset[str]
    ) -> Optional[DesiredState]:
        path = desired_target_path(device)
        target = delegated.targets.get(path)
        if target is None:
            return None
        if role is None or not role.is_delegated_path(path):  # type: ignore[attr-defined]
            raise refuse(
                TrustMetadataError,
                "unauthorised",
                f"the desired role lists {path!r}, which targets does not delegate to it; refusing it",
            )
        doc = target.custom.get("edgekit") if isinstance(target.custom, dict) else None
        try:
            # A document with a shadow section comes as its exact text (TUF's canonical JSON has
            # no numbers with fractions, and the shadow sample rate is one); others as JSON.
            data = doc.encode("ascii") if isinstance(doc, str) else canonical_json(doc)
            target.verify_length_and_hashes(data)
            state = DesiredState.from_json(data)
        except (tuf_errors.LengthOrHashMismatchError, DesiredStateError, TypeError, ValueError) as exc:
            raise refuse(
                TrustMetadataError,
                "malformed",
                f"the desired state in the fleet's desired metadata ({path}) is not valid: {exc}",
            ) from None
        if state.fleet != self.fleet or state.device != device:
            raise refuse(
                TrustMetadataError,
                "malformed",
                f"the desired state at {path} is for {state.scope}, not this device ({self.device} of {self.fleet})",
            )
        if state.bundle_sha256 not in authorised:
            raise refuse(
                TrustMetadataError,
                "unauthorised",
                f"the desired state (seq {state.seq}) names bundle {state.bundle_name}@{state.bundle_version} "
                f"({state.bundle_sha256[:12]}), which the fleet's targets role does not authorise; "
                "authorise it with `edgekit trust add-bundle` (signed by the targets key)",
            )
        return state


# -- the one-time move from a single signing key to TUF -----------------------------------------

UPGRADE_SCHEMA = "edgekit.trust-upgrade"
UPGRADE_SCHEMA_VERSION = 1
_UPGRADE_KEYS = {"schema", "schema_version", "fleet", "root", "signer", "signature"}


def _upgrade_payload(fleet: str, root: bytes) -> bytes:
    return UPGRADE_SCHEMA.encode() + b"\n" + fleet.encode() + b"\n" + root


def sign_trust_upgrade(fleet: str, root: bytes, key: SigningKey) -> bytes:
    """The one-time message that moves devices still on single-key trust to the fleet's TUF root,
    signed by the key they trust today (published retained on the fleet's ``trust/upgrade``)."""
    return json.dumps(
        {
            "schema": UPGRADE_SCHEMA,
            "schema_version": UPGRADE_SCHEMA_VERSION,
            "fleet": fleet,
            "root": base64.b64encode(root).decode("ascii"),
            "signer": key.key_id,
            "signature": base64.b64encode(key.sign(_upgrade_payload(fleet, root))).decode("ascii"),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode("ascii")


def verify_trust_upgrade(data: bytes, trusted: TrustedKeys, fleet: str) -> bytes:
    """The TUF root a trust upgrade carries, once its signature by a key in ``trusted`` and its
    fleet are checked; TrustMetadataError otherwise."""

    def bad(reason: str, message: str) -> TrustMetadataError:
        return refuse(TrustMetadataError, reason, f"the trust upgrade {message}")

    try:
        doc = json.loads(bytes(data)) if len(data) <= 2 * MAX_METADATA_SIZE else None
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict) or doc.get("schema") != UPGRADE_SCHEMA or set(doc) != _UPGRADE_KEYS:
        raise bad("malformed", "is not an edgekit trust upgrade; publish it with `edgekit trust upgrade`")
    if doc["schema_version"] != UPGRADE_SCHEMA_VERSION or doc["fleet"] != fleet:
        raise bad(
            "malformed", f"is for fleet {doc['fleet']!r} (version {doc['schema_version']!r}), not {fleet!r}"
        )
    try:
        root = base64.b64decode(str(doc["root"]), validate=True)
        signature = base64.b64decode(str(doc["signature"]), validate=True)
    except (binascii.Error, ValueError):
        raise bad("malformed", "is not base64 where it must be") from None
    signer = doc["signer"] if isinstance(doc["signer"], str) else None
    try:
        trusted.verify(_upgrade_payload(fleet, root), signature, signer, "the trust upgrade")
    except SignatureError as exc:
        raise bad("refused", f"is not signed by a key this device trusts: {exc}") from None
    return root
