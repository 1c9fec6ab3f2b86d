"""The control plane: what every operator and every ``fleet serve`` of a fleet shares, in the
registry database (SQLite by default, PostgreSQL for several machines).

- the **catalog** of signed bundles, their bytes included (``edgekit push NAME``, ``fleet
  rollback --to VERSION``), verified when added and when read;
- each fleet's **record**: the desired-state sequence counter, the bundle it was last told to run
  and the ones before (what ``fleet rollback`` goes back to), the devices it had;
- **rollouts**: the :mod:`edgekit.fleet.rollout` state machine's document, newest per fleet is
  the current one, with who started it;
- the **driving lock** of each fleet (:meth:`ControlPlane.driving`): ``push``, ``rollout
  resume|abort``, ``fleet rollback`` and the rollout controller take it before they change a
  fleet's rollout. On PostgreSQL it is a session advisory lock, on SQLite a ``flock`` on a file
  beside the database: either way the holder's death (kill -9, a crash, a laptop's power)
  releases it at once, so there is no stale lock to clean up. Who holds it is written to
  ``fleet_drivers`` for the error message of whoever is refused;
- **leadership** (:meth:`ControlPlane.leader`): the same kind of lock, held for as long as a
  ``fleet serve`` runs its rollout controller, so that several of them sharing one database run
  exactly one controller, and another takes over when the leader dies;
- an **audit log**: who did what to which fleet, and how it went.

Until this module, those lived in files under one operator's ``$EDGEKIT_HOME``;
:meth:`ControlPlane.import_home` brings such a home in, once (``open`` does it on first use).
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

from edgekit.bundle import Bundle, read_bundle
from edgekit.desired import DesiredState
from edgekit.errors import BundleError, ConfigError, RolloutError
from edgekit.manifest import parse_version
from edgekit.trust import TrustedKeys
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from .registry import Registry
from .registry.models import (
    AuditEntry,
    CatalogEntry,
    ControlMeta,
    DesiredRecord,
    FleetDriver,
    FleetRecordRow,
    ProvisionedDevice,
    RolloutRow,
)
from .rollout import Rollout

__all__ = ["AuditEntry", "Catalog", "ControlPlane", "FleetRecord", "operator_name"]

log = logging.getLogger(__name__)

OPERATOR_ENV = "EDGEKIT_OPERATOR"


def operator_name() -> str:
    """Who is acting: ``$EDGEKIT_OPERATOR``, else ``user@host``."""
    name = os.environ.get(OPERATOR_ENV)
    if name:
        return name[:128]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"[:128]


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class FleetRecord:
    """What the operators know of a fleet between commands."""

    fleet: str
    seq: int = 0
    bundle_id: Optional[str] = None  # what the fleet was last told to run
    label: Optional[str] = None
    history: list[dict[str, str]] = field(default_factory=list)  # [{id, label}] newest last
    devices: list[str] = field(default_factory=list)  # heard from when it was last told something

    def previous(self) -> Optional[dict[str, str]]:
        """The bundle the fleet ran before the current one, if any."""
        older = [h for h in self.history if h["id"] != self.bundle_id]
        return older[-1] if older else None


class Catalog:
    """The signed bundles operators have shipped, by name and version (never reused)."""

    def __init__(self, registry: Registry, trusted: Optional[TrustedKeys], actor: str) -> None:
        self._registry = registry
        self._trusted = trusted
        self.actor = actor

    @property
    def trusted(self) -> TrustedKeys:
        if self._trusted is None:
            raise ConfigError("this control plane was opened without trusted keys: it cannot verify bundles")
        return self._trusted

    def add(self, source: Union[Path, bytes]) -> Bundle:
        """Verify a bundle (a file or its bytes) and keep it; returns the bundle."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        bundle = read_bundle(data, self.trusted)
        manifest = bundle.manifest
        with self._registry.session() as session:
            same = session.scalars(
                select(CatalogEntry.bundle_id).where(
                    CatalogEntry.name == manifest.name, CatalogEntry.version == manifest.version
                )
            ).first()
            if same is None and session.get(CatalogEntry, bundle.bundle_id) is None:
                session.add(
                    CatalogEntry(
                        bundle_id=bundle.bundle_id,
                        name=manifest.name,
                        version=manifest.version,
                        size=len(data),
                        data=data,
                        added_by=self.actor,
                        added_at=_now(),
                    )
                )
                try:
                    session.commit()
                    return bundle
                except IntegrityError:  # another operator added it at the same moment
                    session.rollback()
                    same = session.scalars(
                        select(CatalogEntry.bundle_id).where(
                            CatalogEntry.name == manifest.name, CatalogEntry.version == manifest.version
                        )
                    ).first()
        if same is not None and same != bundle.bundle_id:
            raise BundleError(
                f"the catalog already holds a different {manifest.label}; give the new bundle a "
                "new version: versions are never reused"
            )
        return bundle

    def data(self, name: str, version: Optional[str] = None) -> bytes:
        """The bytes of ``name`` at ``version`` (default: the newest); BundleError if absent."""
        version = self._version(name, version)
        with self._registry.session() as session:
            found = session.scalars(
                select(CatalogEntry.data).where(CatalogEntry.name == name, CatalogEntry.version == version)
            ).first()
        if found is None:  # removed between the two reads
            raise BundleError(f"the catalog has no {name}@{version}")
        return bytes(found)

    def read(self, name: str, version: Optional[str] = None) -> Bundle:
        return read_bundle(self.data(name, version), self.trusted)

    def find(self, bundle_id: str) -> Optional[Bundle]:
        """The catalogued bundle whose id is ``bundle_id``, if any."""
        with self._registry.session() as session:
            row = session.get(CatalogEntry, bundle_id)
        return None if row is None else read_bundle(bytes(row.data), self.trusted)

    def names(self) -> list[str]:
        with self._registry.session() as session:
            return sorted(set(session.scalars(select(CatalogEntry.name))))

    def versions(self, name: str) -> list[str]:
        """Versions of ``name``, oldest first (semantic version order)."""
        with self._registry.session() as session:
            found = list(session.scalars(select(CatalogEntry.version).where(CatalogEntry.name == name)))
        return sorted(found, key=parse_version)

    def next_version(self, name: str) -> str:
        """The next patch version after the newest of ``name``, or 1.0.0."""
        versions = self.versions(name)
        if not versions:
            return "1.0.0"
        major, minor, patch, _ = parse_version(versions[-1])
        return f"{major}.{minor}.{patch + 1}"

    def _version(self, name: str, version: Optional[str]) -> str:
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none yet"
            raise BundleError(f"no bundle named {name!r} in the catalog (known: {known})")
        if version is None:
            return versions[-1]
        if version not in versions:
            raise BundleError(f"the catalog has no {name}@{version} (versions: {', '.join(versions)})")
        return version


@dataclass(frozen=True)
class RolloutInfo:
    """The current rollout of a fleet, with who started it and when."""

    rollout: Rollout
    started_by: str
    started_at: datetime


class ControlPlane:
    """The control plane on one registry database. Thread-safe: every call has its own session.

    ``actor`` names who acts through this object in rollouts and the audit log (default
    :func:`operator_name`).
    """

    def __init__(
        self, registry: Registry, trusted: Optional[TrustedKeys] = None, actor: Optional[str] = None
    ) -> None:
        self.registry = registry
        self.actor = actor or operator_name()
        self.catalog = Catalog(registry, trusted, self.actor)
        self._owns_registry = False

    @classmethod
    def open(
        cls,
        url: str,
        trusted: Optional[TrustedKeys] = None,
        home: Optional[Path] = None,
        actor: Optional[str] = None,
    ) -> ControlPlane:
        """Open (and migrate) the registry at ``url``; with ``home`` (and ``trusted``, to verify
        its bundles), bring in what that ``$EDGEKIT_HOME`` kept in files before the control
        plane moved here (once). Without ``trusted`` the catalog cannot be read."""
        control = cls(Registry(url), trusted, actor)
        control._owns_registry = True
        if home is not None and trusted is not None:
            control.import_home(home)
        return control

    def close(self) -> None:
        if self._owns_registry:
            self.registry.close()

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- fleet records --------------------------------------------------------------------------

    def record(self, fleet: str) -> FleetRecord:
        with self.registry.session() as session:
            row = session.get(FleetRecordRow, fleet)
        if row is None:
            return FleetRecord(fleet=fleet)
        return FleetRecord(
            fleet=fleet,
            seq=row.seq,
            bundle_id=row.bundle_id,
            label=row.label,
            history=[dict(h) for h in row.history],
            devices=list(row.devices),
        )

    def save_record(self, record: FleetRecord) -> None:
        """Save everything but the counter (:meth:`next_seq` moves that, atomically)."""
        values = {
            "bundle_id": record.bundle_id,
            "label": record.label,
            "history": record.history[-20:],
            "devices": sorted(record.devices),
            "updated_at": _now(),
        }
        with self.registry.session() as session:
            self._ensure_record(session, record.fleet)
            session.execute(
                update(FleetRecordRow).where(FleetRecordRow.fleet == record.fleet).values(**values)
            )
            session.commit()

    def next_seq(self, fleet: str, above: int = 0) -> int:
        """The next desired-state sequence number of ``fleet``: above every number handed out
        before and above ``above`` (numbers seen on the broker). Atomic across processes and
        machines: the UPDATE takes the row's write lock before it reads."""
        with self.registry.session() as session:
            self._ensure_record(session, fleet)
            row = FleetRecordRow.seq
            bumped = session.execute(
                update(FleetRecordRow)
                .where(FleetRecordRow.fleet == fleet)
                .values(seq=_greatest(row, above) + 1, updated_at=_now())
                .returning(FleetRecordRow.seq)
            ).scalar_one()
            session.commit()
            return int(bumped)

    @staticmethod
    def _ensure_record(session: Any, fleet: str) -> None:
        if session.get(FleetRecordRow, fleet) is None:
            session.add(FleetRecordRow(fleet=fleet, seq=0, history=[], devices=[], updated_at=_now()))
            try:
                session.flush()
            except IntegrityError:  # created by another process just now
                session.rollback()

    # -- desired states ---------------------------------------------------------------------------

    def record_desired(self, state: DesiredState) -> None:
        """Remember ``state`` (just published) as its fleet's, or its device's, newest: what
        the ``expiry`` alert rule reads."""
        device = state.device or ""
        label = f"{state.bundle_name}@{state.bundle_version}"[:140]
        issued = datetime.fromtimestamp(state.issued_at, timezone.utc)
        expires = datetime.fromtimestamp(state.expires_at, timezone.utc)
        with self.registry.session() as session:
            row = session.get(DesiredRecord, (state.fleet, device))
            if row is None:
                session.add(
                    DesiredRecord(
                        fleet=state.fleet,
                        device=device,
                        seq=state.seq,
                        bundle_id=state.bundle_sha256,
                        label=label,
                        issued_at=issued,
                        expires_at=expires,
                    )
                )
            elif state.seq > row.seq:
                row.seq, row.bundle_id, row.label = state.seq, state.bundle_sha256, label
                row.issued_at, row.expires_at = issued, expires
            session.commit()

    def desired_states(self) -> list[DesiredRecord]:
        """The newest desired state of every fleet (``device`` empty) and device."""
        with self.registry.session() as session:
            return list(session.scalars(select(DesiredRecord)))

    # -- shadow evaluations -----------------------------------------------------------------------

    def save_shadow_asked(self, fleet: str, candidate_id: str, devices: Optional[list[str]]) -> None:
        """Remember which devices of ``fleet`` were asked to try ``candidate_id`` in the shadow
        (None: every device), for ``shadow status`` and ``promote`` (docs/shadow.md)."""
        value = json.dumps({"candidate_id": candidate_id, "devices": devices})
        with self.registry.session() as session:
            row = session.get(ControlMeta, f"shadow:{fleet}")
            if row is None:
                session.add(ControlMeta(key=f"shadow:{fleet}", value=value))
            else:
                row.value = value
            session.commit()

    def shadow_asked(self, fleet: str, candidate_id: Optional[str]) -> Optional[list[str]]:
        """The devices last asked to try ``candidate_id`` in the shadow; None: every device (or
        not known: it was not asked through this control plane)."""
        with self.registry.session() as session:
            row = session.get(ControlMeta, f"shadow:{fleet}")
        if row is None or candidate_id is None:
            return None
        try:
            doc = json.loads(row.value)
            devices = doc["devices"] if doc["candidate_id"] == candidate_id else None
        except (ValueError, KeyError, TypeError):
            log.warning("the shadow record of fleet %s is unreadable; judging every device", fleet)
            return None
        return None if devices is None else [str(d) for d in devices]

    def shadow_summary(self, fleet: str) -> dict[str, Any]:
        """What the fleet's devices measured of its newest shadow candidate
        (:func:`edgekit.fleet.shadow.summarize`), only of the devices that were asked."""
        from .shadow import summarize

        windows = self.registry.shadow_windows(fleet)
        candidate = windows[-1].candidate_id if windows else None
        return summarize(windows, devices=self.shadow_asked(fleet, candidate))

    # -- rollouts -------------------------------------------------------------------------------

    def rollout_info(self, fleet: str) -> Optional[RolloutInfo]:
        """The fleet's current (newest) rollout, or None."""
        with self.registry.session() as session:
            row = session.scalars(
                select(RolloutRow).where(RolloutRow.fleet == fleet).order_by(RolloutRow.id.desc()).limit(1)
            ).first()
        if row is None:
            return None
        rollout = Rollout.from_json(row.doc.encode(), f"the saved rollout of fleet {fleet}")
        return RolloutInfo(rollout, row.started_by, row.started_at)

    def rollout(self, fleet: str) -> Rollout:
        """The fleet's current rollout; ConfigError if it never had one."""
        info = self.rollout_info(fleet)
        if info is None:
            raise ConfigError(f"fleet {fleet} has no rollout yet; start one with `edgekit push --canary N`")
        return info.rollout

    def save_rollout(self, rollout: Rollout, *, new: bool = False) -> None:
        """Save ``rollout`` as the fleet's current one; ``new`` starts a new row (a new rollout,
        started by this control plane's actor) instead of updating the current one."""
        now = _now()
        doc = rollout.to_json().decode()
        with self.registry.session() as session:
            current = None
            if not new:
                current = session.scalars(
                    select(RolloutRow)
                    .where(RolloutRow.fleet == rollout.fleet)
                    .order_by(RolloutRow.id.desc())
                    .limit(1)
                ).first()
            if current is None:
                session.add(
                    RolloutRow(
                        fleet=rollout.fleet,
                        label=rollout.label,
                        phase=rollout.phase,
                        started_by=self.actor,
                        started_at=datetime.fromtimestamp(rollout.started_at, timezone.utc),
                        updated_at=now,
                        doc=doc,
                    )
                )
            else:
                current.label, current.phase, current.doc, current.updated_at = (
                    rollout.label,
                    rollout.phase,
                    doc,
                    now,
                )
            session.commit()

    def rollouts(self) -> list[RolloutInfo]:
        """Every fleet's current (newest) rollout, newest first: what the dashboard's rollout
        view and the alert evaluator read."""
        with self.registry.session() as session:
            newest = select(func.max(RolloutRow.id)).group_by(RolloutRow.fleet).scalar_subquery()
            rows = list(
                session.scalars(
                    select(RolloutRow).where(RolloutRow.id.in_(newest)).order_by(RolloutRow.id.desc())
                )
            )
        found = []
        for row in rows:
            try:
                rollout = Rollout.from_json(row.doc.encode(), f"the saved rollout of fleet {row.fleet}")
            except ConfigError as exc:
                log.warning("cannot read the rollout of fleet %s: %s", row.fleet, exc)
                continue
            found.append(RolloutInfo(rollout, row.started_by, row.started_at))
        return found

    def unfinished(self) -> list[str]:
        """Fleets whose current rollout is not finished."""
        with self.registry.session() as session:  # each fleet's newest rollout only: one row per fleet
            newest = select(func.max(RolloutRow.id)).group_by(RolloutRow.fleet).scalar_subquery()
            rows = session.execute(
                select(RolloutRow.fleet, RolloutRow.phase).where(RolloutRow.id.in_(newest))
            )
            return sorted(fleet for fleet, phase in rows if phase not in ("done", "aborted"))

    def refuse_if_busy(self, fleet: str) -> None:
        """RolloutError naming the rollout in progress when another operator started one on
        ``fleet`` that is not finished (call it holding :meth:`driving`)."""
        info = self.rollout_info(fleet)
        if info is None or info.rollout.finished or info.started_by == self.actor:
            return
        raise RolloutError(
            f"fleet {fleet} has a rollout in progress: {info.rollout.label}, started by "
            f"{info.started_by} at {info.started_at.astimezone():%Y-%m-%d %H:%M}, now {info.rollout.phase}; "
            f"follow it with `edgekit rollout status --fleet {fleet}` or stop it with "
            f"`edgekit rollout abort --fleet {fleet}`"
        )

    # -- locks ----------------------------------------------------------------------------------

    @contextmanager
    def driving(self, fleet: str, holder: str, wait: float = 0.0) -> Iterator[None]:
        """Hold the lock on ``fleet``'s rollout; RolloutError naming the holder if someone
        else has it for longer than ``wait`` seconds."""
        with self._lock(f"fleet:{fleet}", holder, wait) as held_by:
            if held_by is not None:
                raise RolloutError(
                    f"the rollout of fleet {fleet} is being driven by {held_by}; wait for it to "
                    "finish, or stop it first"
                )
            yield

    @contextmanager
    def leader(self, role: str, wait: float = 0.0) -> Iterator[bool]:
        """Try to become the one ``role`` (e.g. the rollout controller) among every process on
        this database; yields whether this process is it, and holds the role until the block
        ends or the process dies."""
        with self._lock(f"role:{role}", f"{role} of {self.actor}", wait) as held_by:
            yield held_by is None

    def lead_while_elected(
        self,
        role: str,
        lead: Callable[[], None],
        stop: threading.Event,
        interval: float,
        failed: Callable[[], None],
    ) -> None:
        """Until ``stop`` is set: take ``role``'s leader lock when it is free and run ``lead``
        while holding it; try again every ``interval`` seconds (a dead leader's lock is freed
        at once). ``failed`` is called in the ``except`` of any error (lost lock or database),
        to count and log it: the loop outlives them all."""
        while not stop.is_set():
            try:
                with self.leader(role) as leading:
                    if leading:
                        lead()
            except Exception:  # noqa: BLE001 - handed to failed(); the loop must go on
                failed()
            stop.wait(interval)

    @contextmanager
    def _lock(self, name: str, holder: str, wait: float) -> Iterator[Optional[str]]:
        """Yields None holding the lock, else (after ``wait`` seconds) who holds it."""
        label = f"{holder} ({self.actor}, pid {os.getpid()})"[:200]
        deadline = time.monotonic() + wait
        if self.registry.dialect == "postgresql":
            lock: _Lock = _AdvisoryLock(self.registry, name)
        else:
            lock = _FileLock(_lock_dir(self.registry) / f"{_safe(name)}.lock")
        try:
            while not lock.try_acquire():
                if time.monotonic() >= deadline:
                    yield self.lock_holder(name) or "another process"
                    return
                time.sleep(0.05)  # neither lock has a timed wait; holders' steps are short
            self._set_holder(name, label)
            yield None
        finally:
            lock.release()

    def lock_holder(self, name: str) -> Optional[str]:
        """Who took the lock ``name`` (``fleet:FLEET`` or ``role:ROLE``) last, as written then."""
        with self.registry.session() as session:
            row = session.get(FleetDriver, name)
            return None if row is None else row.holder

    def lock_pid(self, name: str) -> Optional[int]:
        """The process id of whoever took the lock ``name`` last (on its own machine)."""
        found = re.search(r"pid (\d+)\)$", self.lock_holder(name) or "")
        return int(found.group(1)) if found else None

    def _set_holder(self, name: str, label: str) -> None:
        with self.registry.session() as session:
            session.execute(delete(FleetDriver).where(FleetDriver.fleet == name))
            session.add(FleetDriver(fleet=name, holder=label, since=_now()))
            session.commit()

    # -- provisioning ---------------------------------------------------------------------------

    def record_provisioned(self, device: str, fleet: str, username: str, tls: bool) -> None:
        """Note that this actor provisioned ``device`` (again: the newest record wins)."""
        with self.registry.session() as session:
            session.execute(delete(ProvisionedDevice).where(ProvisionedDevice.device == device))
            session.add(
                ProvisionedDevice(
                    device=device,
                    fleet=fleet,
                    username=username,
                    tls=tls,
                    added_by=self.actor,
                    added_at=_now(),
                )
            )
            session.commit()
        self.audit("device-add", fleet=fleet, target=device)

    def provisioned(self, fleet: Optional[str] = None) -> list[ProvisionedDevice]:
        query = select(ProvisionedDevice).order_by(ProvisionedDevice.device)
        if fleet is not None:
            query = query.where(ProvisionedDevice.fleet == fleet)
        with self.registry.session() as session:
            return list(session.scalars(query))

    # -- audit ----------------------------------------------------------------------------------

    def audit(
        self,
        action: str,
        *,
        fleet: Optional[str] = None,
        target: Optional[str] = None,
        result: str = "ok",
        detail: Optional[str] = None,
        actor: Optional[str] = None,
    ) -> None:
        """Record that ``actor`` (default: this control plane's) did ``action``."""
        with self.registry.session() as session:
            session.add(
                AuditEntry(
                    at=_now(),
                    actor=(actor or self.actor)[:128],
                    action=action[:64],
                    fleet=fleet,
                    target=None if target is None else target[:200],
                    result=result[:16],
                    detail=detail,
                )
            )
            session.commit()

    def audit_log(self, fleet: Optional[str] = None, limit: int = 100) -> list[AuditEntry]:
        """Newest first."""
        query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
        if fleet is not None:
            query = query.where(AuditEntry.fleet == fleet)
        with self.registry.session() as session:
            return list(session.scalars(query))

    # -- one-shot import of a $EDGEKIT_HOME -----------------------------------------------------

    def import_home(self, home: Path) -> dict[str, int]:
        """Bring in the bundles, fleet records, rollouts and provisioned devices ``home`` kept
        in files (edgekit before the control plane moved to the database); once per home and
        database. Returns how many of each were taken. The files stay where they are, unread
        from now on (but the broker accounts, which stay the home's secrets)."""
        marker = f"imported-home:{Path(home).expanduser().resolve()}"
        with self.registry.session() as session:
            if session.get(ControlMeta, marker) is not None:
                return {}
        counts = {"bundles": 0, "fleets": 0, "rollouts": 0, "devices": 0, "skipped": 0}
        for path in sorted((home / "bundles").glob("*/*.ekb")):
            try:
                self.catalog.add(path)
                counts["bundles"] += 1
            except (BundleError, OSError) as exc:
                counts["skipped"] += 1
                log.warning("not imported into the catalog: %s: %s", path, exc)
        for path in sorted((home / "fleets").glob("*.json")):
            try:
                self._import_record(path)
                counts["fleets"] += 1
            except (ValueError, KeyError, TypeError, OSError) as exc:
                counts["skipped"] += 1
                log.warning("not imported: fleet record %s: %s", path, exc)
        if (home / "broker" / "devices").is_dir():
            from edgekit.broker import list_devices

            known = {p.device for p in self.provisioned()}
            for creds in list_devices(home):
                if creds.device not in known:
                    self.record_provisioned(
                        creds.device, creds.fleet, creds.username, creds.cert_file is not None
                    )
                    counts["devices"] += 1
        for path in sorted((home / "rollouts").glob("*.json")):
            try:
                rollout = Rollout.from_json(path.read_bytes(), str(path))
                if self.rollout_info(rollout.fleet) is None:
                    self.save_rollout(rollout, new=True)
                    counts["rollouts"] += 1
            except (ConfigError, OSError) as exc:
                counts["skipped"] += 1
                log.warning("not imported: rollout %s: %s", path, exc)
        with self.registry.session() as session:
            session.add(ControlMeta(key=marker, value=json.dumps(counts)))
            try:
                session.commit()
            except IntegrityError:  # imported by another process at the same moment
                session.rollback()
        if any(counts.values()):
            log.info("imported %s from %s into the registry", counts, home)
            self.audit("import-home", target=str(home), detail=json.dumps(counts))
        return counts

    def _import_record(self, path: Path) -> None:
        doc = json.loads(path.read_bytes())
        fleet = path.stem
        seq = int(doc["seq"])
        record = self.record(fleet)
        if record.bundle_id is None:
            record.bundle_id = doc.get("bundle_id")
            record.label = doc.get("label")
            record.history = [{"id": str(h["id"]), "label": str(h["label"])} for h in doc.get("history", [])]
            record.devices = [str(d) for d in doc.get("devices", [])]
            self.save_record(record)
        if seq > record.seq:
            self.next_seq(fleet, seq - 1)  # the counter goes to seq, never down


def _greatest(column: Any, value: int) -> Any:
    """SQL ``max(column, value)`` on both SQLite and PostgreSQL."""
    from sqlalchemy import case, literal

    return case((column > value, column), else_=literal(value))


def _safe(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:24]


def _lock_dir(registry: Registry) -> Path:
    database = registry.engine.url.database
    if database and database != ":memory:":
        folder = Path(database).with_name(Path(database).name + ".locks")
    else:
        folder = Path(tempfile.gettempdir()) / f"edgekit-locks-{_safe(registry.url)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the registry's lock folder {folder}: {exc.strerror}; make its parent "
            "writable for this user, or point --registry at a database in a writable folder"
        ) from None
    return folder


class _Lock:
    def try_acquire(self) -> bool:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError


class _FileLock(_Lock):
    """``flock`` on a file: one machine (SQLite's case); the kernel frees it when its holder dies."""

    def __init__(self, path: Path) -> None:
        try:
            self._fd: Optional[int] = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"cannot open the registry's lock file {path}: {exc.strerror}; make {path.parent} "
                "writable for this user"
            ) from None

    def try_acquire(self) -> bool:
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


class _AdvisoryLock(_Lock):
    """A PostgreSQL session advisory lock on a connection of its own: the server frees it when
    that connection ends, so a holder's death on any machine releases it."""

    def __init__(self, registry: Registry, name: str) -> None:
        self._key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        self._connection: Any = registry.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self._held = False

    def try_acquire(self) -> bool:
        self._held = bool(
            self._connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self._key}).scalar()
        )
        return self._held

    def release(self) -> None:
        if self._connection is None:
            return
        try:
            if self._held:
                self._connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            self._connection.close()
        except SQLAlchemyError:  # the connection is broken: dropping it frees the lock on the server
            self._connection.invalidate()
            log.warning("could not release a fleet lock cleanly; its connection was dropped")
        self._connection = None
