"""HTTP/1.1 client for forwarding to one remote site: a bounded pool of keep-alive connections.

::

    async with SiteClient("https://hq.example.com/Headquarters/") as site:
        response = await site.post(wire_headers, body)
        if response.status != 200:
            ...  # retry later with the same NServiceBus.Id

The client sends exactly what it is given: it does not URL-encode, re-case or reorder headers, and
it adds only ``Host``, ``Content-Type: application/x-www-form-urlencoded`` and ``Content-Length``,
as the NServiceBus sender does (protocol.md §1.1). Deciding whether a status means success or
retry is the caller's job; only the transport failures below raise.

Idempotency: a request that fails on a *reused* keep-alive connection before a single byte of the
response arrived is sent once more on a fresh connection. The server may have closed the idle
connection just as we wrote to it (the stale keep-alive race), and we cannot tell whether it read
the request. Re-sending is safe for gateway calls only because a submit is idempotent: the
receiver deduplicates on ``NServiceBus.Id`` (and a databus part is just stored again). Do not use
this client for requests that are not idempotent.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import re
import ssl
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable

import httptools

from .errors import (
    ConfigurationError,
    ResponseTooLargeError,
    SendConnectError,
    SendError,
    SendProtocolError,
    SendTimeoutError,
    SendTLSError,
)

__all__ = ("SiteClient", "Response", "FileBody", "make_client_ssl_context", "MAX_RESPONSE_BODY", "MAX_RESPONSE_HEAD")

#: Largest response body accepted. A gateway answers ``OK`` or a one-line reason; anything near
#: this is a misbehaving or hostile server, and it must not make us buffer without bound.
MAX_RESPONSE_BODY = 1024 * 1024
#: Largest status line plus header section accepted.
MAX_RESPONSE_HEAD = 64 * 1024

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
# Headers the client writes itself; a second copy would make the request ambiguous.
_RESERVED = frozenset((b"host", b"content-length", b"content-type", b"transfer-encoding", b"connection"))


_FILE_CHUNK = 256 << 10


class FileBody:
    """A request body streamed from a file (a databus blob): read in pieces as the connection
    takes them, never whole; opened again if the request is re-sent on a fresh connection."""

    __slots__ = ("path", "size")

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size

    def __len__(self) -> int:
        return self.size


@dataclass(frozen=True, slots=True)
class Response:
    """A complete response from the remote site."""

    status: int
    reason: str
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def make_client_ssl_context(cafile: str | None, certfile: str | None = None,
                            keyfile: str | None = None) -> ssl.SSLContext:
    """A client TLS context that verifies the server (certificate chain and host name).

    :param cafile: PEM file of the CAs to trust; None trusts the system's default CAs.
    :param certfile: PEM client certificate (chain) for mutual TLS, optional.
    :param keyfile: its private key, when not in *certfile*.
    :raises gwcore.errors.ConfigurationError: a file cannot be read or does not hold what it should.
    """
    try:
        ctx = ssl.create_default_context(cafile=cafile)
        if certfile is not None:
            ctx.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        names = ", ".join(n for n in (cafile, certfile, keyfile) if n)
        raise ConfigurationError(f"cannot load TLS files ({names}): {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class _Stale(Exception):
    """Internal: a reused connection failed before any response byte (retry on a fresh one)."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; carries one request at a time."""

    def __init__(self, client: SiteClient) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.lost = self.loop.create_future()
        self.started = 0.0           # loop time the current request was written (timeouts are swept)
        self.closed = False          # EOF, error, Connection: close, or unsolicited bytes
        self.used = 0                # requests completed on this connection
        self.idle_timer: asyncio.TimerHandle | None = None
        self.writable: asyncio.Future[None] | None = None  # set while the transport's buffer is full
        # One parser for the connection's life: llhttp parses response after response on a
        # keep-alive connection; per-response state lives in the fields _reset() clears.
        self.parser = httptools.HttpResponseParser(self)
        self._reset(None)

    def _reset(self, waiter: asyncio.Future[Response] | None) -> None:
        self.waiter = waiter
        self.received = 0            # bytes of the current response seen so far
        self.reason = bytearray()
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.head_done = False
        self.framed = False          # the response has Content-Length or is chunked
        self.done = False

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            # Bytes nobody asked for (a 408 before an idle close, junk): the connection's state
            # is unknown, so it is never used again.
            self._close()
            return
        self.received += len(data)
        try:
            self.parser.feed_data(data)
            if not self.head_done and self.received > MAX_RESPONSE_HEAD:
                raise ResponseTooLargeError(self.client.url, f"response header section over {MAX_RESPONSE_HEAD} bytes")
        except SendError as exc:
            self._fail(exc)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, SendError):
                self._fail(cause)
            else:
                self._fail(SendProtocolError(self.client.url, f"invalid response: {cause or exc}"))
        except httptools.HttpParserError as exc:
            self._fail(SendProtocolError(self.client.url, f"invalid response: {exc}"))

    def eof_received(self) -> bool | None:
        self.closed = True
        return None  # let the transport close itself

    def pause_writing(self) -> None:
        if self.writable is None or self.writable.done():
            self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_idle_timer()
        waiter = self.waiter
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        if waiter is not None and not waiter.done():
            if self.head_done and not self.framed and not self.done:
                # No Content-Length, not chunked: the body ends with the connection (RFC 9112 §6.3).
                self._complete()
            elif self.received == 0 and self.used > 0:
                waiter.set_exception(_Stale())
            else:
                where = "before responding" if self.received == 0 else "in the middle of the response"
                detail = f" ({exc})" if exc else ""
                waiter.set_exception(SendProtocolError(self.client.url, f"server closed the connection {where}{detail}"))
        if not self.lost.done():
            self.lost.set_result(None)

    # -- httptools callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:  # a second response to one request
            raise SendProtocolError(self.client.url, "unexpected bytes after the response")

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length":
                self.framed = True
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length > MAX_RESPONSE_BODY:
                    raise ResponseTooLargeError(self.client.url,
                                                f"response body of {length} bytes is over {MAX_RESPONSE_BODY}")
            elif lname == b"transfer-encoding":
                self.framed = True

    def on_body(self, body: bytes) -> None:
        if len(self.body) + len(body) > MAX_RESPONSE_BODY:
            raise ResponseTooLargeError(self.client.url, f"response body over {MAX_RESPONSE_BODY} bytes")
        self.body += body

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim response (100 Continue, 103 Early Hints): the real one follows.
            self.reason.clear()
            self.headers = []
            self.head_done = False
            return
        if not self.parser.should_keep_alive():
            self.closed = True
        self._complete()

    # -- helpers ---------------------------------------------------------------------------------

    def _complete(self) -> None:
        self.done = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(Response(self.parser.get_status_code(),
                                       self.reason.decode("latin-1").strip(), bytes(self.body), self.headers))

    def _fail(self, exc: BaseException) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self._close()

    def _close(self) -> None:
        self.closed = True
        self._cancel_idle_timer()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self._cancel_idle_timer()
        if self.transport is not None:
            self.transport.abort()

    def _cancel_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    async def request(self, data: bytes, body: bytes | FileBody) -> Response:
        assert self.transport is not None
        waiter: asyncio.Future[Response] = self.loop.create_future()
        self._reset(waiter)
        self.started = self.loop.time()
        if isinstance(body, FileBody):
            self.transport.write(data)
            await self._stream(body, waiter)
        else:
            # One write, one send(2): the head and a gateway body are small next to the syscall.
            self.transport.write(data + body if len(body) <= 65536 else data)
            if len(body) > 65536:
                self.transport.write(body)
        try:
            return await waiter
        finally:
            self.waiter = None

    async def _stream(self, body: FileBody, waiter: asyncio.Future[Response]) -> None:
        """Write the file in pieces, waiting whenever the transport's buffer is full. Stops early
        when the response arrives first (a 413 or 401 before the whole body)."""
        transport = self.transport
        assert transport is not None
        left = body.size
        with open(body.path, "rb") as f:
            while left > 0 and not waiter.done() and not self.closed:
                chunk = await self.loop.run_in_executor(None, f.read, min(_FILE_CHUNK, left))
                if not chunk:
                    raise SendError(self.client.url, f"databus blob {body.path} is shorter than {body.size} bytes")
                left -= len(chunk)
                transport.write(chunk)
                self.started = self.loop.time()  # progress: the request timeout counts from here
                if self.writable is not None and not self.writable.done():
                    await self.writable


async def wait_turn(waiters: collections.deque[asyncio.Future[None]], pass_on: Callable[[], None]) -> None:
    """Wait at the end of *waiters* until whoever frees a place resolves this caller's future. A
    caller cancelled after it was given its turn calls *pass_on*, so the turn is not lost."""
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await waiter
    except asyncio.CancelledError:
        if waiter.done() and not waiter.cancelled():
            pass_on()
        raise


class SiteClient:
    """Forwards requests to one remote site over a bounded pool of keep-alive connections.

    :param url: the site's channel address (``http://host:port/Path/`` or ``https://…``); requests
        go to exactly its path (and query, if any), nothing appended.
    :param concurrency: most connections open at once; this many requests run in parallel and
        further callers wait for a free connection (the wait itself has no time limit).
    :param ssl_context: TLS settings for ``https`` URLs (default ``ssl.create_default_context()``).
    :param connect_timeout: seconds for TCP connect plus TLS handshake.
    :param request_timeout: seconds from writing a request to the end of its response.
    :param idle_timeout: an idle connection is closed after this many seconds. Keep it below the
        server's keep-alive timeout so we rarely reuse a connection the server is closing.
    :raises gwcore.errors.ConfigurationError: the URL is not an http(s) URL with a host, or a
        number is out of range.
    """

    def __init__(self, url: str, *, concurrency: int = 8, ssl_context: ssl.SSLContext | None = None,
                 connect_timeout: float = 10.0, request_timeout: float = 30.0, idle_timeout: float = 55.0) -> None:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(f"site URL {url!r}: need http:// or https:// and a host")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError as exc:
            raise ConfigurationError(f"site URL {url!r}: {exc}") from exc
        if concurrency < 1 or connect_timeout <= 0 or request_timeout <= 0 or idle_timeout <= 0:
            raise ConfigurationError(f"site URL {url!r}: concurrency and timeouts must be positive")
        self.url = url
        self.host = parts.hostname
        self.port = port
        self.concurrency = concurrency
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.ssl: ssl.SSLContext | None = None
        if scheme == "https":
            self.ssl = ssl_context if ssl_context is not None else ssl.create_default_context()
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        # As .NET's Uri does: non-ASCII (as UTF-8), spaces and other characters a request line
        # cannot carry are percent-encoded; existing escapes are left alone.
        target = urllib.parse.quote(target, safe="!#$%&'()*+,/:;=?@[]~")
        host_header = parts.netloc.rpartition("@")[2]  # drop any user:password@
        try:
            host_bytes = host_header.encode("ascii")
        except UnicodeEncodeError:
            host_bytes = host_header.encode("idna")
        #: The request target written on the request line (the path to sign, see gwcore.auth).
        self.target = target
        self._host_bytes = host_bytes
        self._head = b"POST " + target.encode("ascii") + b" HTTP/1.1\r\nHost: " + host_bytes + b"\r\n"
        # Free request slots, and callers waiting for one (a semaphore without the coroutine layers:
        # this is on every message's path).
        self._free = concurrency
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._closed = False
        #: Connections opened so far (for metrics and tests).
        self.connections_opened = 0
        #: Requests re-sent on a fresh connection after a stale keep-alive one failed.
        self.stale_retries = 0

    @property
    def open_connections(self) -> int:
        """Connections currently open, idle or in use."""
        return len(self._all)

    async def post(self, headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
        """POST *body* with *headers* to the site and return its response, whatever the status.

        :param headers: ``(name, value)`` pairs already encoded for the wire (gateway headers
            URL-encoded as in protocol.md §1.2); written as given, in order. ``Host``,
            ``Content-Type``, ``Content-Length``, ``Transfer-Encoding`` and ``Connection`` are
            the client's own and may not be passed.
        :raises ValueError: a header name is not an HTTP token, a value holds CR, LF or NUL, or a
            reserved header is passed.
        :raises gwcore.errors.SendConnectError: no connection (``SendTLSError`` for TLS failures).
        :raises gwcore.errors.SendTimeoutError: connect or response timed out.
        :raises gwcore.errors.SendProtocolError: the response is malformed, too large
            (``ResponseTooLargeError``) or cut off.
        :raises gwcore.errors.SendError: the client is closed.
        """
        return await self.post_block(self._build_block(headers), body)

    async def post_block(self, block: bytes, body: bytes | FileBody, *, target: bytes | None = None) -> Response:
        """:meth:`post` with the header lines already joined (``Name: value\r\n`` each), as
        ``gwcore._dedup.encode_submit`` makes them. Not checked: the caller vouches for the block
        (no CR/LF inside values, none of the client's own headers).

        :param target: another request target on the same server (an absolute path, already
            percent-encoded), e.g. for the distributor's worker protocol; default the URL's.
        :param body: the bytes, or a :class:`FileBody` streamed from disk (databus parts)."""
        head = self._head if target is None else b"POST %s HTTP/1.1\r\nHost: %s\r\n" % (target, self._host_bytes)
        data = b"%s%sContent-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n" % (
            head, block, len(body))
        if self._closed:
            raise SendError(self.url, "client is closed")
        await self._acquire_slot()
        try:
            if self._closed:
                raise SendError(self.url, "client is closed")
            if self._sweeper is None:
                self._start_sweeper()
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                try:
                    response = await self._send(conn, data, body)
                except _Stale:
                    if not reused:  # pragma: no cover - _Stale needs a reused connection
                        raise SendProtocolError(self.url, "server closed the connection before responding") from None
                    self.stale_retries += 1
                    conn = await self._connect()
                    try:
                        response = await self._send(conn, data, body)
                    except _Stale:  # pragma: no cover - a fresh connection never raises _Stale
                        raise SendProtocolError(self.url, "server closed the connection before responding") from None
            except BaseException:
                conn.abort()
                raise
            self._release(conn)
            return response
        finally:
            self._release_slot()

    async def _acquire_slot(self) -> None:
        if self._free > 0 and not self._slot_waiters:
            self._free -= 1
            return
        await wait_turn(self._slot_waiters, self._release_slot)

    def _release_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to the next caller
                return
        self._free += 1

    def _start_sweeper(self) -> None:
        # One timer per client instead of one per request: a request past request_timeout fails
        # at the next sweep, so the limit holds within a quarter of it (at most 1 s late).
        self._sweep_every = min(1.0, self.request_timeout / 4)
        self._sweeper = asyncio.get_running_loop().call_later(self._sweep_every, self._sweep)

    def _sweep(self) -> None:
        if self._closed:
            self._sweeper = None
            return
        now = asyncio.get_running_loop().time()
        for conn in list(self._all):
            waiter = conn.waiter
            if waiter is not None and not waiter.done() and now - conn.started >= self.request_timeout:
                conn._fail(SendTimeoutError(self.url, f"no complete response within {self.request_timeout:g} s"))
        self._sweeper = asyncio.get_running_loop().call_later(self._sweep_every, self._sweep)

    def _build_block(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        out = []
        for name, value in headers:
            if not _TOKEN.match(name):
                raise ValueError(f"header name {name!r} is not an HTTP token")
            if _BAD_VALUE.search(value):
                raise ValueError(f"header {name!r}: value contains CR, LF or NUL")
            if name.lower() in _RESERVED:
                raise ValueError(f"header {name!r} is set by the client")
            out.append(name + b": " + value + b"\r\n")
        return b"".join(out)

    async def _send(self, conn: _Connection, data: bytes, body: bytes | FileBody) -> Response:
        response = await conn.request(data, body)  # the sweeper fails it after request_timeout
        conn.used += 1
        return response

    def _take_idle(self) -> _Connection | None:
        # Most recently used first: the others then age out instead of all staying half-warm.
        while self._idle:
            conn = self._idle.pop()
            conn._cancel_idle_timer()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
            conn.abort()
            self._all.discard(conn)
        return None

    def _release(self, conn: _Connection) -> None:
        if conn.closed or self._closed or conn.transport is None or conn.transport.is_closing():
            conn._close()
            return
        conn.idle_timer = asyncio.get_running_loop().call_later(self.idle_timeout, self._expire, conn)
        self._idle.append(conn)

    def _expire(self, conn: _Connection) -> None:
        conn.idle_timer = None
        if conn in self._idle:
            self._idle.remove(conn)
        conn._close()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn: _Connection | None = None

        def factory() -> _Connection:
            nonlocal conn
            conn = _Connection(self)
            return conn

        kwargs: dict[str, Any] = {}
        if self.ssl is not None:
            kwargs = dict(ssl=self.ssl, server_hostname=self.host, ssl_handshake_timeout=self.connect_timeout)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(factory, self.host, self.port, **kwargs)
        except TimeoutError:
            if conn is not None:
                conn.abort()
            raise SendTimeoutError(self.url, f"connect timed out after {self.connect_timeout:g} s") from None
        except ssl.SSLCertVerificationError as exc:
            raise SendTLSError(self.url, f"TLS certificate not accepted: {exc.verify_message or exc}") from exc
        except ssl.SSLError as exc:
            raise SendTLSError(self.url, f"TLS handshake failed: {exc}") from exc
        except OSError as exc:
            raise SendConnectError(self.url, f"cannot connect to {self.host}:{self.port}: "
                                             f"{exc.strerror or exc}") from exc
        assert conn is not None
        self.connections_opened += 1
        self._all.add(conn)
        conn.lost.add_done_callback(functools.partial(self._forget, conn))
        return conn

    def _forget(self, conn: _Connection, _lost: object) -> None:
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    async def close(self) -> None:
        """Close idle connections now and the others as their requests finish; refuse new posts.
        Waits (briefly) until the idle connections are closed."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle, self._idle = self._idle, []
        for conn in idle:
            conn._close()
        waits = [c.lost for c in idle if not c.lost.done()]
        if waits:
            await asyncio.wait(waits, timeout=1.0)

    async def __aenter__(self) -> SiteClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
