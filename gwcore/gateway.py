"""The embeddable gateway: store, writer thread, HTTP listeners and the local queue in one object.

::

    async with gwcore.Gateway(gwcore.Settings.from_env()) as gw:
        async for message in gw.messages():
            handle(message)
            await message.ack()
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Callable

from .config import Settings
from .consumer import LocalQueue, Message, load_handler, run_handler
from .http import HTTPProtocol, HTTPState
from .store import Store, Writer

__all__ = ("Gateway",)

log = logging.getLogger("gwcore")


class Gateway:
    """A receiving gateway on the embedded default (LMDB store, no broker).

    :param settings: the configuration (default: ``Settings.from_env()``).
    :param handler: optional sync or async callable taking one :class:`Message`; overrides
        ``GWCORE_HANDLER``. Each message is acknowledged after the handler returns.
    """

    def __init__(self, settings: Settings | None = None, *, handler: Callable[[Message], Any] | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self._handler = handler
        if handler is None and self.settings.handler:
            self._handler = load_handler(self.settings.handler)
        self.store: Store | None = None
        self.writer: Writer | None = None
        self.queue: LocalQueue | None = None
        self.states: list[HTTPState] = []
        self.servers: list[asyncio.base_events.Server] = []
        self._handler_task: asyncio.Task | None = None
        self._started = False
        self._stopped = False

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) of every listener (useful with port 0)."""
        return [s.sockets[0].getsockname()[:2] for s in self.servers if s.sockets]

    @property
    def ready(self) -> bool:
        return self._started and not self._stopped

    async def start(self) -> "Gateway":
        """Open the store, start the writer thread and the listeners."""
        s = self.settings
        loop = asyncio.get_running_loop()
        self.store = Store(s.data_dir, map_size=s.store_map_size, max_size=s.store_max_size, sync=s.store_sync)
        try:
            # Off the loop: loading a large dedup log into memory takes seconds.
            self.writer = await loop.run_in_executor(None, functools.partial(
                Writer, self.store, loop, max_batch=s.commit_max_batch,
                max_delay_us=s.commit_max_delay_us, dedup_ttl=s.dedup_ttl, cleanup_slice=s.dedup_cleanup_slice,
            ))
            self.queue = LocalQueue(self.store, self.writer, max_attempts=s.handler_max_attempts)
            self.writer.on_commit = self.queue.notify
            listeners: dict[tuple[str, int], list[str]] = {}
            for ch in s.receive_channels:
                listeners.setdefault((ch.host, ch.port), []).append(ch.path)
            for (host, port), paths in listeners.items():
                state = HTTPState(s, self.writer, channel_paths=paths, metrics_render=self.render_metrics)
                server = await loop.create_server(functools.partial(HTTPProtocol, state), host, port,
                                                  reuse_address=True, backlog=2048)
                state.start(loop)
                self.states.append(state)
                self.servers.append(server)
        except BaseException:
            await self._close_store()
            for server in self.servers:
                server.close()
            raise
        if not s.store_sync:
            log.warning("GWCORE_STORE_SYNC=0: commits are not fsync'd; a 200 does NOT mean durable")
        if self._handler is not None:
            self._handler_task = asyncio.ensure_future(
                run_handler(self.queue, self._handler, s.handler_concurrency))
        self._started = True
        for state in self.states:
            state.active = True
        bound = ", ".join(f"http://{h}:{p}" for h, p in self.addresses)
        log.info("gwcore %s ready: endpoint %r, channels %s on %s, data dir %s, handler %s",
                 _version(), s.endpoint, ", ".join(c.path for c in s.receive_channels), bound,
                 s.data_dir, s.handler or ("embedded" if self._handler else "none"))
        return self

    async def stop(self, timeout: float | None = None) -> None:
        """Graceful stop: refuse new connections, answer in-flight requests, commit, close."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for state in self.states:
            state.draining = True
            state.active = False
        for server in self.servers:
            server.close()
        for state in self.states:
            for conn in list(state.connections):
                conn.shutdown()
        while any(state.connections for state in self.states) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        leftover = sum(len(state.connections) for state in self.states)
        if leftover:
            log.warning("shutdown timeout: closing %d connections with requests in flight", leftover)
            for state in self.states:
                for conn in list(state.connections):
                    if conn.transport is not None:
                        conn.transport.abort()
        if self.queue is not None:
            self.queue.close()
        if self._handler_task is not None:
            try:
                await asyncio.wait_for(self._handler_task, max(0.1, deadline - loop.time()))
            except asyncio.TimeoutError:
                log.warning("shutdown timeout: handlers still running were cancelled (their messages stay queued)")
        for state in self.states:
            state.stop()
        for server in self.servers:
            await server.wait_closed()
        await self._close_store()
        log.info("gwcore stopped")

    async def _close_store(self) -> None:
        if self.writer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.writer.close)
        if self.store is not None:
            self.store.close()

    async def __aenter__(self) -> "Gateway":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    def messages(self) -> LocalQueue:
        """The local queue as an async iterator of :class:`Message`; call ``await m.ack()``."""
        if self.queue is None:
            raise RuntimeError("the gateway is not started")
        return self.queue

    # -- metrics -----------------------------------------------------------------------------------

    def render_metrics(self) -> str:
        """Prometheus text exposition of the gateway's counters."""
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")

        statuses: dict[int, int] = {}
        rejected = 0
        for state in self.states:
            for status, n in state.requests_by_status.items():
                statuses[status] = statuses.get(status, 0) + n
            rejected += state.rejected_connections
        metric("gwcore_http_requests_total", "counter", "HTTP requests answered, by status.",
               [(f'{{status="{k}"}}', v) for k, v in sorted(statuses.items())])
        metric("gwcore_http_connections", "gauge", "Open client connections.",
               [("", sum(len(s.connections) for s in self.states))])
        metric("gwcore_http_connections_refused_total", "counter", "Connections refused (limit or draining).",
               [("", rejected)])
        w = self.writer
        if w is not None:
            st = w.stats
            metric("gwcore_messages_accepted_total", "counter", "Messages stored for the first time.", [("", st.accepted)])
            metric("gwcore_messages_duplicate_total", "counter", "Submits of ids already stored (answered 200, not stored).",
                   [("", st.duplicates)])
            metric("gwcore_messages_refused_store_full_total", "counter", "New messages refused because the store is full.",
                   [("", st.refused_full)])
            metric("gwcore_store_commit_failures_total", "counter", "Write transactions that failed.", [("", st.commits_failed)])
            metric("gwcore_dedup_expired_total", "counter", "Dedup records removed by retention.", [("", st.expired_records)])
            metric("gwcore_store_map_resizes_total", "counter", "LMDB map size increases.", [("", st.map_resizes)])
            out.extend(_histogram("gwcore_commit_batch_size", "Jobs per write transaction.",
                                  st.batch_size_buckets, st.batch_size_counts, st.batch_size_sum))
            out.extend(_histogram("gwcore_commit_seconds", "Write transaction time including fsync.",
                                  st.commit_buckets, st.commit_counts, st.commit_sum))
            metric("gwcore_ingest_pending", "gauge", "Jobs waiting for the writer thread.", [("", w.pending)])
        if self.store is not None and self._started and not self._stopped:
            counts = self.store.counts()
            metric("gwcore_queue_depth", "gauge", "Messages in the local queue.", [("", counts["queue"])])
            metric("gwcore_error_queue_depth", "gauge", "Messages in the error store.", [("", counts["errors"])])
            metric("gwcore_dedup_records", "gauge", "Dedup records held.", [("", counts["dedup"])])
            metric("gwcore_store_bytes", "gauge", "Bytes used in the LMDB environment.", [("", self.store.size_bytes())])
            metric("gwcore_store_map_bytes", "gauge", "Current LMDB map size.", [("", self.store.map_size)])
        q = self.queue
        if q is not None:
            metric("gwcore_consumer_delivered_total", "counter", "Deliveries to consumers.", [("", q.delivered)])
            metric("gwcore_consumer_acked_total", "counter", "Messages acknowledged and removed.", [("", q.acked)])
            metric("gwcore_consumer_failed_total", "counter", "Handler attempts that failed.", [("", q.failed)])
            metric("gwcore_consumer_expired_total", "counter", "Messages discarded after their TimeToBeReceived.",
                   [("", q.expired)])
            metric("gwcore_consumer_poisoned_total", "counter", "Messages moved to the error store.", [("", q.poisoned)])
        metric("gwcore_role", "gauge", "1 for the role this instance has.",
               [(f'{{mode="{self.settings.mode}",role="active"}}', 1 if self.ready else 0)])
        return "\n".join(out) + "\n"


def _histogram(name: str, help_text: str, bounds: tuple, counts: list[int], total: float) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    running = 0
    for bound, n in zip(bounds, counts):
        running += n
        lines.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
    running += counts[-1]
    lines.append(f'{name}_bucket{{le="+Inf"}} {running}')
    lines.append(f"{name}_sum {total:g}")
    lines.append(f"{name}_count {running}")
    return lines


def _version() -> str:
    from ._version import __version__

    return __version__
