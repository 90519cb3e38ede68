#!/usr/bin/env python3
"""A TCP proxy that delays every byte by half a round trip each way: a long link without a
bandwidth limit, for bench/load/site_to_site.py.

Each accepted connection gets its own connection to ``--target``. Whatever one side sends is
written to the other ``--rtt``/2 milliseconds after it arrived, in arrival order; an end of stream
or a close travels the same way, behind the bytes sent before it. Nothing limits the rate: a
direction holds as many bytes as arrive in half a round trip. Back-pressure is the transports':
when the side being written to cannot keep up (``pause_writing``), or a direction already holds
``--max-held`` bytes, the side sending is no longer read until it drains.

With ``--handshake`` a new connection's first bytes also wait for the round trip a TCP handshake
costs (they leave at most one RTT + RTT/2 after the connection was accepted), as a client on a
real long link can only send once its SYN has been answered.

Prints ``listening on 127.0.0.1:PORT`` once it accepts connections; on SIGTERM or SIGINT it
closes, and prints one JSON line of counts (connections, bytes each way) on standard output.

    .venv/bin/python bench/load/delay_proxy.py --target 127.0.0.1:8080 --rtt 50
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import heapq
import itertools
import json
import signal
import sys
from typing import Any

_EOF, _CLOSE = object(), object()       # markers that travel in a direction's queue behind its bytes
_EARLY = 0.0005                         # the loop's timers have 1 ms steps: due within this is due


class Stats:
    def __init__(self) -> None:
        self.connections = 0
        self.open = 0
        self.max_open = 0
        self.failed_connects = 0
        self.bytes = {"up": 0, "down": 0}   # up: client → target, down: target → client


class DelayLine:
    """When each direction next has something due (one entry per direction that holds anything):
    one timer in the loop however many connections there are, and every direction due at a tick
    flushed in one go."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.heap: list[tuple[float, int, Direction]] = []
        self.seq = itertools.count()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0

    def add(self, due: float, direction: Direction) -> None:
        heapq.heappush(self.heap, (due, next(self.seq), direction))
        if self.timer is None or due < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = due
            self.timer = self.loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self.timer = None
        heap = self.heap
        limit = self.loop.time() + _EARLY
        while heap and heap[0][0] <= limit:
            heapq.heappop(heap)[2].flush(limit)
        if heap and self.timer is None:          # (a flush may have armed it already)
            self.timer_at = heap[0][0]
            self.timer = self.loop.call_at(self.timer_at, self._fire)


class Direction:
    """One way of one connection: bytes from ``src`` written to ``dst`` ``delay`` seconds after
    they arrived, in the order they arrived (its own queue; the delay line says when)."""

    def __init__(self, line: DelayLine, name: str, delay: float, max_held: int,
                 stats: Stats, not_before: float = 0.0) -> None:
        self.line = line
        self.loop = line.loop
        self.name = name
        self.delay = delay
        self.max_held = max_held
        self.stats = stats
        self.not_before = not_before          # --handshake: nothing leaves before this loop time
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.queue: collections.deque[tuple[float, Any]] = collections.deque()
        self.held = 0
        self.scheduled = False                # in the delay line, for the head of the queue
        self.dst_paused = False               # the destination's pause_writing
        self.src_paused = False               # we stopped reading the source
        self.done = False                     # the close went through; drop anything later

    # -- the source side ---------------------------------------------------------------------

    def push(self, item: Any) -> None:
        if self.done:
            return
        due = max(self.loop.time(), self.not_before) + self.delay
        if isinstance(item, bytes):
            self.held += len(item)
            self.stats.bytes[self.name] += len(item)
        if self.delay <= 0 and not self.queue and self.dst is not None and due <= self.loop.time():
            self._deliver(item)
        else:
            self.queue.append((due, item))
            self._schedule()
        self._update_reading()

    # -- the destination side ----------------------------------------------------------------

    def attach_dst(self, transport: asyncio.Transport) -> None:
        self.dst = transport
        self._schedule()                         # what came before the target's connection was up

    def pause_writing(self) -> None:
        self.dst_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.dst_paused = False
        self._update_reading()

    def _schedule(self) -> None:
        if not self.scheduled and self.queue and self.dst is not None:
            self.scheduled = True
            self.line.add(self.queue[0][0], self)

    def flush(self, limit: float) -> None:
        """Write everything due by ``limit``, in order; the delay line calls it."""
        self.scheduled = False
        chunks: list[bytes] = []
        while self.queue and self.queue[0][0] <= limit:
            _due, item = self.queue.popleft()
            if isinstance(item, bytes):
                chunks.append(item)
                continue
            if chunks:
                self._deliver(b"".join(chunks))
                chunks = []
            self._deliver(item)
        if chunks:
            self._deliver(b"".join(chunks))
        self._schedule()
        self._update_reading()

    def _deliver(self, item: Any) -> None:
        dst = self.dst
        if isinstance(item, bytes):
            self.held -= len(item)
            if dst is not None and not dst.is_closing():
                dst.write(item)
        elif item is _EOF:
            if dst is not None and not dst.is_closing() and dst.can_write_eof():
                dst.write_eof()
        elif item is _CLOSE:
            self.done = True
            self.queue.clear()
            self.held = 0
            if dst is not None:
                dst.close()                    # after what it still buffers

    def _update_reading(self) -> None:
        src = self.src
        if src is None or src.is_closing():
            return
        stop = self.dst_paused or self.held > self.max_held
        if stop and not self.src_paused:
            self.src_paused = True
            src.pause_reading()
        elif not stop and self.src_paused and self.held <= self.max_held // 2:
            self.src_paused = False
            src.resume_reading()



class End(asyncio.Protocol):
    """One side's transport: what it reads goes into ``out``; ``inbound`` writes to it."""

    def __init__(self, out: Direction, inbound: Direction, on_lost: Any = None) -> None:
        self.out = out
        self.inbound = inbound
        self.on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.out.src = transport                 # type: ignore[assignment]
        self.inbound.attach_dst(transport)       # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.out.push(data)

    def eof_received(self) -> bool:
        self.out.push(_EOF)
        return True                              # keep writing what the other side still sends

    def pause_writing(self) -> None:
        self.inbound.pause_writing()

    def resume_writing(self) -> None:
        self.inbound.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.out.push(_CLOSE)
        self.inbound.done = True                 # nothing more can be written to this side
        self.inbound.queue.clear()
        self.inbound.held = 0
        if self.on_lost is not None:
            self.on_lost()


class Client(End):
    """An accepted connection: opens its own connection to the target."""

    def __init__(self, cfg: argparse.Namespace, stats: Stats, line: DelayLine) -> None:
        delay = cfg.rtt / 2000.0
        not_before = line.loop.time() + cfg.rtt / 1000.0 if cfg.handshake else 0.0
        up = Direction(line, "up", delay, cfg.max_held, stats, not_before)
        down = Direction(line, "down", delay, cfg.max_held, stats)
        super().__init__(up, down, on_lost=self._lost)
        self.cfg = cfg
        self.stats = stats
        self.target: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport = transport
        self.stats.connections += 1
        self.stats.open += 1
        self.stats.max_open = max(self.stats.max_open, self.stats.open)
        self.task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.cfg.target_host, self.cfg.target_port
        try:
            # the target side writes into `down` and is written from `up`
            transport, _ = await loop.create_connection(lambda: End(self.inbound, self.out), host, port)
        except OSError:
            self.stats.failed_connects += 1
            self.transport.close()
            return
        self.target = transport                  # type: ignore[assignment]
        if self.out.done:                        # the client went away meanwhile
            transport.close()

    def _lost(self) -> None:
        self.stats.open -= 1
        if self.target is None and self.task is not None and not self.task.done():
            self.task.cancel()


async def serve(cfg: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stats = Stats()
    line = DelayLine(loop)
    server = await loop.create_server(lambda: Client(cfg, stats, line), cfg.host, cfg.port, backlog=4096,
                                      reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on {cfg.host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    return {"port": port, "rtt_ms": cfg.rtt, "connections": stats.connections, "max_open": stats.max_open,
            "failed_connects": stats.failed_connects, "bytes_up": stats.bytes["up"],
            "bytes_down": stats.bytes["down"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="where every connection goes")
    p.add_argument("--rtt", type=float, required=True, help="round-trip time to add, ms (half each way)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="listening port (default: a free one, printed)")
    p.add_argument("--handshake", action="store_true",
                   help="a connection's first bytes also wait one RTT, as for a TCP handshake")
    p.add_argument("--max-held", type=int, default=64 << 20,
                   help="bytes one direction of a connection may hold before its sender is no longer read")
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = build_parser().parse_args(argv)
    host, _, port = cfg.target.rpartition(":")
    cfg.target_host, cfg.target_port = host or "127.0.0.1", int(port)
    if cfg.rtt < 0:
        raise SystemExit("--rtt must be 0 or more")
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    print(json.dumps(run(serve(cfg))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
