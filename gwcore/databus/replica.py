"""The part records of selected-instance mode (gwcore/selected/stream.py): the leader appends
every part it takes to the dedup stream before answering it, and every instance keeps those
records in ``databus_replica``. A submit whose part is not in the local index looks there, and
takes the blob when its file is in the blob dir (shared): the new leader after a failover then
needs no re-sent parts.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Iterable

from ..records import part_prefix
from .layout import BLOB, expiring, expiry_key, expiry_of, is_name, walk_expired

__all__ = ("encode_part_record", "decode_part_record", "replicate_parts", "forget_parts", "replicated",
           "drop", "expire")

_U32 = struct.Struct(">I")


def encode_part_record(part_key: bytes, record: bytes, name: str) -> bytes:
    """The stream record of a part: u32 length and the part key, the blob record (without the
    part key), the blob name (:func:`decode_part_record`)."""
    return _U32.pack(len(part_key)) + part_key + record + name.encode("ascii")


def decode_part_record(body: bytes) -> tuple[bytes, bytes]:
    """``(part key, databus_replica value)`` of a stream record made by :func:`encode_part_record`.

    :raises ValueError: the record is malformed."""
    if len(body) < 4:
        raise ValueError("short part record")
    (n,) = _U32.unpack_from(body)
    key = bytes(body[4:4 + n])
    value = bytes(body[4 + n:])
    if len(key) != n or len(value) <= BLOB.size or not is_name(value[BLOB.size:].decode("ascii", "replace")):
        raise ValueError("malformed part record")
    return key, value


def drop(txn: Any, store: Any, key: bytes) -> None:
    """Remove the replicated record of part *key*, if there is one."""
    value = txn.pop(key, db=store.databus_replica)
    if value is not None:
        txn.delete(expiry_key(expiry_of(value), key), db=store.databus_replica_expiry)


def replicate_parts(txn: Any, store: Any, items: Iterable[tuple[bytes, bytes]], now_ms: int) -> int:
    """Keep part records followed from the stream (a later record for a key replaces the earlier
    one; expired ones are skipped). Returns how many were kept."""
    n = 0
    for key, value in items:
        expiry_ms = expiry_of(value)
        if expiry_ms <= now_ms:
            continue
        drop(txn, store, key)
        txn.put(key, value, db=store.databus_replica)
        txn.put(expiry_key(expiry_ms, key), b"", db=store.databus_replica_expiry)
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
            prefix = part_prefix(msg_key)
            found = []
            if cursor.set_range(prefix):
                for key in cursor.iternext(values=False):
                    if not key.startswith(prefix):
                        break
                    found.append(bytes(key))
            for key in found:
                drop(txn, store, key)
            n += len(found)
    finally:
        cursor.close()
    return n


def replicated(txn: Any, store: Any, key: bytes, now_ms: int) -> tuple[str, bytes] | None:
    """``(blob name, blob record)`` of a part another instance took, when its blob file is in
    this blob dir whole and not expired; else None."""
    if store.databus_replica is None:
        return None
    value = txn.get(key, db=store.databus_replica)
    if value is None:
        return None
    value = bytes(value)
    expiry_ms, size = BLOB.unpack_from(value)[:2]
    name = value[BLOB.size:].decode("ascii", "replace")
    if expiry_ms <= now_ms or not is_name(name):
        return None
    try:
        st = os.stat(os.path.join(store.blob_dir, name))
    except OSError:
        return None  # not shared with the instance that took it: the sender sends the part again
    if st.st_size != size:
        return None
    return name, value[:BLOB.size]


def expire(txn: Any, store: Any, now_ms: int, limit: int) -> int:
    """Remove up to *limit* replicated records whose expiry passed (their files are not this
    instance's to remove); the count."""
    if store.databus_replica_expiry is None:
        return 0

    def drop_record(key: bytes) -> None:
        part_key = expiring(key)
        value = txn.get(part_key, db=store.databus_replica)
        if value is not None and expiry_of(value) == expiry_of(key):
            txn.delete(part_key, db=store.databus_replica)

    return walk_expired(txn, store.databus_replica_expiry, now_ms, limit, drop_record)
