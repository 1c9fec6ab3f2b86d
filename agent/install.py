"""The install pipeline and the on-disk bundle store: crash-safe at every step.

Layout of ``state_dir``::

    installed.json            the ONE pointer: {"current": DIR, "previous": DIR | null}
    bundles/NAME-VERSION-ID/  manifest.json, manifest.sig, model.tflite, ...
    bundles/.tmp-*            an extraction in progress (removed at the next start)
    lock                      flock'ed by whoever changes the store (install, rollback, recovery)

Install: verify the bundle file against the trusted keys (:func:`edgekit.bundle.read_bundle`;
a :class:`~edgekit.bundle.Bundle` that ``read_bundle`` already verified, or a
:class:`~edgekit.transfer.StagedBundle` downloaded as files, has only its size and signature
checked again against this store's keys), refuse a lower version of the installed bundle
unless ``allow_downgrade`` (compared on the installed manifest, its signature checked),
extract it into ``bundles/.tmp-…`` with every file and the directory fsync'ed and rename that
to its versioned name (a staged download already has that layout: its files and directory are
fsync'ed and the directory is renamed into ``bundles/``), load the model from the verified
bytes just written, run
the bundle's health check, and only then commit by rewriting ``installed.json`` atomically
(the old current becomes ``previous``). The extracted directory is not read back and hashed
again: it was written from verified bytes and fsync'ed, and reading it back would come from the
page cache, not the disk; every start re-verifies it from disk (:meth:`BundleStore.recover`). Directories other than current and
previous are garbage-collected. The pointer is flipped only after load and health check, so
a health-check failure never has to be undone: the previous bundle never stopped being the
committed one.

Crash safety: before the commit nothing the pointer names has changed; the commit is one
``rename``; after it, the pointer names a complete, fsync'ed, verified directory. At start,
:meth:`BundleStore.recover` removes interrupted extractions, re-verifies the current directory
against its manifest and signature (and re-runs its health check), falls back to the previous
one if the current is incomplete or fails, and records what it did as an event.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import mmap
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Union

from edgekit._version import __version__
from edgekit.atomic import atomic_write, fsync_dir
from edgekit.baseline import Baseline
from edgekit.bundle import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    Bundle,
    ExtractedBundle,
    check_members,
    extract_bundle,
    manifest_id,
    read_bundle,
    verify_manifest_signature,
)
from edgekit.calibration import Calibration
from edgekit.errors import BundleError, EdgekitError, HealthCheckError, InstallError
from edgekit.healthcheck import run_healthcheck
from edgekit.manifest import Manifest, parse_version
from edgekit.runtime import Model
from edgekit.trust import TrustedKeys

if TYPE_CHECKING:  # edgekit.transfer loads the MQTT library, which an embedded Agent does not need
    from edgekit.transfer import StagedBundle

#: What :meth:`BundleStore.install` takes: a ``.ekb`` file's path (str or path-like), its bytes,
#: a verified :class:`~edgekit.bundle.Bundle` or a downloaded :class:`~edgekit.transfer.StagedBundle`.
BundleSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Bundle, "StagedBundle"]

__all__ = ["BundleStore", "InstallResult", "InstalledBundle", "LoadedBundle"]

log = logging.getLogger(__name__)

POINTER_FILE = "installed.json"
POINTER_SCHEMA = "edgekit.agent.installed"
BUNDLES_DIR = "bundles"
UNPACKING_DIR = "unpacking"  # bundle files being verified, one directory per install in progress
LOCK_FILE = "lock"
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class InstalledBundle:
    """A bundle verified from its installed directory: signature by a trusted key, every member.

    Its id (:attr:`bundle_id`) is the SHA-256 of its signed ``manifest.json``, the identity a
    desired state and the fleet use.
    """

    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    signer: str
    #: Member bytes by name. A bundle read from disk (boot, a file, a download) has every
    #: member but the model (the runtime maps its file instead of a copy in memory); one
    #: installed from bytes in memory has them all.
    members: Mapping[str, bytes]

    @property
    def bundle_id(self) -> str:
        return manifest_id(self.manifest_bytes)

    def member(self, role: str) -> bytes | None:
        entry = self.manifest.file(role)
        return None if entry is None else self.members.get(entry.name)

    def baseline(self) -> Baseline | None:
        data = self.member("baseline")
        return None if data is None else Baseline.from_json(data)

    def calibration(self) -> Calibration | None:
        data = self.member("calibration")
        return None if data is None else Calibration.from_json(data)


@dataclass(frozen=True)
class LoadedBundle:
    """A verified bundle directory and its model, loaded and health-checked."""

    directory: Path
    bundle: InstalledBundle
    model: Model
    healthcheck_error: float | None  # the health check's largest output error; None if it has none

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    def identity(self) -> dict[str, str]:
        m = self.bundle.manifest
        return {"name": m.name, "version": m.version, "bundle_id": self.bundle.bundle_id}


@dataclass(frozen=True)
class InstallResult:
    name: str
    version: str
    bundle_id: str  # SHA-256 of the signed manifest
    directory: str
    previous: str | None  # version of the bundle it replaced
    changed: bool  # False when that exact bundle was already installed
    healthcheck_error: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


EventSink = Callable[[str, str, "dict[str, str] | None"], None]
#: Told each step of an install as it begins: ``verifying``, ``installing`` (the bundle goes
#: into ``bundles/``), ``health-checking`` (its model loads and runs the health check); the
#: commit follows. The daemon persists its deployment state there (agent/deployment.py).
StepSink = Callable[[str], None]


def _identity(bundle: Bundle | ExtractedBundle | StagedBundle) -> dict[str, str]:
    return {"name": bundle.manifest.name, "version": bundle.manifest.version, "bundle_id": bundle.bundle_id}


def _dir_name(bundle: Bundle | ExtractedBundle | StagedBundle) -> str:
    return f"{bundle.manifest.name}-{bundle.manifest.version}-{bundle.bundle_id[:12]}"


class BundleStore:
    """The bundles installed under ``state_dir``; every change is made under a file lock."""

    def __init__(
        self,
        state_dir: Path,
        trusted: TrustedKeys,
        *,
        runtime: str = "auto",
        threads: int | None = None,
        xnnpack: bool = True,
        max_bundle_size: int,
        on_event: EventSink | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.bundles = self.state_dir / BUNDLES_DIR
        self.trusted = trusted
        self.runtime = runtime
        self.threads = threads
        self.xnnpack = xnnpack
        self.max_bundle_size = max_bundle_size
        self._on_event = on_event
        try:
            self.bundles.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InstallError(
                f"cannot create the agent's state directory {self.state_dir}: {exc.strerror}; "
                "set state_dir to a writable directory"
            ) from None

    # -- plumbing ---------------------------------------------------------------------------

    def _event(self, kind: str, message: str, bundle: dict[str, str] | None = None) -> None:
        log.info("%s: %s", kind, message, extra={"bundle": (bundle or {}).get("version")})
        if self._on_event is not None:
            self._on_event(kind, message, bundle)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock (released by the kernel if this process dies)."""
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def pointer(self) -> dict[str, str | None]:
        """``{"current": DIR | None, "previous": DIR | None}`` as committed on disk."""
        try:
            doc = json.loads((self.state_dir / POINTER_FILE).read_bytes())
        except FileNotFoundError:
            return {"current": None, "previous": None}
        except (OSError, ValueError) as exc:
            self._event(
                "store_damaged", f"{POINTER_FILE} is unreadable ({exc}); looking for bundles to serve"
            )
            return {"current": None, "previous": None, "damaged": "1"}
        if not isinstance(doc, dict) or doc.get("schema") != POINTER_SCHEMA:
            self._event(
                "store_damaged", f"{POINTER_FILE} is not an edgekit pointer; looking for bundles to serve"
            )
            return {"current": None, "previous": None, "damaged": "1"}
        current, previous = doc.get("current"), doc.get("previous")
        return {
            "current": current if isinstance(current, str) else None,
            "previous": previous if isinstance(previous, str) else None,
        }

    def _commit(self, current: str | None, previous: str | None) -> None:
        doc = {
            "schema": POINTER_SCHEMA,
            "schema_version": 1,
            "current": current,
            "previous": previous,
            "updated_at": time.time(),
        }
        atomic_write(self.state_dir / POINTER_FILE, (json.dumps(doc, sort_keys=True) + "\n").encode())

    def read_installed(self, name: str) -> InstalledBundle:
        """Re-verify an installed directory from disk: signature by a trusted key, and every
        member's size and SHA-256. Raises BundleError if anything is missing or wrong."""
        signed = self._installed_manifest(name)
        directory = self.bundles / name
        model = signed.manifest.model_file.name
        members: dict[str, bytes] = {}
        with contextlib.ExitStack() as views:
            checked: dict[str, bytes | memoryview] = {}
            for entry in signed.manifest.files:
                try:
                    if entry.name == model:  # mapped, not copied: the runtime maps it again to serve
                        checked[entry.name] = views.enter_context(_mapped(directory / entry.name))
                    else:
                        checked[entry.name] = members[entry.name] = (directory / entry.name).read_bytes()
                except OSError as exc:
                    raise BundleError(
                        f"installed bundle {name} is missing {entry.name} ({exc.strerror})"
                    ) from None
            try:
                check_members(signed.manifest, checked)
            except BundleError as exc:
                raise BundleError(f"installed bundle {name}: {exc}") from None
            checked.clear()
        return replace(signed, members=members)

    def _installed_manifest(self, name: str) -> InstalledBundle:
        """An installed bundle's manifest, its signature checked, without its members (enough to
        compare versions with a bundle being installed); BundleError if missing or wrong."""
        directory = self.bundles / name
        if not _safe_dir_name(name) or not directory.is_dir():
            raise BundleError(f"installed bundle directory {directory} is missing")
        try:
            manifest_bytes = (directory / MANIFEST_FILE).read_bytes()
            signature = (directory / SIGNATURE_FILE).read_bytes()
        except OSError as exc:
            raise BundleError(f"installed bundle {name} is incomplete ({exc.strerror})") from None
        signer = verify_manifest_signature(manifest_bytes, signature, self.trusted)
        return InstalledBundle(Manifest.from_json(manifest_bytes), manifest_bytes, signature, signer, {})

    def _load(self, name: str, verified: InstalledBundle | None = None) -> LoadedBundle:
        """Verify an installed directory (unless ``verified``: what was just written into it),
        load its model and run its health check."""
        bundle = verified if verified is not None else self.read_installed(name)
        model_name = bundle.manifest.model_file.name
        content = bundle.members.get(model_name)
        # A model on disk is not read into memory: the runtime maps the file, checked by
        # read_installed, extract_bundle or chunk by chunk (installed files are never rewritten).
        source = content if content is not None else self.bundles / name / model_name
        model = Model(source, runtime=self.runtime, threads=self.threads, xnnpack=self.xnnpack)
        worst = None
        manifest = bundle.manifest
        data = bundle.member("healthcheck")
        if manifest.healthcheck is not None and data is not None:
            worst = run_healthcheck(model, data, manifest.healthcheck, manifest.inputs, manifest.outputs)
        return LoadedBundle(self.bundles / name, bundle, model, worst)

    def _gc(self, keep: set[str | None]) -> None:
        """Remove interrupted extractions and every bundle directory not in ``keep``."""
        for entry in self.bundles.iterdir():
            if entry.name in keep:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            log.debug("removed %s", entry)
        fsync_dir(self.bundles)

    # -- operations -------------------------------------------------------------------------

    def recover(self) -> LoadedBundle | None:
        """At start: serve the committed bundle if it is complete and healthy, else the
        previous one (recorded as an event); clean up what an interrupted install left."""
        with self.locked():
            self._remove_abandoned_unpacking()
            pointer = self.pointer()
            current, previous = pointer["current"], pointer["previous"]
            candidates = [c for c in (current, previous) if c]
            if pointer.get("damaged"):
                candidates = sorted(
                    (e.name for e in self.bundles.iterdir() if not e.name.startswith(".")), reverse=True
                )
            for name in candidates:
                try:
                    loaded = self._load(name)
                except (EdgekitError, OSError) as exc:
                    self._event("verify_failed", f"installed bundle {name} cannot be served: {exc}")
                    continue
                if name != current:
                    self._commit(name, None)
                    self._event(
                        "recovered",
                        f"serving {loaded.manifest.label} instead of {current or 'nothing'}",
                        loaded.identity(),
                    )
                    self._gc({name})
                else:
                    self._gc({current, previous})
                return loaded
            if candidates:
                self._event("no_model", "no installed bundle can be served; install one")
                self._commit(None, None)
            self._gc(set())
            return None

    def _failed(self, label: str, exc: OSError, ident: dict[str, str] | None) -> InstallError:
        """An install that the disk refused: recorded, and the error that says what to do."""
        self._event("install_failed", f"{label}: {exc.strerror}", ident)
        hint = "free some space" if exc.errno == errno.ENOSPC else "check the state directory"
        return InstallError(f"cannot install {label}: {exc.strerror}; {hint}")

    def _remove_abandoned_unpacking(self) -> None:
        """Bundle files whose install was killed (kill -9, power cut) left their unpacking
        directory: remove those of processes that are gone."""
        unpacking = self.state_dir / UNPACKING_DIR
        for entry in unpacking.iterdir() if unpacking.is_dir() else ():
            pid = entry.name.split("-", 1)[0]
            if pid.isdigit() and _alive(int(pid)):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            log.debug("removed %s", entry)

    def _verified(self, source: BundleSource) -> Bundle | ExtractedBundle | StagedBundle:
        if isinstance(source, (str, os.PathLike)):
            # Verified while written out to a directory of this process's own (no copy of the
            # bundle in memory); moved into place under the lock like a download.
            unpacking = self.state_dir / UNPACKING_DIR / f"{os.getpid()}-{secrets.token_hex(4)}"
            try:
                return extract_bundle(source, self.trusted, unpacking, self.max_bundle_size)
            except BaseException:
                shutil.rmtree(unpacking, ignore_errors=True)
                raise
        if isinstance(source, (bytes, bytearray, memoryview)):
            return read_bundle(bytes(source), self.trusted, self.max_bundle_size)
        if isinstance(source, Bundle):
            # read_bundle checked every member when it made this object; the signature is
            # checked again: the object may have been verified against other keys than ours.
            if source.size > self.max_bundle_size:
                raise BundleError(
                    f"the bundle is {source.size} bytes, over the {self.max_bundle_size}-byte limit"
                )
            signer = verify_manifest_signature(source.manifest_bytes, source.signature, self.trusted)
            return source if source.signer == signer else replace(source, signer=signer)
        if not _is_staged(source):
            raise TypeError(f"cannot install a {type(source).__name__}")
        # fetch_staged_bundle checked every chunk and member; the signature is checked again.
        size = source.manifest.chunks.total_size
        if size > self.max_bundle_size:
            raise BundleError(f"the bundle is {size} bytes, over the {self.max_bundle_size}-byte limit")
        verified = source.verified
        verify_manifest_signature(verified.manifest_bytes, verified.signature, self.trusted)
        return source

    def install(
        self,
        source: BundleSource,
        *,
        allow_downgrade: bool = False,
        make_room: Callable[[], None] | None = None,
        step: StepSink | None = None,
    ) -> tuple[InstallResult, LoadedBundle]:
        """Verify, extract (or move into place), load, health-check and commit a bundle file,
        its bytes, a :class:`~edgekit.bundle.Bundle` that :func:`~edgekit.bundle.read_bundle`
        verified, or a :class:`~edgekit.transfer.StagedBundle` downloaded as files.
        ``make_room`` is called once the new bundle is on disk, just before its model loads
        (the agent frees the model it serves there, to hold one model in memory, not two).
        ``step(name)`` is called as each step begins (:data:`StepSink`)."""
        label = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "bundle"
        if step is not None:
            step("verifying")
        try:
            bundle = self._verified(source)
        except EdgekitError as exc:
            self._event("install_refused", f"{label}: {exc}")
            raise
        except OSError as exc:  # unpacking a bundle file onto a full disk
            raise self._failed(label, exc, None) from None
        try:
            return self._install(bundle, allow_downgrade, make_room, step)
        finally:
            if isinstance(bundle, ExtractedBundle):  # refused, failed, or already installed
                shutil.rmtree(bundle.directory, ignore_errors=True)

    def _install(
        self,
        bundle: Bundle | ExtractedBundle | StagedBundle,
        allow_downgrade: bool,
        make_room: Callable[[], None] | None,
        step: StepSink | None = None,
    ) -> tuple[InstallResult, LoadedBundle]:
        ident = _identity(bundle)
        manifest = bundle.manifest
        with self.locked():
            pointer = self.pointer()
            current = pointer["current"]
            installed = None
            if current:
                with contextlib.suppress(EdgekitError, OSError):
                    installed = self._installed_manifest(current)
            try:
                self._check_versions(bundle, installed, allow_downgrade)
            except InstallError as exc:
                self._event("install_refused", str(exc), ident)
                raise
            name = _dir_name(bundle)
            if installed is not None and current == name:
                try:
                    loaded = self._load(name)  # verified from disk: it may have been damaged since
                except BundleError as exc:
                    log.warning("installed bundle %s is damaged (%s); writing it again", name, exc)
                else:
                    return InstallResult(
                        manifest.name,
                        manifest.version,
                        ident["bundle_id"],
                        name,
                        manifest.version,
                        False,
                        loaded.healthcheck_error,
                    ), loaded
            previous = current if current != name else pointer["previous"]
            try:
                if step is not None:
                    step("installing")
                if isinstance(bundle, Bundle):
                    written = self._extract(bundle, name)
                elif isinstance(bundle, ExtractedBundle):
                    written = self._move_into_place(bundle.directory, bundle, name)
                else:
                    written = self._move_into_place(bundle.directory, bundle.verified, name)
                if step is not None:
                    step("health-checking")
                if make_room is not None:
                    make_room()
                loaded = self._load(name, written)
                self._commit(name, previous)  # a full disk can refuse even the pointer
            except HealthCheckError as exc:
                self._event("healthcheck_failed", f"{manifest.label}: {exc}", ident)
                self._gc({current, pointer["previous"]})
                raise
            except (EdgekitError, OSError) as exc:
                # Keep whatever the pointer names now, should the failure have come after its rename.
                committed = self.pointer()
                self._gc({current, pointer["previous"], committed["current"], committed["previous"]})
                if isinstance(exc, OSError):
                    raise self._failed(manifest.label, exc, ident) from None
                self._event("install_failed", f"{manifest.label}: {exc}", ident)
                raise
            self._event("installed", f"installed {manifest.label} (id {ident['bundle_id'][:16]})", ident)
            self._gc({name, previous})
            previous_version = installed.manifest.version if installed is not None else None
            return InstallResult(
                manifest.name,
                manifest.version,
                ident["bundle_id"],
                name,
                previous_version,
                True,
                loaded.healthcheck_error,
            ), loaded

    def _check_versions(
        self,
        bundle: Bundle | ExtractedBundle | StagedBundle,
        installed: InstalledBundle | None,
        allow_downgrade: bool,
    ) -> None:
        manifest = bundle.manifest
        try:
            too_new = parse_version(manifest.min_agent_version) > parse_version(__version__)
        except ValueError:
            too_new = True
        if too_new:
            raise InstallError(
                f"{manifest.label} needs edgekit agent {manifest.min_agent_version} or newer "
                f"(this is {__version__}); upgrade the agent first"
            )
        if installed is None or allow_downgrade or installed.manifest.name != manifest.name:
            return
        have, want = parse_version(installed.manifest.version), parse_version(manifest.version)
        if want < have:
            raise InstallError(
                f"refusing to install {manifest.label} over {installed.manifest.label}: it is a downgrade; "
                "pass --allow-downgrade if you mean it"
            )
        if want == have and installed.bundle_id != bundle.bundle_id:
            raise InstallError(
                f"refusing to install {manifest.label}: a different bundle with the same version is "
                "installed; bump the version, or pass --allow-downgrade to replace it"
            )

    def _extract(self, bundle: Bundle, name: str) -> InstalledBundle:
        """Put ``bundle`` in ``bundles/name`` durably; returns it as installed (verified)."""
        final = self.bundles / name
        if final.is_dir():
            try:
                return self.read_installed(
                    name
                )  # already on disk and intact (e.g. the previous bundle again)
            except BundleError:
                shutil.rmtree(final, ignore_errors=True)
        tmp = self.bundles / f"{_TMP_PREFIX}{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        if bundle.signer is None:  # _verified() never returns one; a guard for future callers
            raise InstallError(f"{bundle.manifest.label} was not verified against a trusted key")
        bundle.extract(tmp)  # every file and the directory fsync'ed
        os.rename(tmp, final)
        fsync_dir(self.bundles)
        return InstalledBundle(
            bundle.manifest, bundle.manifest_bytes, bundle.signature, bundle.signer, bundle.members
        )

    def _move_into_place(self, directory: Path, verified: _Signed, name: str) -> InstalledBundle:
        """Make a staged download or an extracted file (``directory``, verified as ``verified``)
        durable (every file and the directory fsync'ed) and rename it to ``bundles/name``: it
        already has the installed layout, so nothing is copied. Returns it as installed, with
        its small members read (not the model: the runtime maps its file)."""
        final = self.bundles / name
        if final.is_dir():
            try:
                installed = self.read_installed(name)  # already on disk and intact (e.g. the previous bundle)
            except BundleError:
                shutil.rmtree(final, ignore_errors=True)
            else:
                shutil.rmtree(directory, ignore_errors=True)
                return installed
        names = [MANIFEST_FILE, SIGNATURE_FILE, *(entry.name for entry in verified.manifest.files)]
        for file_name in names:
            fd = os.open(directory / file_name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(directory)
        os.rename(directory, final)  # downloads and unpacking directories are under state_dir too
        fsync_dir(self.bundles)
        model_name = verified.manifest.model_file.name
        members = {
            entry.name: (final / entry.name).read_bytes()
            for entry in verified.manifest.files
            if entry.name != model_name
        }
        return InstalledBundle(
            verified.manifest, verified.manifest_bytes, verified.signature, verified.signer, members
        )

    def rollback(self) -> LoadedBundle:
        """Serve the previous bundle again (it becomes current, the current becomes previous)."""
        with self.locked():
            pointer = self.pointer()
            current, previous = pointer["current"], pointer["previous"]
            if not previous:
                raise InstallError("there is no previous bundle to roll back to")
            try:
                loaded = self._load(previous)
            except EdgekitError as exc:
                self._event("rollback_failed", f"previous bundle {previous} cannot be served: {exc}")
                raise InstallError(
                    f"cannot roll back: the previous bundle {previous} is unusable ({exc})"
                ) from None
            self._commit(previous, current)
            self._event("rolled_back", f"rolled back to {loaded.manifest.label}", loaded.identity())
            return loaded


class _Signed(Protocol):
    """A bundle whose signature a trusted key verified (a download's, or a file's)."""

    @property
    def manifest(self) -> Manifest: ...
    @property
    def manifest_bytes(self) -> bytes: ...
    @property
    def signature(self) -> bytes: ...
    @property
    def signer(self) -> str: ...


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[memoryview]:
    """The file at ``path`` as a read-only memoryview of a memory map (empty for an empty file)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            yield memoryview(b"")
            return
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                yield view
            finally:
                view.release()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _is_staged(source: object) -> bool:
    """True for a :class:`~edgekit.transfer.StagedBundle` (only exists once transfer is imported)."""
    transfer = sys.modules.get("edgekit.transfer")
    return transfer is not None and isinstance(source, transfer.StagedBundle)


def _safe_dir_name(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..") and not name.startswith(".")
