#!/usr/bin/env python3
"""Selected-instance mode against standalone mode and against its transport's own ceiling, in the
same run on the same cores.

Each round, in rotating order, one gateway process takes wrk's unique submits (``nsb_submit.lua``,
about 20 headers and 1 KiB each) for ``--duration``:

``standalone``
    ``gwcore serve`` in standalone mode (the messages stay in its LMDB queue).
``dispatched`` / ``stored``
    ``gwcore serve`` with ``GWCORE_MODE=selected`` and ``GWCORE_ACK`` set accordingly, the only
    instance and so the elected receiver, publishing to a real RabbitMQ (``--amqp-url``); each run
    has an endpoint name of its own and its queues are deleted afterwards.

``rmqbench``
    the broker's own ceiling for what selected mode does per message, in the same round: the
    native client of ../shared/tools/peers/rmqbench (built into ``--rmqbench`` if missing; pinned
    where wrk runs) publishing 1 KiB persistent messages with 20 header-table entries to a durable
    quorum queue with publisher confirms, at most ``--connections`` unconfirmed, for ``--duration``.

With ``--transport postgresql`` the kinds are ``standalone``, ``postgresql`` (``GWCORE_MODE=selected``,
``GWCORE_TRANSPORT=postgresql`` on ``--pg-dsn``, the only instance and so the leader; a schema of its
own per run, dropped afterwards) and ``pgbench``, the database's own ceiling for what the leader
commits per message: pgbench (pinned where wrk runs, ``--connections`` clients, no vacuum) running a
transaction that inserts one dedup row (``ON CONFLICT DO NOTHING``) and one queue row with the
header JSON and 1 KiB body of a message gwcore stored in the same run, into the tables gwcore
creates (same indexes), with ``synchronous_commit=on``. The headline is postgresql ÷ pgbench.
``pgbench_batch`` is a harder ceiling beside it: the same statement for ``--pgbench-batch`` messages
at once (64) on ``--pgbench-batch-clients`` connections (1), which is what the leader's group
commit does on its one connection, without the HTTP in front.
PostgreSQL allows 100 connections here, so use ``--connections 64`` (the default for this
transport).

The gateway runs on ``--server-cpu``, wrk on ``--wrk-cpu``; the broker or database is not pinned (it
shares the machine). Reported: requests/s of each, the headline ratio dispatched ÷ rmqbench, and dispatched ÷
standalone and stored ÷ standalone per round, with median and range. ``stored`` runs for
``--stored-duration`` (60 s by default) and is reported as what was published per second over it
(sustained), beside what was answered 200 (intake) and the outbox left at the end. Results go to
bench/results/ (gitignored).

    .venv/bin/python bench/load/selected.py                       # 5 rounds of 10 s (stored: 60 s)
    .venv/bin/python bench/load/selected.py --rounds 1 --duration 3s --stored-duration 5s   # smoke test
    .venv/bin/python bench/load/selected.py --transport postgresql --pg-dsn postgresql://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.error
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run_load as rl  # noqa: E402
import site_to_site as s2s  # noqa: E402

KINDS = ("standalone", "dispatched", "stored", "rmqbench")
PG_KINDS = ("standalone", "postgresql", "pgbench", "pgbench_batch")


async def delete_queues(url: str, endpoint: str, instances: tuple[str, ...] = ("bench",)) -> None:
    """A benchmark endpoint's queues gone: its input queue, stream, leader queue and the reply
    queues of *instances* (those absent are skipped)."""
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        for name in (endpoint, f"{endpoint}.gwcore.dedup", f"{endpoint}.gwcore.leader",
                     *(f"{endpoint}.gwcore.instance.{i}" for i in instances)):
            ch = await conn.channel()
            try:
                await ch.queue_delete(name)
            except Exception:  # noqa: BLE001 - absent
                pass
    finally:
        await conn.close()


def _ready(port: int) -> bool:
    try:
        return rl.http_get(port, "/readyz")[0] == 200
    except (OSError, urllib.error.URLError):  # HTTPError (503 standby) is one
        return False


async def _pg(dsn: str, *statements: str) -> list[Any]:
    """Run *statements* on *dsn*; the first row's first value of each."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return [await conn.fetchval(st) for st in statements]
    finally:
        await conn.close()


def _pg_schema_name() -> str:
    return f"gwbench_{uuid.uuid4().hex[:8]}"


def run_one(cfg: argparse.Namespace, work: Path, kind: str, label: str) -> dict[str, Any]:
    endpoint = f"gwbench-{uuid.uuid4().hex[:8]}"
    env = {"GWCORE_ENDPOINT": endpoint}
    schema = _pg_schema_name()
    if kind == "postgresql":
        env.update(GWCORE_MODE="selected", GWCORE_TRANSPORT="postgresql", GWCORE_PG_DSN=cfg.pg_dsn,
                   GWCORE_PG_SCHEMA=schema, GWCORE_INSTANCE="bench", GWCORE_ELECTION_INTERVAL="50ms")
    elif kind != "standalone":
        env.update(GWCORE_MODE="selected", GWCORE_ACK=kind, GWCORE_AMQP_URL=cfg.amqp_url,
                   GWCORE_INSTANCE="bench", GWCORE_ELECTION_INTERVAL="50ms")
    node_cfg = argparse.Namespace(**vars(cfg))
    node_cfg.gwcore_env = [f"{k}={v}" for k, v in env.items()]
    data_dir = work / f"{kind}-{label}"
    server = rl.Server("gwcore", node_cfg, work, data_dir)
    server.start(cfg.ready_timeout)
    try:
        deadline = time.monotonic() + 30
        while not _ready(server.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind}: not ready (elected) within 30 s:\n{server.log_tail()}")
            time.sleep(0.05)
        res = rl.run_wrk(cfg, server.url, duration=cfg.stored_duration if kind == "stored" else cfg.duration,
                         connections=cfg.connections)
        # with ack=stored the 200s may run ahead of the broker: how many were published meanwhile
        metrics = server.metrics()
        published = metrics.get("gwcore_dispatched_total", 0.0)
        outbox = metrics.get("gwcore_outbox_undispatched", 0.0)
        if kind == "postgresql":
            from gwcore.pgsql.schema import quote

            queue = f"{quote(schema)}.{quote(endpoint)}"
            # what was committed, and a message as stored: the ceiling's transaction writes the same
            published, cfg.pg_sample_headers = asyncio.run(_pg(
                cfg.pg_dsn, f"SELECT count(*) FROM {queue}", f"SELECT headers FROM {queue} LIMIT 1"))
    finally:
        server.stop()
        s2s.drop_stores(data_dir)
        if kind == "postgresql":
            asyncio.run(_pg(cfg.pg_dsn, f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        elif kind != "standalone":
            asyncio.run(delete_queues(cfg.amqp_url, endpoint))
    rps = res["rps"]
    pub_rps = published / res["duration_s"] if res.get("duration_s") else 0.0
    extra = ""
    if kind == "postgresql":
        extra = f", rows committed {published:,.0f}"
    elif kind != "standalone":
        extra = f", published {pub_rps:,.0f}/s, outbox left {outbox:,.0f}"
    rl.log(f"  [{label}] {kind:<10}: {rps:>10,.0f} req/s, p50 {res.get('p50_ms', 0):.1f} ms, "
           f"non-2xx {res.get('non_2xx', 0)}{extra}")
    return {"rps": rps, "published_rps": pub_rps, "outbox_left": outbox, "p50_ms": res.get("p50_ms"),
            "p99_ms": res.get("p99_ms"), "non_2xx": res.get("non_2xx", 0), "seconds": res.get("duration_s")}


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def pgbench_script(schema: str, endpoint: str, headers: str, body: bytes, rows: int = 1) -> str:
    """The ceiling's transaction: what the leader's group commit does for a message (a dedup row
    that decides, the queue row with the stored header JSON and body), as one statement and so one
    round trip and one commit per *rows* messages."""
    from gwcore.pgsql.schema import Names

    names = Names(schema, endpoint, "bench")
    return (f"WITH fresh AS (INSERT INTO {names.dedup} (endpoint, id, expires_at) "
            f"SELECT {_sql_literal(endpoint)}, gen_random_uuid()::text, now() + make_interval(secs => 604800) "
            f"FROM generate_series(1, {rows}) "
            f"ON CONFLICT DO NOTHING RETURNING id) "
            f"INSERT INTO {names.queue} (id, expires, headers, body) "
            f"SELECT gen_random_uuid(), NULL, {_sql_literal(headers)}, '\\x{body.hex()}'::bytea FROM fresh "
            f"ON CONFLICT (id) DO NOTHING;\n")


def run_pgbench(cfg: argparse.Namespace, work: Path, body: bytes, label: str, rows: int = 1) -> dict[str, Any]:
    """The database's own ceiling: pgbench pinned where wrk runs, as many clients as wrk has
    connections, into the tables gwcore creates (a schema of its own, dropped afterwards); *rows*
    messages per transaction (its rate is messages/s)."""
    from gwcore.pgsql import schema as pg_schema

    if not getattr(cfg, "pg_sample_headers", None):
        raise RuntimeError("pgbench: no stored message to copy the headers of yet (a postgresql run comes first)")
    name, endpoint = _pg_schema_name(), "gwbench-ceiling"

    async def create() -> None:
        import asyncpg

        conn = await asyncpg.connect(cfg.pg_dsn)
        try:
            await pg_schema.ensure(conn, pg_schema.Names(name, endpoint, "bench"))
        finally:
            await conn.close()

    asyncio.run(create())
    script = work / "pgbench.sql"
    script.write_text(pgbench_script(name, endpoint, cfg.pg_sample_headers, body, rows))
    seconds = rl.parse_duration_s(cfg.duration)
    clients = cfg.connections if rows == 1 else cfg.pgbench_batch_clients
    cmd = rl.pin(cfg.wrk_cpu) + [cfg.pgbench, "-n", "-c", str(clients), "-j", "1", "-T", f"{seconds:g}",
                                 "-f", str(script), cfg.pg_dsn]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"pgbench failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
        stored = asyncio.run(_pg(cfg.pg_dsn, f"SELECT count(*) FROM {pg_schema.Names(name, endpoint, 'b').queue}"))[0]
    finally:
        asyncio.run(_pg(cfg.pg_dsn, f"DROP SCHEMA IF EXISTS {name} CASCADE"))
    tps = re.search(r"^tps = ([0-9.]+)", proc.stdout, re.M)
    lat = re.search(r"^latency average = ([0-9.]+) ms", proc.stdout, re.M)
    if tps is None:
        raise RuntimeError(f"pgbench: no tps in its output:\n{proc.stdout}")
    out = {"rps": float(tps.group(1)) * rows, "tps": float(tps.group(1)),
           "latency_ms": float(lat.group(1)) if lat else None, "rows": stored, "rows_per_txn": rows}
    rl.log(f"  [{label}] pgbench{'' if rows == 1 else f' ×{rows}'}: {out['rps']:>10,.0f} msg/s "
           f"({out['tps']:,.0f} txn/s, {clients} clients, {stored:,} rows)")
    return out


def run_rmqbench(cfg: argparse.Namespace, label: str) -> dict[str, Any]:
    """The broker's own ceiling: rmqbench pinned where wrk runs, as many unconfirmed as wrk has
    connections, 20 header-table entries, a quorum queue."""
    cmd = rl.pin(cfg.wrk_cpu) + [cfg.rmqbench, "-url", cfg.amqp_url, "-inflight", str(cfg.connections),
                                 "-headers", "20", "-type", "quorum",
                                 "-seconds", f"{rl.parse_duration_s(cfg.duration):g}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=rl.parse_duration_s(cfg.duration) + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"rmqbench failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    rl.log(f"  [{label}] rmqbench  : {out['rps']:>10,.0f} msg/s into a quorum queue ({cfg.connections} unconfirmed)")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", default="10s")
    p.add_argument("--transport", choices=("rabbitmq", "postgresql"), default="rabbitmq")
    p.add_argument("--connections", type=int, default=None,
                   help="wrk connections, unconfirmed publishes, pgbench clients (128; 64 on postgresql)")
    p.add_argument("--wrk", default="wrk")
    p.add_argument("--wrk-cpu", default="1")
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    p.add_argument("--stored-duration", default="60s", help="how long the ack=stored run lasts (sustained rate)")
    p.add_argument("--rmqbench", default="/tmp/rmqbench", help="the rmqbench client (built here if missing)")
    p.add_argument("--rmqbench-src", default="/work/shared/tools/peers/rmqbench", help="its Go source")
    p.add_argument("--pg-dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--pgbench", default="pgbench")
    p.add_argument("--pgbench-batch", type=int, default=64,
                   help="messages per transaction of the batched ceiling (what one group commit could hold)")
    p.add_argument("--pgbench-batch-clients", type=int, default=1,
                   help="its clients (1: like the leader, one connection committing batch after batch)")
    s2s.add_common_options(p)
    return p


def main_postgresql(cfg: argparse.Namespace) -> int:
    if shutil.which(cfg.pgbench) is None:
        raise SystemExit(f"selected.py: the database's ceiling cannot be measured: no {cfg.pgbench} "
                         "(apt-get install -y postgresql-client)")
    started, work, body = s2s.wrk_setup(cfg, "gwcore-selected-pg-")
    cfg.pg_sample_headers = None
    rounds = []
    try:
        for i in range(cfg.rounds):
            label = f"{i + 1}of{cfg.rounds}"
            order = PG_KINDS[i % len(PG_KINDS):] + PG_KINDS[:i % len(PG_KINDS)]
            if cfg.pg_sample_headers is None:  # the ceilings copy a message the gateway stored
                order = tuple(k for k in order if not k.startswith("pgbench")) + ("pgbench", "pgbench_batch")
            res: dict[str, Any] = {"order": " → ".join(order)}
            for kind in order:
                if kind.startswith("pgbench"):
                    res[kind] = run_pgbench(cfg, work, body, label, cfg.pgbench_batch if kind == "pgbench_batch" else 1)
                else:
                    res[kind] = run_one(cfg, work, kind, label)
            res["pg_ratio"] = res["postgresql"]["rps"] / res["pgbench"]["rps"]
            res["pg_batch_ratio"] = res["postgresql"]["rps"] / res["pgbench_batch"]["rps"]
            res["pg_standalone_ratio"] = res["postgresql"]["rps"] / res["standalone"]["rps"]
            rl.log(f"  [{label}] postgresql ÷ pgbench {res['pg_ratio']:.3f}, ÷ pgbench ×{cfg.pgbench_batch} "
                   f"{res['pg_batch_ratio']:.3f}, ÷ standalone "
                   f"{res['pg_standalone_ratio']:.3f}")
            rounds.append(res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, Any] = {f"{k}_median": statistics.median(r[k]["rps"] for r in rounds) for k in PG_KINDS}
    for key in ("pg_ratio", "pg_batch_ratio", "pg_standalone_ratio"):
        ratios = [r[key] for r in rounds]
        summary[key] = (statistics.median(ratios), min(ratios), max(ratios))
    p50 = [r["postgresql"]["p50_ms"] for r in rounds if r["postgresql"].get("p50_ms") is not None]
    lat = [r["pgbench"]["latency_ms"] for r in rounds if r["pgbench"].get("latency_ms") is not None]

    def rng(key: str) -> str:
        m, lo, hi = summary[key]
        return f"{m:.3f} ({lo:.3f}–{hi:.3f})"

    lines = [
        f"Gateway on CPU {cfg.server_cpu}, wrk and pgbench on CPU {cfg.wrk_cpu} (c{cfg.connections} / "
        f"{cfg.connections} clients, {cfg.duration} per run), PostgreSQL unpinned "
        f"(synchronous_commit=on); {cfg.rounds} rounds, rotating order; {cfg.body_size}-byte bodies.",
        "",
        f"| | standalone req/s | pgbench msg/s (1 per txn) | pgbench ×{cfg.pgbench_batch} msg/s | "
        "selected on PostgreSQL req/s | postgresql ÷ pgbench | "
        f"postgresql ÷ pgbench ×{cfg.pgbench_batch} | postgresql ÷ standalone | p50 (gwcore / pgbench avg) |",
        "|---|---:|---:|---:|---:|---|---|---|---|",
        f"| median (min–max) | {summary['standalone_median']:,.0f} | {summary['pgbench_median']:,.0f} | "
        f"{summary['pgbench_batch_median']:,.0f} | "
        f"{summary['postgresql_median']:,.0f} | {rng('pg_ratio')} | {rng('pg_batch_ratio')} | {rng('pg_standalone_ratio')} | "
        f"{statistics.median(p50) if p50 else 0:.1f} / {statistics.median(lat) if lat else 0:.1f} ms |",
        "",
        f"| round | order | standalone | pgbench | pgbench ×{cfg.pgbench_batch} | postgresql (rows committed) |",
        "|---:|---|---:|---:|---:|---:|",
    ] + [f"| {i + 1} | {r['order']} | {r['standalone']['rps']:,.0f} | {r['pgbench']['rps']:,.0f} | "
         f"{r['pgbench_batch']['rps']:,.0f} | "
         f"{r['postgresql']['rps']:,.0f} ({r['postgresql']['published_rps'] * r['postgresql']['seconds']:,.0f}) |"
         for i, r in enumerate(rounds)]
    md = "\n".join(lines) + "\n"
    s2s.write_results(cfg, started, "selected-pg", rounds, summary, md, keys=("pg_ratio", "pg_batch_ratio", "pg_standalone_ratio"))
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg = build_parser().parse_args(argv)
    if cfg.connections is None:
        cfg.connections = 64 if cfg.transport == "postgresql" else 128
    if cfg.transport == "postgresql":
        return main_postgresql(cfg)
    why = s2s.go_peer_ready(cfg.rmqbench, cfg.rmqbench_src, "golang-github-rabbitmq-amqp091-go-dev")
    if why is not None:
        raise SystemExit(f"selected.py: the broker's ceiling cannot be measured: {why}")
    started, work, _body = s2s.wrk_setup(cfg, "gwcore-selected-")
    rounds = []
    try:
        for i in range(cfg.rounds):
            label = f"{i + 1}of{cfg.rounds}"
            order = KINDS[i % len(KINDS):] + KINDS[:i % len(KINDS)]
            res: dict[str, Any] = {"order": " → ".join(order)}
            for kind in order:
                res[kind] = run_rmqbench(cfg, label) if kind == "rmqbench" else run_one(cfg, work, kind, label)
            res["dispatched_ratio"] = res["dispatched"]["rps"] / res["standalone"]["rps"]
            res["stored_ratio"] = res["stored"]["published_rps"] / res["standalone"]["rps"]
            res["dispatched_broker_ratio"] = res["dispatched"]["rps"] / res["rmqbench"]["rps"]
            res["stored_broker_ratio"] = res["stored"]["published_rps"] / res["rmqbench"]["rps"]
            rl.log(f"  [{label}] dispatched ÷ rmqbench {res['dispatched_broker_ratio']:.3f}, stored (sustained) ÷ "
                   f"rmqbench {res['stored_broker_ratio']:.3f}, dispatched ÷ standalone {res['dispatched_ratio']:.3f}")
            rounds.append(res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, Any] = {f"{k}_median": statistics.median(r[k]["rps"] for r in rounds) for k in KINDS}
    summary["stored_published_median"] = statistics.median(r["stored"]["published_rps"] for r in rounds)
    for key in ("dispatched_ratio", "stored_ratio", "dispatched_broker_ratio", "stored_broker_ratio"):
        ratios = [r[key] for r in rounds]
        summary[key] = (statistics.median(ratios), min(ratios), max(ratios))

    def rng(key: str) -> str:
        m, lo, hi = summary[key]
        return f"{m:.3f} ({lo:.3f}–{hi:.3f})"

    lines = [
        f"Gateway on CPU {cfg.server_cpu}, wrk and rmqbench on CPU {cfg.wrk_cpu} (c{cfg.connections} / "
        f"{cfg.connections} unconfirmed, {cfg.duration} per run, ack=stored {cfg.stored_duration}), RabbitMQ "
        f"unpinned; {cfg.rounds} rounds, rotating order; {cfg.body_size}-byte bodies, quorum queue.",
        "",
        "| | standalone req/s | rmqbench msg/s | ack=dispatched req/s | ack=stored published/s (sustained) | "
        "dispatched ÷ rmqbench | stored ÷ rmqbench | dispatched ÷ standalone |",
        "|---|---:|---:|---:|---:|---|---|---|",
        f"| median (min–max) | {summary['standalone_median']:,.0f} | {summary['rmqbench_median']:,.0f} | "
        f"{summary['dispatched_median']:,.0f} | {summary['stored_published_median']:,.0f} | "
        f"{rng('dispatched_broker_ratio')} | {rng('stored_broker_ratio')} | {rng('dispatched_ratio')} |",
        "",
        "| round | order | standalone | rmqbench | dispatched | stored: published/s (200s/s, outbox left) |",
        "|---:|---|---:|---:|---:|---:|",
    ] + [f"| {i + 1} | {r['order']} | {r['standalone']['rps']:,.0f} | {r['rmqbench']['rps']:,.0f} | "
         f"{r['dispatched']['rps']:,.0f} | {r['stored']['published_rps']:,.0f} ({r['stored']['rps']:,.0f}, "
         f"{r['stored']['outbox_left']:,.0f}) |" for i, r in enumerate(rounds)]
    md = "\n".join(lines) + "\n"
    s2s.write_results(cfg, started, "selected", rounds, summary, md,
                      keys=("dispatched_broker_ratio", "stored_broker_ratio"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
