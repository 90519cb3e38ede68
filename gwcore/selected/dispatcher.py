"""Selected mode's ingest sink and dispatcher: submits go into the writer's outbox (the ``queue``
database), checked against the dedup stream first, and from there to the broker.

:class:`Dispatcher` is what the HTTP listeners hand submits to in selected mode: an
:class:`gwcore.ingest.IngestSink`, as the local :class:`gwcore.store.Writer` is, which it wraps. A
submit the stream shows *done* is a duplicate; one it shows only *intent* (in flight when a leader
died) is stored again and published marked. Its dispatch loop takes committed outbox entries in
batches: one stream record says the previous batch is done and this one intended, the batch is
published and confirmed, the entries leave the outbox. With ``GWCORE_ACK=dispatched`` a submit is
answered once its batch is confirmed, with ``stored`` once it is committed.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from .. import databus
from .._core import core
from ..amqp import FramePublisher, PublishReturned, broker_errors, cancel_and_wait
from ..errors import BrokerUnavailableError, StoreFullError
from ..records import append_errors, dedup_key, pack_seq
from ..ingest import Done, IngestSink
from ..metrics import Buckets
from .stream import DONE, INTENT

if TYPE_CHECKING:
    from .mode import Selected

__all__ = ("Dispatcher",)

log = logging.getLogger("gwcore.selected")

_DISPATCH_BATCH = 512
# Batches published and not yet confirmed at once: while the broker confirms one, the next one's
# intent is appended and it is published (docs/architecture.md, "Selected mode's publish path").
_IN_FLIGHT_BATCHES = 2
_AMQP_FIELD_NAME_MAX = 128  # the longest header name an AMQP header table carries
_BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # gwcore_dispatch_batch_messages


class Dispatcher(IngestSink):
    """The outbox between the writer and the broker: selected mode's ingest sink."""

    def __init__(self, mode: "Selected") -> None:
        self._mode = mode
        self.settings = mode.settings
        self.store = mode.store
        self.writer = mode.writer
        self.link = mode.link
        self._stream = mode.stream
        self.dispatched_ack = mode.dispatched_ack
        # The core's publishes, on a confirm channel of their own: the broker handles a channel's
        # frames one after another, so a stream append on the publishes' channel waited behind a
        # whole batch's publishes (docs/architecture.md, "Selected mode's publish path").
        self._frames: FramePublisher | None = None
        self._channel: Any = None  # aio-pika's channel under _frames
        self._key_prefix = dedup_key(self.settings.endpoint, "")
        # key -> the answers waiting for its dispatch (GWCORE_ACK=dispatched)
        self.undone: dict[bytes, list[tuple[Done, Any]]] = {}
        self._fresh: set[bytes] = set()  # accepted in this leadership term, not attempted yet
        self._finishing: set[int] = set()
        self._cursor = 0
        self._work = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.dispatched = 0
        self.possible_duplicates = 0
        self.skipped = 0
        self.parts_published = 0  # part records this instance appended as the leader
        self.parts_unreplicated = 0  # parts accepted with ack=stored while the stream was out of reach
        self.refused_full = 0  # submits refused 503 at GWCORE_OUTBOX_MAX or GWCORE_OUTBOX_MAX_BYTES
        self.refused_amqp = 0  # submits refused 400: a header name AMQP cannot carry
        self.returned = 0  # publishes the broker returned: no queue took them
        # With GWCORE_ACK=dispatched a submit's outbox entry is kept here, not committed to the
        # store: no 200 rests on this disk (the broker's confirm and the stream's done record do,
        # docs/deployment.md), so the fsync'd commit is off the path. n -> (key, stored envelope),
        # and the ns not taken for dispatch yet, in order.
        self._mem: dict[int, tuple[bytes, bytes]] = {}
        self._mem_next = 0
        self.mem_bytes = 0  # the envelopes' bytes in _mem, bounded by GWCORE_OUTBOX_MAX_BYTES
        self._mem_queue: collections.deque[int] = collections.deque()
        #: where a dispatched message's time goes: the stream append of each batch's record (the
        #: previous batch done, this one intended), a batch's publish until its last confirm, and
        #: the messages per published batch
        self.append_seconds = Buckets()
        self.confirm_seconds = Buckets()
        self.batch_messages = Buckets(_BATCH_BOUNDS)

    # -- the ingest sink (gwcore/ingest.py) ------------------------------------------------------------

    @property
    def pending(self) -> int:
        return self.writer.pending

    def blob_expiry_ms(self, expiry_ms: int, accepted_ms: int) -> int:
        return self.writer.blob_expiry_ms(expiry_ms, accepted_ms)

    def doom(self, name: str) -> None:
        self.writer.doom(name)

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """:meth:`gwcore.store.Writer.call`; a databus part (:class:`gwcore.databus.PartJob`) is
        appended to the stream first, so that it is there for every instance before it is
        answered 200.

        :raises BrokerUnavailableError: with ``GWCORE_ACK=dispatched``, the part could not be
            appended (it is answered 503; the sender sends it again)."""
        if isinstance(fn, databus.PartJob):
            await self._publish_part(fn)
        return await self.writer.call(fn)

    async def _publish_part(self, job: databus.PartJob) -> None:
        problem: Any = self.link.last_error
        if self._stream.channel is not None and self.link.connected:
            try:
                await self._stream.append("part", job.stream_record())
                self.parts_published += 1
                return
            except broker_errors + (BrokerUnavailableError,) as exc:
                problem = exc
        if self.dispatched_ack:
            raise BrokerUnavailableError(f"broker unavailable ({problem})")
        # GWCORE_ACK=stored: the part is durable here; if another instance takes over before its
        # submit, that one answers 412 and the sender sends the part again.
        self.parts_unreplicated += 1
        log.debug("databus part of %r kept here only: the stream is out of reach (%s)", job.part_key, problem)

    def ingest_then(self, envelope: Any, done: Done) -> None:
        key = envelope.key
        known = self._stream.replica.get(key)
        if known == DONE:
            done(True, False)  # the stream confirms it was dispatched: a duplicate
            return
        if self.dispatched_ack and not self.link.connected:
            done(False, BrokerUnavailableError(f"broker unavailable ({self.link.last_error})"))
            return
        longest = core.longest_header_name(envelope.framed)
        if longest > _AMQP_FIELD_NAME_MAX:
            # refused before it is stored: the broker could never take it (and a dispatcher that
            # tried would hold up every message behind it)
            self.refused_amqp += 1
            done(True, core.Rejection(400, f"Bad Request: a header name of {longest} bytes; the broker's header "
                                           f"table (AMQP) carries names of at most {_AMQP_FIELD_NAME_MAX} bytes"))
            return
        limit = self.settings.outbox_max
        # with ack=stored the submits on their way to the commit count too; with ack=dispatched
        # the outbox is the memory one alone (the writer's own jobs, a replica flush, are no part of it)
        depth = len(self.undone) if self.dispatched_ack else len(self.undone) + self.writer.pending
        if depth >= limit and key not in self.undone:
            self._refuse_full(done, f"{len(self.undone)} messages", f"GWCORE_OUTBOX_MAX={limit}")
            return
        if self.dispatched_ack and not envelope.databus:
            # (a databus submit goes through the writer: its parts are resolved in its transaction)
            new = key not in self.undone
            framed = envelope.framed
            if new and self.mem_bytes and self.mem_bytes + len(framed) > self.settings.outbox_max_bytes:
                # (one message is always taken into an empty outbox, however large: the bound can
                # never refuse a message for good)
                self._refuse_full(done, f"{self.mem_bytes} bytes of messages",
                                  f"GWCORE_OUTBOX_MAX_BYTES={self.settings.outbox_max_bytes}")
                return
            self._committed(key, known == INTENT, done, True, new)
            if new:
                self._mem_next += 1
                self.mem_bytes += len(framed)
                self._mem[self._mem_next] = (key, framed)
                self._mem_queue.append(self._mem_next)
                self.kick()
            return
        then = functools.partial(self._committed, key, known == INTENT, done)
        if envelope.databus and self._stream.when_parts_stored(functools.partial(self.writer.ingest_then,
                                                                                 envelope, then)):
            return
        self.writer.ingest_then(envelope, then)

    def _refuse_full(self, done: Done, waiting: str, bound: str) -> None:
        """503 outbox full: *waiting* wait for the broker, at *bound* (nothing is kept)."""
        self.refused_full += 1
        done(False, StoreFullError(f"outbox full: {waiting} wait for the broker ({bound}); retry later"))

    def _committed(self, key: bytes, in_doubt: bool, done: Done, ok: bool, value: Any) -> None:
        if not ok or type(value) is core.Rejection:  # a failure, or a refusal (412: parts missing)
            done(ok, value)
            return
        if value:
            waiters = self.undone[key] = []
            if self._mode.election.leading and not in_doubt:
                self._fresh.add(key)
        else:
            got = self.undone.get(key)
            if got is None:
                done(True, False)  # a duplicate of a message already dispatched
                return
            waiters = got
        if not self.dispatched_ack:
            done(True, value)
        elif not self.link.connected:
            done(False, BrokerUnavailableError(f"broker unavailable ({self.link.last_error})"))
        else:
            waiters.append((done, value))

    # -- the outbox ----------------------------------------------------------------------------------

    def load(self) -> None:
        """The outbox entries left in the store (executor): undispatched, not fresh."""
        store = self.store
        scope = self.settings.endpoint
        after = 0
        while True:
            batch = store.read_queue(after, 4096)
            if not batch:
                break
            for _seq, framed in batch:
                self.undone[dedup_key(scope, core.decode_envelope(framed)[0])] = []
            after = batch[-1][0]

    def start(self) -> None:
        self.writer.on_commit = self.kick
        self._task = asyncio.ensure_future(self._loop())

    def kick(self, _added: int = 0) -> None:
        self._work.set()

    def connection_up(self, channel: Any, raw_channel: Any) -> None:
        """*channel*: aio-pika's publisher-confirms channel for the publishes; *raw_channel*:
        aiormq's under it."""
        topology = self._mode.topology
        self._channel = channel
        self._frames = FramePublisher(raw_channel, topology.input, topology.instance_prefix)
        self._rewind()

    def _rewind(self) -> None:
        """Take the outbox from its start again (what was taken and not finished is dispatched
        again, marked)."""
        self._cursor = 0
        self._mem_queue = collections.deque(self._mem)

    def connection_lost(self) -> None:
        self._frames = self._channel = None
        self.term_ended()

    def term_ended(self) -> None:
        """The leadership ended: nothing accepted is fresh any more (it is published marked)."""
        self._fresh.clear()

    def fail_waiters(self, exc: BaseException) -> None:
        for waiters in self.undone.values():
            items, waiters[:] = list(waiters), []
            for done, _value in items:
                done(False, exc)

    async def _loop(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            # Batches published, their confirms awaited in order: (entries, the batch's confirms, when published).
            flying: collections.deque[tuple[list, asyncio.Future, float]] = collections.deque()
            try:
                await self._dispatch(flying)
            except broker_errors as exc:
                log.warning("dispatch failed (%s): the outbox keeps the messages", exc)
                self._rewind()
                self.fail_waiters(BrokerUnavailableError(f"broker unavailable ({exc})"))
                # refused on a live connection: go on on new channels (Link.renew_channel says why)
                if await self._renew_channels(exc):
                    self.kick()
            except Exception as exc:  # a bug: keep the dispatcher alive and loud, try again soon
                log.exception("dispatcher: unexpected error; the outbox keeps the messages")
                self._rewind()
                self.fail_waiters(BrokerUnavailableError(f"dispatch failed ({exc!r})"))
                await asyncio.sleep(1.0)
                self.kick()
            finally:
                for _entries, confirms, _published in flying:   # a lost connection rejected them: seen here
                    if confirms.done() and not confirms.cancelled():
                        confirms.exception()

    async def _renew_channels(self, exc: BaseException) -> bool:
        """New confirm channels for the stream's appends and for the publishes, in place of those
        on which the broker refused one; False if the connection went meanwhile."""
        old_stream, old_pub = self._stream.channel, self._channel
        if old_stream is None or old_pub is None:
            return False
        stream_ch, pub = await asyncio.gather(self.link.renew_channel(old_stream, publisher_confirms=True),
                                              self.link.renew_channel(old_pub, publisher_confirms=True))
        if stream_ch is None or pub is None:
            return False
        if isinstance(exc, PublishReturned):
            await self._declare_again(pub, exc)
        # both taken up with no await between: never the stream on a new channel and the
        # publishes on the old one
        stream_raw, pub_raw = await stream_ch.get_underlay_channel(), await pub.get_underlay_channel()
        self._stream.connection_up(stream_ch, stream_raw)
        self.connection_up(pub, pub_raw)
        return True

    async def _declare_again(self, channel: Any, exc: BaseException) -> None:
        """A publish came back (basic.return): no queue took it, so the endpoint's queue or the
        stream is gone (deleted while this instance ran). Declared again, as at connecting; the
        messages are dispatched again, marked, and nothing was answered 200 meanwhile."""
        log.error("dispatch: the broker returned a publish (%s): the endpoint's queue or dedup stream is "
                  "missing; declaring them again", exc)
        self.returned += 1
        try:
            await self._mode.topology.declare(channel)
        except broker_errors as err:
            log.warning("declaring the endpoint's queues again failed: %s", err)

    async def _dispatch(self, flying: collections.deque) -> None:
        """Publish the outbox until it is empty, pipelined: batch N+1's intent is appended to the
        stream and it is published while the broker still confirms batch N. A batch is *done* (in
        the stream, with the next record appended) only once all of it is confirmed; its
        submitters are answered and its entries leave the outbox after that."""
        stream = self._stream
        while self.link.connected and stream.caught_up and self._frames is not None:
            out, skipped, taken = self._prepare(self._take())
            confirmed: list[tuple[int, bytes]] = []
            # the batches the broker has confirmed by now (in order); a full pipeline, or nothing
            # new to publish, waits for the oldest
            while flying and (len(flying) >= _IN_FLIGHT_BATCHES or not out or flying[0][1].done()):
                entries, confirms, published = flying.popleft()
                await confirms  # a nack or a lost connection raises here
                self._confirmed(entries)
                self.confirm_seconds.observe(time.perf_counter() - published)
                confirmed += [(seq, key) for seq, key, _framed, _marked in entries]
                if out:
                    break
            if not out and not confirmed:
                self._finish(skipped)
                if not taken:
                    return
                continue
            # One append records the confirmed batches as done and this one as intended: the
            # intent is in the stream before any of this batch is published.
            keys = [key for _seq, key, _framed, _marked in out]
            started = time.perf_counter()
            await stream.append_batch([key for _seq, key in confirmed], keys)
            self.append_seconds.observe(time.perf_counter() - started)
            self._finish(confirmed + skipped)
            if out:
                self._fresh.difference_update(keys)
                published = time.perf_counter()
                confirms, refused = await self._frames.publish([(framed, marked) for _s, _k, framed, marked in out])
                if refused:
                    out = self._poison_unencodable(out, refused)
                if confirms is None:  # nothing of it could be published
                    continue
                self.batch_messages.observe(len(out))
                flying.append((out, confirms, published))

    def _confirmed(self, entries: list) -> None:
        self.dispatched += len(entries)
        self.possible_duplicates += sum(1 for entry in entries if entry[3])

    def _poison_unencodable(self, out: list, refused: list[int]) -> list:
        """Entries the core could not encode (a header name longer than AMQP carries; refused at
        intake since, so an outbox from before): kept in the error store with the reason, their
        submitters answered 400, out of the outbox; the others go on."""
        gone = set(refused)
        bad = [entry for i, entry in enumerate(out) if i in gone]
        store = self.store
        reason = f"a header name longer than {_AMQP_FIELD_NAME_MAX} bytes cannot be published (AMQP)"
        log.error("dispatcher: %d message(s) cannot be published (%s): moved to the error store", len(bad), reason)

        self.writer.call(lambda txn: append_errors(txn, store.errors, [entry[2] for entry in bad], reason))
        for _seq, key, _framed, _marked in bad:
            for done, _value in self.undone.pop(key, ()):
                done(True, core.Rejection(400, f"Bad Request: {reason}"))
        self._finish([(seq, key) for seq, key, _framed, _marked in bad], dispatched=False)
        return [entry for i, entry in enumerate(out) if i not in gone]

    def _take(self) -> list[tuple[int, bytes, bytes]]:
        """The next outbox entries, as ``(seq, key, stored envelope)``: only those whose commit the
        loop has seen (their keys are in :attr:`undone`); the writer thread may have committed more,
        whose callbacks (which decide whether they are fresh) have not run yet."""
        prefix = self._key_prefix
        undone = self.undone
        key_of = core.envelope_key
        out = []
        for seq, framed in self.store.read_queue(self._cursor, _DISPATCH_BATCH):
            key = key_of(framed, prefix)
            if key not in undone:
                break
            self._cursor = seq
            if seq not in self._finishing:
                out.append((seq, key, framed))
        # then the entries kept in memory (ack=dispatched), as -n
        mem, waiting = self._mem, self._mem_queue
        while waiting and len(out) < _DISPATCH_BATCH:
            n = waiting.popleft()
            entry = mem.get(n)
            if entry is not None:
                out.append((-n, entry[0], entry[1]))
        return out

    def _prepare(self, batch: list[tuple[int, bytes, bytes]]) -> tuple[list, list[tuple[int, bytes]], bool]:
        """``([(seq, key, envelope, marked)], [(seq, key) to drop], anything taken)``."""
        replica = self._stream.replica
        fresh_keys = self._fresh
        out = []
        skipped = []
        for seq, key, framed in batch:
            fresh = key in fresh_keys
            if not fresh and replica.get(key) == DONE:
                skipped.append((seq, key))  # another leader (or an earlier run) dispatched it
                continue
            out.append((seq, key, framed, not fresh))
        self.skipped += len(skipped)
        return out, skipped, bool(batch)

    def _finish(self, items: list[tuple[int, bytes]], dispatched: bool = True) -> None:
        """These entries are done (*dispatched*: in the stream as done, or another leader's; else
        given up): their submitters are answered, and they leave the outbox."""
        kept: list[bytes] = []  # keys of entries kept in memory (as -n)
        seqs: list[int] = []  # the store's outbox entries
        for seq, key in items:
            if seq < 0:
                entry = self._mem.pop(-seq, None)
                if entry is not None:
                    self.mem_bytes -= len(entry[1])
                kept.append(key)
            else:
                seqs.append(seq)
        if kept and dispatched:
            # into the replica before the 200s: a retry that comes before the follower reads the
            # done record back is a duplicate here (the store's dedup record did that for an
            # entry that was committed)
            self._stream.mark_done(kept)
        for _seq, key in items:
            for done, value in self.undone.pop(key, ()):
                done(True, value)
        if not seqs:
            return
        self._finishing.update(seqs)
        store = self.store

        def delete(txn: Any) -> None:
            for seq in seqs:
                txn.delete(pack_seq(seq), db=store.queue)

        fut = self.writer.call(delete)
        fut.add_done_callback(lambda _f: self._finishing.difference_update(seqs))

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
