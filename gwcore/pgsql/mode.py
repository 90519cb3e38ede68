"""Selected mode's glue on PostgreSQL: :class:`PgSelected` holds the parts (the election and its
connection, the sink, the consumers, the handover, the instances), creates the tables on start
(and goes on trying in the background while the database is not reachable, the listeners
answering 503), starts and stops the parts with the gateway, runs the housekeeping (heartbeats,
expiry, dedup cleanup), and tells the gateway whether its listeners take traffic. It
offers the gateway what the RabbitMQ form's ``Selected`` does (``sink``, ``handover.hold``,
``messages``, ``accepting``, ``role``, ``step_down``, ``wait_connected``, ``reply_queue``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Awaitable

from ..config import PG_HEARTBEAT
from ..errors import ConfigurationError, InternalError
from ..holding import STANDBY
from ..metrics import Families, counter, gauge, histogram
from ..selectedbase import SelectedBase, cancel_and_wait
from . import db, schema
from .election import Election
from .handover import Handover
from .instances import Instances
from .queue import PgQueue
from .schema import Names
from .sink import Sink

if TYPE_CHECKING:
    from ..gateway import Gateway

__all__ = ("PgSelected",)

log = logging.getLogger("gwcore.selected")

# seconds between housekeeping rounds: every instance's heartbeat; the leader's expiry of gone
# instances and its slice of expired dedup rows
_HOUSEKEEPING_EVERY = PG_HEARTBEAT
_START_RETRY = 1.0  # seconds between tries to make the tables while the database is not reachable
_START_WARN_EVERY = 30.0  # seconds between the warnings that it still is not


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
        #: the endpoint's instances: heartbeats, where replies go, the expiry of the gone
        self.instances = Instances(self)
        self._housekeeping: asyncio.Task | None = None
        self._waiting: asyncio.Task | None = None  # making the tables while the database is not reachable
        self._running = False  # the tables are there and the parts started
        self._warned = 0.0  # when the database was last said not to be reachable
        self.dedup_expired = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Make the tables and start the parts; if the database is not reachable, go on trying in
        the background (the listeners answer 503 meanwhile).

        :raises ConfigurationError: the database refused (authentication, no such database, a
            missing privilege, tables of a newer gwcore).
        """
        since = asyncio.get_running_loop().time()
        try:
            await self._create_tables()
        except db.DB_ERRORS as exc:
            self._not_reachable(exc, 1, since)
            self._waiting = asyncio.ensure_future(self._create_tables_later(since))
        else:
            self._run()
        self.update_listeners()
        log.info("selected mode on PostgreSQL: instance %s, database %s, schema %s, queue table %s",
                 self.instance, db.describe(self.settings.pg_dsn), self.names.schema, self.names.queue)

    def _run(self) -> None:
        self._running = True
        self.election.last_error = "not connected yet"
        self.sink.start()
        self.election.start()
        self.messages.consume(self.names.instance, 1)
        if self.consume:
            self.messages.consume(self.names.queue, max(1, self.settings.handler_concurrency))
        self._housekeeping = asyncio.ensure_future(self._keep_house())

    async def _create_tables(self) -> None:
        """:raises ConfigurationError: the database refused for good.
        :raises db.DB_ERRORS: it was not reachable (:func:`db.transient`)."""
        s = self.settings
        try:
            conn = await db.connect(s.pg_dsn, f"gwcore {s.endpoint} {self.instance} schema", idle_in_transaction=30)
            try:
                found = await schema.ensure(conn, self.names)
            finally:
                await conn.close()
        except db.DB_ERRORS as exc:
            if db.transient(exc):
                raise
            raise ConfigurationError(f"GWCORE_PG_DSN={db.describe(s.pg_dsn)}: cannot create the tables: "
                                     f"{exc}") from None
        if found < schema.SCHEMA_VERSION:
            log.info("PostgreSQL: %s gwcore's tables (version %d) in schema %s",
                     f"upgraded from version {found}" if found else "created", schema.SCHEMA_VERSION, self.names.schema)

    async def _create_tables_later(self, since: float) -> None:
        loop = asyncio.get_running_loop()
        attempts = 1
        while True:
            await asyncio.sleep(_START_RETRY)
            attempts += 1
            try:
                await self._create_tables()
            except db.DB_ERRORS as exc:
                self._not_reachable(exc, attempts, since)
                continue
            except ConfigurationError as exc:
                log.error("%s: stopping", exc)
                self.gateway.fail(exc)
                return
            except Exception as exc:  # a bug: the process stops rather than answering 503 for ever
                log.exception("PostgreSQL: making the tables failed: stopping")
                self.gateway.fail(InternalError(f"making the tables failed: {exc!r}"))
                return
            break
        log.info("PostgreSQL: %s reachable after %d attempts (%.0f s)", db.describe(self.settings.pg_dsn),
                 attempts, loop.time() - since)
        self._run()
        self.update_listeners()

    def _not_reachable(self, exc: BaseException, attempts: int, since: float) -> None:
        """A try to make the tables at start found no database: the listeners say so; a warning
        at once, then at most every ``_START_WARN_EVERY`` seconds."""
        # What a caller is told says no more than that (the listeners may be public: no address,
        # no driver text); the log names the database and the failure.
        self.election.last_error = "the database is not reachable"
        self.update_listeners()
        now = asyncio.get_running_loop().time()
        if attempts == 1 or now - self._warned >= _START_WARN_EVERY:
            self._warned = now
            log.warning("PostgreSQL: %s is not reachable: %s (attempt %d, %.0f s since start); up and trying "
                        "again every %g s, submits and /readyz answer 503 until it is",
                        db.describe(self.settings.pg_dsn), str(exc) or type(exc).__name__, attempts,
                        now - since, _START_RETRY)

    async def stop(self) -> None:
        self.stopping = True
        self.handover.release_held()
        await cancel_and_wait(self._waiting)
        await cancel_and_wait(self._housekeeping)
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
        asyncio.ensure_future(self._quietly(self.instances.beat(), "the heartbeat"))  # where replies go now

    def connection_lost(self) -> None:
        """The election's connection is gone (and the leadership with it)."""
        self.sink.fail_waiting(db.unavailable(self.election.last_error))
        self.update_listeners()

    # -- the tables ----------------------------------------------------------------------------------

    def route(self, headers: dict[str, str]) -> str:
        """The table a message goes to: an instance's reply table for a reply addressed to it by
        ``RouteTo`` (protocol.md §4.4), else the endpoint's queue table."""
        to = headers.get("RouteTo") or headers.get("NServiceBus.Header.RouteTo")
        return self.instances.route(to) or self.names.queue

    async def _keep_house(self) -> None:
        """Every instance's heartbeat; the leader's expiry of the instances that are gone and its
        slice of expired dedup rows."""
        s = self.settings
        sql = (f"DELETE FROM {self.names.dedup} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {self.names.dedup} "
               "WHERE endpoint = $1 AND expires_at < now() LIMIT $2))")
        election = self.election

        async def clean_dedup() -> None:
            async with election.lock:
                if election.conn is None or not election.leading:
                    return
                status = await election.conn.execute(sql, s.endpoint, s.dedup_cleanup_slice)
            self.dedup_expired += int(status.split()[-1])

        while True:
            await asyncio.sleep(_HOUSEKEEPING_EVERY)
            await self._quietly(self.instances.beat(), "the heartbeat")
            if election.leading:
                await self._quietly(self.instances.expire(), "expiring gone instances")
                await self._quietly(clean_dedup(), "dedup cleanup")

    @staticmethod
    async def _quietly(job: Awaitable[None], what: str) -> None:
        """*job*; a database failure is logged (the election sees to the connection)."""
        try:
            await job
        except db.DB_ERRORS as exc:
            log.info("%s failed: %s", what, exc)

    async def wait_connected(self, timeout: float) -> None:
        """Until this instance's heartbeat row is in: the leader routes replies to its reply table.

        :raises DatabaseUnavailableError: not within *timeout* seconds.
        """
        try:
            await asyncio.wait_for(self.instances.announced.wait(), timeout)
        except asyncio.TimeoutError:
            raise db.unavailable(self.election.last_error) from None

    def start_consuming(self) -> None:
        if self.consume:
            return
        self.consume = True
        if self._running:  # else the consumers start with the rest, once the tables are there
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
            counter("gwcore_pg_instances_expired_total",
                    "Instances not seen for GWCORE_PG_INSTANCE_EXPIRY whose reply tables were dropped.",
                    self.instances.expired),
            counter("gwcore_pg_replies_dropped_total",
                    "Rows (replies nobody consumed) the reply tables of expired instances held when dropped.",
                    self.instances.replies_dropped),
            counter("gwcore_handover_forwarded_total", "Submits held during a handover and forwarded to the new leader.",
                    self.handover.forwarded),
        ]
