"""The LMDB store: environment lifecycle, the writer thread with group commit, and retention.

One environment per data dir holds these databases (design.md §2, with the dedup records kept as
a log; docs/architecture.md says why):

=========  ===============================  ==========================================
dedup_log  u64 seq                           u64 accepted_ms + dedup key (scope \\0 id)
queue      u64 seq                           framed envelope (the local input queue)
errors     u64 seq                           framed envelope + reason (poison messages)
outgoing   u64 out seq                       outgoing record (the sending side's): site, attempts, envelope
outgoing_errors  u64 out seq                 failed_ms + outgoing record (sends that gave up)
meta       name                              value (schema version, last seq, last out seq, stream offset,
                                             blob name prefix)
databus_*  (five databases)                  claim-check parts and blobs (gwcore/databus/layout.py)
replica_log  u64 seq                         replica record: u64 ms, (u8 state, key)... (selected mode:
                                             gwcore/selected/stream.py; gwcore/records.py)
=========  ===============================  ==========================================

The keys and records that several modules build or read (the dedup key, u64 keys, the error
record) are laid out in gwcore/records.py.

A new message takes the next sequence number and is appended to both ``dedup_log`` and ``queue``
in the same transaction. The writer keeps a hash table of every live record in memory
(:class:`gwcore._dedup.DedupIndex`, loaded from the log at start-up), so the check needs no tree
lookup and the commit writes only the right edges of two trees, however many records the store
holds. Retention deletes from the front of the log. The last seq given is the last key of the
log or the queue; meta holds it only from the first retention slice that removes records (written
in that slice's transaction), so a commit writes no meta page.

Every write goes through one writer thread. The event loop hands it jobs and gets one callback per
committed batch; the thread owns the write transaction, the commit and its fsync, so the loop keeps
parsing while the disk works. A 200 is answered only after the batch holding the message committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import queue
import shutil
import struct
import threading
import time
from typing import Any, Callable, Iterator

import lmdb

from . import databus
from ._core import core
from .errors import InternalError, StoreError, StoreFullError, StoreUnavailableError
from .filemodes import Modes, modes
from .lease import LOCK_NAME, data_dir_error, take_lease
from .metrics import SECONDS, Buckets, Families, counter, gauge, histogram
from .records import dedup_key, encode_replica_record, now_ms, pack_seq, unpack_seq
from .tail import ZeroedTail

__all__ = ("Store", "Writer", "StoreStats")

log = logging.getLogger("gwcore.store")

SCHEMA_VERSION = b"4"
# Schema 3 added the databus_* databases; a schema 2 store gains them (empty) when opened. Schema 4
# keeps selected mode's replica as a log (replica_log) instead of a tree keyed by dedup key
# (replica): a store of 2 or 3 has its replica records moved when opened (_migrate_replica).
_UPGRADABLE = (b"2", b"3")
_OLD_REPLICA = struct.Struct(">BQ")  # schema 2 and 3's replica value: state, recorded_ms
_ENVELOPE_ACCEPTED = 3  # where an envelope's u64 accepted_ms is (after b"GW" and its version byte)
_DISK_FULL_MARGIN = 4 << 20  # below this much free space a failed write is taken as "disk full"

# Job kinds handed to the writer thread.
_INGEST, _ACK, _CALL = core.JOB_KINDS


class StoreStats:
    """Counters the writer maintains (read by /metrics from the loop thread; ints are atomic)."""

    def __init__(self) -> None:
        self.batches = 0
        self.commits_failed = 0
        self.accepted = 0
        self.duplicates = 0
        self.refused_full = 0
        self.expired_records = 0
        self.map_resizes = 0
        self.batch_size = Buckets((1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))
        self.commit = Buckets(SECONDS)  # the whole write transaction, fsync included
        self.sync = Buckets(SECONDS)  # of it, LMDB's commit: the page writes and the fsync

    def observe(self, size: int, seconds: float) -> None:
        self.batches += 1
        self.batch_size.observe(size)
        self.commit.observe(seconds)

    def metrics(self) -> Families:
        return [
            counter("gwcore_messages_accepted_total", "Messages stored for the first time.", self.accepted),
            counter("gwcore_messages_duplicate_total", "Submits of ids already stored (answered 200, not stored).",
                    self.duplicates),
            counter("gwcore_messages_refused_store_full_total", "New messages refused because the store is full.",
                    self.refused_full),
            counter("gwcore_store_commit_failures_total", "Write transactions that failed.", self.commits_failed),
            counter("gwcore_dedup_expired_total", "Dedup records removed by retention.", self.expired_records),
            counter("gwcore_store_map_resizes_total", "LMDB map size increases.", self.map_resizes),
            histogram("gwcore_commit_batch_size", "Jobs per write transaction.", self.batch_size),
            histogram("gwcore_commit_seconds", "Write transaction time including fsync.", self.commit),
            histogram("gwcore_store_fsync_seconds",
                      "Time in LMDB's commit of a write transaction: its page writes and the fsync.", self.sync),
        ]


class Store:
    """Owns one ``lmdb.Environment`` (never two for a path in one process: py-lmdb forbids it).

    :param path: the data dir (created if missing).
    :param map_size: initial map size in bytes; grows by doubling up to ``max_size``.
    :param max_size: the hard ceiling; beyond it new messages get 503 "store full".
    :param sync: fsync every commit (the 200-means-durable guarantee needs it).
    :param readonly: open for inspection only (``gwcore inspect``).
    :param lease: the data dir's lease, already held (a locked descriptor from
        :mod:`gwcore.lease`; the store releases it on close). Default: take it now, or fail.
    :param blob_dir: the databus blob dir when it is not ``<path>/blobs`` (``GWCORE_BLOB_DIR``):
        it may be shared with other instances (gwcore/databus/).
    :param file_mode: ``GWCORE_FILE_MODE``: who may read the data dir, the blob dir and the
        store's files (:mod:`gwcore.filemodes`); applied whenever the store is opened for writing.
    :param preallocate: ``GWCORE_STORE_PREALLOCATE``: bytes of zeros kept written past the data
        (:mod:`gwcore.tail`), so that commits sync no file-system metadata; 0, or ``sync`` off: none.
    """

    def __init__(self, path: str, *, map_size: int = 256 << 20, max_size: int = 64 << 30,
                 sync: bool = True, readonly: bool = False, lease: int | None = None,
                 blob_dir: str | None = None, file_mode: str = "private", preallocate: int = 0) -> None:
        self.path = path
        #: The zeroed tail of the data file (None: the file grows with each commit).
        self.tail: ZeroedTail | None = None
        #: The modes of everything this store and its blob writers make (gwcore/filemodes.py).
        self.modes: Modes = modes(file_mode)
        self.max_size = max_size
        #: Where blob files live (the claim check, gwcore/databus/).
        self.blob_dir = blob_dir or databus.blob_dir(path)
        #: A blob dir set apart from the data dir may be shared: the sweep looks at this store's
        #: files only, and parts' blobs are kept until their expiry (gwcore/databus/records.py).
        self.blobs_shared = bool(blob_dir)
        #: The first hex digits of every blob name this store makes (kept in meta).
        self.blob_prefix = ""
        self._owner_fd: int | None = lease
        if readonly:
            if not os.path.exists(os.path.join(path, "data.mdb")):
                raise StoreUnavailableError(f"no gwcore store at {path!r} (GWCORE_DATA_DIR)")
        elif lease is None:
            # One writing gwcore per data dir: the writer keeps its sequence counter in memory, so
            # a second writer would reuse queue positions. The lease dies with its process.
            try:
                self.modes.make_dir(path)
            except OSError as exc:
                raise data_dir_error(path, exc) from None
            self._owner_fd = take_lease(path)
        try:
            self._open(path, map_size, sync, readonly)
            if preallocate and sync and not readonly:
                self.tail = ZeroedTail(os.path.join(path, "data.mdb"), preallocate, limit=lambda: self.map_size,
                                       size_bytes=self.size_bytes)
        except BaseException:
            # Whatever failed (LMDB, the schema check), a store that did not open holds no lease.
            env = getattr(self, "env", None)
            if env is not None:
                env.close()
            self._release_ownership()
            raise

    def _open(self, path: str, map_size: int, sync: bool, readonly: bool) -> None:
        try:
            self.env = lmdb.open(
                path,
                map_size=map_size,
                max_dbs=16,
                sync=sync,
                metasync=sync,
                readonly=readonly,
                lock=True,
                readahead=False,
                max_readers=256,
                mode=self.modes.file,
            )
        except lmdb.Error as exc:
            raise StoreUnavailableError(f"cannot open the store at {path!r}: {exc}") from exc
        if not readonly:
            # LMDB makes its files with mode & ~umask, and an older store may have been made
            # under a looser umask: bring the data dir and its files to the configured modes.
            self.modes.make_dir(path)
            for name in ("data.mdb", "lock.mdb", LOCK_NAME):
                self.modes.secure(os.path.join(path, name))
            try:
                self.modes.make_dir(self.blob_dir)
            except OSError as exc:
                raise data_dir_error(self.blob_dir, exc, "blob dir (GWCORE_BLOB_DIR)") from None
        # Re-read: an existing environment keeps its larger map size.
        self.map_size = max(map_size, self.env.info()["map_size"])
        # set_mapsize() needs every transaction of this process closed; readers take this lock for
        # their (short, synchronous) transactions and the writer takes it to resize.
        self.resize_lock = threading.Lock()
        create = not readonly
        self.dedup_log = self.env.open_db(b"dedup_log", create=create)
        self.queue = self.env.open_db(b"queue", create=create)
        self.errors = self.env.open_db(b"errors", create=create)
        self.outgoing = self.env.open_db(b"outgoing", create=create)
        self.outgoing_errors = self.env.open_db(b"outgoing_errors", create=create)
        self.meta = self.env.open_db(b"meta", create=create)
        self.databus_parts = self._open_db(b"databus_parts", create)
        self.databus_blobs = self._open_db(b"databus_blobs", create)
        self.databus_expiry = self._open_db(b"databus_expiry", create)
        # selected mode: dedup records followed from the broker's stream (gwcore/selected/stream.py)
        self.replica_log = self._open_db(b"replica_log", create)
        # selected mode: the parts other instances took, followed from the same stream
        self.databus_replica = self._open_db(b"databus_replica", create)
        self.databus_replica_expiry = self._open_db(b"databus_replica_expiry", create)
        if readonly:
            prefix = self.get(self.meta, b"blob_prefix")
            self.blob_prefix = prefix.decode("ascii") if prefix else ""
        else:
            with self.env.begin(write=True) as txn:
                prefix = txn.get(b"blob_prefix", db=self.meta)
                if prefix is None:
                    prefix = databus.new_prefix().encode("ascii")
                    txn.put(b"blob_prefix", prefix, db=self.meta)
                self.blob_prefix = bytes(prefix).decode("ascii")
                version = txn.get(b"schema", db=self.meta)
                if version is None or version in _UPGRADABLE:
                    if version is not None:
                        self._migrate_replica(txn)
                    txn.put(b"schema", SCHEMA_VERSION, db=self.meta)
                elif version != SCHEMA_VERSION:
                    raise StoreError(
                        f"store at {path!r} has schema {version.decode(errors='replace')}, this gwcore "
                        f"needs {SCHEMA_VERSION.decode()} (a store from a development build before "
                        "0.1.0: consume its queue with that build, then start on a new data dir)")

    def _migrate_replica(self, txn: Any) -> None:
        """Schema 2 or 3 to 4: the ``replica`` tree's records (key -> u8 state, u64 ms) become
        ``replica_log`` records, one per time, in time order; the tree is dropped."""
        try:
            old = self.env.open_db(b"replica", txn=txn, create=False)
        except lmdb.NotFoundError:
            return
        by_ms: dict[int, list[tuple[bytes, int]]] = {}
        with txn.cursor(db=old) as cur:
            for key, value in cur:
                state, recorded = _OLD_REPLICA.unpack(value)
                by_ms.setdefault(recorded, []).append((bytes(key), state))
        for seq, recorded in enumerate(sorted(by_ms), 1):
            txn.put(pack_seq(seq), encode_replica_record(recorded, by_ms[recorded]), db=self.replica_log)
        txn.drop(old, delete=True)
        if by_ms:
            log.info("store: %d replica records moved to the replica log (schema 4)",
                     sum(len(v) for v in by_ms.values()))

    def _open_db(self, name: bytes, create: bool) -> Any:
        try:
            return self.env.open_db(name, create=create)
        except lmdb.NotFoundError:
            return None  # read-only, on a store from before schema 3: no blobs there

    def commit(self, txn: Any) -> None:
        """Commit a write transaction of :attr:`env` (every write transaction of a running store
        commits here: the zeroed tail must know where LMDB's pages end)."""
        if self.tail is None:
            txn.commit()
        else:
            self.tail.commit(txn)

    def close(self) -> None:
        if self.tail is not None:
            self.tail.close()
            self.tail = None
        self.env.close()
        self._release_ownership()

    def _release_ownership(self) -> None:
        if self._owner_fd is not None:
            os.close(self._owner_fd)  # closing the descriptor drops the flock
            self._owner_fd = None

    # -- reads (any thread; short transactions) ---------------------------------------------------

    def last_seq(self) -> int:
        """The highest sequence number ever assigned: the last key of ``dedup_log`` or ``queue``,
        or what meta holds (written when retention removes dedup records, and by stores before
        2026-12-07 at every commit), whichever is highest."""
        with self.resize_lock, self.env.begin() as txn:
            raw = txn.get(b"seq", db=self.meta)
            seq = unpack_seq(raw) if raw else 0
            for db in (self.queue, self.dedup_log):
                cur = txn.cursor(db=db)
                if cur.last():
                    seq = max(seq, unpack_seq(cur.key()))
            return seq

    def put_last_seq(self, txn: Any, seq: int) -> None:
        """Record *seq* as the highest assigned, in the writer's write transaction *txn* (the
        writer's own last seq, which no value in meta exceeds: it started above :meth:`last_seq`)."""
        txn.put(b"seq", pack_seq(seq), db=self.meta)

    def read_queue(self, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` queued ``(seq, framed)`` pairs with ``seq > after_seq``, in order."""
        out: list[tuple[int, bytes]] = []
        with self.resize_lock, self.env.begin() as txn:
            cur = txn.cursor(db=self.queue)
            if not cur.set_range(pack_seq(after_seq + 1)):
                return out
            for key, value in cur:
                out.append((unpack_seq(key), value))
                if len(out) >= limit:
                    break
        return out

    def read_one(self, seq: int) -> bytes | None:
        with self.resize_lock, self.env.begin() as txn:
            return txn.get(pack_seq(seq), db=self.queue)

    def get(self, db: Any, key: bytes) -> bytes | None:
        with self.resize_lock, self.env.begin() as txn:
            return txn.get(key, db=db)

    def iter_db(self, db: Any) -> Iterator[tuple[bytes, bytes]]:
        """All items of one database (for inspection; holds one read transaction throughout)."""
        with self.env.begin() as txn:
            yield from txn.cursor(db=db)

    def counts(self) -> dict[str, int]:
        with self.resize_lock, self.env.begin() as txn:
            return {
                "dedup": txn.stat(self.dedup_log)["entries"],
                "queue": txn.stat(self.queue)["entries"],
                "errors": txn.stat(self.errors)["entries"],
                "outgoing": txn.stat(self.outgoing)["entries"],
                "outgoing_errors": txn.stat(self.outgoing_errors)["entries"],
                "databus_parts": txn.stat(self.databus_parts)["entries"] if self.databus_parts else 0,
                "databus_blobs": txn.stat(self.databus_blobs)["entries"] if self.databus_blobs else 0,
                "databus_replica": txn.stat(self.databus_replica)["entries"] if self.databus_replica else 0,
            }

    def oldest_accepted_ms(self) -> dict[str, int | None]:
        """When the first message of the local queue and of the outgoing queue was accepted
        (None: empty): the first entry of each, whose envelope begins with its accepted time."""
        with self.resize_lock, self.env.begin(buffers=True) as txn:
            out: dict[str, int | None] = {}
            for name, db in (("local", self.queue), ("outgoing", self.outgoing)):
                cur = txn.cursor(db=db)
                if not cur.first():
                    out[name] = None
                    continue
                value = cur.value()
                # an outgoing record holds the envelope after its head (read by the core)
                at = core.outgoing_layout(value)[3] if db is self.outgoing else 0
                out[name] = unpack_seq(bytes(value[at + _ENVELOPE_ACCEPTED:at + _ENVELOPE_ACCEPTED + 8]))
            return out

    def metrics(self, *, replica: bool = False) -> Families:
        """The sizes of the store and its databases, and the age of each queue's oldest message
        (*replica*: selected mode's part records too)."""
        counts = self.counts()
        now = now_ms()
        oldest = self.oldest_accepted_ms()
        families: Families = [
            gauge("gwcore_queue_depth", "Messages in the local queue.", counts["queue"]),
            gauge("gwcore_error_queue_depth", "Messages in the error store.", counts["errors"]),
            gauge("gwcore_dedup_records", "Dedup records held.", counts["dedup"]),
            gauge("gwcore_store_bytes", "Bytes used in the LMDB environment.", self.size_bytes()),
            gauge("gwcore_store_map_bytes", "Current LMDB map size.", self.map_size),
            gauge("gwcore_store_preallocated_bytes", "Zeros written ahead of the store's data in its file "
                  "(GWCORE_STORE_PREALLOCATE), where the next commits write without growing it.",
                  self.tail.runway if self.tail is not None else 0),
            counter("gwcore_store_preallocate_errors_total", "Failed writes of zeros ahead of the data (the "
                    "disk full, an I/O error): commits grow the file meanwhile.",
                    self.tail.errors if self.tail is not None else 0),
            gauge("gwcore_databus_blobs", "Databus blobs this store indexes (files in the blob dir).",
                  counts["databus_blobs"]),
            gauge("gwcore_databus_parts_waiting", "Databus parts waiting for their submit.", counts["databus_parts"]),
            gauge("gwcore_outgoing_depth", "Messages waiting in the outgoing queue.", counts["outgoing"]),
            gauge("gwcore_outgoing_error_depth", "Messages in the outgoing error queue.", counts["outgoing_errors"]),
            gauge("gwcore_queue_oldest_age_seconds",
                  "Age of the oldest message in each queue (local: waiting for its consumer; outgoing: "
                  "waiting to be sent); 0 when the queue is empty.", labels=("queue",),
                  samples=[((name, ), max(0, now - at) / 1000 if at is not None else 0)
                           for name, at in oldest.items()]),
        ]
        if replica:
            families.append(gauge("gwcore_databus_parts_replicated",
                                  "Part records followed from the stream, held for a submit that may come here.",
                                  counts["databus_replica"]))
        return families

    def backup(self, path: str) -> dict[str, Any]:
        """Copy the store into *path*, an empty directory, while it may be in use: LMDB's copy with
        compaction (one read transaction, so one consistent snapshot; free pages left out), then
        every blob file that snapshot names, into ``<path>/blobs/``. A blob that expired between
        the snapshot and its copy is left out (its message or part had expired too).

        :returns: the copy's ``counts`` (as :meth:`counts`), its ``bytes`` (:meth:`size_bytes`) and
            ``gone``: the names of the blobs that expired before they could be copied.
        :raises StoreUnavailableError: *path* is not an empty directory, or the copy failed.
        """
        if not os.path.isdir(path) or os.listdir(path):
            raise StoreUnavailableError(f"the backup directory {path!r} must be an empty directory")
        try:
            self.env.copy(path, compact=True)
        except lmdb.Error as exc:
            raise StoreUnavailableError(f"cannot copy the store at {self.path!r} to {path!r}: {exc}") from exc
        self.modes.secure(os.path.join(path, "data.mdb"))
        copy = Store(path, readonly=True, file_mode=self.modes.name)
        gone = []
        try:
            names = [info.name for info in databus.blobs(copy)]
            summary: dict[str, Any] = {"counts": copy.counts(), "bytes": copy.size_bytes()}
        finally:
            copy.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, "lock.mdb"))  # the reader's lock file; a gateway makes its own
        target = databus.blob_dir(path)
        self.modes.make_dir(target)
        for name in names:
            try:
                shutil.copyfile(os.path.join(self.blob_dir, name), os.path.join(target, name))
            except FileNotFoundError:
                gone.append(name)
                continue
            self.modes.secure(os.path.join(target, name))
        summary["gone"] = gone
        return summary

    def size_bytes(self) -> int:
        """Bytes the environment uses (last page number times page size), not the sparse file size."""
        info = self.env.info()
        return (info["last_pgno"] + 1) * self.env.stat()["psize"]


def _settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.cancelled():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class Writer:
    """The single writer thread: batches jobs, one write transaction and one fsync per batch.

    :meth:`ingest`, :meth:`ack` and :meth:`call` are called on the event loop and return
    futures resolved on that loop once the batch that carried the job is durable.

    Outside selected mode this is the listeners' ingest sink (:class:`gwcore.ingest.IngestSink`);
    in selected mode :class:`gwcore.selected.dispatcher.Dispatcher` is, over this writer.
    """

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop, *,
                 max_batch: int = 1024, max_delay_us: int = 0, dedup_ttl: float = 7 * 86400.0,
                 cleanup_slice: int = 2000, on_commit: Callable[[int], None] | None = None,
                 databus_ttl: float = 7 * 86400.0) -> None:
        self.store = store
        self.loop = loop
        self.max_batch = max_batch
        self.max_delay = max_delay_us / 1e6
        self.ttl_ms = int(dedup_ttl * 1000)
        self.cleanup_slice = cleanup_slice
        self.databus_ttl_ms = int(databus_ttl * 1000)
        # Blob files whose records the open transaction removes: unlinked once it commits.
        self._doomed: list[str] = []
        self.blobs_expired = 0
        #: Parts a submit took from another instance's record (selected mode, a shared blob dir).
        self.parts_adopted = 0
        databus.sweep(store)
        self.on_commit = on_commit  # loop-thread callback: number of new queue entries
        self.stats = StoreStats()
        self.index = core.DedupIndex()
        self.index_load_seconds = self._load_index()
        self.next_seq = store.last_seq() + 1
        self._last_accepted_ms = 0
        # Jobs cross to the writer thread in lists, one list per event-loop turn: the thread is
        # woken once for everything a turn produced, not once per request (on a single core,
        # each wake-up preempts the loop thread and then waits for the GIL it holds).
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        #: the loop-thread side (compiled): the HTTP front end adds submits to it directly
        self.inbox = core.JobInbox(loop.call_soon, self._hand_over)
        self._closed = False
        self._cleanup_due = 0.0
        self._thread = threading.Thread(target=self._run, name="gwcore-writer", daemon=True)
        self._thread.start()

    def _load_index(self) -> float:
        """Fill the in-memory dedup table from the log (before the thread starts; blocking)."""
        store = self.store
        started = time.perf_counter()

        def progress(done: int, total: int) -> None:
            log.info("loading dedup records: %d of %d (%.0f%%)", done, total, 100.0 * done / max(total, 1))

        with store.resize_lock, store.env.begin() as txn:
            n = self.index.load(txn, store.dedup_log, progress=progress)
        took = time.perf_counter() - started
        if n >= 100_000 or took >= 1.0:
            log.info("dedup records loaded: %d in %.1f s, %d MiB of memory", n, took,
                     self.index.memory_bytes >> 20)
        return took

    def is_recorded(self, scope: str, msg_id: str) -> bool:
        """Is (scope, id) recorded in a committed transaction? Any thread (inspection, tests)."""
        store = self.store
        key = dedup_key(scope, msg_id)
        with store.resize_lock, store.env.begin() as txn:
            return self.index.contains(txn, store.dedup_log, key)

    # -- loop side ---------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Jobs added and not yet resolved."""
        return self.inbox.pending

    def metrics(self) -> Families:
        return self.stats.metrics() + [
            counter("gwcore_databus_expired_total", "Databus blobs removed at their expiry (orphaned parts too).",
                    self.blobs_expired),
            counter("gwcore_databus_parts_adopted_total",
                    "Parts a submit took from another instance's record, its blob in the shared blob dir "
                    "(selected mode).", self.parts_adopted),
            gauge("gwcore_ingest_pending", "Jobs waiting for the writer thread.", self.pending),
        ]

    def ingest(self, envelope: Any) -> asyncio.Future:
        """Record-and-enqueue one framed envelope; resolves True (new) or False (duplicate)."""
        return self._submit(_INGEST, envelope)

    def ack(self, seq: int) -> asyncio.Future:
        """Remove one consumed queue entry; resolves True if it was still there."""
        return self._submit(_ACK, seq)

    def call(self, fn: Callable[[Any], Any]) -> asyncio.Future:
        """Run ``fn(txn)`` inside the next write transaction; resolves with its return value."""
        return self._submit(_CALL, fn)

    def _submit(self, kind: int, payload: Any) -> asyncio.Future:
        fut = self.loop.create_future()
        self._enqueue(kind, payload, functools.partial(_settle, fut))
        return fut

    def ingest_then(self, envelope: Any, done: Callable[[bool, Any], None]) -> None:
        """The hot-path form of :meth:`ingest`: ``done(ok, value)`` is called on the loop once
        the batch is durable (``value`` is True/False, or the exception when ``ok`` is false).
        No future, no extra loop iteration per request."""
        self._enqueue(_INGEST, envelope, done)

    def _enqueue(self, kind: int, payload: Any, done: Callable[[bool, Any], None]) -> None:
        if self._closed:
            done(False, StoreUnavailableError("the store is closed (gwcore is shutting down)"))
            return
        self.inbox.add(kind, payload, done)

    def _hand_over(self) -> None:
        jobs = self.inbox.take()
        if jobs:
            self._jobs.put(jobs)

    def close(self) -> None:
        """Commit what is queued, stop the thread, and wait for it (blocking)."""
        if not self._closed:
            self._closed = self.inbox.closed = True
            self._hand_over()
            self._jobs.put(None)
        self._thread.join()

    def _resolve(self, done: list, added: int) -> None:
        self.inbox.resolve(done)
        if added and self.on_commit is not None:
            self.on_commit(added)

    # -- writer thread -----------------------------------------------------------------------------

    def _take_batch(self) -> tuple[list, bool, Any]:
        """``(jobs, stop, the batch's write transaction or None)``."""
        try:
            # Not forever: an idle writer still runs the retention and blob expiry slices.
            first = self._jobs.get(timeout=1.0)
        except queue.Empty:
            return [], False, None
        if first is None:
            return [], True, None
        txn = self._begin() if first else None
        batch = list(first)
        get = self._jobs.get_nowait
        stop = False
        deadline = None
        while len(batch) < self.max_batch:
            try:
                jobs = get()
            except queue.Empty:
                if self.max_delay <= 0:
                    break
                # Group commit: give concurrent requests up to max_delay to join this fsync.
                if deadline is None:
                    deadline = time.monotonic() + self.max_delay
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    jobs = self._jobs.get(timeout=remaining)
                except queue.Empty:
                    break
            if jobs is None:
                stop = True
                break
            batch.extend(jobs)
        return batch, stop, txn

    def _begin(self) -> Any:
        """Begin the batch's write transaction before the queue is drained.

        py-lmdb lets go of the GIL while it begins a write transaction (the call may wait for
        LMDB's writer lock). On one core the loop thread then has the CPU and the GIL until its
        turn ends, about half a millisecond under load (measured: docs/architecture.md), parsing
        requests and handing them over. Begun here, the transaction takes those requests into
        this commit; begun after the queue was drained, they waited for the next one.
        """
        try:
            return self.store.env.begin(write=True)
        except lmdb.Error:
            return None  # _write begins again: its error answers the batch

    def _run(self) -> None:
        while True:
            try:
                batch, stop, txn = self._take_batch()
                if batch:
                    self._process(batch, txn)
                if stop:
                    # Anything queued after the stop marker still gets an answer.
                    rest = []
                    while True:
                        try:
                            jobs = self._jobs.get_nowait()
                        except queue.Empty:
                            break
                        if jobs is not None:
                            rest.extend(jobs)
                    if rest:
                        self._process(rest)
                    return
                if self._jobs.empty():
                    self._maybe_cleanup()
            except Exception:  # pragma: no cover - a bug; keep the thread alive and loud
                log.exception("gwcore writer thread: unexpected error")

    def _process(self, batch: list, txn: Any = None) -> None:
        envelopes = [job[1] for job in batch if job[0] == _INGEST]
        started = time.perf_counter()
        while True:
            try:
                begun, txn = txn, None  # a retry (after the map grew) begins its own
                results, added = self._write(batch, envelopes, begun)
                break
            except lmdb.MapFullError:
                if self._grow():
                    continue
                results, added = self._write_when_full(batch, envelopes)
                break
            except lmdb.Error as exc:
                self.stats.commits_failed += 1
                log.error("store commit failed, %d jobs refused: %s", len(batch), exc)
                err = _store_error(exc, self.store.path)
                results, added = [(job[2], False, err) for job in batch], 0
                break
            except Exception as exc:  # a bug: answer every job (502) rather than leave it hanging
                self.stats.commits_failed += 1
                log.exception("store batch failed unexpectedly, %d jobs refused", len(batch))
                results, added = [(job[2], False, InternalError(f"store batch failed: {exc!r}")) for job in batch], 0
                break
        self.stats.observe(len(batch), time.perf_counter() - started)
        self.loop.call_soon_threadsafe(self._resolve, results, added)

    def doom(self, name: str) -> None:
        """Writer thread, inside a job: unlink this blob once the transaction commits."""
        self._doomed.append(name)

    def blob_expiry_ms(self, expiry_ms: int, accepted_ms: int) -> int:
        """A blob's expiry: the message's TimeToBeReceived, else GWCORE_DATABUS_TTL."""
        return expiry_ms or accepted_ms + self.databus_ttl_ms

    def _committed(self) -> None:
        doomed, self._doomed = self._doomed, []
        if doomed:
            databus.unlink(self.store.blob_dir, doomed)

    def _write(self, batch: list, envelopes: list, txn: Any = None) -> tuple[list, int]:
        """One batch in one write transaction (*txn*, begun by :meth:`_begin`, or begun here)."""
        store = self.store
        if txn is None:
            txn = store.env.begin(write=True)
        rejected: dict = {}
        adopted = 0
        try:
            if any(env.databus for env in envelopes):
                replaced, rejected, adopted = databus.resolve_submits(txn, store, self.index, envelopes, self._doomed)
                envelopes = [replaced.get(id(e), e) for e in envelopes if id(e) not in rejected]
            if envelopes:
                # The log must stay in acceptance order for retention: never let the clock step back.
                accepted_ms = self._last_accepted_ms = max(now_ms(), self._last_accepted_ms)
                new_flags, next_seq = self.index.apply_batch(
                    txn, store.dedup_log, store.queue, envelopes, accepted_ms, self.next_seq
                )
                # (no meta write: the two trees' last keys are the last seq, until retention
                # removes records: _expire writes it then; one page less to sync a commit)
            else:
                new_flags, next_seq = [], self.next_seq
            results: list[tuple[Any, bool, Any]]
            if len(new_flags) == len(batch):  # ingest jobs only: the common case under load
                results = core.ingest_results(batch, new_flags)
            else:
                results = self._answers(txn, batch, new_flags, rejected)
            if time.monotonic() >= self._cleanup_due:
                self._expire(txn, next_seq - 1)
            synced = time.perf_counter()
            store.commit(txn)
            self.stats.sync.observe(time.perf_counter() - synced)
        except BaseException:
            txn.abort()
            self.index.rollback()
            self._doomed.clear()
            raise
        self.index.commit()
        self._committed()
        self.parts_adopted += adopted
        added = next_seq - self.next_seq
        self.next_seq = next_seq
        self.stats.accepted += added
        self.stats.duplicates += len(envelopes) - added - len(rejected)
        return results, added

    def _answers(self, txn: Any, batch: list, new_flags: list, rejected: dict | None = None) -> list[tuple[Any, bool, Any]]:
        """Carry out the acks and calls of a batch (inside its transaction) and pair every job
        with its answer (*rejected*: the databus submits refused before the dedup step, by
        ``id(envelope)``)."""
        store = self.store
        results: list[tuple[Any, bool, Any]] = []
        flags = iter(new_flags)
        for kind, payload, fut in batch:
            if kind == _INGEST:
                results.append((fut, True, rejected[id(payload)] if rejected and id(payload) in rejected
                                else next(flags)))
            elif kind == _ACK:
                results.append((fut, True, txn.delete(pack_seq(payload), db=store.queue)))
            else:
                try:
                    results.append((fut, True, payload(txn)))
                except lmdb.Error:
                    raise
                except Exception as exc:  # a failing call fails alone, not the batch
                    results.append((fut, False, exc))
        return results

    def _write_when_full(self, batch: list, envelopes: list) -> tuple[list, int]:
        """The map cannot grow: answer duplicates (200), refuse new messages (503), keep acks."""
        store = self.store
        with store.resize_lock, store.env.begin() as txn:
            recorded = self.index.check_batch(txn, store.dedup_log, envelopes) if envelopes else []
        full = StoreFullError(
            f"store full: {store.map_size} bytes used of GWCORE_STORE_MAX_SIZE={store.max_size}; "
            "consume the queue or raise the limit"
        )
        rest = [job for job in batch if job[0] != _INGEST]
        rest_results: list = []
        if rest:
            try:
                rest_results, _ = self._write(rest, [])
            except lmdb.Error as exc:
                rest_results = [(job[2], False, _store_error(exc, self.store.path)) for job in rest]
        results = []
        flags = iter(recorded)
        others = iter(rest_results)
        for kind, _payload, fut in batch:
            if kind == _INGEST:
                dup = next(flags)
                results.append((fut, True, False) if dup else (fut, False, full))
                if not dup:
                    self.stats.refused_full += 1
            else:
                results.append(next(others))
        return results, 0

    def _grow(self) -> bool:
        store = self.store
        if store.map_size >= store.max_size:
            return False
        new_size = min(store.max_size, store.map_size * 2)
        with store.resize_lock:
            store.env.set_mapsize(new_size)
        log.info("store map grown from %d to %d bytes", store.map_size, new_size)
        store.map_size = new_size
        self.stats.map_resizes += 1
        return True

    def _expire(self, txn: Any, last_seq: int) -> None:
        n = self.index.expire(txn, self.store.dedup_log, now_ms() - self.ttl_ms, self.cleanup_slice)
        if n:
            # The last seq is the last key of dedup_log or queue (Store.last_seq) until records
            # leave the log: kept in meta from then, so that a sequence number is never given twice
            # (the queue may be empty, and the log's last record may be one of these).
            self.store.put_last_seq(txn, last_seq)
        self.stats.expired_records += n
        blobs = databus.expire(txn, self.store, now_ms(), self.cleanup_slice, self._doomed)
        self.blobs_expired += blobs
        n = max(n, blobs)
        # A full slice means more is waiting: come back soon; otherwise once a second is plenty.
        self._cleanup_due = time.monotonic() + (0.05 if n >= self.cleanup_slice else 1.0)

    def _maybe_cleanup(self) -> None:
        if time.monotonic() < self._cleanup_due:
            return
        try:
            txn = self.store.env.begin(write=True)
            try:
                self._expire(txn, self.next_seq - 1)
            except BaseException:
                txn.abort()
                raise
            self.store.commit(txn)
            self._committed()
        except lmdb.MapFullError:
            # Deleting needs free pages too; try again after the next successful batch.
            self._doomed.clear()
            self._cleanup_due = time.monotonic() + 5.0
        except lmdb.Error as exc:
            self._doomed.clear()
            log.warning("dedup retention cleanup failed: %s", exc)
            self._cleanup_due = time.monotonic() + 5.0


def _disk_nearly_full(path: str) -> bool:
    try:
        return shutil.disk_usage(path).free < _DISK_FULL_MARGIN
    except OSError:
        return False


def _store_error(exc: lmdb.Error, path: str) -> StoreError:
    text = str(exc)
    # LMDB reports a short write on a full disk as EIO, not ENOSPC: look at the disk as well.
    if "No space left" in text or "ENOSPC" in text or _disk_nearly_full(path):
        err: StoreError = StoreFullError(f"store full: the disk is full ({text})")
    else:
        err = StoreUnavailableError(f"store write failed: {text}")
    err.__cause__ = exc
    return err


def queue_entries(store: Store) -> Iterator[tuple[int, tuple[str, dict, bytes, int, int]]]:
    """``(seq, decoded envelope)`` for every queued message (inspection)."""
    for key, value in store.iter_db(store.queue):
        yield unpack_seq(key), core.decode_envelope(value)

