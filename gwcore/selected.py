"""Selected-instance mode (``GWCORE_MODE=selected``): N instances on RabbitMQ, one gateway receiver.

Every instance has its own data dir and one broker connection (:class:`gwcore.amqp.Link`):

- **Election.** Leadership is owning the exclusive queue ``E.gwcore.leader``. Standbys try to
  declare it every ``GWCORE_ELECTION_INTERVAL`` (and at once when a leader announces a handover);
  RESOURCE_LOCKED means someone holds it. The broker deletes it when its owner's connection dies,
  and the owner stops answering 200 in the connection's close callback (fencing).
- **Ingest (leader).** The submit goes through the writer as in standalone mode: dedup record and
  envelope in one fsync'd transaction; the ``queue`` database is the outbox. The dispatcher takes
  committed outbox entries in batches: (1) an *intent* record with the batch's dedup keys is
  appended to the stream ``E.gwcore.dedup`` and confirmed, (2) the messages are published to the
  input queue and confirmed, (3) a *done* record is appended and confirmed, (4) the entries leave
  the outbox. ``GWCORE_ACK=dispatched`` answers 200 after (3), ``stored`` after the commit.
- **Dedup continuity.** Every instance follows the stream into a ``replica`` database of its own
  LMDB (key -> intent/done), resuming at the stored offset. A submit whose key the stream shows
  *done* is a duplicate; one that shows only *intent* was in flight when a leader died: it is
  accepted again and published with ``gwcore.PossibleDuplicate: true``. So is anything dispatched
  outside the leadership term that accepted it (entries left in an outbox by a crash, or accepted
  while the broker was unreachable). A new leader appends a marker and reads the stream up to it
  before it reports ready.
- **Databus parts.** The leader appends a *part* record (part key, blob name, size, hashes,
  expiry) for each part it takes before answering it; every instance keeps them
  (``databus_replica``), and a submit whose part is not in the local index takes the blob from
  there when its file is in the (shared) blob dir (gwcore/databus/, docs/databus.md). The
  records of a message go once the stream shows it *done*.
- **Handover** (:meth:`Selected.step_down`, on SIGTERM or ``gwcore handover``): hold new submits,
  let the outbox drain, append a *release* record and give up the leader queue, wait until another
  instance announces its leadership, then answer the held submits 503 (the load balancer retries
  them at the new leader). It announces the handover in the stream first: standbys that read that
  record hold their submits too until the election is decided, so a submit that reaches them in
  that window is not refused before there is a leader to retry it at.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import operator
import os
import socket
import struct
import time
import urllib.parse
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import aio_pika
import aiormq

from . import auth, batch, databus
from ._core import core
from pamqp.commands import Basic

from .amqp import Link, PublishRefused, Topology, broker_errors, cancel_and_wait, from_amqp, to_amqp
from .errors import BrokerUnavailableError
from .metrics import Families, counter, gauge
from .records import dedup_key, encode_error, now_ms, pack_seq, part_message_key, unpack_seq
from .store import Store, Writer

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ("Selected", "BrokerUnavailableError", "BrokerMessage", "BrokerQueue", "STANDBY")

log = logging.getLogger("gwcore.selected")

STANDBY = "Service Unavailable: standby"
_BROKER_DOWN = "Service Unavailable: broker unavailable"
_INTENT, _DONE = 1, 2
_KIND = "gwcore.kind"
_FROM = "gwcore.instance"
_URL = "gwcore.url"
_U32 = struct.Struct(">I")
_REPLICA = struct.Struct(">BQ")  # state, recorded_ms
_DISPATCH_BATCH = 512
_HOLD_LIMIT = 5.0  # longest a standby holds submits after a handover record
_HANDOVER_GRACE = 0.05  # between announcing a handover and holding submits (the standbys' read lag)


def _pack_keys(keys: list[bytes]) -> bytes:
    return b"".join(_U32.pack(len(k)) + k for k in keys)


def _unpack_keys(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = _U32.unpack_from(data, pos)
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


class BrokerMessage:
    """A message from the endpoint's input queue (or this instance's reply queue), with the
    interface of :class:`gwcore.consumer.Message`: ``await ack()``, ``release(error)``."""

    __slots__ = ("id", "headers", "body", "seq", "expiry_ms", "accepted_ms", "attempt", "_incoming",
                 "_settled", "_queue")

    def __init__(self, queue: "BrokerQueue", incoming: Any) -> None:
        self.id, self.headers, self.body, self.expiry_ms = from_amqp(incoming)
        self.seq = 0
        self.accepted_ms = 0
        # quorum queues count redeliveries in x-delivery-count
        self.attempt = int((incoming.headers or {}).get("x-delivery-count", 0) or 0) + 1
        self._incoming = incoming
        self._settled = False
        self._queue = queue

    @property
    def delivery_count(self) -> int:
        return self.attempt

    @property
    def redelivered(self) -> bool:
        return self.attempt > 1 or bool(self._incoming.redelivered)

    @property
    def possible_duplicate(self) -> bool:
        """True when gwcore dispatched this message again after a crash (it may be there twice)."""
        return self.headers.get("gwcore.PossibleDuplicate") == "true"

    @property
    def databus(self) -> dict[str, databus.Blob]:
        """The claim-check properties, as :attr:`gwcore.consumer.Message.databus`: the blobs are
        files in this instance's blob dir, which must be the one the leader wrote them to
        (``GWCORE_BLOB_DIR`` shared by the instances) for a consumer on another instance."""
        return databus.message_blobs(self._queue._selected.store.blob_dir, self.headers)

    async def ack(self) -> None:
        if not self._settled:
            self._settled = True
            await self._queue._settle(self, None)

    def release(self, error: BaseException | None = None) -> None:
        if not self._settled:
            self._settled = True
            asyncio.ensure_future(self._queue._settle(self, error or Exception("released")))

    def __repr__(self) -> str:
        return f"<BrokerMessage id={self.id!r} attempt={self.attempt}>"


class BrokerQueue:
    """Deliveries from the broker as an async iterator (what ``Gateway.messages()`` returns and
    ``GWCORE_HANDLER`` runs on in selected mode)."""

    def __init__(self, selected: "Selected", max_attempts: int) -> None:
        self._selected = selected
        self._items: asyncio.Queue[BrokerMessage | None] = asyncio.Queue()
        self.max_attempts = max_attempts
        self.intercept: Callable[[Any], bool] | None = None
        self.delivered = self.acked = self.failed = self.expired = self.poisoned = 0

    async def deliver(self, incoming: Any) -> None:
        msg = BrokerMessage(self, incoming)
        if msg.expiry_ms and msg.expiry_ms < now_ms():
            self.expired += 1
            await self._settle(msg, None, count=False)
            return
        if self.intercept is not None and self.intercept(msg):
            await self._settle(msg, None)
            return
        self._items.put_nowait(msg)

    def close(self) -> None:
        self._items.put_nowait(None)

    def metrics(self) -> Families:
        return [
            counter("gwcore_broker_consumer_delivered_total", "Deliveries from the broker to handlers.", self.delivered),
            counter("gwcore_broker_consumer_acked_total", "Deliveries acknowledged to the broker.", self.acked),
        ]

    def __aiter__(self) -> AsyncIterator[BrokerMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[BrokerMessage]:
        while True:
            msg = await self._items.get()
            if msg is None:
                return
            self.delivered += 1
            yield msg

    async def _settle(self, msg: BrokerMessage, error: BaseException | None, count: bool = True) -> None:
        incoming = msg._incoming
        try:
            if error is None:
                await incoming.ack()
                self.acked += count
                return
            self.failed += 1
            if msg.attempt < self.max_attempts:
                log.warning("message %s: attempt %d failed (%r); the broker redelivers it", msg.id, msg.attempt, error)
                await incoming.nack(requeue=True)
                return
            self.poisoned += 1
            reason = f"handler failed {msg.attempt} times: {error!r}"
            log.error("message %s moved to the error store: %s", msg.id, reason)
            await self._selected.poison(msg, reason)
            await incoming.ack()
        except broker_errors as exc:
            # the channel went with its connection: the broker redelivers the message
            log.info("message %s: settling failed (%s); the broker redelivers it", msg.id, exc)


class Selected:
    """The selected-instance mode of one gateway (created by :class:`gwcore.gateway.Gateway`)."""

    def __init__(self, gateway: "Gateway") -> None:
        s = self.settings = gateway.settings
        self.gateway = gateway
        if gateway.store is None or gateway.writer is None:
            raise RuntimeError("selected mode starts after the store")
        self.store: Store = gateway.store
        self.writer: Writer = gateway.writer
        self.instance = s.instance or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.topology = Topology(s.endpoint, self.instance, s.dedup_ttl)
        self.reply_queue = self.topology.instance
        self.dispatched_ack = s.ack == "dispatched"
        self.link = Link(s.amqp_urls, f"gwcore {s.endpoint} {self.instance}", self._up, self._down)
        self.messages = BrokerQueue(self, s.handler_max_attempts)
        self.consume = False  # set by the gateway when a handler (or messages()) takes the input queue
        # leadership
        self.leading = False
        self.term = 0
        self.fenced_accepting = False  # ack=stored: a leader cut off from the broker keeps accepting
        self.leader_seen = ""  # the instance that announced leadership last (from the stream)
        self.leader_url = ""  # and where it receives (the handover forwards held submits there)
        self._forwards: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._ready_link = asyncio.Event()  # connected, topology declared, consumers up
        self._conn_tasks: list[asyncio.Task] = []
        self._leader_channel: Any = None
        self._pub: Any = None
        self._raw_pub: Any = None
        # dedup records from the stream: key -> _INTENT / _DONE
        self.replica: dict[bytes, int] = {}
        self._ages: collections.deque[tuple[int, list[bytes]]] = collections.deque()  # (first seen ms, keys)
        self.offset = -1
        self._replica_pending: list[tuple[bytes, int]] = []
        self._flushing = False
        self._markers: dict[bytes, asyncio.Future] = {}
        self.caught_up = False
        # databus part records from the stream (gwcore/databus/replica.py): (part key, record) to store,
        # the messages that have some, and those dispatched since (their records go)
        self._parts_pending: list[tuple[bytes, bytes]] = []
        self._part_messages: set[bytes] = set()
        self._parts_done: list[bytes] = []
        # Other instances' part records read, and how many of those are in the store: a databus
        # submit waits until they are equal (its parts are looked up in the writer transaction).
        self._parts_read = 0
        self._parts_stored = 0
        self._parts_waiting: list[tuple[Any, Callable[[bool, Any], None]]] = []
        # outbox
        self.undone: dict[bytes, list[tuple[Callable[[bool, Any], None], Any]]] = {}
        self._fresh: set[bytes] = set()  # accepted in this leadership term, not attempted yet
        self._finishing: set[int] = set()
        self._cursor = 0
        self._work = asyncio.Event()
        self._dispatcher: asyncio.Task | None = None
        # holding submits (handover)
        self.holding = False
        self._held: list[tuple[Any, Any, Any]] = []
        self._hold_timer: asyncio.TimerHandle | None = None
        # counters
        self.dispatched = 0
        self.possible_duplicates = 0
        self.skipped = 0
        self.forwarded = 0
        self.elections_won = 0
        self.elections_lost = 0  # tries of a standby that found the leader queue held
        self.fenced = 0
        self.parts_published = 0  # part records this instance appended as the leader
        self.parts_followed = 0  # part records read from the stream (its own included)
        self.parts_unreplicated = 0  # parts accepted with ack=stored while the stream was out of reach
        self._stopping = False
        self._retiring = False

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        expired = await loop.run_in_executor(None, self._load)
        if expired:
            store = self.store

            def drop(txn: Any) -> None:
                for key in expired:
                    txn.delete(key, db=store.replica)

            await self.writer.call(drop)
        self.writer.on_commit = self._kick
        self.update_listeners()
        self._dispatcher = asyncio.ensure_future(self._dispatch_loop())
        self.link.start()
        log.info("selected mode: instance %s, broker %s, ack=%s; %d dedup records replicated (stream offset %d), "
                 "%d messages left in the outbox", self.instance, self.link.describe(),
                 self.settings.ack, len(self.replica), self.offset, len(self.undone))

    def _load(self) -> list[bytes]:
        """Replica and outbox from the store (executor); returns the expired replica keys."""
        store = self.store
        cutoff = now_ms() - int(self.settings.dedup_ttl * 1000)
        expired = []
        live: list[tuple[int, bytes]] = []
        for key, value in store.iter_db(store.replica):
            state, recorded = _REPLICA.unpack(value)
            if recorded < cutoff:
                expired.append(key)
            else:
                key = bytes(key)
                self.replica[key] = state
                live.append((recorded, key))
        live.sort()
        for recorded, group in itertools.groupby(live, key=operator.itemgetter(0)):
            self._ages.append((recorded, [k for _r, k in group]))
        if store.databus_replica is not None:
            for key, _value in store.iter_db(store.databus_replica):
                self._part_messages.add(part_message_key(key))
        raw = store.get(store.meta, b"stream_offset")
        self.offset = struct.unpack(">q", raw)[0] if raw else -1
        scope = self.settings.endpoint
        after = 0
        while True:
            batch = store.read_queue(after, 4096)
            if not batch:
                break
            for _seq, framed in batch:
                self.undone[dedup_key(scope, core.decode_envelope(framed)[0])] = []
            after = batch[-1][0]
        return expired

    async def stop(self) -> None:
        self._stopping = True
        self._release_held()
        await self.link.stop()
        await cancel_and_wait(self._dispatcher)
        self.messages.close()
        await self._flush_replica()
        self._release_part_waiters()

    # -- states seen by the HTTP front end -----------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return (self.leading or self.fenced_accepting) and not self.holding and not self._stopping

    @property
    def role(self) -> str:
        if self.leading:
            return "leader"
        return "leader (broker unreachable)" if self.fenced_accepting else "standby"

    def update_listeners(self) -> None:
        """Tell the gateway whether its listeners take traffic now (and why not)."""
        accepting = self.accepting
        self.gateway.set_accepting(accepting, STANDBY if self.link.connected else _BROKER_DOWN)
        if accepting and self._held:
            self._release_held()

    def hold(self, proto: Any, slot: Any, result: Any) -> bool:
        """http.py's hook for a submit this instance does not accept now: held (True) while a
        handover is deciding the next leader, then routed again here or forwarded to the new
        leader; a leader that handed over forwards what still reaches it while it stops."""
        if self._stopping:
            return False
        if self.holding:
            self._held.append((proto, slot, result))
            return True
        if (self._retiring and self.leader_url and self.leader_seen != self.instance
                and isinstance(result, (core.Envelope, core.Batch))):
            self._forward(proto, slot, result)
            return True
        return False

    def _start_holding(self, limit: float) -> None:
        self.holding = True
        self.update_listeners()
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        self._hold_timer = asyncio.get_running_loop().call_later(limit, self._release_held)

    def _release_held(self) -> None:
        if self.holding or self._held:
            log.info("holding ends: %d submits held (%s)", len(self._held), self.role)
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self.holding = False
        held, self._held = self._held, []
        self.update_listeners()
        forward = not self.accepting and bool(self.leader_url) and self.leader_seen != self.instance
        for proto, slot, result in held:
            if forward and isinstance(result, (core.Envelope, core.Batch)):
                self._forward(proto, slot, result)
            else:
                proto._route(slot, result)

    def _forward(self, proto: Any, slot: Any, result: Any) -> None:
        """Send a held submit to the new leader over HTTP and answer with its answer: the load
        balancer may have tried the new leader before it led, and has no instance left to try."""
        verifier = proto.state.verifier
        is_batch = isinstance(result, core.Batch)
        if verifier is not None:
            # checked here, since the leader gets it signed again by this instance (_post)
            refused = batch.check_signature(verifier, result) if is_batch else verifier.check(result)
            if refused is not None:
                proto._answer_check(slot, refused, result.callback)
                return
        self.forwarded += 1
        task = asyncio.ensure_future(self._post(result, verifier))
        self._forwards.add(task)

        def answer(done: asyncio.Future) -> None:
            self._forwards.discard(task)
            status, reason, body = ((503, STANDBY, None) if done.cancelled() or done.exception()
                                    else done.result())
            if is_batch and status == 200 and body is not None:
                proto._answer(slot, status, reason, body=body)  # the leader's outcome per message
            else:
                proto._answer(slot, status, reason, callback=result.callback)

        task.add_done_callback(answer)

    async def _post(self, envelope: Any, verifier: Any = None) -> tuple[int, str, bytes | None]:
        parts = urllib.parse.urlsplit(self.leader_url)
        if isinstance(envelope, core.Batch):
            # a batch goes on as it came (its body is what its signature's digest covers)
            body, block = envelope.body, f"{batch.HEADER}: {envelope.version}\r\n".encode("latin-1")
        else:
            _id, body, _expiry, block = core.encode_submit(envelope.framed)
        target = (envelope.target or parts.path or "/").encode()
        if envelope.auth_signature is not None and verifier is not None:
            # Verified here (_forward). The leader gets the message framed again from its stored
            # form, which does not keep the headers as they were sent (a v2 signature covers
            # those), so this instance signs it anew with the key that signed it: it has the
            # receive keys the leader has.
            key_id = envelope.auth_signature.strip().split(".")[1]
            block += auth.signature_lines(verifier.secrets[key_id], key_id, "POST", target.decode("ascii"), block,
                                          auth.body_digest(body))
        request = b"POST %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\nConnection: close\r\n\r\n" % (
            target, parts.netloc.encode(), block, len(body)) + body
        reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port), 2.0)
        try:
            writer.write(request)
            line = await asyncio.wait_for(reader.readline(), 10.0)
            _version, status, reason = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
            length = 0
            while True:
                header = await asyncio.wait_for(reader.readline(), 10.0)
                if header in (b"\r\n", b""):
                    break
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            answer = await asyncio.wait_for(reader.readexactly(length), 10.0) if length else b""
            return int(status), reason, answer
        finally:
            writer.close()

    # -- the ingest hook (HTTPState.writer in selected mode) -----------------------------------------

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
        if self._pub is not None and self.link.connected:
            try:
                await self._append("part", job.stream_record())
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

    def ingest_then(self, envelope: Any, done: Callable[[bool, Any], None]) -> None:
        key = envelope.key
        known = self.replica.get(key)
        if known == _DONE:
            done(True, False)  # the stream confirms it was dispatched: a duplicate
            return
        if self.dispatched_ack and not self.link.connected:
            done(False, BrokerUnavailableError(f"broker unavailable ({self.link.last_error})"))
            return
        then = functools.partial(self._committed, key, known == _INTENT, done)
        if envelope.databus and self._parts_stored < self._parts_read:
            # another instance's parts read from the stream and not yet in the store: this
            # submit may need them (a failover between its parts and it)
            self._parts_waiting.append((envelope, then))
            return
        self.writer.ingest_then(envelope, then)

    def _release_part_waiters(self) -> None:
        waiting, self._parts_waiting = self._parts_waiting, []
        for envelope, then in waiting:
            self.writer.ingest_then(envelope, then)

    def _committed(self, key: bytes, in_doubt: bool, done: Callable[[bool, Any], None], ok: bool, value: Any) -> None:
        if not ok or type(value) is core.Rejection:  # a failure, or a refusal (412: parts missing)
            done(ok, value)
            return
        if value:
            waiters = self.undone[key] = []
            if self.leading and not in_doubt:
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

    async def wait_connected(self, timeout: float) -> None:
        """Until the broker link is up and this instance's reply queue is declared.

        :raises BrokerUnavailableError: not within *timeout* seconds.
        """
        try:
            await asyncio.wait_for(self._ready_link.wait(), timeout)
        except asyncio.TimeoutError:
            raise BrokerUnavailableError(f"broker unavailable ({self.link.last_error})") from None

    def _kick(self, _added: int = 0) -> None:
        self._work.set()

    # -- the connection ------------------------------------------------------------------------------

    async def _up(self, conn: Any) -> None:
        pub = await conn.channel(publisher_confirms=True)
        await self.topology.declare(pub)
        self._raw_pub = await pub.get_underlay_channel()  # aiormq's: a third of aio-pika's cost per publish
        self._pub = pub
        self._cursor = 0
        follow = await conn.channel()
        await follow.set_qos(prefetch_count=2000)
        self._conn_tasks = [asyncio.ensure_future(self._follow(follow)),
                            asyncio.ensure_future(self._elect(conn))]
        if self.consume:
            await self._consume(conn)
        rq = await self.topology.declare_instance(conn)
        await rq.consume(self.messages.deliver)
        self._ready_link.set()
        self.update_listeners()

    async def _consume(self, conn: Any) -> None:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=self.settings.amqp_prefetch)
        inq = await ch.declare_queue(self.topology.input, durable=True, arguments=self.topology.input_args())
        await inq.consume(self.messages.deliver)

    def start_consuming(self) -> None:
        """Take deliveries from the endpoint's queue from now on (a handler, or ``messages()``)."""
        if self.consume:
            return
        self.consume = True
        if self._ready_link.is_set() and self.link.connection is not None:
            self._conn_tasks.append(asyncio.ensure_future(self._consume(self.link.connection)))

    def _down(self, exc: BaseException | None) -> None:
        was_leading = self.leading
        self._ready_link.clear()
        self.leading = False
        self.caught_up = False
        self._fresh.clear()
        self._pub = self._raw_pub = self._leader_channel = None
        for task in self._conn_tasks:
            task.cancel()
        self._conn_tasks = []
        for fut in self._markers.values():
            if not fut.done():
                fut.set_exception(BrokerUnavailableError("connection lost"))
        self._markers.clear()
        if was_leading:
            self.fenced += 1
            if not self.dispatched_ack and not self._stopping:
                self.fenced_accepting = True
                log.warning("role: leader -> cut off from the broker: accepting into the outbox (GWCORE_ACK=stored); "
                            "these messages are dispatched, marked gwcore.PossibleDuplicate, once it is back")
            else:
                log.warning("role: leader -> standby: the broker connection is gone (fenced)")
        self._fail_waiters(BrokerUnavailableError(f"broker unavailable ({self.link.last_error})"))
        self.update_listeners()

    def _fail_waiters(self, exc: BaseException) -> None:
        for waiters in self.undone.values():
            items, waiters[:] = list(waiters), []
            for done, _value in items:
                done(False, exc)

    # -- the stream: appending and following ---------------------------------------------------------

    def _own_url(self) -> str:
        """Where the other instances reach this one's receive channel (forwarded submits)."""
        ch = self.settings.receive_channels[0]
        port = self.gateway.addresses[0][1] if self.gateway.addresses else ch.port
        host = socket.gethostname() if ch.host in ("0.0.0.0", "::") else ch.host
        return f"http://{host}:{port}{ch.path}"

    async def _append(self, kind: str, body: bytes, url: str = "") -> None:
        pub = self._pub
        if pub is None:
            raise BrokerUnavailableError("not connected")
        headers: dict[str, Any] = {_KIND: kind, _FROM: self.instance}
        if url:
            headers[_URL] = url
        await pub.default_exchange.publish(
            aio_pika.Message(body, headers=headers,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=self.topology.dedup)

    async def _sync(self, kind: str, url: str = "") -> None:
        """Append a marker and wait until the follower reads it back: everything appended before
        it (by any instance) is in :attr:`replica` then."""
        token = uuid.uuid4().bytes
        fut = asyncio.get_running_loop().create_future()
        self._markers[token] = fut
        try:
            await self._append(kind, token, url)
            await fut
        finally:
            self._markers.pop(token, None)

    async def _follow(self, channel: Any) -> None:
        try:
            queue = await channel.declare_queue(self.topology.dedup, durable=True,
                                                arguments=self.topology.dedup_args())
            # A stream delivers from the start of the chunk holding the offset asked for: the
            # records before it come again and _record skips them.
            start: Any = self.offset + 1 if self.offset >= 0 else "first"
            self._conn_tasks.append(asyncio.ensure_future(self._catch_up()))
            async with queue.iterator(arguments={"x-stream-offset": start}) as records:
                async for record in records:
                    self._record(record)
                    await record.ack()
        except broker_errors as exc:  # the connection went: _down has run, the next one follows again
            log.debug("stream follower ended: %s", exc)
        # (cancelled, it does not get here) On a connection still up, the node would not serve the stream
        # (a cluster node whose replica is not running): follow again on a new connection (Link.drop).
        self.link.drop("the stream follower ended")

    async def _catch_up(self) -> None:
        try:
            await self._sync("marker")
        except broker_errors as exc:
            self.link.drop(f"catching up with the stream failed ({exc})")  # if the connection is still up
            return
        except asyncio.CancelledError:
            return
        self.caught_up = True
        self._kick()

    def _record(self, record: Any) -> None:
        headers = record.headers or {}
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
            body = record.body
            keys = _unpack_keys(body[4:])
            n_done = _U32.unpack_from(body)[0]
            self._apply(keys[:n_done], _DONE)
            self._apply(keys[n_done:], _INTENT)
        elif kind in ("intent", "done"):
            self._apply(_unpack_keys(record.body), _INTENT if kind == "intent" else _DONE)
        elif kind == "part":
            try:
                key, value = databus.decode_part_record(record.body)
            except ValueError as exc:
                log.warning("stream offset %s: a databus part record gwcore cannot read (%s)", offset, exc)
            else:
                self.parts_followed += 1
                self._parts_pending.append((key, value))
                self._part_messages.add(part_message_key(key))
                if sender != self.instance:
                    self._parts_read += 1
        elif kind in ("marker", "leader"):
            fut = self._markers.get(record.body)
            if fut is not None and not fut.done():
                fut.set_result(None)
            if kind == "leader":
                self.leader_seen = sender or ""
                url = headers.get(_URL)
                self.leader_url = url.decode() if isinstance(url, bytes) else (url or "")
                if sender != self.instance and self.holding and not self.leading:
                    self._release_held()
        elif kind == "handover" and sender != self.instance and not self.leading and not self._retiring:
            log.info("handover announced by %s: holding submits until the election is decided", sender)
            self._start_holding(_HOLD_LIMIT)
        elif kind == "release" and sender != self.instance:
            self._wake.set()  # try for the leadership now rather than at the next interval
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush_replica()))

    def _apply(self, keys: list[bytes], state: int) -> None:
        replica = self.replica
        pending = self._replica_pending
        first = []
        if state == _DONE and self._part_messages:
            # dispatched: the parts of these messages are needed by no later submit
            for key in keys:
                if key in self._part_messages:
                    self._part_messages.discard(key)
                    self._parts_done.append(key)
        for key in keys:
            known = replica.get(key)
            if known != _DONE:
                if known is None:
                    first.append(key)
                replica[key] = state
                pending.append((key, state))
        if first:
            self._ages.append((now_ms(), first))

    def _expire_replica(self) -> list[bytes]:
        """Forget the records older than GWCORE_DEDUP_TTL (the stream drops them too)."""
        cutoff = now_ms() - int(self.settings.dedup_ttl * 1000)
        ages = self._ages
        gone = []
        while ages and ages[0][0] < cutoff:
            for key in ages.popleft()[1]:
                if self.replica.pop(key, None) is not None:
                    gone.append(key)
        return gone

    async def _flush_replica(self) -> None:
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
                gone = self._expire_replica()

                def write(txn: Any) -> None:
                    for key, state in items:
                        txn.put(key, _REPLICA.pack(state, stamp), db=store.replica)
                    for key in gone:
                        txn.delete(key, db=store.replica)
                    if parts:
                        databus.replicate_parts(txn, store, parts, stamp)
                    if done:
                        databus.forget_parts(txn, store, done)
                    txn.put(b"stream_offset", struct.pack(">q", offset), db=store.meta)

                await self.writer.call(write)
                self._parts_stored = parts_read
                if self._parts_waiting:
                    self._release_part_waiters()
                if not (self._replica_pending or self._parts_pending or self._parts_done):
                    return
        except Exception as exc:  # the store is closing: the stream has it all, it is read again
            log.debug("replica flush failed: %s", exc)
            self._parts_stored = self._parts_read  # a waiting submit gets the writer's answer
            self._release_part_waiters()
        finally:
            self._flushing = False

    # -- election ------------------------------------------------------------------------------------

    async def _elect(self, conn: Any) -> None:
        try:
            await self._try_elect(conn)
        except broker_errors as exc:
            log.info("election: the connection went (%s)", exc)
            self.link.drop(f"the election failed ({exc})")  # a channel error: elect again on a new connection

    async def _try_elect(self, conn: Any) -> None:
        interval = self.settings.election_interval
        while not self._retiring:
            ch = await conn.channel()
            try:
                await ch.declare_queue(self.topology.leader, exclusive=True, durable=False)
            except aiormq.exceptions.ChannelLockedResource:
                self.elections_lost += 1
                if self.fenced_accepting:
                    # another instance leads now: what this one took while cut off is dispatched
                    # (marked), and it stops taking more
                    self.fenced_accepting = False
                    log.warning("role: standby: another instance leads since the broker connection was lost")
                    self.update_listeners()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), interval)
                except asyncio.TimeoutError:
                    pass
                continue
            self._leader_channel = ch
            break
        else:
            return
        won = time.monotonic()
        await self._sync("leader", self._own_url())  # every record of earlier leaders is in the replica now
        if self._retiring:
            await ch.queue_delete(self.topology.leader)
            return
        self.term += 1
        self.elections_won += 1
        self.leading = True
        self.fenced_accepting = False
        if self.holding:
            self._release_held()  # the submits held for the handover are ours now
        self.update_listeners()
        self._kick()
        log.info("role: leader (term %d): the stream read to its end in %.0f ms", self.term,
                 (time.monotonic() - won) * 1000)

    async def step_down(self, timeout: float) -> None:
        """Planned handover: drain, flush, pass the leadership (see the module docstring)."""
        self._retiring = True  # a stopping instance takes no leadership any more
        if not self.leading:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            # The standbys hold their submits from this record on (a submit the load balancer
            # tries at a standby first then waits there for the election instead of running out
            # of instances to try); give them a moment to read it before this one holds too.
            await self._append("handover", b"")
            await asyncio.wait_for(self._sync("marker"), max(0.1, deadline - loop.time()))
            await asyncio.sleep(_HANDOVER_GRACE)
        except broker_errors as exc:  # asyncio.TimeoutError among them
            log.warning("handover: announcing it failed (%s)", exc)
        self._start_holding(timeout)
        log.info("handover: holding new submits, draining %d outbox entries", len(self.undone))
        # drained = nothing waiting for the writer (a submit taken just before the hold) and
        # nothing accepted that the broker has not confirmed
        while (self.writer.pending or self.undone) and loop.time() < deadline and self.link.connected:
            await asyncio.sleep(0.002)
        if self.writer.pending or self.undone:
            log.warning("handover: %d messages still in the outbox; they are dispatched when this instance "
                        "runs again", len(self.undone))
        if not self.leading:
            self._release_held()
            return
        self.leading = False
        self._fresh.clear()
        try:
            await self._append("release", b"")
            await self._leader_channel.queue_delete(self.topology.leader)
            log.info("handover: leadership released")
            self.leader_seen = self.instance
            # Submits held meanwhile are answered 503 once another instance leads (the load
            # balancer then finds it); with none held there is nobody to wait for.
            until = loop.time() + min(_HOLD_LIMIT, max(0.1, deadline - loop.time()))
            while (self._held and self.leader_seen == self.instance and loop.time() < until
                   and self.link.connected):
                await asyncio.sleep(0.005)
            if self.leader_seen != self.instance:
                log.info("handover: %s is the leader now", self.leader_seen)
        except broker_errors as exc:
            log.warning("handover: releasing the leadership failed (%s); it ends with this connection", exc)
        self._release_held()

    # -- the dispatcher ------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            prev: list[tuple[int, bytes]] = []  # published and confirmed; 'done' not appended yet
            try:
                while self.link.connected and self.caught_up and self._pub is not None:
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
                    await self._append("batch", _U32.pack(len(prev)) + _pack_keys([k for _s, k in prev])
                                       + _pack_keys(keys))
                    self._finish(prev + skipped)
                    prev = []
                    if out:
                        self._fresh.difference_update(keys)
                        await self._publish(out)
                        prev = [(item[0], item[1]) for item in out]
            except broker_errors as exc:
                log.warning("dispatch failed (%s): the outbox keeps the messages", exc)
                self._cursor = 0
                self._fail_waiters(BrokerUnavailableError(f"broker unavailable ({exc})"))
                # refused on a live connection: go on on a new channel (Link.renew_channel says why)
                pub = await self.link.renew_channel(self._pub, publisher_confirms=True) if self._pub else None
                if pub is not None:
                    self._pub, self._raw_pub = pub, await pub.get_underlay_channel()
                    self._kick()
            except Exception as exc:  # a bug: keep the dispatcher alive and loud, try again soon
                log.exception("dispatcher: unexpected error; the outbox keeps the messages")
                self._cursor = 0
                self._fail_waiters(BrokerUnavailableError(f"dispatch failed ({exc!r})"))
                await asyncio.sleep(1.0)
                self._kick()

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
        route = self.topology.route
        out = []
        skipped = []
        for seq, key, (msg_id, headers, body, expiry_ms, _acc) in batch:
            fresh = key in self._fresh
            if not fresh and self.replica.get(key) == _DONE:
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

    async def poison(self, msg: BrokerMessage, reason: str) -> None:
        """Keep a message whose handler kept failing in this instance's error store."""
        framed = core.encode_envelope(msg.id, msg.headers, msg.body, msg.expiry_ms, now_ms())
        store = self.store

        def put(txn: Any) -> None:
            cur = txn.cursor(db=store.errors)
            seq = unpack_seq(cur.key()) + 1 if cur.last() else 1
            txn.put(pack_seq(seq), encode_error(framed, reason, now_ms()), db=store.errors)

        await self.writer.call(put)

    # -- metrics -------------------------------------------------------------------------------------

    def metrics(self) -> Families:
        return [
            gauge("gwcore_selected_leader", "1 while this instance is the elected gateway receiver.", int(self.leading)),
            gauge("gwcore_selected_term", "Leadership terms this instance won.", self.elections_won),
            counter("gwcore_selected_fenced_total", "Times the leadership ended with the broker connection.",
                    self.fenced),
            gauge("gwcore_broker_connected", "1 while the broker connection is up.", int(self.link.connected)),
            counter("gwcore_broker_connects_total", "Broker connections opened.", self.link.connects),
            counter("gwcore_dispatched_total", "Messages published to the broker and confirmed.", self.dispatched),
            counter("gwcore_possible_duplicates_total",
                    "Messages dispatched with gwcore.PossibleDuplicate: true (in flight at a crash or outage).",
                    self.possible_duplicates),
            counter("gwcore_handover_forwarded_total", "Submits held during a handover and forwarded to the new leader.",
                    self.forwarded),
            counter("gwcore_dispatch_skipped_total", "Outbox entries another leader had dispatched already.",
                    self.skipped),
            gauge("gwcore_outbox_undispatched", "Accepted messages not yet confirmed by the broker.", len(self.undone)),
            gauge("gwcore_dedup_replica_records", "Dedup records followed from the stream.", len(self.replica)),
            counter("gwcore_databus_parts_published_total",
                    "Databus parts this instance took as the leader and appended to the stream.", self.parts_published),
            counter("gwcore_databus_parts_followed_total", "Databus part records read from the stream.",
                    self.parts_followed),
            counter("gwcore_databus_parts_unreplicated_total",
                    "Parts accepted (GWCORE_ACK=stored) while the stream was out of reach: kept on this instance only.",
                    self.parts_unreplicated),
            gauge("gwcore_dedup_stream_offset", "Last stream offset read.", self.offset),
        ]

