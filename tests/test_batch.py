"""Batches between gwcore sites (docs/protocol.md, "Batches between gwcore sites"): the layout
against a Python reference, each message framed as its own request would be, malformed and
oversized batches refused with nothing stored, duplicates inside and across batches, one bad
message never failing the others, signed batches, and the sender's negotiation (batches only to
receivers that advertise them; one message per request to everyone else). The SIGKILL tests of
tests/test_sites.py run with batches on (the default), sender and receiver killed mid-stream."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import uuid

import orjson
import pytest
from hypothesis import given, settings, strategies as st
from httpclient import Client, nsb_request
from test_sites import counts

from gwcore import Gateway
from gwcore import _dedup as core
from gwcore import auth
from gwcore.batch import advertised
from gwcore.egress import OutgoingRecord, encode_outgoing, wire_headers
from gwcore.errors import FramingError

HEADERS = 256  # GWCORE_HTTP_MAX_HEADERS's default
HEADER_BYTES = 64 << 10  # GWCORE_HTTP_MAX_HEADER_BYTES's default
_NAME = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters=":"), min_size=1,
                max_size=20)
_VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)


def reference_batch(messages) -> bytes:
    """The layout of docs/protocol.md, written out in Python."""
    out = [b"GB\x01\x00", struct.pack(">I", len(messages))]
    for block, body in messages:
        out.append(struct.pack(">I", len(block)) + block)
        out.append(struct.pack(">Q", len(body)) + body)
    return b"".join(out)


def block_of(msg_id: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A message's header block as gwcore sends it alone (egress.wire_headers)."""
    lines = wire_headers(msg_id, headers or {"NServiceBus.EnclosedMessageTypes": "Shop.Order"}, body)
    return b"".join(b"%s: %s\r\n" % (k, v) for k, v in lines)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(st.tuples(_NAME, _VALUE), max_size=6), st.binary(max_size=200)), max_size=6))
def test_encode_is_the_documented_layout_and_each_message_frames_as_alone(messages):
    wire = [(b"".join(b"%s: %s\r\n" % (n.encode(), v.encode()) for n, v in headers), body)
            for headers, body in messages]
    data = core.encode_batch(wire)
    assert data == reference_batch(wire)
    framer, alone = core.Framer("Ep"), core.Framer("Ep")
    got = framer.frame_batch(data, 1000, 100, max_headers=HEADERS, max_header_bytes=HEADER_BYTES)
    assert len(got) == len(messages)
    for result, (headers, body) in zip(got, messages):
        flat = [x.encode() for pair in headers for x in pair]
        want = alone.frame(flat, body, None, 1000)
        if type(want) is core.Batch or (type(want) is core.Envelope and want.call_type != core.CALL_SUBMIT):
            # a batch inside a batch, a databus part: refused on its own
            assert type(result) is core.Rejection and result.status == 400
            continue
        assert type(result) is type(want)
        if type(want) is core.Envelope:
            assert (result.id, result.framed, result.key) == (want.id, want.framed, want.key)
        else:
            assert (result.status, result.reason) == (want.status, want.reason)


def reference_block(block: bytes) -> list[tuple[bytes, bytes]]:
    """A header block's (name, value) lines as docs/protocol.md describes them, in Python: each
    line ``name: value`` CRLF, the value without the blanks around it; FramingError otherwise."""
    out, i = [], 0
    while i < len(block):
        start, colon = i, None
        while i < len(block) and block[i] != 0x0D:
            if block[i] in (0x0A, 0):
                raise FramingError("bare LF or a NUL")
            if block[i] == 0x3A and colon is None:
                if i == start:
                    raise FramingError("empty name")
                colon = i
            i += 1
        if colon is None:
            raise FramingError("no colon")
        if block[i + 1:i + 2] != b"\n":
            raise FramingError("does not end in CRLF")
        out.append((block[start:colon], block[colon + 1:i].strip(b" \t")))
        i += 2
    return out


_PIECES = st.sampled_from([b"NServiceBus.Id", b"NServiceBus.CallType", b"SingleCallSubmit", b"X-a", b"v",
                           b":", b" ", b"\t", b"\r\n", b"\r", b"\n", b"\0", b"%20", b"+"])
_BLOCK = st.lists(st.one_of(st.just(b"NServiceBus.Id: m\r\nNServiceBus.CallType: SingleCallSubmit\r\n"),
                            _PIECES), max_size=30).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(st.lists(_BLOCK, min_size=1, max_size=4), st.integers(0, 6))
def test_header_blocks_against_the_reference(blocks, limit):
    """Blanks, CR, LF and NUL anywhere in a block: the same lines, or the same refusal, as the
    reference; more than the header limit is that message's 431."""
    data = core.encode_batch([(block, b"") for block in blocks])
    try:
        parsed = [reference_block(block) for block in blocks]
    except FramingError as exc:
        with pytest.raises(FramingError, match=str(exc)):
            core.Framer("Ep").frame_batch(data, 1, 10, max_headers=limit, max_header_bytes=HEADER_BYTES)
        return
    got = core.Framer("Ep").frame_batch(data, 1, 10, max_headers=limit, max_header_bytes=HEADER_BYTES)
    alone = core.Framer("Ep")
    for result, lines in zip(got, parsed, strict=True):
        if len(lines) > limit:
            assert (result.status, result.reason) == (
                431, f"Request Header Fields Too Large: more than {limit} headers")
            continue
        want = alone.frame([x for line in lines for x in line], b"", None, 1)
        assert type(result) is type(want)
        if type(want) is core.Envelope:
            assert (result.id, result.framed) == (want.id, want.framed)
        else:
            assert (result.status, result.reason) == (want.status, want.reason)


def test_the_documented_vector():
    """docs/protocol.md, "Batches between gwcore sites": the bytes given there."""
    import re
    from pathlib import Path
    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    section = doc.split("## Batches between gwcore sites", 1)[1]
    hex_text = re.search(r"\*\*Test vector\.\*\*.*?```\n(.*?)```", section, re.S).group(1)
    block = (b"NServiceBus.Id: 7c1f\r\nNServiceBus.CallType: SingleCallSubmit\r\nContent-MD5: "
             + core.content_md5(b"hi").encode() + b"\r\n")
    assert core.encode_batch([(block, b"hi")]) == bytes.fromhex("".join(hex_text.split()))
    (env,) = core.Framer("Ep").frame_batch(bytes.fromhex("".join(hex_text.split())), 1, 10,
                                              max_headers=HEADERS, max_header_bytes=HEADER_BYTES)
    assert (env.id, env.body) == ("7c1f", b"hi")


def test_every_truncation_and_trailing_byte_is_refused():
    data = core.encode_batch([(block_of("a", b"x"), b"x"), (block_of("b", b""), b"")])
    framer = core.Framer("Ep")
    for cut in range(len(data)):
        with pytest.raises(FramingError):
            framer.frame_batch(data[:cut], 1, 10, max_headers=HEADERS, max_header_bytes=HEADER_BYTES)
    with pytest.raises(FramingError, match="unexpected bytes"):
        framer.frame_batch(data + b"\0", 1, 10, max_headers=HEADERS, max_header_bytes=HEADER_BYTES)


@pytest.mark.parametrize("data, match", [
    (b"GT\x01\x00\0\0\0\0", "bad magic"),
    (b"GB\x02\x00\0\0\0\0", "version"),
    (b"GB\x01\x01\0\0\0\0", "flags"),
    (b"GB\x01\x00\0\0\0\x05" + b"\0" * 12, "cannot fit"),
    (b"GB\x01\x00\0\0\0\x01\0\0\0\x05abc\r\n" + b"\0" * 8, "no colon"),
    (b"GB\x01\x00\0\0\0\x01\0\0\0\x04a:b\n" + b"\0" * 8, "bare LF|CRLF"),
    (b"GB\x01\x00\0\0\0\x01\0\0\0\x05:ab\r\n" + b"\0" * 8, "empty name"),
])
def test_malformed_batches(data, match):
    with pytest.raises(FramingError, match=match):
        core.Framer("Ep").frame_batch(data, 1, 10, max_headers=HEADERS, max_header_bytes=HEADER_BYTES)


def test_too_many_messages_is_a_value_error_before_any_is_framed():
    data = core.encode_batch([(block_of(str(i), b""), b"") for i in range(3)])
    with pytest.raises(ValueError, match="GWCORE_MAX_BATCH_MESSAGES=2"):
        core.Framer("Ep").frame_batch(data, 1, 2, max_headers=HEADERS, max_header_bytes=HEADER_BYTES)


def _many_headers(msg_id: str, count: int) -> bytes:
    """A message's header block of exactly *count* lines: its own (block_of's) and X-H<i> ones."""
    block = block_of(msg_id, b"")
    return block + b"".join(b"X-H%d: v\r\n" % i for i in range(count - block.count(b"\r\n")))


def test_a_message_with_more_headers_than_the_limit_is_431_on_its_own():
    limit = 30
    data = core.encode_batch([(_many_headers("a", limit), b""), (_many_headers("b", limit + 1), b""),
                              (block_of("c", b""), b"")])
    a, b, c = core.Framer("Ep").frame_batch(data, 1, 10, max_headers=limit, max_header_bytes=HEADER_BYTES)
    assert (type(a), type(c)) == (core.Envelope, core.Envelope) and (a.id, c.id) == ("a", "c")
    assert type(b) is core.Rejection
    # what a single request with too many headers gets from the HTTP parser
    assert (b.status, b.reason) == (431, f"Request Header Fields Too Large: more than {limit} headers")


def test_a_message_whose_header_block_is_too_big_is_431_on_its_own():
    """GWCORE_HTTP_MAX_HEADER_BYTES bounds each message's header block as it bounds a request's
    header section: a block one byte over it is that message's 431, one at the bound frames."""
    def padded(msg_id: str, size: int) -> bytes:  # X-Pad's line is 9 bytes and its value
        block = block_of(msg_id, b"")
        return block + b"X-Pad: " + b"p" * (size - len(block) - 9) + b"\r\n"

    limit = len(block_of("a", b"")) + 50
    at, over = padded("a", limit), padded("b", limit + 1)
    assert (len(at), len(over)) == (limit, limit + 1)
    data = core.encode_batch([(at, b""), (over, b""), (block_of("c", b""), b"")])
    a, b, c = core.Framer("Ep").frame_batch(data, 1, 10, max_headers=HEADERS, max_header_bytes=limit)
    assert (type(a), type(c)) == (core.Envelope, core.Envelope) and (a.id, c.id) == ("a", "c")
    # what a single request with too big a header section gets from the HTTP parser
    assert (type(b), b.status, b.reason) == (
        core.Rejection, 431, f"Request Header Fields Too Large: header section exceeds {limit} bytes")


def test_blocks_of_many_lines_frame_as_alone():
    """Blocks of more lines than the framer's first scratch holds, one after another."""
    blocks = [_many_headers(str(n), n) for n in (40, 3, 200, 65)]
    got = core.Framer("Ep").frame_batch(core.encode_batch([(b, b"") for b in blocks]), 1, 10, max_headers=HEADERS, max_header_bytes=HEADER_BYTES)
    alone = core.Framer("Ep")
    for result, block in zip(got, blocks, strict=True):
        want = alone.frame([x for line in reference_block(block) for x in line], b"", None, 1)
        assert (result.id, result.framed) == (want.id, want.framed)


def test_a_malformed_line_past_the_header_limit_is_still_a_malformed_batch():
    """The block's layout is the batch's: checked whole before the message's own limit."""
    data = core.encode_batch([(_many_headers("a", 5) + b"no colon\r\n", b"")])
    with pytest.raises(FramingError, match="no colon"):
        core.Framer("Ep").frame_batch(data, 1, 10, max_headers=2, max_header_bytes=HEADER_BYTES)


def test_advertised_limits():
    assert advertised([(b"Server", b"x"), (b"gwcore-Batch", b"1; messages=10; bytes=2048")]).messages == 10
    # the room is shared among the requests in flight; unknown fields are ignored
    roomy = advertised([(b"gwcore-Batch", b"1; messages=1000; bytes=2048; room=8192; later=1")])
    assert (roomy.room, roomy.per_request(8), roomy.per_request(32), roomy.per_request(10_000)) == (8192, 1000, 256, 1)
    assert advertised([(b"gwcore-Batch", b"1; messages=1000; bytes=2048")]).per_request(32) == 1000
    assert advertised([(b"gwcore-batch", b"2; messages=10; bytes=2048")]) is None  # another version
    assert advertised([(b"gwcore-Batch", b"1; messages=0; bytes=2048")]) is None
    assert advertised([(b"Server", b"nginx")]) is None


def _record(msg_id: str, body: bytes, *, attempt: int = 0, headers: dict[str, str] | None = None,
            expiry_ms: int = 0) -> bytes:
    """An outgoing record (egress.py's layout) of one message to RemoteSite."""
    h = {"NServiceBus.EnclosedMessageTypes": "Shop.Order", "NServiceBus.MessageId": msg_id, **(headers or {})}
    framed = core.encode_envelope(msg_id, h, body, expiry_ms, 1000)
    return encode_outgoing(OutgoingRecord("RemoteSite", attempt, 0, "503 earlier" if attempt else "", framed))


def _batch_block(msg_id: str, body: bytes, headers: dict[str, str], extra: dict[str, str] | None = None) -> bytes:
    h = {"NServiceBus.EnclosedMessageTypes": "Shop.Order", "NServiceBus.MessageId": msg_id, **headers,
         **(extra or {})}
    lines = wire_headers(msg_id, h, body, in_batch=True)
    return b"".join(b"%s: %s\r\n" % (k, v) for k, v in lines)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.binary(max_size=300),
                          # names that differ only in case are one HTTP header: such a message
                          # is refused on its own (a duplicate header), not framed as the reference
                          st.dictionaries(_NAME, _VALUE, max_size=4).filter(
                              lambda h: len({k.lower() for k in h}) == len(h))), min_size=1, max_size=8))
def test_outgoing_records_to_a_batch_in_one_call_as_the_reference_builds_it(messages):
    records, want = [], []
    for i, (attempt, body, headers) in enumerate(messages):
        headers = {k: v for k, v in headers.items() if not k.startswith("NServiceBus.")}
        msg_id = f"m{i}"
        records.append(_record(msg_id, body, attempt=attempt, headers=headers))
        extra = {"NServiceBus.Retries": str(attempt), "NServiceBus.Retries.Timestamp": "T"} if attempt else None
        want.append((_batch_block(msg_id, body, headers, extra), body))
    data, kinds = core.encode_outgoing_batch(records, b"NServiceBus.DataBus.", "T", 5000, 1000, 1 << 30)
    assert kinds == bytes(len(records)) and data == reference_batch(want)
    # and the receiver frames each as it frames the message alone (sha-256 checked, not MD5)
    got = core.Framer("Ep").frame_batch(data, 1000, 1000, max_headers=HEADERS, max_header_bytes=HEADER_BYTES)
    assert [type(r).__name__ for r in got] == ["Envelope"] * len(records)


def test_what_does_not_go_in_a_batch_is_said_per_record():
    small = [_record(f"s{i}", b"x" * 10) for i in range(3)]
    expired = _record("old", b"x", headers={"NServiceBus.TimeToBeReceived": "00:00:01"}, expiry_ms=2000)
    databus = _record("blob", b"x", headers={"NServiceBus.DataBus.Shop.Photo": "key-1"})
    big = _record("big", b"y" * 5000)
    values = [small[0], expired, databus, big, small[1], small[2]]
    one = len(reference_batch([(_batch_block("s0", b"x" * 10, {}), b"x" * 10)]))
    data, kinds = core.encode_outgoing_batch(values, b"NServiceBus.DataBus.", "T", 3000, 1000, 2 * one - 8)
    assert list(kinds) == [core.OUT_IN_BATCH, core.OUT_EXPIRED, core.OUT_ALONE, core.OUT_TOO_BIG,
                           core.OUT_IN_BATCH, core.OUT_LEFT]
    assert [e.id for e in core.Framer("Ep").frame_batch(data, 1, 10, max_headers=HEADERS, max_header_bytes=HEADER_BYTES)] == ["s0", "s1"]
    _data, kinds = core.encode_outgoing_batch(small, b"NServiceBus.DataBus.", "T", 3000, 2, 1 << 20)
    assert list(kinds) == [core.OUT_IN_BATCH, core.OUT_IN_BATCH, core.OUT_LEFT]   # the message limit
    assert core.encode_outgoing_batch([], b"D", "T", 1, 1, 100) == (None, b"")
    for cut in (0, 5, 13, 20):
        with pytest.raises(FramingError):
            core.encode_outgoing_batch([small[0][:cut]], b"D", "T", 1, 10, 1 << 20)


def test_a_batch_message_digest_is_sha256_and_checked():
    body = b"the body"
    block = _batch_block("d1", body, {})
    assert b"Content-Digest: sha-256%3D%3A" in block and b"Content-MD5" not in block
    framer = core.Framer("Ep")
    (env,) = framer.frame_batch(core.encode_batch([(block, body)]), 1, 10, max_headers=HEADERS, max_header_bytes=HEADER_BYTES)
    assert type(env) is core.Envelope
    (bad,) = framer.frame_batch(core.encode_batch([(block, b"another body")]), 1, 10, max_headers=HEADERS, max_header_bytes=HEADER_BYTES)
    assert (bad.status, "sha-256" in bad.reason) == (412, True)
    other = block.replace(b"sha-256%3D%3A", b"sha-512%3D%3A")
    (refused,) = framer.frame_batch(core.encode_batch([(other, body)]), 1, 10, max_headers=HEADERS, max_header_bytes=HEADER_BYTES)
    assert refused.status == 400 and "sha-256" in refused.reason
    # outside a batch the framer leaves Content-Digest to the verifier (signed requests)
    flat = [x for line in block.split(b"\r\n")[:-1] for x in line.split(b": ", 1)]
    assert type(framer.frame(flat, b"another body", None, 1)) is core.Envelope


# -- a real receiver ---------------------------------------------------------------------------------


def _post_batch(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\ngwcore-Batch: 1\r\nContent-Length: {len(body)}\r\n".encode()
            + extra + b"\r\n" + body)


async def _send(gw: Gateway, request: bytes):
    async with Client(*gw.addresses[0]) as c:
        return await c.request(request)


def test_a_batch_is_stored_message_by_message_with_its_outcomes(run, make_settings):
    ids = [str(uuid.uuid4()) for _ in range(4)]
    good = [(block_of(i, b"body-" + i.encode()), b"body-" + i.encode()) for i in ids]
    # the third carries a Content-MD5 of another body: 412 for it alone
    tampered = (good[2][0], b"not the body")
    first = core.encode_batch([good[0], good[1], tampered, good[0]])   # a duplicate inside the batch
    second = core.encode_batch([good[1], good[2], good[3]])            # one across batches

    async def main():
        async with Gateway(make_settings()) as gw:
            r = await _send(gw, _post_batch("/RemoteSite/", first))
            assert r.status == 200, r.reason
            results = orjson.loads(r.body)["results"]
            assert [x["status"] for x in results] == [200, 200, 412, 200]
            assert [x.get("duplicate") for x in results] == [False, False, None, True]
            assert "MD5" in results[2]["reason"]
            assert gw.store.counts()["queue"] == 2
            r = await _send(gw, _post_batch("/RemoteSite/", second))
            assert [(x["status"], x["duplicate"]) for x in orjson.loads(r.body)["results"]] == \
                [(200, True), (200, False), (200, False)]
            assert gw.store.counts()["queue"] == 4

    run(main())


def test_a_listeners_first_batch_asks_for_the_batch_receivers_malloc(run, make_settings, monkeypatch):
    """gwcore/malloc.py: the receiver says when it takes its first batch (and only then); single
    submits alone never ask."""
    from gwcore import malloc

    calls = []
    monkeypatch.setattr(malloc, "batch_seen", lambda: calls.append(1) or False)
    ids = [str(uuid.uuid4()) for _ in range(2)]

    async def main():
        async with Gateway(make_settings()) as gw:
            async with Client(*gw.addresses[0]) as c:
                assert (await c.request(nsb_request(ids[0]))).status == 200
            assert calls == []
            for i in ids:
                body = core.encode_batch([(block_of(i, b"x"), b"x")])
                assert (await _send(gw, _post_batch("/RemoteSite/", body))).status == 200
            assert calls == [1]

    run(main())


@pytest.mark.parametrize("body, status, reason", [
    (b"GB\x01\x00\0\0\0\x05", 400, "malformed batch"),
    (b"junk", 400, "malformed batch"),
])
def test_malformed_batch_over_a_socket_stores_nothing(run, make_settings, body, status, reason):
    async def main():
        async with Gateway(make_settings()) as gw:
            r = await _send(gw, _post_batch("/RemoteSite/", body))
            assert (r.status, reason in r.reason) == (status, True)
            assert gw.store.counts()["queue"] == 0

    run(main())


def test_too_many_headers_in_one_message_over_a_socket(run, make_settings):
    """GWCORE_HTTP_MAX_HEADERS holds for each message of a batch as for a single submit: that
    message is 431, with the reason a single submit gets, and the others are stored."""
    limit = 30
    ids = [str(uuid.uuid4()) for _ in range(3)]
    batch = core.encode_batch([(block_of(ids[0], b""), b""), (_many_headers(ids[1], limit + 1), b""),
                               (_many_headers(ids[2], limit), b"")])

    async def main():
        async with Gateway(make_settings(http_max_headers=limit)) as gw:
            r = await _send(gw, _post_batch("/RemoteSite/", batch))
            assert r.status == 200, r.reason
            results = orjson.loads(r.body)["results"]
            assert [x["status"] for x in results] == [200, 431, 200]
            assert results[1]["reason"] == f"Request Header Fields Too Large: more than {limit} headers"
            stored = [core.decode_envelope(framed)[0] for _, framed in gw.store.read_queue(0, 10)]
            assert sorted(stored) == sorted([ids[0], ids[2]])

    run(main())


def test_a_too_big_header_block_in_one_message_over_a_socket(run, make_settings):
    """GWCORE_HTTP_MAX_HEADER_BYTES holds for each message of a batch: a message carrying one
    header of 8 KiB past a 4 KiB bound is 431 and not stored, the others are."""
    ids = [str(uuid.uuid4()) for _ in range(3)]
    big = block_of(ids[1], b"") + b"X-Big: " + b"v" * 8192 + b"\r\n"
    batch = core.encode_batch([(block_of(ids[0], b""), b""), (big, b""), (block_of(ids[2], b""), b"")])

    async def main():
        async with Gateway(make_settings(http_max_header_bytes=4096)) as gw:
            r = await _send(gw, _post_batch("/RemoteSite/", batch))
            assert r.status == 200, r.reason
            results = orjson.loads(r.body)["results"]
            assert [x["status"] for x in results] == [200, 431, 200]
            assert results[1]["reason"] == "Request Header Fields Too Large: header section exceeds 4096 bytes"
            stored = [core.decode_envelope(framed)[0] for _, framed in gw.store.read_queue(0, 10)]
            assert sorted(stored) == sorted([ids[0], ids[2]])

    run(main())


def test_oversized_batches_are_413_with_nothing_stored(run, make_settings):
    three = core.encode_batch([(block_of(str(uuid.uuid4()), b"x" * 100), b"x" * 100) for _ in range(3)])

    async def main():
        async with Gateway(make_settings(max_batch_messages=2)) as gw:
            r = await _send(gw, _post_batch("/RemoteSite/", three))
            assert r.status == 413 and "GWCORE_MAX_BATCH_MESSAGES=2" in r.reason
            assert gw.store.counts()["queue"] == 0
        async with Gateway(make_settings(max_batch_bytes=len(three) - 1)) as gw:
            r = await _send(gw, _post_batch("/RemoteSite/", three))
            assert r.status == 413 and "GWCORE_MAX_BATCH_BYTES" in r.reason
            assert gw.store.counts()["queue"] == 0

    run(main())


def test_every_200_to_a_submit_advertises_batches(run, make_settings):
    async def main():
        async with Gateway(make_settings(max_batch_messages=77)) as gw:
            body = b"hello"
            lines = block_of(str(uuid.uuid4()), body)
            r = await _send(gw, b"POST /RemoteSite/ HTTP/1.1\r\nHost: x\r\n" + lines
                            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert r.status == 200
            assert r.headers["gwcore-batch"] == f"1; messages=77; bytes={4 << 20}; room=8192"

    run(main())


# -- the sender --------------------------------------------------------------------------------------


class _PlainReceiver:
    """An HTTP receiver that answers every request 200 without advertising batches (as an
    NServiceBus gateway does), recording each request's head."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    def answer(self, n: int) -> bytes:
        """The answer to the *n*-th request."""
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK"

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                self.heads.append(head)
                writer.write(self.answer(len(self.heads)))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def _sender(make_settings, tmp_path, url: str, **kw):
    return make_settings(data_dir=str(tmp_path / "a"), endpoint="SiteA", sites=f"SiteB={url}",
                         receive_channels="http://127.0.0.1:0/SiteA/", **kw)


async def _until(predicate, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _learned_batches(a: Gateway, site: str = "SiteB") -> None:
    """Until A has read a receiver's answer that advertises batches (what it sends next is batched)."""
    await _until(lambda: site in a.forwarder._dests and a.forwarder._dests[site].batch is not None, 10,
                 "A to learn that the receiver takes batches")


def test_a_gwcore_receiver_gets_batches_once_it_advertised_them(run, make_settings, tmp_path):
    n = 600

    async def main():
        async with Gateway(make_settings(data_dir=str(tmp_path / "b"), endpoint="SiteB",
                                         receive_channels="http://127.0.0.1:0/SiteB/")) as b:
            host, port = b.addresses[0]
            async with Gateway(_sender(make_settings, tmp_path, f"http://{host}:{port}/SiteB/")) as a:
                await a.send_to_sites(["SiteB"], b"first")  # alone: B's answer advertises batches
                await _until(lambda: b.store.counts()["queue"] == 1, 10, "the first message")
                await _learned_batches(a)  # B's 200 is read after B's commit: wait for A to have read it
                await asyncio.gather(*(a.send_to_sites(["SiteB"], b"m%d" % i) for i in range(n)))
                await _until(lambda: b.store.counts()["queue"] == n + 1, 30, "every message at B")
                await _until(lambda: a.store.counts()["outgoing"] == 0, 10, "A's outgoing queue to drain")
                dest = a.forwarder._dests["SiteB"]
                assert dest.batch is not None and dest.batches > 0
                assert a.store.counts()["outgoing_errors"] == 0

    run(main())


def test_a_receiver_that_does_not_advertise_gets_one_message_per_request(run, make_settings, tmp_path):
    async def main():
        plain = _PlainReceiver()
        port = await plain.start()
        try:
            async with Gateway(_sender(make_settings, tmp_path, f"http://127.0.0.1:{port}/SiteB/")) as a:
                await asyncio.gather(*(a.send_to_sites(["SiteB"], b"m%d" % i) for i in range(200)))
                await _until(lambda: a.store.counts()["outgoing"] == 0, 30, "A's outgoing queue to drain")
                assert a.forwarder._dests["SiteB"].batches == 0
        finally:
            plain.server.close()
        assert len(plain.heads) == 200
        assert not any(b"gwcore-batch" in h.lower() for h in plain.heads)
        assert all(b"NServiceBus.Id: " in h for h in plain.heads)

    run(main())


def test_send_batch_off_sends_one_message_per_request_to_gwcore_too(run, make_settings, tmp_path):
    async def main():
        async with Gateway(make_settings(data_dir=str(tmp_path / "b"), endpoint="SiteB",
                                         receive_channels="http://127.0.0.1:0/SiteB/")) as b:
            host, port = b.addresses[0]
            async with Gateway(_sender(make_settings, tmp_path, f"http://{host}:{port}/SiteB/",
                                       send_batch=False)) as a:
                await asyncio.gather(*(a.send_to_sites(["SiteB"], b"m%d" % i) for i in range(300)))
                await _until(lambda: b.store.counts()["queue"] == 300, 30, "every message at B")
                assert a.forwarder._dests["SiteB"].batches == 0

    run(main())


def test_signed_batches_and_a_tampered_one(run, make_settings, tmp_path):
    secret = "s" * 32

    async def main():
        b_settings = make_settings(data_dir=str(tmp_path / "b"), endpoint="SiteB",
                                   receive_channels="http://127.0.0.1:0/SiteB/",
                                   receive_keys=(("SiteA", secret.encode()),), allow_unsigned=False)
        async with Gateway(b_settings) as b:
            host, port = b.addresses[0]
            url = f"http://{host}:{port}/SiteB/"
            a_settings = _sender(make_settings, tmp_path, url)
            signing = dataclasses.replace(a_settings.site("SiteB"), secret=secret.encode(), key_id="SiteA")
            a_settings = dataclasses.replace(a_settings, sites=(signing,))
            async with Gateway(a_settings) as a:
                await a.send_to_sites(["SiteB"], b"first")
                await _until(lambda: b.store.counts()["queue"] == 1, 10, "the first message")
                await _learned_batches(a)  # B's 200 is read after B's commit: wait for A to have read it
                await asyncio.gather(*(a.send_to_sites(["SiteB"], b"m%d" % i) for i in range(300)))
                await _until(lambda: b.store.counts()["queue"] == 301, 30, "every signed message at B")
                assert a.forwarder._dests["SiteB"].batches > 0
                # a batch signed as A signs it, then one byte of a message changed on the way
                body = core.encode_batch([(block_of(str(uuid.uuid4()), b"pay 10"), b"pay 10")])
                lines = b"gwcore-Batch: 1\r\n"
                lines += auth.signature_lines(secret.encode(), "SiteA", "POST", "/SiteB/", lines,
                                              auth.body_digest(body))
                forged = body.replace(b"pay 10", b"pay 99")
                req = (b"POST /SiteB/ HTTP/1.1\r\nHost: x\r\n" + lines
                       + f"Content-Length: {len(forged)}\r\n\r\n".encode() + forged)
                r = await _send(b, req)
                assert r.status == 401, (r.status, r.reason)
                # an unsigned batch is refused too
                r = await _send(b, _post_batch("/SiteB/", body))
                assert r.status == 401
                assert b.store.counts()["queue"] == 301

    run(main())
    assert counts(str(tmp_path / "a"))["outgoing_errors"] == 0


def test_send_many_commits_once_and_is_all_or_nothing(run, make_settings, tmp_path):
    from gwcore.errors import UnknownSiteError

    async def main():
        async with Gateway(make_settings(data_dir=str(tmp_path / "b"), endpoint="SiteB",
                                         receive_channels="http://127.0.0.1:0/SiteB/")) as b:
            host, port = b.addresses[0]
            async with Gateway(_sender(make_settings, tmp_path, f"http://{host}:{port}/SiteB/")) as a:
                commits = a.writer.stats.batches
                with pytest.raises(UnknownSiteError, match="Nowhere"):
                    await a.send_many([(["SiteB"], b"ok"), (["Nowhere"], b"lost")])
                assert a.store.counts()["outgoing"] + b.store.counts()["queue"] == 0
                ids = await a.send_many([(["SiteB"], b"m%d" % i, {"Kind": str(i)}) for i in range(500)])
                assert len(set(ids)) == 500
                assert a.writer.stats.batches - commits == 1  # one transaction for all 500
                await _until(lambda: b.store.counts()["queue"] == 500, 30, "every message at B")
                from procs import queued_ids
            assert sorted(queued_ids(str(tmp_path / "b"))) == sorted(ids)

    run(main())


def test_replies_and_requests_go_in_batches_both_ways(run, tmp_path):
    """Many concurrent request()s: the requests reach the remote site in batches, and so do the
    replies on their way back to the requester's channel URL (a destination that is not a
    configured site); every request gets its own reply."""
    from test_egress import settings_for, url_of
    n = 300

    async def main():
        async def remote_handler(msg):
            await remote.reply(msg, b"re:" + msg.body)

        remote = Gateway(settings_for(tmp_path, "RemoteSite", sites="", handler_concurrency=32),
                         handler=remote_handler)
        async with remote:
            sites = f"RemoteSite={url_of(remote, 'RemoteSite')}"
            others: list = []   # replies reach request() through the consumer, so one runs
            async with Gateway(settings_for(tmp_path, "Headquarters", sites=sites), handler=others.append) as hq:
                first = await hq.request("RemoteSite", b"warm-up", timeout=20)   # both sides learn
                assert first.body == b"re:warm-up"
                replies = await asyncio.gather(*(hq.request("RemoteSite", b"%d" % i, timeout=60)
                                                 for i in range(n)))
                assert sorted(r.body for r in replies) == sorted(b"re:%d" % i for i in range(n))
                assert others == []
                assert hq.forwarder._dests["RemoteSite"].batches > 0
                (back,) = remote.forwarder._dests.values()      # the reply destination: a URL
                assert back.name == url_of(hq, "Headquarters") and back.batches > 0
                assert hq.store.counts()["outgoing_errors"] == remote.store.counts()["outgoing_errors"] == 0

    run(main())


def test_a_full_receiver_refuses_a_batch_before_framing_any_of_it(run, make_settings, monkeypatch):
    from gwcore.store import Writer
    batch = core.encode_batch([(block_of(str(i), b"x"), b"x") for i in range(3)])
    # the count is read by the preamble reader frame_batch uses: anything else counts 0 (and is 400)
    assert core.batch_count(batch) == 3
    assert [core.batch_count(b) for b in (b"junk", b"GT" + batch[2:], batch[:7])] == [0, 0, 0]

    async def main():
        async with Gateway(make_settings(commit_max_pending=4)) as gw:
            monkeypatch.setattr(Writer, "pending", property(lambda self: 2))
            framer = gw.states[0].framer
            before = framer.framed_total
            r = await _send(gw, _post_batch("/RemoteSite/", batch))
            assert (r.status, "ingest queue full" in r.reason) == (503, True)
            assert framer.framed_total == before     # not one message framed
            monkeypatch.undo()
            r = await _send(gw, _post_batch("/RemoteSite/", batch))
            assert r.status == 200 and gw.store.counts()["queue"] == 3

    run(main())


def test_the_send_window_halves_on_congestion_and_grows_back_by_one_per_window(run):
    from gwcore.egress import SendWindow

    async def main():
        w = SendWindow(8, hold=0.0)
        assert w.size == 8
        w.answered(503)
        assert w.size == 4
        w.answered(0)                 # no answer (timeout, connection lost): congestion too
        assert w.size == 2
        for _ in range(10):
            w.answered(503)
        assert w.size == 1            # never below one
        w.answered(400)               # an answer that is not congestion grows it
        assert w.size == 2
        for _ in range(2):
            w.answered(200)
        assert 2.8 < w.size < 3       # about one more per window of answers (2 + 1/2 + 1/2.5)
        held = SendWindow(8, hold=60.0)
        held.answered(503)
        held.answered(503)            # the requests already on the way say nothing new
        assert held.size == 4 and held.shrinks == 1
        # workers wait while the window is full, and one is let in per place that frees up
        w = SendWindow(2)
        await w.acquire()
        await w.acquire()
        third = asyncio.ensure_future(w.acquire())
        await asyncio.sleep(0.01)
        assert not third.done()
        w.release()
        await asyncio.wait_for(third, 1)
        assert w.in_flight == 2

    run(main())


def test_a_sender_sizes_its_batches_to_the_receivers_room(run, make_settings, tmp_path):
    """A receiver with little room (GWCORE_COMMIT_MAX_PENDING=120) says so; a sender allowed 32
    requests in flight shares it among them (batches of 3), so the receiver never has to refuse."""
    n = 600

    async def main():
        async with Gateway(make_settings(data_dir=str(tmp_path / "b"), endpoint="SiteB", max_batch_messages=50,
                                         commit_max_pending=120,
                                         receive_channels="http://127.0.0.1:0/SiteB/")) as b:
            host, port = b.addresses[0]
            async with Gateway(_sender(make_settings, tmp_path, f"http://{host}:{port}/SiteB/", send_concurrency=32,
                                       retry_delays=(0.05,), retries=1000)) as a:
                await a.send_to_sites(["SiteB"], b"first")
                await _until(lambda: b.store.counts()["queue"] == 1, 10, "the first message")
                await _learned_batches(a)  # B's 200 is read after B's commit: wait for A to have read it
                d = a.forwarder._dests["SiteB"]
                assert (d.batch.room, d.batch_size()) == (120, 3)
                await a.send_many([(["SiteB"], b"m%d" % i) for i in range(n)])
                await _until(lambda: a.store.counts()["outgoing"] == 0, 60, "A's outgoing queue to drain")
                assert b.store.counts()["queue"] == n + 1
                assert b.states[0].requests_by_status[503] == 0 and d.batches > 0
                assert a.forwarder.retried == 0 and a.store.counts()["outgoing_errors"] == 0

    run(main())


def _without_room(gw: Gateway) -> None:
    """The receiver advertises batches without its room (as one before that field did, or one
    shared by many senders would be in effect)."""
    from gwcore.batch import BatchLimits, advertise_header
    state = gw.states[0]
    state._advertise = advertise_header(BatchLimits(state.batch_limits.messages, state.batch_limits.bytes))


def test_a_batch_refused_503_is_back_pressure_not_a_failed_attempt(run, make_settings, tmp_path):
    """A receiver with little room that does not say so, and a sender allowed many requests in
    flight: batches are refused 503; the sender's window shrinks, it sends them again after a
    back-off without counting an attempt (no record rewritten, NServiceBus.Retries untouched), and
    every message arrives once."""
    n = 600

    async def main():
        async with Gateway(make_settings(data_dir=str(tmp_path / "b"), endpoint="SiteB", max_batch_messages=50,
                                         commit_max_pending=120,
                                         receive_channels="http://127.0.0.1:0/SiteB/")) as b:
            _without_room(b)
            host, port = b.addresses[0]
            async with Gateway(_sender(make_settings, tmp_path, f"http://{host}:{port}/SiteB/", send_concurrency=32,
                                       retry_delays=(0.05,), retries=1)) as a:
                await a.send_to_sites(["SiteB"], b"first")
                await _until(lambda: b.store.counts()["queue"] == 1, 10, "the first message")
                await _learned_batches(a)  # B's 200 is read after B's commit: wait for A to have read it
                await a.send_many([(["SiteB"], b"m%d" % i) for i in range(n)])
                await _until(lambda: a.store.counts()["outgoing"] == 0, 60, "A's outgoing queue to drain")
                assert b.store.counts()["queue"] == n + 1
                d = a.forwarder._dests["SiteB"]
                assert b.states[0].requests_by_status[503] > 0
                assert d.window.shrinks > 0 and d.held_back > 0
                # with retries=1, counting those 503s as attempts would have failed messages for good
                assert a.forwarder.retried == 0 and a.store.counts()["outgoing_errors"] == 0
                stored = [core.decode_envelope(framed) for _, framed in b.store.read_queue(0, n + 1)]
                assert all("NServiceBus.Retries" not in headers for _id, headers, *_ in stored)
                assert f'gwcore_outgoing_site_held_back_total{{site="{d.site.key}"}} {float(d.held_back)}' \
                    in a.render_metrics()

    run(main())


class _BusyReceiver(_PlainReceiver):
    """Advertises batches on its first answer, then refuses everything 503 (a gwcore receiver
    whose ingest queue never drains)."""

    def answer(self, n: int) -> bytes:
        if n == 1:
            return b"HTTP/1.1 200 OK\r\ngwcore-Batch: 1; messages=100; bytes=65536\r\nContent-Length: 2\r\n\r\nOK"
        reason = b"Service Unavailable: ingest queue full, retry later"
        return b"HTTP/1.1 503 %s\r\nContent-Length: %d\r\n\r\n%s" % (reason, len(reason), reason)


def test_a_receiver_that_only_refuses_503_counts_as_failing_after_the_hold_back_limit(
        run, make_settings, tmp_path, monkeypatch):
    """Back-pressure has an end: a destination that answers everything 503 for longer than the
    hold-back limit gets its 503s counted as failed attempts, so messages do not wait forever."""
    from gwcore import egress
    monkeypatch.setattr(egress, "_HOLD_BACK_LIMIT", 0.3)

    async def main():
        receiver = _BusyReceiver()
        port = await receiver.start()
        try:
            async with Gateway(_sender(make_settings, tmp_path, f"http://127.0.0.1:{port}/SiteB/",
                                       retry_delays=(0.05,), retries=2)) as a:
                await a.send_to_sites(["SiteB"], b"first")
                await _until(lambda: a.store.counts()["outgoing"] == 0, 10, "the first message")
                await a.send_many([(["SiteB"], b"m%d" % i) for i in range(20)])
                await _until(lambda: a.store.counts()["outgoing_errors"] == 20, 30,
                             "the messages to fail after the hold-back limit")
                d = a.forwarder._dests["SiteB"]
                assert d.held_back > 0 and a.forwarder.retried > 0 and a.store.counts()["outgoing"] == 0
                assert any(b"gwcore-Batch: 1" in head for head in receiver.heads[1:])
        finally:
            receiver.server.close()

    run(main())


def test_linger_gathers_trickling_messages_into_fewer_batches(run, make_settings, tmp_path):
    async def trickle(linger: float) -> int:
        async with Gateway(make_settings(data_dir=str(tmp_path / f"b{linger:g}"), endpoint="SiteB",
                                         receive_channels="http://127.0.0.1:0/SiteB/")) as b:
            host, port = b.addresses[0]
            async with Gateway(_sender(make_settings, tmp_path / f"{linger:g}", f"http://{host}:{port}/SiteB/",
                                       send_linger=linger)) as a:
                await a.send_to_sites(["SiteB"], b"first")
                await _until(lambda: b.store.counts()["queue"] == 1, 10, "the first message")
                await _learned_batches(a)  # B's 200 is read after B's commit: wait for A to have read it
                for i in range(40):
                    await a.send_to_sites(["SiteB"], b"t%d" % i)
                    await asyncio.sleep(0.005)
                await _until(lambda: b.store.counts()["queue"] == 41, 20, "every message at B")
                state = b.states[0]
                return state.batches + (41 - state.batch_messages)     # requests: batches and singles

    async def main():
        return await trickle(0.0), await trickle(0.2)

    quick, lingered = run(main())
    # one worker lingers at a time and its batch takes what arrived meanwhile: 3 requests on a
    # quiet machine (17 when each of the 8 workers lingered with a message of its own)
    assert lingered <= 10 and lingered < quick / 4, (quick, lingered)


# -- the answer (core.BatchAnswer) -------------------------------------------------------------

_OUTCOME = st.one_of(
    st.just(("new",)), st.just(("duplicate",)), st.just(("error",)),
    st.tuples(st.just("refused"), st.integers(400, 599), st.text(max_size=40)),
    st.tuples(st.just("rejected"), st.integers(400, 599), st.text(max_size=40)),
)


def _on_error(exc: BaseException) -> tuple[int, str]:
    return 503, f"Service Unavailable: {exc}"


@settings(max_examples=200, deadline=None)
@given(st.lists(_OUTCOME, max_size=30), st.randoms(use_true_random=False))
def test_batch_answer_is_what_orjson_writes_for_the_outcomes(outcomes, rnd):
    """Whatever the outcomes and the order the writer decides them in, the answer comes once,
    after arm() and the last decision, byte for byte orjson's JSON of the documented dicts."""
    answers: list[bytes] = []
    answer = core.BatchAnswer(len(outcomes), answers.append, _on_error)
    expected, slots = [], []
    for i, outcome in enumerate(outcomes):
        kind = outcome[0]
        if kind == "refused":
            answer.refuse(i, outcome[1], outcome[2])
            expected.append({"status": outcome[1], "reason": outcome[2]})
            continue
        slots.append((answer.slot(i), outcome))
        if kind in ("new", "duplicate"):
            expected.append({"status": 200, "reason": "OK", "duplicate": kind == "duplicate"})
        elif kind == "error":
            expected.append({"status": 503, "reason": "Service Unavailable: disk full"})
        else:  # a Rejection makes its reason safe for a status line itself
            outcome = (kind, core.Rejection(outcome[1], outcome[2], None))
            slots[-1] = (slots[-1][0], outcome)
            expected.append({"status": outcome[1].status, "reason": outcome[1].reason})
    rnd.shuffle(slots)
    early = rnd.randrange(len(slots) + 1)  # some decided before arm(), as a closed writer does
    for n, (done, outcome) in enumerate(slots):
        if n == early:
            answer.arm()
        assert answers == []
        kind = outcome[0]
        if kind == "new":
            done(True, True)
        elif kind == "duplicate":
            done(True, False)
        elif kind == "error":
            done(False, OSError("disk full"))
        else:
            done(True, outcome[1])
    if early == len(slots):
        assert answers == []
        answer.arm()
    assert answers == [orjson.dumps({"results": expected})]
    assert answer.results() == expected and answer.waiting == 0
    for done, _ in slots:  # a second answer for a message changes nothing
        done(True, False)
    assert len(answers) == 1


def test_batch_answer_refuses_what_is_not_a_message_of_its_batch():
    answer = core.BatchAnswer(2, lambda body: None, _on_error)
    answer.slot(0)
    with pytest.raises(ValueError):
        answer.slot(2)
    with pytest.raises(ValueError):
        answer.refuse(-1, 400, "x")
    with pytest.raises(ValueError):
        answer.body()  # message 0 still waiting
    assert answer.waiting == 1
