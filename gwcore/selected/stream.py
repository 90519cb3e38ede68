"""The dedup stream ``E.gwcore.dedup`` of selected mode: appending records to it, and following it
into this instance's replica (the ``replica_log`` and ``databus_replica`` databases of its LMDB),
resuming at the offset it stored last.

A record's kind is its ``gwcore.kind`` header; ``gwcore.instance`` names the instance that
appended it:

============  ===================================================================================
``batch``     the dispatcher's one append per batch: u32 n, then length-prefixed dedup keys, the
              first n *done* (published and confirmed), the rest *intent* (about to be published)
``intent``,   length-prefixed dedup keys in that one state
``done``
``part``      a databus part the leader took (gwcore/databus/replica.py)
``marker``    a token: an instance that reads its own back has read everything appended before it
``leader``    the marker of a new leader, with ``gwcore.url``: where it receives
``handover``  a leader starts a planned handover (the standbys hold their submits)
``release``   a leader gave the leadership up (the standbys try for it at once)
============  ===================================================================================
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import struct
import uuid
from typing import TYPE_CHECKING, Any, Callable

import aiormq

from .. import databus
from ..amqp import PublishReturned, broker_errors
from ..errors import BrokerUnavailableError
from ..records import decode_replica_record, encode_replica_record, now_ms, pack_seq, part_message_key, unpack_seq

if TYPE_CHECKING:
    from .mode import Selected

__all__ = ("Stream", "INTENT", "DONE")

log = logging.getLogger("gwcore.selected")

#: A key's state in the replica: published maybe (a leader meant to), or published and confirmed.
INTENT, DONE = 1, 2
_KIND = "gwcore.kind"
_FROM = "gwcore.instance"
_URL = "gwcore.url"
_U32 = struct.Struct(">I")
#: Stream records read between two acknowledgements (multiple=True) of the follower.
_ACK_EVERY = 500


def _pack_keys(keys: list[bytes]) -> bytes:
    return b"".join(_U32.pack(len(k)) + k for k in keys)


def _unpack_keys(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = _U32.unpack_from(data, pos)
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


class Stream:
    """One instance's end of the dedup stream: the records it appends and the replica it follows."""

    def __init__(self, mode: "Selected") -> None:
        self._mode = mode
        self.store = mode.store
        self.writer = mode.writer
        self.instance = mode.instance
        self.channel: Any = None  # the publisher-confirms channel appends go through, while connected
        self._raw: Any = None  # aiormq's channel under it: an append is one basic_publish there
        self._appended = 0  # records this instance appended (their message_ids)
        # dedup records from the stream: key -> INTENT / DONE
        self.replica: dict[bytes, int] = {}
        self._ages: collections.deque[tuple[int, list[bytes]]] = collections.deque()  # (first seen ms, keys)
        # the store's replica log: (seq, recorded ms) of each record, oldest first; the next seq
        self._log: collections.deque[tuple[int, int]] = collections.deque()
        self._log_next = 1
        self.offset = -1
        self._replica_pending: list[tuple[bytes, int]] = []
        self._flushing = False
        self._markers: dict[bytes, asyncio.Future] = {}
        self.caught_up = False  # the marker appended after connecting has been read back
        self._catching_up: asyncio.Task | None = None
        self._unacked = 0  # records the follower read since its last acknowledgement
        # databus part records (gwcore/databus/replica.py): (part key, record) to store, the
        # messages that have some, and those dispatched since (their records go)
        self._parts_pending: list[tuple[bytes, bytes]] = []
        self._part_messages: set[bytes] = set()
        self._parts_done: list[bytes] = []
        # Other instances' part records read, and how many of those are in the store: a databus
        # submit waits until they are equal (its parts are looked up in the writer transaction).
        self._parts_read = 0
        self._parts_stored = 0
        self._parts_waiting: list[Callable[[], None]] = []
        self.parts_followed = 0  # part records read from the stream (its own included)

    # -- the replica in the store --------------------------------------------------------------------

    def load(self) -> list[int]:
        """The replica and the stream offset from the store (executor); returns the seqs of the
        replica log's records that have expired."""
        store = self.store
        cutoff = now_ms() - int(self._mode.settings.dedup_ttl * 1000)
        expired = []
        replica = self.replica
        seq = 0
        for raw_seq, value in store.iter_db(store.replica_log):
            seq = unpack_seq(raw_seq)
            recorded, items = decode_replica_record(value)
            if recorded < cutoff:
                expired.append(seq)
                continue
            self._log.append((seq, recorded))
            first = []
            for key, state in items:
                known = replica.get(key)
                if known != DONE:
                    if known is None:
                        first.append(key)
                    replica[key] = state
            if first:
                self._ages.append((recorded, first))
        self._log_next = seq + 1
        if store.databus_replica is not None:
            for key, _value in store.iter_db(store.databus_replica):
                self._part_messages.add(part_message_key(key))
        raw = store.get(store.meta, b"stream_offset")
        self.offset = struct.unpack(">q", raw)[0] if raw else -1
        return expired

    async def drop(self, seqs: list[int]) -> None:
        """Remove these records from the store's replica log."""
        store = self.store

        def drop(txn: Any) -> None:
            for seq in seqs:
                txn.delete(pack_seq(seq), db=store.replica_log)

        await self.writer.call(drop)

    def when_parts_stored(self, then: Callable[[], None]) -> bool:
        """Run *then* once the part records read from other instances are in the store (a
        databus submit may need them: a failover between its parts and it); False, and *then*
        is not kept, when they are already."""
        if self._parts_stored >= self._parts_read:
            return False
        self._parts_waiting.append(then)
        return True

    def release_part_waiters(self) -> None:
        waiting, self._parts_waiting = self._parts_waiting, []
        for then in waiting:
            then()

    # -- the connection ------------------------------------------------------------------------------

    def connection_up(self, channel: Any, raw: Any) -> None:
        """*channel*: aio-pika's publisher-confirms channel; *raw*: aiormq's under it."""
        self.channel = channel
        self._raw = raw

    def connection_lost(self) -> None:
        self.caught_up = False
        self.channel = self._raw = None
        if self._catching_up is not None:
            self._catching_up.cancel()
            self._catching_up = None
        for fut in self._markers.values():
            if not fut.done():
                fut.set_exception(BrokerUnavailableError("connection lost"))
        self._markers.clear()

    # -- appending -----------------------------------------------------------------------------------

    async def append(self, kind: str, body: bytes, url: str = "") -> None:
        raw = self._raw
        if raw is None:
            raise BrokerUnavailableError("not connected")
        headers: dict[str, Any] = {_KIND: kind, _FROM: self.instance}
        if url:
            headers[_URL] = url
        # aiormq's publish, not aio-pika's Message and Exchange around it (a third of the cost);
        # mandatory, so that a missing stream is a returned publish (aiormq's PublishError), not
        # an ack for a record the broker dropped; aiormq matches a return by its message_id
        self._appended += 1
        confirm = await raw.basic_publish(body, routing_key=self._mode.topology.dedup, mandatory=True,
                                          properties=aiormq.spec.Basic.Properties(
                                              headers=headers, delivery_mode=2,
                                              message_id=f"gwcore.dedup.{self.instance}.{self._appended}"))
        if not isinstance(confirm, aiormq.spec.Basic.Ack):  # returned: aiormq hands back the message
            raise PublishReturned.of(confirm)

    async def append_batch(self, done: list[bytes], intended: list[bytes]) -> None:
        """One record: the keys of the previous batch done, those of the next one intended."""
        await self.append("batch", _U32.pack(len(done)) + _pack_keys(done) + _pack_keys(intended))

    async def sync(self, kind: str, url: str = "") -> None:
        """Append a marker and wait until the follower reads it back: everything appended before
        it (by any instance) is in :attr:`replica` then."""
        token = uuid.uuid4().bytes
        fut = asyncio.get_running_loop().create_future()
        self._markers[token] = fut
        try:
            await self.append(kind, token, url)
            await fut
        finally:
            self._markers.pop(token, None)

    # -- following -----------------------------------------------------------------------------------

    async def follow(self, channel: Any) -> None:
        topology = self._mode.topology
        try:
            queue = await channel.declare_queue(topology.dedup, durable=True, arguments=topology.dedup_args())
            # A stream delivers from the start of the chunk holding the offset asked for: the
            # records before it come again and _record skips them.
            start: Any = self.offset + 1 if self.offset >= 0 else "first"
            # aiormq's channel under aio-pika's, a callback per record and an ack per _ACK_EVERY
            # records (multiple=True): a new instance reads a long stream in about half the time
            # of aio-pika's iterator with an ack per record (5,751 against 2,921 records/s of 75
            # keys; bench/load/stream_catchup.py, docs/benchmarks.md)
            raw = await channel.get_underlay_channel()
            self._unacked = 0
            cancelled = asyncio.get_running_loop().create_future()

            def on_cancel(_frame: Any) -> None:  # the broker cancelled the consumer
                if not cancelled.done():
                    cancelled.set_result(None)

            raw.on_consumer_cancel_callbacks.add(on_cancel)
            closing = raw.closing
            try:
                self._catching_up = asyncio.ensure_future(self._catch_up())
                await raw.basic_consume(queue.name, functools.partial(self._delivered, raw),
                                        arguments={"x-stream-offset": start})
                await asyncio.wait([closing, cancelled], return_when=asyncio.FIRST_COMPLETED)
                if closing.done():
                    closing.result()  # the channel's end: a broker error, caught below
                else:
                    log.info("stream follower: the broker cancelled the consumer")
            finally:
                raw.on_consumer_cancel_callbacks.discard(on_cancel)
                closing.cancel()  # an observer only: stops observing
        except broker_errors as exc:  # the connection went: _down has run, the next one follows again
            log.debug("stream follower ended: %s", exc)
        # (cancelled, it does not get here) On a connection still up, the node would not serve the
        # stream (a cluster node whose replica is not running): follow again on a new connection.
        self._mode.link.drop("the stream follower ended")

    async def _catch_up(self) -> None:
        try:
            await self.sync("marker")
        except broker_errors as exc:
            self._mode.link.drop(f"catching up with the stream failed ({exc})")  # if the connection is still up
            return
        except asyncio.CancelledError:
            return
        self.caught_up = True
        self._mode.dispatcher.kick()

    async def _delivered(self, raw: Any, message: Any) -> None:
        """One stream record (aiormq's DeliveredMessage), applied before anything is awaited:
        aiormq starts a task per delivery, in order, so records are applied in stream order."""
        self._record(message.header.properties.headers or {}, message.body)
        self._unacked += 1
        if self._unacked >= _ACK_EVERY:
            # a stream keeps no per-record state: the ack is the consumer's credit; fewer than
            # the prefetch (2,000) unacknowledged never stops the deliveries
            self._unacked = 0
            await raw.basic_ack(message.delivery_tag, multiple=True)

    def _record(self, headers: Any, body: bytes) -> None:
        offset = headers.get("x-stream-offset")
        if isinstance(offset, int):
            if offset <= self.offset:
                return  # a record seen before a reconnect
            self.offset = offset
        kind = headers.get(_KIND)
        sender = headers.get(_FROM)
        if isinstance(sender, bytes):
            sender = sender.decode()
        if kind == "batch":
            keys = _unpack_keys(body[4:])
            n_done = _U32.unpack_from(body)[0]
            self._apply(keys[:n_done], DONE)
            self._apply(keys[n_done:], INTENT)
        elif kind in ("intent", "done"):
            self._apply(_unpack_keys(body), INTENT if kind == "intent" else DONE)
        elif kind == "part":
            try:
                key, value = databus.decode_part_record(body)
            except ValueError as exc:
                log.warning("stream offset %s: a databus part record gwcore cannot read (%s)", offset, exc)
            else:
                self.parts_followed += 1
                self._parts_pending.append((key, value))
                self._part_messages.add(part_message_key(key))
                if sender != self.instance:
                    self._parts_read += 1
        elif kind in ("marker", "leader"):
            fut = self._markers.get(body)
            if fut is not None and not fut.done():
                fut.set_result(None)
            if kind == "leader":
                url = headers.get(_URL)
                self._mode.handover.leader_announced(sender or "", url.decode() if isinstance(url, bytes)
                                                     else (url or ""))
        elif kind == "handover" and sender != self.instance:
            self._mode.handover.announced_by(sender)
        elif kind == "release" and sender != self.instance:
            self._mode.election.wake()  # try for the leadership now rather than at the next interval
        self._flush_soon()

    def mark_done(self, keys: list[bytes]) -> None:
        """The leader's own batch is done (the record saying so was confirmed): into the replica
        now, not only once the follower reads that record back."""
        self._apply(keys, DONE)
        self._flush_soon()

    def _flush_soon(self) -> None:
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.flush()))

    def _apply(self, keys: list[bytes], state: int) -> None:
        replica = self.replica
        pending = self._replica_pending
        first = []
        if state == DONE and self._part_messages:
            # dispatched: the parts of these messages are needed by no later submit
            for key in keys:
                if key in self._part_messages:
                    self._part_messages.discard(key)
                    self._parts_done.append(key)
        for key in keys:
            known = replica.get(key)
            if known != DONE:
                if known is None:
                    first.append(key)
                replica[key] = state
                pending.append((key, state))
        if first:
            self._ages.append((now_ms(), first))

    def _expire(self) -> list[int]:
        """Forget the records older than GWCORE_DEDUP_TTL (the stream drops them too); returns the
        seqs of the replica log's records as old. A key is forgotten at its first record's age,
        its log records each at their own: one restarted in between lives on from its last."""
        cutoff = now_ms() - int(self._mode.settings.dedup_ttl * 1000)
        ages = self._ages
        while ages and ages[0][0] < cutoff:
            for key in ages.popleft()[1]:
                self.replica.pop(key, None)
        log_records = self._log
        gone = []
        while log_records and log_records[0][1] < cutoff:
            gone.append(log_records.popleft()[0])
        return gone

    async def flush(self) -> None:
        """Write what was read since the last flush (records, part records, the offset) to the store."""
        try:
            while True:
                items, self._replica_pending = self._replica_pending, []
                parts, self._parts_pending = self._parts_pending, []
                done, self._parts_done = self._parts_done, []
                parts_read = self._parts_read
                offset = self.offset
                if not items and not parts and offset < 0:
                    return
                store = self.store
                stamp = now_ms()
                gone = self._expire()
                if items:
                    seq = self._log_next
                    self._log_next += 1
                    self._log.append((seq, stamp))

                def write(txn: Any) -> None:
                    if items:  # one value at the log's end, however many keys
                        txn.put(pack_seq(seq), encode_replica_record(stamp, items), db=store.replica_log)
                    for old in gone:
                        txn.delete(pack_seq(old), db=store.replica_log)
                    if parts:
                        databus.replicate_parts(txn, store, parts, stamp)
                    if done:
                        databus.forget_parts(txn, store, done)
                    txn.put(b"stream_offset", struct.pack(">q", offset), db=store.meta)

                await self.writer.call(write)
                self._parts_stored = parts_read
                if self._parts_waiting:
                    self.release_part_waiters()
                if not (self._replica_pending or self._parts_pending or self._parts_done):
                    return
        except Exception as exc:  # the store is closing: the stream has it all, it is read again
            log.debug("replica flush failed: %s", exc)
            self._parts_stored = self._parts_read  # a waiting submit gets the writer's answer
            self.release_part_waiters()
        finally:
            self._flushing = False
