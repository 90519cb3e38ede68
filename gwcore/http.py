"""The HTTP/1.1 front end: an asyncio protocol over the core's request parser.

Each chunk read from a socket goes into the Cython core in one call (``RequestParser.feed``), which
parses HTTP/1.1, frames every complete gateway request straight from its receive buffer and returns
a list of events; Python only routes them, hands envelopes to the writer and answers. Databus
parts are taken by one of the protocol's base classes, :class:`gwcore.databus.intake.PartIntake`;
the calls of distributor workers (the paths under ``/.gwcore/worker/``, routed here to the
listener's ``worker_api``) by the other, :class:`gwcore.distributor.listener.WorkerCalls`.

Requests on a connection are answered in order (pipelining); each response slot is resolved when
its batch is durable. Reading pauses while a connection has ``http_max_pipeline`` unanswered
requests or the peer stops reading our responses (back-pressure, never unbounded buffering).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

from . import auth, batch
from ._core import core
from .databus.intake import PartIntake
from .databus.sink import BlobWriter
from .distributor.listener import WorkerCalls
from .distributor.protocol import WORKER_PREFIX
from .httphead import ascii_reason, error_answer, render_head
from .ingest import IngestSink
from .metrics import CONTENT_TYPE, Buckets, Families, counter, gauge, histogram

__all__ = ("HTTPState", "HTTPProtocol", "render_response", "error_answer", "peer_key", "listener_metrics")

log = logging.getLogger("gwcore.http")

_JSON = b"application/json; charset=utf-8"
_JS = b"application/javascript; charset=utf-8"

_OK = "OK"
# RFC 9110: a 401 names its scheme. Worker calls are signed with v1 (gwcore/auth.py); site
# requests with v2, or v1 too while it is accepted (HTTPState.challenge).
_CHALLENGE = b"WWW-Authenticate: gwcore-v1\r\n"
_LINGER_SECONDS = 2.0
_PASSIVE = "Service Unavailable: passive"
_BUILTIN = (b"/healthz", b"/readyz", b"/metrics")
_NO_METRICS = ("Not Found: /metrics is not served on this listener (GWCORE_ADMIN_LISTEN, GWCORE_METRICS_PUBLIC; "
               "docs/security.md)")
_SHUTTING_DOWN = "Service Unavailable: gwcore is shutting down"
_TOO_MANY = "Service Unavailable: too many connections (GWCORE_HTTP_MAX_CONNECTIONS)"
_TOO_MANY_FROM_PEER = ("Service Unavailable: too many connections from your address "
                       "(GWCORE_HTTP_MAX_CONNECTIONS_PER_PEER)")
_EV_SUBMIT, _EV_OTHER, _EV_CONTINUE = core.EV_SUBMIT, core.EV_OTHER, core.EV_CONTINUE
_Rejection = core.Rejection
_Batch = core.Batch
_KIND_WORKER = core.REQUEST_KINDS.index("worker")


def render_response(status: int, reason: str, date: bytes, *, body: bytes | None = None,
                    content_type: bytes = _JSON, close: bool = False, extra: bytes = b"") -> bytes:
    """One complete HTTP/1.1 response; ``body`` defaults to the reason (NServiceBus style)."""
    reason = ascii_reason(reason)
    if body is None:
        body = reason.encode("ascii")
    return render_head(status, reason, date, len(body), content_type, close, extra) + body


def _jsonp(callback: str, text: str) -> bytes:
    return f"{callback}({{ status: '{text}'}})".encode("ascii", "replace")


def peer_key(peername: Any) -> str | None:
    """The address a connection's limits are counted under: the peer's IP (an IPv4-mapped IPv6
    address as its IPv4 one), or None (a unix socket, or no address known)."""
    if isinstance(peername, tuple) and peername and isinstance(peername[0], str):
        host = peername[0]
        if host.startswith("::ffff:") and "." in host:
            return host[7:]
        return host
    return None


#: HTTPState.attach's default inbox: the writer's own compiled inbox, when it has one.
_WRITERS_INBOX: Any = object()


class HTTPState(core.ListenerCore):
    """What every connection of one listener shares: settings, core objects, counters.

    The flags and limits read per request (``active``, ``passive``, ``draining``, ``writer``,
    ``verifier``, the pipeline and pending limits) live in the compiled base class. Its owner (the
    :class:`gwcore.Gateway`) changes it through two operations only: :meth:`attach` (what serves
    the requests) and :meth:`set_role` (whether it takes traffic, and why not)."""

    def __init__(self, settings: Any, writer: Any = None, *, channel_paths: list[str],
                 metrics_render: Any = None) -> None:
        self.settings = settings
        self.writer = None
        self.inbox = None
        self.max_pipeline = settings.http_max_pipeline
        self.max_pending = settings.commit_max_pending
        # Request signing (docs/security.md): None when no site secrets are configured, and then
        # a request costs nothing more than this attribute test.
        self.verifier = (auth.Verifier(settings.receive_keys, settings.auth_max_skew, settings.allow_unsigned,
                                       accept_v1=settings.auth_accept_v1)
                         if settings.receive_keys else None)
        self.framer = core.Framer(settings.endpoint, parse_query=settings.http_allow_get,
                                  signatures=self.verifier is not None)
        self.challenge = (b"WWW-Authenticate: gwcore-v2, gwcore-v1\r\n" if settings.auth_accept_v1
                          else b"WWW-Authenticate: gwcore-v2\r\n")
        self._auth_logged: dict[str, float] = {}
        self.channel_paths = [p.lower().encode() for p in channel_paths]
        self.metrics_render = metrics_render
        #: Distributor mode: answers ``/.gwcore/worker/...`` requests, ``await worker_api(method,
        #: path, alive, headers) -> (status, reason, json body or FileAnswer)``
        #: (gwcore/distributor/protocol.py); None elsewhere, and until the node is active.
        self.worker_api: Any = None
        #: Whether this listener serves the worker API at all (the worker listener; the receive
        #: channels only with worker keys): elsewhere its paths are 404.
        self.serves_workers = False
        self.worker_calls: set[asyncio.Future] = set()
        #: Writes databus parts to blob files (set by the owner with the writer; docs/databus.md).
        self.blobs: BlobWriter | None = None
        self.part_tasks: set[asyncio.Future] = set()
        # ``active`` is False while this instance must not take gateway traffic (not started yet;
        # later: a standby or passive node); ``passive``: up and answering, waiting for the data
        # dir's lease (docs/deployment.md). Both set by the owner, read per request.
        self.active = False
        self.passive = False
        # Selected mode (gwcore/selected/): the 503 text while not active ("standby", "broker
        # unavailable"), and a hook that may take a submit during a handover:
        # ``hold(protocol, slot, result)`` is True when it took it; it answers it later (routing
        # it again with ``protocol._route``, or with the new leader's answer).
        self.unavailable: str | None = None
        self.hold: Any = None
        self.draining = False
        if writer is not None:
            self.attach(writer=writer)
        self._routes: dict[bytes, bool] = {}
        self.connections: set[HTTPProtocol] = set()
        # Open connections and streamed parts being received, per peer address (peer_key); the
        # idle connections, oldest first, are the compiled base class's ``idle_connections``.
        self.peer_connections: dict[str | None, int] = {}
        self.peer_parts: dict[str | None, int] = {}
        # Answers by status, but for the 200s of accepted submits, which the compiled path counts
        # in ``answered_ok``: read both through :meth:`status_counts`.
        self.requests_by_status: collections.Counter = collections.Counter()
        self.rejected_connections = 0  # refused at connect, for any reason
        self.rejected_per_peer = 0  # of those: GWCORE_HTTP_MAX_CONNECTIONS_PER_PEER
        self.idle_closed = 0  # idle connections closed for a newcomer at GWCORE_HTTP_MAX_CONNECTIONS
        self.too_slow = 0  # requests cut off below GWCORE_HTTP_MIN_RATE
        self.parts_refused_per_peer = 0  # parts refused at GWCORE_HTTP_MAX_PARTS_PER_PEER
        # Batches between gwcore sites (gwcore/batch.py): what this receiver takes in one, which
        # every 200 to a submit advertises, and how many batches and messages in them it answered.
        self.batch_limits = batch.BatchLimits(settings.max_batch_messages,
                                              min(settings.max_batch_bytes, settings.max_body),
                                              settings.commit_max_pending)
        self._advertise = batch.advertise_header(self.batch_limits)
        self.batches = 0
        self.batch_messages = 0
        # Answer times by (slot kind, status) of every answer but the compiled path's 200s
        # (ListenerCore.ok_durations): a bounded set, kinds and statuses are gwcore's own.
        self.durations: dict[tuple[int, int], Buckets] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def attach(self, *, writer: IngestSink, inbox: Any = _WRITERS_INBOX, blobs: Any = None, worker_api: Any = None,
               hold: Any = None) -> None:
        """What serves this listener's requests, all at once: the ingest sink (*writer*, a
        :class:`gwcore.ingest.IngestSink`), the compiled inbox that takes plain submits without a
        Python call (by default the writer's own, when it has one; None sends every submit
        through ``writer.ingest_then``), the databus blob store, the distributor's worker API,
        and selected mode's hook for submits held during a handover."""
        self.writer = writer
        self.inbox = getattr(writer, "inbox", None) if inbox is _WRITERS_INBOX else inbox
        self.blobs = blobs
        self.worker_api = worker_api
        self.hold = hold

    def set_role(self, role: str, reason: str | None = None) -> None:
        """Whether this listener takes gateway traffic: ``active``; ``passive`` (waiting for the
        data dir's lease); ``unavailable`` with the 503 *reason* (not started yet, a selected-mode
        standby, the broker unreachable); ``draining`` (shutting down, for good)."""
        if role not in ("active", "passive", "unavailable", "draining"):
            raise ValueError(f"unknown listener role {role!r}")
        self.draining = self.draining or role == "draining"
        self.active = role == "active" and not self.draining
        self.passive = role == "passive"
        self.unavailable = reason

    def not_available(self) -> str | None:
        """None while this listener takes gateway traffic, else the reason of its 503: the one
        place that decides it, for submits, parts and worker calls alike."""
        if self.draining:
            return _SHUTTING_DOWN
        if self.active:
            return None
        if self.passive:
            return _PASSIVE
        return self.unavailable or "Service Unavailable: not the active receiver"

    def render_ok(self, date: bytes) -> bytes:
        return render_response(200, _OK, date, extra=self._advertise)

    def observe(self, slot: core.AnswerSlot, status: int) -> None:
        """An answer to *slot*'s request is ready: its time since the request was read."""
        b = self.durations.get((slot.kind, status))
        if b is None:
            b = self.durations[(slot.kind, status)] = Buckets()
        b.observe(time.monotonic() - slot.started)

    def status_counts(self) -> collections.Counter:
        """Answers by HTTP status since start."""
        counts = collections.Counter(self.requests_by_status)
        counts[200] += self.answered_ok
        return counts

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the timeout sweeper (request, keep-alive and linger deadlines of every connection)."""
        s = self.settings
        self._sweep_every = min(1.0, max(0.01, min(s.http_request_timeout, s.http_keepalive_timeout) / 4))
        self._loop = loop
        self._sweeper = loop.call_later(self._sweep_every, self._sweep)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _sweep(self) -> None:
        now = self._loop.time()
        for conn in list(self.connections):
            conn.check_timeouts(now)
        self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)

    def admit(self, conn: HTTPProtocol) -> str | None:
        """Take a new connection in, or say why not (the reason of its 503): while draining; at
        ``GWCORE_HTTP_MAX_CONNECTIONS_PER_PEER`` from its address; at
        ``GWCORE_HTTP_MAX_CONNECTIONS`` when no connection is idle, else the one idle the longest
        is closed to make room (its client sees the close an idle keep-alive connection may
        always see, and opens a new one)."""
        if self.draining:
            return _SHUTTING_DOWN
        s = self.settings
        peer = conn.peer
        held = self.peer_connections.get(peer, 0)
        if held >= s.http_max_connections_per_peer:
            self.rejected_per_peer += 1
            return _TOO_MANY_FROM_PEER
        if len(self.connections) >= s.http_max_connections:
            idle = self.idle_connections
            if not idle:
                return _TOO_MANY
            oldest = next(iter(idle))
            oldest.forget()
            oldest.closing = True
            if oldest.transport is not None:
                oldest.transport.close()
            self.idle_closed += 1
            held = self.peer_connections.get(peer, 0)  # the oldest may have been its own
        self.connections.add(conn)
        self.peer_connections[peer] = held + 1
        conn.admitted = True
        return None

    def log_refusal(self, reason: str) -> None:
        """A 401 is worth a log line (a sender with the wrong secret, or someone probing), but
        not one per request: each kind of refusal is logged at most every 10 s."""
        kind = reason.partition(" (")[0]
        now = time.monotonic()
        if now - self._auth_logged.get(kind, -1e9) >= 10.0:
            self._auth_logged[kind] = now
            log.warning("request refused: 401 %s", reason)

    def match_channel(self, path: bytes) -> bool:
        known = self._routes.get(path)
        if known is None:
            known = self._match(path)
            if len(self._routes) < 1024:  # bounded: paths are client input
                self._routes[path] = known
        return known

    def _match(self, path: bytes) -> bool:
        low = path.lower()
        if not low.endswith(b"/"):
            # '/RemoteSite' addresses the channel '/RemoteSite/' as well.
            low += b"/"
        for p in self.channel_paths:
            if low.startswith(p):
                return True
        return False


def listener_metrics(states: list[HTTPState]) -> Families:
    """The counters of every listener (receive channels, the worker listener, the admin
    listener), summed."""
    statuses: collections.Counter = collections.Counter()
    for state in states:
        statuses.update(state.status_counts())

    def total(attr: str) -> int:
        return sum(getattr(state, attr) for state in states)

    durations: dict[tuple[str, str], Buckets] = {}

    def merged(kind: int, status: int) -> Buckets:
        key = (core.REQUEST_KINDS[kind], str(status))
        b = durations.get(key)
        if b is None:
            b = durations[key] = Buckets()
        return b

    for state in states:
        for (kind, status), b in state.durations.items():
            merged(kind, status).merge(b)
        counts, total_seconds = state.ok_durations()
        if any(counts):
            ok = merged(core.REQUEST_KINDS.index("submit"), 200)
            for i, n in enumerate(counts):
                ok.counts[i] += n
            ok.sum += total_seconds

    return [
        counter("gwcore_http_requests_total", "HTTP requests answered, by status.", labels=("status",),
                samples=[((str(k),), v) for k, v in sorted(statuses.items())]),
        histogram("gwcore_http_request_seconds",
                  "Time from reading a request (a databus part: its head) to its answer, by call type "
                  "(submit, databus, batch, worker, other) and status.", labels=("call_type", "status"),
                  samples=sorted(durations.items())),
        counter("gwcore_http_received_bytes_total", "Bytes received on the listeners' connections.",
                total("bytes_in")),
        counter("gwcore_http_sent_bytes_total", "Bytes of answers written (blobs streamed to workers aside).",
                total("bytes_out")),
        gauge("gwcore_http_connections", "Open client connections.", sum(len(s.connections) for s in states)),
        counter("gwcore_http_connections_refused_total", "Connections refused (a limit, or draining).",
                total("rejected_connections")),
        counter("gwcore_http_connections_refused_per_peer_total",
                "Connections refused because their address had GWCORE_HTTP_MAX_CONNECTIONS_PER_PEER open.",
                total("rejected_per_peer")),
        counter("gwcore_http_idle_connections_closed_total",
                "Idle connections closed to make room for a new one at GWCORE_HTTP_MAX_CONNECTIONS.",
                total("idle_closed")),
        counter("gwcore_http_requests_too_slow_total",
                "Requests cut off (408) for arriving slower than GWCORE_HTTP_MIN_RATE.", total("too_slow")),
        counter("gwcore_databus_parts_refused_per_peer_total",
                "Databus parts refused (503) at GWCORE_HTTP_MAX_PARTS_PER_PEER from one address.",
                total("parts_refused_per_peer")),
    ]


class HTTPProtocol(PartIntake, WorkerCalls):
    """One client connection (an asyncio protocol). The hot path of a submit (events, answer
    slots, handing the envelope to the writer, writing answers in order) is the compiled base
    class, ``core.ConnectionCore``; databus parts are :class:`gwcore.databus.intake.PartIntake`'s;
    worker calls and the files they are answered with are
    :class:`gwcore.distributor.listener.WorkerCalls`'; this class has the lifecycle, the routing
    and every other answer but the 200 of an accepted submit."""

    def __init__(self, state: HTTPState) -> None:
        self.state = state
        settings = self.settings = state.settings
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = core.RequestParser(
            state.framer, state.channel_paths, max_headers=settings.http_max_headers,
            max_header_bytes=settings.http_max_header_bytes, max_body=settings.max_body,
            allow_get=settings.http_allow_get, max_blob=settings.max_blob,
        )
        self.part = None  # the databus part being received (read by _update_reading)
        self.writable = None  # a streamed answer waits on it while writing is paused
        self.files_waiting = collections.deque()  # files to stream as answers (WorkerCalls)
        self.held: list[tuple[core.AnswerSlot, Any]] = []  # submits waiting for parts_open to be 0
        self.slots: collections.deque[core.AnswerSlot] = collections.deque()
        self.closing = False  # no further requests will be read
        self.reading_paused = False
        self.writing_paused = False
        self.request_started = 0.0  # loop time the unfinished request began (timeouts are swept)
        self.idle_since = 0.0
        self.linger_until = 0.0
        self.peer: str | None = None  # the address its limits count under (peer_key)
        self.admitted = False  # counted in the state's connections (HTTPState.admit)
        # what check_timeouts saw of the request last: (request_started, request_bytes), and when
        # that last changed
        self._seen: tuple[float, int] = (0.0, 0)
        self._progress_at = 0.0
        self._checked_at = 0.0  # loop time of the last check_timeouts

    # -- connection lifecycle ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        state = self.state
        self.peer = peer_key(transport.get_extra_info("peername"))
        refusal = state.admit(self)
        if refusal is not None:
            state.rejected_connections += 1
            transport.write(render_response(503, refusal, state.date(), close=True))  # type: ignore[attr-defined]
            transport.close()
            self.closing = True
            return
        self.idle_since = self._checked_at = self.loop.time()
        self.mark_idle(True)

    def forget(self) -> None:
        """No longer count this connection in the state's connections, idle ones and per-peer
        counts (when it is lost, or closed to make room)."""
        state = self.state
        state.connections.discard(self)
        self.mark_idle(False)
        if self.admitted:
            self.admitted = False
            n = state.peer_connections[self.peer] - 1
            if n:
                state.peer_connections[self.peer] = n
            else:
                del state.peer_connections[self.peer]

    def connection_lost(self, exc: Exception | None) -> None:
        self.forget()
        self.closing = True
        self._drop_part()
        self._drop_files()
        self._wake_writer()

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._update_reading()
        self._wake_writer()

    def _wake_writer(self) -> None:
        writable, self.writable = self.writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def check_timeouts(self, now: float) -> None:
        """Called by the state's sweeper: one timer per listener instead of two per request."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        checked, self._checked_at = self._checked_at, now
        if self.linger_until:
            if now >= self.linger_until:
                transport.close()
        elif self.parser.in_request:
            if self.reading_paused and not self.writing_paused:
                # Not read because of gwcore's own back-pressure (a part's blob threads behind the
                # socket, the pipeline full while the writer commits): that time is not the
                # client's. (A client that does not read its answers pauses writing: its own.)
                self.request_started += now - max(checked, self.request_started)
            self._check_request(now)
        elif not self.slots and now - self.idle_since >= self.settings.http_keepalive_timeout:
            transport.close()

    def _check_request(self, now: float) -> None:
        """The deadline of the request being received, counted from its first bytes and never
        moved by later ones: its head within ``GWCORE_HTTP_REQUEST_TIMEOUT``; then the whole
        request within that plus one second per ``GWCORE_HTTP_MIN_RATE`` bytes received (at
        least that rate on average once the timeout is used up, however the bytes are spread:
        trickling cannot hold a connection, a part or its blob file), and never
        ``GWCORE_HTTP_REQUEST_TIMEOUT`` without a byte."""
        s = self.settings
        timeout = s.http_request_timeout
        elapsed = now - self.request_started
        if self.in_head:
            if elapsed >= timeout:
                self._fail(408, f"Request Timeout: the request head was not complete after {timeout:g} s "
                                "(GWCORE_HTTP_REQUEST_TIMEOUT)")
            return
        got = self.request_bytes
        seen = (self.request_started, got)
        if seen != self._seen:
            self._seen, self._progress_at = seen, now
        if now - max(self._progress_at, self.request_started) >= timeout:
            self._fail(408, f"Request Timeout: nothing received for {timeout:g} s (GWCORE_HTTP_REQUEST_TIMEOUT)")
        elif elapsed >= timeout + got / s.http_min_rate:
            self.state.too_slow += 1
            self._fail(408, f"Request Timeout: the request came slower than GWCORE_HTTP_MIN_RATE "
                            f"({s.http_min_rate} bytes/s after the first {timeout:g} s): "
                            f"{got} bytes in {elapsed:.1f} s")

    # -- request handling --------------------------------------------------------------------------

    def _route(self, slot: core.AnswerSlot, result: Any) -> None:
        """A submit the compiled path did not hand straight to the writer: not the active
        receiver, draining, signed requests, refusals, the writer's queue is full, or a databus
        part sent before it on this connection is still being recorded."""
        if self.parts_open:
            # A pipelined submit waits for the parts ahead of it: it may be the message they
            # belong to (answered in order all the same).
            self.held.append((slot, result))
            return
        state = self.state
        is_batch = type(result) is _Batch
        unavailable = state.not_available()
        if unavailable is not None:
            if state.hold is not None and state.hold(self, slot, result):
                return
            self._answer(slot, 503, unavailable)
            return
        if state.verifier is not None:
            refused = (batch.check_signature(state.verifier, result) if is_batch
                       else state.verifier.check(result))
            if refused is not None:
                self._answer_check(slot, refused, result.callback)
                return
        if is_batch:
            batch.receive(self, slot, result)
            return
        if isinstance(result, core.Rejection):
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request refused: %d %s", result.status, result.reason)
            self._answer(slot, result.status, result.reason, callback=result.callback)
            return
        writer = state.writer
        if writer.pending >= state.max_pending:
            self._answer(slot, 503, "Service Unavailable: ingest queue full, retry later",
                         callback=result.callback)
            return
        if result.call_type == core.CALL_DATABUS:
            self._whole_part(slot, result)  # a part the parser could not stream
            return
        slot.callback = result.callback
        slot.protocol = self
        slot.msg_id = result.id
        writer.ingest_then(result, slot)

    def _ingested(self, slot: core.AnswerSlot, ok: bool, value: Any) -> None:
        """The writer's answer for a slot, but for a new message without JSONP (compiled)."""
        if ok and type(value) is _Rejection:
            # a submit whose databus parts are not all here (412, nothing stored)
            self._answer(slot, value.status, value.reason, callback=slot.callback)
            return
        if ok and value is False and log.isEnabledFor(logging.DEBUG):
            # NServiceBus logs this at INFO; under a retry storm that is a line per request.
            log.debug("message %s has already been accepted: duplicate answered 200, not stored", slot.msg_id)
        if ok and slot.callback is None:
            self.state.answered_ok += 1
            self.state.observe_ok(slot.started)
            slot.data = self.state.ok()
            self._flush()
        elif ok:
            self._answer(slot, 200, _OK, callback=slot.callback)
        else:
            self._answer_error(slot, value, "ingest", slot.callback)

    def _other(self, keep_alive: bool, method: bytes, path: bytes, headers: dict[bytes, bytes] | None) -> None:
        """Everything but a gateway submit: built-in endpoints, unknown paths, other methods."""
        slot = self._slot(keep_alive)
        state = self.state
        if path in _BUILTIN:
            self._builtin(slot, method, path)
        elif path.startswith(WORKER_PREFIX):
            slot.kind = _KIND_WORKER
            if not state.serves_workers:
                self._answer(slot, 404, "Not Found: the worker API is not served on this listener "
                                        "(docs/deployment.md, \"Worker keys\")", count=False)
            elif state.worker_api is not None and state.not_available() is None:
                self._worker_call(slot, method, path, headers)
            else:
                # workers reach whichever node is active through one URL: a passive node sends them on
                self._answer(slot, 503, state.not_available() or "Service Unavailable: not ready", count=False)
        elif not state.match_channel(path):
            self._answer(slot, 404, f"Not Found: no receive channel at {path.decode('latin-1')}")
        else:
            allow_get = self.settings.http_allow_get
            self._answer(slot, 405, "Method Not Allowed: gateway channels accept POST"
                                    f"{' and GET' if allow_get else ' (GET needs GWCORE_HTTP_ALLOW_GET=1)'}",
                         extra=b"Allow: GET, POST\r\n" if allow_get else b"Allow: POST\r\n")

    def _builtin(self, slot: core.AnswerSlot, method: bytes, path: bytes) -> None:
        if method not in (b"GET", b"HEAD"):
            self._answer(slot, 405, "Method Not Allowed: use GET", extra=b"Allow: GET, HEAD\r\n", count=False)
            return
        slot.head = method == b"HEAD"
        state = self.state
        if path == b"/healthz":
            self._answer(slot, 200, _OK, count=False)
        elif path == b"/readyz":
            unavailable = state.not_available()
            if unavailable is None:
                self._answer(slot, 200, _OK, count=False)
            else:
                self._answer(slot, 503, "Service Unavailable: draining" if state.draining else unavailable, count=False)
        else:
            if state.metrics_render is None:
                self._answer(slot, 404, _NO_METRICS, count=False)
            else:
                self._answer(slot, 200, _OK, body=state.metrics_render(), content_type=CONTENT_TYPE, count=False)

    def _answer(self, slot: core.AnswerSlot, status: int, reason: str, *, body: bytes | None = None,
                content_type: bytes = _JSON, callback: str | None = None, extra: bytes = b"",
                count: bool = True) -> None:
        if count:
            self.state.requests_by_status[status] += 1
        self.state.observe(slot, status)
        if callback is not None:
            body = _jsonp(callback, ascii_reason(reason))
            content_type = _JS
        data = render_response(status, reason, self.state.date(), body=body,
                               content_type=content_type, close=slot.close, extra=extra)
        if slot.head:
            # A HEAD answer has the headers GET would have, Content-Length included, and no body.
            data = data[:data.index(b"\r\n\r\n") + 4]
        slot.data = data
        self._flush()

    def _refuse(self, slot: core.AnswerSlot, refusal: str, callback: str | None, *, count: bool = True,
                challenge: bytes = _CHALLENGE) -> None:
        """401: the request's signature does not hold (*refusal* says why)."""
        self.state.log_refusal(refusal)
        self._answer(slot, 401, refusal, callback=callback, extra=challenge, count=count)

    def _answer_check(self, slot: core.AnswerSlot, refused: tuple[int, str], callback: str | None) -> None:
        """The answer to a request ``auth.Verifier.check`` refused: 401 with this listener's
        challenge, or 412 (signed, but the body is not the one the signature's digest names)."""
        if refused[0] == 401:
            self._refuse(slot, refused[1], callback, challenge=self.state.challenge)
        else:
            self._answer(slot, refused[0], refused[1], callback=callback)

    def _answer_error(self, slot: core.AnswerSlot, exc: BaseException, what: str, callback: str | None, *,
                      count: bool = True) -> None:
        """503 or 502 to a request that failed with *exc* inside gwcore (:func:`error_answer`)."""
        status, reason = error_answer(exc, what)
        self._answer(slot, status, reason, callback=callback, count=count)

    def _fail(self, status: int, reason: str) -> None:
        """Answer the current (broken or over-limit) request after those before it, then close."""
        part = self.part
        self._drop_part()
        if part is not None and part.slot in self.slots:
            self.slots.remove(part.slot)  # the failure answers the part's request itself
        if self.transport is None:
            return
        self._answer(self._slot(False), status, reason)

    def _linger(self, transport: asyncio.Transport) -> None:
        """Close after an answer: half-close and discard what the client still sends for a moment,
        so that a client that is mid-upload reads our 413/431 instead of a connection reset."""
        self.closing = True
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
        self.linger_until = self.loop.time() + _LINGER_SECONDS

    def eof_received(self) -> bool:
        return False  # the peer is done sending: let the transport close once our writes are out

    def shutdown(self) -> None:
        """Draining: close now if idle; otherwise close once the in-flight answers are written."""
        if not self.slots and not self.in_request and self.transport is not None:
            self.transport.close()
