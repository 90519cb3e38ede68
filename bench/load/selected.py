#!/usr/bin/env python3
"""Selected-instance mode against standalone mode, in the same run on the same cores.

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

The gateway runs on ``--server-cpu``, wrk on ``--wrk-cpu``; RabbitMQ is not pinned (it shares the
machine). Reported: requests/s of each, the headline ratio dispatched ÷ rmqbench, and dispatched ÷
standalone and stored ÷ standalone per round, with median and range. ``stored`` runs for
``--stored-duration`` (60 s by default) and is reported as what was published per second over it
(sustained), beside what was answered 200 (intake) and the outbox left at the end. Results go to
bench/results/ (gitignored).

    .venv/bin/python bench/load/selected.py                       # 5 rounds of 10 s (stored: 60 s)
    .venv/bin/python bench/load/selected.py --rounds 1 --duration 3s --stored-duration 5s   # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


async def _delete_queues(url: str, endpoint: str) -> None:
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        for name in (endpoint, f"{endpoint}.gwcore.dedup", f"{endpoint}.gwcore.leader",
                     f"{endpoint}.gwcore.instance.bench"):
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


def run_one(cfg: argparse.Namespace, work: Path, kind: str, label: str) -> dict[str, Any]:
    endpoint = f"gwbench-{uuid.uuid4().hex[:8]}"
    env = {"GWCORE_ENDPOINT": endpoint}
    if kind != "standalone":
        env.update(GWCORE_MODE="selected", GWCORE_ACK=kind, GWCORE_AMQP_URL=cfg.amqp_url,
                   GWCORE_INSTANCE="bench", GWCORE_ELECTION_INTERVAL="50ms")
    node_cfg = argparse.Namespace(**vars(cfg))
    node_cfg.gwcore_env = [f"{k}={v}" for k, v in env.items()]
    server = rl.Server("gwcore", node_cfg, work, work / f"{kind}-{label}")
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
    finally:
        server.stop()
        if kind != "standalone":
            asyncio.run(_delete_queues(cfg.amqp_url, endpoint))
    rps = res["rps"]
    pub_rps = published / res["duration_s"] if res.get("duration_s") else 0.0
    rl.log(f"  [{label}] {kind:<10}: {rps:>10,.0f} req/s, p50 {res.get('p50_ms', 0):.1f} ms, "
           f"non-2xx {res.get('non_2xx', 0)}" + (f", published {pub_rps:,.0f}/s, outbox left {outbox:,.0f}"
                                                 if kind != "standalone" else ""))
    return {"rps": rps, "published_rps": pub_rps, "outbox_left": outbox, "p50_ms": res.get("p50_ms"),
            "p99_ms": res.get("p99_ms"), "non_2xx": res.get("non_2xx", 0), "seconds": res.get("duration_s")}


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
    p.add_argument("--connections", type=int, default=128)
    p.add_argument("--wrk", default="wrk")
    p.add_argument("--wrk-cpu", default="1")
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    p.add_argument("--stored-duration", default="60s", help="how long the ack=stored run lasts (sustained rate)")
    p.add_argument("--rmqbench", default="/tmp/rmqbench", help="the rmqbench client (built here if missing)")
    p.add_argument("--rmqbench-src", default="/work/shared/tools/peers/rmqbench", help="its Go source")
    s2s.add_common_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = build_parser().parse_args(argv)
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
