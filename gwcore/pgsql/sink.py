"""The leader's ingest sink on PostgreSQL: accepted submits go into the endpoint's queue table and
the dedup table in one transaction, many at once (group commit).

Every submit that waits when a commit ends goes into the next one (at most
``GWCORE_COMMIT_MAX_BATCH``; the listeners answer 503 beyond ``GWCORE_COMMIT_MAX_PENDING``
waiting). One statement per destination table does it all: the dedup rows are inserted with
``ON CONFLICT DO NOTHING`` and return the ids that are new, and only those ids' rows go into the
queue table, in the order they came. A submit is answered 200 once its transaction has committed
(``synchronous_commit=on``), a duplicate 200 with nothing stored. The commit runs on the
election's connection, so only the lock holder writes; if the connection fails the batch is
answered 503 (database unavailable) and nothing of it was acknowledged: a retry finds it stored
or not, and the dedup row decides.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable

from .. import metrics
from .._core import core
from ..errors import DatabaseUnavailableError
from ..ingest import Done, IngestSink
from ..selectedbase import cancel_and_wait
from ..databus import PartJob
from . import db, parts

if TYPE_CHECKING:
    from .mode import PgSelected

__all__ = ("Sink", "queue_row", "INSERT_UNIQUE")

log = logging.getLogger("gwcore.selected")

# $1 endpoint, $2 dedup TTL (s), $3 ids, $4 uuids, $5 expires, $6 headers, $7 bodies
INSERT_UNIQUE = """
WITH fresh AS (
    INSERT INTO {dedup} (endpoint, id, expires_at)
    SELECT $1, m.id, now() + make_interval(secs => $2) FROM unnest($3::text[]) AS m(id)
    ON CONFLICT DO NOTHING
    RETURNING id
), stored AS (
    INSERT INTO {queue} (id, expires, headers, body)
    SELECT m.uid, m.expires, m.headers, m.body
    FROM unnest($3::text[], $4::uuid[], $5::timestamp[], $6::text[], $7::bytea[])
        WITH ORDINALITY AS m(id, uid, expires, headers, body, ord)
    JOIN fresh ON fresh.id = m.id
    ORDER BY m.ord
    ON CONFLICT (id) DO NOTHING
)
SELECT id FROM fresh
"""
_ID_NAMESPACE = uuid.UUID("5b0c9a62-93a4-4f0e-9a43-6777636f7265")


def row_uuid(msg_id: str) -> uuid.UUID:
    """The queue row's ``Id``: the message id when it is a UUID (as NServiceBus's are), else a
    UUID derived from it (the ``NServiceBus.MessageId`` header keeps the id as sent)."""
    try:
        return uuid.UUID(msg_id)
    except ValueError:
        return uuid.uuid5(_ID_NAMESPACE, msg_id)


def queue_row(msg_id: str, headers: dict[str, str], body: bytes, expiry_ms: int) -> tuple:
    """``(uuid, expires, headers JSON, body)`` of a message in the transport's layout."""
    h = dict(headers)
    h.setdefault("NServiceBus.MessageId", msg_id)
    expires = (datetime.datetime.fromtimestamp(expiry_ms / 1000, datetime.timezone.utc).replace(tzinfo=None)
               if expiry_ms else None)
    return row_uuid(msg_id), expires, json.dumps(h, ensure_ascii=False), body


class Sink(IngestSink):
    """What the listeners hand submits to on the leader (:class:`gwcore.ingest.IngestSink`)."""

    def __init__(self, mode: "PgSelected") -> None:
        self._mode = mode
        self.store = mode.store
        self._writer = mode.writer
        s = mode.settings
        self._max_batch = s.commit_max_batch
        self._ttl = float(s.dedup_ttl)
        self._waiting: list[tuple[Any, Done]] = []
        self._in_flight = 0
        self._work = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.committed = 0  # new messages committed
        self.duplicates = 0
        self.batches = 0
        self.failed = 0  # submits answered 503: the database failed under them
        self.commit_seconds = metrics.Buckets()

    # -- the ingest sink (gwcore/ingest.py) ------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._waiting) + self._in_flight

    def ingest_then(self, envelope: Any, done: Done) -> None:
        if "\x00" in envelope.id:
            # a text column cannot hold it; refused here rather than failing the whole batch
            done(True, core.Rejection(400, "Bad Request: NServiceBus.Id contains a NUL character"))
            return
        if not self._mode.election.leading:
            done(False, self._not_leading())
            return
        self._waiting.append((envelope, done))
        self._work.set()

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Writer jobs run in this instance's local store; a databus part
        (:class:`gwcore.databus.PartJob`) is indexed there and then recorded in the database on
        the leader's connection (gwcore/pgsql/parts.py) before it is answered.

        :raises DatabaseUnavailableError: the part could not be recorded (503; sent again)."""
        value = await self._writer.call(fn)
        if isinstance(fn, PartJob):
            election = self._mode.election
            try:
                async with election.lock:
                    if not election.leading or election.conn is None:
                        raise self._not_leading()
                    await parts.record_part(election.conn, self._mode.names, fn)
            except db.DB_ERRORS as exc:
                election.connection_failed(exc)
                raise db.unavailable(exc) from None
        return value

    def blob_expiry_ms(self, expiry_ms: int, accepted_ms: int) -> int:
        return self._writer.blob_expiry_ms(expiry_ms, accepted_ms)

    def doom(self, name: str) -> None:
        self._writer.doom(name)

    # -- group commit --------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    def _not_leading(self) -> DatabaseUnavailableError:
        election = self._mode.election
        if not election.connected:
            return db.unavailable(election.last_error)
        return DatabaseUnavailableError("not the leader any more; retry (the load balancer finds the new one)")

    async def _loop(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            while self._waiting:
                batch = self._waiting[:self._max_batch]
                del self._waiting[:self._max_batch]
                self._in_flight = len(batch)
                try:
                    await self._commit(batch)
                finally:
                    self._in_flight = 0

    async def _commit(self, batch: list[tuple[Any, Done]]) -> None:
        election = self._mode.election
        started = time.perf_counter()
        try:
            async with election.lock:
                if not election.leading or election.conn is None:
                    raise self._not_leading()
                outcomes = await self._insert(election.conn, [env for env, _done in batch])
        except DatabaseUnavailableError as exc:
            self._fail(batch, exc)
            return
        except db.DB_ERRORS as exc:
            self._fail(batch, db.unavailable(exc))
            election.connection_failed(exc)
            return
        except Exception as exc:  # a bug: this batch fails loudly (502), the sink goes on
            log.exception("group commit: unexpected error")
            self._fail(batch, exc)
            return
        self.commit_seconds.observe(time.perf_counter() - started)
        self.batches += 1
        for (_env, done), outcome in zip(batch, outcomes):
            if outcome is True:
                self.committed += 1
            elif outcome is False:
                self.duplicates += 1
            done(True, outcome)

    async def _insert(self, conn: Any, envelopes: list[Any]) -> list[Any]:
        """One group commit; each submit's outcome: True new, False a duplicate, a Rejection."""
        names = self._mode.names
        # one row per id: a second submit of an id in the same batch gets the first one's outcome
        first: dict[str, int] = {}
        for i, env in enumerate(envelopes):
            first.setdefault(env.id, i)
        uniques = sorted(first.values())
        claims = [i for i in uniques if envelopes[i].databus]
        fresh: set[str] = set()

        async def one(table: str, indexes: list[int]) -> None:
            ids, uids, expires, headers, bodies = [], [], [], [], []
            for i in indexes:
                env = envelopes[i]
                uid, exp, h, body = queue_row(env.id, env.headers, env.body, env.expiry_ms)
                ids.append(env.id)
                uids.append(uid)
                expires.append(exp)
                headers.append(h)
                bodies.append(body)
            rows = await conn.fetch(INSERT_UNIQUE.format(dedup=names.dedup, queue=table),
                                    self._mode.settings.endpoint, self._ttl, ids, uids, expires, headers, bodies)
            fresh.update(r[0] for r in rows)

        async def all_of_it() -> dict[int, Any]:
            rejected = await parts.resolve(conn, names, envelopes, claims) if claims else {}
            groups: dict[str, list[int]] = {}
            for i in uniques:
                if i not in rejected:
                    groups.setdefault(self._mode.route(envelopes[i].headers), []).append(i)
            for table, indexes in groups.items():
                await one(table, indexes)
            return rejected

        if claims or len({self._mode.route(envelopes[i].headers) for i in uniques}) > 1:
            async with conn.transaction():
                rejected = await all_of_it()
        else:
            rejected = await all_of_it()  # one statement: its own transaction
        outcomes: list[Any] = []
        for i, env in enumerate(envelopes):
            j = first[env.id]
            outcomes.append(rejected[j] if j in rejected else env.id in fresh and i == j)
        return outcomes

    def _fail(self, batch: list[tuple[Any, Done]], exc: BaseException) -> None:
        self.failed += len(batch)
        for _env, done in batch:
            done(False, exc)

    def fail_waiting(self, exc: BaseException) -> None:
        """The leadership ended: the submits not yet in a commit are answered 503."""
        waiting, self._waiting = self._waiting, []
        self._fail(waiting, exc)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self.fail_waiting(DatabaseUnavailableError("the gateway is stopping"))
