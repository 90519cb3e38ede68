#!/usr/bin/env python3
"""Failover timelines: selected-instance mode behind a real nginx, under wrk's load, with the
leader SIGKILLed and, later, handed over on purpose.

Three ``gwcore serve`` instances (``GWCORE_MODE=selected``, ``GWCORE_ACK=dispatched``, a real
RabbitMQ at ``--amqp-url``; with ``--transport postgresql`` the PostgreSQL form on ``--pg-dsn``, in a
schema of its own that is dropped afterwards) sit behind nginx with the configuration of docs/deployment.md (every
upstream listed twice, ``proxy_next_upstream ... http_503``, tries 0: tests/nginx.py). wrk sends
unique NServiceBus submits through nginx for ``--duration``. At ``--kill-at`` seconds the leader
is SIGKILLed (and started again ``--restart-after`` later, as a standby); at ``--handover-at``
the leader then in office runs ``gwcore handover`` (and is started again once it has exited).

nginx's access log gives every answer with its time, status and the instance that gave it: the
results file (bench/results/failover-<UTC time>.json) holds them with the events, and
``failover-<time>.png`` (plot.py ``--timeline``) shows answers per 100 ms by instance, refused
ones apart. Reported: for each change of leader, the time from the old leader's last 200 to the
new one's first (the gap a client behind the load balancer waits through), and what the clients
saw that was not a 200.

    .venv/bin/python bench/load/failover.py                       # 12 s, kill at 3 s, handover at 8 s
    .venv/bin/python bench/load/failover.py --duration 6s --kill-at 2 --handover-at 4
    .venv/bin/python bench/load/failover.py --transport postgresql
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent / "tests"))
import run_load as rl  # noqa: E402
import site_to_site as s2s  # noqa: E402
from nginx import Nginx, takeover_gaps  # noqa: E402  (the tests' nginx runner: the documented configuration)
from procs import ServerProcess, gwcore_cli  # noqa: E402
from selected import _pg, _pg_schema_name, delete_queues  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", default="12s", help="how long wrk sends (default 12s)")
    p.add_argument("--kill-at", type=float, default=3.0, help="seconds into the load: SIGKILL the leader")
    p.add_argument("--restart-after", type=float, default=0.5, help="the killed instance starts again after this")
    p.add_argument("--handover-at", type=float, default=8.0,
                   help="seconds into the load: `gwcore handover` on the leader (negative: none)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--wrk", default="wrk")
    p.add_argument("--wrk-cpu", default="1")
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    p.add_argument("--transport", choices=("rabbitmq", "postgresql"), default="rabbitmq")
    p.add_argument("--pg-dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    s2s.add_common_options(p)
    return p


def _ready(port: int) -> bool:
    try:
        return rl.http_get(port, "/readyz")[0] == 200
    except (OSError, urllib.error.URLError):  # HTTPError (503 standby) is one
        return False


def _leader(nodes: list[ServerProcess], timeout: float = 30.0) -> ServerProcess:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [n for n in nodes if n.proc and n.proc.poll() is None and _ready(n.port)]
        if len(ready) == 1:
            return ready[0]
        time.sleep(0.02)
    raise RuntimeError(f"no single leader within {timeout:g} s")


def run(cfg: argparse.Namespace, work: Path) -> dict[str, Any]:
    endpoint = f"gwbench-{uuid.uuid4().hex[:8]}"
    schema = _pg_schema_name()
    transport = ({"GWCORE_TRANSPORT": "postgresql", "GWCORE_PG_DSN": cfg.pg_dsn, "GWCORE_PG_SCHEMA": schema}
                 if cfg.transport == "postgresql" else {"GWCORE_ACK": "dispatched", "GWCORE_AMQP_URL": cfg.amqp_url})
    nodes = []
    for i in range(3):
        node = ServerProcess(str(work / f"i{i}" / "store"), rl.free_port(), GWCORE_ENDPOINT=endpoint,
                             GWCORE_MODE="selected", GWCORE_INSTANCE=f"i{i}", GWCORE_ELECTION_INTERVAL="20ms",
                             GWCORE_HTTP_MAX_CONNECTIONS_PER_PEER="4096", **transport)
        node.log = str(work / f"i{i}.log")
        nodes.append(node)
    names = {f"127.0.0.1:{n.port}": n.env["GWCORE_INSTANCE"] for n in nodes}
    proxy = Nginx(str(work / "nginx"), rl.free_port(), [n.port for n in nodes], tries=0, repeat=2, log_buffer="256k")
    events: list[dict[str, Any]] = []
    wrk_result: dict[str, Any] = {}
    try:
        for node in nodes:
            node.start()
        proxy.start()
        _leader(nodes)
        url = f"http://127.0.0.1:{proxy.port}/{endpoint}/"
        wrk = threading.Thread(target=lambda: wrk_result.update(
            rl.run_wrk(cfg, url, duration=cfg.duration, connections=cfg.connections)))
        began = time.time()
        wrk.start()
        plan = [(cfg.kill_at, "kill")] + ([(cfg.handover_at, "handover")] if cfg.handover_at >= 0 else [])
        for at, what in sorted(plan):
            time.sleep(max(0.0, began + at - time.time()))
            leader = _leader(nodes, 10)
            name = leader.env["GWCORE_INSTANCE"]
            if what == "kill":
                events.append({"t": time.time(), "what": f"SIGKILL {name}"})
                leader.kill()
                time.sleep(cfg.restart_after)
                leader.start()
                events.append({"t": time.time(), "what": f"{name} started"})
            else:
                events.append({"t": time.time(), "what": f"handover by {name}"})
                gwcore_cli("handover", "--wait", "30", data_dir=leader.data_dir)
                leader.proc.wait(30)
                leader.start()
                events.append({"t": time.time(), "what": f"{name} started"})
        wrk.join()
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.terminate()
        proxy.stop()
        if cfg.transport == "postgresql":
            asyncio.run(_pg(cfg.pg_dsn, f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        else:
            asyncio.run(delete_queues(cfg.amqp_url, endpoint))
    answers = proxy.answers(f"/{endpoint}/")
    return {"answers": answers, "events": events, "instances": names, "wrk": wrk_result}


def main(argv: list[str] | None = None) -> int:
    cfg = build_parser().parse_args(argv)
    started, work, _body = s2s.wrk_setup(cfg, "gwcore-failover-")
    try:
        res = run(cfg, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    answers = res["answers"]
    gaps = takeover_gaps(answers)
    statuses = collections.Counter(status for _t, status, _n in answers)
    summary = {"answers": len(answers), "statuses": dict(statuses), "gaps_s": gaps,
               "gap_p50_ms": statistics.median(gaps) * 1000 if gaps else None,
               "gap_max_ms": max(gaps) * 1000 if gaps else None, "rps": res["wrk"].get("rps")}
    lines = [
        f"Three selected-mode instances ("
        + ("on PostgreSQL" if cfg.transport == "postgresql" else "RabbitMQ, ack=dispatched")
        + f") behind nginx, wrk c{cfg.connections} for "
        f"{cfg.duration}: " + "; ".join(e["what"] for e in res["events"]) + ".",
        "",
        "| answers | statuses | leader changes | last 200 of the old → first 200 of the new: p50 / max | wrk req/s |",
        "|---:|---|---:|---|---:|",
        f"| {len(answers):,} | {', '.join(f'{k}: {v:,}' for k, v in sorted(statuses.items()))} | {len(gaps)} | "
        + (f"{summary['gap_p50_ms']:.0f} / {summary['gap_max_ms']:.0f} ms" if gaps else "–")
        + f" | {summary['rps'] or 0:,.0f} |",
    ]
    s2s.write_results(cfg, started, "failover" if cfg.transport == "rabbitmq" else "failover-pg", [], summary, "\n".join(lines) + "\n", plot="timeline",
                      answers=answers, events=res["events"], instances=res["instances"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
