"""Selected mode on PostgreSQL, against the real server: the tables (created once, versioned, in
the NServiceBus transport's layout, no race between instances starting together, a version 1
database brought to version 2), the group commit's statement (new and duplicate ids in one
batch), the heartbeat's, and which failures to reach the database are worth waiting out."""

from __future__ import annotations

import asyncio
import datetime
import json
import urllib.parse
import uuid

import pytest
from pg import PG_DSN, pg_schema, query, queue_rows  # noqa: F401 (pg_schema: a fixture)
from procs import free_port

asyncpg = pytest.importorskip("asyncpg")

from gwcore.errors import ConfigurationError  # noqa: E402
from gwcore.pgsql import db, schema  # noqa: E402
from gwcore.pgsql.instances import HEARTBEAT  # noqa: E402
from gwcore.pgsql.schema import Names  # noqa: E402
from gwcore.pgsql.sink import INSERT_UNIQUE, queue_row  # noqa: E402


def _ensure_all(names_list: list[Names]) -> list[int]:
    async def one(names: Names) -> int:
        conn = await asyncpg.connect(PG_DSN)
        try:
            return await schema.ensure(conn, names)
        finally:
            await conn.close()

    async def main() -> list[int]:
        return list(await asyncio.gather(*(one(n) for n in names_list)))

    return asyncio.run(main())


def _columns(schema_name: str, table: str) -> list[tuple[str, str, str]]:
    return [tuple(r) for r in query(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position", schema_name, table)]


def test_the_tables_are_created_once_and_versioned(pg_schema):
    names = Names(pg_schema, "Sales", "i0")
    assert _ensure_all([names]) == [0]  # a first start
    assert _ensure_all([names]) == [schema.SCHEMA_VERSION]  # found, nothing made again
    assert [tuple(r) for r in query(f'SELECT component, version FROM "{pg_schema}".gwcore_schema')] == [
        ("gwcore", schema.SCHEMA_VERSION)]
    # the NServiceBus PostgreSQL transport's queue layout, for the endpoint, its error queue and the
    # instance's reply table
    layout = [("id", "uuid", "NO"), ("expires", "timestamp without time zone", "YES"), ("headers", "text", "NO"),
              ("body", "bytea", "YES"), ("seq", "bigint", "NO")]
    for table in ("Sales", "error", "Sales.gwcore.i0"):
        assert _columns(pg_schema, table) == layout, table
    assert [c[0] for c in _columns(pg_schema, "gwcore_dedup")] == ["endpoint", "id", "expires_at"]
    assert _columns(pg_schema, "gwcore_instances") == [("endpoint", "text", "NO"), ("instance", "text", "NO"),
                                                       ("last_seen", "timestamp with time zone", "NO")]


def test_instances_starting_together_do_not_race(pg_schema):
    # eight first starts at once, of two endpoints: one makes gwcore's tables, none fails
    found = _ensure_all([Names(pg_schema, f"E{i % 2}", f"i{i}") for i in range(8)])
    assert sorted(found) == [0] + [schema.SCHEMA_VERSION] * 7
    tables = {r[0] for r in query("SELECT tablename FROM pg_tables WHERE schemaname = $1", pg_schema)}
    assert {"E0", "E1", "error", "gwcore_dedup", "gwcore_databus_parts", "gwcore_schema", "gwcore_instances"} | {
        f"E{i % 2}.gwcore.i{i}" for i in range(8)} == tables


def _instance_rows(schema_name: str) -> list[tuple]:
    return [tuple(r) for r in query("SELECT endpoint, instance, now() - last_seen "
                                    f'FROM "{schema_name}".gwcore_instances ORDER BY endpoint, instance')]


def test_a_version_1_database_is_brought_to_version_2(pg_schema, monkeypatch):
    # the tables as a gwcore of version 1 made them: the same ensure(), with the first migration only
    with monkeypatch.context() as m:
        m.setattr(schema, "_MIGRATIONS", schema._MIGRATIONS[:1])
        m.setattr(schema, "SCHEMA_VERSION", 1)
        v1 = [Names(pg_schema, "Sales", "i0"), Names(pg_schema, "Sales", "i1"), Names(pg_schema, "Billing", "b0")]
        assert sorted(_ensure_all(v1)) == [0, 1, 1]
    assert [tuple(r) for r in query(f'SELECT version FROM "{pg_schema}".gwcore_schema')] == [(1,)]
    assert query("SELECT to_regclass($1)", f'"{pg_schema}".gwcore_instances') == [(None,)]
    query(f'INSERT INTO "{pg_schema}"."Sales.gwcore.i0" (id, headers, body) VALUES (gen_random_uuid(), \'{{}}\', '
          "'a reply')")
    # this gwcore: version 2 added, the version bumped, nothing of version 1 touched
    assert _ensure_all([Names(pg_schema, "Sales", "i2")]) == [1]
    assert [tuple(r) for r in query(f'SELECT version FROM "{pg_schema}".gwcore_schema')] == [(2,)]
    rows = _instance_rows(pg_schema)
    # the reply tables already there got a heartbeat row, seen now: they expire if nobody renews it;
    # i2's own row comes with its first heartbeat
    assert [r[:2] for r in rows] == [("Billing", "b0"), ("Sales", "i0"), ("Sales", "i1")]
    assert all(r[2] < datetime.timedelta(minutes=1) for r in rows)
    assert [bytes(r["body"]) for r in queue_rows(pg_schema, "Sales.gwcore.i0")] == [b"a reply"]
    assert _ensure_all([Names(pg_schema, "Sales", "i0")]) == [2]
    assert [r[:2] for r in _instance_rows(pg_schema)] == [("Billing", "b0"), ("Sales", "i0"), ("Sales", "i1")]


def test_the_heartbeat_tells_new_from_known_and_the_stale(pg_schema):
    names = Names(pg_schema, "Sales", "i0")
    _ensure_all([names, Names(pg_schema, "Sales", "i1"), Names(pg_schema, "Sales", "i2"),
                 Names(pg_schema, "Billing", "b0")])
    sql = HEARTBEAT.format(instances=names.instances)

    def beat(instance: str) -> tuple:
        own = Names(pg_schema, "Sales", instance)
        return tuple(query(sql, "Sales", instance, own.instance, 3600.0, pg_schema, own.instance_prefix)[0])

    assert beat("i0") == (True, False, [], [])  # a first heartbeat: new, its table there
    assert beat("i0") == (False, False, [], [])
    assert beat("i1") == (True, False, ["i0"], [])
    beat("i2")
    query(f"UPDATE {names.instances} SET last_seen = now() - interval '2 hours' WHERE instance = 'i2'")
    query('INSERT INTO "{}".gwcore_instances (endpoint, instance) VALUES (\'Billing\', \'b0\')'.format(pg_schema))
    inserted, missing, routed, stale = beat("i0")
    # replies go to every other instance's table (the stale one's until it is dropped); another
    # endpoint's instances are not this one's
    assert (inserted, missing, sorted(routed), stale) == (False, False, ["i1", "i2"], ["i2"])
    query(f'DROP TABLE "{pg_schema}"."Sales.gwcore.i1"')
    assert beat("i0") == (False, False, ["i2"], ["i2"])  # no reply goes to a table that is not there
    query(f'DROP TABLE "{pg_schema}"."Sales.gwcore.i0"')
    assert beat("i0")[:2] == (False, True)  # its reply table is missing: made again by the caller


def test_only_a_database_out_of_reach_is_waited_for(pg_schema):
    """Not reachable (no server on the port, starting up, full): worth waiting for. Refused (no such
    database, no such role, no privilege): a configuration error, start-up fails."""
    asyncpg_exc = asyncpg.exceptions

    def failure(**change: str) -> BaseException:
        parts = urllib.parse.urlsplit(PG_DSN)
        netloc = f"{change.get('user', parts.username)}@{parts.hostname}:{change.get('port', parts.port)}"
        dsn = urllib.parse.urlunsplit(parts._replace(netloc=netloc, path=change.get("path", parts.path)))

        async def main() -> BaseException:
            try:
                conn = await db.connect(dsn, "gwcore test", idle_in_transaction=5)
            except db.DB_ERRORS as exc:
                return exc
            await conn.close()
            raise AssertionError(f"{dsn} connected")

        return asyncio.run(main())

    assert db.transient(failure(port=str(free_port())))
    assert not db.transient(failure(path="/gwcore_no_such_database"))
    assert not db.transient(failure(user="gwcore_no_such_role"))
    for exc_class in (asyncpg_exc.CannotConnectNowError, asyncpg_exc.TooManyConnectionsError,
                      asyncpg_exc.AdminShutdownError, asyncpg_exc.ConnectionFailureError,
                      asyncpg_exc.ReadOnlySQLTransactionError, asyncpg_exc.ConnectionDoesNotExistError):
        assert db.transient(exc_class("x")), exc_class
    for exc_class in (asyncpg_exc.InvalidPasswordError, asyncpg_exc.InsufficientPrivilegeError,
                      asyncpg_exc.InvalidCatalogNameError, asyncpg_exc.ClientConfigurationError):
        assert not db.transient(exc_class("x")), exc_class


def test_tables_of_a_newer_gwcore_are_refused(pg_schema):
    names = Names(pg_schema, "Sales", "i0")
    _ensure_all([names])
    query(f"UPDATE \"{pg_schema}\".gwcore_schema SET version = {schema.SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigurationError, match="newer gwcore"):
        _ensure_all([names])


def test_names_too_long_for_postgresql_are_refused():
    with pytest.raises(ConfigurationError, match="GWCORE_ENDPOINT and GWCORE_INSTANCE"):
        Names("public", "E" * 40, "i" * 20)


def test_one_statement_stores_the_new_ids_once_and_reports_them(pg_schema):
    names = Names(pg_schema, "Sales", "i0")
    _ensure_all([names])
    ids = [str(uuid.uuid4()) for _ in range(3)] + ["not-a-uuid\\7"]

    async def insert(batch: list[str]) -> set[str]:
        rows = [queue_row(i, {"NServiceBus.EnclosedMessageTypes": "Shared.X"}, f"body {i}".encode(), 0) for i in batch]
        conn = await asyncpg.connect(PG_DSN)
        try:
            got = await conn.fetch(INSERT_UNIQUE.format(dedup=names.dedup, queue=names.queue), "Sales", 60.0, batch,
                                   [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                                   [r[3] for r in rows])
        finally:
            await conn.close()
        return {r[0] for r in got}

    assert asyncio.run(insert(ids[:2])) == set(ids[:2])
    # a batch of one seen before and two new ones: only the new ones are stored, in order
    assert asyncio.run(insert([ids[1], ids[2], ids[3]])) == {ids[2], ids[3]}
    rows = queue_rows(pg_schema, "Sales")
    assert [json.loads(r["headers"])["NServiceBus.MessageId"] for r in rows] == ids
    assert [bytes(r["body"]) for r in rows] == [f"body {i}".encode() for i in ids]
    assert str(rows[0]["id"]) == ids[0]  # a UUID id is the row's Id; another gets one derived from it
    assert rows[3]["id"] == uuid.uuid5(uuid.UUID("5b0c9a62-93a4-4f0e-9a43-6777636f7265"), ids[3])
    assert [tuple(r) for r in query(f'SELECT count(*) FROM "{pg_schema}".gwcore_dedup')] == [(4,)]
