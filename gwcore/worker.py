"""A distributor worker: enlists with a gateway in distributor mode and runs a handler on the
messages it is handed (docs/deployment.md).

::

    async with gwcore.Worker("http://distributor:25900", 4, handle) as worker:
        await worker.wait_closed()      # until drained (worker.drain(), or `gwcore worker --drain`)

The worker never takes more than its capacity: it asks for work only while a slot is free, and the
distributor hands out at most the session's free slots. Each message is acknowledged after the
handler returned; a handler that raises is reported (the distributor retries it with backoff and
moves it to the error store after ``GWCORE_HANDLER_MAX_ATTEMPTS``).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import logging
import os
import socket
import urllib.parse
from typing import Any, Callable

import orjson

from .client import SiteClient
from .consumer import handler_caller
from .errors import ConfigurationError, GatewayError, SendError

__all__ = ("Worker", "WorkerMessage", "drain_worker")

log = logging.getLogger("gwcore.worker")

_PREFIX = "/.gwcore/worker/"
_RETRY_DELAY = 1.0


class WorkerMessage:
    """One message handed to this worker.

    :ivar id: the NServiceBus message id.
    :ivar headers: message headers (``NServiceBus.Header.`` prefix removed).
    :ivar body: the message body.
    :ivar seq: its position in the distributor's queue.
    :ivar attempt: 1, or more when earlier handler attempts failed.
    :ivar delivery_count: deliveries so far, this one included (a worker that died or stalled
        holding the message, or a failed attempt, counts as one).
    :ivar redelivered: True when the message was handed out before (it may have been processed).
    """

    __slots__ = ("id", "headers", "body", "seq", "attempt", "delivery_count", "redelivered")

    def __init__(self, wire: dict[str, Any]) -> None:
        self.id: str = wire["id"]
        self.headers: dict[str, str] = wire["headers"]
        self.body = base64.b64decode(wire["body"])
        self.seq: int = wire["seq"]
        self.attempt: int = wire["attempt"]
        self.delivery_count: int = wire["delivery_count"]
        self.redelivered: bool = wire["redelivered"]

    def __repr__(self) -> str:
        return f"<WorkerMessage id={self.id!r} seq={self.seq} delivery_count={self.delivery_count}>"


class _Refused(GatewayError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status


def _base_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"distributor URL {url!r}: need http:// or https:// and a host")
    return f"{parts.scheme}://{parts.netloc}/"


def _seg(text: str) -> str:
    return urllib.parse.quote(text, safe="")


class _Protocol:
    """The worker protocol's calls over one keep-alive client."""

    def __init__(self, url: str, concurrency: int, wait: float) -> None:
        self.client = SiteClient(_base_url(url), concurrency=concurrency, request_timeout=wait + 30.0)
        self.last_answer = 0.0  # loop time of the last answer (every call renews the lease)

    async def call(self, *segments: str) -> dict[str, Any]:
        target = (_PREFIX + "/".join(_seg(s) for s in segments)).encode("ascii")
        response = await self.client.post_block(b"", b"", target=target)
        self.last_answer = asyncio.get_running_loop().time()
        if response.status != 200:
            raise _Refused(response.status, response.reason)
        result: dict[str, Any] = orjson.loads(response.body)
        return result


class Worker:
    """Works off a distributor's queue: ``await worker.run()`` or ``async with``.

    :param url: the distributor node's base URL (``http://host:25900``).
    :param capacity: messages handled at once (the slots enlisted with).
    :param handler: sync or async callable taking one :class:`WorkerMessage`; a sync handler runs
        in a thread of its own pool (one thread per slot).
    :param name: the worker's name on the distributor (default ``host-pid``); enlisting under a
        name that has a session ends that session (a restarted worker).
    :param wait: longest a request for work waits on the distributor (it may cut this shorter).
    """

    def __init__(self, url: str, capacity: int, handler: Callable[[Any], Any], *,
                 name: str | None = None, wait: float = 10.0) -> None:
        if capacity < 1:
            raise ConfigurationError(f"worker capacity must be at least 1, got {capacity}")
        self.url = url
        self.capacity = capacity
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.wait = wait
        self._handler = handler
        self._proto = _Protocol(url, capacity + 2, wait)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.session: str | None = None
        self._tasks: set[asyncio.Task] = set()
        # seqs taken and not yet answered, with how many copies: after a takeover the new active
        # may hand a message out again while the old session's copy is still being handled
        self._held: collections.Counter[int] = collections.Counter()
        # Acks of the messages finished in one loop turn go out as one request.
        self._acks: list[tuple[str, int, asyncio.Future[None]]] = []
        self._room = asyncio.Event()
        self._draining = False
        self._run_task: asyncio.Task | None = None
        self._drain_task: asyncio.Future | None = None
        self._lease = 30.0  # the session's lease, as the distributor said at enlisting
        #: Messages handled and acknowledged / whose handler raised.
        self.processed = 0
        self.failed = 0
        #: Most messages held at once (never above capacity).
        self.max_in_flight = 0

    @property
    def in_flight(self) -> int:
        """Messages taken and not yet answered."""
        return len(self._tasks)

    # -- running -----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Enlist, handle messages until drained, finish what is in flight, leave."""
        loop = asyncio.get_running_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(self.capacity, thread_name_prefix="gwcore-handler")
        call = handler_caller(self._handler, self._executor)
        heartbeat = loop.create_task(self._heartbeat())
        try:
            while not self._draining:
                if self.session is None and not await self._enlist():
                    await asyncio.sleep(_RETRY_DELAY)
                    continue
                while len(self._tasks) >= self.capacity and not self._draining:
                    self._room.clear()
                    await self._room.wait()
                if self._draining:
                    break
                try:
                    answer = await self._proto.call("take", self.session or "", str(int(self.wait * 1000)),
                                                    ",".join(map(str, sorted(self._held))))
                except _Refused as exc:
                    if exc.status == 404:
                        self.session = None  # the distributor forgot us (restart, or we lapsed)
                    else:
                        log.warning("distributor refused a take: %s", exc)
                        await asyncio.sleep(_RETRY_DELAY)
                    continue
                except SendError as exc:
                    log.warning("distributor unreachable: %s", exc)
                    await asyncio.sleep(_RETRY_DELAY)
                    continue
                for wire in answer["messages"]:
                    self._held[wire["seq"]] += 1
                    task = loop.create_task(self._one(call, self.session or "", WorkerMessage(wire)))
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
                self.max_in_flight = max(self.max_in_flight, len(self._tasks))
                if answer["stop"]:
                    log.info("worker %r drained by the distributor: finishing %d message(s)", self.name, len(self._tasks))
                    self._draining = True
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            if self.session is not None:
                try:
                    await self._proto.call("leave", self.session)
                except (SendError, _Refused) as exc:
                    log.warning("leaving the distributor failed (the session lapses instead): %s", exc)
                self.session = None
        finally:
            heartbeat.cancel()
            await self._proto.client.close()
            self._executor.shutdown(wait=False)

    async def _enlist(self) -> bool:
        try:
            answer = await self._proto.call("enlist", self.name, str(self.capacity))
        except (SendError, _Refused) as exc:
            log.warning("cannot enlist with the distributor at %s: %s", self.url, exc)
            return False
        self.session = answer["session"]
        self._lease = float(answer["lease"])
        log.info("worker %r enlisted at %s with capacity %d", self.name, self.url, self.capacity)
        return True

    async def _heartbeat(self) -> None:
        """While every slot is busy (or draining) no take is sent: renew the lease some other way,
        so a long handler is not mistaken for a dead worker."""
        loop = asyncio.get_running_loop()
        while True:
            # (not enlisted yet: look again soon, the lease is not known)
            await asyncio.sleep(min(1.0, self._lease / 6) if self.session is not None else 0.05)
            session = self.session
            if session is not None and loop.time() - self._proto.last_answer >= self._lease / 3:
                try:
                    await self._proto.call("heartbeat", session)
                except _Refused as exc:
                    log.warning("heartbeat refused: %s", exc)
                    if exc.status == 404 and self.session == session:
                        self.session = None  # lapsed after all: enlist again when a slot frees
                except SendError as exc:
                    log.warning("heartbeat failed: %s", exc)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._room.set()

    async def _one(self, call: Callable[[WorkerMessage], Any], session: str, msg: WorkerMessage) -> None:
        try:
            try:
                await call(msg)
            except Exception as exc:
                self.failed += 1
                log.warning("handler failed on message %s (attempt %d): %r", msg.id, msg.attempt, exc)
                await self._answer(msg, "nack", session, str(msg.seq), repr(exc))
                return
            self.processed += 1
            await self._ack(session, msg.seq)
        finally:
            # held until answered: a take lists it, so the distributor does not hand it out again
            self._held[msg.seq] -= 1
            if self._held[msg.seq] <= 0:
                del self._held[msg.seq]

    async def _ack(self, session: str, seq: int) -> None:
        loop = asyncio.get_running_loop()
        if not self._acks:
            loop.call_soon(self._send_acks)
        done: asyncio.Future[None] = loop.create_future()
        self._acks.append((session, seq, done))
        await done

    def _send_acks(self) -> None:
        batch, self._acks = self._acks, []
        by_session: dict[str, list[tuple[int, asyncio.Future[None]]]] = {}
        for session, seq, done in batch:
            by_session.setdefault(session, []).append((seq, done))
        for session, items in by_session.items():
            asyncio.ensure_future(self._ack_batch(session, items))

    async def _ack_batch(self, session: str, items: list[tuple[int, asyncio.Future[None]]]) -> None:
        what = f"{len(items)} message(s)" if len(items) > 1 else f"seq {items[0][0]}"
        try:
            await self._answer_call(what, "ack", session, ",".join(str(seq) for seq, _ in items))
        finally:
            for _seq, done in items:
                if not done.done():
                    done.set_result(None)

    async def _answer(self, msg: WorkerMessage, *call: str) -> None:
        await self._answer_call(f"message {msg.id}", *call)

    async def _answer_call(self, what: str, *call: str) -> None:
        for attempt in range(3):
            try:
                await self._proto.call(*call)
                return
            except _Refused as exc:
                log.warning("%s of %s refused (%s): the distributor redelivers it", call[0], what, exc)
                return
            except SendError as exc:
                if attempt == 2:
                    log.warning("%s of %s failed (%s): the distributor redelivers it", call[0], what, exc)
                    return
                await asyncio.sleep(_RETRY_DELAY)

    def drain(self) -> None:
        """Take nothing new; finish and acknowledge what is in flight, then leave (``run`` returns).
        Safe to call from a signal handler on the loop."""
        if self._draining:
            return
        self._draining = True
        self._room.set()
        if self.session is not None:
            # The waiting take returns at once (with whatever was already assigned to it).
            self._drain_task = asyncio.ensure_future(self._drain_call(self.session))

    async def _drain_call(self, session: str) -> None:
        try:
            await self._proto.call("drain", session)
        except (SendError, _Refused) as exc:
            log.warning("drain request failed: %s", exc)

    async def wait_closed(self) -> None:
        """Until :meth:`run` (started by ``async with``) returns."""
        if self._run_task is not None:
            await asyncio.shield(self._run_task)

    async def __aenter__(self) -> "Worker":
        self._run_task = asyncio.ensure_future(self.run())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.drain()
        await self.wait_closed()


async def drain_worker(url: str, name: str) -> bool:
    """Tell the distributor at *url* to give worker *name* nothing new (it finishes and leaves).
    Returns False when no worker of that name is enlisted."""
    proto = _Protocol(url, 1, 1.0)
    try:
        answer = await proto.call("drain", name)
    finally:
        await proto.client.close()
    return bool(answer["drained"])
