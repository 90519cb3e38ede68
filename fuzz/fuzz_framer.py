"""Fuzz target: ``Framer.frame`` (gwcore/_parts/framing.pyx), against the pure-Python oracle
tests/reference_impl.py as tests/test_differential.py compares them, and against the same request
framed by ``RequestParser`` from the wire.

Input layout (tests/fuzz_corpus/framer/; fuzz/seeds.py writes the seeds):

* byte 0, options: bit 0 ``parse_query``, bit 1 ``signatures``, bits 2-3 ``max_id_bytes``
  (``MAX_ID_BYTES``), bits 4-5 the scope (``SCOPES``), bits 6-7 what the header buffers are
  (bytes, bytearray, memoryview, or each in turn)
* bytes 1-8: ``now_ms``, big-endian
* the rest: header lines ``name:value`` (one space after the colon is dropped; a line without a
  colon is a name with an empty value) separated by LF; a line starting with ``?`` is the query
  (the first one); an empty line, then the body

Both framers must give the same envelope (every field, the framed bytes included) or the same
rejection, or raise the same exception type, and count alike; an accepted submit's ``framed``
must decode to its fields. When the headers could have come off the wire (token names, values
without control characters or surrounding blanks, none of the headers that shape the message),
``RequestParser`` must frame the request it reads (they and its ``Content-Length``) to the result
``Framer.frame`` gives for them.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import add_paths, fuzz, wrap  # noqa: E402

add_paths()

import reference_impl as ref  # noqa: E402

from gwcore import _dedup  # noqa: E402

MAX_ID_BYTES = [400, 36, 13, 1]
SCOPES = ["RemoteSite", "Zürich", "", "site with spaces"]
TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# headers RequestParser acts on itself (framing, connection, upgrade, 100-continue)
SHAPING = {b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect"}


class Finding(AssertionError):
    """An invariant does not hold (atheris reports it like a crash and keeps the input)."""


def expect(condition: object, what: str, *details: object) -> None:
    if not condition:
        raise Finding(what + "".join(f"\n  {d!r}" for d in details))


def decode(data: bytes) -> tuple[int, int, list[tuple[bytes, bytes]], bytes | None, bytes]:
    """(options, now_ms, header pairs, query, body) of a fuzz input."""
    options = data[0] if data else 0
    now_ms = int.from_bytes(data[1:9], "big")
    head, _, body = data[9:].partition(b"\n\n")
    pairs: list[tuple[bytes, bytes]] = []
    query = None
    for line in head.split(b"\n") if head else []:
        if line.startswith(b"?") and query is None:
            query = line[1:]
            continue
        name, _, value = line.partition(b":")
        pairs.append((name, value[1:] if value.startswith(b" ") else value))
    return options, now_ms, pairs, query, body


def outcome(result: object) -> tuple:
    if type(result).__name__ == "Rejection":
        return ("rejected", result.status, result.reason, result.callback, result.id, result.body,
                result.auth_date, result.auth_signature)
    return ("accepted", result.id, result.key, result.call_type, result.expiry_ms, result.accepted_ms,
            list(result.headers.items()), result.body, result.framed, result.callback, result.auth_date,
            result.auth_signature, result.databus_key, result.content_md5, result.databus)


def attempt(framer: object, flat: list, body: bytes, query: bytes | None, now_ms: int) -> tuple:
    try:
        return outcome(framer.frame(flat, body, query, now_ms))
    except Exception as exc:  # the same exception type from both: a difference otherwise
        return ("raised", type(exc).__name__)


def on_the_wire(pairs: list[tuple[bytes, bytes]], query: bytes | None) -> bool:
    """Could RequestParser have read these headers as they are?"""
    for name, value in pairs:
        if not name or not set(name) <= TOKEN or name.lower() in SHAPING:
            return False
        if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value) or value[:1] in (b" ", b"\t") \
                or value[-1:] in (b" ", b"\t"):
            return False
    return query is None or all(0x20 < c < 0x7F for c in query)


def parsed(pairs: list[tuple[bytes, bytes]], query: bytes | None, body: bytes, options: int,
           now_ms: int) -> tuple | None:
    """The request framed by RequestParser from its bytes; None when it streams it as a part."""
    parse_query = bool(options & 1)
    framer = _dedup.Framer(SCOPES[(options >> 4) & 3], max_id_bytes=MAX_ID_BYTES[(options >> 2) & 3],
                           parse_query=parse_query, signatures=bool(options & 2))
    parser = _dedup.RequestParser(framer, [b"/remotesite/"], max_headers=len(pairs) + 2,
                                  max_header_bytes=1 << 20, max_body=len(body), allow_get=parse_query)
    target = b"/RemoteSite/" + (b"?" + query if query is not None else b"")
    head = b"POST " + target + b" HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in pairs)
    events = parser.feed(head + b"Content-Length: %d\r\n\r\n" % len(body) + body, now_ms)
    if events and events[0][0] == _dedup.EV_PART_BEGIN:
        return None
    expect(len(events) == 1 and events[0][0] == _dedup.EV_SUBMIT, "RequestParser did not frame the request", events)
    return outcome(events[0][2])


def check(data: bytes) -> None:
    options, now_ms, pairs, query, body = decode(data)
    now_ms &= (1 << 64) - 1
    args = {"max_id_bytes": MAX_ID_BYTES[(options >> 2) & 3], "parse_query": bool(options & 1),
            "signatures": bool(options & 2)}
    scope = SCOPES[(options >> 4) & 3]
    ext, oracle = _dedup.Framer(scope, **args), ref.Framer(scope, **args)
    flat = []
    for i, (name, value) in enumerate(pairs):
        flat += [wrap(name, (options >> 6) & 3, 2 * i), wrap(value, (options >> 6) & 3, 2 * i + 1)]
    got = attempt(ext, flat, body, query, now_ms)
    want = attempt(oracle, [bytes(x) for x in flat], body, query, now_ms)
    expect(got == want, "the framer and tests/reference_impl.py disagree", want, got)
    expect((ext.framed_total, ext.rejected_total) == (oracle.framed_total, oracle.rejected_total),
           "the framer's counters", (ext.framed_total, ext.rejected_total))
    if got[0] == "accepted" and got[3] == _dedup.CALL_SUBMIT:
        id, key, _, expiry_ms, accepted_ms, headers, body_out, framed = got[1:9]
        expect(_dedup.decode_envelope(framed) == (id, dict(headers), body_out, expiry_ms, accepted_ms),
               "an envelope's framed bytes do not decode to its fields")
    if got[0] != "raised" and on_the_wire(pairs, query):
        # the request on the wire has one more header, its Content-Length
        length = [b"Content-Length", b"%d" % len(body)]
        framer = _dedup.Framer(scope, **args)
        alone = outcome(framer.frame([bytes(x) for x in flat] + length, body, query, now_ms))
        wire = parsed(pairs, query, body, options, now_ms)
        expect(wire is None or wire == alone, "RequestParser frames the request differently", alone, wire)


if __name__ == "__main__":
    fuzz(check)
