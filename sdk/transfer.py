"""Bundles over MQTT: retained chunks on the broker, and a resumable, verifying assembler.

A bundle is published as retained messages, so a device that joins late or reboots fetches
it from the broker alone:

- ``{prefix}/bundles/{digest}/chunks/{i}``: the raw bytes of transport chunk ``i``. The
  payload is the bundle's members (not the tar) concatenated in manifest order, cut every
  ``transport.chunk_size`` bytes, exactly as the signed manifest's chunk plan lists them.
- ``{prefix}/bundles/{digest}/manifest``: a JSON message holding ``manifest.json`` and
  ``manifest.sig`` (base64), so the device checks the signature and the digest BEFORE it
  fetches a single chunk. Published first (:func:`start_upload`), so that devices told about
  the bundle right away fetch its chunks while they are being published; a device waits for
  chunks that are not on the broker yet.

``digest`` (:attr:`Bundle.bundle_id <edgekit.bundle.Bundle.bundle_id>`) is the SHA-256 of the exact ``manifest.json`` bytes. The
signed desired state names it, the manifest lists every chunk's and member's SHA-256, so one
trusted signature pins every byte.

:class:`ChunkAssembler` is the device side, pure (no paho): it stores chunks in a directory as
they arrive, straight into their place in the final ``.ekb``, or (the agent's choice) in the
layout of an installed bundle, one file per member (a restart resumes: stored chunks are
re-hashed, the good ones kept), drops a chunk whose size or SHA-256 does not match the plan
(reported for re-fetch), never writes more than the manifest declares, and yields a bundle that
:func:`edgekit.bundle.read_bundle` verifies, or a :class:`StagedBundle` whose every byte matched
the signed chunk plan. :func:`start_upload` / :func:`publish_bundle`, :func:`fetch_bundle` /
:func:`fetch_staged_bundle` and :func:`clear_bundle` are the thin MQTT shells around it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import json
import logging
import os
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from .atomic import atomic_write
from .bundle import (
    MANIFEST_FILE,
    MAX_BUNDLE_SIZE,
    SIGNATURE_FILE,
    Bundle,
    manifest_id,
    read_bundle,
    verify_manifest_signature,
)
from .errors import BrokerError, BundleError, DownloadCancelledError, DownloadStalledError, InstallError
from .manifest import Manifest
from .mqtt import Message, MqttClient
from .schema import Fields, check_schema, load_json, refuse
from .topics import Topics
from .trust import TrustedKeys

__all__ = [
    "ChunkAssembler",
    "ChunkResult",
    "StagedBundle",
    "Upload",
    "VerifiedManifest",
    "bundle_messages",
    "clear_bundle",
    "fetch_bundle",
    "fetch_staged_bundle",
    "manifest_message",
    "publish_bundle",
    "start_upload",
    "verify_manifest_message",
]

log = logging.getLogger(__name__)

MANIFEST_MESSAGE_SCHEMA = "edgekit.bundle-manifest"
MANIFEST_MESSAGE_VERSION = 1
MAX_MANIFEST_MESSAGE = 2 * 1024 * 1024
PART_FILE = "bundle.ekb.part"
BUNDLE_FILE = "bundle.ekb"
#: Seconds without anything of the bundle from the broker (while connected) before a download
#: fails with DownloadStalledError.
STALL_TIMEOUT = 120.0
#: Seconds without a chunk through the ``chunks/+`` subscription before the device also asks
#: for chunks by their exact topics (brokers that send retained messages to those only).
WILDCARD_WAIT = 3.0
#: Exact-topic chunk subscriptions held at once in that case.
EXACT_WINDOW = 16
_TICK = 0.2  # how often the fetch looks at its clocks


@dataclass(frozen=True)
class VerifiedManifest:
    """A manifest whose signature a trusted key made and whose digest is the one asked for."""

    digest: str
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    signer: str


def manifest_message(bundle: Bundle) -> bytes:
    """The retained manifest message of a bundle (versioned JSON)."""
    return json.dumps(
        {
            "schema": MANIFEST_MESSAGE_SCHEMA,
            "schema_version": MANIFEST_MESSAGE_VERSION,
            "manifest": base64.b64encode(bundle.manifest_bytes).decode("ascii"),
            "signature": base64.b64encode(bundle.signature).decode("ascii"),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode("ascii")


def verify_manifest_message(
    data: bytes, trusted: TrustedKeys, digest: str, max_size: int = MAX_BUNDLE_SIZE
) -> VerifiedManifest:
    """Check a manifest message against the digest the signed desired state names, and the
    signature against ``trusted``. BundleError (SignatureError, UntrustedKeyError) if not."""
    what = f"the manifest message of bundle {digest[:12]}"
    if len(data) > MAX_MANIFEST_MESSAGE:
        raise BundleError(f"{what} is over {MAX_MANIFEST_MESSAGE} bytes")
    doc = check_schema(
        load_json(
            bytes(data),
            what,
            limit=MAX_MANIFEST_MESSAGE,
            error=BundleError,
            reason="malformed",
            not_json=f"{what} is malformed ({{exc}})",
        ),
        MANIFEST_MESSAGE_SCHEMA,
        MANIFEST_MESSAGE_VERSION,
        what,
        BundleError,
        reason="malformed",
        wrong_schema=f"{what} is malformed (not a manifest message)",
        wrong_version=f"{what} is malformed (version {{found!r}} is not supported; upgrade edgekit)",
    )
    f = Fields(doc, what, BundleError, "malformed")
    try:
        manifest_bytes = base64.b64decode(
            f.required_text("manifest", MAX_MANIFEST_MESSAGE, f"{what} is malformed (no manifest)"),
            validate=True,
        )
        signature = base64.b64decode(
            f.required_text("signature", 128, f"{what} is malformed (no signature)"), validate=True
        )
    except (ValueError, binascii.Error) as exc:
        raise refuse(BundleError, "malformed", f"{what} is malformed ({exc})") from None
    if manifest_id(manifest_bytes) != digest:
        raise BundleError(
            f"the manifest published for bundle {digest[:12]} has another digest; "
            "it is not the bundle the desired state names (mix-and-match), refusing it"
        )
    signer = verify_manifest_signature(manifest_bytes, signature, trusted)
    manifest = Manifest.from_json(manifest_bytes)
    if manifest.chunks.total_size > max_size:
        raise BundleError(
            f"bundle {manifest.label} is {manifest.chunks.total_size} bytes, over the {max_size}-byte limit"
        )
    return VerifiedManifest(digest, manifest, manifest_bytes, signature, signer)


def _chunks(bundle: Bundle) -> Iterator[bytes]:
    """The transport chunks: the members concatenated in manifest order, cut every
    ``chunk_size`` bytes. Sliced from the members (one copy of each byte), not from a joined
    copy of the whole payload: this runs on the workstation while devices wait for chunks."""
    size = bundle.manifest.chunks.chunk_size
    pieces: list[bytes] = []
    pending = 0
    for entry in bundle.manifest.files:
        data = bundle.members[entry.name]
        pos = 0
        while pos < len(data):
            take = min(size - pending, len(data) - pos)
            pieces.append(data[pos : pos + take])
            pos += take
            pending += take
            if pending == size:
                yield b"".join(pieces)  # a single piece is returned as is, not copied
                pieces, pending = [], 0
    if pieces:
        yield b"".join(pieces)


def bundle_messages(bundle: Bundle, topics: Topics) -> Iterator[tuple[str, bytes]]:
    """(topic, payload) of every retained message of a bundle: chunks in order, manifest last."""
    digest = bundle.bundle_id
    for index, chunk in enumerate(_chunks(bundle)):
        yield topics.bundle_chunk(digest, index), chunk
    yield topics.bundle_manifest(digest), manifest_message(bundle)


class Upload:
    """A bundle on its way to the broker, made by :func:`start_upload`: its manifest is there,
    :meth:`finish` publishes the chunks."""

    def __init__(self, client: MqttClient, bundle: Bundle, topics: Topics, qos: int) -> None:
        self.client = client
        self.bundle = bundle
        self.topics = topics
        self.qos = qos

    @property
    def digest(self) -> str:
        return self.bundle.bundle_id

    def finish(self, *, timeout: float = 300.0, progress: Optional[Callable[[int, int], None]] = None) -> str:
        """Publish every chunk (retained) and wait until the broker has them all; returns the
        digest. ``progress(sent_bytes, total_bytes)`` is called as the broker acknowledges
        chunks. BrokerError if the broker does not take them within ``timeout``."""
        deadline = time.monotonic() + timeout
        bundle = self.bundle
        messages = list(bundle_messages(bundle, self.topics))[:-1]  # the manifest is there already
        deliveries = [
            (self.client.publish(topic, data, qos=self.qos, retain=True), len(data))
            for topic, data in messages
        ]
        sent = 0
        for delivery, length in deliveries:
            delivery.wait(max(0.0, deadline - time.monotonic()))
            sent += length
            if progress is not None:
                progress(sent, bundle.manifest.chunks.total_size)
        log.info(
            "published bundle %s (%s) in %d chunks", bundle.manifest.label, self.digest[:12], len(deliveries)
        )
        return self.digest


def start_upload(
    client: MqttClient,
    bundle: Bundle,
    topics: Optional[Topics] = None,
    *,
    qos: int = 1,
    timeout: float = 30.0,
) -> Upload:
    """Publish a bundle's manifest (retained) and wait for the broker to have it; then
    :meth:`Upload.finish` publishes the chunks.

    Publish the desired state naming the bundle in between: devices then verify the manifest
    and subscribe to the chunks while they are being published, so the fan-out to the fleet
    overlaps the upload instead of following it. A device checks the manifest's signature
    before it takes any chunk, and waits for chunks that are not on the broker yet (an upload
    cut short is completed by publishing the bundle again).
    """
    topics = topics or Topics()
    client.publish(
        topics.bundle_manifest(bundle.bundle_id), manifest_message(bundle), qos=qos, retain=True
    ).wait(timeout)
    return Upload(client, bundle, topics, qos)


def publish_bundle(
    client: MqttClient,
    bundle: Bundle,
    topics: Optional[Topics] = None,
    *,
    qos: int = 1,
    timeout: float = 300.0,
    progress: Optional[Callable[[int, int], None]] = None,
) -> str:
    """Publish a bundle as retained messages (manifest, then chunks) and wait until the broker
    has them all: :func:`start_upload` then :meth:`Upload.finish`. Returns the bundle digest."""
    return start_upload(client, bundle, topics, qos=qos, timeout=timeout).finish(
        timeout=timeout, progress=progress
    )


def clear_bundle(
    client: MqttClient, digest: str, chunk_count: int, topics: Optional[Topics] = None, timeout: float = 60.0
) -> None:
    """Remove a bundle's retained messages (empty retained publishes), manifest first so no
    device starts fetching a bundle that is going away."""
    topics = topics or Topics()
    deliveries = [client.publish(topics.bundle_manifest(digest), b"", qos=1, retain=True)]
    deliveries += [
        client.publish(topics.bundle_chunk(digest, index), b"", qos=1, retain=True)
        for index in range(chunk_count)
    ]
    deadline = time.monotonic() + timeout
    for delivery in deliveries:
        delivery.wait(max(0.0, deadline - time.monotonic()))
    log.info("cleared bundle %s (%d chunks)", digest[:12], chunk_count)


class ChunkResult:
    """What :meth:`ChunkAssembler.add` did with a chunk."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    BAD_INDEX = "bad-index"
    BAD_SIZE = "bad-size"
    BAD_HASH = "bad-hash"
    BAD = (BAD_INDEX, BAD_SIZE, BAD_HASH)


@dataclass(frozen=True)
class _Segment:
    """One member's bytes inside the transport payload, and where they go: file ``slot`` of
    the assembler, at ``file_offset``."""

    payload_start: int
    size: int
    file_offset: int
    slot: int = 0


def _tar_layout(verified: VerifiedManifest) -> tuple[list[tuple[int, bytes]], list[_Segment], int]:
    """The .ekb that ``create_bundle`` wrote, laid out in advance: the fixed blocks to write
    (tar headers, manifest, signature) with their offsets, where each member's bytes go, and
    the file size. Laid out the way :mod:`tarfile` writes a USTAR archive, so a bundle
    rebuilt from chunks is byte-identical to the original."""
    mtime = _epoch(verified.manifest.created_at)
    fixed: list[tuple[int, bytes]] = []
    segments: list[_Segment] = []
    offset = 0

    def header(name: str, size: int) -> None:
        nonlocal offset
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, mtime, 0o644
        fixed.append((offset, info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")))
        offset += tarfile.BLOCKSIZE

    def padded(size: int) -> int:
        return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE

    for name, data in ((MANIFEST_FILE, verified.manifest_bytes), (SIGNATURE_FILE, verified.signature)):
        header(name, len(data))
        fixed.append((offset, data))
        offset += padded(len(data))
    payload_start = 0
    for entry in verified.manifest.files:
        header(entry.name, entry.size)
        segments.append(_Segment(payload_start, entry.size, offset))
        payload_start += entry.size
        offset += padded(entry.size)
    offset += 2 * tarfile.BLOCKSIZE  # end-of-archive marker (zeros)
    offset += -offset % tarfile.RECORDSIZE  # tarfile pads to whole records
    return fixed, segments, offset


@dataclass(frozen=True)
class StagedBundle:
    """A bundle downloaded as files (:func:`fetch_staged_bundle`): ``directory`` holds
    ``manifest.json``, ``manifest.sig`` and every member under its own name, exactly the layout
    of an installed bundle. Every chunk matched the signed plan, and the members are exactly
    the payload those chunks cut, at the sizes the signed manifest gives, so every member equals
    what the signer hashed (the member SHA-256s are not computed again; see docs/security.md).
    The files are not fsync'ed: whoever moves the directory into place makes it durable."""

    directory: Path
    verified: VerifiedManifest

    @property
    def manifest(self) -> Manifest:
        return self.verified.manifest

    @property
    def bundle_id(self) -> str:
        return self.verified.digest


class ChunkAssembler:
    """Collects the chunks of one verified bundle in ``directory`` and rebuilds the bundle.

    ``layout="ekb"`` (the default): chunks are written straight into their place in
    ``bundle.ekb.part``, laid out as the final ``.ekb`` (tar headers, manifest and signature are
    written first), so finishing (:meth:`finish`) is a rename, not a copy.
    ``layout="files"``: each member is its own file in ``directory`` beside ``manifest.json``
    and ``manifest.sig`` (the layout of an installed bundle), so :meth:`finish_staged` reads
    nothing back; an installer then moves the directory into place instead of extracting a
    copy.

    Creating an assembler on a directory that already holds a partial download of the same
    bundle resumes it: each chunk's bytes on disk are re-hashed and the good ones kept (a chunk
    torn by a power loss is simply fetched again). Not thread-safe: call it from one thread
    (the MQTT dispatcher thread, for instance).
    """

    EKB = "ekb"
    FILES = "files"

    def __init__(self, directory: Path, verified: VerifiedManifest, layout: str = EKB) -> None:
        if layout not in (self.EKB, self.FILES):
            raise ValueError(f"unknown layout {layout!r}")
        self.directory = Path(directory)
        self.verified = verified
        self.layout = layout
        plan = verified.manifest.chunks
        self._plan = plan
        self.directory.mkdir(parents=True, exist_ok=True)
        stored = self.directory / MANIFEST_FILE
        if stored.exists() and stored.read_bytes() != verified.manifest_bytes:
            raise BundleError(
                f"{self.directory} holds a download of another bundle; use one directory per bundle digest"
            )
        if not stored.exists():
            atomic_write(self.directory / SIGNATURE_FILE, verified.signature)
            atomic_write(stored, verified.manifest_bytes)
        self._fds: list[int] = []
        try:
            self._open_layout(layout)
        except BaseException:
            self.close()  # a full disk, a bad file: nothing stays open
            raise

    def _open_layout(self, layout: str) -> None:
        verified, plan = self.verified, self._plan
        existing = 0
        if layout == self.EKB:
            fixed, self._segments, file_size = _tar_layout(verified)
            self._file_size = file_size
            existing = self._open(self.directory / PART_FILE, file_size)
            for offset, data in fixed:
                os.pwrite(self._fds[0], data, offset)
        else:
            self._segments = []
            start = 0
            for slot, entry in enumerate(verified.manifest.files):
                self._segments.append(_Segment(start, entry.size, 0, slot))
                start += entry.size
                existing += self._open(self.directory / entry.name, entry.size)
            self._file_size = start
        self._have: set[int] = set()
        self._received = 0
        self.rejected = 0
        #: Chunks that failed their check and still need a good copy.
        self.bad: set[int] = set()
        for index in range(len(plan.sha256) if existing else 0):  # a new file holds no chunk yet
            chunk = self._read(index)
            if chunk is not None:
                self._have.add(index)
                self._received += self._expected_size(index)
        if self._have:
            log.info(
                "resuming bundle %s: %d of %d chunks already stored",
                verified.manifest.label,
                len(self._have),
                len(plan.sha256),
            )

    def _open(self, path: Path, size: int) -> int:
        """Open (create) one file of the layout at exactly ``size`` bytes; returns the size it had."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self._fds.append(fd)
        existing = os.fstat(fd).st_size
        if existing != size:
            os.ftruncate(fd, size)  # never more than the manifest declares
        return existing

    def reserve(self) -> None:
        """Allocate the download's whole size on disk now (``posix_fallocate``): a disk without
        room fails here, before any chunk is stored, and the chunk writes that follow only copy.
        The fetch calls it right after asking for the chunks, while they are on their way.
        OSError (ENOSPC) if there is no room; nothing where the file system cannot preallocate."""
        for fd in self._fds:
            size = os.fstat(fd).st_size
            if size:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise

    @classmethod
    def resume(cls, directory: Path, trusted: TrustedKeys, digest: str, layout: str = EKB) -> ChunkAssembler:
        """Reopen a download after a restart, re-verifying the stored manifest."""
        directory = Path(directory)
        try:
            manifest_bytes = (directory / MANIFEST_FILE).read_bytes()
            signature = (directory / SIGNATURE_FILE).read_bytes()
        except OSError:
            raise BundleError(f"{directory} holds no download to resume") from None
        if manifest_id(manifest_bytes) != digest:
            raise BundleError(f"{directory} holds a download of another bundle than {digest[:12]}")
        signer = verify_manifest_signature(manifest_bytes, signature, trusted)
        manifest = Manifest.from_json(manifest_bytes)
        return cls(directory, VerifiedManifest(digest, manifest, manifest_bytes, signature, signer), layout)

    def _expected_size(self, index: int) -> int:
        size = self._plan.chunk_size
        return min(size, self._plan.total_size - index * size)

    def _spans(self, index: int) -> Iterator[tuple[int, _Segment, int, int]]:
        """(offset in chunk, segment, offset in its file, length) of each piece of chunk ``index``."""
        start = index * self._plan.chunk_size
        end = start + self._expected_size(index)
        for seg in self._segments:
            lo, hi = max(start, seg.payload_start), min(end, seg.payload_start + seg.size)
            if lo < hi:
                yield lo - start, seg, seg.file_offset + lo - seg.payload_start, hi - lo

    def _pread(self, index: int) -> bytes:
        return b"".join(
            os.pread(self._fds[seg.slot], length, at) for _, seg, at, length in self._spans(index)
        )

    def _read(self, index: int) -> Optional[bytes]:
        data = self._pread(index)
        if (
            len(data) == self._expected_size(index)
            and hashlib.sha256(data).hexdigest() == self._plan.sha256[index]
        ):
            return data
        return None

    @property
    def chunk_count(self) -> int:
        return len(self._plan.sha256)

    def has(self, index: int) -> bool:
        """Whether chunk ``index`` is stored (and matched the plan)."""
        return index in self._have

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.chunk_count) if i not in self._have]

    @property
    def complete(self) -> bool:
        return len(self._have) == self.chunk_count

    @property
    def received_bytes(self) -> int:
        return self._received

    @property
    def total_bytes(self) -> int:
        return self._plan.total_size

    def add(self, index: int, data: bytes) -> str:
        """Store chunk ``index`` if it is exactly what the signed plan says; returns a
        :class:`ChunkResult`. A bad chunk is dropped, counted, and listed in :attr:`bad`."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.chunk_count:
            self.rejected += 1
            log.warning("dropped chunk %r of bundle %s: no such chunk", index, self.verified.manifest.label)
            return ChunkResult.BAD_INDEX
        if index in self._have:
            return ChunkResult.DUPLICATE
        expected = self._expected_size(index)
        if len(data) != expected:
            result = ChunkResult.BAD_SIZE
        elif hashlib.sha256(data).hexdigest() != self._plan.sha256[index]:
            result = ChunkResult.BAD_HASH
        else:
            view = memoryview(data)
            for in_chunk, seg, at, length in self._spans(index):
                if os.pwrite(self._fds[seg.slot], view[in_chunk : in_chunk + length], at) != length:
                    raise BundleError(f"short write storing chunk {index} in {self.directory} (disk full?)")
            self._have.add(index)
            self._received += expected
            self.bad.discard(index)
            return ChunkResult.STORED
        self.rejected += 1
        self.bad.add(index)
        log.warning(
            "dropped chunk %d of bundle %s (%s: %d bytes, expected %d); it must be fetched again",
            index,
            self.verified.manifest.label,
            result,
            len(data),
            expected,
        )
        return result

    def _check_complete(self) -> None:
        if not self.complete:
            raise BundleError(
                f"bundle {self.verified.manifest.label} is incomplete: {len(self.missing)} chunks missing"
            )

    def finish(self, trusted: TrustedKeys) -> Bundle:
        """Rename the download to ``bundle.ekb`` and verify it in full with :func:`read_bundle`
        (signature, every member's SHA-256). A bundle that fails is deleted, never left to be
        trusted later.

        The file is not fsync'ed: it is a staging copy that an installer writes durably where
        it belongs. After a power loss a torn ``bundle.ekb`` fails the re-verification a later
        :func:`fetch_bundle` makes, and is fetched again."""
        if self.layout != self.EKB:
            raise ValueError("finish() rebuilds an .ekb; use finish_staged() for the files layout")
        self._check_complete()
        self.close()
        final = self.directory / BUNDLE_FILE
        os.replace(self.directory / PART_FILE, final)
        try:
            return read_bundle(final, trusted, max_size=self._file_size)
        except BundleError:
            final.unlink()
            raise

    def finish_staged(self) -> StagedBundle:
        """The download as files (``layout="files"``): every chunk matched the signed plan and
        landed at the offset the signed member sizes give, so each member holds exactly the
        payload bytes the signer cut into those chunks. Member SHA-256s are not computed again
        (a second pass over every byte that only a signer's own inconsistency could fail; the
        workstation's :func:`~edgekit.bundle.read_bundle` checks them before publishing, and
        :meth:`BundleStore.read_installed <edgekit.agent.install.BundleStore.read_installed>`
        at every restart)."""
        if self.layout != self.FILES:
            raise ValueError("finish_staged() needs the files layout; use finish() for an .ekb")
        self._check_complete()
        self.close()
        return StagedBundle(self.directory, self.verified)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _epoch(created_at: str) -> int:
    try:
        return int(
            datetime.strptime(created_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
        )
    except ValueError:
        return 0


def _finished_download(directory: Path, trusted: TrustedKeys, digest: str, max_size: int) -> Optional[Bundle]:
    """The bundle an earlier fetch completed in ``directory``, re-verified; None if there is none."""
    path = directory / BUNDLE_FILE
    try:
        stored = (directory / MANIFEST_FILE).read_bytes()
    except OSError:
        return None
    if not path.exists() or hashlib.sha256(stored).hexdigest() != digest:
        return None
    try:
        bundle = read_bundle(path, trusted, max_size)
    except BundleError as exc:
        log.warning("discarding the stored download of bundle %s: %s", digest[:12], exc)
        path.unlink()
        return None
    return bundle if bundle.manifest_bytes == stored else None


def _storage_failed(exc: OSError, directory: Path) -> InstallError:
    hint = "free some space" if exc.errno == errno.ENOSPC else "check the state directory"
    return InstallError(f"cannot store the download in {directory}: {exc.strerror or exc}; {hint}")


def _discard_damaged_download(directory: Path, digest: str) -> None:
    """A download directory whose stored manifest is not bundle ``digest``'s (torn, or garbage)
    cannot be resumed: start it over rather than refuse the bundle."""
    try:
        stored = (directory / MANIFEST_FILE).read_bytes()
    except FileNotFoundError:
        return
    except OSError:
        stored = b""
    if manifest_id(stored) != digest:
        log.warning("discarding a damaged partial download of bundle %s in %s", digest[:12], directory)
        for name in (MANIFEST_FILE, SIGNATURE_FILE, PART_FILE, BUNDLE_FILE):
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()


def fetch_bundle(
    client: MqttClient,
    digest: str,
    trusted: TrustedKeys,
    directory: Path,
    topics: Optional[Topics] = None,
    *,
    timeout: Optional[float] = 600.0,
    max_refetch: int = 3,
    max_size: int = MAX_BUNDLE_SIZE,
    progress: Optional[Callable[[int, int], None]] = None,
    stall_timeout: float = STALL_TIMEOUT,
    cancel: Optional[threading.Event] = None,
) -> Bundle:
    """Fetch bundle ``digest`` from the broker's retained messages into ``directory`` and
    return it verified. Resumes a partial download in ``directory``; survives broker outages
    (the client re-subscribes and the broker re-sends what is retained); returns a download
    an earlier call completed in ``directory`` after re-verifying it; re-fetches a chunk
    that fails its check up to ``max_refetch`` times. When ``chunks/+`` brings nothing for
    ``WILDCARD_WAIT`` seconds, it also asks for missing chunks by their exact topics,
    ``EXACT_WINDOW`` at a time (brokers that send retained messages to exact-topic
    subscriptions only). BundleError if the bundle is not trusted or a chunk stays corrupt;
    InstallError if it cannot be stored (a full disk); DownloadStalledError if nothing of the
    bundle arrives for ``stall_timeout`` seconds while connected (the inactivity timeout);
    BrokerError if it does not all arrive within ``timeout`` (None: no overall limit);
    DownloadCancelledError within ``_TICK`` seconds of ``cancel`` being set (what was stored
    is kept for a later call). Every file it opened is closed on every way out.
    """
    finished = _finished_download(Path(directory), trusted, digest, max_size)
    if finished is not None:
        return finished
    assembler = _fetch(
        client,
        digest,
        trusted,
        directory,
        topics,
        timeout,
        max_refetch,
        max_size,
        progress,
        ChunkAssembler.EKB,
        stall_timeout,
        cancel,
    )
    try:
        return assembler.finish(trusted)
    except OSError as exc:
        raise _storage_failed(exc, Path(directory)) from None
    finally:
        assembler.close()


def fetch_staged_bundle(
    client: MqttClient,
    digest: str,
    trusted: TrustedKeys,
    directory: Path,
    topics: Optional[Topics] = None,
    *,
    timeout: Optional[float] = 600.0,
    max_refetch: int = 3,
    max_size: int = MAX_BUNDLE_SIZE,
    progress: Optional[Callable[[int, int], None]] = None,
    stall_timeout: float = STALL_TIMEOUT,
    cancel: Optional[threading.Event] = None,
) -> StagedBundle:
    """Like :func:`fetch_bundle`, but the bundle is laid out as files in ``directory``
    (:class:`StagedBundle`: the layout of an installed bundle, every chunk checked),
    so a device installs it by moving the directory, without reading it back or copying it.
    A download completed earlier in ``directory`` is re-hashed from disk, not fetched again."""
    assembler = _fetch(
        client,
        digest,
        trusted,
        directory,
        topics,
        timeout,
        max_refetch,
        max_size,
        progress,
        ChunkAssembler.FILES,
        stall_timeout,
        cancel,
    )
    try:
        return assembler.finish_staged()
    except OSError as exc:
        raise _storage_failed(exc, Path(directory)) from None
    finally:
        assembler.close()


class _ExactWindow:
    """Exact-topic subscriptions to missing chunks, at most ``size`` at a time, for a broker
    that sends retained messages to exact-topic subscriptions only (RabbitMQ's MQTT plugin,
    some cloud services): subscribing to ``.../chunks/+`` gets nothing there, ``.../chunks/0``
    gets chunk 0. A stored chunk's subscription is dropped and the next missing chunk's taken,
    so the device never holds hundreds of subscriptions. Thread-safe (the fetch's thread
    opens it, the dispatcher thread moves it)."""

    def __init__(self, client: MqttClient, topics: Topics, digest: str, size: int) -> None:
        self.client = client
        self.topics = topics
        self.digest = digest
        self.size = size
        self.open = False
        self.subscribed: set[int] = set()
        self._cursor = 0
        self._lock = threading.Lock()

    def fill(self, assembler: ChunkAssembler, handler: Callable[[Message], None]) -> None:
        """Subscribe to missing chunks, in order (wrapping around), until ``size`` are held."""
        with self._lock:
            self.open = True
            count = assembler.chunk_count
            for _ in range(count):
                if len(self.subscribed) >= self.size:
                    break
                index, self._cursor = self._cursor, (self._cursor + 1) % count
                if index not in self.subscribed and not assembler.has(index):
                    self.subscribed.add(index)
                    self.client.subscribe(self.topics.bundle_chunk(self.digest, index), handler, timeout=None)

    def release(self, index: int) -> bool:
        """Drop chunk ``index``'s subscription; False if it held none."""
        with self._lock:
            if index not in self.subscribed:
                return False
            self.subscribed.discard(index)
        self.client.unsubscribe(self.topics.bundle_chunk(self.digest, index))
        return True

    def close(self) -> None:
        with self._lock:
            held, self.subscribed = self.subscribed, set()
        for index in held:
            self.client.unsubscribe(self.topics.bundle_chunk(self.digest, index))


def _fetch(
    client: MqttClient,
    digest: str,
    trusted: TrustedKeys,
    directory: Path,
    topics: Optional[Topics],
    timeout: Optional[float],
    max_refetch: int,
    max_size: int,
    progress: Optional[Callable[[int, int], None]],
    layout: str,
    stall_timeout: float,
    cancel: Optional[threading.Event] = None,
) -> ChunkAssembler:
    """Collect every chunk of ``digest`` into a complete assembler (not finished yet; the
    caller closes it). On any other way out, the assembler's files are closed here, after the
    handlers were shut out: a handler still running on the dispatcher thread must never write
    through a descriptor that was closed (and perhaps reused for another file)."""
    topics = topics or Topics()
    _discard_damaged_download(Path(directory), digest)
    done = threading.Event()
    state: dict[str, object] = {}
    assembler_box: list[ChunkAssembler] = []
    attempts: dict[int, int] = {}
    refetching: set[int] = set()
    chunk_prefix = topics.bundle_manifest(digest)[: -len("manifest")] + "chunks/"
    window = _ExactWindow(client, topics, digest, EXACT_WINDOW)
    #: When the broker last sent something of this bundle (monotonic seconds).
    last_arrival = [time.monotonic()]
    #: Held by the handlers while they touch the assembler; ``shut[0]`` set under it: no more.
    guard = threading.Lock()
    shut = [False]

    def fail(error: Exception) -> None:
        state.setdefault("error", error)
        done.set()

    def on_chunk(message: Message) -> None:
        with guard:
            if not shut[0]:
                take_chunk(message)

    def take_chunk(message: Message) -> None:
        if done.is_set() or not assembler_box:
            return
        assembler = assembler_box[0]
        try:
            index = int(message.topic[len(chunk_prefix) :])
        except ValueError:
            return
        if not message.payload:
            return  # a cleared chunk
        try:
            result = assembler.add(index, message.payload)
        except OSError as exc:  # a full disk: no point fetching on
            fail(_storage_failed(exc, Path(directory)))
            return
        except BundleError as exc:  # a short write: the disk filled up under us
            fail(exc)
            return
        if result == ChunkResult.STORED:
            last_arrival[0] = time.monotonic()
        if index in refetching and result not in ChunkResult.BAD:
            refetching.discard(index)
            client.unsubscribe(topics.bundle_chunk(digest, index))
        if result in ChunkResult.BAD and result != ChunkResult.BAD_INDEX:
            attempts[index] = attempts.get(index, 0) + 1
            if attempts[index] > max_refetch:
                fail(
                    BundleError(
                        f"chunk {index} of bundle {assembler.verified.manifest.label} failed its SHA-256 check "
                        f"{attempts[index]} times: the broker's retained copy is corrupt; publish the bundle again"
                    )
                )
                return
            # Subscribing to the chunk's own topic makes the broker re-send its retained copy.
            if not window.release(index):
                refetching.add(index)
                client.subscribe(topics.bundle_chunk(digest, index), on_chunk, timeout=None)
            else:
                window.fill(assembler, on_chunk)  # the window takes it again, at its turn
        elif window.release(index):
            window.fill(assembler, on_chunk)
        if progress is not None and result == ChunkResult.STORED:
            progress(assembler.received_bytes, assembler.total_bytes)
        if assembler.complete:
            done.set()

    def on_manifest(message: Message) -> None:
        with guard:
            if not shut[0]:
                take_manifest(message)

    def take_manifest(message: Message) -> None:
        if assembler_box or done.is_set() or not message.payload:
            return
        last_arrival[0] = time.monotonic()
        try:
            verified = verify_manifest_message(message.payload, trusted, digest, max_size)
            assembler = ChunkAssembler(directory, verified, layout)
        except BundleError as exc:
            fail(exc)
            return
        except OSError as exc:
            fail(_storage_failed(exc, Path(directory)))
            return
        assembler_box.append(assembler)
        if assembler.complete:
            done.set()
            return
        if progress is not None:
            progress(assembler.received_bytes, assembler.total_bytes)
        client.subscribe(topics.bundle_chunks_filter(digest), on_chunk, timeout=None)
        try:  # while the subscription goes out and the first chunks come back
            assembler.reserve()
        except OSError as exc:
            fail(_storage_failed(exc, Path(directory)))

    def what() -> tuple[str, str]:
        """The bundle's name for messages, and what of it is still missing."""
        if not assembler_box:
            return f"bundle {digest[:12]}", "its manifest"
        assembler = assembler_box[0]
        missing = f"{len(assembler.missing)} of {assembler.chunk_count} chunks"
        return f"bundle {assembler.verified.manifest.label} ({digest[:12]})", missing

    manifest_topic = topics.bundle_manifest(digest)
    client.subscribe(manifest_topic, on_manifest, timeout=None)
    deadline = float("inf") if timeout is None else time.monotonic() + timeout
    complete = False
    try:
        while not done.wait(_TICK):
            now = time.monotonic()
            if cancel is not None and cancel.is_set():
                name, missing = what()
                raise DownloadCancelledError(f"the download of {name} was cancelled ({missing} missing)")
            if now >= deadline:
                name, missing = what()
                raise BrokerError(
                    f"{name} did not arrive within {timeout:g}s ({missing} missing); "
                    "is it published, and is the broker reachable?"
                )
            if not client.connected:
                last_arrival[0] = now  # an outage is not a stall: the clock starts again on reconnect
                continue
            quiet = now - last_arrival[0]
            if quiet >= stall_timeout:
                name, missing = what()
                raise DownloadStalledError(
                    f"the download of {name} stalled: {missing} still missing, and nothing came "
                    f"from the broker for {stall_timeout:g}s; publish the bundle again (edgekit push) "
                    "and check that the broker keeps retained messages"
                )
            if assembler_box and not window.open and quiet >= WILDCARD_WAIT:
                # The wildcard brought nothing: ask for the chunks by their exact topics as well.
                log.info("%s: no chunk came through chunks/+; asking chunk by chunk", what()[0])
                window.fill(assembler_box[0], on_chunk)
        complete = "error" not in state
    finally:
        with guard:  # a handler running now finishes first; none runs after
            shut[0] = True
        if not complete and assembler_box:
            assembler_box[0].close()
        client.unsubscribe(manifest_topic)
        client.unsubscribe(topics.bundle_chunks_filter(digest))
        window.close()
        for index in list(refetching):
            client.unsubscribe(topics.bundle_chunk(digest, index))
    error = state.get("error")
    if isinstance(error, Exception):
        raise error
    return assembler_box[0]
