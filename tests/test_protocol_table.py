"""docs/protocol.md's "Every answer" table, held to the code: each row's situation is sent to a
running gateway on a real socket and the answer compared with the row's status and reason.

The table is parsed from the document itself. Every row needs a builder here (keyed by its
situation text, word for word) and every builder a row: a row added to the docs without a test,
or a test whose row was reworded or removed, fails. Statuses are compared exactly; reasons
exactly too, but for ``<…>`` and ``…`` (wildcards: gwcore's explanations) and named placeholders
such as ``<v>``, which the builder fills with what it sent. A request answered anything but 200
must leave nothing behind: no message, no dedup record, no part record, no blob file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import time
import uuid
from typing import Awaitable, Callable

import pytest
from httpclient import Client, Response, nsb_request, read_response
from test_databus import blob_files, part_request, submit_request, wire_md5
from tmpfs import small_tmpfs

from gwcore import auth
from gwcore.databus import content_digest
from gwcore.databus.digests import b64

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "protocol.md")
SECTION = "## Every answer"


@dataclasses.dataclass(frozen=True)
class Row:
    situation: str
    status: int
    reason: str


def parse_table(text: str) -> list[Row]:
    """The rows of the first table under the "Every answer" heading."""
    start = text.index(SECTION + "\n")
    rows: list[Row] = []
    in_table = False
    for line in text[start:].splitlines()[1:]:
        if line.startswith("## "):
            break
        if not line.startswith("|"):
            if in_table:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not in_table:
            assert cells == ["situation", "status", "reason"], f"unexpected table head: {line}"
            in_table = True
            continue
        if set("".join(cells)) <= set("-: "):
            continue  # the separator line
        assert len(cells) == 3, f"a row needs three cells: {line}"
        situation, status, reason = cells
        assert reason.startswith("`") and reason.endswith("`"), f"the reason is code: {line}"
        rows.append(Row(situation, int(status), reason[1:-1]))
    assert rows, f"no table under {SECTION!r} in {DOC}"
    return rows


_PLACEHOLDER = re.compile(r"<[^<>]+>|…")


def reason_pattern(reason: str, bindings: dict[str, str]) -> re.Pattern[str]:
    """*reason* as a pattern: ``<…>`` and ``…`` match any non-empty text, ``<name>`` exactly
    ``bindings[name]`` (a builder must give every named placeholder its value)."""
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(reason):
        out.append(re.escape(reason[pos:m.start()]))
        token = m.group()
        if token in ("…", "<…>"):
            out.append(".+?")
        else:
            name = token[1:-1]
            assert name in bindings, f"the builder gives no value for {token} in {reason!r}"
            out.append(re.escape(bindings[name]))
        pos = m.end()
    out.append(re.escape(reason[pos:]))
    return re.compile("".join(out), re.DOTALL)


def test_reason_patterns():
    assert reason_pattern("Payload Too Large: …", {}).fullmatch("Payload Too Large: body of 9 bytes")
    assert not reason_pattern("Payload Too Large: …", {}).fullmatch("Payload Too Large: ")
    p = reason_pattern("Invalid CallType '<v>'. CallTypes", {"v": "Ack"})
    assert p.fullmatch("Invalid CallType 'Ack'. CallTypes") and not p.fullmatch("Invalid CallType 'Ac'. CallTypes")
    assert reason_pattern("a (<…>) b", {}).fullmatch("a (x) b")
    assert not reason_pattern("`OK`", {}).fullmatch("OK.")
    with pytest.raises(AssertionError, match="no value for <n>"):
        reason_pattern("Expected <n> claimcheck", {})


# -- what a builder gives back ------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    """One answer to a request of a row's situation."""

    label: str
    response: Response
    bindings: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Whether the request left anything in the store or the blob dir (None: not looked at).
    trace: bool | None = None


def _traces(gw) -> tuple:
    counts = gw.store.counts()
    return (counts["queue"], counts["dedup"], counts["databus_parts"], counts["databus_blobs"],
            len(blob_files(gw.settings.data_dir)))


class Ctx:
    """A row's surroundings: gateways it starts (stopped at the end), requests it sends."""

    def __init__(self, gateway_factory, tmp_path) -> None:
        self.factory = gateway_factory
        self.tmp_path = tmp_path
        self.stack = contextlib.AsyncExitStack()

    async def gateway(self, **settings):
        gw = self.factory(**settings)
        await gw.start()
        self.stack.push_async_callback(gw.stop)
        return gw

    async def send(self, gw, data: bytes, label: str, *, client: Client | None = None,
                   bindings: dict[str, str] | None = None) -> Outcome:
        """Send *data* (on *client*, or a new connection) and note whether it left a trace."""
        before = _traces(gw)
        if client is None:
            async with Client(*gw.addresses[0]) as c:
                r = await c.request(data)
        else:
            r = await client.request(data)
        after = _traces(gw)
        if r.status != 200:
            # a refused part's file is removed by a blob thread, just after the answer
            deadline = time.monotonic() + 10
            while after != before and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
                after = _traces(gw)
        return Outcome(label, r, bindings or {}, after != before)


Builder = Callable[[Ctx], Awaitable[list[Outcome]]]
BUILDERS: dict[str, Builder] = {}


def row(situation: str):
    def register(fn: Builder) -> Builder:
        assert situation not in BUILDERS, f"two builders for {situation!r}"
        BUILDERS[situation] = fn
        return fn
    return register


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def new_id() -> str:
    return str(uuid.uuid4())


def with_header(req: bytes, line: str) -> bytes:
    head, _, body = req.partition(b"\r\n\r\n")
    return head + b"\r\n" + line.encode() + b"\r\n\r\n" + body


MD5_OF_NOTHING = "1B2M2Y8AsgTpgAmY7PhCfg%3D%3D"  # the MD5 of b"": wrong for any other body


# -- 200 -------------------------------------------------------------------------------------------

@row("a new message")
async def _(ctx):
    gw = await ctx.gateway()
    return [await ctx.send(gw, nsb_request(new_id()), "submit")]


@row("a duplicate of a stored id")
async def _(ctx):
    gw = await ctx.gateway()
    msg = new_id()
    first = await ctx.send(gw, nsb_request(msg), "first")
    assert (first.response.status, first.trace) == (200, True)
    again = await ctx.send(gw, nsb_request(msg), "duplicate")
    assert again.trace is False  # answered 200, stored once
    again.trace = None
    return [again]


@row("a databus part stored")
async def _(ctx):
    gw = await ctx.gateway()
    out = []
    for size in (10, 300_000):  # framed from its head; its body read past the parser
        for chunked in (False, True):
            out.append(await ctx.send(gw, part_request(new_id(), "k", os.urandom(size), chunked=chunked),
                                      f"{size} bytes, chunked={chunked}"))
    return out


# -- 400 -------------------------------------------------------------------------------------------

@row("`NServiceBus.Id` missing or blank")
async def _(ctx):
    gw = await ctx.gateway()
    out = [await ctx.send(gw, nsb_request(""), "missing")]
    blank = nsb_request("x").replace(b"NServiceBus.Id: x\r\n", b"NServiceBus.Id: +%09+\r\n")
    out.append(await ctx.send(gw, blank, "blank"))
    return out


@row("`NServiceBus.CallType` missing")
async def _(ctx):
    gw = await ctx.gateway()
    return [await ctx.send(gw, nsb_request(new_id(), call_type=None), "no call type")]


@row("a call type other than `SingleCallSubmit`, `SingleCallDatabusProperty`, `0`, `1` (the legacy "
     "`Submit`, `Ack`, `DatabusProperty`, an undefined number such as `5`)")
async def _(ctx):
    gw = await ctx.gateway()
    return [await ctx.send(gw, nsb_request(new_id(), call_type=v), v, bindings={"v": v})
            for v in ("Submit", "Ack", "DatabusProperty", "5")]


@row("a databus part without `NServiceBus.Gateway.DataBusKey`, its `Content-MD5` right or absent")
async def _(ctx):
    gw = await ctx.gateway()
    out = []
    for size in (10, 300_000):
        blob = os.urandom(size)
        out.append(await ctx.send(gw, part_request(new_id(), "k", blob, databus_key=False), f"{size}, MD5 right"))
        out.append(await ctx.send(gw, part_request(new_id(), "k", blob, databus_key=False, md5=None),
                                  f"{size}, no MD5"))
    return out


@row("two headers with the same name (case-insensitively)")
async def _(ctx):
    gw = await ctx.gateway()
    req = nsb_request(new_id(), extra=[("nservicebus.replytoaddress", "Elsewhere")])
    return [await ctx.send(gw, req, "ReplyToAddress twice", bindings={"name": "nservicebus.replytoaddress"})]


@row("`NServiceBus.Id` longer than 400 bytes")
async def _(ctx):
    gw = await ctx.gateway()
    return [await ctx.send(gw, nsb_request("a" * 401), "401 bytes")]


@row("a databus part whose `Content-Digest` has a malformed `sha-256` member")
async def _(ctx):
    gw = await ctx.gateway()
    out = []
    for size in (10, 300_000):
        req = with_header(part_request(new_id(), "k", os.urandom(size)), "Content-Digest: sha-256%3Dnot-base64")
        out.append(await ctx.send(gw, req, f"{size} bytes"))
    return out


@row("repeated `Content-Length`, or `Content-Length` with `Transfer-Encoding`")
async def _(ctx):
    gw = await ctx.gateway()
    body = b'{"Hello":"World"}'
    twice = with_header(nsb_request(new_id(), body), f"Content-Length: {len(body)}")
    both = with_header(nsb_request(new_id(), body), "Transfer-Encoding: chunked")
    return [await ctx.send(gw, twice, "Content-Length twice"), await ctx.send(gw, both, "with Transfer-Encoding")]


# -- 412 -------------------------------------------------------------------------------------------

@row("a submit whose `Content-MD5` does not match its body")
async def _(ctx):
    gw = await ctx.gateway()
    return [await ctx.send(gw, nsb_request(new_id(), md5=MD5_OF_NOTHING), "wrong MD5")]


@row("a databus part whose `Content-MD5` does not match its body")
async def _(ctx):
    gw = await ctx.gateway()
    out = []
    for size in (10, 300_000):
        for chunked in (False, True):
            req = part_request(new_id(), "k", os.urandom(size), md5=MD5_OF_NOTHING, chunked=chunked)
            out.append(await ctx.send(gw, req, f"{size} bytes, chunked={chunked}"))
    return out


@row("a databus part without `NServiceBus.Gateway.DataBusKey` whose `Content-MD5` does not match its body "
     "(the hash is checked first, as NServiceBus does)")
async def _(ctx):
    gw = await ctx.gateway()
    out = []
    for size in (10, 300_000):
        for chunked in (False, True):
            req = part_request(new_id(), "k", os.urandom(size), md5=MD5_OF_NOTHING, databus_key=False,
                               chunked=chunked)
            out.append(await ctx.send(gw, req, f"{size} bytes, chunked={chunked}"))
    return out


@row("a databus part whose `Content-Digest` `sha-256` does not match its body")
async def _(ctx):
    import hashlib
    import urllib.parse

    gw = await ctx.gateway()
    wrong = urllib.parse.quote(content_digest(b64(hashlib.sha256(b"other").digest())), safe="")
    out = []
    for size in (10, 300_000):
        req = with_header(part_request(new_id(), "k", os.urandom(size)), f"Content-Digest: {wrong}")
        out.append(await ctx.send(gw, req, f"{size} bytes"))
    return out


@row("with `[receive.keys]`: a v2-signed submit or databus part whose body does not match the `Content-Digest` it "
     "signed (the part's blob is removed)")
async def _(ctx):
    gw = await ctx.gateway(receive_keys=KEYS)
    out = [await ctx.send(gw, v2_request(v2_submit(new_id()), BODY + b" ", sign_body=BODY), "submit")]
    for size in (10, 300_000):
        blob = os.urandom(size)
        out.append(await ctx.send(gw, v2_request(v2_part(new_id(), blob), blob, sign_body=b"other"), f"part, {size} bytes"))
    return out


@row("a submit naming databus parts none of which arrived")
async def _(ctx):
    gw = await ctx.gateway()
    return [await ctx.send(gw, submit_request(new_id(), ("A",)), "one part", bindings={"n": "1"}),
            await ctx.send(gw, submit_request(new_id(), ("A", "B")), "two parts", bindings={"n": "2"})]


@row("a submit naming a databus part that did not arrive, beside one that did")
async def _(ctx):
    gw = await ctx.gateway()
    msg = new_id()
    async with Client(*gw.addresses[0]) as c:
        assert (await c.request(part_request(msg, "A", b"part A"))).status == 200
        return [await ctx.send(gw, submit_request(msg, ("A", "B")), "B missing", client=c,
                               bindings={"name": "NServiceBus.Header.NServiceBus.DataBus.B"})]


# -- 401 -------------------------------------------------------------------------------------------

SECRET = b"0123456789abcdef-hq-secret"
KEYS = (("hq", SECRET),)
BODY = b'{"Sku":"A1","Price":12.5}'


def v2_submit(msg_id: str, body: bytes = BODY) -> list[tuple[str, str]]:
    return [("NServiceBus.Id", msg_id), ("NServiceBus.CorrelationId", msg_id),
            ("NServiceBus.Header.NServiceBus.MessageId", msg_id), ("NServiceBus.Gateway", "True"),
            ("NServiceBus.CallType", "SingleCallSubmit")]


def v2_part(msg_id: str, blob: bytes) -> list[tuple[str, str]]:
    return [("NServiceBus.Id", msg_id), ("NServiceBus.CorrelationId", msg_id),
            ("NServiceBus.Header.NServiceBus.DataBus.k", "k"),
            ("NServiceBus.Gateway.DataBusKey", "NServiceBus.Header.NServiceBus.DataBus.k"),
            ("NServiceBus.Gateway", "True"), ("NServiceBus.CallType", "SingleCallDatabusProperty"),
            ("Content-MD5", wire_md5(blob))]


def v2_request(headers: list[tuple[str, str]], body: bytes, *, sign_body: bytes | None = None,
               secret: bytes = SECRET, key_id: str = "hq", drop: str | None = None,
               after: list[tuple[str, str]] = (), length: int | None = None) -> bytes:
    """A request signed as gwcore.auth.signature_headers_v2 signs it; *drop* leaves a header
    out after signing, *after* adds headers after signing."""
    signed_headers = auth.signature_headers_v2(secret, key_id, "POST", "/RemoteSite/",
                                               [(n.encode(), v.encode()) for n, v in headers],
                                               body if sign_body is None else sign_body)
    headers = headers + [(n.decode(), v.decode()) for n, v in signed_headers] + list(after)
    lines = ["POST /RemoteSite/ HTTP/1.1", "Host: localhost", *[f"{n}: {v}" for n, v in headers if n != drop],
             f"Content-Length: {len(body) if length is None else length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def signed(msg_id: str, *, secret: bytes = SECRET, key_id: str = "hq", now: float | None = None,
           md5: str | None = "auto", call_type: str = "SingleCallSubmit", drop: str | None = None,
           replace: tuple[str, str] | None = None) -> bytes:
    """A submit signed as gwcore.auth signs it; *drop* leaves one of the two headers out,
    *replace* gives one of them another value."""
    headers = [(n.decode(), v.decode()) for n, v in
               auth.signature_headers(secret, key_id, "POST", "/RemoteSite/", msg_id, BODY, now=now)]
    if replace is not None:
        headers = [(n, replace[1] if n == replace[0] else v) for n, v in headers]
    headers = [(n, v) for n, v in headers if n != drop]
    return nsb_request(msg_id, BODY, extra=headers, md5=md5, call_type=call_type)


async def refused(ctx, req: bytes, label: str, **settings) -> list[Outcome]:
    return await refused_all(ctx, [(req, label)], **settings)


async def refused_all(ctx, requests: list[tuple[bytes, str]], **settings) -> list[Outcome]:
    """Each request sent to one gateway with [receive.keys]; each must name its scheme."""
    gw = await ctx.gateway(receive_keys=KEYS, **settings)
    challenge = "gwcore-v2" if settings.get("auth_accept_v1") is False else "gwcore-v2, gwcore-v1"
    out = []
    for req, label in requests:
        out.append(await ctx.send(gw, req, label))
        assert out[-1].response.headers.get("www-authenticate") == challenge
    return out


@row("with `[receive.keys]`: no `gwcore-Signature`")
async def _(ctx):
    return await refused(ctx, nsb_request(new_id(), BODY), "unsigned")


@row("with `[receive.keys]`: a `gwcore-Signature` not of the form `v2.<key id>.<43 base64url characters>` (or `v1.…`)")
async def _(ctx):
    return await refused_all(ctx, [(signed(new_id(), replace=("gwcore-Signature", "v1.hq.tooshort")), "short HMAC"),
                                   (signed(new_id(), replace=("gwcore-Signature", "v3.hq." + "A" * 43)), "v3")])


@row("with `[receive.keys]` and `accept_v1 = false`: a scheme v1 signature")
async def _(ctx):
    return await refused(ctx, signed(new_id()), "v1", auth_accept_v1=False)


@row("with `[receive.keys]`: a v2 signature without a `sha-256` `Content-Digest`, or a v1-signed databus part "
     "without one")
async def _(ctx):
    return await refused_all(ctx, [
        (v2_request(v2_submit(new_id()), BODY, drop="Content-Digest"), "v2 submit"),
        (with_header(signed(new_id(), call_type="SingleCallDatabusProperty"), "NServiceBus.Gateway.DataBusKey: k"),
         "v1 part")])


@row("with `[receive.keys]`: a signature without `gwcore-Date`")
async def _(ctx):
    return await refused(ctx, signed(new_id(), drop="gwcore-Date"), "no date")


@row("with `[receive.keys]`: an HMAC that does not match, or a key id not among them (the same answer, v1 and v2)")
async def _(ctx):
    wrong = b"not-the-secret-0123456789"
    out = await refused_all(ctx, [
        (signed(new_id(), secret=wrong), "v1 wrong secret"),
        (signed(new_id(), key_id="elsewhere"), "v1 unknown key id"),
        (v2_request(v2_submit(new_id()), BODY, secret=wrong), "v2 wrong secret"),
        (v2_request(v2_submit(new_id()), BODY, key_id="elsewhere"), "v2 unknown key id")])
    assert len({o.response.reason for o in out}) == 1, "an unknown key id is told from a wrong secret"
    return out


@row("with `[receive.keys]`: a v2-signed request with an `NServiceBus.*`, `gwcore-*`, `Content-MD5` or "
     "`Content-Digest` header added, removed or changed on the way")
async def _(ctx):
    requests = [(v2_request(v2_submit(new_id()), BODY, after=after), label) for label, after in (
        ("ReplyToAddress added", [("NServiceBus.ReplyToAddress", "Elsewhere")]),
        ("message header added", [("NServiceBus.Header.NServiceBus.EnclosedMessageTypes", "X")]),
        ("gwcore-* added", [("gwcore-Extra", "1")]),
        ("Content-MD5 added", [("Content-MD5", wire_md5(BODY))]))]
    requests.append((v2_request(v2_submit(new_id()), BODY, drop="NServiceBus.Header.NServiceBus.MessageId"),
                     "message header removed"))
    requests.append((v2_request(v2_submit(new_id()), BODY).replace(b"CallType: SingleCallSubmit", b"CallType: 0"),
                     "call type changed"))
    return await refused_all(ctx, requests)


@row("with `[receive.keys]`: a databus part whose signature does not hold, refused at its head (no blob file is "
     "created, its body is not read, the connection closes after the answer)")
async def _(ctx):
    gw = await ctx.gateway(receive_keys=KEYS)
    out = []
    for label, secret in (("v2 wrong secret", b"not-the-secret-0123456789"), ("v2 forged", None)):
        head = v2_request(v2_part(new_id(), b""), b"", sign_body=b"x", secret=secret or SECRET, length=8 << 20)
        if secret is None:
            head = re.sub(rb"v2\.hq\.[A-Za-z0-9_-]{43}", b"v2.hq." + b"A" * 43, head)
        before = _traces(gw)
        async with Client(*gw.addresses[0]) as c:
            await c.send(head + b"x" * 65536)       # an eighth of a MiB of the 8 MiB announced
            r = await asyncio.wait_for(c.response(), 10)
            assert await c.closed()
        out.append(Outcome(label, r, trace=_traces(gw) != before))
    return out


@row("with `[receive.keys]`: a right HMAC over a `gwcore-Date` not of the form `YYYYMMDDTHHMMSSZ`")
async def _(ctx):
    msg, date = new_id(), "2026-01-01T00:00:00Z"
    hmac = auth.sign(SECRET, "POST", "/RemoteSite/", date, msg, auth.body_digest(BODY))
    req = nsb_request(msg, BODY, extra=[("gwcore-Date", date), ("gwcore-Signature", f"v1.hq.{hmac}")])
    return await refused(ctx, req, "ISO date")


@row("with `[receive.keys]`: a right HMAC, dated outside `GWCORE_AUTH_MAX_SKEW`")
async def _(ctx):
    return await refused(ctx, signed(new_id(), now=time.time() - 3600), "an hour old")


@row("with `[receive.keys]`: an unsigned databus part without `NServiceBus.Gateway.DataBusKey` (401 comes before 400)")
async def _(ctx):
    return await refused(ctx, part_request(new_id(), "k", b"x" * 10, databus_key=False), "unsigned part, no key")


@row("with `[receive.keys]`: a wrongly signed submit whose `Content-MD5` does not match (401 comes before 412)")
async def _(ctx):
    return await refused(ctx, signed(new_id(), secret=b"not-the-secret-0123456789", md5=MD5_OF_NOTHING),
                         "wrong secret, wrong MD5")


# -- 404, 405, 408, 413, 431, 502 ----------------------------------------------------------------------

@row("a path below no receive channel")
async def _(ctx):
    gw = await ctx.gateway()
    return [await ctx.send(gw, nsb_request(new_id(), path="/OtherSite/"), "/OtherSite/",
                           bindings={"path": "/OtherSite/"})]


@row("a method other than POST on a channel")
async def _(ctx):
    gw = await ctx.gateway()
    return [await ctx.send(gw, nsb_request(new_id(), method=m), m) for m in ("GET", "PUT")]


@row("a request whose head is not complete within `GWCORE_HTTP_REQUEST_TIMEOUT` of its first byte, "
     "or of whose body nothing arrives for that long")
async def _(ctx):
    gw = await ctx.gateway(http_request_timeout=0.3)
    before = _traces(gw)
    out = []
    req = nsb_request(new_id())
    for label, sent in (("head cut short", req[:40]), ("body cut short", req[:-5])):
        async with Client(*gw.addresses[0]) as c:
            await c.send(sent)  # the rest never comes
            r = await c.response()
            assert await c.closed()
        out.append(Outcome(label, r, trace=_traces(gw) != before))
    return out


async def _trickled(ctx, gw, req: bytes, first: int, label: str) -> Outcome:
    """*first* bytes of *req*, then one byte every 0.1 s until the gateway answers."""
    before = _traces(gw)
    async with Client(*gw.addresses[0]) as c:
        await c.send(req[:first])

        async def trickle():
            with contextlib.suppress(ConnectionError, OSError):
                while True:
                    await asyncio.sleep(0.1)
                    await c.send(b"x")

        task = asyncio.ensure_future(trickle())
        try:
            r = await asyncio.wait_for(c.response(), 30)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await until(lambda: _traces(gw) == before, "the cut-off request's traces to go")
    return Outcome(label, r, trace=False)


@row("a request slower than `GWCORE_HTTP_MIN_RATE` on average once `GWCORE_HTTP_REQUEST_TIMEOUT` is used up "
     "(a submit or a databus part)")
async def _(ctx):
    gw = await ctx.gateway(http_request_timeout=0.3, http_min_rate=64 << 10)
    submit = nsb_request(new_id(), body=b"s" * 300_000)
    part = part_request(new_id(), "k", os.urandom(300_000))
    return [await _trickled(ctx, gw, submit, len(submit) - 200_000, "a trickled submit"),
            await _trickled(ctx, gw, part, len(part) - 200_000, "a trickled part")]


@row("a body above `GWCORE_MAX_BODY`")
async def _(ctx):
    gw = await ctx.gateway(max_body=1024)
    return [await ctx.send(gw, nsb_request(new_id(), body=b"x" * 2048), "2048 bytes")]


@row("a databus part above `GWCORE_MAX_BLOB`")
async def _(ctx):
    gw = await ctx.gateway(max_blob=1000)
    return [await ctx.send(gw, part_request(new_id(), "k", b"x" * 2000), "2000 bytes")]


@row("more than `GWCORE_HTTP_MAX_HEADERS` headers")
async def _(ctx):
    gw = await ctx.gateway(http_max_headers=30)
    return [await ctx.send(gw, nsb_request(new_id(), extra=[(f"X-H{i}", "v") for i in range(40)]), "40 more")]


@row("a gateway message without `NServiceBus.CorrelationId` (as NServiceBus)")
async def _(ctx):
    gw = await ctx.gateway()
    return [await ctx.send(gw, nsb_request(new_id(), correlation=False), "no correlation id")]


# -- 503 -------------------------------------------------------------------------------------------

@row("the store at `GWCORE_STORE_MAX_SIZE`")
async def _(ctx):
    gw = await ctx.gateway(store_map_size=256 << 10, store_max_size=1 << 20)
    async with Client(*gw.addresses[0]) as c:
        for _ in range(200):
            out = await ctx.send(gw, nsb_request(new_id(), body=b"f" * 20_000), "20 kB submits", client=c)
            if out.response.status != 200:
                return [out]
    raise AssertionError("200 submits of 20 kB fit a store of at most 1 MiB")


async def _fill(path: str) -> None:
    """Write zeros to *path* until its file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * (64 << 10))
    except OSError as exc:
        assert exc.errno == 28, exc  # ENOSPC
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def full_disk(ctx):
    """A gateway whose data dir is on a small tmpfs, which is then filled up; space again on exit."""
    with small_tmpfs(ctx.tmp_path / "small", "4m") as mnt:
        gw = await ctx.gateway(data_dir=os.path.join(mnt, "store"), store_map_size=8 << 20, store_max_size=8 << 20)
        try:
            assert (await ctx.send(gw, nsb_request(new_id()), "before")).response.status == 200
            await _fill(os.path.join(mnt, "filler"))
            yield gw
            os.unlink(os.path.join(mnt, "filler"))
            # space again: the gateway takes messages and parts as before
            assert (await ctx.send(gw, nsb_request(new_id()), "after")).response.status == 200
            assert (await ctx.send(gw, part_request(new_id(), "k", b"p" * 300_000), "after")).response.status == 200
        finally:
            await gw.stop()


@row("a submit while the data dir's disk is full")
async def _(ctx):
    async with full_disk(ctx) as gw:
        # the first may still fit in pages the store's file has free; the disk fills at the latest
        # with the second
        async with Client(*gw.addresses[0]) as c:
            for _ in range(20):
                out = await ctx.send(gw, nsb_request(new_id(), body=b"q" * 30_000), "30 kB", client=c)
                if out.response.status != 200:
                    return [out]
    raise AssertionError("20 submits of 30 kB went into a full 4 MiB file system")


@row("a databus part while the data dir's disk is full")
async def _(ctx):
    async with full_disk(ctx) as gw:
        return [await ctx.send(gw, part_request(new_id(), "k", os.urandom(size)), f"{size} bytes")
                for size in (3000, 300_000)]


@row("`GWCORE_COMMIT_MAX_PENDING` requests already waiting for the writer")
async def _(ctx):
    # One write of five submits is one read for the gateway: the first is the writer's one
    # pending request until its commit, the four behind it find the queue full.
    gw = await ctx.gateway(commit_max_pending=1)
    ids = [new_id() for _ in range(5)]
    async with Client(*gw.addresses[0]) as c:
        await c.send(b"".join(nsb_request(i) for i in ids))
        answers = [await c.response() for _ in ids]
    assert [r.status for r in answers] == [200, 503, 503, 503, 503]
    stored = [i for i in ids if gw.writer.is_recorded("RemoteSite", i)]
    assert stored == ids[:1]
    return [Outcome(f"pipelined {n + 2}", r, trace=False) for n, r in enumerate(answers[1:])]


@row("a request that arrives while gwcore stops (the requests before it are answered)")
async def _(ctx):
    # A commit held back for a while keeps the first request in flight; the second is half sent
    # when the stop begins (so the connection stays open), and completed once it is draining.
    gw = ctx.factory(commit_max_delay_us=300_000)
    await gw.start()
    first, late = new_id(), new_id()
    second = nsb_request(late)
    stopping = None
    try:
        async with Client(*gw.addresses[0]) as c:
            await c.send(nsb_request(first) + second[:40])
            await until(lambda: any(conn.in_request for conn in gw.states[0].connections),
                        "the gateway to read the first request and the start of the second")
            stopping = asyncio.ensure_future(gw.stop())
            await until(lambda: gw.states[0].draining, "the gateway to begin draining")
            await c.send(second[40:])
            answered = await c.response()
            r = await c.response()
            assert r.headers.get("connection") == "close" and await c.closed()
    finally:
        await (stopping if stopping is not None else gw.stop())
    assert (answered.status, answered.reason) == (200, "OK")
    from gwcore._core import core
    from gwcore.store import Store

    store = Store(gw.settings.data_dir, readonly=True)
    try:
        stored = [core.decode_envelope(framed)[0] for _seq, framed in store.read_queue(0, 100)]
    finally:
        store.close()
    assert stored == [first]
    return [Outcome("completed while draining", r, trace=late in stored)]


@row("a connection beyond `GWCORE_HTTP_MAX_CONNECTIONS` while every connection is busy (else the one idle the "
     "longest is closed to make room)")
async def _(ctx):
    gw = await ctx.gateway(http_max_connections=1)
    async with Client(*gw.addresses[0]) as a:
        assert (await a.request(nsb_request(new_id()))).status == 200
        req = nsb_request(new_id())
        await a.send(req[:-3])  # busy: a request begun
        await until(lambda: any(conn.in_request for conn in gw.states[0].connections), "a request begun")
        async with Client(*gw.addresses[0]) as b:
            r = await read_response(b.reader)
            assert await b.closed()
        await a.send(req[-3:])
        assert (await a.response()).status == 200
    return [Outcome("the second connection", r)]


@row("a connection beyond `GWCORE_HTTP_MAX_CONNECTIONS_PER_PEER` from one address")
async def _(ctx):
    gw = await ctx.gateway(http_max_connections_per_peer=1)
    async with Client(*gw.addresses[0], local="127.0.0.2") as a:
        assert (await a.request(nsb_request(new_id()))).status == 200
        async with Client(*gw.addresses[0], local="127.0.0.2") as b:
            r = await read_response(b.reader)
            assert await b.closed()
        async with Client(*gw.addresses[0], local="127.0.0.3") as other:
            assert (await other.request(nsb_request(new_id()))).status == 200
    return [Outcome("a second connection from 127.0.0.2", r)]


@row("a databus part beyond `GWCORE_HTTP_MAX_PARTS_PER_PEER` being received from one address (answered at its head)")
async def _(ctx):
    gw = await ctx.gateway(http_max_parts_per_peer=1)
    first = part_request(new_id(), "k", os.urandom(300_000))
    async with Client(*gw.addresses[0]) as a:
        await a.send(first[:-100_000])
        await until(lambda: blob_files(gw.settings.data_dir), "the first part's file")
        out = await ctx.send(gw, part_request(new_id(), "k", os.urandom(1000)), "a second part at once")
        await a.send(first[-100_000:])
        assert (await a.response()).status == 200
    return [out]


# -- the test ---------------------------------------------------------------------------------------

ROWS = parse_table(open(DOC, encoding="utf-8").read())


def test_every_row_has_a_builder_and_every_builder_a_row():
    documented = [r.situation for r in ROWS]
    assert len(set(documented)) == len(documented), "two rows with the same situation"
    unsent = [s for s in documented if s not in BUILDERS]
    assert not unsent, f"rows of docs/protocol.md nothing here sends (add a builder): {unsent}"
    gone = [s for s in BUILDERS if s not in documented]
    assert not gone, f"builders whose row is gone from docs/protocol.md: {gone}"


@pytest.mark.parametrize("entry", ROWS, ids=[f"{i:02d}-{r.status}" for i, r in enumerate(ROWS)])
def test_row(entry: Row, run, gateway_factory, tmp_path):
    builder = BUILDERS.get(entry.situation)
    assert builder is not None, f"no builder for the row {entry.situation!r}"

    async def main() -> list[Outcome]:
        ctx = Ctx(gateway_factory, tmp_path)
        async with ctx.stack:
            return await builder(ctx)

    outcomes = run(main())
    assert outcomes, "a builder sends at least one request"
    for o in outcomes:
        r = o.response
        what = f"{entry.situation} [{o.label}]"
        assert r.status == entry.status, f"{what}: {r.status} {r.reason}"
        assert reason_pattern(entry.reason, o.bindings).fullmatch(r.reason), f"{what}: {r.reason!r}"
        assert r.body == r.reason.encode(), f"{what}: the body is the reason"
        if o.trace is not None:
            assert o.trace == (entry.status == 200), f"{what}: left a trace: {o.trace}"
