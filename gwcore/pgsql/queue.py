"""The consumer queue of selected mode on PostgreSQL: rows of the endpoint's queue table (and this
instance's reply table) as :class:`PgMessage` s, what ``Gateway.messages()`` returns and
``GWCORE_HANDLER`` runs on, on every instance.

A consumer takes a row as the NServiceBus transport does, ``DELETE ... WHERE id = (SELECT ...
ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING``, inside a transaction held until the
handler settles the message: an ack commits the delete, a failed attempt rolls it back (the row is
there again for any instance; the attempts are counted in this instance's memory, as the
transport counts its immediate retries), and a message past ``GWCORE_HANDLER_MAX_ATTEMPTS`` goes
to the ``error`` table in the same transaction, with the transport's failure headers. A consumer
that dies mid-handler leaves the transaction open; the server rolls it back with the session.
The counters, the intercept hook and the retry/poison decision are gwcore/delivery.py's.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator

from ..delivery import Delivery, DeliveryQueue
from ..selectedbase import cancel_and_wait
from . import db
from .schema import insert_row
from .sink import queue_row

if TYPE_CHECKING:
    from .mode import PgSelected

__all__ = ("PgMessage", "PgQueue", "RECEIVE")

log = logging.getLogger("gwcore.selected")

RECEIVE = """
DELETE FROM {table} q WHERE q.id = (SELECT id FROM {table} ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING q.id, q.expires, q.headers, q.body, q.seq
"""
_POLL_MIN, _POLL_MAX = 0.005, 0.25  # an empty table is polled again after these (doubling)
# a handler may take this long with its row locked before the server rolls the transaction back
# (the message is then delivered again)
_HANDLER_LIMIT = 300.0
_EPOCH = datetime.datetime(1970, 1, 1)


class _Retry(Exception):
    """Rolls the consumer's transaction back: the message stays in its table."""


class PgMessage(Delivery):
    """A row of the endpoint's queue table (or this instance's reply table), with the interface
    of :class:`gwcore.consumer.Message`: ``await ack()``, ``release(error)``."""

    __slots__ = ("_outcome", "_committed", "_handed")

    def __init__(self, queue: "PgQueue", row: Any, attempt: int) -> None:
        headers = json.loads(row["headers"])
        self.headers = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in headers.items()}
        self.id = self.headers.get("NServiceBus.MessageId") or str(row["id"])
        self.body = bytes(row["body"] or b"")
        expires = row["expires"]
        self.expiry_ms = int((expires - _EPOCH).total_seconds() * 1000) if expires is not None else 0
        self.seq = row["seq"]
        self.accepted_ms = 0
        self.attempt = attempt
        self._queue = queue
        self._settled = False
        loop = asyncio.get_running_loop()
        self._outcome: asyncio.Future = loop.create_future()  # (error or None, count)
        self._committed: asyncio.Future = loop.create_future()
        self._handed = False

    def __repr__(self) -> str:
        return f"<PgMessage id={self.id!r} attempt={self.attempt}>"


class PgQueue(DeliveryQueue):
    """Rows taken from the queue tables as an async iterator."""

    FAMILIES = (
        ("gwcore_pg_consumer_delivered_total", "Rows taken from the queue tables and handed to handlers.", "delivered"),
        ("gwcore_pg_consumer_acked_total", "Rows whose delete committed after their handler returned.", "acked"),
        ("gwcore_pg_consumer_poisoned_total", "Rows moved to the error table after the last attempt.", "poisoned"),
    )
    _log = log

    def __init__(self, mode: "PgSelected", max_attempts: int) -> None:
        super().__init__(max_attempts)
        self._mode = mode
        self.store = mode.store
        self._items: asyncio.Queue[PgMessage | None] = asyncio.Queue()
        self._attempts: dict[int, int] = {}  # seq -> attempts that failed here (a rollback keeps the seq)
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    def consume(self, table: str, consumers: int) -> None:
        """Take rows from *table* with *consumers* connections at once."""
        for _ in range(consumers):
            self._tasks.append(asyncio.ensure_future(self._consumer(table)))

    async def _consumer(self, table: str) -> None:
        s = self._mode.settings
        conn: Any = None
        pause = _POLL_MIN
        while not self._closed:
            try:
                if conn is None:
                    conn = await db.connect(s.pg_dsn, f"gwcore {s.endpoint} {self._mode.instance} consumer",
                                            idle_in_transaction=_HANDLER_LIMIT)
                if await self._take(conn, table):
                    pause = _POLL_MIN
                    continue
            except asyncio.CancelledError:
                raise
            except db.DB_ERRORS as exc:
                log.info("consumer of %s: %s; connecting again", table, exc)
                if conn is not None:
                    conn.terminate()
                conn = None
                pause = 1.0
            await asyncio.sleep(pause)
            pause = min(pause * 2, _POLL_MAX)
        if conn is not None:
            conn.terminate()

    async def _take(self, conn: Any, table: str) -> bool:
        """One row, handled within one transaction; False when the table is empty."""
        msg: PgMessage | None = None
        try:
            async with conn.transaction():
                row = await conn.fetchrow(RECEIVE.format(table=table))
                if row is None:
                    return False
                msg = PgMessage(self, row, self._attempts.get(row["seq"], 0) + 1)
                if not await self._taken(msg):
                    msg._handed = True
                    self._items.put_nowait(msg)
                    error, count = await msg._outcome
                    await self._settle(conn, msg, error, count)
        except _Retry:
            pass
        except BaseException as exc:
            if msg is not None and not msg._committed.done():
                msg._committed.set_exception(db.unavailable(exc))
                msg._committed.exception()
            raise
        else:
            self._attempts.pop(msg.seq, None)
            if not msg._committed.done():
                msg._committed.set_result(None)
        return True

    async def _settle(self, conn: Any, msg: PgMessage, error: BaseException | None, count: bool) -> None:
        if error is None:
            self.acked += count
            return
        reason = self._failed(msg, error)
        if reason is None:
            log.warning("message %s: attempt %d failed (%r); it stays in the table", msg.id, msg.attempt, error)
            self._attempts[msg.seq] = msg.attempt
            msg._committed.set_result(None)
            raise _Retry
        await conn.execute(insert_row(self._mode.names.error),
                           *queue_row(msg.id, self._failure_headers(msg, error), msg.body, msg.expiry_ms))

    def _failure_headers(self, msg: PgMessage, error: BaseException) -> dict[str, str]:
        """The headers the transport's recoverability puts on a message it moves to the error queue."""
        now = datetime.datetime.now(datetime.timezone.utc)
        return {**msg.headers,
                "NServiceBus.FailedQ": self._mode.settings.endpoint,
                "NServiceBus.ExceptionInfo.ExceptionType": type(error).__qualname__,
                "NServiceBus.ExceptionInfo.Message": str(error),
                "NServiceBus.ProcessingEndpoint": self._mode.settings.endpoint,
                "NServiceBus.TimeOfFailure": now.strftime("%Y-%m-%d %H:%M:%S:%f Z")}

    def close(self) -> None:
        self._closed = True
        self._items.put_nowait(None)

    async def stop(self) -> None:
        self.close()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            await cancel_and_wait(task)

    def __aiter__(self) -> AsyncIterator[PgMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[PgMessage]:
        while True:
            msg = await self._items.get()
            if msg is None:
                self._items.put_nowait(None)  # every iterator ends
                return
            self.delivered += 1
            yield msg

    async def _ack(self, msg: PgMessage, count: bool = True) -> None:
        if not msg._outcome.done():
            msg._outcome.set_result((None, count))
        if msg._handed:
            await msg._committed  # acknowledged = its delete committed

    def _release(self, msg: PgMessage, error: BaseException | None) -> None:
        if not msg._outcome.done():
            msg._outcome.set_result((error or Exception("released"), True))
