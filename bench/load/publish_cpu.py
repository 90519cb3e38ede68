#!/usr/bin/env python3
"""Selected mode's publish path on the loop: the client's CPU per published and confirmed message.

Each round, in alternating order, on one core (``--cpu``), ``--batches`` dispatch batches of
``--batch`` stored envelopes (1 KiB bodies, 20 headers, as ``nsb_submit.lua`` sends) are published
to a quorum queue of a new endpoint on the broker (``--amqp-url``), each batch awaited until the
broker confirmed all of it, as the dispatcher does:

``batch``
    ``gwcore.amqp.FramePublisher`` as it is: one ``BatchConfirms`` per batch in aiormq's
    confirmation map, one future.
``per-publish``
    the same frames, with a future per publish registered in aiormq's map and a gather per batch
    (how FramePublisher did it before ``BatchConfirms``): the reference.

Reported: the process's CPU time per message (``time.process_time``, the loop and aiormq: the broker
is another process) and messages/s of each, and batch ÷ per-publish per round, median and range.
The endpoint's queue is deleted at the end.

    .venv/bin/python bench/load/publish_cpu.py                  # 5 rounds of 150 batches of 75
    .venv/bin/python bench/load/publish_cpu.py --rounds 1 --batches 10   # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import aio_pika

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aiormq.abc import ChannelFrame  # noqa: E402

from gwcore._core import core  # noqa: E402
from gwcore.amqp import FramePublisher, Topology  # noqa: E402


class PerPublishFutures(FramePublisher):
    """The reference: a confirm future per publish, as before BatchConfirms."""

    async def publish(self, items):
        ch = self.channel
        frames, refused = core.encode_publishes(items, ch.number, ch.max_content_size, self.input_queue,
                                                self.instance_prefix)
        n = len(items) - len(refused)
        async with ch.lock:
            first = ch.delivery_tag + 1
            futures = []
            for tag in range(first, first + n):
                fut = ch.create_future()
                ch.confirmations[tag] = fut
                futures.append(fut)
            ch.delivery_tag += n
            drained = ch.create_future()
            await ch.write_queue.put(ChannelFrame(payload=frames, should_close=False, drain_future=drained))
            await drained
        return asyncio.gather(*futures), refused


def envelopes(round_no: int, batch_no: int, size: int) -> list[tuple[bytes, bool]]:
    headers = [(f"NServiceBus.Header{i}", "v" * 20) for i in range(20)]
    body = b"x" * 1024
    return [(core.encode_envelope(f"r{round_no}-b{batch_no}-{i}", headers, body, 0, 1), False) for i in range(size)]


async def run(publisher: FramePublisher, round_no: int, batches: int, size: int) -> tuple[float, float]:
    work = [envelopes(round_no, b, size) for b in range(batches)]  # encoded before the clock starts
    cpu, wall = time.process_time(), time.perf_counter()
    for items in work:
        confirms, _refused = await publisher.publish(items)
        await confirms
    n = batches * size
    return (time.process_time() - cpu) / n * 1e6, n / (time.perf_counter() - wall)


async def main(args: argparse.Namespace) -> None:
    conn = await aio_pika.connect(args.amqp_url)
    topology = Topology(f"pubcpu-{uuid.uuid4().hex[:8]}", "bench", 60)
    try:
        ch = await conn.channel(publisher_confirms=True)
        await topology.declare(ch)
        raw = await ch.get_underlay_channel()
        kinds = {"batch": FramePublisher(raw, topology.input, topology.instance_prefix),
                 "per-publish": PerPublishFutures(raw, topology.input, topology.instance_prefix)}
        await run(kinds["batch"], -1, 10, args.batch)  # warm up the channel and the queue
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
        for r in range(args.rounds):
            order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
            for kind in order:
                results[kind].append(await run(kinds[kind], r, args.batches, args.batch))
                cpu, rate = results[kind][-1]
                print(f"  [{r + 1}/{args.rounds}] {kind:11}: {cpu:5.1f} µs of CPU a message, {rate:,.0f} msg/s",
                      flush=True)
        ratios = [b[0] / p[0] for b, p in zip(results["batch"], results["per-publish"])]
        print(f"\n{args.batches} batches of {args.batch} per run, CPU {args.cpu}, {args.rounds} rounds, alternating\n")
        print("| publisher | CPU µs/message median (min–max) | msg/s median |")
        print("|---|---|---:|")
        for kind, rows in results.items():
            cpus = [c for c, _ in rows]
            print(f"| {kind} | {statistics.median(cpus):.1f} ({min(cpus):.1f}–{max(cpus):.1f}) | "
                  f"{statistics.median(r for _, r in rows):,.0f} |")
        print(f"\nbatch ÷ per-publish CPU: {statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})")
        await ch.queue_delete(topology.input)
    finally:
        await conn.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--batch", type=int, default=75, help="messages a batch (75: a dispatched batch at c128)")
    p.add_argument("--cpu", type=int, default=0, help="the core this process runs on")
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    args = p.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    asyncio.run(main(args))
