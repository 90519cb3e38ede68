"""Who is the gateway receiver on PostgreSQL: leadership is holding the session-level advisory lock
``(LOCK_CLASS, Names.election_key)`` on this instance's own connection.

A standby tries ``pg_try_advisory_lock`` every ``GWCORE_ELECTION_INTERVAL`` (and at once when the
leader announces it released it). The server drops the lock with the session: at once when the
leader's process dies (its socket closes), within its TCP keepalive time when the leader's host
vanishes. The leader checks its connection on the same interval, each check bounded by
``_CHECK_TIMEOUT``; a failed check ends the leadership (it stops answering 200) and closes the
connection before anything else is written on it. The leader's submits commit on this same
connection, so a leader that lost the lock cannot commit anything more.

Instances tell each other about a handover on the endpoint's LISTEN/NOTIFY channel: ``handover
<instance>`` (hold submits until the election is decided), ``release <instance>`` (try now),
``leader <instance> <url>`` (where the held submits go), ``instance <instance>`` (its heartbeat
row is new, its reply table is there: gwcore/pgsql/instances.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from ..selectedbase import cancel_and_wait
from . import db
from .schema import LOCK_CLASS

if TYPE_CHECKING:
    from .mode import PgSelected

__all__ = ("Election",)

log = logging.getLogger("gwcore.selected")

_CHECK_TIMEOUT = 3.0  # a leader whose connection does not answer within this steps down
_RETRY_PAUSE = 0.5  # between tries to reach a database that was not there
# the leader's transactions are short: one held open longer than this is a stuck leader
_LEADER_IDLE_IN_TRANSACTION = 10.0


class Election:
    """This instance's side of the election, and the connection that holds the lock (the leader
    commits its submits on it: :attr:`lock` serialises its users)."""

    def __init__(self, mode: "PgSelected") -> None:
        self._mode = mode
        self.leading = False
        self.retiring = False  # a stopping instance takes no leadership any more
        self.term = 0
        self.elections_won = 0
        self.elections_lost = 0  # tries that found the lock held
        self.fenced = 0  # leaderships that ended with the connection
        self.conn: Any = None
        self.lock = asyncio.Lock()
        self.connected = False
        self.last_error = "not connected yet"
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def wake(self) -> None:
        """Try for the leadership now rather than at the next interval."""
        self._wake.set()

    async def _run(self) -> None:
        mode = self._mode
        while not mode.stopping:
            try:
                if self.conn is None:
                    await self._connect()
                if self.leading:
                    await asyncio.wait_for(self._check(), _CHECK_TIMEOUT)
                elif not self.retiring:
                    await self._try()
                await self._pause(mode.settings.election_interval)
            except asyncio.CancelledError:
                raise
            except db.DB_ERRORS as exc:
                self.connection_failed(exc)
                await self._pause(_RETRY_PAUSE)
            except Exception:  # a bug: stay alive and loud
                log.exception("election: unexpected error")
                self.connection_failed(RuntimeError("election failed"))
                await self._pause(_RETRY_PAUSE)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()

    async def _connect(self) -> None:
        mode = self._mode
        conn = await db.connect(mode.settings.pg_dsn, f"gwcore {mode.settings.endpoint} {mode.instance}",
                                idle_in_transaction=_LEADER_IDLE_IN_TRANSACTION)
        await conn.add_listener(mode.names.channel, self._notified)
        self.conn = conn
        self.connected = True
        mode.update_listeners()
        await mode.instances.beat()  # announced: the leader routes replies to its reply table

    async def _try(self) -> None:
        names = self._mode.names
        async with self.lock:
            got = await self.conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", LOCK_CLASS, names.election_key)
        if not got:
            self.elections_lost += 1
            return
        if self.retiring or self._mode.stopping:
            async with self.lock:
                await self.conn.fetchval("SELECT pg_advisory_unlock($1, $2)", LOCK_CLASS, names.election_key)
            return
        self.term += 1
        self.elections_won += 1
        self.leading = True
        won = time.monotonic()
        await self.notify("leader", self._mode.own_url())
        self._mode.elected()
        log.info("role: leader (term %d, advisory lock held; %.0f ms to announce)", self.term,
                 (time.monotonic() - won) * 1000)

    async def _check(self) -> None:
        async with self.lock:
            if self.conn is not None:
                await self.conn.fetchval("SELECT 1")

    async def notify(self, kind: str, extra: str = "") -> None:
        """Tell the endpoint's other instances (``kind instance extra``)."""
        payload = f"{kind} {self._mode.instance} {extra}".rstrip()
        async with self.lock:
            await self.conn.execute("SELECT pg_notify($1, $2)", self._mode.names.channel, payload)

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        kind, _, rest = payload.partition(" ")
        sender, _, url = rest.partition(" ")
        mode = self._mode
        if sender == mode.instance:
            return
        if kind == "handover":
            mode.handover.announced_by(sender)
        elif kind == "release":
            self.wake()
        elif kind == "leader":
            mode.handover.leader_announced(sender, url)
        elif kind == "instance":
            mode.instances.heard(sender)

    async def resign(self) -> None:
        """End the leadership (a handover): unlock, then tell the standbys to try."""
        names = self._mode.names
        self.leading = False
        async with self.lock:
            await self.conn.fetchval("SELECT pg_advisory_unlock($1, $2)", LOCK_CLASS, names.election_key)
        await self.notify("release")

    def connection_failed(self, exc: BaseException) -> None:
        """The connection (or a statement on it) failed: the leadership ends with it (fenced),
        the connection is closed, the next round connects again."""
        self.last_error = str(exc) or type(exc).__name__
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.terminate()
        was_connected, self.connected = self.connected, False
        if self.leading:
            self.leading = False
            self.fenced += 1
            log.warning("role: leader -> standby: the database connection failed (%s): fenced", self.last_error)
        elif was_connected:
            log.warning("election: the database connection failed (%s)", self.last_error)
        self._mode.connection_lost()

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        conn, self.conn = self.conn, None
        self.leading = False
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except BaseException:  # noqa: BLE001 - closing anyway
                conn.terminate()
