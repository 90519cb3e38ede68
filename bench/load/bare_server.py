#!/usr/bin/env python3
"""The load test's baselines: the cheapest honest HTTP servers on gwcore's stack.

A uvloop + httptools ``asyncio.Protocol`` that parses every request the way gwcore's front end
does (URL, every header name/value pair, body parts joined once the message is complete,
keep-alive, pipelining) and answers each one with the bytes gwcore sends for an accepted submit:
``200 OK``, ``Server``, ``Date``, ``Content-Type: application/json; charset=utf-8``,
``Content-Length: 2``, body ``OK``. No framing, no dedup, no store, no fsync.

``gwcore req/s ÷ bare req/s`` is therefore the share of the event loop's and parser's ceiling
that gwcore keeps once it does its real work; both run pinned to the same core (see run_load.py).

    python bench/load/bare_server.py --port 8080

With ``--strict`` the server registers httptools' complete-message callback only: httptools
still parses and checks every byte of the request (request line, headers, Content-Length or
chunked body), but hands nothing to Python until the message is complete, and the answer is the
same. That is the strictest baseline on this stack (about 0.9 µs of Python per request against
3.7 µs for the parsing one); ``run_load.py`` reports gwcore against both and the strict one is the
headline (docs/benchmarks.md).

    python bench/load/bare_server.py --port 8080 --strict

Every path answers 200, so ``GET /healthz`` works as the readiness probe, as it does for gwcore.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import signal
import time

import httptools
import uvloop

_HEAD = (b"HTTP/1.1 200 OK\r\n"
         b"Server: gwcore\r\n"  # same bytes as gwcore, so both write equally long responses
         b"Date: %s\r\n"
         b"Content-Type: application/json; charset=utf-8\r\n"
         b"Content-Length: 2\r\n"
         b"%s"
         b"\r\n"
         b"OK")
_CLOSE = b"Connection: close\r\n"
_BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\nServer: gwcore\r\nContent-Type: application/json; "
                b"charset=utf-8\r\nContent-Length: 11\r\nConnection: close\r\n\r\nBad Request")


class _Responses:
    """The 200 response, re-rendered once per second when the ``Date`` changes (as gwcore does)."""

    def __init__(self) -> None:
        self._second = -1
        self.keep_alive = b""
        self.close = b""

    def refresh(self) -> None:
        now = int(time.time())
        if now != self._second:
            self._second = now
            date = email.utils.formatdate(now, usegmt=True).encode()
            self.keep_alive = _HEAD % (date, b"")
            self.close = _HEAD % (date, _CLOSE)


class BareProtocol(asyncio.Protocol):
    """One connection. Responses are written from ``on_message_complete``, so pipelined requests
    are answered in order without any queue of pending slots."""

    __slots__ = ("responses", "transport", "parser", "url", "headers", "body_parts")

    def __init__(self, responses: _Responses) -> None:
        self.responses = responses
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[bytes] = []
        self.body_parts: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(_BAD_REQUEST)
                self.transport.close()

    # httptools callbacks: collect what a real server needs, like gwcore/http.py does.

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body_parts = []

    def on_url(self, url: bytes) -> None:
        self.url += url  # may arrive in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append(name)
        self.headers.append(value)

    def on_body(self, body: bytes) -> None:
        self.body_parts.append(body)

    def on_message_complete(self) -> None:
        # Materialise the body as gwcore does before handing it on, so that cost is in both.
        parts = self.body_parts
        _body = parts[0] if len(parts) == 1 else b"".join(parts)
        _answer(self.transport, self.parser, self.responses)


def _answer(transport: asyncio.Transport | None, parser: httptools.HttpRequestParser, responses: _Responses) -> None:
    """The 200 both baselines write for a complete request (and a close when the client asked)."""
    if transport is None:
        return
    responses.refresh()
    if parser.should_keep_alive():
        transport.write(responses.keep_alive)
    else:
        transport.write(responses.close)
        transport.close()


class StrictProtocol(asyncio.Protocol):
    """One connection of the strict baseline: httptools parses the whole request in C and calls
    back once, when it is complete; the answer is the parsing server's."""

    __slots__ = ("responses", "transport", "parser")

    def __init__(self, responses: _Responses) -> None:
        self.responses = responses
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    data_received = BareProtocol.data_received

    def on_message_complete(self) -> None:
        _answer(self.transport, self.parser, self.responses)


async def serve(host: str, port: int, strict: bool = False) -> None:
    loop = asyncio.get_running_loop()
    responses = _Responses()
    protocol = StrictProtocol if strict else BareProtocol
    server = await loop.create_server(lambda: protocol(responses), host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bare_server{' (strict)' if strict else ''} listening on http://{host}:{port}/", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--strict", action="store_true",
                        help="the complete-message callback only (the strict baseline)")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.strict))


if __name__ == "__main__":
    main()
