"""CPU cost of one accepted submit on the server side, without sockets: for A/B work on the path.

The wrk driver (bench/load/run_load.py) is the measurement that counts; its numbers move with
whatever else the 2-core machine runs. This script drives the real protocol objects
(``HTTPProtocol`` over the core's parser, the real writer thread with fsync'd group commit on a
real LMDB store) from fake transports, so the CPU time it reports is the Python and Cython work
of the path plus the writer's, not the kernel's socket work. Process CPU time (both threads) per
message, best of several rounds, is what it prints; ``--profile`` adds a cProfile table of the
loop thread; ``--batch N`` sends the messages as gwcore batches of N (site to site).

The rounds share one store, which grows by every round's messages: on this virtual machine a
write's new pages cost several times the CPU once the page cache holds about 2 GB
(docs/benchmarks.md, "Site to site"), so compare the writer's numbers of the same round, best
the first, and keep ``--requests`` × ``--rounds`` × 2 KiB well below that.

    .venv/bin/python bench/ingest_cpu.py --connections 256 --requests 100000
    .venv/bin/python bench/ingest_cpu.py --connections 8 --batch 1000 --requests 200000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import hashlib
import os
import pstats
import sys
import tempfile
import time
import uuid

import uvloop

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from httpclient import nsb_request  # noqa: E402

from gwcore import Settings  # noqa: E402
from gwcore._core import core  # noqa: E402
from gwcore.egress import wire_headers  # noqa: E402
from gwcore.http import HTTPProtocol, HTTPState  # noqa: E402
from gwcore import malloc  # noqa: E402
from gwcore.server import settle_gc  # noqa: E402
from gwcore.store import Store, Writer  # noqa: E402

BODY = b'{"Payload":"' + b"x" * 1010 + b'"}'


class FakeTransport(asyncio.Transport):
    """Counts answers; the protocol never notices there is no socket."""

    def __init__(self, done: asyncio.Event, counter: list) -> None:
        super().__init__()
        self._done, self._counter = done, counter
        self.closing = False

    def write(self, data: bytes) -> None:
        self._counter[0] -= 1
        if self._counter[0] == 0:
            self._done.set()

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def requests(n: int) -> list[bytes]:
    md5 = base64.b64encode(hashlib.md5(BODY).digest()).decode()
    del md5  # nsb_request computes it
    return [nsb_request(str(uuid.uuid4()), body=BODY) for _ in range(n)]


#: a message as gwcore sends it to a site (about 20 wire headers, like bench/load/site_to_site.py's)
BATCH_HEADERS = {
    "NServiceBus.MessageIntent": "Send",
    "NServiceBus.EnclosedMessageTypes": "Shared.UpdatePrice, Shared, Version=1.0.0.0, Culture=neutral, PublicKeyToken=null",
    "NServiceBus.ContentType": "application/json",
    "NServiceBus.ReplyToAddress": "Headquarters",
    "NServiceBus.OriginatingMachine": "HQ-SRV01",
    "NServiceBus.OriginatingEndpoint": "Headquarters",
    "NServiceBus.Version": "10.2.8",
    "NServiceBus.TimeSent": "2026-12-06 00:00:00:000000 Z",
    "NServiceBus.OriginatingSite": "http,http://127.0.0.1:1/Headquarters/",
}


def batch_requests(n: int, per_batch: int) -> list[bytes]:
    """n messages in requests of per_batch each (a gwcore batch, docs/protocol.md)."""
    out = []
    for start in range(0, n, per_batch):
        messages = []
        for _ in range(min(per_batch, n - start)):
            msg_id = str(uuid.uuid4())
            headers = {"NServiceBus.MessageId": msg_id, "NServiceBus.CorrelationId": msg_id, **BATCH_HEADERS}
            lines = wire_headers(msg_id, headers, BODY, in_batch=True)
            messages.append((b"".join(b"%s: %s\r\n" % line for line in lines), BODY))
        body = core.encode_batch(messages)
        out.append(b"POST /RemoteSite/ HTTP/1.1\r\nHost: x\r\ngwcore-Batch: 1\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return out


def perf_control(args: argparse.Namespace, command: bytes) -> None:
    """Switch ``perf record --control fifo:CTL -D -1`` on around the measured part only."""
    if args.perf_control:
        with open(args.perf_control, "wb") as f:
            f.write(command + b"\n")


async def run(args: argparse.Namespace, data_dir: str) -> list[float]:
    loop = asyncio.get_running_loop()
    settings = Settings.from_env({}, data_dir=data_dir, endpoint="RemoteSite",
                                 receive_channels="http://127.0.0.1:0/RemoteSite/",
                                 store_sync=not args.nosync)
    store = Store(data_dir, map_size=1 << 30, sync=not args.nosync)
    writer = Writer(store, loop, max_batch=settings.commit_max_batch,
                    max_delay_us=settings.commit_max_delay_us, dedup_ttl=settings.dedup_ttl)
    state = HTTPState(settings, writer, channel_paths=["/RemoteSite/"])
    state.active = True
    state.start(loop)
    conns = []
    done = asyncio.Event()
    counter = [0]
    for _ in range(args.connections):
        proto = HTTPProtocol(state)
        proto.connection_made(FakeTransport(done, counter))
        conns.append(proto)
    settle_gc()  # the collector as `gwcore serve` sets it, and malloc as it does for a batch receiver
    if args.batch:
        malloc.tune()
    results = []
    profiler = cProfile.Profile() if args.profile else None
    for round_no in range(args.rounds):
        reqs = batch_requests(args.requests, args.batch) if args.batch else requests(args.requests)
        messages = args.requests
        before = thread_cpu()
        started_cpu = time.process_time()
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        perf_control(args, b"enable")
        i = 0
        per_wave = args.connections
        while i < len(reqs):
            wave = reqs[i:i + per_wave]
            done.clear()
            counter[0] = len(wave)
            for proto, data in zip(conns, wave):
                proto.data_received(data)
            await done.wait()
            i += per_wave
        perf_control(args, b"disable")
        if profiler:
            profiler.disable()
        cpu = time.process_time() - started_cpu
        wall = time.perf_counter() - started
        after = thread_cpu()
        main_tid = os.getpid()
        loop_us = (after.get(main_tid, 0) - before.get(main_tid, 0)) / messages * 1e6
        other_us = sum(after[t] - before.get(t, 0) for t in after if t != main_tid) / messages * 1e6
        us = cpu / messages * 1e6
        results.append(us)
        print(f"round {round_no + 1}: {us:.2f} us CPU/message (loop {loop_us:.1f}, writer {other_us:.1f}), "
              f"{messages / wall:,.0f} msg/s wall, {len(reqs)} requests, commits {writer.stats.batches}, "
              f"store {store.size_bytes() / (messages * (round_no + 1)):,.0f} bytes/message", flush=True)
    state.stop()
    writer.close()
    store.close()
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile_lines)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=0,
                        help="N messages per request, as gwcore batches (0: one NServiceBus submit each)")
    parser.add_argument("--perf-control", metavar="FIFO",
                        help="perf's control fifo: enabled only while the requests are being answered")
    parser.add_argument("--nosync", action="store_true", help="GWCORE_STORE_SYNC=0")
    parser.add_argument("--profile", action="store_true", help="cProfile the loop thread")
    parser.add_argument("--profile-lines", type=int, default=30)
    args = parser.parse_args()
    uvloop.install()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "var")) as tmp:
        results = asyncio.run(run(args, tmp))
    results.sort()
    print(f"best {results[0]:.2f} median {results[len(results) // 2]:.2f} us CPU/message")


if __name__ == "__main__":
    main()
