"""Distributor-hosted mode (``GWCORE_MODE=distributor``): the local queue is worked off by
``gwcore worker`` processes that enlisted over HTTP with a capacity.

The gateway stores accepted messages in the local queue exactly as in standalone mode; instead of
an in-process handler, a :class:`Distributor` hands each queued message to a worker session with a
free slot, the least recently freed slot first (the NServiceBus distributor's ready model). A
worker acknowledges a message after its handler returned, which deletes it (through the writer,
durably) and frees the slot; a failure report (nack) goes through the local queue's retry and
poison logic (gwcore/consumer.py). A session that is not heard from within its lease lapses: what
it took and did not acknowledge goes back to the queue, marked as a redelivery.

The wire protocol (docs/deployment.md) lives under ``/.gwcore/worker/`` on the gateway's own
listener. The request parser keeps no body or query string for paths that are not channels, so
every parameter travels as a percent-encoded path segment; answers are JSON.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import os
import re
import secrets
import struct
import time
import urllib.parse
from typing import Any, Awaitable, Callable

import orjson

from . import databus
from .consumer import LocalQueue, Message
from .errors import ConfigurationError, GatewayError
from .http import FileAnswer
from .store import Store, Writer

__all__ = ("Distributor", "WORKER_PREFIX", "UnknownSessionError")

log = logging.getLogger("gwcore.distributor")

#: The reserved path prefix of the worker protocol on the gateway's listener.
WORKER_PREFIX = b"/.gwcore/worker/"
_MARK_KEY = b"distributor_handed"  # meta: the highest queue seq ever handed to a worker
_U64 = struct.Struct(">Q")
_MAX_REASON = 2000
_BLOB_KEY = re.compile(r"[0-9a-f]{32}")

#: (status, reason, JSON body), or for a blob a :class:`gwcore.http.FileAnswer` as the body.
Answer = tuple[int, str, "bytes | FileAnswer"]


class UnknownSessionError(GatewayError):
    """The worker session is not known here (it lapsed, left, or the distributor restarted)."""


class WorkerHandlerError(GatewayError):
    """A worker reported that its handler failed on a message (the reason is the worker's)."""


class _Session:
    __slots__ = ("id", "name", "capacity", "inflight", "expires", "draining", "waiter", "outbox",
                 "alive", "flush_due", "max_in_flight")

    def __init__(self, name: str, capacity: int, expires: float) -> None:
        self.id = secrets.token_hex(12)
        self.name = name
        self.capacity = capacity
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
    """

    def __init__(self, queue: LocalQueue, store: Store, writer: Writer, *, lease: float) -> None:
        self.queue = queue
        self.store = store
        self.writer = writer
        self.lease = lease
        #: Longest a take waits for work: well inside the lease, so a waiting worker never lapses.
        self.max_wait = max(0.05, min(20.0, lease / 2))
        self._sessions: dict[str, _Session] = {}
        self._by_name: dict[str, _Session] = {}
        # One entry (a session) per free slot; the left end is the least recently freed.
        self._free: collections.deque[_Session] = collections.deque()
        self._slot_ready = asyncio.Event()
        self._deliveries: dict[int, int] = {}   # seq -> deliveries so far
        raw = store.get(store.meta, _MARK_KEY)
        # Queued messages at or below this were possibly handed out by an earlier process.
        self._restart_mark = _U64.unpack(raw)[0] if raw else 0
        self._handed_mark = self._restart_mark
        self._stats: dict[str, _WorkerStats] = {}
        self._closed = False
        self._task: asyncio.Task | None = None
        self._reaper: asyncio.TimerHandle | None = None
        self.redelivered = 0

    # -- lifecycle ---------------------------------------------------------------------------------

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

    # -- dispatching -------------------------------------------------------------------------------

    def _pick(self, remove: bool) -> _Session | None:
        """The session owning the least recently freed slot among those waiting for work."""
        free = self._free
        i = 0
        while i < len(free):
            s = free[i]
            if self._sessions.get(s.id) is not s:
                del free[i]  # a slot of a session that ended
                continue
            if s.waiter is not None and not s.draining:
                if remove:
                    del free[i]
                return s
            i += 1
        return None

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
            self._free.append(session)
            self._slot_ready.set()

    # -- sessions ----------------------------------------------------------------------------------

    def _stat(self, name: str) -> _WorkerStats:
        st = self._stats.get(name)
        if st is None:
            st = self._stats[name] = _WorkerStats()
        return st

    def _session(self, sid: str) -> _Session:
        s = self._sessions.get(sid)
        if s is None:
            raise UnknownSessionError(f"no worker session {sid!r} (it lapsed or left, or the distributor restarted)")
        s.expires = time.monotonic() + self.lease
        return s

    def enlist(self, name: str, capacity: int) -> _Session:
        """A new session for worker *name* with *capacity* slots. A session of the same name
        ends first (the worker restarted): what it held is redelivered."""
        old = self._by_name.get(name)
        if old is not None:
            log.warning("worker %r enlisted again: its previous session ends, %d message(s) redelivered",
                        name, len(old.inflight))
            self._end(old)
        s = _Session(name, capacity, time.monotonic() + self.lease)
        self._sessions[s.id] = s
        self._by_name[name] = s
        self._stat(name).capacity = capacity
        self._free.extend([s] * capacity)
        self._slot_ready.set()
        log.info("worker %r enlisted with capacity %d (session %s)", name, capacity, s.id)
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
        self._stat(s.name).capacity = 0

    def _reap(self) -> None:
        now = time.monotonic()
        for s in list(self._sessions.values()):
            if s.waiter is None and s.expires < now:
                log.warning("worker %r (session %s) not heard from for %gs: session lapsed, %d message(s) "
                            "go to other workers", s.name, s.id, self.lease, len(s.inflight))
                self._end(s)
        self._reaper = asyncio.get_running_loop().call_later(self._reap_every, self._reap)

    async def take(self, sid: str, wait: float, alive: Callable[[], bool] | None = None,
                   held: set[int] | None = None) -> tuple[list[tuple[Message, int]], bool]:
        """Wait up to *wait* seconds for work; returns ``(batch, stop)``: messages with their
        delivery count, and whether the worker is to take nothing more (drained or stopping).

        :param held: the seqs the worker holds; any other the session holds never reached it
            (a batch lost on the way) and is handed out again."""
        s = self._session(sid)
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
        if top > self._handed_mark:
            try:
                await self._record_mark(top)
            except Exception:
                self._return(s, batch)
                raise
        return batch, s.draining

    def _return(self, s: _Session, batch: list[tuple[Message, int]]) -> None:
        for msg, _count in batch:
            if s.inflight.pop(msg.seq, None) is not None:
                self.queue.requeue(msg)
                self._free_slot(s)

    async def _record_mark(self, seq: int) -> None:
        """Remember (durably, before the worker sees them) that messages up to *seq* were handed
        out, so that after a restart they are delivered marked as redeliveries."""
        store = self.store

        def put(txn: Any) -> None:
            # Takes record concurrently and their writes commit in any order: never lower the
            # mark, or a later take's smaller top would hide what an earlier take handed out.
            raw = txn.get(_MARK_KEY, db=store.meta)
            if raw is None or _U64.unpack(raw)[0] < seq:
                txn.put(_MARK_KEY, _U64.pack(seq), db=store.meta)

        await self.writer.call(put)
        self._handed_mark = max(self._handed_mark, seq)

    async def ack(self, sid: str, seqs: list[int]) -> int:
        """The worker's handlers returned for *seqs*: delete them (durably), free their slots.
        Returns how many were still held by the session (others were already redelivered)."""
        s = self._session(sid)
        # Out of the session before the (durable) delete: a lapse meanwhile must not requeue them.
        msgs = [s.inflight.pop(seq) for seq in dict.fromkeys(seqs) if seq in s.inflight]
        results = await asyncio.gather(*(m.ack() for m in msgs), return_exceptions=True)
        st = self._stat(s.name)
        failure: BaseException | None = None
        for m, r in zip(msgs, results):
            if isinstance(r, BaseException):
                failure = r
                self.queue.requeue(m)
            else:
                self._deliveries.pop(m.seq, None)
                st.processed += 1
            self._free_slot(s)
        if failure is not None:
            raise failure
        return len(msgs)

    def nack(self, sid: str, seq: int, reason: str) -> bool:
        """The worker's handler raised on *seq*: retry later with backoff, or move the message to
        the error store after ``GWCORE_HANDLER_MAX_ATTEMPTS`` (the local queue's logic)."""
        s = self._session(sid)
        msg = s.inflight.pop(seq, None)
        if msg is None:
            return False
        self._stat(s.name).failed += 1
        msg.release(WorkerHandlerError(f"worker {s.name!r}: {reason}"))
        self._free_slot(s)
        return True

    def drain(self, who: str) -> int:
        """Give the worker (a session id or a worker name) nothing new; its waiting take returns.
        Returns the number of sessions drained."""
        s = self._sessions.get(who) or self._by_name.get(who)
        if s is None:
            return 0
        s.draining = True
        self._flush(s)
        log.info("worker %r (session %s) draining: %d message(s) in flight", s.name, s.id, len(s.inflight))
        return 1

    def leave(self, sid: str) -> int:
        """End the session; returns how many unanswered messages went back to the queue."""
        s = self._session(sid)
        n = len(s.inflight)
        self._end(s)
        log.info("worker %r (session %s) left%s", s.name, s.id, f"; {n} message(s) redelivered" if n else "")
        return n

    # -- HTTP --------------------------------------------------------------------------------------

    async def handle(self, method: bytes, path: bytes, alive: Callable[[], bool]) -> Answer:
        """Answer one worker protocol request (``POST /.gwcore/worker/<op>/<arg>...``, or
        ``GET /.gwcore/worker/blob/<session>/<key>``)."""
        parts = [urllib.parse.unquote(p.decode("latin-1")) for p in path[len(WORKER_PREFIX):].split(b"/")]
        op, args = parts[0], parts[1:]
        if op == "blob":
            if method not in (b"GET", b"HEAD"):
                return 405, "Method Not Allowed: a blob is read with GET (or HEAD)", b""
            if self._closed:
                return 503, "Service Unavailable: the distributor is stopping", b""
            # Everything after the session is the key: a key with a '/' in it is malformed (400),
            # not an unknown operation.
            return self.blob(args[0] if args else "", "/".join(args[1:]))
        if method != b"POST":
            return 405, "Method Not Allowed: the worker protocol uses POST", b""
        handler = _OPS.get(op)
        if handler is None or len(args) != handler[0]:
            return 404, f"Not Found: no worker operation {op!r} with {len(args)} argument(s)", b""
        if self._closed:
            return 503, "Service Unavailable: the distributor is stopping", b""
        try:
            result = await handler[1](self, args, alive)
        except UnknownSessionError as exc:
            return 404, f"Not Found: {exc}", b""
        except ValueError as exc:
            return 400, f"Bad Request: {exc}", b""
        return 200, "OK", orjson.dumps(result)

    def blob(self, sid: str, key: str) -> Answer:
        """One databus blob for a worker: the file, opened, to be streamed by the listener.

        Only a blob that a message held by this session names is served, and only by its key
        (32 lowercase hex digits, the file name in the blob dir): nothing else of
        the data dir can be reached this way."""
        if not _BLOB_KEY.fullmatch(key):
            return 400, "Bad Request: a blob key is 32 lowercase hex digits", b""
        try:
            s = self._session(sid)  # renews the lease, as every call does
        except UnknownSessionError as exc:
            return 404, f"Not Found: {exc}", b""
        if not any(_names_blob(m, key) for m in s.inflight.values()):
            return 404, f"Not Found: blob {key} is named by no message worker session {sid} holds", b""
        info = databus.blob_info(self.store, key)
        path = os.path.join(self.store.blob_dir, key)
        try:
            if info is None:
                raise FileNotFoundError(path)
            # O_NOFOLLOW: a link planted in the blob dir is not followed out of it. Once open, the
            # file can be streamed to its end even if its expiry removes it meanwhile.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return 404, f"Not Found: blob {key} has expired (its message outlived the blob's TimeToBeReceived " \
                        "or GWCORE_DATABUS_TTL)", b""
        size = os.fstat(fd).st_size
        if size != info.size:
            os.close(fd)
            log.error("databus: blob %s is %d bytes on disk but %d in its record: not served", key, size, info.size)
            return 500, f"Internal Server Error: blob {key} is damaged ({size} bytes, {info.size} recorded)", b""
        headers = []
        if info.sha256:
            headers.append(("Content-Digest", databus.content_digest(info.sha256)))
        if info.md5:
            headers.append(("Content-MD5", info.md5))
        return 200, "OK", FileAnswer(fd, size, headers)

    # -- metrics -----------------------------------------------------------------------------------

    def metrics(self) -> list[tuple[str, str, str, list[tuple[str, int]]]]:
        """``(name, type, help, [(labels, value)])`` for /metrics."""
        for st in self._stats.values():
            st.in_flight = 0
        for s in self._sessions.values():
            self._stat(s.name).in_flight = len(s.inflight)
        rows = sorted(self._stats.items())

        def per_worker(attr: str) -> list[tuple[str, int]]:
            return [(f'{{worker="{_label(name)}"}}', getattr(st, attr)) for name, st in rows]

        return [
            ("gwcore_workers", "gauge", "Worker sessions enlisted.", [("", len(self._sessions))]),
            ("gwcore_worker_capacity", "gauge", "Slots of each worker (0 once it left or lapsed).",
             per_worker("capacity")),
            ("gwcore_worker_in_flight", "gauge", "Messages each worker holds and has not answered.",
             per_worker("in_flight")),
            ("gwcore_worker_processed_total", "counter", "Messages each worker acknowledged.",
             per_worker("processed")),
            ("gwcore_worker_failed_total", "counter", "Handler failures each worker reported.",
             per_worker("failed")),
            ("gwcore_worker_redelivered_total", "counter", "Redeliveries handed to each worker.",
             per_worker("redelivered")),
            ("gwcore_distributor_redelivered_total", "counter", "Messages handed out again (marked as redeliveries).",
             [("", self.redelivered)]),
        ]


def _label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _positive(text: str, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{what} must be a positive integer, got {text!r}")
    return n


def _names_blob(msg: Message, key: str) -> bool:
    return any(value == key and name.startswith(databus.DATABUS_PREFIX) for name, value in msg.headers.items())


def _wire(d: Distributor, msg: Message, count: int) -> dict[str, Any]:
    wire = {"seq": msg.seq, "id": msg.id, "headers": msg.headers, "body": base64.b64encode(msg.body).decode("ascii"),
            "attempt": msg.attempt, "delivery_count": count, "redelivered": count > 1}
    blobs = {}
    for name, key in msg.headers.items():
        if name.startswith(databus.DATABUS_PREFIX) and _BLOB_KEY.fullmatch(key):
            info = databus.blob_info(d.store, key)
            # None: the blob expired before the message was handed out (reading it is a 404)
            blobs[name] = None if info is None else {"key": key, "size": info.size, "sha256": info.sha256,
                                                     "md5": info.md5}
    if blobs:
        wire["databus"] = blobs
    return wire


async def _op_enlist(d: Distributor, args: list[str], alive: Callable[[], bool]) -> dict[str, Any]:
    name = args[0]
    if not name or len(name) > 200:
        raise ValueError("a worker name of 1 to 200 characters is required")
    s = d.enlist(name, _positive(args[1], "capacity"))
    return {"session": s.id, "lease": d.lease, "max_wait": d.max_wait}


async def _op_take(d: Distributor, args: list[str], alive: Callable[[], bool]) -> dict[str, Any]:
    wait = _positive(args[1], "wait (milliseconds)") / 1000.0
    held = {_positive(x, "seq") for x in args[2].split(",") if x}
    batch, stop = await d.take(args[0], wait, alive, held)
    return {"messages": [_wire(d, m, c) for m, c in batch], "stop": stop}


async def _op_ack(d: Distributor, args: list[str], alive: Callable[[], bool]) -> dict[str, Any]:
    seqs = [_positive(x, "seq") for x in args[1].split(",") if x]
    return {"acked": await d.ack(args[0], seqs)}


async def _op_nack(d: Distributor, args: list[str], alive: Callable[[], bool]) -> dict[str, Any]:
    return {"released": d.nack(args[0], _positive(args[1], "seq"), args[2][:_MAX_REASON])}


async def _op_drain(d: Distributor, args: list[str], alive: Callable[[], bool]) -> dict[str, Any]:
    return {"drained": d.drain(args[0])}


async def _op_heartbeat(d: Distributor, args: list[str], alive: Callable[[], bool]) -> dict[str, Any]:
    d._session(args[0])  # renews the lease
    return {"lease": d.lease}


async def _op_leave(d: Distributor, args: list[str], alive: Callable[[], bool]) -> dict[str, Any]:
    return {"redelivered": d.leave(args[0])}


_Op = Callable[[Distributor, list[str], Callable[[], bool]], Awaitable[dict[str, Any]]]
# operation -> (number of path arguments, implementation)
_OPS: dict[str, tuple[int, _Op]] = {
    "enlist": (2, _op_enlist),    # enlist/<name>/<capacity>
    "take": (3, _op_take),        # take/<session>/<wait ms>/<seqs held>,...
    "ack": (2, _op_ack),          # ack/<session>/<seq>,<seq>,...
    "nack": (3, _op_nack),        # nack/<session>/<seq>/<reason>
    "drain": (1, _op_drain),      # drain/<session or worker name>
    "heartbeat": (1, _op_heartbeat),  # heartbeat/<session>: a busy worker's sign of life
    "leave": (1, _op_leave),      # leave/<session>
}


def check_channels(paths: list[str]) -> None:
    """A channel at ``/`` (or anywhere on the way to, or below, the worker prefix) would swallow
    the worker protocol's paths."""
    prefix = WORKER_PREFIX.decode()
    for p in paths:
        if prefix.startswith(p.lower()) or p.lower().startswith(prefix):
            raise ConfigurationError(
                f"GWCORE_RECEIVE_CHANNELS: the channel path {p!r} covers {WORKER_PREFIX.decode()!r}, "
                "which distributor mode reserves for its workers")
