"""gwcore._dedup.RequestParser: the HTTP/1.1 request parser that frames gateway requests straight from
its receive buffer. Differential against httptools + Framer.frame (what gwcore/http.py does today,
with the same rules written out in `Reference`), every split point, the limits, Expect, upgrades,
request smuggling and chunked bodies."""

from __future__ import annotations

import base64
import hashlib
import string
from types import SimpleNamespace

import httptools
import pytest
from httpclient import nsb_request
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gwcore import _dedup
from gwcore.errors import ConfigurationError
from gwcore.http import HTTPState

from test_framing import PLAIN_SUBMIT

NOW = 1_787_000_000_000
MSG_ID = "0b1f6f0e-5d8a-4f43-b1d5-b3a400c1d2e3"
EV_SUBMIT, EV_OTHER, EV_CONTINUE, EV_ERROR = (_dedup.EV_SUBMIT, _dedup.EV_OTHER, _dedup.EV_CONTINUE,
                                               _dedup.EV_ERROR)
CHANNELS = [b"/remotesite/", b"/other/site/"]
LIMITS = dict(max_headers=100, max_header_bytes=16384, max_body=1 << 20)
# methods llhttp knows (HTTP and RTSP/ICE ones it also accepts in requests); any other token is
# one RequestParser accepts and httptools refuses (see test_malformed_input_agrees_with_httptools)
LLHTTP_METHODS = {
    b"DELETE", b"GET", b"HEAD", b"POST", b"PUT", b"CONNECT", b"OPTIONS", b"TRACE", b"COPY", b"LOCK",
    b"MKCOL", b"MOVE", b"PROPFIND", b"PROPPATCH", b"SEARCH", b"UNLOCK", b"BIND", b"REBIND", b"UNBIND",
    b"ACL", b"REPORT", b"MKACTIVITY", b"CHECKOUT", b"MERGE", b"M-SEARCH", b"NOTIFY", b"SUBSCRIBE",
    b"UNSUBSCRIBE", b"PATCH", b"PURGE", b"MKCALENDAR", b"LINK", b"UNLINK", b"SOURCE", b"QUERY",
    b"PRI", b"DESCRIBE", b"ANNOUNCE", b"SETUP", b"PLAY", b"PAUSE", b"TEARDOWN", b"GET_PARAMETER",
    b"SET_PARAMETER", b"REDIRECT", b"RECORD", b"FLUSH",
}

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def make(allow_get: bool = False, scope: str = "RemoteSite", **limits):
    framer = _dedup.Framer(scope, parse_query=allow_get)
    return _dedup.RequestParser(framer, list(CHANNELS), allow_get=allow_get, **{**LIMITS, **limits})


def feed_all(parser, pieces, now=NOW) -> list:
    events = []
    for piece in pieces:
        events += parser.feed(piece, now)
    return events


def norm(events) -> list:
    """Events as comparable tuples: envelopes and rejections by their fields."""
    out = []
    for ev in events:
        if ev[0] == EV_SUBMIT:
            r = ev[2]
            if isinstance(r, _dedup.Envelope):
                out.append(("envelope", ev[1], r.id, r.key, r.headers, r.body, r.expiry_ms, r.framed, r.callback))
            else:
                out.append(("rejection", ev[1], r.status, r.reason, r.callback))
        else:
            out.append(tuple(ev))
    return out


class _Stop(Exception):
    pass


class Reference:
    """httptools + Framer.frame with RequestParser's rules, as gwcore/http.py applies them today
    (limits, Expect, routing by HTTPState's channel match), but events instead of responses. Header
    values lose trailing spaces and tabs (llhttp keeps them; RequestParser strips OWS, RFC 9112),
    and trailer fields of a chunked body are not headers (http.py frames them as headers today)."""

    def __init__(self, allow_get: bool = False, max_headers=100, max_body=1 << 20) -> None:
        self.framer = _dedup.Framer("RemoteSite", parse_query=allow_get)
        self.parser = httptools.HttpRequestParser(self)
        self.allow_get = allow_get
        self.max_headers = max_headers
        self.max_body = max_body
        self.routes = SimpleNamespace(channel_paths=list(CHANNELS))
        self.done = False
        self.in_message = False

    def feed(self, data: bytes, now_ms: int) -> list:
        if self.done:
            return []
        self.events: list = []
        self.now = now_ms
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            pass  # _Stop: a limit answer, or the end after a request without keep-alive
        except httptools.HttpParserUpgrade:
            self._error(400, "Bad Request: protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._error(400, f"Bad Request: malformed HTTP ({exc})")
        if not self.done and self.in_message and self.headers_done and self.expect and not self.continued:
            self.continued = True
            self.events.append((EV_CONTINUE,))
        return self.events

    def _error(self, status: int, reason: str) -> None:
        self.events.append((EV_ERROR, status, reason))
        self.done = True

    def on_message_begin(self) -> None:
        self.in_message = True
        self.url = b""
        self.headers: list[bytes] = []
        self.body = bytearray()
        self.headers_done = self.expect = self.continued = False
        self.length = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers_done:
            return  # a trailer field: httptools reports it like a header, http.py frames it
        self.headers += [name, value.rstrip(b" \t")]
        if len(self.headers) > 2 * self.max_headers:
            self._error(431, f"Request Header Fields Too Large: more than {self.max_headers} headers")
            raise _Stop()

    def on_headers_complete(self) -> None:
        self.headers_done = True
        h = self.headers
        for i in range(0, len(h), 2):
            name = h[i].lower()
            if name == b"content-length":
                self.length = int(h[i + 1])
            elif name == b"expect":
                self.expect = h[i + 1].strip().lower() == b"100-continue"
        if self.length is not None and self.length > self.max_body:
            self._error(413, f"Payload Too Large: body of {self.length} bytes exceeds GWCORE_MAX_BODY={self.max_body}")
            raise _Stop()

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > self.max_body:
            self._error(413, f"Payload Too Large: body exceeds GWCORE_MAX_BODY={self.max_body} bytes")
            raise _Stop()

    def on_message_complete(self) -> None:
        self.in_message = False
        keep_alive = self.parser.should_keep_alive()
        method = self.parser.get_method()
        qpos = self.url.find(b"?")
        path, query = (self.url, None) if qpos < 0 else (self.url[:qpos], self.url[qpos + 1:])
        submit = ((method == b"POST" or (method == b"GET" and self.allow_get))
                  and path not in (b"/healthz", b"/readyz", b"/metrics")
                  and HTTPState._match(self.routes, path))  # type: ignore[arg-type]
        if submit:
            result = self.framer.frame(self.headers, bytes(self.body), query if self.allow_get else None, self.now)
            self.events.append((EV_SUBMIT, keep_alive, result))
        else:
            extra = None
            if path.startswith(b"/.gwcore/"):
                extra = {}
                for i in range(0, len(self.headers), 2):
                    name = self.headers[i].lower()
                    if name.startswith(b"gwcore-"):
                        extra.setdefault(name, self.headers[i + 1])
            self.events.append((EV_OTHER, keep_alive, method, path, extra))
        if not keep_alive:
            self.done = True
            raise _Stop()


# -- random request streams --------------------------------------------------------------------

TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
SHAPING = {"content-length", "transfer-encoding", "connection", "upgrade", "expect"}
NSB_PAIRS = [(n, v) for n, v in PLAIN_SUBMIT if n not in ("Content-MD5", "Content-Length")]
text = st.text(alphabet=st.one_of(st.sampled_from(string.ascii_letters + " .-:/,=+%~&"),
                                  st.characters(codec="utf-8", exclude_categories=["Cs"])), max_size=20)
raw_value = st.binary(max_size=20).map(
    lambda b: bytes(c for c in b if c >= 0x80 or 0x21 <= c < 0x7F or c in (0x20, 0x09)).strip(b" \t"))


@st.composite
def cased(draw, name: str) -> str:
    way = draw(st.integers(0, 3))
    if way == 0:
        return name
    if way == 1:
        return name.lower()
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.swapcase() if f else c for c, f in zip(name, flips))


@st.composite
def request(draw) -> bytes:
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    method = draw(st.sampled_from([b"POST", b"POST", b"POST", b"GET", b"PUT", b"HEAD"]))
    path = draw(st.sampled_from([b"/RemoteSite/", b"/remotesite", b"/REMOTESITE/sub/x", b"/RemoteSiteX",
                                 b"/other/site", b"/other/", b"/healthz", b"/metrics", b"/", b"*"]))
    if draw(st.integers(0, 3)) == 0:
        query = draw(st.lists(st.tuples(st.sampled_from(["callback", "Message", "NServiceBus.Id", "x"]), text),
                              max_size=3))
        path += b"?" + b"&".join(_dedup.url_encode(k).encode() + b"=" + _dedup.url_encode(v).encode()
                                 for k, v in query)
    body = draw(st.binary(max_size=200))
    pairs: list[tuple[bytes, bytes]] = []
    for name, value in NSB_PAIRS:
        if draw(st.integers(0, 9)):
            pairs.append((draw(cased(name)).encode(), value.encode()))
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=12))
        if name.lower() in SHAPING:
            continue
        value = draw(st.one_of(text.map(lambda t: _dedup.url_encode(t).encode()), raw_value))
        pairs.append((name.encode(), value))
    md5 = draw(st.sampled_from(["good", "good", "bad", None]))
    if md5:
        digest = base64.b64encode(hashlib.md5(body if md5 == "good" else body + b"!").digest())
        pairs.append((draw(cased("Content-MD5")).encode(), _dedup.url_encode(digest.decode()).encode()))
    connection = draw(st.sampled_from([None, None, b"close", b"keep-alive", b"Keep-Alive, foo", b"foo,  CLOSE"]))
    if connection is not None:
        pairs.append((draw(cased("Connection")).encode(), connection))
    if draw(st.integers(0, 4)) == 0:
        pairs.append((draw(cased("Expect")).encode(), draw(st.sampled_from([b"100-continue", b"100-Continue ", b"x"]))))
    if draw(st.integers(0, 6)) == 0:
        pairs.append((b"Upgrade", b"h2c"))  # without "Connection: upgrade": no upgrade
    framing = draw(st.sampled_from(["length", "length", "chunked"] + (["none"] if not body else [])))
    if framing == "length":
        pairs.append((draw(cased("Content-Length")).encode(), str(len(body)).encode()))
    elif framing == "chunked":
        pairs.append((draw(cased("Transfer-Encoding")).encode(), draw(st.sampled_from([b"chunked", b"gzip, chunked"]))))
    pairs = draw(st.permutations(pairs))
    head = method + b" " + path + b" " + version + b"\r\n"
    for name, value in pairs:
        # llhttp refuses an HTAB after "chunked" (OWS, RFC 9110 5.6.1): RequestParser does not
        trailing = [b"", b" "] if name.lower() == b"transfer-encoding" else [b"", b"", b" ", b"\t "]
        head += name + b":" + draw(st.sampled_from([b" ", b"", b"\t", b"  "])) + value + \
            draw(st.sampled_from(trailing)) + b"\r\n"
    out = head + b"\r\n"
    if framing == "length":
        out += body
    elif framing == "chunked":
        rest = body
        while rest:
            n = draw(st.integers(1, max(1, len(rest))))
            ext = draw(st.sampled_from([b"", b"", b";a", b";a=b", b';q="x y";r']))
            out += b"%x" % n + ext + b"\r\n" + rest[:n] + b"\r\n"
            rest = rest[n:]
        out += b"0" + draw(st.sampled_from([b"", b";last"])) + b"\r\n"
        for _ in range(draw(st.integers(0, 2))):
            out += b"X-Trailer: " + draw(raw_value) + b"\r\n"
        out += b"\r\n"
    return out


@st.composite
def stream_pieces(draw) -> tuple[bytes, list[bytes]]:
    stream = draw(st.sampled_from([b"", b"", b"\r\n"])).join(draw(st.lists(request(), min_size=1, max_size=4)))
    cuts = sorted(set(draw(st.lists(st.integers(0, len(stream)), max_size=6))))
    bounds = [0] + cuts + [len(stream)]
    return stream, [stream[a:b] for a, b in zip(bounds, bounds[1:])]


@SETTINGS
@given(stream_pieces(), st.booleans())
def test_valid_streams_agree_with_httptools(sp, allow_get):
    stream, pieces = sp
    mine = make(allow_get)
    ref = Reference(allow_get)
    got, want = [], []
    for piece in pieces:
        got += norm(mine.feed(piece, NOW))
        want += norm(ref.feed(piece, NOW))
    assert got == want
    assert not any(ev[0] == EV_ERROR for ev in got)
    event(f"{len(got)} events")
    assert not mine.in_request


@st.composite
def corrupted(draw) -> bytes:
    data = bytearray(draw(st.lists(request(), min_size=1, max_size=2).map(b"".join)))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data) - 1))
        byte = draw(st.one_of(st.sampled_from(b" \t\r\n:;,\x00\x7f\x80\"xZ0/-"), st.integers(0, 255)))
        way = draw(st.integers(0, 2))
        if way == 0:
            data[at] = byte
        elif way == 1:
            data.insert(at, byte)
        else:
            del data[at]
    return bytes(data)


def _disagreement(data: bytes, got: list, want: list) -> str | None:
    """Why RequestParser may accept what httptools refuses (None: it must not)."""
    reason = want[-1][2]
    if "Invalid method" in reason and any(ev[0] == EV_OTHER and ev[2] not in LLHTTP_METHODS for ev in got):
        return "a token method llhttp does not know"
    if "Chunk size overflow" in reason and got and got[-1][:2] == (EV_ERROR, 413):
        return "a chunk size past any limit is a 413"
    return None


@SETTINGS
@given(corrupted(), st.booleans())
def test_malformed_input_agrees_with_httptools(data, allow_get):
    parser = make(allow_get)
    got = norm(parser.feed(data, NOW))
    want = norm(Reference(allow_get).feed(data, NOW))
    if want and want[-1][0] == EV_ERROR and want[-1][1] == 400:
        why = _disagreement(data, got, want)
        if why is not None:
            event(f"RequestParser accepts: {why}")
            return
        if not (got and got[-1][0] == EV_ERROR) and parser.in_request:
            # llhttp refuses a bad byte at once; RequestParser checks a line (past its first 32
            # bytes) when it ends. It must refuse it then.
            got += norm(parser.feed(b"\r\n", NOW))
            event("refused at the end of the line")
            if _disagreement(data, got, want) is not None:
                # the CRLF completed a request llhttp refused for a reason allowed above (a body
                # one byte short, then the method "OST" of a corrupted "POST")
                event("RequestParser accepts once the line ends")
                return
        assert got and got[-1][0] == EV_ERROR and got[-1][1] == 400, (data, got[-1:], want[-1])
        event("both refuse")
    elif got and got[-1][0] == EV_ERROR:
        event(f"stricter than httptools: {got[-1][2][:60]}")
    else:
        assert got == want
        event("both accept")


# -- the §8.1 request at every split point --------------------------------------------------------

REQ = nsb_request(MSG_ID)


def test_plain_submit_matches_framer_frame():
    (kind, keep_alive, env), = make().feed(REQ, NOW)
    assert (kind, keep_alive) == (EV_SUBMIT, True)
    flat = []
    head, _, body = REQ.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b": ")
        flat += [name, value]
    expected = _dedup.Framer("RemoteSite").frame(flat, body, None, NOW)
    assert norm([(EV_SUBMIT, True, env)]) == norm([(EV_SUBMIT, True, expected)])
    assert env.id == MSG_ID and env.body == b'{"Hello":"World"}'


def test_every_split_point_and_byte_at_a_time():
    whole = norm(make().feed(REQ, NOW))
    for cut in range(len(REQ) + 1):
        parser = make()
        assert norm(feed_all(parser, [REQ[:cut], REQ[cut:]])) == whole, cut
        assert not parser.in_request
    parser = make()
    events = []
    for i in range(len(REQ)):
        events += parser.feed(REQ[i:i + 1], NOW)
        assert parser.in_request == (i < len(REQ) - 1)
    assert norm(events) == whole


def test_pipeline_in_one_feed_and_any_buffer_type():
    ids = [f"id-{i}" for i in range(5)]
    stream = b"".join(nsb_request(i) for i in ids) + b"GET /healthz HTTP/1.1\r\n\r\n"
    for data in (stream, bytearray(stream), memoryview(stream)):
        events = make().feed(data, NOW)
        assert [ev[2].id for ev in events[:5]] == ids
        assert events[5] == (EV_OTHER, True, b"GET", b"/healthz", None)


# -- limits ---------------------------------------------------------------------------------------

def test_413_with_content_length():
    req = nsb_request(MSG_ID, body=b"x" * 101)
    for pieces in ([req], [req[:len(req) - 101]]):     # refused once the headers are in
        assert make(max_body=100).feed(pieces[0], NOW) == [
            (EV_ERROR, 413, "Payload Too Large: body of 101 bytes exceeds GWCORE_MAX_BODY=100")]


def test_413_chunked_as_soon_as_a_chunk_size_goes_past():
    head = b"POST /RemoteSite/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    reason = "Payload Too Large: body exceeds GWCORE_MAX_BODY=100 bytes"
    parser = make(max_body=100)
    assert parser.feed(head + b"32\r\n" + b"x" * 50 + b"\r\n", NOW) == []
    assert parser.feed(b"33\r\n", NOW) == [(EV_ERROR, 413, reason)]   # 50 + 51 > 100, no data yet
    assert parser.feed(b"0\r\n\r\n", NOW) == []                       # finished
    assert make(max_body=100).feed(head + b"FFFFFFFFFFFFFFFFFFFFFFFF\r\n", NOW) == [(EV_ERROR, 413, reason)]
    # exactly the limit is fine
    events = make(max_body=100).feed(head + b"64\r\n" + b"x" * 100 + b"\r\n0\r\n\r\n", NOW)
    assert events[0][0] == EV_SUBMIT and events[0][2].status == 400       # no NServiceBus.Id


def test_431_too_many_headers():
    req = nsb_request(MSG_ID)
    count = req.partition(b"\r\n\r\n")[0].count(b"\r\n")
    assert make(max_headers=count).feed(req, NOW)[0][0] == EV_SUBMIT
    assert make(max_headers=count - 1).feed(req, NOW) == [
        (EV_ERROR, 431, f"Request Header Fields Too Large: more than {count - 1} headers")]


def test_431_header_section_size_is_exact():
    req = nsb_request(MSG_ID)
    section = len(req.partition(b"\r\n\r\n")[0]) + 2      # request line and header lines, CRLFs in
    assert make(max_header_bytes=section).feed(req, NOW)[0][0] == EV_SUBMIT
    reason = f"Request Header Fields Too Large: header section exceeds {section - 1} bytes"
    assert make(max_header_bytes=section - 1).feed(req, NOW) == [(EV_ERROR, 431, reason)]
    # byte at a time, the error comes with the byte that makes the section too long
    parser = make(max_header_bytes=section - 1)
    for i in range(len(req)):
        events = parser.feed(req[i:i + 1], NOW)
        if events:
            assert events == [(EV_ERROR, 431, reason)] and i == section - 1
            break
    else:
        pytest.fail("no 431")


@pytest.mark.parametrize("limit", [4096, 8192, 16384])
def test_431_header_that_never_ends_in_1k_pieces(limit):
    parser = make(max_header_bytes=limit)
    start = b"POST /RemoteSite/ HTTP/1.1\r\nX-Long: "
    fed = 0
    piece = start + b"a" * (1024 - len(start))
    while fed <= limit + 1024:
        events = parser.feed(piece, NOW)
        fed += len(piece)
        piece = b"a" * 1024
        if events:
            assert events == [(EV_ERROR, 431, f"Request Header Fields Too Large: header section exceeds {limit} bytes")]
            assert fed > limit and fed - 1024 <= limit        # the first piece that went past
            assert not parser.in_request and parser.feed(b"\r\n\r\n", NOW) == []
            return
    pytest.fail("no 431")


def test_431_trailer_section():
    head = b"POST /RemoteSite/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
    events = make(max_header_bytes=100).feed(head + b"X: " + b"a" * 200, NOW)
    assert events == [(EV_ERROR, 431, "Request Header Fields Too Large: header section exceeds 100 bytes")]


# -- Expect, upgrades, smuggling, chunked -----------------------------------------------------------

def test_expect_100_continue():
    req = nsb_request(MSG_ID, extra=[("Expect", "100-Continue")])
    head = req[:len(req) - 17]
    parser = make()
    assert parser.feed(head, NOW) == [(EV_CONTINUE,)]
    assert parser.feed(b'{"Hello"', NOW) == []                          # once
    assert [ev[0] for ev in parser.feed(b':"World"}', NOW)] == [EV_SUBMIT]
    assert [ev[0] for ev in make().feed(req, NOW)] == [EV_SUBMIT]      # body already in: no 100
    assert make().feed(head[:-1], NOW) == []                            # headers not complete
    assert make(max_body=10).feed(head, NOW)[0][:2] == (EV_ERROR, 413)  # does not fit: no 100
    chunked = b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert make().feed(chunked, NOW) == [(EV_CONTINUE,)]
    no_body = b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\n\r\n"
    assert make().feed(no_body, NOW) == [(EV_OTHER, True, b"POST", b"/x", None)]


UPGRADE = "Bad Request: protocol upgrades are not supported"


@pytest.mark.parametrize("head", [
    b"GET /RemoteSite/ HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"POST /x HTTP/1.1\r\nUpgrade: h2c\r\nConnection: keep-alive, upgrade\r\nContent-Length: 3\r\n\r\nabc",
    b"CONNECT example.org:443 HTTP/1.1\r\n\r\n",
])
def test_upgrade_is_refused(head):
    assert make().feed(head, NOW) == [(EV_ERROR, 400, UPGRADE)]


def test_absolute_form_and_asterisk():
    events = make().feed(b"POST http://h:1/RemoteSite/ HTTP/1.1\r\n\r\nOPTIONS * HTTP/1.1\r\n\r\n", NOW)
    assert events == [(EV_OTHER, True, b"POST", b"http://h:1/RemoteSite/", None), (EV_OTHER, True, b"OPTIONS", b"*", None)]


def test_tab_after_chunked_is_ows():
    # llhttp refuses "chunked<HTAB>" but takes "chunked<SP>"; both are OWS (RFC 9110 5.6.1)
    req = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\t\r\n\r\n1\r\na\r\n0\r\n\r\n"
    assert make().feed(req, NOW) == [(EV_OTHER, True, b"POST", b"/x", None)]


def test_upgrade_header_alone_is_no_upgrade():
    assert make().feed(b"GET /x HTTP/1.1\r\nUpgrade: h2c\r\n\r\n", NOW) == [(EV_OTHER, True, b"GET", b"/x", None)]


@pytest.mark.parametrize("head", [
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
    b"Content-Length: 5\r\nContent-Length: 5\r\n",       # llhttp refuses any repeat too
    b"Transfer-Encoding: gzip\r\n",
    b"Transfer-Encoding: chunked, gzip\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n",
    b"Content-Length: +5\r\n",
    b"Content-Length: 0x5\r\n",
    b"Content-Length: \r\n",
    b"Content-Length: 5 5\r\n",
])
def test_smuggling_and_bad_lengths_are_malformed(head):
    req = b"POST /RemoteSite/ HTTP/1.1\r\n" + head + b"\r\n0\r\n\r\nhello"
    events = make().feed(req, NOW)
    assert len(events) == 1 and events[0][:2] == (EV_ERROR, 400)
    assert events[0][2].startswith("Bad Request: malformed HTTP (")
    with pytest.raises(httptools.HttpParserError):
        httptools.HttpRequestParser(SimpleNamespace()).feed_data(req)


@pytest.mark.parametrize("line", [
    b"POST /RemoteSite/ HTTP/1.1\nHost: x\r\n\r\n",                 # bare LF
    b"POST /RemoteSite/ HTTP/1.1\r\nHost: x\n\r\n",
    b"POST /RemoteSite/ HTTP/1.1\r\nHost : x\r\n\r\n",              # space before ':'
    b"POST /RemoteSite/ HTTP/1.1\r\n: x\r\n\r\n",                   # empty name
    b"POST /RemoteSite/ HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",    # obs-fold
    b"POST /RemoteSite/ HTTP/1.1\r\nHost: x\x00y\r\n\r\n",          # NUL
    b"POST /RemoteSite/ HTTP/1.1\r\nHost: x\ry\r\n\r\n",            # CR
    b"POST /RemoteSite/ HTTP/1.1\r\nHost: x\x01\r\n\r\n",
    b"POST /RemoteSite/ HTTP/1.1\r\nHo(st: x\r\n\r\n",              # not a token
    b"PO\x00ST /RemoteSite/ HTTP/1.1\r\n\r\n",
    b"POST /Remote\x7fSite/ HTTP/1.1\r\n\r\n",
    b"POST /RemoteSite/ HTTP/1.2\r\n\r\n",
    b"POST /RemoteSite/ HTTP/1.1 \r\n\r\n",
    b"POST /RemoteSite/\r\n\r\n",                                   # HTTP/0.9 (llhttp takes it)
    b"POST  /RemoteSite/ HTTP/1.1\r\n\r\n",                         # two spaces (llhttp takes it)
    b"POST RemoteSite/ HTTP/1.1\r\n\r\n",                           # not origin- or absolute-form
    b"POST /RemoteSite/ HTTP/1.1\r\nHost: x\ry",                     # refused before any LF
])
def test_strict_syntax(line):
    events = make().feed(line, NOW)
    assert len(events) == 1 and events[0][:2] == (EV_ERROR, 400), events
    assert make().feed(b"", NOW) == []


def test_chunked_with_extensions_and_trailers_frames_like_content_length():
    req = nsb_request(MSG_ID)
    head, _, body = req.partition(b"\r\n\r\n")
    head = head.replace(b"Content-Length: 17", b"Transfer-Encoding: chunked")
    chunked = (head + b"\r\n\r\n" + b'3;a=b;c="d e"\r\n{"H\r\n' + b"a\r\n" + body[3:13] + b"\r\n"
               + b"4;x\r\n" + body[13:] + b"\r\n" + b"0;last\r\nX-Trailer: 1\r\nY: \r\n\r\n")
    whole = norm(make().feed(chunked, NOW))
    assert whole[0][0] == "envelope" and whole[0][5] == body
    expected = norm(Reference().feed(chunked, NOW))
    assert whole == expected
    for cut in range(len(chunked) + 1):
        assert norm(feed_all(make(), [chunked[:cut], chunked[cut:]])) == whole, cut
    assert norm(feed_all(make(), [chunked[i:i + 1] for i in range(len(chunked))])) == whole


@pytest.mark.parametrize("bad", [
    b"5 ;a\r\nhello\r\n0\r\n\r\n", b"5;\r\nhello\r\n0\r\n\r\n", b"5;a b\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhelloXX0\r\n\r\n", b"x\r\n\r\n", b"5\r\nhello\r\n0\r\nX y\r\n\r\n", b'5;a="b\r\nhello\r\n0\r\n\r\n',
])
def test_chunked_syntax_errors(bad):
    req = b"POST /RemoteSite/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + bad
    assert [ev[:2] for ev in make().feed(req, NOW)] == [(EV_ERROR, 400)]


# -- routing, keep-alive, the end -------------------------------------------------------------------

@pytest.mark.parametrize("method,path,allow_get,submit", [
    (b"POST", b"/RemoteSite/", False, True),
    (b"POST", b"/remotesite", False, True),
    (b"POST", b"/REMOTESITE/deeper?x=1", False, True),
    (b"POST", b"/RemoteSiteX/", False, False),
    (b"POST", b"/Other/Site", False, True),
    (b"POST", b"/other", False, False),
    (b"GET", b"/RemoteSite/", False, False),
    (b"GET", b"/RemoteSite/", True, True),
    (b"PUT", b"/RemoteSite/", True, False),
    (b"GET", b"/healthz", True, False),
])
def test_routing(method, path, allow_get, submit):
    (ev,) = make(allow_get).feed(method + b" " + path + b" HTTP/1.1\r\n\r\n", NOW)
    if submit:
        assert ev[0] == EV_SUBMIT
    else:
        assert ev == (EV_OTHER, True, method, path.partition(b"?")[0], None)


def test_query_reaches_the_framer_only_when_get_is_allowed():
    req = nsb_request(MSG_ID, path="/RemoteSite/?callback=cb&NServiceBus.TimeToBeReceived=00%3A00%3A05")
    (ev,) = make(allow_get=True).feed(req, NOW)
    assert ev[2].callback == "cb" and ev[2].expiry_ms == NOW + 5000
    (ev,) = make(allow_get=False).feed(req, NOW)
    assert ev[2].callback is None


@pytest.mark.parametrize("version,connection,keep_alive", [
    (b"HTTP/1.1", b"", True), (b"HTTP/1.1", b"Connection: close\r\n", False),
    (b"HTTP/1.1", b"Connection: a, Close \r\n", False), (b"HTTP/1.1", b"Connection: closed\r\n", True),
    (b"HTTP/1.0", b"", False), (b"HTTP/1.0", b"Connection: Keep-Alive\r\n", True),
])
def test_keep_alive_and_nothing_read_after_close(version, connection, keep_alive):
    req = b"GET /x " + version + b"\r\n" + connection + b"\r\n"
    parser = make()
    events = parser.feed(req + b"GET /y HTTP/1.1\r\n\r\n", NOW)
    assert events[0] == (EV_OTHER, keep_alive, b"GET", b"/x", None)
    assert len(events) == (2 if keep_alive else 1)
    if not keep_alive:
        assert parser.feed(b"GET /z HTTP/1.1\r\n\r\n", NOW) == [] and not parser.in_request


def test_empty_lines_between_requests_are_skipped():
    events = make().feed(b"\r\n\r\nGET /a HTTP/1.1\r\n\r\n\r\nGET /b HTTP/1.1\r\n\r\n", NOW)
    assert [ev[3] for ev in events] == [b"/a", b"/b"]


def test_other_request_bodies_are_dropped_in_pieces():
    parser = make(max_body=1000)
    events = parser.feed(b"POST /nowhere HTTP/1.1\r\nContent-Length: 900\r\n\r\n", NOW)
    for _ in range(9):
        assert events == [] and parser.in_request
        events = parser.feed(b"y" * 100, NOW)
    assert events == [(EV_OTHER, True, b"POST", b"/nowhere", None)]


@pytest.mark.parametrize("paths", [[b"/RemoteSite/"], [b"remotesite/"], [b"/remotesite"], ["/remotesite/"]])
def test_channel_paths_are_checked(paths):
    with pytest.raises(ConfigurationError):
        _dedup.RequestParser(_dedup.Framer("x"), paths, allow_get=False, **LIMITS)


@pytest.mark.parametrize("bad", [0x00, 0x01, 0x0B, 0x1F, 0x7F])
def test_control_byte_anywhere_in_a_long_value_is_malformed(bad):
    # header values are checked eight bytes at a time: every position in and around a word,
    # next to a TAB (allowed) and next to UTF-8 bytes (allowed)
    for length in (1, 7, 8, 9, 16, 23, 40):
        for pos in range(length):
            value = bytearray(b"\xc3\xa9\tabcdefgh" * 5)[:length]
            value[pos] = bad
            if value[0] in (0x09,) or value[-1] in (0x09,):
                continue  # leading/trailing TAB is OWS, not part of the value
            req = b"POST /RemoteSite/ HTTP/1.1\r\nHost: x\r\nX-V: " + bytes(value) + b"\r\n\r\n"
            events = make().feed(req, NOW)
            assert len(events) == 1 and events[0][:2] == (EV_ERROR, 400), (length, pos, events)
    ok = b"POST /RemoteSite/ HTTP/1.1\r\nHost: x\r\nX-V: " + b"\xc3\xa9\tabcdefgh" * 5 + b"\r\nContent-Length: 0\r\n\r\n"
    assert make().feed(ok, NOW)[0][0] != EV_ERROR
