"""Selected mode on PostgreSQL, against the real server: the tables (created once, versioned, in
the NServiceBus transport's layout, no race between instances starting together) and the group
commit's statement (new and duplicate ids in one batch)."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from pg import PG_DSN, pg_schema, query, queue_rows  # noqa: F401 (pg_schema: a fixture)

asyncpg = pytest.importorskip("asyncpg")

from gwcore.errors import ConfigurationError  # noqa: E402
from gwcore.pgsql import schema  # noqa: E402
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
    assert _ensure_all([names]) == [1]  # found, nothing made again
    assert [tuple(r) for r in query(f'SELECT component, version FROM "{pg_schema}".gwcore_schema')] == [
        ("gwcore", schema.SCHEMA_VERSION)]
    # the NServiceBus PostgreSQL transport's queue layout, for the endpoint, its error queue and the
    # instance's reply table
    layout = [("id", "uuid", "NO"), ("expires", "timestamp without time zone", "YES"), ("headers", "text", "NO"),
              ("body", "bytea", "YES"), ("seq", "bigint", "NO")]
    for table in ("Sales", "error", "Sales.gwcore.i0"):
        assert _columns(pg_schema, table) == layout, table
    assert [c[0] for c in _columns(pg_schema, "gwcore_dedup")] == ["endpoint", "id", "expires_at"]


def test_instances_starting_together_do_not_race(pg_schema):
    # eight first starts at once, of two endpoints: one makes gwcore's tables, none fails
    found = _ensure_all([Names(pg_schema, f"E{i % 2}", f"i{i}") for i in range(8)])
    assert sorted(found) == [0] + [1] * 7
    tables = {r[0] for r in query("SELECT tablename FROM pg_tables WHERE schemaname = $1", pg_schema)}
    assert {"E0", "E1", "error", "gwcore_dedup", "gwcore_databus_parts", "gwcore_schema"} | {f"E{i % 2}.gwcore.i{i}" for i in range(8)} == tables


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
