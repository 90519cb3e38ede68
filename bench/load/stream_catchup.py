#!/usr/bin/env python3
"""Selected mode's failover read: how fast a new instance reads the dedup stream to its end, against
the fastest a Python AMQP client reads the same stream, in the same run on the same core.

A new leader answers nothing until it has read every dedup record earlier leaders appended
(docs/deployment.md): the stream's length, over this rate, is how long a takeover waits. Once,
``--records`` records of ``--keys`` dedup keys each (the shape of one dispatched batch's record)
are appended to a stream of a new endpoint on the broker (``--amqp-url``). Then each round, in
alternating order, pinned to ``--cpu``:

``gwcore``
    a ``Gateway`` in selected mode with an empty data dir (a new instance) in this process: the
    time from ``start()`` until it is ready (it has read the stream to its end and been elected).
``raw``
    the ceiling: aiormq (the client under aio-pika) consuming the stream from its first record with
    a callback that only counts and an acknowledgement per 500 records, to the last record.

Reported: records/s (and dedup keys/s) of each, and gwcore ÷ raw per round, median and range. The
endpoint's queues and the instances' reply queues are deleted at the end. Results go to
bench/results/ (gitignored).

    .venv/bin/python bench/load/stream_catchup.py                          # 3 rounds, 100,000 records
    .venv/bin/python bench/load/stream_catchup.py --rounds 1 --records 5000  # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika
import aiormq
import uvloop

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from gwcore import Gateway, Settings  # noqa: E402
sys.path.insert(0, str(HERE))
from selected import delete_queues  # noqa: E402  (the benchmark endpoint's queues, and its instances')
from gwcore.server import settle_gc  # noqa: E402

_ACK_EVERY = 500
#: the stream's retention as gwcore declares it with its default GWCORE_DEDUP_TTL (7 days)
DEDUP_MAX_AGE = f"{int(Settings.from_env({}).dedup_ttl)}s"


def record_body(endpoint: str, first: int, keys: int) -> bytes:
    """A ``batch`` record: no key done, *keys* keys intended (gwcore/selected/stream.py's layout)."""
    packed = b"".join(struct.pack(">I", len(k)) + k
                      for k in (f"{endpoint}\0{uuid.UUID(int=first + i)}".encode() for i in range(keys)))
    return struct.pack(">I", 0) + packed


async def fill(url: str, endpoint: str, records: int, keys: int) -> float:
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel(publisher_confirms=True)
        name = f"{endpoint}.gwcore.dedup"
        await ch.declare_queue(name, durable=True, arguments={"x-queue-type": "stream", "x-max-age": DEDUP_MAX_AGE})
        started = time.perf_counter()
        for start in range(0, records, 500):
            await asyncio.gather(*(ch.default_exchange.publish(
                aio_pika.Message(record_body(endpoint, (start + i) * keys, keys),
                                 headers={"gwcore.kind": "batch", "gwcore.instance": "earlier"}),
                routing_key=name) for i in range(min(500, records - start))))
        return time.perf_counter() - started
    finally:
        await conn.close()


async def run_gwcore(cfg: argparse.Namespace, endpoint: str, instances: list[str]) -> float:
    instances.append(f"new-{uuid.uuid4().hex[:6]}")
    with tempfile.TemporaryDirectory(dir=cfg.work_dir) as data_dir:
        settings = Settings.from_env({}, data_dir=data_dir, endpoint=endpoint, mode="selected",
                                     receive_channels=f"http://127.0.0.1:0/{endpoint}/", amqp_url=cfg.amqp_url,
                                     election_interval=0.05, instance=instances[-1], shutdown_timeout=5.0)
        started = time.perf_counter()
        gw = await Gateway(settings).start()
        settle_gc()  # as `gwcore serve` does once started (the stream is read after that)
        try:
            while not gw.ready:
                if time.perf_counter() - started > cfg.timeout:
                    raise RuntimeError(f"gwcore not ready after {cfg.timeout} s")
                await asyncio.sleep(0.005)
            took = time.perf_counter() - started
            got = len(gw.selected.replica)
        finally:
            await gw.stop()
    if got < cfg.records * cfg.keys:
        raise RuntimeError(f"gwcore read {got} keys, {cfg.records * cfg.keys} expected")
    return took


async def run_raw(cfg: argparse.Namespace, endpoint: str) -> float:
    conn = await aiormq.connect(cfg.amqp_url)
    try:
        ch = await conn.channel()
        await ch.basic_qos(prefetch_count=2000)
        done = asyncio.get_running_loop().create_future()
        seen = 0

        async def delivered(message: aiormq.abc.DeliveredMessage) -> None:
            nonlocal seen
            seen += 1
            if seen % _ACK_EVERY == 0 or seen == cfg.records:
                await ch.basic_ack(message.delivery_tag, multiple=True)
            if seen >= cfg.records and not done.done():
                done.set_result(None)

        started = time.perf_counter()
        await ch.basic_consume(f"{endpoint}.gwcore.dedup", delivered, arguments={"x-stream-offset": "first"})
        await asyncio.wait_for(done, cfg.timeout)
        return time.perf_counter() - started
    finally:
        await conn.close()


def _mmm(values: list[float]) -> str:
    spec = ",.0f" if min(values) >= 100 else ".3f"
    return f"{statistics.median(values):{spec}} ({min(values):{spec}}–{max(values):{spec}})"


async def main_async(cfg: argparse.Namespace) -> dict:
    endpoint = f"gwcatchup-{uuid.uuid4().hex[:8]}"
    print(f"filling {cfg.records:,} records of {cfg.keys} keys into {endpoint}.gwcore.dedup …", flush=True)
    print(f"  filled in {await fill(cfg.amqp_url, endpoint, cfg.records, cfg.keys):.1f} s", flush=True)
    rounds = []
    instances: list[str] = []
    try:
        for r in range(cfg.rounds):
            order = ("gwcore", "raw") if r % 2 == 0 else ("raw", "gwcore")
            got = {}
            for kind in order:
                took = await (run_gwcore(cfg, endpoint, instances) if kind == "gwcore" else run_raw(cfg, endpoint))
                got[kind] = cfg.records / took
                print(f"  [{r + 1}/{cfg.rounds}] {kind:6s}: {got[kind]:>10,.0f} records/s "
                      f"({got[kind] * cfg.keys:,.0f} keys/s, {took:.2f} s)", flush=True)
            got["ratio"] = got["gwcore"] / got["raw"]
            rounds.append(got)
    finally:
        await delete_queues(cfg.amqp_url, endpoint, tuple(instances))
    summary = {k: [r[k] for r in rounds] for k in ("gwcore", "raw", "ratio")}
    print(f"\nOn CPU {cfg.cpu}, {cfg.records:,} records of {cfg.keys} keys, {cfg.rounds} rounds, order alternating; "
          f"median (min–max):\n")
    print("| reader | records/s | dedup keys/s | ÷ raw |\n|---|---:|---:|---|")
    print(f"| gwcore (a new instance until ready) | {_mmm(summary['gwcore'])} | "
          f"{statistics.median(summary['gwcore']) * cfg.keys:,.0f} | {_mmm(summary['ratio'])} |")
    print(f"| raw aiormq, counting only | {_mmm(summary['raw'])} | "
          f"{statistics.median(summary['raw']) * cfg.keys:,.0f} | |")
    return {"argv": sys.argv[1:], "rounds": rounds, "records": cfg.records, "keys": cfg.keys}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=75, help="dedup keys per record (one dispatched batch's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu", type=int, default=0, help="the CPU this process runs on")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--work-dir", type=Path, default=REPO / "var")
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    cfg = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cfg.cpu})
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    uvloop.install()
    out = asyncio.run(main_async(cfg))
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.results_dir / f"stream-catchup-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
