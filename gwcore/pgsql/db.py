"""Connections to the database and what their failures look like.

Every connection gwcore opens sets the session so that a lost peer or a stuck statement ends in a
bounded time: the server's TCP keepalives close the session of an instance that vanished (and
with it the leader's advisory lock), ``statement_timeout`` bounds a statement,
``idle_in_transaction_session_timeout`` a transaction left open, and ``synchronous_commit=on``
makes a COMMIT wait for the WAL flush (a 200 after it means durable).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

from ..config import redacted_url
from ..errors import DatabaseUnavailableError

__all__ = ("DB_ERRORS", "CONNECT_TIMEOUT", "connect", "transient", "unavailable", "describe")

#: What a database operation raises when the database (or the connection to it) is not there.
DB_ERRORS: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError, asyncpg.PostgresError,
                                              asyncpg.InterfaceError)
CONNECT_TIMEOUT = 5.0
# SQLSTATE classes of errors that pass by themselves: 08 connection exception, 40 transaction
# rollback, 53 insufficient resources (too many connections, disk full), 57 operator intervention
# (shutting down, starting up, statement timeout), 58 system error (I/O); and 25006, read-only
# (a standby not yet promoted)
_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58")
_TRANSIENT_STATES = ("25006",)
_STATEMENT_TIMEOUT_MS = 15_000
_KEEPALIVE = {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2", "tcp_keepalives_count": "3"}


async def connect(dsn: str, name: str, *, idle_in_transaction: float) -> Any:
    """A connection named *name* (``application_name``, seen in ``pg_stat_activity``); a
    transaction left idle longer than *idle_in_transaction* seconds is ended by the server."""
    return await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT, server_settings={
        "application_name": name[:63],
        "synchronous_commit": "on",
        "statement_timeout": str(_STATEMENT_TIMEOUT_MS),
        "idle_in_transaction_session_timeout": str(int(idle_in_transaction * 1000)),
        **_KEEPALIVE,
    })


def transient(exc: BaseException) -> bool:
    """Whether *exc* (one of :data:`DB_ERRORS`) may pass by itself: the server is down, starting,
    full or cut off, rather than refusing what it was asked (authentication, a database or
    schema that does not exist, a missing privilege), which no retry changes."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES
    if isinstance(exc, (asyncpg.ClientConfigurationError, ssl.SSLCertVerificationError)):
        return False  # the DSN's options, the server's certificate
    return isinstance(exc, DB_ERRORS)


def unavailable(exc: BaseException | str) -> DatabaseUnavailableError:
    """The error a submit is refused with (503) while the database is out of reach."""
    text = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    return DatabaseUnavailableError(f"database unavailable ({text})")


def describe(dsn: str) -> str:
    return redacted_url(dsn)
