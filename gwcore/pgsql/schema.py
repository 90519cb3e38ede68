"""The tables of selected mode on PostgreSQL, created on first start.

Every table lives in ``GWCORE_PG_SCHEMA``:

- ``"<endpoint>"``: the endpoint's queue, in the NServiceBus PostgreSQL transport's layout
  (``Id uuid`` primary key, ``Expires timestamp`` in UTC or NULL, ``Headers text`` holding a
  JSON object of string headers, ``Body bytea``, ``Seq`` giving the FIFO order), so an
  NServiceBus endpoint on that transport consumes what gwcore receives. ``Seq`` is a
  ``bigserial`` here (the transport's own DDL says ``serial``): the transport only orders by it.
- ``"error"``: the transport's default error queue, same layout; a message whose handler kept
  failing goes there with the transport's failure headers.
- ``"<endpoint>.gwcore.<instance>"``: each instance's reply table (callbacks), same layout.
- ``gwcore_instances``: (endpoint, instance) -> ``last_seen``: every instance's heartbeat; the
  leader routes replies to the reply tables of the instances listed here, and drops the reply
  table (and the row) of one not seen for ``GWCORE_PG_INSTANCE_EXPIRY`` (since version 2).
- ``gwcore_dedup``: (endpoint, message id) -> expiry: the dedup record that commits with the
  queue row.
- ``gwcore_databus_parts``: (endpoint, part key) -> the blob file in the shared blob dir of a
  databus part waiting for its submit.
- ``gwcore_schema``: the version of gwcore's own tables.

All of it is created in one transaction under a transaction-level advisory lock, so instances
starting at the same moment do not race on ``CREATE ... IF NOT EXISTS`` (which is not safe
against a concurrent twin on its own: both may try to insert the same catalog row).

Versions: ``_MIGRATIONS[n]`` brings the tables from version *n* to *n* + 1, and
:data:`SCHEMA_VERSION` is their count; a first start runs them all, a database of an older
version the ones it lacks (in the same transaction that bumps ``gwcore_schema``), and a database
of a newer version than this code knows is refused. Version 1: the queue tables' layout,
``gwcore_dedup``, ``gwcore_databus_parts``. Version 2: ``gwcore_instances``, with a row (seen now)
for each reply table already there, so that those of instances gone before the upgrade expire too.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable

from ..errors import ConfigurationError

__all__ = ("Names", "SCHEMA_VERSION", "LOCK_CLASS", "ensure", "ensure_table", "insert_row", "quote")

#: The first key of every advisory lock gwcore takes (its second key says what is locked).
LOCK_CLASS = 0x67776300 - (1 << 31)  # "gwc\0", as a signed int4
_SCHEMA_LOCK = 0
_IDENTIFIER_MAX = 63  # NAMEDATALEN - 1: PostgreSQL truncates longer names silently


def quote(name: str) -> str:
    """*name* as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    """*text* as an SQL string literal (``standard_conforming_strings`` is on since PostgreSQL 9.1)."""
    return "'" + text.replace("'", "''") + "'"


def _signed32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


class Names:
    """The tables, advisory lock keys and notification channel of one endpoint in one schema."""

    def __init__(self, schema: str, endpoint: str, instance: str) -> None:
        self.schema = schema
        self.endpoint = endpoint
        self.instance_prefix = f"{endpoint}.gwcore."
        self.instance_table = self.instance_prefix + instance
        for what, name in (("GWCORE_ENDPOINT", endpoint), ("GWCORE_ENDPOINT and GWCORE_INSTANCE", self.instance_table)):
            if len(name.encode()) > _IDENTIFIER_MAX:
                raise ConfigurationError(f"{what}: the table {name!r} is longer than PostgreSQL's "
                                         f"{_IDENTIFIER_MAX} bytes; choose shorter names")
        s = quote(schema)
        self.queue = f"{s}.{quote(endpoint)}"
        self.error = f"{s}.{quote('error')}"
        self.instance = f"{s}.{quote(self.instance_table)}"
        self.dedup = f"{s}.gwcore_dedup"
        self.parts = f"{s}.gwcore_databus_parts"
        self.version = f"{s}.gwcore_schema"
        self.instances = f"{s}.gwcore_instances"
        key = _signed32(zlib.crc32(f"{schema}\0{endpoint}".encode()))
        #: pg_try_advisory_lock(LOCK_CLASS, election_key): the endpoint's leadership
        self.election_key = key if key != _SCHEMA_LOCK else 1
        #: LISTEN/NOTIFY channel of the endpoint's instances (handover, release, leader)
        self.channel = f"gwcore_{zlib.crc32(f'{schema}{endpoint}'.encode()):08x}"

    def table(self, address: str) -> str:
        """The qualified table of a queue address (an instance's reply table)."""
        return f"{quote(self.schema)}.{quote(address)}"


def _queue_ddl(table: str) -> str:
    return (f"CREATE TABLE IF NOT EXISTS {table} (id uuid NOT NULL PRIMARY KEY, expires timestamp, "
            "headers text NOT NULL, body bytea, seq bigserial NOT NULL UNIQUE)")


def insert_row(table: str) -> str:
    """One message into a queue table: ``$1`` id, ``$2`` expires, ``$3`` headers, ``$4`` body."""
    return f"INSERT INTO {table} (id, expires, headers, body) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING"


def _version_1(names: Names) -> list[str]:
    return [
        _queue_ddl(names.error),
        f"CREATE TABLE IF NOT EXISTS {names.dedup} (endpoint text NOT NULL, id text NOT NULL, "
        "expires_at timestamptz NOT NULL, PRIMARY KEY (endpoint, id))",
        f"CREATE INDEX IF NOT EXISTS gwcore_dedup_expires ON {names.dedup} (expires_at)",
        f"CREATE TABLE IF NOT EXISTS {names.parts} (endpoint text NOT NULL, part_key bytea NOT NULL, "
        "blob text NOT NULL, size bigint NOT NULL, md5 text NOT NULL, sha256 text NOT NULL, "
        "expires_at timestamptz NOT NULL, PRIMARY KEY (endpoint, part_key))",
    ]


def _version_2(names: Names) -> list[str]:
    # the reply tables made before: each "<E>.gwcore.<instance>" beside an endpoint's queue table
    # "<E>" gets a row, seen now (length('.gwcore.') is 8)
    return [
        f"CREATE TABLE IF NOT EXISTS {names.instances} (endpoint text NOT NULL, instance text NOT NULL, "
        "last_seen timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (endpoint, instance))",
        f"INSERT INTO {names.instances} (endpoint, instance) "
        "SELECT e.tablename, substr(r.tablename, length(e.tablename) + 9) FROM pg_tables r "
        "JOIN pg_tables e ON e.schemaname = r.schemaname AND starts_with(r.tablename, e.tablename || '.gwcore.') "
        f"WHERE r.schemaname = {_literal(names.schema)} ON CONFLICT DO NOTHING",
    ]


#: ``_MIGRATIONS[n](names)``: the statements that bring the tables from version *n* to *n* + 1.
_MIGRATIONS: tuple[Callable[[Names], list[str]], ...] = (_version_1, _version_2)
#: The version of gwcore's tables this code creates and reads.
SCHEMA_VERSION = len(_MIGRATIONS)


async def _locked(conn: Any, statements: list[str]) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_CLASS, _SCHEMA_LOCK)
    for statement in statements:
        await conn.execute(statement)


async def ensure(conn: Any, names: Names) -> int:
    """Create what is missing and bring older tables to :data:`SCHEMA_VERSION`, in one
    transaction; returns the schema version found before (0: none, a first start).

    :raises ConfigurationError: the tables were made by a newer gwcore.
    """
    async with conn.transaction():
        await _locked(conn, [f"CREATE SCHEMA IF NOT EXISTS {quote(names.schema)}",
                             f"CREATE TABLE IF NOT EXISTS {names.version} (component text PRIMARY KEY, "
                             "version integer NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())"])
        found = await conn.fetchval(f"SELECT version FROM {names.version} WHERE component = 'gwcore'") or 0
        if found > SCHEMA_VERSION:
            raise ConfigurationError(f"GWCORE_PG_SCHEMA={names.schema}: its tables are of version {found}, made by a "
                                     f"newer gwcore; this one knows version {SCHEMA_VERSION}")
        for migrate in _MIGRATIONS[found:]:
            for statement in migrate(names):
                await conn.execute(statement)
        if found < SCHEMA_VERSION:
            await conn.execute(f"INSERT INTO {names.version} (component, version) VALUES ('gwcore', $1) "
                               "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version, updated_at = now()",
                               SCHEMA_VERSION)
        await conn.execute(_queue_ddl(names.queue))
        await conn.execute(_queue_ddl(names.instance))
    return found


async def ensure_table(conn: Any, table: str) -> None:
    """A queue table in the transport's layout (one more endpoint's, for tests and tools)."""
    async with conn.transaction():
        await _locked(conn, [_queue_ddl(table)])
