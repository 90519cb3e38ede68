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
import os
import ssl
import uuid
from typing import Any, Callable, Iterable, Mapping

from . import databus, egress, metrics
from ._core import core
from .config import Settings
from .control import ControlServer
from .databus import BlobWriter
from .consumer import LocalQueue, Message, load_handler, run_handler
from .distributor import Distributor, WorkerProtocol, check_channels
from .errors import ConfigurationError, GatewayError
from .http import HTTPProtocol, HTTPState, listener_metrics
from .lease import LeaseWaiter, lease_holder, try_lease
from .records import now_ms
from .store import Store, Writer

__all__ = ("Gateway",)

log = logging.getLogger("gwcore")


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: The modules of the RabbitMQ client (the rabbitmq extra) that selected mode imports.
BROKER_CLIENT_MODULES = ("aio_pika", "aiormq", "pamqp")
BROKER_CLIENT_INSTALL = "pip install 'gwcore[rabbitmq]'"
#: The PostgreSQL client (the postgresql extra) of selected mode with GWCORE_TRANSPORT=postgresql.
PG_CLIENT_MODULES = ("asyncpg",)
PG_CLIENT_INSTALL = "pip install 'gwcore[postgresql]'"


def _import_selected(transport: str) -> Any:
    """Selected mode's class for *transport* (``GWCORE_TRANSPORT``), or stop with the one line
    that says what to install: each transport's client is an extra, not a dependency of every
    gateway."""
    try:
        if transport == "postgresql":
            from .pgsql import PgSelected

            return PgSelected
        from .selected import Selected

        return Selected
    except ImportError as exc:
        modules, install, what = ((PG_CLIENT_MODULES, PG_CLIENT_INSTALL, "GWCORE_TRANSPORT=postgresql needs asyncpg")
                                  if transport == "postgresql" else
                                  (BROKER_CLIENT_MODULES, BROKER_CLIENT_INSTALL,
                                   "GWCORE_MODE=selected needs the RabbitMQ client"))
        if (exc.name or "").partition(".")[0] not in modules:
            raise
        raise ConfigurationError(f"{what}, and {exc.name} is not installed: {install}") from None


def _os_reason(exc: OSError) -> str:
    """Why a socket could not be opened, in the system's words ("Address already in use"),
    without the loop's own wording around it."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


class Gateway:
    """A receiving gateway on the embedded default (LMDB store, no broker).

    :param settings: the configuration (default: ``Settings.from_env()``).
    :param handler: optional sync or async callable taking one :class:`Message`; overrides
        ``GWCORE_HANDLER``. Each message is acknowledged after the handler returns.
    """

    def __init__(self, settings: Settings | None = None, *, handler: Callable[[Message], Any] | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self._handler = handler
        if self.settings.mode == "distributor" and (handler is not None or self.settings.handler):
            raise ConfigurationError("GWCORE_MODE=distributor hands messages to `gwcore worker` processes: "
                                     "GWCORE_HANDLER (or handler=) is for standalone mode")
        if handler is None and self.settings.handler:
            self._handler = load_handler(self.settings.handler)
        self.store: Store | None = None
        self.writer: Writer | None = None
        self.blobs: BlobWriter | None = None
        self.queue: LocalQueue | None = None
        self.states: list[HTTPState] = []
        self.servers: list[asyncio.base_events.Server] = []
        #: Distributor mode: the worker listener (GWCORE_WORKER_LISTEN), also in servers/states.
        self.worker_server: asyncio.base_events.Server | None = None
        #: The admin listener (GWCORE_ADMIN_LISTEN), also in servers/states.
        self.admin_server: asyncio.base_events.Server | None = None
        self._handler_task: asyncio.Task | None = None
        self.distributor: Distributor | None = None
        #: Distributor mode: the worker calls over HTTP, attached to the listeners as worker_api.
        self.worker_protocol: WorkerProtocol | None = None
        self.forwarder: egress.Forwarder | None = None
        self.control: ControlServer | None = None
        self._requests: dict[str, asyncio.Future[Message]] = {}
        self._started = False
        self._stopped = False
        self.role = "starting"  # then "passive" or "active"; "stopped" after stop()
        self._takeover: asyncio.Task[None] | None = None
        self._activating = False
        self.selected: Any = None  # gwcore.selected.Selected or gwcore.pgsql.PgSelected in GWCORE_MODE=selected
        self.stop_requested = asyncio.Event()  # `gwcore handover` asks the serving process to stop
        #: What ended the gateway's work after it started (:meth:`fail`); None while it goes on.
        self.failure: GatewayError | None = None
        #: The handler calls' times (gwcore_handler_seconds).
        self.handler_seconds = metrics.Buckets()
        #: What GET /metrics exposes: this gateway's families and the process's (docs/operations.md).
        self.metrics_registry = metrics.registry_for(self)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) of every receive channel's listener (useful with port 0)."""
        return [s.sockets[0].getsockname()[:2] for s in self.servers
                if s.sockets and s is not self.worker_server and s is not self.admin_server]

    @property
    def worker_address(self) -> tuple[str, int] | None:
        """The bound (host, port) of the worker listener (distributor mode), if there is one."""
        ws = self.worker_server
        return ws.sockets[0].getsockname()[:2] if ws is not None and ws.sockets else None

    @property
    def admin_address(self) -> tuple[str, int] | None:
        """The bound (host, port) of the admin listener, if there is one."""
        a = self.admin_server
        return a.sockets[0].getsockname()[:2] if a is not None and a.sockets else None

    @property
    def reply_uri(self) -> str | None:
        """The address replies come back to (``NServiceBus.OriginatingSite``): GWCORE_REPLY_TO_URI,
        else the first receive channel, with the port it is bound to when it was given as 0."""
        uri = self.settings.reply_uri
        first = self.settings.receive_channels[0] if self.settings.receive_channels else None
        if uri is None or self.settings.reply_to_uri or first is None or first.port != 0 or not self.servers:
            return uri
        port = self.addresses[0][1]
        scheme = "https" if first.tls else "http"
        host = first.host if ":" not in first.host else f"[{first.host}]"
        return f"{scheme}://{host}:{port}{first.path}"

    @property
    def ready(self) -> bool:
        """Active and taking gateway traffic (in selected mode: the elected receiver)."""
        return self.role == "active" and not self._stopped and (self.selected is None or self.selected.accepting)

    @property
    def takeover(self) -> "asyncio.Task[None] | None":
        """A passive node's wait for the lease and its switch to active (None when not passive);
        it fails if the switch did (the node then has no role: stop it)."""
        return self._takeover

    async def start(self, *, listen: bool = True, forward: bool = True) -> "Gateway":
        """Open the store, start the writer thread, the forwarder and the listeners.

        With active/passive on (``GWCORE_HA``) and the data dir's lease held by another process,
        the listeners start as a passive node (503 ``passive``) and the rest follows the moment
        the lease is won (:attr:`takeover`).

        :param listen: open the receive channels and the control socket (False: store access only,
            as the CLI uses when no gateway runs on the data dir).
        :param forward: send queued outgoing messages (False: sends are only recorded).
        """
        s = self.settings
        if s.mode == "selected":
            _import_selected(s.transport)
        lease = None
        if listen and s.passive_allowed:
            lease = try_lease(s.data_dir)
            if lease is None:
                await self._listen("passive")
                self.role = "passive"
                self._started = True
                self._takeover = asyncio.ensure_future(self._take_over(forward))
                log.info("role: passive: the data dir %s is leased by %s; listening on %s and answering 503 "
                         "until the lease is ours", s.data_dir, lease_holder(s.data_dir), self._bound())
                return self
        await self._activate(lease, listen=listen, forward=forward)
        self._started = True
        return self

    async def _take_over(self, forward: bool) -> None:
        loop = asyncio.get_running_loop()
        waiting_since = loop.time()
        waiter = LeaseWaiter(self.settings.data_dir, loop)
        lease = await waiter.acquire()
        won = loop.time()
        self._activating = True
        log.info("role: passive -> active: lease won after %.1f s of waiting; opening the store", won - waiting_since)
        try:
            await self._activate(lease, listen=True, forward=forward)
        except BaseException:
            log.exception("role: the takeover failed: this node is neither active nor passive any more")
            self.role = "failed"
            raise
        log.info("role: active: took over in %.0f ms after the lease was won", (loop.time() - won) * 1000)

    async def _listen(self, role: str = "unavailable") -> None:
        """Open the receive channels; their states refuse submits until the node is active. Each
        listener has its *role* before its first connection: a passive node never answers as
        anything but passive."""
        s = self.settings
        loop = asyncio.get_running_loop()
        listeners: dict[tuple[str, int], list[str]] = {}
        tls_ports = {(ch.host, ch.port) for ch in s.receive_channels if ch.tls}
        for ch in s.receive_channels:
            listeners.setdefault((ch.host, ch.port), []).append(ch.path)
        tls_context = _server_ssl_context(s) if tls_ports else None
        distributor = s.mode == "distributor"
        wl = s.worker_listen if distributor else None
        if wl is not None and wl.tls and tls_context is None:
            tls_context = _server_ssl_context(s)
        try:
            public = self._exposition if s.metrics_public_on() else None
            for (host, port), paths in listeners.items():
                state = HTTPState(s, channel_paths=paths, metrics_render=public)
                # the worker API on a receive channel only when every worker call is signed
                state.serves_workers = distributor and bool(s.worker_keys)
                state.set_role(role)
                try:
                    server = await loop.create_server(functools.partial(HTTPProtocol, state), host, port,
                                                      reuse_address=True, backlog=2048,
                                                      ssl=tls_context if (host, port) in tls_ports else None)
                except OSError as exc:
                    raise ConfigurationError(f"GWCORE_RECEIVE_CHANNELS: cannot listen on {_host_port(host, port)}: "
                                             f"{_os_reason(exc)}") from None
                state.start(loop)
                self.states.append(state)
                self.servers.append(server)
            if wl is not None:
                self.worker_server = await self._listen_apart(
                    f"GWCORE_WORKER_LISTEN={wl}", wl.host, wl.port, role, serves_workers=True, backlog=512,
                    metrics=s.metrics_public_on(workers=True), tls=tls_context if wl.tls else None)
            al = s.admin_listen
            if al is not None:
                self.admin_server = await self._listen_apart(f"GWCORE_ADMIN_LISTEN={al.host}:{al.port}", al.host,
                                                             al.port, role, metrics=True)
        except BaseException:
            self._close_listeners()
            raise

    async def _listen_apart(self, what: str, host: str, port: int, role: str, *, metrics: bool,
                            serves_workers: bool = False, backlog: int = 64,
                            tls: ssl.SSLContext | None = None) -> asyncio.base_events.Server:
        """A listener with no receive channel: the worker listener (*serves_workers*), or the
        admin listener (``/metrics``, ``/healthz``, ``/readyz``; every other path 404)."""
        state = HTTPState(self.settings, channel_paths=[], metrics_render=self._exposition if metrics else None)
        state.serves_workers = serves_workers
        state.set_role(role)
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(functools.partial(HTTPProtocol, state), host, port,
                                              reuse_address=True, backlog=backlog, ssl=tls)
        except OSError as exc:
            raise ConfigurationError(f"{what}: cannot listen there: {_os_reason(exc)}") from None
        state.start(loop)
        self.states.append(state)
        self.servers.append(server)
        return server

    def _close_listeners(self) -> None:
        for state in self.states:
            state.stop()
        for server in self.servers:
            server.close()

    async def _activate(self, lease: int | None, *, listen: bool, forward: bool) -> None:
        """Everything an active node runs, started once the data dir's lease is ours: the same
        path for a first start and for a passive node's takeover."""
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            self.store = Store(s.data_dir, map_size=s.store_map_size, max_size=s.store_max_size,
                               sync=s.store_sync, lease=lease, blob_dir=s.blob_dir or None, file_mode=s.file_mode,
                               preallocate=s.store_preallocate)
            # Off the loop: loading a large dedup log into memory takes seconds.
            self.writer = await loop.run_in_executor(None, functools.partial(
                Writer, self.store, loop, max_batch=s.commit_max_batch,
                max_delay_us=s.commit_max_delay_us, dedup_ttl=s.dedup_ttl, cleanup_slice=s.dedup_cleanup_slice,
                databus_ttl=s.databus_ttl,
            ))
            self.blobs = BlobWriter(s.data_dir, loop, direct_io=s.blob_direct_io, directory=self.store.blob_dir,
                                    prefix=self.store.blob_prefix, modes=self.store.modes)
            self.queue = LocalQueue(self.store, self.writer, max_attempts=s.handler_max_attempts)
            self.queue.intercept = self._intercept_reply
            self.writer.on_commit = self.queue.notify
            if s.mode == "distributor":
                check_channels([ch.path for ch in s.receive_channels])
                self.distributor = Distributor(self.queue, self.store, self.writer, lease=s.worker_lease,
                                               max_capacity=s.worker_max_capacity,
                                               max_sessions=s.worker_max_sessions)
                self.worker_protocol = WorkerProtocol(self.distributor, s.worker_keys, s.auth_max_skew)
            if forward:
                self.forwarder = egress.Forwarder(s, self.store, self.writer)
                await self.forwarder.start()
            if listen and not self.servers:
                await self._listen()
            worker_api = self.worker_protocol.handle if self.worker_protocol is not None else None
            for state in self.states:
                state.attach(writer=self.writer, blobs=self.blobs, worker_api=worker_api)
            await self._start_mode()
        except BaseException:
            if self.forwarder is not None:
                await self.forwarder.stop()
            await self._close_store()
            self.forwarder, self.writer, self.store = None, None, None  # stop() must not close them again
            self._close_listeners()
            raise
        if listen:
            self.control = ControlServer(self)
            await self.control.start()
        if not s.store_sync:
            log.warning("GWCORE_STORE_SYNC=0: commits are not fsync'd; a 200 does NOT mean durable")
        if self.distributor is not None and listen:
            self.distributor.start()
        if self._handler is not None and listen:
            self._handler_task = asyncio.ensure_future(
                run_handler(self.messages(), self._handler, s.handler_concurrency, self.handler_seconds))  # type: ignore[arg-type]
        self.role = "active"
        if self.selected is None:
            self._set_role("active")
        else:
            self.selected.update_listeners()
        if not listen:
            return
        log.info("gwcore %s ready: endpoint %r, channels %s on %s, data dir %s, handler %s",
                 _version(), s.endpoint, ", ".join(c.path for c in s.receive_channels), self._bound(),
                 s.data_dir, "distributor workers" if self.distributor else
                 s.handler or ("embedded" if self._handler else "none"))
        if s.passive_allowed:
            log.info("role: active (mode %s): this node holds the lease on %s", s.mode, s.data_dir)
        if self.distributor is not None:
            (log.info if s.worker_keys or self.worker_address else log.warning)("workers: %s", self._workers_served())
        if s.sites:
            log.info("sending to %s; replies to %s", ", ".join(
                f"{x.key} at {x.url} ({'signed' if x.secret else 'unsigned'})" for x in s.sites), s.reply_uri)
        log.info("metrics: %s", self._metrics_served())
        if s.receive_keys:
            log.info("receiving: signed requests from %s%s", ", ".join(k for k, _ in s.receive_keys),
                     "; unsigned requests accepted too (allow_unsigned)" if s.allow_unsigned else "; unsigned refused (401)")
        else:
            log.info("receiving: no site secrets configured, any sender is accepted (as NServiceBus does)")

    async def _start_mode(self) -> None:
        """What GWCORE_MODE runs beside the gateway (the distributor, the broker link of selected
        mode), started after the store and before the node reports active; on a first start and
        on a takeover alike."""
        if self.settings.mode != "selected" or self.selected is not None:
            return
        sel = self.selected = _import_selected(self.settings.transport)(self)
        sel.consume = self._handler is not None and bool(self.states)  # a gateway that listens runs it
        sel.messages.intercept = self._intercept_reply
        for state in self.states:
            # submits go through the mode's ingest sink (the outbox and the broker, or the
            # database), so not straight into the writer's compiled inbox
            state.attach(writer=sel.sink, inbox=None, blobs=self.blobs, hold=sel.handover.hold)
        await sel.start()

    async def _stop_mode(self) -> None:
        """Stops what :meth:`_start_mode` started, before the store closes."""
        if self.selected is not None:
            await self.selected.stop()

    def _set_role(self, role: str, reason: str | None = None) -> None:
        """Every listener's role (``HTTPState.set_role``): the gateway is the only one that sets it."""
        for state in self.states:
            state.set_role(role, reason)

    def fail(self, exc: GatewayError) -> None:
        """Something the gateway runs cannot go on, for a reason no retry changes (in selected
        mode on PostgreSQL: the database, reachable at last, refused the tables). The serving
        process stops and exits with *exc* as its error (``gwcore serve``); an embedding program
        sees :attr:`failure` and :attr:`stop_requested`."""
        if self.failure is None:
            self.failure = exc
        self.stop_requested.set()

    def set_accepting(self, accepting: bool, reason: str) -> None:
        """Selected mode: the listeners take traffic (the elected receiver) or answer 503 *reason*."""
        self._set_role("active" if accepting else "unavailable", None if accepting else reason)

    def _workers_served(self) -> str:
        """Where the worker API is served, and how it is authenticated (the start-up log line)."""
        s = self.settings
        wa = self.worker_address
        if wa is not None:
            host = f"[{wa[0]}]" if ":" in wa[0] else wa[0]
            listener = f"{'https' if s.worker_listen.tls else 'http'}://{host}:{wa[1]}"  # type: ignore[union-attr]
        if s.worker_keys:
            where = f"the receive channels{f' and the worker listener {listener}' if wa else ''}"
            return f"signed calls only (worker keys {', '.join(k for k, _ in s.worker_keys)}) on {where}"
        if wa is not None:
            return (f"no worker keys: served unsigned on the loopback worker listener {listener} only, "
                    "not on the receive channels (set GWCORE_WORKER_KEYS to serve signed workers there)")
        return "no worker keys and GWCORE_WORKER_LISTEN=off: the worker API is served nowhere, no worker can enlist"

    def _metrics_served(self) -> str:
        """Where /metrics is served (the start-up log line; docs/security.md, "Metrics")."""
        s = self.settings
        where = []
        if self.admin_address is not None:
            host, port = self.admin_address
            where.append(f"the admin listener http://{f'[{host}]' if ':' in host else host}:{port}")
        if s.metrics_public_on():
            where.append("the receive channels")
        if self.worker_address is not None and s.metrics_public_on(workers=True):
            where.append("the worker listener")
        if not where:
            return ("/metrics served nowhere: no GWCORE_ADMIN_LISTEN, and the receive channels do not serve it "
                    "(they require signed requests, or GWCORE_METRICS_PUBLIC=0)")
        return "/metrics on " + " and ".join(where)

    def _bound(self) -> str:
        scheme = "https" if any(c.tls for c in self.settings.receive_channels) else "http"
        return ", ".join(f"{scheme}://{h}:{p}" for h, p in self.addresses)

    async def stop(self, timeout: float | None = None) -> None:
        """Graceful stop: refuse new connections, answer in-flight requests, commit, close."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        await self._end_takeover()
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.selected is not None:
            # a leader passes the leadership first: drain, flush, release, hand the held submits on
            await self.selected.step_down(timeout)
        self._set_role("draining")
        if self.distributor is not None:
            await self.distributor.close()  # waiting takes are answered, so their connections can close
        for server in self.servers:
            server.close()
        if self.control is not None:
            await self.control.stop()
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
        if self.selected is not None:
            self.selected.messages.close()
        if self._handler_task is not None:
            try:
                await asyncio.wait_for(self._handler_task, max(0.1, deadline - loop.time()))
            except asyncio.TimeoutError:
                log.warning("shutdown timeout: handlers still running were cancelled (their messages stay queued)")
        for state in self.states:
            state.stop()
        for server in self.servers:
            await server.wait_closed()
        if self.role == "active":
            await self._stop_mode()
        if self.forwarder is not None:
            await self.forwarder.stop()  # records not yet confirmed stay queued for the next start
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(GatewayError("the gateway stopped before the reply arrived"))
        role, self.role = self.role, "stopped"
        await self._close_store()  # releases the lease: a passive node takes over now
        log.info("gwcore stopped%s", " (lease released)" if role == "active" and self.settings.passive_allowed else "")

    async def _end_takeover(self) -> None:
        """A passive node stops waiting; a takeover already past winning the lease completes
        first (then the node stops as an active one)."""
        task = self._takeover
        if task is None or task.done():
            return
        if not self._activating:
            task.cancel()
        try:
            await task
        except BaseException:  # cancelled, or the failure it logged already
            pass

    async def _close_store(self) -> None:
        if self.blobs is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.blobs.close)
            self.blobs = None
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
        if self.selected is not None:
            self.selected.start_consuming()  # every instance consumes the endpoint's queue
            return self.selected.messages  # type: ignore[return-value]
        return self.queue

    # -- sending -----------------------------------------------------------------------------------

    def _require_started(self) -> tuple[Writer, egress.Forwarder | None]:
        if self.writer is None or self.store is None or not self._started or self._stopped:
            raise RuntimeError("the gateway is not running")
        return self.writer, self.forwarder

    def _schedule(self, forwarder: egress.Forwarder | None, seqs: list[tuple[int, str]]) -> None:
        if forwarder is not None:
            for seq, dest in seqs:
                forwarder.schedule(seq, dest)

    async def send_to_sites(self, sites: Iterable[str], body: bytes, headers: Mapping[str, str] | None = None,
                            *, message_id: str | None = None,
                            databus: Mapping[str, databus.Source] | None = None) -> str:
        """Queue *body* for each site (one copy per site, one message id) and return the id once
        the outgoing records are committed (fsync'd). The forwarder sends them afterwards.

        :param databus: large properties sent as claim-check parts (docs/sending.md): name ->
            bytes, a file path or a binary stream. Each is copied into this gateway's blob store
            (streamed, fsync'd) before the records commit, and travels as the header
            ``NServiceBus.DataBus.<name>`` plus one ``SingleCallDatabusProperty`` request.
        :raises gwcore.errors.UnknownSiteError: a site is not configured (every missing key named).
        """
        writer, forwarder = self._require_started()
        h, blobs = self._databus_headers(headers, databus)
        msg_id, items = egress.prepare(self.settings, list(sites), body, h, message_id,
                                       reply_uri=self.reply_uri)
        await self._queue_records(writer, forwarder, items, blobs)
        return msg_id

    async def send_many(self, messages: Iterable[tuple[Iterable[str], bytes] | tuple[Iterable[str], bytes,
                                                                                  Mapping[str, str] | None]],
                        ) -> list[str]:
        """Queue many messages at once: each ``(sites, body)`` or ``(sites, body, headers)`` as
        :meth:`send_to_sites` queues one, all committed in one transaction (one fsync), then
        sent by the forwarder (in batches to gwcore sites that take them). All or nothing: a bad
        message (an unknown site, a body that is not bytes) raises before anything is queued.

        :return: the message ids, in order.
        :raises gwcore.errors.UnknownSiteError: a site is not configured.
        """
        writer, forwarder = self._require_started()
        ids: list[str] = []
        items: list[tuple[str, bytes]] = []
        for message in messages:
            sites, body = message[0], message[1]
            headers = message[2] if len(message) > 2 else None  # type: ignore[misc]
            msg_id, copies = egress.prepare(self.settings, list(sites), body, headers, reply_uri=self.reply_uri)
            ids.append(msg_id)
            items += copies
        if items:
            await self._queue_records(writer, forwarder, items, [])
        return ids

    def _databus_headers(self, headers: Mapping[str, str] | None,
                         props: Mapping[str, databus.Source] | None) -> tuple[Mapping[str, str] | None, list]:
        """The headers with one ``NServiceBus.DataBus.<name>`` = new blob name per property."""
        if not props:
            return headers, []
        h = dict(headers or {})
        blobs = []
        for name, source in props.items():
            blob = databus.new_name(self.store.blob_prefix)  # type: ignore[union-attr]
            h[databus.databus_header(name)] = blob
            blobs.append((blob, source))
        return h, blobs

    async def _queue_records(self, writer: Writer, forwarder: egress.Forwarder | None,
                             items: list[tuple[str, bytes]], blobs: list) -> None:
        append = egress.append_records(self.store, items)  # type: ignore[arg-type]
        if blobs:
            loop = asyncio.get_running_loop()
            directory = self.store.blob_dir  # type: ignore[union-attr]
            modes = self.store.modes  # type: ignore[union-attr]
            copied = []
            try:
                for blob, source in blobs:
                    copied.append(await loop.run_in_executor(None, databus.copy_in, directory, source, blob, modes))
            except BaseException:
                databus.unlink(directory, [c[0] for c in copied] + [b for b, _s in blobs])
                raise
            expiry = writer.blob_expiry_ms(core.decode_envelope(items[0][1])[3], now_ms())
            jobs = [databus.record_blob(self.store, name, size, md5, sha, expiry) for name, size, md5, sha in copied]

            def append_with_blobs(txn: Any) -> list[int]:
                for record in jobs:
                    record(txn)
                return append(txn)

            try:
                seqs = await writer.call(append_with_blobs)
            except BaseException:
                databus.unlink(directory, [c[0] for c in copied])  # nothing names them
                raise
        else:
            seqs = await writer.call(append)
        self._schedule(forwarder, [(seq, dest) for seq, (dest, _f) in zip(seqs, items)])

    async def reply(self, incoming: Message, body: bytes, headers: Mapping[str, str] | None = None,
                    *, databus: Mapping[str, databus.Source] | None = None) -> str:
        """Send a reply to the site *incoming* came from (its ``NServiceBus.OriginatingSite``),
        with ``MessageIntent: Reply``, ``CorrelationId`` and ``RelatedTo`` set as NServiceBus does.
        *databus* as in :meth:`send_to_sites`."""
        writer, forwarder = self._require_started()
        dest = egress.reply_destination(incoming.headers)
        h = dict(headers or {})
        h["NServiceBus.MessageIntent"] = "Reply"
        route = incoming.headers.get("NServiceBus.ReplyToAddress")
        if route:
            # as NServiceBus's gateway does (protocol.md §4.4): the requester's own queue, so a
            # scaled-out requester delivers the reply to the instance that waits for it
            h.setdefault("NServiceBus.Header.RouteTo", route)
        h["NServiceBus.CorrelationId"] = incoming.headers.get("NServiceBus.CorrelationId", incoming.id)
        h["NServiceBus.RelatedTo"] = incoming.id
        if "NServiceBus.ConversationId" in incoming.headers:
            h.setdefault("NServiceBus.ConversationId", incoming.headers["NServiceBus.ConversationId"])
        h2, blobs = self._databus_headers(h, databus)
        msg_id, items = egress.prepare_to(self.settings, dest, body, h2, reply_uri=self.reply_uri)
        await self._queue_records(writer, forwarder, items, blobs)
        return msg_id

    async def request(self, site: str, body: bytes, headers: Mapping[str, str] | None = None,
                      *, timeout: float = 60.0, message_id: str | None = None,
                      databus: Mapping[str, databus.Source] | None = None) -> Message:
        """Send to *site* and wait for the reply (matched by correlation id); the reply is
        acknowledged (removed from the local queue) when it is returned.

        :param message_id: the request's id (default: a new UUID), e.g. to log it before sending.
        :raises TimeoutError: no reply within *timeout* seconds (the message names the id).
        :raises ValueError: a request with this *message_id* is already waiting.
        """
        msg_id = message_id or str(uuid.uuid4())
        if msg_id in self._requests:
            raise ValueError(f"a request with id {msg_id} is already waiting for its reply")
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._requests[msg_id] = fut
        try:
            if self.selected is not None:
                # the reply comes back through this instance's own queue, which must exist first
                await self.selected.wait_connected(timeout)
                headers = {**(headers or {}), "NServiceBus.ReplyToAddress": self.selected.reply_queue}
            await self.send_to_sites([site], body, headers, message_id=msg_id, databus=databus)
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"no reply to request {msg_id} from site {site!r} within {timeout:g} s") from None
        finally:
            self._requests.pop(msg_id, None)

    def _intercept_reply(self, msg: Message) -> bool:
        """A reply some request() waits for is handed to it instead of the consumers."""
        if not self._requests or msg.headers.get("NServiceBus.MessageIntent") != "Reply":
            return False
        fut = self._requests.get(msg.headers.get("NServiceBus.CorrelationId", ""))
        if fut is None or fut.done():
            return False
        fut.set_result(msg)
        return True

    async def retry_failed(self, ids: Iterable[str] | None = None) -> list[str]:
        """Move sends from the outgoing error queue back to the outgoing queue (all when *ids* is
        None); returns the message ids moved."""
        writer, forwarder = self._require_started()
        wanted = None if ids is None else set(ids)

        def match(seq: int, rec: egress.OutgoingRecord) -> bool:
            if wanted is None:
                return True
            return egress.record_id(rec) in wanted

        moved = await writer.call(egress.retry_failed(self.store, match))  # type: ignore[arg-type]
        self._schedule(forwarder, [(seq, dest) for seq, dest, _id in moved])
        return [msg_id for _seq, _dest, msg_id in moved]

    # -- metrics -----------------------------------------------------------------------------------

    def metric_families(self) -> metrics.Families:
        """Every metric family of this gateway, read now from the counters its parts keep: each
        part (the listeners, the writer, the store, the queue, the distributor, selected mode,
        the forwarder) gives its own (``metrics()``), and the gateway adds its role."""
        families = listener_metrics(self.states)
        if self.writer is not None:
            families += self.writer.metrics()
        live = self.store is not None and self._started and not self._stopped
        if live:
            families += self.store.metrics(replica=self.selected is not None)  # type: ignore[union-attr]
        if self.queue is not None:
            families += self.queue.metrics()
        families.append(metrics.histogram("gwcore_handler_seconds",
                                          "Time of one handler call (GWCORE_HANDLER, or handler=), whatever its outcome.",
                                          self.handler_seconds))
        if self.distributor is not None:
            families += self.distributor.metrics()
        if self.selected is not None:
            families += self.selected.metrics()
            families += self.selected.messages.metrics()
        if self.forwarder is not None:
            families += self.forwarder.metrics()
        mode = self.settings.mode
        families.append(metrics.gauge("gwcore_role", "1 for the role this instance has.", labels=("mode", "role"),
                                      samples=[((mode, role), int(self.role == role and not self._stopped))
                                               for role in ("active", "passive")]))
        if self.selected is not None:
            families.append(metrics.gauge("gwcore_selected_role", "1 for the selected-mode role this instance has.",
                                          labels=("role",), samples=[((r,), int(self.selected.role == r))
                                                                     for r in ("leader", "standby")]))
        families.append(metrics.build_info(_version(), mode))
        return families

    def render_metrics(self) -> str:
        """The Prometheus text exposition of this gateway (what ``GET /metrics`` answers)."""
        return self._exposition().decode()

    def _exposition(self) -> bytes:
        return metrics.render(self.metrics_registry)


def _server_ssl_context(s: Settings) -> ssl.SSLContext:
    """TLS for the https:// receive channels: TLS 1.2 or later, HTTP/1.1 offered by ALPN."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(s.tls_cert, s.tls_key)  # type: ignore[arg-type]
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"GWCORE_TLS_CERT={s.tls_cert!r} / GWCORE_TLS_KEY={s.tls_key!r}: cannot load them: {exc}") from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _version() -> str:
    from ._version import __version__

    return __version__
