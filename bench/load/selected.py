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

The gateway runs on ``--server-cpu``, wrk on ``--wrk-cpu``; RabbitMQ is not pinned (it shares the
machine). Reported: requests/s of each, and the ratios dispatched ÷ standalone and stored ÷
standalone per round, with median and range. Results go to bench/results/ (gitignored).

    .venv/bin/python bench/load/selected.py                       # 5 rounds of 10 s
    .venv/bin/python bench/load/selected.py --rounds 1 --duration 3s   # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
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

KINDS = ("standalone", "dispatched", "stored")


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
        res = rl.run_wrk(cfg, server.url, duration=cfg.duration, connections=cfg.connections)
        # with ack=stored the 200s may run ahead of the broker: how many were published meanwhile
        published = server.metrics().get("gwcore_dispatched_total", 0.0)
    finally:
        server.stop()
        if kind != "standalone":
            asyncio.run(_delete_queues(cfg.amqp_url, endpoint))
    rps = res["rps"]
    pub_rps = published / res["duration_s"] if res.get("duration_s") else 0.0
    rl.log(f"  [{label}] {kind:<10}: {rps:>10,.0f} req/s, p50 {res.get('p50_ms', 0):.1f} ms, "
           f"non-2xx {res.get('non_2xx', 0)}" + (f", published {pub_rps:,.0f}/s" if kind != "standalone" else ""))
    return {"rps": rps, "published_rps": pub_rps, "p50_ms": res.get("p50_ms"), "p99_ms": res.get("p99_ms"), "non_2xx": res.get("non_2xx", 0)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", default="10s")
    p.add_argument("--connections", type=int, default=128)
    p.add_argument("--wrk", default="wrk")
    p.add_argument("--wrk-cpu", default="1")
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    s2s.add_common_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = build_parser().parse_args(argv)
    started, work, _body = s2s.wrk_setup(cfg, "gwcore-selected-")
    rounds = []
    try:
        for i in range(cfg.rounds):
            label = f"{i + 1}of{cfg.rounds}"
            order = KINDS[i % 3:] + KINDS[:i % 3]
            res: dict[str, Any] = {"order": " → ".join(order)}
            for kind in order:
                res[kind] = run_one(cfg, work, kind, label)
            for kind in ("dispatched", "stored"):
                res[f"{kind}_ratio"] = res[kind]["rps"] / res["standalone"]["rps"]
            rl.log(f"  [{label}] dispatched ÷ standalone {res['dispatched_ratio']:.3f}, "
                   f"stored ÷ standalone {res['stored_ratio']:.3f}")
            rounds.append(res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, Any] = {f"{k}_median": statistics.median(r[k]["rps"] for r in rounds) for k in KINDS}
    for kind in ("dispatched", "stored"):
        ratios = [r[f"{kind}_ratio"] for r in rounds]
        summary[f"{kind}_ratio"] = (statistics.median(ratios), min(ratios), max(ratios))
    d, s = summary["dispatched_ratio"], summary["stored_ratio"]
    lines = [
        f"Gateway on CPU {cfg.server_cpu}, wrk on CPU {cfg.wrk_cpu} (c{cfg.connections}, {cfg.duration} per run), "
        f"RabbitMQ unpinned; {cfg.rounds} rounds, rotating order; {cfg.body_size}-byte bodies.",
        "",
        "| | standalone req/s | selected, ack=dispatched | selected, ack=stored | dispatched ÷ standalone | stored ÷ standalone |",
        "|---|---:|---:|---:|---|---|",
        f"| median (min–max) | {summary['standalone_median']:,.0f} | {summary['dispatched_median']:,.0f} | "
        f"{summary['stored_median']:,.0f} | {d[0]:.3f} ({d[1]:.3f}–{d[2]:.3f}) | {s[0]:.3f} ({s[1]:.3f}–{s[2]:.3f}) |",
        "",
        "| round | order | standalone | dispatched | stored (published meanwhile) |",
        "|---:|---|---:|---:|---:|",
    ] + [f"| {i + 1} | {r['order']} | {r['standalone']['rps']:,.0f} | {r['dispatched']['rps']:,.0f} | "
         f"{r['stored']['rps']:,.0f} ({r['stored']['published_rps']:,.0f}) |" for i, r in enumerate(rounds)]
    md = "\n".join(lines) + "\n"
    s2s.write_results(cfg, started, "selected", rounds, summary, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
