"""Writes the seed corpus, tests/fuzz_corpus/<target>/, in each target's input layout.

    python fuzz/seeds.py          # (re)writes every seed file; other files there are left alone

The seeds are real requests (NServiceBus submits as protocol.md §8.1 and §8.3 show them, databus
parts, chunked bodies, pipelines, Expect, JSONP, signed requests, worker calls) and the malformed
shapes tests/test_request_parser.py refuses, so the fuzzer starts from the paths that matter.
What the fuzzer adds to a corpus stays in build/fuzz/corpus/ (fuzz/run); a file in
tests/fuzz_crashes/ is a regression case (docs/development.md, "Fuzzing").
"""

from __future__ import annotations

import base64
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import ROOT, add_paths  # noqa: E402

add_paths()

from httpclient import nsb_request  # noqa: E402

from gwcore import _dedup  # noqa: E402

MSG_ID = "0b1f6f0e-5d8a-4f43-b1d5-b3a400c1d2e3"
KEY_WIRE = "9999-12-31_23%2F7d0d3c1e-2f4a-4b7e-9a51-0c8d2f6e4b11"
BLOB = b'"AAECAw=="'


def md5_wire(body: bytes) -> str:
    return _dedup.url_encode(base64.b64encode(hashlib.md5(body).digest()).decode())


def part(body: bytes = BLOB, *, extra: list[tuple[str, str]] | None = None, **kw: object) -> bytes:
    """A SingleCallDatabusProperty request (protocol.md §8.3, request 1)."""
    headers = [(f"NServiceBus.Header.NServiceBus.DataBus.{KEY_WIRE}", KEY_WIRE),
               ("NServiceBus.Gateway.DataBusKey", f"NServiceBus.Header.NServiceBus.DataBus.{KEY_WIRE}")]
    return nsb_request(MSG_ID, body, call_type="SingleCallDatabusProperty", md5=md5_wire(body),
                       extra=headers + (extra or []), **kw)  # type: ignore[arg-type]


def chunked(request: bytes, sizes: list[int], *, ext: bytes = b"", trailer: bytes = b"") -> bytes:
    head, _, body = request.partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"content-length:")]
    out = b"\r\n".join(lines + [b"Transfer-Encoding: chunked"]) + b"\r\n\r\n"
    for size in sizes:
        out += b"%x" % size + ext + b"\r\n" + body[:size] + b"\r\n"
        body = body[size:]
    if body:
        out += b"%x\r\n" % len(body) + body + b"\r\n"
    return out + b"0\r\n" + trailer + b"\r\n"


def parser_input(stream: bytes, options: int = 0, cuts: tuple[int, ...] = ()) -> bytes:
    """fuzz_request_parser's layout: options, the cut count, u16 cuts, the stream."""
    return bytes([options, len(cuts)]) + b"".join(c.to_bytes(2, "big") for c in cuts) + stream


def framer_input(pairs: list[tuple[str, str]], body: bytes = b"", *, query: str | None = None, options: int = 0,
                 now_ms: int = 1_787_000_000_000) -> bytes:
    """fuzz_framer's layout: options, now_ms, name:value lines, an empty line, the body."""
    lines = ([b"?" + query.encode()] if query is not None else []) + [f"{n}: {v}".encode() for n, v in pairs]
    return bytes([options]) + now_ms.to_bytes(8, "big") + b"\n".join(lines) + b"\n\n" + body


def built_input(id: str, headers: list[tuple[str, str]], body: bytes, expiry_ms: int, accepted_ms: int,
                options: int = 1) -> bytes:
    """fuzz_envelope's built layout."""
    texts = [id.encode()] + [t.encode() for pair in headers for t in pair]
    return (bytes([options | 1]) + expiry_ms.to_bytes(8, "big") + accepted_ms.to_bytes(8, "big")
            + bytes([len(body)]) + body + b"\x00".join(texts))


SUBMIT = nsb_request(MSG_ID)
SIGNED = nsb_request(MSG_ID, extra=[("gwcore-Date", "20261126T171029Z"),
                                    ("gwcore-Signature", "v1.hq." + "A" * 43)])
GET_ALLOWED, SIGNATURES, SMALL_BODIES, SMALL_HEADS, ALL_SMALL = 1, 2, 4, 8, 12
BYTEARRAY, MEMORYVIEW, MIXED, TAKE_PARTS, BYTEWISE = 16, 32, 48, 64, 128

PARSER = {
    "nsb-submit": parser_input(SUBMIT),
    "nsb-submit-cut": parser_input(SUBMIT, MIXED, (1, 30, len(SUBMIT) - 17, len(SUBMIT) - 1)),
    "nsb-submit-close": parser_input(nsb_request(MSG_ID, close=True) + SUBMIT),
    "nsb-submit-bad-md5": parser_input(nsb_request(MSG_ID, md5="AAAAAAAAAAAAAAAAAAAAAA%3D%3D")),
    "nsb-submit-no-id": parser_input(nsb_request("", correlation=False)),
    "nsb-submit-ttbr": parser_input(nsb_request(MSG_ID, extra=[("NServiceBus.TimeToBeReceived", "00%3A00%3A30")])),
    "nsb-submit-signed": parser_input(SIGNED, SIGNATURES, (100,)),
    "nsb-submit-signed-bytewise": parser_input(nsb_request("x", body=b"", extra=[("gwcore-Signature", "v1.x.y")]),
                                               SIGNATURES | BYTEWISE),
    "pipeline": parser_input(b"".join(nsb_request(f"id-{i}", body=b"%d" % i) for i in range(3))
                             + b"GET /healthz HTTP/1.1\r\n\r\n", MEMORYVIEW, (200, 700)),
    "pipeline-empty-lines": parser_input(b"\r\n\r\nGET /a HTTP/1.1\r\n\r\n\r\nGET /b HTTP/1.0\r\n\r\nGET /c HTTP/1.1\r\n\r\n"),
    "chunked-submit": parser_input(chunked(SUBMIT, [3, 10], ext=b';a=b;c="d e"', trailer=b"X-Trailer: 1\r\nY: \r\n"),
                                   BYTEARRAY, (40, 1000)),
    "chunked-submit-bytewise": parser_input(chunked(nsb_request("c", body=b"hello world"), [1, 4]), BYTEWISE),
    "databus-part": parser_input(part()),
    "databus-part-then-submit": parser_input(part() + SUBMIT, TAKE_PARTS, (len(part()) - 5,)),
    "databus-part-chunked": parser_input(chunked(part(b"0123456789abcdef"), [5, 5]), TAKE_PARTS | BYTEARRAY, (900,)),
    "databus-part-expect": parser_input(part(b"x" * 40, extra=[("Expect", "100-continue")]), TAKE_PARTS,
                                        (len(part(b"x" * 40, extra=[("Expect", "100-continue")])) - 40,)),
    "databus-part-too-large": parser_input(part(b"y" * 30), SMALL_HEADS),
    "databus-part-http10": parser_input(part(b"z" * 12).replace(b"HTTP/1.1", b"HTTP/1.0")),
    "expect-100-continue": parser_input(nsb_request(MSG_ID, extra=[("Expect", "100-Continue")]), 0,
                                        (len(SUBMIT) + 22 - 17,)),
    "jsonp-get": parser_input(b"GET /RemoteSite/?callback=cb&NServiceBus.Id=q1&NServiceBus.CallType=SingleCallSubmit"
                              b"&Message=%257B%2522a%2522%257D HTTP/1.1\r\nHost: x\r\n\r\n", GET_ALLOWED),
    "worker-call": parser_input(b"POST /.gwcore/worker/take HTTP/1.1\r\ngwcore-Date: 20261126T171029Z\r\n"
                                b"GWCORE-Signature: v1.w.abc\r\nContent-Length: 2\r\n\r\n{}"),
    "other-paths": parser_input(b"POST http://h:1/RemoteSite/ HTTP/1.1\r\n\r\nOPTIONS * HTTP/1.1\r\n\r\n"
                                b"PUT /other/site/x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
                                b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n"),
    "413-content-length": parser_input(nsb_request(MSG_ID, body=b"x" * 100), SMALL_BODIES),
    "413-chunked": parser_input(b"POST /RemoteSite/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"32\r\n" + b"x" * 50 + b"\r\n33\r\n", SMALL_BODIES),
    "431-headers": parser_input(SUBMIT, SMALL_HEADS, (150,)),
    "431-trailer": parser_input(b"POST /RemoteSite/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: "
                                + b"a" * 200, SMALL_HEADS),
    "upgrade": parser_input(b"GET /RemoteSite/ HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
    "connect": parser_input(b"CONNECT example.org:443 HTTP/1.1\r\n\r\n"),
    "smuggling-cl-te": parser_input(b"POST /RemoteSite/ HTTP/1.1\r\nContent-Length: 5\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nhello"),
    "smuggling-two-cl": parser_input(b"POST /RemoteSite/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"),
    "smuggling-te-not-chunked": parser_input(b"POST /RemoteSite/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                                             b"Transfer-Encoding: gzip\r\n\r\n0\r\n\r\n"),
    "bad-content-length": parser_input(b"POST /x HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello"),
    "bare-lf": parser_input(b"POST /RemoteSite/ HTTP/1.1\nHost: x\r\n\r\n"),
    "obs-fold": parser_input(b"POST /RemoteSite/ HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 0, (30,)),
    "ctl-in-value": parser_input(b"POST /RemoteSite/ HTTP/1.1\r\nX-V: \xc3\xa9\tabcdefgh\x01ijk\r\n\r\n"),
    "cr-without-lf": parser_input(b"POST /RemoteSite/ HTTP/1.1\r\nHost: x\ry", 0, (35,)),
    "bad-version": parser_input(b"POST /RemoteSite/ HTTP/1.2\r\n\r\n"),
    "bad-target": parser_input(b"POST RemoteSite/ HTTP/1.1\r\n\r\n"),
    "chunk-syntax": parser_input(b"POST /RemoteSite/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b'5;a="b\r\nhello\r\n0\r\n\r\n'),
    "chunk-line-too-long": parser_input(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;" + b"a" * 300
                                        + b"\r\nhello\r\n0\r\n\r\n", SMALL_HEADS, (260,)),
    "long-malformed-head": parser_input(b"GET / HTTP/1.1\r\nX: a\rb" + b"c" * 60 + b"\r\n\r\n", ALL_SMALL, (20,)),
    "long-head-bare-lf": parser_input(b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 80 + b"\n\r\n", ALL_SMALL | BYTEWISE),
    "chunk-no-crlf": parser_input(b"POST /RemoteSite/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n"),
}

GATEWAY = [(n, v) for n, v in (line.split(": ", 1) for line in SUBMIT.partition(b"\r\n\r\n")[0].decode().split("\r\n")[1:])
           if n not in ("Content-Length",)]
FRAMER = {
    "nsb-submit": framer_input(GATEWAY, b'{"Hello":"World"}'),
    "nsb-submit-bytearray": framer_input(GATEWAY, b'{"Hello":"World"}', options=(1 << 6)),
    "custom-message": framer_input([("NServiceBus.Id", "abc"), ("NServiceBus.CallType", "0"), ("X-Custom", "a%20b+c"),
                                    ("NServiceBus.TimeToBeReceived", "1.02%3A03%3A04.5")], b"body", options=3 << 6),
    "repeated-header": framer_input([("NServiceBus.Id", "abc"), ("nservicebus.ID", "def")]),
    "bad-call-type": framer_input([("NServiceBus.Id", "abc"), ("NServiceBus.CallType", "%E3%80%80Submit")]),
    "id-too-long": framer_input([("NServiceBus.Id", "x" * 40), ("NServiceBus.CallType", "SingleCallSubmit")],
                                options=1 << 2),
    "gateway-no-correlation": framer_input([("NServiceBus.Id", "abc"), ("NServiceBus.CallType", "SingleCallSubmit"),
                                            ("NServiceBus.Gateway", "True")], options=SIGNATURES),
    "databus-claim": framer_input(GATEWAY + [(f"NServiceBus.Header.NServiceBus.DataBus.{KEY_WIRE}", KEY_WIRE)],
                                  b'{"Hello":"World"}', options=1 << 4),
    "databus-part": framer_input([("NServiceBus.Id", MSG_ID), ("NServiceBus.CallType", "SingleCallDatabusProperty"),
                                  ("NServiceBus.Gateway.DataBusKey", "k"), ("Content-MD5", md5_wire(BLOB)),
                                  ("Content-Digest", "sha-256%3D%3Aabc%3D%3A")], BLOB),
    "query": framer_input([("NServiceBus.CallType", "SingleCallSubmit")], b"ignored",
                          query="NServiceBus.Id=q%25201&callback=cb&Message=%257B%257D&x", options=1),
    "signed": framer_input([("NServiceBus.Id", "abc"), ("NServiceBus.CallType", "SingleCallSubmit"),
                            ("gwcore-Date", "20261126T171029Z"), ("gwcore-Signature", "v1.hq.AAAA")], b"b",
                           options=SIGNATURES | (2 << 4)),
    "url-noise": framer_input([("NServiceBus.Id", "%zz%4"), ("NServiceBus.CallType", "SingleCallSubmit"),
                               ("%4e%53ervice%42us.Header.%C3%BC", "%F0%9F%98%80%ff")], now_ms=2**64 - 1),
}

ENVELOPE_HEADERS = [("NServiceBus.MessageId", MSG_ID), ("NServiceBus.CorrelationId", MSG_ID),
                    ("NServiceBus.TimeToBeReceived", "00:10:00"), ("Zürich ~ x", "a+b/c=d")]
FRAMED = _dedup.encode_envelope(MSG_ID, ENVELOPE_HEADERS, b'{"Hello":"World"}', 1_787_000_600_000, 1_787_000_000_000)
ENVELOPE = {
    "raw-nsb": b"\x00" + FRAMED,
    "raw-empty": b"\x00" + _dedup.encode_envelope("", [], b"", 0, 0),
    "raw-repeated-header": b"\x00" + _dedup.encode_envelope("r", [("a", "1"), ("a", "2")], b"x", 5, 1),
    "raw-truncated": b"\x00" + FRAMED[:-3],
    "raw-trailing": b"\x00" + FRAMED + b"\x00",
    "raw-bad-utf8": b"\x00" + FRAMED.replace("Zürich".encode(), b"Z\xfcrich"),
    "raw-bad-version": b"\x00GW\x02" + FRAMED[3:],
    "built-nsb": built_input(MSG_ID, ENVELOPE_HEADERS, b'{"Hello":"World"}', 1_787_000_600_000, 1_787_000_000_000),
    "built-dict-surrogates": built_input("id", [("a", "1"), ("a", "2")], b"", 0, 2**64 - 1, options=8 | 2),
}


def batch_block(msg_id: str, body: bytes, extra: list[tuple[str, str]] | None = None, *,
                digest: bool = True) -> bytes:
    """A batch message's header block as a gwcore sender writes it (docs/protocol.md)."""
    lines = [("NServiceBus.Id", msg_id), ("NServiceBus.CallType", "SingleCallSubmit"),
             ("NServiceBus.Header.NServiceBus.EnclosedMessageTypes", "Shop.Order")] + (extra or [])
    if digest:
        sha = base64.b64encode(hashlib.sha256(body).digest()).decode()
        lines.append(("Content-Digest", _dedup.url_encode(f"sha-256=:{sha}:")))
    return b"".join(f"{n}: {v}\r\n".encode() for n, v in lines)


def built_batch(messages: list[tuple[bytes, bytes]], options: int = 0) -> bytes:
    """fuzz_batch's built layout: messages separated by \\xff\\xfe, block and body by \\xfd."""
    return bytes([options | 1]) + b"\xff\xfe".join(block + b"\xfd" + body for block, body in messages)


_BODY = b'{"Hello":"World"}'
_TWO = _dedup.encode_batch([(batch_block("b1", _BODY), _BODY), (batch_block("b2", b""), b"")])
# options: bits 1-2 max_headers, 3-4 max_header_bytes, 5-6 max_messages (fuzz/fuzz_batch.py)
_ROOMY = (3 << 1) | (3 << 3) | (3 << 5)
BATCH = {
    "raw-two": bytes([_ROOMY]) + _TWO,
    "raw-truncated": bytes([_ROOMY]) + _TWO[:-5],
    "raw-trailing": bytes([_ROOMY]) + _TWO + b"\x00",
    "raw-bad-magic": bytes([_ROOMY]) + b"GX" + _TWO[2:],
    "raw-huge-count": bytes([_ROOMY]) + _TWO[:4] + b"\xff\xff\xff\xff" + _TWO[8:],
    "raw-too-many": bytes([0]) + _TWO,
    "raw-tight-limits": bytes([(2 << 1) | (1 << 3) | (3 << 5)]) + _TWO,
    "built-mixed": built_batch([
        (batch_block("m1", _BODY), _BODY),
        (batch_block("m2", _BODY), b"another body"),                        # digest mismatch: 412
        (batch_block("m3", _BODY, digest=False) + b"Content-Digest: md5%3D%3Axx%3A\r\n", _BODY),  # 400
        (batch_block("m1", _BODY), _BODY),                                  # the same id again
        (batch_block("m4", b"", [("NServiceBus.TimeToBeReceived", "00:00:10"), ("Content-MD5", "x")]), b""),
        (b"NServiceBus.Id: p\r\nNServiceBus.CallType: SingleCallDatabusProperty\r\n", b"part"),
        (b"NServiceBus.Id: q\r\nNServiceBus.CallType: SingleCallSubmit\r\ngwcore-Batch: 1\r\n", b""),
        (b"  NServiceBus.Id :\t spaced \r\nNServiceBus.CallType: SingleCallSubmit\r\n", b""),
    ], _ROOMY),
    "built-malformed-line": built_batch([(batch_block("x", b"") + b"no colon\r\n", b"")], _ROOMY),
    "built-bare-lf": built_batch([(b"NServiceBus.Id: a\nNServiceBus.CallType: SingleCallSubmit\r\n", b"")], _ROOMY),
    "built-empty": bytes([_ROOMY | 1]),
}


def main() -> None:
    for target, seeds in (("request_parser", PARSER), ("framer", FRAMER), ("envelope", ENVELOPE),
                          ("batch", BATCH)):
        folder = ROOT / "tests" / "fuzz_corpus" / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)
        print(f"{folder.relative_to(ROOT)}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
