"""The scheduling of distributor mode: which worker session gets which queued message.

A :class:`Distributor` hands each message of the local queue to a worker session with a free
slot, the least recently freed slot first (the NServiceBus distributor's ready model), and takes
the worker's answers: an ack deletes the message (through the writer, durably) and frees its slot;
a nack goes through the local queue's retry and poison logic (gwcore/consumer.py). A session that
is not heard from within its lease lapses: what it took and did not acknowledge goes back to the
queue, marked as a redelivery, and so does what was handed out before a restart (the handed-out
mark, recorded durably ahead of need). The calls that reach it over HTTP are
:class:`gwcore.distributor.protocol.WorkerProtocol`'s.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import secrets
import time
from typing import Any, Callable

from ..consumer import LocalQueue, Message
from ..errors import UnknownSessionError, WorkerHandlerError
from ..metrics import Families, counter, gauge
from ..records import pack_seq, unpack_seq
from ..store import Store, Writer

__all__ = ("Distributor",)

log = logging.getLogger("gwcore.distributor")

_MARK_KEY = b"distributor_handed"  # meta: the highest queue seq ever handed to a worker
#: Departed workers whose metric series are kept by name; older ones are summed into one series.
_DEPARTED_SERIES = 64
_DEPARTED = "(departed)"


class _Refusal(Exception):
    """A worker call answered with *status* and *reason* (a conflict, a limit, a foreign session)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Session:
    __slots__ = ("id", "name", "key", "capacity", "free", "inflight", "expires", "draining", "waiter", "outbox",
                 "alive", "flush_due", "max_in_flight")

    def __init__(self, name: str, capacity: int, expires: float, key: str | None, free: range) -> None:
        self.id = secrets.token_hex(12)
        self.name = name
        self.key = key  # the worker key that enlisted it (None: an unsigned worker listener)
        self.capacity = capacity
        # Tickets of its free slots, oldest freed first (a ticket is a distributor-wide count).
        self.free: collections.deque[int] = collections.deque(free)
        self.inflight: dict[int, Message] = {}   # seq -> message taken and not yet answered
        self.expires = expires
        self.draining = False
        self.waiter: asyncio.Future[list[tuple[Message, int]]] | None = None   # a take waiting
        self.outbox: list[tuple[Message, int]] = []   # assigned, not yet sent: (message, delivery count)
        self.alive: Callable[[], bool] | None = None  # is the waiting take's connection open?
        self.flush_due = False
        self.max_in_flight = 0


class _WorkerStats:
    __slots__ = ("capacity", "in_flight", "processed", "failed", "redelivered")

    def __init__(self) -> None:
        self.capacity = self.in_flight = self.processed = self.failed = self.redelivered = 0


class Distributor:
    """Hands the local queue's messages to enlisted worker sessions.

    :param queue: the gateway's local queue (retries and the error store come from it).
    :param lease: seconds a session lives without a call from its worker (``GWCORE_WORKER_LEASE``).
    :param max_capacity: the most slots one session may enlist (``GWCORE_WORKER_MAX_CAPACITY``).
    :param max_sessions: the most sessions at once (``GWCORE_WORKER_MAX_SESSIONS``).
    """

    def __init__(self, queue: LocalQueue, store: Store, writer: Writer, *, lease: float,
                 max_capacity: int = 1000, max_sessions: int = 256) -> None:
        self.queue = queue
        self.store = store
        self.writer = writer
        self.lease = lease
        self.max_capacity = max_capacity
        self.max_sessions = max_sessions
        #: Longest a take waits for work: well inside the lease, so a waiting worker never lapses.
        self.max_wait = max(0.05, min(20.0, lease / 2))
        self._sessions: dict[str, _Session] = {}
        self._by_name: dict[str, _Session] = {}
        # Sessions waiting for work with a free slot, by their least recently freed slot: heap
        # entries (ticket, n, session), checked when they surface (a stale one is dropped), so a
        # pick costs O(log sessions) whatever the capacities.
        self._ready: list[tuple[int, int, _Session]] = []
        self._ticket = 0  # the last slot ticket handed out
        self._entries = itertools.count()
        self._slot_ready = asyncio.Event()
        self._deliveries: dict[int, int] = {}   # seq -> deliveries so far
        raw = store.get(store.meta, _MARK_KEY)
        # Queued messages at or below this were possibly handed out by an earlier process.
        self._restart_mark = unpack_seq(raw) if raw else 0
        self._handed_mark = self._restart_mark  # recorded durably: nothing above it was handed out
        self._top_handed = 0                    # the highest seq handed out by this process
        self._marking: asyncio.Future[None] | None = None  # a mark written ahead, in the background
        self._stats: dict[str, _WorkerStats] = {}
        self._departed: collections.OrderedDict[str, None] = collections.OrderedDict()  # names, oldest first
        self._folded = _WorkerStats()  # the counters of departed workers no longer listed by name
        self.refused = 0  # worker calls answered 401 (counted by the protocol, shown with the metrics)
        self._closed = False
        self._task: asyncio.Task | None = None
        self._reaper: asyncio.TimerHandle | None = None
        self.redelivered = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` began: nothing more is handed out."""
        return self._closed

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._dispatch())
        self._reap_every = min(1.0, self.lease / 4)
        self._reaper = asyncio.get_running_loop().call_later(self._reap_every, self._reap)

    async def close(self) -> None:
        """Stop handing out work; every waiting take is answered (empty, ``stopping``). Messages
        workers hold stay queued and are redelivered (marked) after the next start."""
        if self._closed:
            return
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        for session in self._sessions.values():
            self._flush(session)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._marking is not None:
            await asyncio.gather(self._marking, return_exceptions=True)

    # -- dispatching -------------------------------------------------------------------------------

    def _offer(self, s: _Session) -> None:
        """*s* may take work now: list it by its oldest free slot."""
        if s.free and s.waiter is not None and not s.draining:
            ready = self._ready
            if len(ready) > 4 * len(self._sessions) + 64:
                # stale entries pile up while no work comes: keep the heap in proportion
                ready[:] = [e for e in ready if self._valid(e)]
                heapq.heapify(ready)
            heapq.heappush(ready, (s.free[0], next(self._entries), s))

    def _valid(self, entry: tuple[int, int, _Session]) -> bool:
        ticket, _n, s = entry
        return (s.waiter is not None and not s.draining and bool(s.free) and s.free[0] == ticket
                and self._sessions.get(s.id) is s)

    def _pick(self, remove: bool) -> _Session | None:
        """The session owning the least recently freed slot among those waiting for work."""
        ready = self._ready
        while ready and not self._valid(ready[0]):
            heapq.heappop(ready)
        if not ready:
            return None
        s = ready[0][2]
        if remove:
            heapq.heappop(ready)
            s.free.popleft()
            self._offer(s)  # its next free slot, if it has one
        return s

    async def _dispatch(self) -> None:
        held: Message | None = None
        try:
            while not self._closed:
                if self._pick(remove=False) is None:
                    self._slot_ready.clear()
                    await self._slot_ready.wait()
                    continue
                if held is None:
                    held = await self.queue.get()
                    if held is None:
                        return
                session = self._pick(remove=True)
                if session is not None:
                    self._assign(session, held)
                    held = None
        finally:
            if held is not None:
                self.queue.requeue(held)

    def _assign(self, session: _Session, msg: Message) -> None:
        count = self._deliveries.get(msg.seq, 0) + 1
        if count == 1 and msg.seq <= self._restart_mark:
            count = 2  # handed out before a restart (maybe processed): say so
        self._deliveries[msg.seq] = count
        if count > 1:
            self.redelivered += 1
            self._stat(session.name).redelivered += 1
        session.inflight[msg.seq] = msg
        session.max_in_flight = max(session.max_in_flight, len(session.inflight))
        session.outbox.append((msg, count))
        if not session.flush_due:
            # Answer once this loop iteration has assigned what it can: one batch per take.
            session.flush_due = True
            asyncio.get_running_loop().call_soon(self._flush, session)

    def _flush(self, session: _Session) -> None:
        session.flush_due = False
        waiter, session.waiter = session.waiter, None
        if waiter is not None and not waiter.done():
            batch, session.outbox = session.outbox, []
            waiter.set_result(batch)

    def _free_slot(self, session: _Session) -> None:
        if self._sessions.get(session.id) is session:
            self._ticket += 1
            session.free.append(self._ticket)
            if len(session.free) == 1:
                self._offer(session)
            self._slot_ready.set()

    # -- sessions ----------------------------------------------------------------------------------

    def _stat(self, name: str) -> _WorkerStats:
        st = self._stats.get(name)
        if st is None:
            st = self._stats[name] = _WorkerStats()
        return st

    def session(self, sid: str, key: str | None = None) -> _Session:
        """The live session *sid*, its lease renewed, for a call signed by *key*.

        :raises UnknownSessionError: no such session.
        :raises _Refusal: 401, the session was enlisted with another key."""
        s = self._sessions.get(sid)
        if s is None:
            raise UnknownSessionError(f"no worker session {sid!r} (it lapsed or left, or the distributor restarted)")
        if s.key != key:
            raise _Refusal(401, "Unauthorized: session-key-mismatch (this session was enlisted with another "
                                "worker key)")
        s.expires = time.monotonic() + self.lease
        return s

    def enlist(self, name: str, capacity: int, key: str | None = None) -> _Session:
        """A new session for worker *name* with *capacity* slots, signed by *key*.

        A live session of the same name is replaced only when the same key enlists again (the
        worker restarted: what it held is redelivered); under another key, or without keys,
        the name is taken until that session leaves or lapses.

        :raises ValueError: *capacity* is above ``max_capacity``.
        :raises _Refusal: 409 for a name in use, 503 at ``max_sessions``."""
        if capacity > self.max_capacity:
            raise ValueError(f"capacity {capacity} is above GWCORE_WORKER_MAX_CAPACITY={self.max_capacity}")
        old = self._by_name.get(name)
        if old is not None:
            if key is None or old.key != key:
                left = max(0.0, old.expires - time.monotonic())
                raise _Refusal(409, f"Conflict: worker name {name!r} is enlisted by a live session; it is free "
                                    f"once that worker leaves or its lease lapses (in {left:.0f} s at most)")
            log.warning("worker %r enlisted again: its previous session ends, %d message(s) redelivered",
                        name, len(old.inflight))
            self._end(old)
        if len(self._sessions) >= self.max_sessions:
            raise _Refusal(503, f"Service Unavailable: {len(self._sessions)} worker sessions, the most "
                                f"GWCORE_WORKER_MAX_SESSIONS allows")
        first, self._ticket = self._ticket + 1, self._ticket + capacity
        s = _Session(name, capacity, time.monotonic() + self.lease, key, range(first, first + capacity))
        self._sessions[s.id] = s
        self._by_name[name] = s
        self._departed.pop(name, None)
        self._stat(name).capacity = capacity
        self._slot_ready.set()
        log.info("worker %r enlisted with capacity %d (session %s%s)", name, capacity, s.id,
                 f", key {key}" if key else "")
        return s

    def _end(self, s: _Session) -> None:
        """Drop a session; what it holds goes back to the queue (delivered again, marked)."""
        self._sessions.pop(s.id, None)
        if self._by_name.get(s.name) is s:
            del self._by_name[s.name]
        self._flush(s)
        for msg in s.inflight.values():
            self.queue.requeue(msg)
        s.inflight.clear()
        s.free.clear()
        self._stat(s.name).capacity = 0
        if s.name not in self._by_name:
            self._departed[s.name] = None
            while len(self._departed) > _DEPARTED_SERIES:
                name, _ = self._departed.popitem(last=False)
                gone = self._stats.pop(name)
                for attr in ("processed", "failed", "redelivered"):
                    setattr(self._folded, attr, getattr(self._folded, attr) + getattr(gone, attr))

    def _reap(self) -> None:
        now = time.monotonic()
        for s in list(self._sessions.values()):
            if s.waiter is None and s.expires < now:
                log.warning("worker %r (session %s) not heard from for %gs: session lapsed, %d message(s) "
                            "go to other workers", s.name, s.id, self.lease, len(s.inflight))
                self._end(s)
        self._reaper = asyncio.get_running_loop().call_later(self._reap_every, self._reap)

    async def take(self, sid: str, wait: float, alive: Callable[[], bool] | None = None,
                   held: set[int] | None = None, key: str | None = None) -> tuple[list[tuple[Message, int]], bool]:
        """Wait up to *wait* seconds for work; returns ``(batch, stop)``: messages with their
        delivery count, and whether the worker is to take nothing more (drained or stopping).

        :param held: the seqs the worker holds; any other the session holds never reached it
            (a batch lost on the way) and is handed out again."""
        s = self.session(sid, key)
        if s.waiter is not None:
            self._flush(s)  # a take that superseded an earlier one (the worker gave up on it)
        if held is not None:
            lost = [(m, 0) for seq, m in s.inflight.items() if seq not in held]
            if lost:
                log.warning("worker %r never got %d message(s) handed to it: handed out again", s.name, len(lost))
                self._return(s, lost)
        if s.draining or self._closed:
            return [], True
        fut: asyncio.Future[list[tuple[Message, int]]] = asyncio.get_running_loop().create_future()
        s.waiter = fut
        s.alive = alive
        self._offer(s)
        self._slot_ready.set()
        timer = asyncio.get_running_loop().call_later(max(0.0, min(wait, self.max_wait)), self._flush, s)
        try:
            batch = await fut
        finally:
            timer.cancel()
            if s.waiter is fut:
                s.waiter = None
            s.expires = time.monotonic() + self.lease
        if self._sessions.get(s.id) is not s:
            return [], True  # the session ended meanwhile; what it held is queued again
        if batch and alive is not None and not alive():
            # The connection went away while the take waited: nobody will read this batch.
            self._return(s, batch)
            return [], True
        top = max((m.seq for m, _c in batch), default=0)
        self._top_handed = max(self._top_handed, top)
        ahead = self.mark_ahead
        if top > self._handed_mark:
            try:
                await self._record_mark(top + ahead)
            except Exception:
                self._return(s, batch)
                raise
        elif self._handed_mark - self._top_handed < ahead // 2 and self._marking is None:
            # written ahead of need, so that takes rarely wait for a commit of their own
            self._marking = asyncio.ensure_future(self._record_mark(self._top_handed + ahead))
            self._marking.add_done_callback(self._marked)
        return batch, s.draining

    @property
    def mark_ahead(self) -> int:
        """How far beyond what it handed out the recorded mark goes: twice the enlisted slots.
        After a restart at most this many messages that were never handed out are marked as
        redeliveries too; in exchange a take almost never waits for a commit."""
        return 2 * sum(s.capacity for s in self._sessions.values())

    def _marked(self, done: "asyncio.Future[None]") -> None:
        self._marking = None
        if not done.cancelled() and done.exception() is not None:
            log.warning("recording the handed-out mark ahead failed (the next take records it): %r", done.exception())

    def _return(self, s: _Session, batch: list[tuple[Message, int]]) -> None:
        for msg, _count in batch:
            if s.inflight.pop(msg.seq, None) is not None:
                self.queue.requeue(msg)
                self._free_slot(s)

    async def _record_mark(self, seq: int) -> None:
        """Remember (durably, before the worker sees them) that messages up to *seq* may have
        been handed out, so that after a restart they are delivered marked as redeliveries."""
        store = self.store

        def put(txn: Any) -> None:
            # Takes record concurrently and their writes commit in any order: never lower the
            # mark, or a later take's smaller top would hide what an earlier take handed out.
            raw = txn.get(_MARK_KEY, db=store.meta)
            if raw is None or unpack_seq(raw) < seq:
                txn.put(_MARK_KEY, pack_seq(seq), db=store.meta)

        await self.writer.call(put)
        self._handed_mark = max(self._handed_mark, seq)

    async def ack(self, sid: str, seqs: list[int], key: str | None = None) -> int:
        """The worker's handlers returned for *seqs*: delete them (durably), free their slots.
        Returns how many were still held by the session (others were already redelivered)."""
        s = self.session(sid, key)
        # Out of the session before the (durable) delete: a lapse meanwhile must not requeue them.
        msgs = [s.inflight.pop(seq) for seq in dict.fromkeys(seqs) if seq in s.inflight]
        # The worker's handlers are done with them: their slots take new work now, while the
        # deletes join the writer's next group commit (the answer waits for it). A delete that
        # fails puts its message back in the queue, to be handed out again.
        for _m in msgs:
            self._free_slot(s)
        try:
            await self.queue.ack_many(msgs)   # one job of the writer's next commit for them all
        except BaseException:
            for m in msgs:
                self.queue.requeue(m)
            raise
        st = self._stat(s.name)
        for m in msgs:
            self._deliveries.pop(m.seq, None)
        st.processed += len(msgs)
        return len(msgs)

    def nack(self, sid: str, seq: int, reason: str, key: str | None = None) -> bool:
        """The worker's handler raised on *seq*: retry later with backoff, or move the message to
        the error store after ``GWCORE_HANDLER_MAX_ATTEMPTS`` (the local queue's logic)."""
        s = self.session(sid, key)
        msg = s.inflight.pop(seq, None)
        if msg is None:
            return False
        self._stat(s.name).failed += 1
        msg.release(WorkerHandlerError(f"worker {s.name!r}: {reason}"))
        self._free_slot(s)
        return True

    def drain(self, who: str, key: str | None = None) -> int:
        """Give the worker (a session id or a worker name) nothing new; its waiting take returns.
        Returns the number of sessions drained.

        :raises _Refusal: 401, the session was enlisted with another key than *key*."""
        s = self._sessions.get(who) or self._by_name.get(who)
        if s is None:
            return 0
        if s.key != key:
            raise _Refusal(401, "Unauthorized: session-key-mismatch (that worker was enlisted with another worker key)")
        s.draining = True
        self._flush(s)
        log.info("worker %r (session %s) draining: %d message(s) in flight", s.name, s.id, len(s.inflight))
        return 1

    def leave(self, sid: str, key: str | None = None) -> int:
        """End the session; returns how many unanswered messages went back to the queue."""
        s = self.session(sid, key)
        n = len(s.inflight)
        self._end(s)
        log.info("worker %r (session %s) left%s", s.name, s.id, f"; {n} message(s) redelivered" if n else "")
        return n

    # -- metrics -----------------------------------------------------------------------------------

    def metrics(self) -> Families:
        """The worker sessions, and each worker's slots and counts, for /metrics."""
        for st in self._stats.values():
            st.in_flight = 0
        for s in self._sessions.values():
            self._stat(s.name).in_flight = len(s.inflight)
        rows = sorted(self._stats.items())
        if any((self._folded.processed, self._folded.failed, self._folded.redelivered)):
            rows.append((_DEPARTED, self._folded))  # the departed workers no longer listed by name

        def per_worker(kind: Any, name: str, help_text: str, attr: str) -> Any:
            return kind(name, help_text, labels=("worker",), samples=[((w,), getattr(st, attr)) for w, st in rows])

        return [
            gauge("gwcore_workers", "Worker sessions enlisted.", len(self._sessions)),
            per_worker(gauge, "gwcore_worker_capacity", "Slots of each worker (0 once it left or lapsed).", "capacity"),
            per_worker(gauge, "gwcore_worker_in_flight", "Messages each worker holds and has not answered.",
                       "in_flight"),
            per_worker(counter, "gwcore_worker_processed_total", "Messages each worker acknowledged.", "processed"),
            per_worker(counter, "gwcore_worker_failed_total", "Handler failures each worker reported.", "failed"),
            per_worker(counter, "gwcore_worker_redelivered_total", "Redeliveries handed to each worker.", "redelivered"),
            counter("gwcore_distributor_redelivered_total", "Messages handed out again (marked as redeliveries).",
                    self.redelivered),
            counter("gwcore_worker_calls_refused_total",
                    "Worker calls answered 401 (unsigned, forged, stale, replayed, or another key's session).",
                    self.refused),
        ]
