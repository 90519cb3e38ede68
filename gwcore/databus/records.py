"""The databus records of a store and the writer jobs that keep them (functions run inside the
writer thread's write transaction unless they say otherwise): a part indexed once its blob is on
disk, the submit's part lookup that rewrites its databus headers to the local blob keys, the
expiry walk, and the start-up sweep of files no record names. The keys and values are in
:mod:`gwcore.databus.layout`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable, Iterator

from .._core import core
from ..records import now_ms as _now_ms, part_key as _part_key
from . import replica
from .layout import BLOB, PREFIX_LEN, TMP, blob_record, expiring, expiry_key, expiry_of, walk_expired

__all__ = ("BlobInfo", "blob_info", "blobs", "PartJob", "record_part", "record_blob", "missing_parts_reason",
           "resolve_submits", "expire", "unlink", "sweep")

log = logging.getLogger("gwcore.databus")


class BlobInfo:
    """One blob's index record (``gwcore inspect blobs``)."""

    __slots__ = ("name", "expiry_ms", "size", "md5", "sha256", "part")

    def __init__(self, name: str, value: bytes) -> None:
        expiry_ms, size, md5, sha = BLOB.unpack_from(value)
        self.name = name
        self.expiry_ms = expiry_ms
        self.size = size
        #: base64 digests; empty when not computed (a part received without Content-MD5, unsigned)
        self.md5 = md5.rstrip(b"\0").decode("ascii")
        self.sha256 = sha.rstrip(b"\0").decode("ascii")
        #: The part key (scope, id, DataBusKey) while the blob waits for its submit, else None.
        self.part: bytes | None = bytes(value[BLOB.size:]) or None


def blob_info(store: Any, name: str) -> BlobInfo | None:
    """The record of one blob, or None (any thread)."""
    value = store.get(store.databus_blobs, name.encode("ascii", "replace"))
    return BlobInfo(name, bytes(value)) if value is not None else None


def blobs(store: Any) -> Iterator[BlobInfo]:
    """Every blob record of a store (inspection; one read transaction)."""
    if store.databus_blobs is None:
        return
    for key, value in store.iter_db(store.databus_blobs):
        yield BlobInfo(bytes(key).decode("ascii"), bytes(value))


# -- the writer thread: functions run inside its write transaction ----------------------------------

def _put_blob(txn: Any, store: Any, name: str, record: bytes, expiry_ms: int) -> None:
    key = name.encode("ascii")
    txn.put(key, record, db=store.databus_blobs)
    txn.put(expiry_key(expiry_ms, key), b"", db=store.databus_expiry)


def _drop_blob(txn: Any, store: Any, name: str, doom: Callable[[str], None]) -> None:
    key = name.encode("ascii")
    value = txn.pop(key, db=store.databus_blobs)
    if value is not None:
        txn.delete(expiry_key(expiry_of(value), key), db=store.databus_expiry)
    doom(name)


def _release(txn: Any, store: Any, name: str, doom: Callable[[str], None]) -> None:
    """A waiting part's blob that no message will name (a part sent again replaced it, or its
    submit was a duplicate). In a blob dir of this store alone it goes now; in a shared one it
    stays until its expiry, only no longer as a waiting part: another instance may have taken it
    from the stream for a submit of its own (selected mode), and its consumer reads it."""
    if not store.blobs_shared:
        _drop_blob(txn, store, name, doom)
        return
    key = name.encode("ascii")
    value = txn.get(key, db=store.databus_blobs)
    if value is not None and len(value) > BLOB.size:
        txn.put(key, bytes(value[:BLOB.size]), db=store.databus_blobs)


class PartJob:
    """A writer job indexing a part whose blob is on disk (:func:`record_part`); in selected mode
    its :meth:`stream_record` goes to the dedup stream too, before the part is answered."""

    __slots__ = ("store", "part_key", "name", "size", "md5", "sha", "expiry_ms", "doom")

    def __init__(self, store: Any, part_key: bytes, name: str, size: int, md5: str, sha: str,
                 expiry_ms: int, doom: Callable[[str], None]) -> None:
        self.store = store
        self.part_key = part_key
        self.name = name
        self.size = size
        self.md5 = md5
        self.sha = sha
        self.expiry_ms = expiry_ms
        self.doom = doom

    def __call__(self, txn: Any) -> None:
        store = self.store
        old = txn.get(self.part_key, db=store.databus_parts)
        if old is not None:
            _release(txn, store, bytes(old).decode("ascii"), self.doom)
        txn.put(self.part_key, self.name.encode("ascii"), db=store.databus_parts)
        _put_blob(txn, store, self.name, blob_record(self.expiry_ms, self.size, self.md5, self.sha, self.part_key),
                  self.expiry_ms)

    def stream_record(self) -> bytes:
        """This part's record for the dedup stream (:func:`gwcore.databus.replica.decode_part_record`)."""
        return replica.encode_part_record(self.part_key, blob_record(self.expiry_ms, self.size, self.md5, self.sha),
                                          self.name)


def record_part(store: Any, part_key: bytes, name: str, size: int, md5: str, sha: str,
                expiry_ms: int, doom: Callable[[str], None]) -> PartJob:
    """A writer job indexing a part whose blob is on disk; a part sent again replaces the
    earlier one (whose file goes once the job commits: *doom*; in a shared blob dir at its expiry)."""
    return PartJob(store, part_key, name, size, md5, sha, expiry_ms, doom)


def record_blob(store: Any, name: str, size: int, md5: str, sha: str, expiry_ms: int) -> Callable[[Any], None]:
    """Index a blob of an outgoing message (sending side)."""
    def job(txn: Any) -> None:
        _put_blob(txn, store, name, blob_record(expiry_ms, size, md5, sha), expiry_ms)
    return job


def missing_parts_reason(missing: list[str], expected: int) -> str:
    """NServiceBus's 412 texts (SingleCallChannelReceiver, protocol.md §1.6)."""
    if len(missing) == expected:
        return f"Expected {expected} claimcheck properties. None were received. Please resubmit."
    return f"ClaimCheck property {missing[0]} was never received. Please resubmit."


def resolve_submits(txn: Any, store: Any, index: Any, envelopes: list, doomed: list[str]) -> tuple[dict, dict, int]:
    """The submits of one batch that carry databus headers: ``(replaced, rejected, adopted)``,
    the first two by ``id(envelope)``. A new message whose parts are all here gets its headers
    rewritten to the local blob keys and its part records dropped (the blobs stay for the
    consumer); a part not in the local index may be one another instance took (selected mode):
    its blob is used when its file is in the blob dir, and counted in *adopted*. One with a part
    missing gets NServiceBus's 412 and nothing is stored; a duplicate needs no parts (those sent
    again are dropped)."""
    replaced: dict[int, Any] = {}
    rejected: dict[int, Any] = {}
    seen: set[bytes] = set()
    parts_db = store.databus_parts
    replica_db = store.databus_replica
    adopted_total = 0
    now = 0
    for env in envelopes:
        names = env.databus
        if not names:
            continue
        keys = [_part_key(env.key, wire) for wire, _stored in names]
        if env.key in seen or index.contains(txn, store.dedup_log, env.key):
            for k in keys:
                blob = txn.pop(k, db=parts_db)
                if blob is not None:
                    _release(txn, store, bytes(blob).decode("ascii"), doomed.append)
            continue
        found: list[Any] = [txn.get(k, db=parts_db) for k in keys]
        adopted: dict[int, bytes] = {}
        if replica_db is not None and None in found:
            now = now or _now_ms()
            for i, k in enumerate(keys):
                if found[i] is None:
                    got = replica.replicated(txn, store, k, now)
                    if got is not None:
                        found[i] = got[0].encode("ascii")
                        adopted[i] = got[1]
        missing = [wire for (wire, _s), blob in zip(names, found) if blob is None]
        if missing:
            rejected[id(env)] = core.Rejection(412, missing_parts_reason(missing, len(names)), env.callback)
            continue
        seen.add(env.key)
        msg_id, headers, body, expiry_ms, accepted_ms = core.decode_envelope(env.framed)
        for i, ((_wire, stored), k, blob) in enumerate(zip(names, keys, found)):
            name = bytes(blob).decode("ascii")
            if stored is not None and stored in headers:
                headers[stored] = name
            if i in adopted:
                # This instance indexes the blob too, with the same expiry as the instance that
                # took it: whichever removes it first, neither does before then.
                record = adopted[i]
                earlier = txn.get(name.encode("ascii"), db=store.databus_blobs)
                if earlier is not None:
                    txn.delete(expiry_key(expiry_of(earlier), name.encode("ascii")), db=store.databus_expiry)
                _put_blob(txn, store, name, record, expiry_of(record))
            else:
                txn.delete(k, db=parts_db)
                # The blob belongs to the message now: its record no longer names a waiting part.
                record = txn.get(name.encode("ascii"), db=store.databus_blobs)
                if record is not None:
                    txn.put(name.encode("ascii"), bytes(record[:BLOB.size]), db=store.databus_blobs)
            if replica_db is not None:
                replica.drop(txn, store, k)
        adopted_total += len(adopted)
        replaced[id(env)] = env.with_framed(core.encode_envelope(msg_id, headers, body, expiry_ms, accepted_ms))
    return replaced, rejected, adopted_total


def expire(txn: Any, store: Any, now_ms: int, limit: int, doomed: list[str]) -> int:
    """Remove up to *limit* blobs whose expiry passed (with the part record of any that still
    waits for its submit); their files go after the commit. Up to *limit* expired replicated part
    records go too (their files are not this instance's to remove). Returns the larger count."""
    if store.databus_expiry is None:
        return 0

    def drop_blob(key: bytes) -> None:
        name = expiring(key)
        value = txn.pop(name, db=store.databus_blobs)
        if value is not None and len(value) > BLOB.size:
            owner = bytes(value[BLOB.size:])
            if txn.get(owner, db=store.databus_parts) == name:
                txn.delete(owner, db=store.databus_parts)
        doomed.append(name.decode("ascii"))

    n = walk_expired(txn, store.databus_expiry, now_ms, limit, drop_blob)
    return max(n, replica.expire(txn, store, now_ms, limit))


# -- blob files ---------------------------------------------------------------------------------------

def unlink(directory: str, names: Iterable[str]) -> None:
    """Remove blob files; one already gone is no error (another instance sharing the blob dir
    may have removed it at the same expiry)."""
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove blob %s: %s", name, exc)


def sweep(store: Any) -> int:
    """At start-up: remove unfinished uploads and blob files no record names (a crash between a
    blob's rename and its commit). Returns how many files went.

    In a shared blob dir (``GWCORE_BLOB_DIR``) only this store's own files are looked at (their
    names begin with its prefix): the others are another instance's uploads in progress, or blobs
    only another instance's store names."""
    directory = store.blob_dir
    store.modes.make_dir(directory)
    mine = store.blob_prefix if store.blobs_shared else ""
    if store.blobs_shared and len(mine) != PREFIX_LEN:
        return 0  # a store without a prefix cannot tell its files from the others'
    gone = []
    with store.resize_lock, store.env.begin() as txn:
        for entry in os.scandir(directory):
            name = entry.name
            tmp = name.startswith(TMP)
            if not (name[len(TMP):] if tmp else name).startswith(mine):
                continue
            if not entry.is_file(follow_symlinks=False):
                continue
            if tmp or txn.get(name.encode("utf-8", "surrogateescape"), db=store.databus_blobs) is None:
                gone.append(name)
    unlink(directory, gone)
    if gone:
        log.info("databus: removed %d blob files no record names (unfinished before a restart)", len(gone))
    return len(gone)
