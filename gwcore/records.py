"""The layouts of the keys and records that several modules of gwcore build or read, each in one
place (the store's databases are listed in gwcore/store.py; the databus's own keys and values are
in gwcore/databus/layout.py, the outgoing records in gwcore/egress.py).

``dedup key``: scope ``\\0`` id (UTF-8). What a ``replica_log`` record lists (selected mode) and
the tail of a ``dedup_log`` value; the framer builds the same bytes as ``Envelope.key``, and the
core's ``DedupIndex`` writes the ``dedup_log`` value (u64 accepted_ms, then the key).

``part key``: dedup key ``\\0`` DataBusKey (UTF-8). The key of ``databus_parts`` and
``databus_replica``, and the waiting part named in a blob record.

``u64``: 8 bytes, big-endian, so keys sort in numeric order (:func:`pack_seq`, the core's). Every
sequence number key, the u64 values in ``meta``, the times that begin a record or an expiry key.

``replica record``: u64 recorded_ms, then per dedup key u8 state (1 intent, 2 done), u32 key
length, the key. The value of ``replica_log`` (selected mode: the dedup records followed from the
broker's stream, one record per flush under a u64 seq), so a flush writes one value at the right
edge of one tree, not a page per random key (:func:`encode_replica_record`).

``error record``: u64 failed_ms, u32 reason length, the reason (UTF-8), the envelope. The value
of ``errors`` (a message whose handler kept failing).

The scope never holds a NUL (the framer refuses such a scope), so a dedup key's scope ends at its
first NUL. An id or a DataBusKey may hold one (both arrive URL-encoded), so where a part key is
split is a rule of ours: its message key ends at its last NUL.

Times are milliseconds since the epoch (:func:`now_ms`); the compiled request path reads the
same clock (``CLOCK_REALTIME``) itself.
"""

from __future__ import annotations

import struct
import time
from typing import Any, Iterable

from ._core import core

__all__ = ("pack_seq", "unpack_seq", "now_ms", "dedup_key", "split_dedup_key", "part_prefix", "part_key",
           "part_message_key", "split_part_key", "encode_error", "decode_error", "append_errors",
           "encode_replica_record", "decode_replica_record")

#: A u64 as an 8-byte big-endian key or value (the core's; sorts in numeric order).
pack_seq = core.pack_seq
#: The inverse of :func:`pack_seq`: exactly 8 bytes (a ``FramingError`` otherwise).
unpack_seq = core.unpack_seq

_ERROR = struct.Struct(">QI")  # failed_ms, reason length; then the reason, then the envelope
_REPLICA_ENTRY = struct.Struct(">BI")  # state, key length; then the key
_SEP = b"\0"


def now_ms(at: float | None = None) -> int:
    """Milliseconds since the epoch: now, or at *at* (seconds since the epoch)."""
    if at is None:
        return time.time_ns() // 1_000_000
    return int(at * 1000)


def dedup_key(scope: str, msg_id: str) -> bytes:
    """The dedup key of message *msg_id* received for *scope* (the endpoint)."""
    return scope.encode("utf-8") + _SEP + msg_id.encode("utf-8")


def split_dedup_key(key: bytes) -> tuple[str, str]:
    """``(scope, id)`` of a dedup key (invalid UTF-8 replaced)."""
    scope, _sep, msg_id = bytes(key).partition(_SEP)
    return scope.decode("utf-8", "replace"), msg_id.decode("utf-8", "replace")


def part_prefix(message_key: bytes) -> bytes:
    """What every part key of the message with dedup key *message_key* begins with."""
    return message_key + _SEP


def part_key(message_key: bytes, databus_key: str) -> bytes:
    """The key of the databus part *databus_key* of the message with dedup key *message_key*."""
    return message_key + _SEP + databus_key.encode("utf-8")


def part_message_key(key: bytes) -> bytes:
    """The dedup key of the message a part key belongs to."""
    return bytes(key).rpartition(_SEP)[0]


def split_part_key(key: bytes) -> tuple[str, str, str]:
    """``(scope, id, DataBusKey)`` of a part key (invalid UTF-8 replaced)."""
    message_key, _sep, databus_key = bytes(key).rpartition(_SEP)
    return (*split_dedup_key(message_key), databus_key.decode("utf-8", "replace"))


def encode_error(framed: bytes, reason: str, failed_ms: int) -> bytes:
    """An ``errors`` value: the envelope of a message whose handler kept failing, and why."""
    r = reason.encode("utf-8", "replace")
    return _ERROR.pack(failed_ms, len(r)) + r + framed


def append_errors(txn: Any, db: Any, envelopes: Iterable[bytes], reason: str) -> None:
    """Inside a write transaction: an :func:`encode_error` record per stored envelope in
    *envelopes*, each under the next key after the last one in the ``errors`` database *db*."""
    cur = txn.cursor(db=db)
    seq = unpack_seq(cur.key()) + 1 if cur.last() else 1
    failed_ms = now_ms()
    for at, framed in enumerate(envelopes):
        txn.put(pack_seq(seq + at), encode_error(framed, reason, failed_ms), db=db)


def decode_error(value: bytes) -> tuple[int, str, bytes]:
    """``(failed_ms, reason, envelope)`` of an :func:`encode_error` value."""
    failed_ms, n = _ERROR.unpack_from(value)
    start = _ERROR.size
    return failed_ms, bytes(value[start:start + n]).decode("utf-8", "replace"), bytes(value[start + n:])


def encode_replica_record(recorded_ms: int, items: Iterable[tuple[bytes, int]]) -> bytes:
    """A ``replica_log`` value: when, then each ``(dedup key, state)``."""
    entry = _REPLICA_ENTRY.pack
    return pack_seq(recorded_ms) + b"".join(entry(state, len(key)) + key for key, state in items)


def decode_replica_record(value: bytes) -> tuple[int, list[tuple[bytes, int]]]:
    """``(recorded_ms, [(dedup key, state), ...])`` of an :func:`encode_replica_record` value."""
    value = bytes(value)
    recorded_ms = unpack_seq(value[:8])
    items = []
    pos, end, size = 8, len(value), _REPLICA_ENTRY.size
    unpack = _REPLICA_ENTRY.unpack_from
    while pos < end:
        state, n = unpack(value, pos)
        pos += size
        if pos + n > end:
            raise ValueError(f"a replica record cut short: a key of {n} bytes at {pos} of {end}")
        items.append((value[pos:pos + n], state))
        pos += n
    return recorded_ms, items
