"""Front end micro benchmarks: parse + frame of the protocol.md §8.1 request with a 1 KiB body and its
Content-MD5, by RequestParser (one crossing per feed) and by httptools callbacks + Framer.frame as
gwcore/http.py does today.

    taskset -c 0 pytest bench/bench_request_parser.py --benchmark-only
"""

from __future__ import annotations

import httptools
import pytest
from bench_framing import BODY, NOW, submit_headers
from test_framing import MSG_ID

from gwcore import _dedup


def request_bytes() -> bytes:
    """The §8.1 request on the wire: the same headers bench_framing frames, then the body."""
    flat = submit_headers(BODY)
    head = b"POST /RemoteSite/ HTTP/1.1\r\n" + b"".join(
        flat[i] + b": " + flat[i + 1] + b"\r\n" for i in range(0, len(flat), 2))
    return head + b"\r\n" + BODY


REQUEST = request_bytes()


class HttptoolsFrontEnd:
    """What gwcore/http.py does per request, minus responses: callbacks collect, then frame."""

    def __init__(self) -> None:
        self.framer = _dedup.Framer("RemoteSite")
        self.parser = httptools.HttpRequestParser(self)
        self.results: list = []

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers: list[bytes] = []
        self.special: list[int] = []
        self.size = 0
        self.body_parts: list[bytes] = []

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        h = self.headers
        h.append(name)
        h.append(value)
        self.size += len(name) + len(value) + 4
        first = name[0] | 0x20 if name else 0
        if first == 0x63 or first == 0x65:
            self.special.append(len(h) - 2)

    def on_headers_complete(self) -> None:
        for i in self.special:
            if self.headers[i].lower() == b"content-length":
                int(self.headers[i + 1])

    def on_body(self, body: bytes) -> None:
        self.body_parts.append(body)

    def on_message_complete(self) -> None:
        self.parser.should_keep_alive()
        self.parser.get_method()
        qpos = self.url.find(b"?")
        path, query = (self.url, None) if qpos < 0 else (self.url[:qpos], self.url[qpos + 1:])
        body = b"".join(self.body_parts) if len(self.body_parts) != 1 else self.body_parts[0]
        self.results.append(self.framer.frame(self.headers, body, query, NOW))

    def feed(self, data: bytes) -> list:
        self.results = []
        self.parser.feed_data(data)
        return self.results


def make_parser() -> _dedup.RequestParser:
    return _dedup.RequestParser(_dedup.Framer("RemoteSite"), [b"/remotesite/"], max_headers=100,
                                max_header_bytes=65536, max_body=1 << 20, allow_get=False)


@pytest.mark.benchmark(group="front end")
@pytest.mark.parametrize("impl", ["RequestParser", "httptools+Framer.frame"])
def bench_parse_and_frame_submit(benchmark, impl):
    if impl == "RequestParser":
        parser = make_parser()
        (event,) = benchmark(parser.feed, REQUEST, NOW)
        env = event[2]
    else:
        front = HttptoolsFrontEnd()
        (env,) = benchmark(front.feed, REQUEST)
    assert env.id == MSG_ID and env.body == BODY


@pytest.mark.benchmark(group="front end: 8 pipelined")
@pytest.mark.parametrize("impl", ["RequestParser", "httptools+Framer.frame"])
def bench_parse_and_frame_pipelined(benchmark, impl):
    data = REQUEST * 8
    if impl == "RequestParser":
        events = benchmark(make_parser().feed, data, NOW)
    else:
        events = benchmark(HttptoolsFrontEnd().feed, data)
    assert len(events) == 8
