"""Selected mode's glue on PostgreSQL: :class:`PgSelected` holds the parts (the election and its
connection, the sink, the consumers, the handover), creates the tables on start, starts and
stops the parts with the gateway, and tells the gateway whether its listeners take traffic. It
offers the gateway what the RabbitMQ form's ``Selected`` does (``sink``, ``handover.hold``,
``messages``, ``accepting``, ``role``, ``step_down``, ``wait_connected``, ``reply_queue``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..errors import ConfigurationError
from ..holding import STANDBY
from ..metrics import Families, counter, gauge, histogram
from ..selectedbase import SelectedBase, cancel_and_wait
from . import db, schema
from .election import Election
from .handover import Handover
from .queue import PgQueue
from .schema import Names
from .sink import Sink

if TYPE_CHECKING:
    from ..gateway import Gateway

__all__ = ("PgSelected",)

log = logging.getLogger("gwcore.selected")

_CLEANUP_EVERY = 5.0  # seconds between slices of expired dedup rows (the leader's)
_START_TIMEOUT = 30.0  # the tables must be there (the database reachable) within this at start


class PgSelected(SelectedBase):
    """The selected-instance mode of one gateway on PostgreSQL."""

    def __init__(self, gateway: "Gateway") -> None:
        super().__init__(gateway)
        s = self.settings
        self.names = Names(s.pg_schema, s.endpoint, self.instance)
        #: the address replies to this instance's requests carry (``NServiceBus.ReplyToAddress``)
        self.reply_queue = self.names.instance_table
        self.messages = PgQueue(self, s.handler_max_attempts)
        self.election = Election(self)
        #: the listeners' ingest sink in this mode
        self.sink = Sink(self)
        self.handover = Handover(self)
        self._instances = {self.names.instance_table}  # reply tables of the endpoint's instances (routing)
        self._cleanup: asyncio.Task | None = None
        self.dedup_expired = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._create_tables()
        self.sink.start()
        self.election.start()
        self.messages.consume(self.names.instance, 1)
        if self.consume:
            self.messages.consume(self.names.queue, max(1, self.settings.handler_concurrency))
        self._cleanup = asyncio.ensure_future(self._clean())
        self.update_listeners()
        log.info("selected mode on PostgreSQL: instance %s, database %s, schema %s, queue table %s",
                 self.instance, db.describe(self.settings.pg_dsn), self.names.schema, self.names.queue)

    async def _create_tables(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_TIMEOUT
        while True:
            try:
                conn = await db.connect(s.pg_dsn, f"gwcore {s.endpoint} {self.instance} schema", idle_in_transaction=30)
                try:
                    found = await schema.ensure(conn, self.names)
                finally:
                    await conn.close()
                break
            except db.DB_ERRORS as exc:
                if loop.time() > deadline:
                    raise ConfigurationError(f"GWCORE_PG_DSN={db.describe(s.pg_dsn)}: cannot create the tables: "
                                             f"{exc}") from None
                log.warning("the database is not reachable yet (%s); trying again", exc)
                await asyncio.sleep(1.0)
        if not found:
            log.info("PostgreSQL: created gwcore's tables (version %d) in schema %s", schema.SCHEMA_VERSION,
                     self.names.schema)

    async def stop(self) -> None:
        self.stopping = True
        self.handover.release_held()
        await cancel_and_wait(self._cleanup)
        await self.messages.stop()
        await self.sink.stop()
        await self.election.stop()

    async def step_down(self, timeout: float) -> None:
        """Planned handover (:meth:`gwcore.pgsql.handover.Handover.step_down`)."""
        await self.handover.step_down(timeout)

    # -- states seen by the gateway ------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return self.election.leading and not self.handover.holding and not self.stopping

    @property
    def leading(self) -> bool:
        return self.election.leading

    @property
    def role(self) -> str:
        return "leader" if self.election.leading else "standby"

    def update_listeners(self) -> None:
        accepting = self.accepting
        election = self.election
        reason = STANDBY if election.connected else f"Service Unavailable: {db.unavailable(election.last_error)}"
        self.gateway.set_accepting(accepting, reason)
        if accepting and self.handover.has_held:
            self.handover.release_held()

    def elected(self) -> None:
        if self.handover.holding:
            self.handover.release_held()
        self.update_listeners()
        asyncio.ensure_future(self._refresh_instances())

    def connection_lost(self) -> None:
        """The election's connection is gone (and the leadership with it)."""
        self.sink.fail_waiting(db.unavailable(self.election.last_error))
        self.update_listeners()

    # -- the tables ----------------------------------------------------------------------------------

    def route(self, headers: dict[str, str]) -> str:
        """The table a message goes to: an instance's reply table for a reply addressed to it by
        ``RouteTo`` (protocol.md §4.4), else the endpoint's queue table."""
        to = headers.get("RouteTo") or headers.get("NServiceBus.Header.RouteTo")
        if to is not None and to in self._instances:
            return self.names.table(to)
        return self.names.queue

    def instance_seen(self, name: str) -> None:
        """Another instance is up, with its reply table."""
        self._instances.add(self.names.instance_prefix + name)

    async def _refresh_instances(self) -> None:
        election = self.election
        try:
            async with election.lock:
                if election.conn is None:
                    return
                rows = await election.conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = $1 AND starts_with(tablename, $2)",
                    self.names.schema, self.names.instance_prefix)
            self._instances |= {r[0] for r in rows}
        except db.DB_ERRORS as exc:
            log.info("reading the instances' reply tables failed: %s", exc)

    async def _clean(self) -> None:
        """The leader deletes expired dedup rows, a slice at a time, and learns new instances."""
        s = self.settings
        sql = (f"DELETE FROM {self.names.dedup} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {self.names.dedup} "
               "WHERE endpoint = $1 AND expires_at < now() LIMIT $2))")
        election = self.election
        while True:
            await asyncio.sleep(_CLEANUP_EVERY)
            if not election.leading:
                continue
            await self._refresh_instances()
            try:
                async with election.lock:
                    if election.conn is None or not election.leading:
                        continue
                    status = await election.conn.execute(sql, s.endpoint, s.dedup_cleanup_slice)
                self.dedup_expired += int(status.split()[-1])
            except db.DB_ERRORS as exc:
                log.info("dedup cleanup failed: %s", exc)

    async def wait_connected(self, timeout: float) -> None:
        """Replies come back through this instance's reply table, created at start: nothing to wait for."""

    def start_consuming(self) -> None:
        if self.consume:
            return
        self.consume = True
        self.messages.consume(self.names.queue, max(1, self.settings.handler_concurrency))

    # -- metrics -------------------------------------------------------------------------------------

    def metrics(self) -> Families:
        election, sink = self.election, self.sink
        return [
            gauge("gwcore_selected_leader", "1 while this instance is the elected gateway receiver.",
                  int(election.leading)),
            gauge("gwcore_selected_term", "Leadership terms this instance won.", election.elections_won),
            counter("gwcore_selected_fenced_total", "Times the leadership ended with the database connection.",
                    election.fenced),
            gauge("gwcore_pg_connected", "1 while the election's database connection is up.", int(election.connected)),
            counter("gwcore_pg_committed_total", "New messages committed to the queue tables.", sink.committed),
            counter("gwcore_pg_duplicates_total", "Submits the dedup table showed as accepted before.",
                    sink.duplicates),
            counter("gwcore_pg_commits_total", "Group-commit transactions.", sink.batches),
            counter("gwcore_pg_failed_total", "Submits answered 503 because the database failed under them.",
                    sink.failed),
            histogram("gwcore_pg_commit_seconds", "Time of one group-commit transaction.", sink.commit_seconds),
            counter("gwcore_pg_dedup_expired_total", "Expired dedup rows deleted.", self.dedup_expired),
            counter("gwcore_handover_forwarded_total", "Submits held during a handover and forwarded to the new leader.",
                    self.handover.forwarded),
        ]
