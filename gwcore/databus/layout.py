"""Where the databus keeps things and how their bytes are laid out: blob names, the blob dir and
its files, and the keys and values of the databus LMDB databases (store.py opens them).

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
A blob file is written as ``<blob dir>/.tmp-<name>`` and renamed to its name once it is whole.
"""

from __future__ import annotations

import os
import struct
import uuid
from typing import Any, Callable

from ..records import pack_seq, unpack_seq

__all__ = ("DATABUS_PREFIX", "BLOB_DIR", "TMP", "PREFIX_LEN", "BLOB", "blob_dir", "new_name", "new_prefix",
           "is_name", "blob_record", "expiry_key", "expiry_of", "expiring", "fsync_dir", "walk_expired")

#: The header prefix of a databus property (``NServiceBus.DataBus.<key>``).
DATABUS_PREFIX = "NServiceBus.DataBus."
BLOB_DIR = "blobs"
#: A blob file's name while it is written (then renamed to the blob name).
TMP = ".tmp-"
BLOB = struct.Struct(">QQ24s44s")     # expiry_ms, size, Content-MD5, SHA-256 (base64); then owner
_HEX = frozenset("0123456789abcdef")
#: Hex digits at the start of every blob name that name the store which made it.
PREFIX_LEN = 8


def blob_dir(data_dir: str) -> str:
    return os.path.join(data_dir, BLOB_DIR)


def new_name(prefix: str = "") -> str:
    """A new blob name (the local key): 32 hex digits, the first ones the store's *prefix*."""
    return prefix + uuid.uuid4().hex[len(prefix):]


def new_prefix() -> str:
    """A store's blob name prefix (made once, when the store is created)."""
    return uuid.uuid4().hex[:PREFIX_LEN]


def is_name(name: str) -> bool:
    return len(name) == 32 and _HEX.issuperset(name)


def blob_record(expiry_ms: int, size: int, md5: str, sha: str, owner: bytes = b"") -> bytes:
    """A ``databus_blobs`` value; *owner* is the part key of a part waiting for its submit."""
    return BLOB.pack(expiry_ms, size, md5.encode("ascii"), sha.encode("ascii")) + owner


def expiry_key(expiry_ms: int, key: bytes) -> bytes:
    """A ``databus_expiry`` or ``databus_replica_expiry`` key: u64 expiry_ms, then *key* (what
    expires: a blob name, a part key)."""
    return pack_seq(expiry_ms) + key


def expiry_of(value: bytes | memoryview) -> int:
    """The expiry_ms that an expiry key and a blob record (with or without its blob name) begin with."""
    return unpack_seq(value[:8])


def expiring(key: bytes) -> bytes:
    """What an expiry key names (a blob name, a part key)."""
    return key[8:]


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def walk_expired(txn: Any, db: Any, now_ms: int, limit: int, drop: Callable[[bytes], None]) -> int:
    """Delete up to *limit* entries of the expiry database *db* (keys: 8-byte big-endian expiry
    in ms, then what expires) whose time has come, calling ``drop(key)`` for each; the count."""
    n = 0
    cursor = txn.cursor(db=db)
    try:
        ok = cursor.first()
        while ok and n < limit:
            key = bytes(cursor.key())
            if len(key) <= 8 or expiry_of(key) > now_ms:
                break
            drop(key)
            n += 1
            ok = cursor.delete()
    finally:
        cursor.close()
    return n
