"""A bounded, on-disk, store-and-forward queue of JSON records (telemetry, events).

Each record is one file, ``{seq:016d}.json``, written with :func:`edgekit.atomic.atomic_write`,
so a crash leaves whole records only. ``seq`` only grows, across restarts too: the next
number is kept in ``meta.json`` and never below the newest file's. When the queue holds
``max_records``, the oldest records are deleted to make room, and the records put next carry
the count: ``dropped`` (since the last record) and ``dropped_total`` (since the queue was
created). Records are delivered oldest first and removed only when acknowledged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from edgekit.atomic import atomic_write

__all__ = ["Outbox"]

log = logging.getLogger(__name__)

_META = "meta.json"
_SUFFIX = ".json"


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


class Outbox:
    """A directory of queued records. Thread-safe within a process; one writer process at a time."""

    def __init__(self, directory: Path, max_records: int) -> None:
        if max_records < 1:
            raise ValueError("an outbox holds at least one record")
        self.directory = Path(directory)
        self.max_records = max_records
        self._lock = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seqs = sorted(self._scan())
        meta = self._read_meta()
        newest = self._seqs[-1] + 1 if self._seqs else 1
        if meta is None:
            # The counter is lost, and records already delivered may have used higher numbers:
            # go on from the clock (milliseconds), above any number this outbox handed out
            # unless it queued more than a thousand records a second, so seq still only grows.
            newest = max(newest, int(time.time() * 1000))
            meta = {}
        self._next_seq = max(_int(meta.get("next_seq"), 1), newest)
        self._dropped_total = _int(meta.get("dropped_total"), 0)
        self._dropped_reported = min(_int(meta.get("dropped_reported"), 0), self._dropped_total)

    def _scan(self) -> list[int]:
        seqs = []
        for entry in os.scandir(self.directory):
            name = entry.name
            if name.endswith(_SUFFIX) and name[: -len(_SUFFIX)].isdigit():
                seqs.append(int(name[: -len(_SUFFIX)]))
            elif name.startswith(".") and name.endswith(".tmp"):
                # An atomic write interrupted by a crash: never a whole record, safe to remove.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        return seqs

    def _read_meta(self) -> dict[str, Any] | None:
        """The counters; {} for a new outbox, None if the file is damaged."""
        try:
            doc = json.loads((self.directory / _META).read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            doc = exc
        if isinstance(doc, dict) and isinstance(doc.get("next_seq"), int):
            return doc
        log.warning("outbox %s: %s is damaged (%s); numbering on from the clock", self.directory, _META, doc)
        return None

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:016d}{_SUFFIX}"

    def _write_meta(self) -> None:
        doc = {
            "next_seq": self._next_seq,
            "dropped_total": self._dropped_total,
            "dropped_reported": self._dropped_reported,
        }
        atomic_write(self.directory / _META, json.dumps(doc).encode())

    def put(self, record: dict[str, Any]) -> dict[str, Any]:
        """Queue ``record`` (a JSON-able dict); returns it with ``seq``, ``dropped`` and
        ``dropped_total`` filled in.

        OSError (a full disk, say) if the record cannot be stored: it is then counted as
        dropped, like a record evicted by the bound, and its ``seq`` is not reused, so the
        next stored record reports the gap."""
        with self._lock:
            seq = self._next_seq
            while len(self._seqs) >= self.max_records:
                oldest = self._seqs.pop(0)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(oldest))
                self._dropped_total += 1
            dropped = self._dropped_total - self._dropped_reported
            self._next_seq = seq + 1
            full = {**record, "seq": seq, "dropped": dropped, "dropped_total": self._dropped_total}
            try:
                atomic_write(self._path(seq), json.dumps(full, sort_keys=True, allow_nan=False).encode())
            except OSError as exc:
                self._dropped_total += 1
                log.warning(
                    "outbox %s: could not store record %d (%s); counted as dropped",
                    self.directory.name,
                    seq,
                    exc.strerror or exc,
                )
                with contextlib.suppress(OSError):
                    self._write_meta()
                raise
            self._seqs.append(seq)
            self._dropped_reported = self._dropped_total
            try:
                # The record file is what counts (a restart numbers on from the newest one);
                # the meta file keeps the drop counts, and may lag behind on a full disk.
                self._write_meta()
            except OSError as exc:
                log.warning("outbox %s: could not update %s (%s)", self.directory.name, _META, exc.strerror)
            if dropped:
                log.warning("outbox %s was full: dropped the %d oldest records", self.directory.name, dropped)
            return full

    def peek(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Queued records, oldest first (at most ``limit``). A damaged record file (torn by a
        disk that lied about fsync, say) is removed and counted as dropped."""
        with self._lock:
            seqs = list(self._seqs if limit is None else self._seqs[:limit])
        records = []
        for seq in seqs:
            try:
                doc = json.loads(self._path(seq).read_bytes())
            except FileNotFoundError:
                continue  # acknowledged or dropped meanwhile
            except (OSError, ValueError) as exc:
                self._discard(seq, exc)
                continue
            if isinstance(doc, dict) and doc.get("seq") == seq:
                records.append(doc)
            else:
                self._discard(seq, "not a record of this number")
        return records

    def _discard(self, seq: int, reason: object) -> None:
        """Remove a damaged record for good, counted as dropped (reported with the next one)."""
        log.error("outbox %s: record %d is damaged (%s); dropping it", self.directory.name, seq, reason)
        with self._lock:
            if seq not in self._seqs:
                return
            self._seqs.remove(seq)
            self._dropped_total += 1
        with contextlib.suppress(OSError):
            os.unlink(self._path(seq))

    def ack(self, up_to_seq: int) -> int:
        """Remove every record with ``seq <= up_to_seq`` (delivered); returns how many."""
        with self._lock:
            done = [s for s in self._seqs if s <= up_to_seq]
            self._seqs = [s for s in self._seqs if s > up_to_seq]
        for seq in done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(seq))
        return len(done)

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def dropped_total(self) -> int:
        return self._dropped_total

    def __len__(self) -> int:
        return len(self._seqs)
