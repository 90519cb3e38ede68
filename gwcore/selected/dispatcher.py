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
import functools
import logging
from typing import TYPE_CHECKING, Any, Callable

from pamqp.commands import Basic

from .. import databus
from .._core import core
from ..amqp import PublishRefused, broker_errors, cancel_and_wait, to_amqp
from ..errors import BrokerUnavailableError
from ..records import dedup_key, pack_seq
from ..ingest import Done, IngestSink
from .stream import DONE, INTENT

if TYPE_CHECKING:
    from .mode import Selected

__all__ = ("Dispatcher",)

log = logging.getLogger("gwcore.selected")

_DISPATCH_BATCH = 512


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
        self._raw_pub: Any = None  # aiormq's channel under the stream's (a third of aio-pika's cost per publish)
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
        then = functools.partial(self._committed, key, known == INTENT, done)
        if envelope.databus and self._stream.when_parts_stored(functools.partial(self.writer.ingest_then,
                                                                                 envelope, then)):
            return
        self.writer.ingest_then(envelope, then)

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

    def connection_up(self, raw_channel: Any) -> None:
        self._raw_pub = raw_channel
        self._cursor = 0

    def connection_lost(self) -> None:
        self._raw_pub = None
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
        stream = self._stream
        while True:
            await self._work.wait()
            self._work.clear()
            prev: list[tuple[int, bytes]] = []  # published and confirmed; 'done' not appended yet
            try:
                while self.link.connected and stream.caught_up and self._raw_pub is not None:
                    raw = self._take()
                    out, skipped = self._prepare(raw)
                    if not prev and not out:
                        self._finish(skipped)
                        if not raw:
                            break
                        continue
                    # One append records the previous batch as done and this one as intended:
                    # the intent is in the stream before any of this batch is published.
                    keys = [item[1] for item in out]
                    await stream.append_batch([k for _s, k in prev], keys)
                    self._finish(prev + skipped)
                    prev = []
                    if out:
                        self._fresh.difference_update(keys)
                        await self._publish(out)
                        prev = [(item[0], item[1]) for item in out]
            except broker_errors as exc:
                log.warning("dispatch failed (%s): the outbox keeps the messages", exc)
                self._cursor = 0
                self.fail_waiters(BrokerUnavailableError(f"broker unavailable ({exc})"))
            except Exception as exc:  # a bug: keep the dispatcher alive and loud, try again soon
                log.exception("dispatcher: unexpected error; the outbox keeps the messages")
                self._cursor = 0
                self.fail_waiters(BrokerUnavailableError(f"dispatch failed ({exc!r})"))
                await asyncio.sleep(1.0)
                self.kick()

    def _take(self) -> list[tuple[int, bytes, tuple]]:
        """The next outbox entries, as ``(seq, key, decoded envelope)``: only those whose commit the loop has
        seen (their keys are in :attr:`undone`); the writer thread may have committed more,
        whose callbacks (which decide whether they are fresh) have not run yet."""
        scope = self.settings.endpoint
        undone = self.undone
        out = []
        for seq, framed in self.store.read_queue(self._cursor, _DISPATCH_BATCH):
            parts = core.decode_envelope(framed)
            key = dedup_key(scope, parts[0])
            if key not in undone:
                break
            self._cursor = seq
            if seq not in self._finishing:
                out.append((seq, key, parts))
        return out

    def _prepare(self, batch: list[tuple[int, bytes, tuple]]) -> tuple[list, list[tuple[int, bytes]]]:
        """``([(seq, key, properties, body, queue, marked)], [(seq, key) to drop])``."""
        route = self._mode.topology.route
        replica = self._stream.replica
        out = []
        skipped = []
        for seq, key, (msg_id, headers, body, expiry_ms, _acc) in batch:
            fresh = key in self._fresh
            if not fresh and replica.get(key) == DONE:
                skipped.append((seq, key))  # another leader (or an earlier run) dispatched it
                continue
            props, body = to_amqp(msg_id, headers, body, expiry_ms, not fresh)
            out.append((seq, key, props, body, route(headers), not fresh))
        self.skipped += len(skipped)
        return out, skipped

    async def _publish(self, out: list) -> None:
        publish = self._raw_pub.basic_publish
        results = await asyncio.gather(*(publish(body, routing_key=to, properties=props)
                                         for _s, _k, props, body, to, _m in out))
        for result in results:
            if not isinstance(result, Basic.Ack):
                raise PublishRefused(f"the broker refused a publish ({type(result).__name__})")
        self.dispatched += len(out)
        self.possible_duplicates += sum(1 for item in out if item[5])

    def _finish(self, items: list[tuple[int, bytes]]) -> None:
        seqs = [seq for seq, _key in items]
        for _seq, key in items:
            for done, value in self.undone.pop(key, ()):
                done(True, value)
        self._finishing.update(seqs)
        store = self.store

        def delete(txn: Any) -> None:
            for seq in seqs:
                txn.delete(pack_seq(seq), db=store.queue)

        fut = self.writer.call(delete)
        fut.add_done_callback(lambda _f: self._finishing.difference_update(seqs))

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
