"""Selected-instance mode on PostgreSQL with real processes, a real PostgreSQL and a real nginx
(docs/deployment.md, "Selected-instance mode on PostgreSQL"): submits in the queue table once, read
as the NServiceBus transport reads them; handlers with retries and the error table; never two
leaders under SIGKILLs; failover and planned handover under load from a gwcore sender; the
database restarted under load, and not there yet at start (a server of the test's own); the reply
tables of instances that are gone dropped, those of live ones kept."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import random
import time
import uuid

import pytest
from httpclient import Client, get, nsb_request
from nginx import Nginx
from pg import PG_DSN, PgServer, pg_schema, query, queue_rows, require_pg  # noqa: F401 (pg_schema: a fixture)
from procs import ServerProcess, free_port, gwcore_cli
from replies import each_gets_its_reply, replying_site
from test_ha import metric, readyz
from test_selected_ha import STANDBY, alive, elections_under_kills, leaders, load_through_nginx, report
from test_sites import wait_for

pytest.importorskip("asyncpg")

ENDPOINT = "Sales"


def pg_instance(tmp_path, schema: str, name: str, dsn: str = PG_DSN, **env: str) -> ServerProcess:
    env = {"GWCORE_MODE": "selected", "GWCORE_TRANSPORT": "postgresql", "GWCORE_PG_DSN": dsn,
           "GWCORE_PG_SCHEMA": schema, "GWCORE_INSTANCE": name, "GWCORE_ELECTION_INTERVAL": "20ms",
           "GWCORE_SHUTDOWN_TIMEOUT": "15s", **env}
    proc = ServerProcess(str(tmp_path / name / "store"), free_port(), GWCORE_ENDPOINT=ENDPOINT, **env)
    proc.log = str(tmp_path / f"{name}.log")
    return proc


def post(port: int, msg_id: str, body: bytes = b'{"Hello":"World"}', extra=None) -> tuple[int, str]:
    async def main():
        async with Client("127.0.0.1", port) as c:
            return await c.request(nsb_request(msg_id, body, path=f"/{ENDPOINT}/", extra=extra))

    r = asyncio.run(main())
    return r.status, r.reason


def transport_receive(schema: str, table: str, dsn: str = PG_DSN) -> list[tuple[str, bool, dict, bytes]]:
    """Every row, taken one at a time as the NServiceBus PostgreSQL transport receives (its
    documented columns: the lowest ``Seq`` not locked by another receiver, deleted as it is read,
    ``Expires`` in UTC): ``(Id, expired, headers, body)``."""
    t = f'"{schema}"."{table}"'
    sql = (f"DELETE FROM {t} m WHERE m.id = (SELECT id FROM {t} ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) "
           "RETURNING m.id, (m.expires IS NOT NULL AND m.expires <= now() AT TIME ZONE 'UTC'), m.headers, m.body")
    out = []
    while True:
        rows = query(sql, dsn=dsn)
        if not rows:
            return out
        r = rows[0]
        out.append((str(r[0]), r[1], json.loads(r[2]), bytes(r[3])))


def message_ids(schema: str, dsn: str = PG_DSN) -> list[str]:
    return [json.loads(r["headers"])["NServiceBus.MessageId"] for r in queue_rows(schema, ENDPOINT, dsn)]


def test_submits_are_stored_once_and_read_as_the_transport_reads_them(tmp_path, pg_schema):
    a, b = pg_instance(tmp_path, pg_schema, "i0"), pg_instance(tmp_path, pg_schema, "i1")
    a.start()
    try:
        wait_for(lambda: readyz(a.port)[0] == 200, 20, "i0 to lead")
        b.start()
        wait_for(lambda: readyz(b.port) == (503, STANDBY), 20, "i1 to stand by")
        ids = [str(uuid.uuid4()) for _ in range(5)]
        for i in ids:
            assert post(a.port, i, f'{{"n":"{i}"}}'.encode()) == (200, "OK")
        assert post(a.port, ids[0]) == (200, "OK")  # a retry: answered, not stored again
        assert post(b.port, str(uuid.uuid4())) == (503, STANDBY)
        # a claim check whose part never came: NServiceBus's 412, nothing stored
        assert post(a.port, str(uuid.uuid4()), extra=[("NServiceBus.Header.NServiceBus.DataBus.Big", "k1")]) == (
            412, "Expected 1 claimcheck properties. None were received. Please resubmit.")
        assert float(metric(a.port, "gwcore_pg_duplicates_total").split()[-1]) == 1
        got = transport_receive(pg_schema, ENDPOINT)
        assert [g[0] for g in got] == ids  # Id = the message id (a UUID), in the order accepted
        assert [g[1] for g in got] == [False] * 5  # no TimeToBeReceived: never expired
        assert [g[2]["NServiceBus.MessageId"] for g in got] == ids
        assert all(g[2]["NServiceBus.MessageIntent"] == "Send" for g in got)
        assert [g[3] for g in got] == [f'{{"n":"{i}"}}'.encode() for i in ids]
        # the dedup rows stay after the queue rows are consumed: a late retry is still a duplicate
        assert post(a.port, ids[1]) == (200, "OK")
        assert queue_rows(pg_schema, ENDPOINT) == []
    finally:
        for n in (a, b):
            if alive(n):
                assert n.terminate() == 0


def test_handlers_consume_on_every_instance_and_the_poisoned_go_to_the_error_table(tmp_path, pg_schema):
    log = tmp_path / "handled.log"
    env = {"GWCORE_HANDLER": "handlers:fail_on_poison", "GWCORE_HANDLER_MAX_ATTEMPTS": "3",
           "GWCORE_HANDLER_CONCURRENCY": "2", "HANDLER_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))])}
    nodes = [pg_instance(tmp_path, pg_schema, f"i{i}", **env) for i in range(2)]
    for n in nodes:
        n.start()
    try:
        wait_for(lambda: len(leaders(nodes)) == 1, 20, "a leader")
        leader = leaders(nodes)[0]
        ids = [str(uuid.uuid4()) for _ in range(40)]
        poison = str(uuid.uuid4())
        for i in ids[:20] + [poison] + ids[20:]:
            assert post(leader.port, i, b'"poison"' if i == poison else b"{}") == (200, "OK")
        wait_for(lambda: log.exists() and len(log.read_text().split()) >= 40
                 and queue_rows(pg_schema, "error"), 30, "every message handled")
        handled = log.read_text().split()
        assert sorted(handled) == sorted(ids)  # each exactly once, by one instance or the other
        errors = transport_receive(pg_schema, "error")
        assert [e[2]["NServiceBus.MessageId"] for e in errors] == [poison]
        headers = errors[0][2]
        assert headers["NServiceBus.FailedQ"] == ENDPOINT
        assert headers["NServiceBus.ExceptionInfo.ExceptionType"] == "ValueError"
        assert poison in headers["NServiceBus.ExceptionInfo.Message"]
        assert queue_rows(pg_schema, ENDPOINT) == []
        delivered = [int(float(metric(n.port, "gwcore_pg_consumer_delivered_total").split()[-1])) for n in nodes]
        # three attempts at the poisoned one on the instance that moved it, and up to two more on
        # the other: attempts are counted per instance (docs/deployment.md, PostgreSQL)
        assert 40 + 3 <= sum(delivered) <= 40 + 3 + 2
    finally:
        for n in nodes:
            if alive(n):
                assert n.terminate() == 0


def lock_holders(schema: str) -> list[str]:
    """The server's view: the application names of the sessions holding an endpoint's election lock."""
    from gwcore.pgsql.schema import LOCK_CLASS, Names

    key = Names(schema, ENDPOINT, "x").election_key
    rows = query("SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                 "WHERE l.locktype = 'advisory' AND l.granted AND l.classid::bigint = $1 AND l.objid::bigint = $2",
                 LOCK_CLASS & 0xFFFFFFFF, key & 0xFFFFFFFF)
    return [r[0].rsplit(" ", 1)[-1] for r in rows]


def test_never_two_leaders_over_random_kills_and_restarts(tmp_path, pg_schema):
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    nodes = [pg_instance(tmp_path, pg_schema, f"i{i}") for i in range(3)]
    for n in nodes:
        n.start()

    def server_view(step: int, leader: str | None) -> None:
        holders = lock_holders(pg_schema)
        assert len(holders) <= 1, f"step {step}: the lock held by {holders}"
        if leader is not None and step % 5 == 4:
            # settled: the one holder of the lock is the instance that says it leads
            wait_for(lambda: lock_holders(pg_schema) == [leader], 5, "the lock holder")

    try:
        elections_under_kills(nodes, 100, random.Random(seed), server_view, limit=30)
    finally:
        for n in nodes:
            if alive(n):
                assert n.terminate() == 0


def run_under_load(tmp_path, schema: str, disrupt, n: int, times: int, instances: int = 3,
                   dsn: str = PG_DSN, paused=None, **env: str):
    """*instances* behind nginx, a gwcore sender pushing *n* messages, ``disrupt(nodes, i)`` *times*
    times mid-stream, after ``paused(nodes)`` with the sender held if given
    (test_selected_ha.load_through_nginx). Returns (ids, the message ids in the queue table, nginx
    answers)."""
    env.setdefault("GWCORE_MAX_BATCH_MESSAGES", "4")
    nodes = [pg_instance(tmp_path, schema, f"i{i}", dsn=dsn, **env) for i in range(instances)]
    ids, answers = load_through_nginx(tmp_path, nodes, disrupt, n, times, f"/{ENDPOINT}/", paused=paused)
    return ids, message_ids(schema, dsn), answers


def check_exactly_once(ids: list[str], stored: list[str]) -> None:
    copies = collections.Counter(stored)
    assert set(copies) == set(ids), f"{len(set(ids) - set(copies))} missing, {len(set(copies) - set(ids))} unknown"
    twice = [i for i, c in copies.items() if c > 1]
    assert twice == [], f"{len(twice)} ids in the table more than once"


def test_failover_under_load_stores_every_message_once(tmp_path, pg_schema):
    def kill_leader(nodes, i):
        victim = leaders(nodes)
        assert len(victim) == 1
        victim[0].kill()
        time.sleep(0.3)
        victim[0].start()

    ids, stored, answers = run_under_load(tmp_path, pg_schema, kill_leader, n=20_000, times=3)
    check_exactly_once(ids, stored)
    gaps = report("failover on PostgreSQL", answers)
    assert len(gaps) >= 3


def test_planned_handover_under_load_without_a_failed_request(tmp_path, pg_schema):
    def hand_over(nodes, i):
        leader = leaders(nodes)
        assert len(leader) == 1
        gwcore_cli("handover", "--wait", "30", data_dir=leader[0].data_dir)
        assert leader[0].proc.wait(10) == 0
        leader[0].start()

    ids, stored, answers = run_under_load(tmp_path, pg_schema, hand_over, n=20_000, times=3)
    check_exactly_once(ids, stored)
    gaps = report("handover on PostgreSQL", answers)
    failed = [status for _t, status, _n in answers if status != 200]
    assert failed == []
    assert len(gaps) >= 3


def test_database_restart_under_load_loses_nothing_acknowledged(tmp_path):
    require_pg()
    server = PgServer(free_port()).init().start()
    schema = "gwcore_restart"
    seen: list[tuple[int, str]] = []

    def stop(nodes):
        leader = leaders(nodes)[0]
        server.stop("fast")
        # the leader says why it refuses: the database, not a standby
        wait_for(lambda: readyz(leader.port)[0] == 503 and "database unavailable" in readyz(leader.port)[1],
                 10, "the leader to see the database gone")
        seen.append(readyz(leader.port))

    def back_after_a_second(nodes, i):
        try:
            time.sleep(1.0)
        finally:
            server.start()

    try:
        ids, stored, answers = run_under_load(tmp_path, schema, back_after_a_second, n=3000, times=1,
                                              instances=2, dsn=server.dsn, paused=stop)
        check_exactly_once(ids, stored)
    finally:
        server.remove()
    by_status = collections.Counter(status for _t, status, _n in answers)
    print(f"database restart: nginx answers {dict(sorted(by_status.items()))}; leader said {seen}")
    assert by_status[503] > 0, "no submit met the outage: it tests nothing"


def test_a_callback_is_answered_on_the_instance_that_asked(tmp_path, pg_schema, run):
    """SiteA: three instances on PostgreSQL behind nginx; SiteB: a standalone gateway whose handler
    replies. Each SiteA instance's request() gets its own reply, through its own reply table,
    whoever is the leader; nothing reaches the endpoint's queue table."""
    from gwcore import Gateway, Settings

    a_ports = [free_port() for _ in range(3)]
    proxy = Nginx(str(tmp_path / "nginx"), free_port(), a_ports, tries=0, repeat=2).start()
    a_url = f"http://127.0.0.1:{proxy.port}/{ENDPOINT}/"

    async def main():
        b, b_url = await replying_site(str(tmp_path / "b"))
        a = [await Gateway(Settings.from_env(
            {}, mode="selected", transport="postgresql", pg_dsn=PG_DSN, pg_schema=pg_schema, endpoint=ENDPOINT,
            instance=f"a{i}", election_interval=0.02, data_dir=str(tmp_path / f"a{i}"),
            receive_channels=f"http://127.0.0.1:{a_ports[i]}/{ENDPOINT}/", sites=f"SiteB={b_url}",
            reply_to_uri=a_url, retry_delays=(0.1,), retries=50)).start() for i in range(3)]
        assert [g.selected.reply_queue for g in a] == [f"{ENDPOINT}.gwcore.a{i}" for i in range(3)]
        await each_gets_its_reply(a, b)

    try:
        run(main())
    finally:
        proxy.stop()
    assert queue_rows(pg_schema, ENDPOINT) == []
    for i in range(3):
        assert queue_rows(pg_schema, f"{ENDPOINT}.gwcore.a{i}") == []  # each reply consumed where it was asked


def test_databus_parts_are_recorded_in_the_database_and_read_by_a_handler(tmp_path, pg_schema, run):
    """A gwcore sender's message with two databus properties to the leader; the blobs in the shared
    blob dir, the part records in the database until the submit takes them; a handler on either
    instance reads the blobs by the names in its headers."""
    from gwcore import Gateway, Settings

    blobs = str(tmp_path / "shared-blobs")
    big, small = os.urandom(1 << 20), b"a small property"
    read: list[tuple[str, bytes, bytes]] = []

    def instance_settings(i: int, port: int) -> Settings:
        return Settings.from_env({}, mode="selected", transport="postgresql", pg_dsn=PG_DSN, pg_schema=pg_schema,
                                 endpoint=ENDPOINT, instance=f"d{i}", election_interval=0.02,
                                 data_dir=str(tmp_path / f"d{i}"), blob_dir=blobs,
                                 receive_channels=f"http://127.0.0.1:{port}/{ENDPOINT}/")

    async def main():
        def handler_of(name: str):
            async def handle(message):
                read.append((name, message.databus["NServiceBus.DataBus.Big"].read(),
                             message.databus["NServiceBus.DataBus.Small"].read()))
            return handle

        ports = [free_port(), free_port()]
        leader = await Gateway(instance_settings(0, ports[0]), handler=handler_of("d0")).start()
        standby = await Gateway(instance_settings(1, ports[1]), handler=handler_of("d1")).start()
        sender = await Gateway(Settings.from_env({}, data_dir=str(tmp_path / "s"), endpoint="SiteA",
                                                 receive_channels=f"http://127.0.0.1:{free_port()}/SiteA/",
                                                 sites=f"B=http://127.0.0.1:{ports[0]}/{ENDPOINT}/",
                                                 retry_delays=(0.1,))).start()
        try:
            deadline = time.monotonic() + 10
            while not leader.ready:
                assert time.monotonic() < deadline, "d0 never led"
                await asyncio.sleep(0.02)
            await sender.send_to_sites(["B"], b"{}", databus={"Big": big, "Small": small})
            while not read:
                assert time.monotonic() < deadline + 20, "the message was never handled"
                await asyncio.sleep(0.05)
            assert sender.store.counts()["outgoing_errors"] == 0
        finally:
            for gw in (sender, standby, leader):
                await gw.stop()

    run(main())
    assert [(b, s) for _name, b, s in read] == [(big, small)]
    assert query(f'SELECT count(*) FROM "{pg_schema}".gwcore_databus_parts')[0][0] == 0  # taken by the submit


def healthz(port: int) -> int:
    return asyncio.run(get("127.0.0.1", port, "/healthz")).status


def test_instances_started_before_their_database_wait_for_it(tmp_path):
    """The database server is down when two instances start: both stay up (/healthz 200) and answer
    /readyz and submits 503 naming the database, with one warning at once (the next ones at most
    every 30 s). When the server comes up, the one whose database exists makes the tables and leads
    (a submit lands in the queue table); the one whose database does not exist stops with that
    error (status 2), as it would have at once had the server been up."""
    require_pg()
    server = PgServer(free_port()).init()
    schema = "gwcore_late"
    # trust authentication takes any password: it must show nowhere
    dsn = server.dsn.replace("postgres@", "postgres:s3cret@")
    missing = dsn.rsplit("/", 1)[0] + "/gwcore_no_such_database"
    a = pg_instance(tmp_path, schema, "i0", dsn=dsn)
    b = pg_instance(tmp_path, schema, "i1", dsn=missing)
    where = f"postgresql://postgres@127.0.0.1:{server.port}"
    try:
        a.start()
        b.start()
        time.sleep(2.5)  # a few tries each
        for n, database in ((a, f"{where}/postgres"), (b, f"{where}/gwcore_no_such_database")):
            assert alive(n)
            assert healthz(n.port) == 200
            status, reason = readyz(n.port)
            # a public listener tells that much and no more: no address, no driver text
            down = "Service Unavailable: database unavailable (the database is not reachable)"
            assert status == 503 and reason == down, reason
            status, reason = post(n.port, str(uuid.uuid4()))
            assert status == 503 and reason == down, reason
            log = open(n.log).read()
            warnings = [line for line in log.splitlines() if "WARNING" in line and "is not reachable" in line]
            assert len(warnings) == 1, warnings
            assert f"PostgreSQL: {database} is not reachable: " in warnings[0] and "(attempt 1, 0 s since start)" in warnings[0]
            assert "s3cret" not in log + reason
        server.start()
        wait_for(lambda: readyz(a.port)[0] == 200, 20, "i0 to lead once the database is up")
        msg_id = str(uuid.uuid4())
        assert post(a.port, msg_id) == (200, "OK")
        assert message_ids(schema, server.dsn) == [msg_id]
        assert "reachable after" in open(a.log).read()
        wait_for(lambda: not alive(b), 20, "i1 to stop")
        assert b.proc.returncode == 2
        assert (f'gwcore: error: GWCORE_PG_DSN={where}/gwcore_no_such_database: cannot create the tables: '
                'database "gwcore_no_such_database" does not exist') in open(b.log).read()
        assert alive(a) and a.terminate() == 0
    finally:
        for n in (a, b):
            if alive(n):
                n.kill()
        server.remove()


def test_a_database_that_refuses_stops_the_start_at_once(tmp_path, run):
    from gwcore import ConfigurationError, Gateway, Settings

    async def main():
        gw = Gateway(Settings.from_env({}, mode="selected", transport="postgresql",
                                       pg_dsn=PG_DSN.rsplit("/", 1)[0] + "/gwcore_no_such_database",
                                       endpoint=ENDPOINT, data_dir=str(tmp_path / "a"),
                                       receive_channels=f"http://127.0.0.1:{free_port()}/{ENDPOINT}/"))
        with pytest.raises(ConfigurationError, match='cannot create the tables: database "gwcore_no_such_database" '
                                                     "does not exist"):
            await gw.start()

    require_pg()
    run(main())


def test_the_reply_tables_of_instances_gone_past_the_expiry_are_dropped(tmp_path, pg_schema, run, monkeypatch,
                                                                        caplog):
    """Two instances in process (a0 the leader, a1 a standby) and two that are gone, whose rows are
    90 minutes old: one's reply table holds three replies nobody consumed, the other's none. Once
    its connection has settled, the leader drops both tables and their rows (a warning names the
    instance and its three replies, the metrics count them); the live standby keeps its table, and
    makes it again when it is dropped under it, or dropped with its row."""
    import asyncpg

    from gwcore import Gateway, Settings
    from gwcore.pgsql import instances as pg_instances
    from gwcore.pgsql import mode as pg_mode
    from gwcore.pgsql import schema
    from gwcore.pgsql.sink import queue_row

    monkeypatch.setattr(pg_mode, "_HOUSEKEEPING_EVERY", 0.1)
    prefix = f"{ENDPOINT}.gwcore."

    async def reply_tables() -> set[str]:
        return {r[0] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1 AND starts_with(tablename, $2)", pg_schema, prefix)}

    async def rows() -> list[str]:
        return [r[0] for r in await conn.fetch(f'SELECT instance FROM "{pg_schema}".gwcore_instances ORDER BY instance')]

    async def until(what: str, check) -> None:
        deadline = time.monotonic() + 15
        while not await check():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.05)

    def instance(name: str) -> Gateway:
        return Gateway(Settings.from_env(
            {}, mode="selected", transport="postgresql", pg_dsn=PG_DSN, pg_schema=pg_schema, endpoint=ENDPOINT,
            instance=name, election_interval=0.02, data_dir=str(tmp_path / name),
            receive_channels=f"http://127.0.0.1:{free_port()}/{ENDPOINT}/"))

    async def main():
        nonlocal conn
        conn = await asyncpg.connect(PG_DSN)
        for name, replies in (("gone", 3), ("gone-empty", 0)):
            names = schema.Names(pg_schema, ENDPOINT, name)
            await schema.ensure(conn, names)
            await conn.execute(f"INSERT INTO {names.instances} (endpoint, instance, last_seen) "
                               "VALUES ($1, $2, now() - interval '90 minutes')", ENDPOINT, name)
            for _ in range(replies):
                await conn.execute(schema.insert_row(names.instance), *queue_row(str(uuid.uuid4()), {}, b"r", 0))
        a0 = await instance("a0").start()
        a1 = None
        both = {prefix + "a0", prefix + "a1"}
        try:
            async def led():
                return a0.ready

            await until("a0 to lead", led)
            a1 = await instance("a1").start()
            known = a0.selected.instances
            await asyncio.sleep(0.5)  # rounds: a leader whose connection is new expires nobody yet
            assert known.expired == 0 and len(await reply_tables()) == 4
            monkeypatch.setattr(pg_instances, "_SETTLE", 0.0)

            async def expired():
                return known.expired == 2

            await until("the gone instances to expire", expired)
            assert known.replies_dropped == 3
            samples = {s.name: s.value for f in a0.selected.metrics() for s in f.samples}
            assert (samples["gwcore_pg_instances_expired_total"], samples["gwcore_pg_replies_dropped_total"]) == (2, 3)

            async def both_beat():
                return await rows() == ["a0", "a1"] and await reply_tables() == both and known.tables == both

            await until("a1's heartbeat", both_beat)
            await asyncio.sleep(0.5)  # rounds more: the live instances' tables stay
            assert await reply_tables() == both and known.expired == 2
            # a reply table dropped under a live instance is made again by its next heartbeat
            await conn.execute(f'DROP TABLE "{pg_schema}"."{prefix}a1"')
            await until("a1's table again", both_beat)
            # and one dropped with its row (as an expiry does, while it was away): announced again too
            await conn.execute(f"DELETE FROM \"{pg_schema}\".gwcore_instances WHERE instance = 'a1'")
            await conn.execute(f'DROP TABLE "{pg_schema}"."{prefix}a1"')
            await until("a1's row and table again, and a0 routing to it", both_beat)
        finally:
            for gw in (a1, a0):
                if gw is not None:
                    await gw.stop()
            await conn.close()

    conn = None
    with caplog.at_level(logging.INFO, logger="gwcore.selected"):
        run(main())
    said = [r.getMessage() for r in caplog.records if "s (GWCORE_PG_INSTANCE_EXPIRY=" in r.getMessage()]
    assert len(said) == 2, said
    again = [r for r in caplog.records if "a1: its reply table" in r.getMessage()]
    assert [r.levelno for r in again] == [logging.WARNING] * 2
    assert [r.getMessage().endswith("created again") for r in again] == [True] * 2
    gone = next(r for r in caplog.records if "instance gone:" in r.getMessage())
    assert gone.levelno == logging.WARNING
    assert gone.getMessage().endswith(f"its reply table {prefix}gone dropped with 3 replies nobody consumed")
    empty = next(r for r in caplog.records if "instance gone-empty:" in r.getMessage())
    assert empty.levelno == logging.INFO and "its empty reply table" in empty.getMessage()
