"""The claim check (databus): durable ``SingleCallDatabusProperty`` parts, local blobs, expiry.

NServiceBus keeps the parts of a message in a per-process dictionary until its submit arrives, so
a restart, a second channel or a failover between the parts and the submit ends in 412 loops
(protocol.md §2.3). gwcore keeps them durably:

* a part's body streams to ``<blob dir>/.tmp-<name>`` as it arrives (never whole in memory), its
  MD5 computed on the way; at its end the file is fsync'd, renamed to ``<blob dir>/<name>`` and
  the directory fsync'd, and only then is the index record committed and the part answered 200;
* the submit looks every ``NServiceBus.DataBus.*`` header's part up in the writer transaction that
  records the message, and stores the header with the local blob key as its value (the name keeps
  the sender's key, protocol.md §2.3); a duplicate submit needs no parts;
* every blob has an expiry (the message's TimeToBeReceived, else ``GWCORE_DATABUS_TTL``); the
  writer removes expired blobs, and parts whose submit never came, in slices between batches.

LMDB databases (store.py opens them):

======================  ===================================  =========================================
databus_parts           scope \\0 id \\0 DataBusKey (UTF-8)   blob name: a part waiting for its submit
databus_blobs           blob name                             u64 expiry_ms, u64 size, Content-MD5,
                                                              SHA-256 (base64), then the part key while
                                                              it waits
databus_expiry          u64 expiry_ms + blob name             empty: the expiry walk, in order
databus_replica         part key (as databus_parts)           the blob record (no part key), then the
                                                              blob name: a part another instance took
                                                              (selected mode, followed from the stream)
databus_replica_expiry  u64 expiry_ms + part key              empty: their expiry walk
======================  ===================================  =========================================

A blob name is 32 hex digits; it is the local key (the header value consumers get) and the file
name in the blob dir (``GWCORE_BLOB_DIR``, default ``<data dir>/blobs``). The first
:data:`PREFIX_LEN` digits are the store's own prefix (kept in its ``meta`` database), so in a blob
dir that several instances share each one knows its files: the start-up sweep removes only those.
The sending side keeps the blobs of outgoing messages the same way (their header values name
them), so a forwarder reads each part from disk as it sends it.

Selected-instance mode (gwcore/selected.py) appends every part the leader takes to the dedup
stream before answering it; every instance keeps those records in ``databus_replica``. A submit
whose part is not in the local index looks there, and takes the blob when its file is in the blob
dir (shared): the new leader after a failover then needs no re-sent parts.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import errno
import fcntl
import hashlib
import io
import logging
import mmap
import os
import struct
import threading
import time
import uuid
from typing import IO, Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Union

from ._core import core

__all__ = ("BlobWriter", "BlobSink", "Blob", "BlobInfo", "DATABUS_PREFIX", "BLOB_DIR", "blob_dir",
           "resolve_submits", "record_part", "record_blob", "expire", "sweep", "copy_in", "blobs", "Source",
           "new_name", "new_prefix", "PREFIX_LEN", "PartJob", "decode_part_record", "replicate_parts",
           "forget_parts", "databus_header", "message_blobs", "unlink", "blob_info", "content_digest", "digest_sha256")

log = logging.getLogger("gwcore.databus")

DATABUS_PREFIX = "NServiceBus.DataBus."
BLOB_DIR = "blobs"
_TMP = ".tmp-"
_BLOB = struct.Struct(">QQ24s44s")     # expiry_ms, size, Content-MD5, SHA-256 (base64); then owner
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_HEX = frozenset("0123456789abcdef")
#: Hex digits at the start of every blob name that name the store which made it.
PREFIX_LEN = 8
_CHUNK = 1 << 20
#: Bytes of a part received but not yet written before the connection stops being read.
HIGH_WATER = 8 << 20
#: One receive buffer of a part (a socket read fills at most this much), a multiple of ALIGN.
BUF = 1 << 20
#: The block size O_DIRECT writes keep to (file offset, length and memory address).
ALIGN = 4096
#: Receive buffers kept for reuse, over all parts (more are mapped while many parts arrive).
POOL_KEEP = 16

#: What the sending API takes for one property: the bytes, a file path, or a binary stream.
Source = Union[bytes, bytearray, memoryview, str, os.PathLike, BinaryIO]


def blob_dir(data_dir: str) -> str:
    return os.path.join(data_dir, BLOB_DIR)


def new_name(prefix: str = "") -> str:
    """A new blob name (the local key): 32 hex digits, the first ones the store's *prefix*."""
    return prefix + uuid.uuid4().hex[len(prefix):]


def new_prefix() -> str:
    """A store's blob name prefix (made once, when the store is created)."""
    return uuid.uuid4().hex[:PREFIX_LEN]


def _is_name(name: str) -> bool:
    return len(name) == 32 and _HEX.issuperset(name)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def content_digest(sha256_b64: str) -> str:
    """The RFC 9530 ``Content-Digest`` value of a body whose SHA-256 is *sha256_b64* (base64)."""
    return f"sha-256=:{sha256_b64}:"


def digest_sha256(value: str) -> str | None:
    """The base64 SHA-256 a ``Content-Digest`` value gives (RFC 9530), or None when it names
    only other algorithms (those are ignored, as the RFC says).

    :raises ValueError: the ``sha-256`` member is not a base64 SHA-256 between colons.
    """
    for member in value.split(","):
        alg, eq, rest = member.strip().partition("=")
        if not eq or alg.strip().lower() != "sha-256":
            continue
        rest = rest.strip()
        if len(rest) < 2 or rest[0] != ":" or rest[-1] != ":":
            raise ValueError("the sha-256 member of Content-Digest is not a byte sequence (:base64:)")
        try:
            raw = base64.b64decode(rest[1:-1], validate=True)
        except (ValueError, TypeError):
            raise ValueError("the sha-256 member of Content-Digest is not base64") from None
        if len(raw) != 32:
            raise ValueError("the sha-256 member of Content-Digest is not 32 bytes")
        return _b64(raw)
    return None


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


class BlobInfo:
    """One blob's index record (``gwcore inspect blobs``)."""

    __slots__ = ("name", "expiry_ms", "size", "md5", "sha256", "part")

    def __init__(self, name: str, value: bytes) -> None:
        expiry_ms, size, md5, sha = _BLOB.unpack_from(value)
        self.name = name
        self.expiry_ms = expiry_ms
        self.size = size
        #: base64 digests; empty when not computed (a part received without Content-MD5, unsigned)
        self.md5 = md5.rstrip(b"\0").decode("ascii")
        self.sha256 = sha.rstrip(b"\0").decode("ascii")
        #: The part key (scope, id, DataBusKey) while the blob waits for its submit, else None.
        self.part: bytes | None = bytes(value[_BLOB.size:]) or None


def _blob_record(expiry_ms: int, size: int, md5: str, sha: str, owner: bytes = b"") -> bytes:
    return _BLOB.pack(expiry_ms, size, md5.encode("ascii"), sha.encode("ascii")) + owner


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
    txn.put(_U64.pack(expiry_ms) + key, b"", db=store.databus_expiry)


def _drop_blob(txn: Any, store: Any, name: str, doom: Callable[[str], None]) -> None:
    key = name.encode("ascii")
    value = txn.pop(key, db=store.databus_blobs)
    if value is not None:
        txn.delete(value[:8] + key, db=store.databus_expiry)
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
    if value is not None and len(value) > _BLOB.size:
        txn.put(key, bytes(value[:_BLOB.size]), db=store.databus_blobs)


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
        _put_blob(txn, store, self.name, _blob_record(self.expiry_ms, self.size, self.md5, self.sha, self.part_key),
                  self.expiry_ms)

    def stream_record(self) -> bytes:
        """u32 length and the part key, the blob record, the blob name (:func:`decode_part_record`)."""
        return (_U32.pack(len(self.part_key)) + self.part_key
                + _blob_record(self.expiry_ms, self.size, self.md5, self.sha) + self.name.encode("ascii"))


def record_part(store: Any, part_key: bytes, name: str, size: int, md5: str, sha: str,
                expiry_ms: int, doom: Callable[[str], None]) -> PartJob:
    """A writer job indexing a part whose blob is on disk; a part sent again replaces the
    earlier one (whose file goes once the job commits: *doom*; in a shared blob dir at its expiry)."""
    return PartJob(store, part_key, name, size, md5, sha, expiry_ms, doom)


def record_blob(store: Any, name: str, size: int, md5: str, sha: str, expiry_ms: int) -> Callable[[Any], None]:
    """Index a blob of an outgoing message (sending side)."""
    def job(txn: Any) -> None:
        _put_blob(txn, store, name, _blob_record(expiry_ms, size, md5, sha), expiry_ms)
    return job


# -- replicated part records (selected mode) ----------------------------------------------------------

def decode_part_record(body: bytes) -> tuple[bytes, bytes]:
    """``(part key, databus_replica value)`` of a stream record made by :meth:`PartJob.stream_record`.

    :raises ValueError: the record is malformed."""
    if len(body) < 4:
        raise ValueError("short part record")
    (n,) = _U32.unpack_from(body)
    key = bytes(body[4:4 + n])
    value = bytes(body[4 + n:])
    if len(key) != n or len(value) <= _BLOB.size or not _is_name(value[_BLOB.size:].decode("ascii", "replace")):
        raise ValueError("malformed part record")
    return key, value


def _drop_replica(txn: Any, store: Any, key: bytes) -> None:
    value = txn.pop(key, db=store.databus_replica)
    if value is not None:
        txn.delete(value[:8] + key, db=store.databus_replica_expiry)


def replicate_parts(txn: Any, store: Any, items: Iterable[tuple[bytes, bytes]], now_ms: int) -> int:
    """Keep part records followed from the stream (a later record for a key replaces the earlier
    one; expired ones are skipped). Returns how many were kept."""
    n = 0
    for key, value in items:
        expiry_ms = _U64.unpack_from(value)[0]
        if expiry_ms <= now_ms:
            continue
        _drop_replica(txn, store, key)
        txn.put(key, value, db=store.databus_replica)
        txn.put(_U64.pack(expiry_ms) + key, b"", db=store.databus_replica_expiry)
        n += 1
    return n


def forget_parts(txn: Any, store: Any, message_keys: Iterable[bytes]) -> int:
    """Drop the replicated part records of messages a leader has dispatched (they are not needed
    by any later submit: a sender that retries sends the parts again). Returns how many went."""
    n = 0
    if store.databus_replica is None:
        return 0
    cursor = txn.cursor(db=store.databus_replica)
    try:
        for msg_key in message_keys:
            prefix = msg_key + b"\0"
            found = []
            if cursor.set_range(prefix):
                for key in cursor.iternext(values=False):
                    if not key.startswith(prefix):
                        break
                    found.append(bytes(key))
            for key in found:
                _drop_replica(txn, store, key)
            n += len(found)
    finally:
        cursor.close()
    return n


def _replicated(txn: Any, store: Any, key: bytes, now_ms: int) -> tuple[str, bytes] | None:
    """``(blob name, blob record)`` of a part another instance took, when its blob file is in
    this blob dir whole and not expired; else None."""
    if store.databus_replica is None:
        return None
    value = txn.get(key, db=store.databus_replica)
    if value is None:
        return None
    value = bytes(value)
    expiry_ms, size = _BLOB.unpack_from(value)[:2]
    name = value[_BLOB.size:].decode("ascii", "replace")
    if expiry_ms <= now_ms or not _is_name(name):
        return None
    try:
        st = os.stat(os.path.join(store.blob_dir, name))
    except OSError:
        return None  # not shared with the instance that took it: the sender sends the part again
    if st.st_size != size:
        return None
    return name, value[:_BLOB.size]


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
        prefix = env.key + b"\0"
        keys = [prefix + wire.encode("utf-8") for wire, _stored in names]
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
                    got = _replicated(txn, store, k, now)
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
                    txn.delete(bytes(earlier[:8]) + name.encode("ascii"), db=store.databus_expiry)
                _put_blob(txn, store, name, record, _U64.unpack_from(record)[0])
            else:
                txn.delete(k, db=parts_db)
                # The blob belongs to the message now: its record no longer names a waiting part.
                record = txn.get(name.encode("ascii"), db=store.databus_blobs)
                if record is not None:
                    txn.put(name.encode("ascii"), bytes(record[:_BLOB.size]), db=store.databus_blobs)
            if replica_db is not None:
                _drop_replica(txn, store, k)
        adopted_total += len(adopted)
        replaced[id(env)] = env.with_framed(core.encode_envelope(msg_id, headers, body, expiry_ms, accepted_ms))
    return replaced, rejected, adopted_total


def _walk_expired(txn: Any, db: Any, now_ms: int, limit: int, drop: Callable[[bytes], None]) -> int:
    """Delete up to *limit* entries of the expiry database *db* (keys: 8-byte big-endian expiry
    in ms, then what expires) whose time has come, calling ``drop(key)`` for each; the count."""
    n = 0
    cursor = txn.cursor(db=db)
    try:
        ok = cursor.first()
        while ok and n < limit:
            key = bytes(cursor.key())
            if len(key) <= 8 or _U64.unpack_from(key)[0] > now_ms:
                break
            drop(key)
            n += 1
            ok = cursor.delete()
    finally:
        cursor.close()
    return n


def expire(txn: Any, store: Any, now_ms: int, limit: int, doomed: list[str]) -> int:
    """Remove up to *limit* blobs whose expiry passed (with the part record of any that still
    waits for its submit); their files go after the commit. Up to *limit* expired replicated part
    records go too (their files are not this instance's to remove). Returns the larger count."""
    if store.databus_expiry is None:
        return 0

    def drop_blob(key: bytes) -> None:
        name = key[8:]
        value = txn.pop(name, db=store.databus_blobs)
        if value is not None and len(value) > _BLOB.size:
            owner = bytes(value[_BLOB.size:])
            if txn.get(owner, db=store.databus_parts) == name:
                txn.delete(owner, db=store.databus_parts)
        doomed.append(name.decode("ascii"))

    n = _walk_expired(txn, store.databus_expiry, now_ms, limit, drop_blob)
    return max(n, _expire_replica(txn, store, now_ms, limit))


def _expire_replica(txn: Any, store: Any, now_ms: int, limit: int) -> int:
    if store.databus_replica_expiry is None:
        return 0

    def drop_record(key: bytes) -> None:
        part_key = key[8:]
        value = txn.get(part_key, db=store.databus_replica)
        if value is not None and bytes(value[:8]) == key[:8]:
            txn.delete(part_key, db=store.databus_replica)

    return _walk_expired(txn, store.databus_replica_expiry, now_ms, limit, drop_record)


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
    os.makedirs(directory, exist_ok=True)
    mine = store.blob_prefix if store.blobs_shared else ""
    if store.blobs_shared and len(mine) != PREFIX_LEN:
        return 0  # a store without a prefix cannot tell its files from the others'
    gone = []
    with store.resize_lock, store.env.begin() as txn:
        for entry in os.scandir(directory):
            name = entry.name
            tmp = name.startswith(_TMP)
            if not (name[len(_TMP):] if tmp else name).startswith(mine):
                continue
            if not entry.is_file(follow_symlinks=False):
                continue
            if tmp or txn.get(name.encode("utf-8", "surrogateescape"), db=store.databus_blobs) is None:
                gone.append(name)
    unlink(directory, gone)
    if gone:
        log.info("databus: removed %d blob files no record names (unfinished before a restart)", len(gone))
    return len(gone)


# -- the loop side: streaming a part to disk -----------------------------------------------------------

class _Buf:
    """One receive buffer of a part: ``BUF`` bytes of anonymous memory, so page aligned (what
    ``O_DIRECT`` needs), filled in order and then read by each lane of the sink that filled it."""

    __slots__ = ("view", "holds")

    def __init__(self) -> None:
        self.view = memoryview(mmap.mmap(-1, BUF))
        self.holds = 0  # lanes that have not yet finished with the whole buffer


class BlobWriter:
    """Makes :class:`BlobSink` objects for one data dir; owns the threads that write blobs and
    the receive buffers they reuse.

    :param direct_io: write blob files with ``O_DIRECT`` where the file system allows it (the
        bytes go from the receive buffer to the disk without a copy into the page cache; the file
        is still fsync'd before a part is acknowledged). Falls back to ordinary writes per file
        when the file system refuses it.
    :param directory: the blob dir (``GWCORE_BLOB_DIR``), default ``<data_dir>/blobs``.
    :param prefix: the store's blob name prefix (:func:`new_name`).
    """

    def __init__(self, data_dir: str, loop: asyncio.AbstractEventLoop, *, direct_io: bool = True,
                 directory: str | None = None, prefix: str = "") -> None:
        self.directory = directory or blob_dir(data_dir)
        self.prefix = prefix
        os.makedirs(self.directory, exist_ok=True)
        self.loop = loop
        self.direct_io = direct_io and hasattr(os, "O_DIRECT")
        # One blob's work stays in order (one write job and one hash job at a time per sink);
        # four threads let a second upload go on beside the first one's.
        self.executor = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="gwcore-blob")
        # Receive buffers come back here once every lane is done with them: memory that is
        # mapped once and stays faulted in, instead of a fresh allocation per read.
        self._free: list[_Buf] = []
        self._free_lock = threading.Lock()

    def sink(self, on_drain: Callable[[], None], *, signed: bool = False, md5: bool = True) -> "BlobSink":
        """:param signed: compute the SHA-256 (the signature's body digest).
        :param md5: compute the MD5 (the request has a ``Content-MD5`` to verify)."""
        return BlobSink(self, on_drain, signed, md5)

    def _take(self, holds: int) -> _Buf:
        with self._free_lock:
            buf = self._free.pop() if self._free else None
        if buf is None:
            buf = _Buf()
        buf.holds = holds
        return buf

    def _release(self, buf: _Buf) -> None:
        """A lane (any thread) is done with *buf*; the last one gives it back."""
        with self._free_lock:
            buf.holds -= 1
            if buf.holds == 0 and len(self._free) < POOL_KEEP:
                self._free.append(buf)

    def _give_back(self, buf: _Buf) -> None:
        """The sink's last, partly filled buffer, once no lane can still touch it."""
        with self._free_lock:
            buf.holds = 0
            if len(self._free) < POOL_KEEP:
                self._free.append(buf)

    def close(self) -> None:
        self.executor.shutdown(wait=True)


#: A run of received bytes: ``view[start:end]`` of one receive buffer.
_Region = tuple  # (_Buf, int, int)


class _Lane:
    """One in-order stream of work over a sink's regions (writing, or hashing), run by one job in
    a blob thread that keeps taking what arrives until nothing is left, so a busy part never
    waits for the event loop between batches."""

    __slots__ = ("fn", "pending", "queued", "running", "lock", "whole")

    def __init__(self, fn: Callable[[list], None], whole: bool = False) -> None:
        self.fn = fn
        self.whole = whole               # takes only whole buffers (the O_DIRECT write lane)
        self.pending: list[_Region] = []
        self.queued = 0                  # bytes handed to this lane and not yet processed
        self.running = False             # a job is in a blob thread (or about to be)
        self.lock = threading.Lock()


def _runs(regions: list[_Region]) -> Iterator[tuple[_Buf, int, int]]:
    """Adjacent regions of one buffer merged: one hash update or write call per run."""
    buf = None
    start = end = 0
    for b, s, e in regions:
        if b is buf and s == end:
            end = e
            continue
        if buf is not None:
            yield buf, start, end
        buf, start, end = b, s, e
    if buf is not None:
        yield buf, start, end


class BlobSink:
    """One blob being received: its bytes land in page-aligned receive buffers (copied there by
    :meth:`write`, or read there straight from the socket through :meth:`receive_into` and
    :meth:`received`), and blob threads write them, and hash them, in order, side by side.

    Neither call blocks; :attr:`behind` says the disk (or the hashing) lags more than
    ``HIGH_WATER`` bytes (the caller pauses reading, and ``on_drain`` is called on the loop once
    the lag is below half of that).
    """

    def __init__(self, owner: BlobWriter, on_drain: Callable[[], None], signed: bool, md5: bool = True) -> None:
        self.owner = owner
        self.loop = owner.loop
        self.name = new_name(owner.prefix)
        self.tmp = os.path.join(owner.directory, _TMP + self.name)
        self.path = os.path.join(owner.directory, self.name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self.direct = False
        if owner.direct_io:
            try:
                self.fd = os.open(self.tmp, flags | os.O_DIRECT, 0o600)
                self.direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # tmpfs and some others refuse O_DIRECT
                    raise
        if not self.direct:
            self.fd = os.open(self.tmp, flags, 0o600)
        # Only the digests the request needs: MD5 is the slowest step of a part (about 730 MiB/s
        # a core here), and a sender may leave Content-MD5 out.
        self.md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.sha = hashlib.sha256() if signed else None
        self.size = 0
        self._on_drain = on_drain
        # Writing and hashing run side by side in two lanes (hashlib and os.write release the
        # GIL), so neither waits for the other: a part goes at the pace of the slower one.
        self._lanes = [_Lane(self._write_regions, whole=self.direct)]
        if self.md5 is not None or self.sha is not None:
            self._lanes.append(_Lane(self._hash_regions))
        self._cur: _Buf | None = None    # the buffer being filled (loop thread)
        self._fill = 0                   # bytes of it filled
        self._wbuf: _Buf | None = None   # the write lane's partly written (or held back) buffer
        self._wpos = 0                   # bytes of it written
        self._idle: asyncio.Future | None = None
        self._error: BaseException | None = None
        self._closed = False

    @property
    def behind(self) -> bool:
        return max(lane.queued for lane in self._lanes) >= HIGH_WATER

    # -- the loop side ------------------------------------------------------------------------------

    def write(self, chunk: bytes | memoryview) -> None:
        """Take *chunk* (copied into the receive buffers)."""
        view = memoryview(chunk).cast("B")
        while view:
            room = self.receive_into(len(view))
            n = len(room)
            room[:] = view[:n]
            self.received(n)
            view = view[n:]

    def receive_into(self, limit: int) -> memoryview:
        """Where the next at most *limit* bytes of the blob go (a socket reads into it); then
        :meth:`received` says how many came."""
        if self._cur is None:
            self._cur = self.owner._take(len(self._lanes))
            self._fill = 0
        return self._cur.view[self._fill:self._fill + min(limit, BUF - self._fill)]

    def received(self, n: int) -> None:
        """*n* bytes were put where :meth:`receive_into` said: hand them to the lanes."""
        if n <= 0 or self._closed or self._error is not None:
            return  # a failed blob is read past (the buffer is reused), answered at its end
        buf, start = self._cur, self._fill
        assert buf is not None
        self._fill = end = start + n
        self.size += n
        if end == BUF:
            self._cur = None  # full: the lanes give it back once both are done with it
        region = (buf, start, end)
        for lane in self._lanes:
            if lane.whole:
                # the O_DIRECT writer is woken once per full buffer, not per read
                if end != BUF:
                    continue
                take, nbytes = (buf, 0, BUF), BUF
            else:
                take, nbytes = region, n
            with lane.lock:
                lane.pending.append(take)
                lane.queued += nbytes
                begin = not lane.running
                lane.running = True
            if begin:
                self.owner.executor.submit(self._run, lane)

    # -- the blob threads ---------------------------------------------------------------------------

    def _run(self, lane: _Lane) -> None:
        # In a blob thread: hashlib and os.write release the GIL on large buffers.
        while True:
            with lane.lock:
                regions, lane.pending = lane.pending, []
                if not regions or self._error is not None or self._closed:
                    lane.pending = []
                    lane.running = False
                    break
            try:
                lane.fn(regions)
            except BaseException as exc:  # reported by finish()
                self._error = self._error or exc
            n = sum(e - s for _b, s, e in regions)
            with lane.lock:
                was_behind = lane.queued >= HIGH_WATER
                lane.queued -= n
                drained = was_behind and lane.queued < HIGH_WATER // 2
            if drained:
                self.loop.call_soon_threadsafe(self._drained)
        self.loop.call_soon_threadsafe(self._lane_stopped)

    def _hash_regions(self, regions: list[_Region]) -> None:
        for buf, start, end in _runs(regions):
            piece = buf.view[start:end]
            if self.md5 is not None:
                self.md5.update(piece)
            if self.sha is not None:
                self.sha.update(piece)
            if end == BUF:
                self.owner._release(buf)

    def _write_regions(self, regions: list[_Region]) -> None:
        if self.direct:
            # The O_DIRECT lane is handed whole buffers only (a write waits for the device, so
            # small ones are slow): consecutive ones go in one call, the last one's tail at _seal.
            full = [buf for buf, _start, _end in _runs(regions)]
            self._write_out([buf.view for buf in full])
            for buf in full:
                self.owner._release(buf)
            return
        for buf, _start, end in _runs(regions):
            # from 0 for a buffer new to this lane: it may have skipped the start of it while
            # it took whole buffers only (O_DIRECT, given up on since)
            begin = self._wpos if buf is self._wbuf else 0
            if end > begin:
                self._write_out([buf.view[begin:end]])
            self._wbuf, self._wpos = buf, end
            if end == BUF:
                self.owner._release(buf)

    def _write_out(self, views: list[memoryview]) -> None:
        """Write *views* in order, whatever the short writes; leaves O_DIRECT for good when the
        file system refuses it at a write or a short write leaves the file off the block grid."""
        views = [v for v in views if len(v)]
        while views:
            try:
                n = os.writev(self.fd, views)
            except OSError as exc:
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                self._buffered()  # the file system took the open but not the write
                continue
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if views:
                views[0] = views[0][n:]
                if self.direct and n % ALIGN:
                    self._buffered()

    def _buffered(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False
        self._lanes[0].whole = False

    def _busy(self) -> bool:
        return any(lane.running for lane in self._lanes)

    def _drained(self) -> None:
        if not self.behind:
            self._on_drain()

    def _lane_stopped(self) -> None:
        if self._busy():
            return
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        if self._closed:
            self._discard()
        self._drained()

    async def finish(self) -> tuple[str | None, str | None]:
        """Everything written: fsync the file, rename it into place, fsync the directory.
        Returns ``(Content-MD5, SHA-256)`` in base64, each None when not computed.

        :raises OSError: a write or the fsync failed (the temp file is removed).
        """
        while self._busy():
            self._idle = self.loop.create_future()
            await self._idle
        if self._error is not None:
            self.abort()
            raise self._error
        try:
            await self.loop.run_in_executor(self.owner.executor, self._seal)
        except BaseException:
            self.abort()
            raise
        return (_b64(self.md5.digest()) if self.md5 is not None else None,
                _b64(self.sha.digest()) if self.sha is not None else None)

    def _seal(self) -> None:
        # The lanes are idle: what the write lane held back of the last buffer goes now.
        buf, fill = self._cur, self._fill
        if buf is not None:
            begin = self._wpos if buf is self._wbuf else 0
            if self.direct:
                whole = fill - fill % ALIGN
                self._write_out([buf.view[:whole]])
                begin = whole
                if fill > whole:
                    self._buffered()
            self._write_out([buf.view[begin:fill]])
            self._cur = self._wbuf = None
            self.owner._give_back(buf)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.rename(self.tmp, self.path)
        _fsync_dir(self.owner.directory)

    def abort(self) -> None:
        """Give up on this blob: its file goes (after a write in progress ends)."""
        if self._closed:
            return
        self._closed = True
        for lane in self._lanes:
            with lane.lock:
                lane.pending = []
        if not self._busy():
            self._discard()

    def _discard(self) -> None:
        fd, self.fd = self.fd, -1
        tmp = self.tmp
        # Buffers still held by this blob are left to the garbage collector, not reused.
        self._cur = self._wbuf = None

        def remove() -> None:
            if fd >= 0:
                os.close(fd)
            for path in (tmp, self.path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

        try:
            self.loop.run_in_executor(self.owner.executor, remove)
        except RuntimeError:  # the blob threads are gone (shutting down): remove it here
            remove()

    def discard_sealed(self) -> None:
        """Remove a sealed blob whose index record will not be written (401, store refused)."""
        self._closed = True
        self._discard()


# -- the sending side -------------------------------------------------------------------------------

def copy_in(directory: str, source: Source, name: str | None = None) -> tuple[str, int, str, str]:
    """Copy one databus property into the blob store durably (blocking: run it in a thread).
    Returns ``(blob name, size, Content-MD5, SHA-256)``; streams, never reads a file whole."""
    name = name or new_name()
    tmp = os.path.join(directory, _TMP + name)
    md5 = hashlib.md5(usedforsecurity=False)
    sha = hashlib.sha256()
    size = 0
    close_src = False
    if isinstance(source, (bytes, bytearray, memoryview)):
        src: IO[bytes] = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        src = open(source, "rb")
        close_src = True
    elif hasattr(source, "read"):
        src = source
    else:
        raise TypeError(f"a databus property is bytes, a file path or a binary stream, not {type(source).__name__}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                raise TypeError("a databus stream must be binary (read() returned text)")
            md5.update(chunk)
            sha.update(chunk)
            size += len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, os.path.join(directory, name))
        _fsync_dir(directory)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        if close_src:
            src.close()
    return name, size, _b64(md5.digest()), _b64(sha.digest())


def databus_header(name: str) -> str:
    """The message header of a property: ``NServiceBus.DataBus.<name>`` (a full name as given)."""
    return name if name.startswith(DATABUS_PREFIX) else DATABUS_PREFIX + name


# -- the consuming side ---------------------------------------------------------------------------------

class Blob:
    """A databus property of a received message: the local blob behind one header.

    :ivar header: the message header (``NServiceBus.DataBus.<sender's key>``).
    :ivar key: the local blob key (the header's value).
    :ivar path: the blob file; it lives until the message's TimeToBeReceived, else
        ``GWCORE_DATABUS_TTL``, after acceptance.
    """

    __slots__ = ("header", "key", "path")

    def __init__(self, header: str, key: str, path: str) -> None:
        self.header = header
        self.key = key
        self.path = path

    def open(self) -> BinaryIO:
        """A binary reader of the blob (a file: read it in pieces for large properties)."""
        return open(self.path, "rb")

    def read(self) -> bytes:
        """The whole property (only for properties that fit in memory)."""
        with self.open() as f:
            return f.read()

    @property
    def size(self) -> int:
        return os.path.getsize(self.path)

    def __repr__(self) -> str:
        return f"<Blob {self.header!r} key={self.key!r}>"


def message_blobs(directory: str, headers: Mapping[str, str]) -> dict[str, Blob]:
    """``header name -> Blob`` for every databus header whose value names a local blob."""
    out = {}
    for name, value in headers.items():
        if name.startswith(DATABUS_PREFIX) and _is_name(value):
            out[name] = Blob(name, value, os.path.join(directory, value))
    return out
