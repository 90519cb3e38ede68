"""The endpoint's instances on PostgreSQL: every instance's heartbeat row in ``gwcore_instances``,
the reply tables replies are routed to, and the leader's expiry of the reply tables of instances
that are gone.

Every instance upserts its row (``last_seen = now()``, the database's clock, so the hosts' clocks
do not matter) when its election connection comes up and every few seconds after; the same
statement returns the endpoint's other instances, whose reply tables (those that are there) are
where replies go (:meth:`Instances.route`). A row the upsert inserted (a first start, or an instance whose row had
expired) is announced on the endpoint's channel (``instance <name>``), so the leader routes
replies there at once; a reply table found missing (dropped while its instance was away) is
created again in the same transaction.

The leader drops the reply table of an instance not seen for ``GWCORE_PG_INSTANCE_EXPIRY``, and
its row, in one transaction whose ``DELETE`` checks that the row is still stale: an instance that
comes back at that moment either renews its row first, and keeps its table, or finds the row gone
and makes both again. The rows still in a dropped table are replies nobody consumed: they are
counted and logged as a warning. A leader whose connection is new waits ``_SETTLE`` before it
expires anyone: after a database outage longer than the expiry, the live instances renew their
rows first.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..config import PG_HEARTBEAT
from . import db, schema

if TYPE_CHECKING:
    from .mode import PgSelected

__all__ = ("Instances", "HEARTBEAT")

log = logging.getLogger("gwcore.selected")

# $1 endpoint, $2 this instance, $3 its reply table (qualified), $4 GWCORE_PG_INSTANCE_EXPIRY (s),
# $5 the schema, $6 the reply tables' prefix. xmax = 0 on the returned row: the upsert inserted it
# (an update sets xmax to its transaction). Replies go to the others' tables that are there (one
# dropped by hand would fail the group commit that routes a reply to it).
HEARTBEAT = """
WITH beat AS (
    INSERT INTO {instances} (endpoint, instance, last_seen) VALUES ($1, $2, now())
    ON CONFLICT (endpoint, instance) DO UPDATE SET last_seen = now()
    RETURNING xmax = 0 AS inserted
), others AS (
    SELECT instance, last_seen < now() - make_interval(secs => $4) AS stale,
           to_regclass(format('%I.%I', $5::text, $6::text || instance)) IS NOT NULL AS present
    FROM {instances} WHERE endpoint = $1 AND instance <> $2
)
SELECT (SELECT inserted FROM beat) AS inserted, to_regclass($3) IS NULL AS missing,
       array(SELECT instance FROM others WHERE present) AS routed,
       array(SELECT instance FROM others WHERE stale) AS stale
"""
# $1 endpoint, $2 instance, $3 GWCORE_PG_INSTANCE_EXPIRY (s): the row, if it is still stale
_FORGET = """
DELETE FROM {instances} WHERE endpoint = $1 AND instance = $2 AND last_seen < now() - make_interval(secs => $3)
RETURNING extract(epoch FROM now() - last_seen)::float8
"""
# a reply table still locked by a consumer (its instance is not gone after all) waits for the next round
_DROP_LOCK_TIMEOUT = "1s"
# The leader expires nobody until its own connection has been up this long: after an outage of the
# database longer than the expiry every row is stale, and the live instances need a moment to
# connect again and renew theirs (each does at once).
_SETTLE = 6 * PG_HEARTBEAT


class Instances:
    """This instance's heartbeat, and what it learns of the others (held by :class:`PgSelected`)."""

    def __init__(self, mode: "PgSelected") -> None:
        self._mode = mode
        names = mode.names
        #: the reply tables replies are routed to (by ``RouteTo``): this instance's and the others'
        self.tables = {names.instance_table}
        self._heard: set[str] = set()  # announced while a heartbeat was on its way
        self._stale: list[str] = []  # the instances the last heartbeat found not seen for too long
        self._conn: Any = None  # the election connection the heartbeats went on
        self._since = 0.0  # since when (loop time)
        #: set once this instance's row is in: replies to it are routed to its table
        self.announced = asyncio.Event()
        self.expired = 0  # instances whose reply tables were dropped
        self.replies_dropped = 0  # the rows those tables held
        self._heartbeat = HEARTBEAT.format(instances=names.instances)
        self._forget = _FORGET.format(instances=names.instances)

    def route(self, to: str | None) -> str | None:
        """The qualified reply table of the instance whose table is named *to*, if it is one."""
        return self._mode.names.table(to) if to is not None and to in self.tables else None

    def heard(self, instance: str) -> None:
        """Another instance announced itself (and its reply table)."""
        table = self._mode.names.instance_prefix + instance
        self.tables.add(table)
        self._heard.add(table)

    async def beat(self) -> None:
        """This instance's heartbeat, on the election's connection (nothing while it is down)."""
        mode = self._mode
        election, names, s = mode.election, mode.names, mode.settings
        self._heard = set()
        async with election.lock:
            conn = election.conn
            if conn is None:
                return
            async with conn.transaction():
                row = await conn.fetchrow(self._heartbeat, s.endpoint, mode.instance, names.instance,
                                          s.pg_instance_expiry, names.schema, names.instance_prefix)
                if row["missing"]:
                    await schema.ensure_table(conn, names.instance)
        if conn is not self._conn:
            self._conn, self._since = conn, asyncio.get_running_loop().time()
        if row["missing"]:
            log.warning("instance %s: its reply table %s was not there (%s): created again", mode.instance,
                        names.instance_table, "not seen for longer than GWCORE_PG_INSTANCE_EXPIRY, it had expired"
                        if row["inserted"] else "dropped by something other than gwcore")
        prefix = names.instance_prefix
        self.tables = {names.instance_table, *self._heard, *(prefix + i for i in row["routed"])}
        self._stale = list(row["stale"])
        if row["inserted"]:
            await election.notify("instance")
        self.announced.set()

    async def expire(self) -> None:
        """The leader's: drop the reply tables of the instances the last heartbeat found stale
        (on a connection of its own: the group commit does not wait for it)."""
        if not self._stale or asyncio.get_running_loop().time() - self._since < _SETTLE:
            return
        mode = self._mode
        s = mode.settings
        conn = await db.connect(s.pg_dsn, f"gwcore {s.endpoint} {mode.instance} expiry", idle_in_transaction=30)
        try:
            for instance in self._stale:
                try:
                    await self._drop(conn, instance)
                except db.DB_ERRORS as exc:
                    if conn.is_closed():
                        raise
                    log.info("instance %s: dropping its reply table failed (%s); trying again later", instance, exc)
        finally:
            await conn.close()
        self._stale = []

    async def _drop(self, conn: Any, instance: str) -> None:
        mode = self._mode
        names, expiry = mode.names, mode.settings.pg_instance_expiry
        address = names.instance_prefix + instance
        table = names.table(address)
        # the group commit routes nothing more there, and none in flight writes there now
        async with mode.election.lock:
            routed = address in self.tables
            self.tables.discard(address)
        dropped = False
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{_DROP_LOCK_TIMEOUT}'")
                unseen = await conn.fetchval(self._forget, names.endpoint, instance, expiry)
                if unseen is None:
                    return  # it came back
                rows = 0
                if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
                    await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                    rows = await conn.fetchval(f"SELECT count(*) FROM {table}")
                    await conn.execute(f"DROP TABLE {table}")
            dropped = True
        finally:
            if routed and not dropped:
                self.tables.add(address)
        self.expired += 1
        self.replies_dropped += rows
        if rows:
            log.warning("instance %s: not seen for %.0f s (GWCORE_PG_INSTANCE_EXPIRY=%gs): its reply table %s dropped "
                        "with %d replies nobody consumed", instance, unseen, expiry, address, rows)
        else:
            log.info("instance %s: not seen for %.0f s (GWCORE_PG_INSTANCE_EXPIRY=%gs): its empty reply table %s "
                     "dropped", instance, unseen, expiry, address)
