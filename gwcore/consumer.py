"""Consuming the durable local queue: an async iterator and a handler runner.

A message leaves the queue only when it is acknowledged (``await message.ack()``, or the handler
returned). A process that dies before that sees the message again after restart: at-least-once
into the handler, exactly-once into the queue.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import importlib
import inspect
import logging
import time
from concurrent.futures import Executor
from typing import Any, AsyncIterator, Awaitable, Callable

from ._core import core
from .delivery import Delivery, DeliveryQueue
from .errors import ConfigurationError
from .metrics import Buckets
from .records import encode_error, now_ms, pack_seq
from .store import Store, Writer

__all__ = ("Message", "LocalQueue", "load_handler", "run_handler", "handler_caller")

log = logging.getLogger("gwcore.consumer")

_FETCH = 256


class Message(Delivery):
    """One message from the local queue.

    :ivar id: the NServiceBus message id (``NServiceBus.Id``).
    :ivar headers: message headers, names as sent (``NServiceBus.Header.`` prefix removed).
    :ivar body: the message body.
    :ivar seq: the position in the local queue.
    :ivar attempt: 1 for the first delivery in this process, more for redeliveries after failures.
    """

    __slots__ = ("framed",)

    def __init__(self, queue: "LocalQueue", seq: int, framed: bytes, attempt: int) -> None:
        #: the envelope as the store holds it (what a distributor hands a worker)
        self.framed = framed
        self.id, self.headers, self.body, self.expiry_ms, self.accepted_ms = core.decode_envelope(framed)
        self.seq = seq
        self.attempt = attempt
        self._queue = queue
        self._settled = False

    def __repr__(self) -> str:
        return f"<Message id={self.id!r} seq={self.seq} attempt={self.attempt}>"


class LocalQueue(DeliveryQueue):
    """Hands out queued messages in order, each to one consumer at a time."""

    FAMILIES = (
        ("gwcore_consumer_delivered_total", "Deliveries to consumers.", "delivered"),
        ("gwcore_consumer_acked_total", "Messages acknowledged and removed.", "acked"),
        ("gwcore_consumer_failed_total", "Handler attempts that failed.", "failed"),
        ("gwcore_consumer_expired_total", "Messages discarded after their TimeToBeReceived.", "expired"),
        ("gwcore_consumer_poisoned_total", "Messages moved to the error store.", "poisoned"),
    )
    _log = log

    def __init__(self, store: Store, writer: Writer, *, max_attempts: int = 5,
                 retry_base: float = 0.5, retry_cap: float = 30.0) -> None:
        super().__init__(max_attempts)
        self.store = store
        self.writer = writer
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self._cursor = 0  # highest seq read from the store
        self._buffer: list[tuple[int, bytes]] = []
        self._buffer_pos = 0
        self._retries: list[tuple[float, int, int]] = []  # (due monotonic, seq, attempts so far)
        self._attempts: dict[int, int] = {}
        self._wakeup = asyncio.Event()
        self._closed = False

    def notify(self, added: int = 1) -> None:
        """Called after a commit that queued new messages."""
        self._wakeup.set()

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while True:
            msg = await self.get()
            if msg is None:
                return
            yield msg

    async def get(self) -> Message | None:
        """The next message, waiting for one; ``None`` once the queue is closed."""
        while not self._closed:
            msg = self._next_ready()
            if msg is not None:
                if await self._taken(msg):
                    continue
                self.delivered += 1
                return msg
            self._wakeup.clear()
            timeout = None
            if self._retries:
                timeout = max(0.0, self._retries[0][0] - time.monotonic())
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return None

    def _next_ready(self) -> Message | None:
        if self._retries and self._retries[0][0] <= time.monotonic():
            _due, seq, attempts = heapq.heappop(self._retries)
            framed = self.store.read_one(seq)
            if framed is not None:
                return Message(self, seq, framed, attempts + 1)
        if self._buffer_pos >= len(self._buffer):
            self._buffer = self.store.read_queue(self._cursor, _FETCH)
            self._buffer_pos = 0
            if not self._buffer:
                return None
            self._cursor = self._buffer[-1][0]
        seq, framed = self._buffer[self._buffer_pos]
        self._buffer_pos += 1
        return Message(self, seq, framed, 1)

    async def ack_many(self, msgs: list[Message]) -> None:
        """Remove several handled messages in one job of the writer's next commit (durably): a
        distributor worker's acknowledgement. All or none: when the commit fails, none is
        removed and the exception is raised."""
        msgs = [m for m in msgs if not m._settled]
        for m in msgs:
            m._settled = True
        if not msgs:
            return
        keys = [pack_seq(m.seq) for m in msgs]
        db = self.store.queue

        def delete(txn: Any) -> None:
            for key in keys:
                txn.delete(key, db=db)

        try:
            await self.writer.call(delete)
        except BaseException:
            for m in msgs:
                m._settled = False
            raise
        for m in msgs:
            self._attempts.pop(m.seq, None)
        self.acked += len(msgs)

    def _discarding(self, msg: Message) -> None:
        log.info("message %s expired (TimeToBeReceived) before it was consumed; discarded", msg.id)

    async def _ack(self, msg: Message, count: bool = True) -> None:
        msg._settled = True  # also a message settled here instead of delivered (_taken)
        await self.writer.ack(msg.seq)
        self._attempts.pop(msg.seq, None)
        if count:
            self.acked += 1

    def _release(self, msg: Message, error: BaseException | None) -> None:
        reason = self._failed(msg, error)
        if reason is not None:
            asyncio.ensure_future(self._poison(msg.seq, reason))
            return
        delay = min(self.retry_cap, self.retry_base * (2 ** (msg.attempt - 1)))
        log.warning("message %s: attempt %d failed (%r); retrying in %.1fs", msg.id, msg.attempt, error, delay)
        heapq.heappush(self._retries, (time.monotonic() + delay, msg.seq, msg.attempt))
        self._wakeup.set()

    def requeue(self, msg: Message) -> None:
        """Hand *msg* out again at once, as the same attempt: its consumer went away before it
        answered (a distributor worker whose session lapsed), which is not a failed attempt."""
        msg._settled = True
        heapq.heappush(self._retries, (time.monotonic(), msg.seq, msg.attempt - 1))
        self._wakeup.set()

    async def _poison(self, seq: int, reason: str) -> None:
        store = self.store
        key = pack_seq(seq)

        def move(txn: Any) -> bool:
            framed = txn.get(key, db=store.queue)
            if framed is None:
                return False
            txn.put(key, encode_error(framed, reason, now_ms()), db=store.errors)
            txn.delete(key, db=store.queue)
            return True

        await self.writer.call(move)


def load_handler(spec: str, what: str = "GWCORE_HANDLER") -> Callable[[Message], Any]:
    """Resolve ``module:function`` (``GWCORE_HANDLER``, ``gwcore worker --handler``) to a callable.

    :param what: how the spec is named in errors.
    """
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"{what}={spec!r}: cannot import {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigurationError(f"{what}={spec!r}: {module_name!r} has no {attr!r}")
    if not callable(obj):
        raise ConfigurationError(f"{what}={spec!r} is not callable")
    return obj


def handler_caller(handler: Callable[[Any], Any], executor: Executor | None = None) -> Callable[[Any], Awaitable[Any]]:
    """``await call(message)`` runs *handler* on it: an async handler on the loop, a sync one
    (which may block) in *executor* (default: the loop's)."""
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(getattr(handler, "__call__", None)):
        return handler

    async def call(message: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, handler, message)

    return call


def _ack_done(msg: Message, fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("message %s was handled but its removal failed (%s): it is delivered again after a restart",
                    msg.id, fut.exception())


async def run_handler(queue: LocalQueue, handler: Callable[[Message], Any] | Callable[[Message], Awaitable[Any]],
                      concurrency: int = 1, durations: Buckets | None = None) -> None:
    """Feed ``handler`` (sync or async) until the queue closes; ack after it returns. Each
    call's time, whatever its outcome, goes into *durations*."""
    call = handler_caller(handler)
    clock = time.perf_counter

    async def one(msg: Message) -> None:
        started = clock()
        try:
            await call(msg)
        except asyncio.CancelledError:
            # Shutting down mid-handler: the message stays queued and comes back after restart;
            # not a failed attempt.
            msg._settled = True
            raise
        except Exception as exc:
            if durations is not None:
                durations.observe(clock() - started)
            msg.release(exc)
            return
        if durations is not None:
            durations.observe(clock() - started)
        # The slot is free as soon as the handler returns: the removal joins the writer's next
        # group commit while the next message is handled, so acks are not one fsync each. A crash
        # before it commits redelivers the message (at-least-once, as before).
        ack = asyncio.ensure_future(msg.ack())
        tasks.add(ack)
        ack.add_done_callback(tasks.discard)
        ack.add_done_callback(functools.partial(_ack_done, msg))

    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Future] = set()
    try:
        async for msg in queue:
            await slots.acquire()
            task = asyncio.ensure_future(one(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(lambda _t: slots.release())
    finally:
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
