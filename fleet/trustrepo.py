"""The workstation's side of a fleet's TUF repository: make, sign, rotate and revoke metadata.

One fleet, one repository (see :mod:`edgekit.roles` for the roles and what a device checks).
:class:`TrustRepository` holds the metadata in memory (like python-tuf's RepositorySimulator)
and is what the CLI and the tests drive; :func:`load_repository` / :meth:`TrustRepository.save`
keep it in a directory (``$EDGEKIT_HOME/trust/<fleet>/``)::

    1.root.json 2.root.json ...     every root, in order (devices walk the chain)
    targets.json desired.json snapshot.json timestamp.json
    pending/<role>.json             a change waiting for signatures (`trust sign`, `trust submit`)

Offline roles (root, targets) are changed by writing a pending document that collects
signatures, then submitted once it meets its thresholds: a new root needs the threshold of the
root before it *and* its own. Online roles (desired, snapshot, timestamp) are signed on the spot
with the fleet service's online key.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from edgekit.atomic import atomic_write
from edgekit.desired import DesiredState
from edgekit.errors import EdgekitError, TrustMetadataError
from edgekit.keys import PublicKey, SigningKey
from edgekit.roles import DESIRED_ROLE, bundle_target_path, desired_target_path
from edgekit.schema import refuse
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

log = logging.getLogger(__name__)

__all__ = [
    "Expiry",
    "TrustRepository",
    "check_authorised",
    "current_roots",
    "desired_expiries",
    "has_repository",
    "keep_fresh",
    "load_repository",
    "publish_desired",
    "repository_lock",
    "require_authorised",
    "role_summary",
    "tuf_key",
]

ONLINE_TOP = (Timestamp.type, Snapshot.type)
OFFLINE = (Root.type, Targets.type)
_SERIALIZER = JSONSerializer(compact=True)


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata stays valid once signed (seconds)."""

    root: int = 365 * 86400
    targets: int = 365 * 86400
    desired: int = 7 * 86400
    snapshot: int = 7 * 86400
    timestamp: int = 86400

    def of(self, role: str) -> int:
        return int(getattr(self, role))


def tuf_key(key: PublicKey) -> SSlibKey:
    """The TUF form of an edgekit public key, under edgekit's own key id (`edgekit keys list`)."""
    return SSlibKey.from_crypto(key._key, keyid=key.key_id)


def _signer(key: SigningKey) -> CryptoSigner:
    return CryptoSigner(key.cryptography_key(), tuf_key(key.public))


def _expires(now: float, seconds: int) -> datetime:
    return datetime.fromtimestamp(int(now) + seconds, tz=timezone.utc)


def _bytes(md: Metadata[Any]) -> bytes:
    return md.to_bytes(_SERIALIZER)


def _seq_of(target: TargetFile) -> int:
    doc = target.unrecognized_fields.get("custom", {}).get("edgekit", {})
    if isinstance(doc, str):  # a document with a shadow section, as its text (set_desired)
        doc = json.loads(doc)
    seq = doc.get("seq", 0) if isinstance(doc, dict) else 0
    return seq if isinstance(seq, int) else 0


def _short(keyid: str) -> str:
    return keyid[:16]


def _delegated_keys(targets: Targets) -> tuple[list[str], int]:
    assert targets.delegations is not None and targets.delegations.roles is not None
    delegated = targets.delegations.roles[DESIRED_ROLE]
    return list(delegated.keyids), delegated.threshold


def _verifies(delegator: Root | Targets, role: str, md: Metadata[Any]) -> bool:
    return bool(delegator.get_verification_result(role, md.signed_bytes, md.signatures).verified)


class TrustRepository:
    """A fleet's metadata: the root chain, targets, desired, snapshot and timestamp."""

    def __init__(
        self,
        fleet: str,
        roots: Sequence[Metadata[Root]],
        roles: Mapping[str, Metadata[Any]],
        pending: Optional[Mapping[str, Metadata[Any]]] = None,
        expiry: Expiry = Expiry(),
    ) -> None:
        self.fleet = fleet
        self.roots = list(roots)
        self.roles: dict[str, Metadata[Any]] = dict(roles)
        self.pending: dict[str, Metadata[Any]] = dict(pending or {})
        self.expiry = expiry
        #: The name of the online key (``edgekit keys``) that `fleet serve` re-signs with.
        self.online_key: Optional[str] = None

    # -- creation ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        fleet: str,
        *,
        root_keys: Sequence[PublicKey],
        threshold: int,
        targets_keys: Sequence[PublicKey],
        online_keys: Sequence[PublicKey],
        targets_threshold: int = 1,
        expiry: Expiry = Expiry(),
        now: float,
    ) -> TrustRepository:
        """A new repository whose root v1 is pending (it needs ``threshold`` root signatures)."""
        if not 1 <= threshold <= len(root_keys):
            raise refuse(
                TrustMetadataError,
                "threshold",
                f"a threshold of {threshold} cannot be met by {len(root_keys)} root keys; "
                f"use a threshold from 1 to {len(root_keys)}",
            )
        if len({k.key_id for k in root_keys}) != len(root_keys):
            raise refuse(
                TrustMetadataError, "threshold", "the same root key is given twice; give distinct keys"
            )
        root = Root(expires=_expires(now, expiry.root), consistent_snapshot=False)
        for key in root_keys:
            root.add_key(tuf_key(key), Root.type)
        root.roles[Root.type].threshold = threshold
        for key in targets_keys:
            root.add_key(tuf_key(key), Targets.type)
        root.roles[Targets.type].threshold = targets_threshold
        for role in ONLINE_TOP:
            for key in online_keys:
                root.add_key(tuf_key(key), role)
        targets = Targets(expires=_expires(now, expiry.targets))
        targets.delegations = Delegations(
            keys={k.key_id: tuf_key(k) for k in online_keys},
            roles={
                DESIRED_ROLE: DelegatedRole(
                    DESIRED_ROLE,
                    [k.key_id for k in online_keys],
                    1,
                    True,
                    paths=[desired_target_path(), desired_target_path("*")],
                )
            },
        )
        desired = Targets(expires=_expires(now, expiry.desired))
        snapshot = Snapshot(expires=_expires(now, expiry.snapshot))
        timestamp = Timestamp(expires=_expires(now, expiry.timestamp))
        repo = cls(
            fleet,
            [],
            {
                Targets.type: Metadata(targets),
                DESIRED_ROLE: Metadata(desired),
                Snapshot.type: Metadata(snapshot),
                Timestamp.type: Metadata(timestamp),
            },
            pending={Root.type: Metadata(root), Targets.type: Metadata(targets)},
            expiry=expiry,
        )
        return repo

    # -- reading ----------------------------------------------------------------------------

    @property
    def root(self) -> Metadata[Root]:
        if not self.roots:
            raise refuse(
                TrustMetadataError,
                "threshold",
                f"fleet {self.fleet} has no signed root yet; sign it with `edgekit trust sign` "
                "and `edgekit trust submit root`",
            )
        return self.roots[-1]

    def keys_of(self, role: str) -> tuple[list[str], int]:
        """Key ids and threshold of a role (``desired`` read from the targets delegation, the
        pending targets if there is one: what the online roles are signed against)."""
        if role == DESIRED_ROLE:
            return _delegated_keys(self._targets_signed())
        root = self.pending[Root.type].signed if not self.roots else self.root.signed
        found = root.roles[role]
        return list(found.keyids), found.threshold

    def current_keys(self, role: str) -> Optional[tuple[list[str], int]]:
        """Key ids and threshold of a role as devices know it now (the last submitted root and
        targets); None before anything was submitted."""
        if role == DESIRED_ROLE:
            md = self.roles.get(Targets.type)
            return _delegated_keys(md.signed) if md is not None and md.signatures else None
        if not self.roots:
            return None
        found = self.root.signed.roles[role]
        return list(found.keyids), found.threshold

    def pending_keys(self, role: str) -> Optional[tuple[list[str], int]]:
        """Key ids and threshold of a role in the change waiting for signatures (None: no
        pending document changes that role's keys)."""
        if role == DESIRED_ROLE:
            md = self.pending.get(Targets.type)
            found = _delegated_keys(md.signed) if md is not None else None
        else:
            root_md = self.pending.get(Root.type)
            found = (
                (list(root_md.signed.roles[role].keyids), root_md.signed.roles[role].threshold)
                if root_md is not None
                else None
            )
        return None if found is None or found == self.current_keys(role) else found

    def _targets_signed(self) -> Targets:
        md = self.pending.get(Targets.type) or self.roles[Targets.type]
        signed = md.signed
        assert isinstance(signed, Targets)
        return signed

    def authorised(self) -> set[str]:
        """Digests of the bundles the current (submitted) targets lists."""
        targets = self.roles[Targets.type].signed
        return {info.hashes.get("sha256", "") for info in targets.targets.values()}

    def last_seq(self) -> int:
        """The highest seq of the desired states in the desired role (0: none)."""
        return max([0, *(_seq_of(t) for t in self.roles[DESIRED_ROLE].signed.targets.values())])

    def files(self) -> dict[str, bytes]:
        """What to publish: ``root/<v>`` for every root, and each role's current metadata."""
        out = {f"root/{md.signed.version}": _bytes(md) for md in self.roots}
        for role, md in self.roles.items():
            if md.signatures:
                out[role] = _bytes(md)
        return out

    # -- offline changes: pending documents, signatures, submit -------------------------------

    def sign(self, role: str, key: SigningKey) -> None:
        """Add ``key``'s signature to the pending ``role`` document."""
        md = self.pending.get(role)
        if md is None:
            raise refuse(
                TrustMetadataError,
                "threshold",
                f"nothing of role {role} waits for signatures in fleet {self.fleet}; "
                f"start a change with `edgekit trust rotate {role}` first",
            )
        if not self._may_sign(role, key.key_id):
            raise refuse(
                TrustMetadataError,
                "threshold",
                f"key {_short(key.key_id)} is not a {role} key of fleet {self.fleet} (old or new); "
                "sign with one of the keys `edgekit trust status` lists",
            )
        md.sign(_signer(key), append=True)

    def _may_sign(self, role: str, keyid: str) -> bool:
        md = self.pending[role]
        if role == Root.type:
            ids = set(md.signed.roles[Root.type].keyids)
            if self.roots:
                ids |= set(self.root.signed.roles[Root.type].keyids)
            return keyid in ids
        # Targets: a key of the current root, or of the pending one (a targets key rotation:
        # the new key signs the re-signed targets before the new root is submitted).
        ids = set(self.keys_of(Targets.type)[0])
        if Root.type in self.pending:
            ids |= set(self.pending[Root.type].signed.roles[Targets.type].keyids)
        return keyid in ids

    def add_signature(self, role: str, signed_copy: bytes) -> int:
        """Merge the signatures of a copy of the pending document (signed elsewhere); returns
        how many were new. The copy must be the same document, byte for byte once signed."""
        md = self.pending.get(role)
        if md is None:
            raise refuse(TrustMetadataError, "threshold", f"nothing of role {role} waits for signatures")
        try:
            other = Metadata.from_bytes(signed_copy)
        except DeserializationError as exc:
            raise refuse(
                TrustMetadataError, "malformed", f"the signed copy is not TUF metadata ({exc})"
            ) from None
        if other.signed_bytes != md.signed_bytes:
            raise refuse(
                TrustMetadataError,
                "mismatch",
                f"the signed copy of {role} is not the pending document (it changed since it was handed out); "
                "sign the current one (`edgekit trust status` names it)",
            )
        new = 0
        for keyid, signature in other.signatures.items():
            if keyid not in md.signatures and self._may_sign(role, keyid):
                md.signatures[keyid] = signature
                new += 1
        return new

    def _check(self, delegator: Root | Targets, role: str, md: Metadata[Any], what: str) -> None:
        result = delegator.get_verification_result(role, md.signed_bytes, md.signatures)
        if not result.verified:
            raise refuse(
                TrustMetadataError,
                "threshold",
                f"{what} has {len(result.signed)} valid signature(s) of the {result.threshold} needed "
                f"from the {role} keys; sign it with more keys (`edgekit trust sign`)",
            )

    def submit(self, role: str, *, online: Sequence[SigningKey] = (), now: float) -> None:
        """Commit the pending ``role`` document once its thresholds are met; re-signs the online
        roles that depend on it with ``online``."""
        md = self.pending.get(role)
        if md is None:
            raise refuse(TrustMetadataError, "threshold", f"nothing of role {role} waits to be submitted")
        if role == Root.type:
            if self.roots:
                self._check(self.root.signed, Root.type, md, f"root v{md.signed.version} (by the old root)")
            self._check(md.signed, Root.type, md, f"root v{md.signed.version} (by itself)")
            targets = self._targets_for(md)
            self.roots.append(md)
            if targets is not None:  # the targets re-signed by the new targets key goes with it
                self.roles[Targets.type] = targets
                del self.pending[Targets.type]
        else:
            if Root.type in self.pending and not _verifies(self.root.signed, Targets.type, md):
                new_root = self.pending[Root.type].signed
                if _verifies(new_root, Targets.type, md):
                    raise refuse(
                        TrustMetadataError,
                        "threshold",
                        f"the pending targets is signed for the targets keys of the pending root "
                        f"v{new_root.version}; submit that root first (`edgekit trust submit root "
                        f"--fleet {self.fleet}`), which applies this targets with it",
                    )
            self._check(self.root.signed, Targets.type, md, "targets")
            self.roles[Targets.type] = md
        del self.pending[role]
        if online and Targets.type not in self.pending:
            self._publish_online(online, now=now)

    def _targets_for(self, root_md: Metadata[Root]) -> Optional[Metadata[Targets]]:
        """Before a new root is applied: if it changes the targets keys so that the current
        targets no longer verifies, the pending (re-signed) targets that does, to apply with it;
        TrustMetadataError when there is none (devices would refuse the fleet's targets)."""
        current = self.roles.get(Targets.type)
        if not self.roots or current is None or not current.signatures:
            return None  # the first root: targets is submitted after it
        new_root = root_md.signed
        if _verifies(new_root, Targets.type, current):
            return None
        pending = self.pending.get(Targets.type)
        if pending is not None and _verifies(new_root, Targets.type, pending):
            return pending
        keys, threshold = list(new_root.roles[Targets.type].keyids), new_root.roles[Targets.type].threshold
        raise refuse(
            TrustMetadataError,
            "threshold",
            f"root v{new_root.version} changes the targets keys, and the pending targets is not signed by "
            f"{threshold} of the new ones ({', '.join(_short(k) for k in keys)}): devices would refuse the "
            f"fleet's targets. Sign {Targets.type} with the new targets key first (`edgekit trust sign "
            f"pending/targets.json --key NEW`), then submit root again",
        )

    def _new_root(self, now: float) -> Root:
        base = self.pending.get(Root.type)
        if base is not None:
            return base.signed  # type: ignore[no-any-return]
        root = Root.from_dict(copy.deepcopy(self.root.signed.to_dict()))
        root.version += 1
        root.expires = _expires(now, self.expiry.root)
        self.pending[Root.type] = Metadata(root)
        return root

    def _new_targets(self, now: float) -> Targets:
        base = self.pending.get(Targets.type)
        if base is not None:
            return base.signed  # type: ignore[no-any-return]
        targets = Targets.from_dict(copy.deepcopy(self.roles[Targets.type].signed.to_dict()))
        targets.version += 1
        targets.expires = _expires(now, self.expiry.targets)
        self.pending[Targets.type] = Metadata(targets)
        return targets

    def rotate(
        self,
        role: str,
        *,
        add: Iterable[PublicKey] = (),
        remove: Iterable[str] = (),
        threshold: Optional[int] = None,
        now: float,
    ) -> str:
        """Start a key change of ``role``; returns the pending role that needs signatures
        (``root`` for root, targets, snapshot, timestamp; ``targets`` for desired)."""
        add, remove = list(add), list(remove)
        if role == DESIRED_ROLE:
            targets = self._new_targets(now)
            assert targets.delegations is not None and targets.delegations.roles is not None
            for key in add:
                targets.add_key(tuf_key(key), DESIRED_ROLE)
            for keyid in remove:
                self._revoke_in(lambda k: targets.revoke_key(k, DESIRED_ROLE), keyid, role)
            delegated = targets.delegations.roles[DESIRED_ROLE]
            if threshold is not None:
                delegated.threshold = threshold
            self._check_threshold(role, len(delegated.keyids), delegated.threshold)
            return Targets.type
        if role not in (Root.type, Targets.type, *ONLINE_TOP):
            raise refuse(
                TrustMetadataError,
                "malformed",
                f"unknown role {role!r}; use root, targets, desired, snapshot or timestamp",
            )
        root = self._new_root(now)
        for key in add:
            root.add_key(tuf_key(key), role)
        for keyid in remove:
            self._revoke_in(lambda k: root.revoke_key(k, role), keyid, role)
        if threshold is not None:
            root.roles[role].threshold = threshold
        self._check_threshold(role, len(root.roles[role].keyids), root.roles[role].threshold)
        if role == Targets.type:
            # Devices check targets against the new root's targets keys: a re-signed targets
            # (a new version) waits for the new key's signature and is applied with the root.
            self._new_targets(now)
        return Root.type

    @staticmethod
    def _revoke_in(revoke: Any, keyid: str, role: str) -> None:
        try:
            revoke(keyid)
        except ValueError:
            raise refuse(
                TrustMetadataError, "malformed", f"key {_short(keyid)} is not a {role} key; nothing to remove"
            ) from None

    @staticmethod
    def _check_threshold(role: str, keys: int, threshold: int) -> None:
        if not 1 <= threshold <= keys:
            raise refuse(
                TrustMetadataError,
                "threshold",
                f"role {role} would have {keys} key(s) and a threshold of {threshold}; "
                "keep at least as many keys as the threshold (add one with --add)",
            )

    def revoke(self, keyid: str, *, replacement: Optional[PublicKey] = None, now: float) -> list[str]:
        """Remove ``keyid`` from every role that has it (adding ``replacement`` there first);
        returns the pending roles that need signatures."""
        needs = []
        for role in (Root.type, Targets.type, *ONLINE_TOP, DESIRED_ROLE):
            ids, _ = self.keys_of(role)
            if keyid in ids:
                needs.append(
                    self.rotate(role, add=[replacement] if replacement else [], remove=[keyid], now=now)
                )
                if role == Targets.type:
                    needs.append(Targets.type)  # re-signed by the replacement (rotate)
        if not needs:
            raise refuse(
                TrustMetadataError,
                "malformed",
                f"key {_short(keyid)} is in no role of fleet {self.fleet}; `edgekit trust status` lists them",
            )
        return sorted(set(needs))

    def authorise_bundle(self, sha256: str, *, name: str, version: str, length: int, now: float) -> None:
        """List a bundle in (pending) targets: the desired role may then name it."""
        targets = self._new_targets(now)
        path = bundle_target_path(sha256)
        targets.targets[path] = TargetFile(
            length,
            {"sha256": sha256},
            path,
            unrecognized_fields={"custom": {"name": name, "version": version}},
        )

    # -- online roles -------------------------------------------------------------------------

    def set_desired(
        self, states: Iterable[DesiredState], online: Sequence[SigningKey], *, now: float
    ) -> None:
        """Put desired states in the desired role and re-sign desired, snapshot and timestamp."""
        desired = Targets.from_dict(copy.deepcopy(self.roles[DESIRED_ROLE].signed.to_dict()))
        for state in states:
            if state.fleet != self.fleet:
                raise refuse(
                    TrustMetadataError,
                    "malformed",
                    f"a desired state of fleet {state.fleet} given to {self.fleet}",
                )
            path = desired_target_path(state.device)
            doc = state.to_json()
            target = TargetFile.from_data(path, doc, ["sha256"])
            # The document as JSON; with a shadow section, as its exact text: its sample rate is a
            # number with a fraction, which TUF's canonical JSON (securesystemslib) cannot sign.
            carried = doc.decode("ascii") if state.shadow is not None else json.loads(doc)
            target.unrecognized_fields["custom"] = {"edgekit": carried}
            desired.targets[path] = target
        fleet_wide = desired.targets.get(desired_target_path())
        if fleet_wide is not None:
            # A device's own document older than the fleet's is never applied again: drop it, so
            # the role (which every device of the fleet receives) does not grow with old canaries.
            floor = _seq_of(fleet_wide)
            for path in [p for p, t in desired.targets.items() if p != desired_target_path()]:
                if _seq_of(desired.targets[path]) < floor:
                    del desired.targets[path]
        desired.version += 1
        desired.expires = _expires(now, self.expiry.desired)
        self.roles[DESIRED_ROLE] = self._signed(desired, online, DESIRED_ROLE)
        self._publish_online(online, now=now, desired=False)

    def resign_online(self, online: Sequence[SigningKey], *, now: float) -> list[str]:
        """Re-sign the online roles that expire within half their lifetime (desired and snapshot
        together, else the timestamp alone); returns the roles re-signed."""

        def due(role: str) -> bool:
            md = self.roles[role]
            left = md.signed.expires.timestamp() - now
            return not md.signatures or left < self.expiry.of(role) / 2

        if due(DESIRED_ROLE) or due(Snapshot.type):
            self._publish_online(online, now=now)
            return [DESIRED_ROLE, Snapshot.type, Timestamp.type]
        if due(Timestamp.type):
            self._timestamp(online, now)
            return [Timestamp.type]
        return []

    def refresh_timestamp(self, online: Sequence[SigningKey], *, now: float) -> None:
        """A new timestamp (and nothing else): what the service does before the old one expires."""
        self._timestamp(online, now)

    def _signed(self, signed: Any, online: Sequence[SigningKey], role: str) -> Metadata[Any]:
        md: Metadata[Any] = Metadata(signed)
        ids, _ = self.keys_of(role)
        for key in online:
            if key.key_id in ids:
                md.sign(_signer(key), append=True)
        delegator: Root | Targets = self._targets_signed() if role == DESIRED_ROLE else self.root.signed
        self._check(delegator, role, md, role)
        return md

    def _publish_online(self, online: Sequence[SigningKey], *, now: float, desired: bool = True) -> None:
        if desired and self.roles[DESIRED_ROLE].signatures == {}:
            d = self.roles[DESIRED_ROLE].signed
            d.expires = _expires(now, self.expiry.desired)
            self.roles[DESIRED_ROLE] = self._signed(d, online, DESIRED_ROLE)
        elif desired:
            # A new targets may have changed the desired role's keys: re-sign it under them.
            d = Targets.from_dict(copy.deepcopy(self.roles[DESIRED_ROLE].signed.to_dict()))
            d.version += 1
            d.expires = _expires(now, self.expiry.desired)
            self.roles[DESIRED_ROLE] = self._signed(d, online, DESIRED_ROLE)
        old = self.roles[Snapshot.type].signed
        snapshot = Snapshot(
            version=old.version + (1 if self.roles[Snapshot.type].signatures else 0),
            expires=_expires(now, self.expiry.snapshot),
            meta={
                f"{Targets.type}.json": MetaFile(self.roles[Targets.type].signed.version),
                f"{DESIRED_ROLE}.json": MetaFile(self.roles[DESIRED_ROLE].signed.version),
            },
        )
        self.roles[Snapshot.type] = self._signed(snapshot, online, Snapshot.type)
        self._timestamp(online, now)

    def _timestamp(self, online: Sequence[SigningKey], now: float) -> None:
        old = self.roles[Timestamp.type]
        timestamp = Timestamp(
            version=old.signed.version + (1 if old.signatures else 0),
            expires=_expires(now, self.expiry.timestamp),
            snapshot_meta=MetaFile(self.roles[Snapshot.type].signed.version),
        )
        self.roles[Timestamp.type] = self._signed(timestamp, online, Timestamp.type)

    # -- files ------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        base = Path(directory)
        (base / "pending").mkdir(parents=True, exist_ok=True)
        for md in self.roots:
            atomic_write(base / f"{md.signed.version}.root.json", _bytes(md))
        for role, md in self.roles.items():
            atomic_write(base / f"{role}.json", _bytes(md))
        for stale in (base / "pending").glob("*.json"):
            if stale.stem not in self.pending:
                stale.unlink()
        for role, md in self.pending.items():
            atomic_write(base / "pending" / f"{role}.json", _bytes(md))
        atomic_write(
            base / "fleet.json", json.dumps({"fleet": self.fleet, "online_key": self.online_key}).encode()
        )


def load_repository(directory: str | Path, expiry: Expiry = Expiry()) -> TrustRepository:
    """The repository kept in ``directory`` (see the module's docstring)."""
    base = Path(directory)
    try:
        info = json.loads((base / "fleet.json").read_bytes())
        fleet, online_key = info["fleet"], info.get("online_key")
    except FileNotFoundError:
        raise refuse(
            TrustMetadataError,
            "malformed",
            f"no trust repository at {base}; create one with `edgekit trust init --fleet F --root-keys ...`",
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise refuse(TrustMetadataError, "malformed", f"{base}/fleet.json is damaged ({exc})") from None

    def read(path: Path) -> Metadata[Any]:
        try:
            return Metadata.from_bytes(path.read_bytes())
        except (OSError, DeserializationError) as exc:
            raise refuse(TrustMetadataError, "malformed", f"cannot read {path}: {exc}") from None

    roots = sorted((read(p) for p in base.glob("*.root.json")), key=lambda md: md.signed.version)
    roles = {
        role: read(base / f"{role}.json")
        for role in (Targets.type, DESIRED_ROLE, Snapshot.type, Timestamp.type)
        if (base / f"{role}.json").exists()
    }
    pending = {p.stem: read(p) for p in sorted((base / "pending").glob("*.json"))}
    repo = TrustRepository(fleet, roots, roles, pending, expiry)
    repo.online_key = online_key if isinstance(online_key, str) else None
    return repo


def role_summary(repo: TrustRepository) -> dict[str, Any]:
    """Roles, keys, thresholds, versions and expiries, for `trust status` (no secrets)."""
    out: dict[str, Any] = {"fleet": repo.fleet, "roles": {}, "pending": sorted(repo.pending)}
    for role in (Root.type, Targets.type, DESIRED_ROLE, Snapshot.type, Timestamp.type):
        try:
            current, pending = repo.current_keys(role), repo.pending_keys(role)
        except (KeyError, AssertionError):
            continue
        md = repo.root if role == Root.type and repo.roots else repo.roles.get(role)
        # ``keys``: what devices check against now (nothing submitted yet: the pending ones);
        # ``pending_keys``: what the change waiting for signatures would make them.
        ids, threshold = current or pending or ([], 0)
        entry: dict[str, Any] = {"keys": ids, "threshold": threshold}
        if pending is not None and current is not None:
            entry["pending_keys"], entry["pending_threshold"] = pending
        if md is not None and (md.signatures or role == Root.type):
            entry["version"] = md.signed.version
            entry["expires"] = md.signed.expires.strftime("%Y-%m-%dT%H:%M:%SZ")
        out["roles"][role] = entry
    return out


def keep_fresh(
    home: str | Path,
    publish: Callable[[str, str, bytes], None],
    load_key: Callable[[str], SigningKey],
    *,
    now: float,
) -> dict[str, list[str]]:
    """What `fleet serve` does every minute: for each fleet under ``home/trust`` with an online
    key, re-sign the online roles about to expire and publish them (``publish(fleet, role,
    bytes)``). Returns, per fleet, the roles re-signed. A fleet that cannot be kept fresh is
    logged (devices will raise freeze_suspected) and the others go on."""
    done: dict[str, list[str]] = {}
    for info in sorted(Path(home, "trust").glob("*/fleet.json")):
        try:
            with repository_lock(info.parent):
                roles = _keep_one(info.parent, publish, load_key, now)
        except EdgekitError as exc:
            log.error("could not keep the trust metadata of %s fresh: %s", info.parent.name, exc)
            continue
        if roles:
            done[info.parent.name] = roles
    return done


def _keep_one(
    directory: Path,
    publish: Callable[[str, str, bytes], None],
    load_key: Callable[[str], SigningKey],
    now: float,
) -> list[str]:
    repo = load_repository(directory)
    if not repo.roots or repo.online_key is None or not repo.roles[Timestamp.type].signatures:
        return []  # not set up yet (`edgekit trust init`, `trust submit`)
    roles = repo.resign_online([load_key(repo.online_key)], now=now)
    if roles:
        repo.save(directory)
        for role in roles:
            publish(repo.fleet, role, _bytes(repo.roles[role]))
    return roles


@contextlib.contextmanager
def repository_lock(directory: str | Path) -> Iterator[None]:
    """Hold ``directory``'s lock while reading, changing and saving a repository: `fleet serve`
    re-signing the timestamp and a push signing a desired state must not both make version N+1."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    with open(Path(directory) / ".lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_authorised(repo: TrustRepository, sha256: str, label: str) -> None:
    """TrustMetadataError naming the fix unless targets authorises the bundle ``sha256``."""
    if sha256 not in repo.authorised():
        raise refuse(
            TrustMetadataError,
            "unauthorised",
            f"{label} is not authorised for fleet {repo.fleet}: its devices would refuse it; "
            f"authorise it with `edgekit trust authorise BUNDLE --fleet {repo.fleet}` (signed by the "
            "targets key, then `edgekit trust submit targets`) and try again",
        )


def require_authorised(home: str | Path, fleet: str, bundles: Sequence[tuple[str, str]]) -> None:
    """If ``fleet`` has a trust repository under ``home/trust``: TrustMetadataError naming the
    fix unless targets authorises every ``(sha256, label)`` of ``bundles``. A push, a shadow
    candidate and a bench candidate all go through it before anything is saved or sent (devices
    on TUF would refuse them)."""
    if not has_repository(home, fleet):
        return
    directory = Path(home) / "trust" / fleet
    with repository_lock(directory):
        repo = load_repository(directory)
        for sha256, label in bundles:
            check_authorised(repo, sha256, label)


def current_roots(home: str | Path) -> dict[str, int]:
    """Each fleet with a trust repository under ``home/trust``: its current root version (the
    newest ``N.root.json``; roots still waiting for signatures live in ``pending/``). Reads
    file names only, so the alert evaluator can call it every round."""
    found: dict[str, int] = {}
    for info in Path(home, "trust").glob("*/fleet.json"):
        versions = [
            int(p.name.split(".", 1)[0])
            for p in info.parent.glob("*.root.json")
            if p.name.split(".", 1)[0].isdigit()
        ]
        if versions:
            found[info.parent.name] = max(versions)
    return found


def desired_expiries(home: str | Path) -> dict[str, tuple[datetime, int]]:
    """Each fleet with a trust repository under ``home/trust`` whose desired role is signed:
    when it expires and its version (read as JSON, not verified: the repository is the fleet's
    own). For the alert evaluator's ``expiry`` rule on devices on the key hierarchy."""
    found: dict[str, tuple[datetime, int]] = {}
    for path in Path(home, "trust").glob(f"*/{DESIRED_ROLE}.json"):
        try:
            doc = json.loads(path.read_bytes())
            if not doc.get("signatures"):
                continue
            signed = doc["signed"]
            expires = datetime.strptime(signed["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
            found[path.parent.name] = (expires, int(signed["version"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # a damaged file: `edgekit trust status` says what is wrong with it
    return found


def has_repository(home: str | Path, fleet: str) -> bool:
    return (Path(home) / "trust" / fleet / "fleet.json").exists()


def publish_desired(
    home: str | Path,
    state: DesiredState,
    publish: Callable[[str, bytes], None],
    *,
    now: float,
) -> bool:
    """If ``state``'s fleet has a trust repository under ``home/trust``: sign ``state`` into its
    desired role with the fleet's online key and ``publish(role, bytes)`` desired, snapshot and
    timestamp (True). False when the fleet has none (single-key trust only). TrustMetadataError
    when targets does not authorise the bundle (devices would refuse it)."""
    from edgekit.keys import load_signing_key

    directory = Path(home) / "trust" / state.fleet
    if not has_repository(home, state.fleet):
        return False
    with repository_lock(directory):
        repo = load_repository(directory)
        check_authorised(repo, state.bundle_sha256, f"{state.bundle_name}@{state.bundle_version}")
        if state.shadow is not None:  # devices on TUF refuse a shadow candidate targets does not list
            shadow = state.shadow
            check_authorised(repo, shadow.bundle_sha256, f"{shadow.bundle_name}@{shadow.bundle_version}")
        if repo.online_key is None:
            raise refuse(
                TrustMetadataError,
                "malformed",
                f"fleet {state.fleet}'s trust repository names no online key; re-create it with "
                "`edgekit trust init`",
            )
        repo.set_desired([state], [load_signing_key(home, repo.online_key)], now=now)
        repo.save(directory)
        for role in (DESIRED_ROLE, Snapshot.type, Timestamp.type):
            publish(role, _bytes(repo.roles[role]))
    return True
