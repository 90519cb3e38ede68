"""Fuzz target: ``RequestParser.feed`` (gwcore/_parts/http.pyx, and the framer behind it).

Input layout (tests/fuzz_corpus/request_parser/ holds real requests in it; fuzz/seeds.py writes them):

* byte 0, options: bit 0 ``allow_get`` (and the framer's ``parse_query``), bit 1 the framer's
  ``signatures``, bits 2-3 the limits (``LIMITS``), bits 4-5 what the pieces are fed as (bytes,
  bytearray, memoryview, or each in turn), bit 6 a streamed part's body is taken by the caller
  (``streamed_body_left``/``body_taken``) instead of fed, bit 7 the pieces are fed a byte at a time
  as well (streams up to ``BYTEWISE_MAX`` bytes)
* byte 1: the number of cut points (low 3 bits), then one big-endian u16 per cut
* the rest: the bytes received on one connection

The stream is fed whole and in the pieces the cuts make. Each run must be well-formed on its own
(event shapes, a part's events in order, an error last and nothing parsed after it or after a
request without keep-alive, an accepted submit's ``framed`` decoding to its fields), and the runs
must agree: the same events in the same order (``EV_CONTINUE`` aside, which depends on where the
body starts; a part's data joined), the same envelopes and rejections, the same error statuses.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import add_paths, fuzz, wrap  # noqa: E402

add_paths()

from gwcore import _dedup  # noqa: E402

NOW = 1_787_000_000_000
SCOPE = "RemoteSite"
CHANNELS = [b"/remotesite/", b"/other/site/"]
BYTEWISE_MAX = 2048
# bits 2-3 of the options byte: (max_headers, max_header_bytes, max_body, max_blob)
LIMITS = [
    (100, 16384, 1 << 20, -1),      # the defaults' shape
    (100, 16384, 64, 128),          # small bodies: 413s, a blob limit above the body limit
    (6, 200, 1 << 20, 16),          # small heads: 431s, a blob limit below the body limit
    (3, 64, 16, 0),                 # everything small
]
EV_SUBMIT, EV_OTHER, EV_CONTINUE, EV_ERROR = _dedup.EV_SUBMIT, _dedup.EV_OTHER, _dedup.EV_CONTINUE, _dedup.EV_ERROR
EV_PART_BEGIN, EV_PART_DATA, EV_PART_END = _dedup.EV_PART_BEGIN, _dedup.EV_PART_DATA, _dedup.EV_PART_END
ERROR_STATUSES = {400, 413, 431}
REJECTION_STATUSES = {400, 412, 501, 502}
TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


class Finding(AssertionError):
    """An invariant does not hold (atheris reports it like a crash and keeps the input)."""


def expect(condition: object, what: str, *details: object) -> None:
    if not condition:
        raise Finding(what + "".join(f"\n  {d!r}" for d in details))


def decode(data: bytes) -> tuple[int, list[int], bytes]:
    """(options, cut points, stream) of a fuzz input."""
    if len(data) < 2:
        return 0, [], data
    options, count = data[0], data[1] & 7
    head = 2 + 2 * count
    stream = data[head:]
    raw = data[2:head]
    cuts = sorted({int.from_bytes(raw[i:i + 2], "big") % (len(stream) + 1) for i in range(0, len(raw) - 1, 2)})
    return options, cuts, stream


def pieces_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:])]


def make(options: int) -> _dedup.RequestParser:
    allow_get = bool(options & 1)
    framer = _dedup.Framer(SCOPE, parse_query=allow_get, signatures=bool(options & 2))
    max_headers, max_header_bytes, max_body, max_blob = LIMITS[(options >> 2) & 3]
    return _dedup.RequestParser(framer, list(CHANNELS), max_headers=max_headers,
                                max_header_bytes=max_header_bytes, max_body=max_body,
                                allow_get=allow_get, max_blob=max_blob)


def run(pieces: list[bytes], options: int) -> list[tuple]:
    """Every event of the pieces fed in order, checked as they come."""
    parser = make(options)
    take = bool(options & 64)
    events: list[tuple] = []
    checker = Checker(options)
    for index, piece in enumerate(pieces):
        if take and not checker.done:
            left = parser.streamed_body_left()
            expect(left >= 0, "streamed_body_left < 0", left)
            if left and piece:
                # the caller receives this much of the part's body itself (gwcore/databus/intake.py)
                n = min(left, len(piece))
                parser.body_taken(n)
                checker.taken(piece[:n])
                events.append((EV_PART_DATA, piece[:n]))
                piece = piece[n:]
        got = parser.feed(wrap(piece, (options >> 4) & 3, index), NOW)
        checker.feed(got, parser)
        events += got
    # every feed parsed all it could: one more with nothing new reports nothing
    expect(parser.feed(b"", NOW) == [], "feed(b'') after the input reported events")
    return events


class Checker:
    """The events of one run are well-formed, feed by feed."""

    def __init__(self, options: int) -> None:
        self.allow_get = bool(options & 1)
        self.signatures = bool(options & 2)
        self.max_body = LIMITS[(options >> 2) & 3][2]
        blob = LIMITS[(options >> 2) & 3][3]
        self.max_blob = self.max_body if blob < 0 else blob
        self.done = False
        self.in_part = False
        self.part_keep_alive = True
        self.part_bytes = 0
        self.continued = 0

    def taken(self, data: bytes) -> None:
        expect(self.in_part and not self.done, "body_taken accepted outside a part")
        self.part_bytes += len(data)

    def feed(self, events: list, parser: _dedup.RequestParser) -> None:
        expect(type(events) is list, "feed did not return a list", events)
        if self.done:
            expect(events == [], "events after the parser finished", events)
        for i, ev in enumerate(events):
            expect(type(ev) is tuple and ev, "an event is not a non-empty tuple", ev)
            expect(not self.done, "an event after an error or a request without keep-alive", events)
            kind = ev[0]
            if kind == EV_ERROR:
                expect(len(ev) == 3 and ev[1] in ERROR_STATUSES and type(ev[2]) is str and ev[2],
                       "a malformed EV_ERROR", ev)
                expect(i == len(events) - 1, "EV_ERROR is not the last event of its feed", events)
                self.done = True
            elif kind == EV_CONTINUE:
                expect(ev == (EV_CONTINUE,), "a malformed EV_CONTINUE", ev)
                self.continued += 1
                expect(self.continued == 1, "two EV_CONTINUE for one request", events)
            elif kind == EV_PART_DATA:
                expect(self.in_part, "EV_PART_DATA outside a part", events)
                expect(len(ev) == 2 and type(ev[1]) is bytes and ev[1], "a malformed EV_PART_DATA", ev)
                self.part_bytes += len(ev[1])
                expect(self.part_bytes <= self.max_blob, "a part's body past max_blob", self.part_bytes)
            elif kind == EV_PART_END:
                expect(ev == (EV_PART_END,) and self.in_part, "EV_PART_END outside a part", events)
                self.in_part = False
                self.continued = 0
                self.done = not self.part_keep_alive
            elif kind == EV_PART_BEGIN:
                expect(not self.in_part, "EV_PART_BEGIN inside a part", events)
                expect(len(ev) == 3 and type(ev[1]) is bool, "a malformed EV_PART_BEGIN", ev)
                env = ev[2]
                expect(type(env) is _dedup.Envelope and env.call_type == _dedup.CALL_DATABUS,
                       "EV_PART_BEGIN without a databus envelope", ev)
                expect(env.databus_key, "a part without its key", env.databus_key)
                self.envelope(env)
                self.in_part = True
                self.part_keep_alive = ev[1]
                self.part_bytes = 0
            elif kind == EV_SUBMIT:
                expect(not self.in_part, "EV_SUBMIT inside a part", events)
                expect(len(ev) == 3 and type(ev[1]) is bool, "a malformed EV_SUBMIT", ev)
                result = ev[2]
                if type(result) is _dedup.Rejection:
                    self.rejection(result)
                else:
                    expect(type(result) is _dedup.Envelope, "EV_SUBMIT without an envelope or rejection", ev)
                    self.envelope(result)
                self.continued = 0
                self.done = not ev[1]
            elif kind == EV_OTHER:
                expect(not self.in_part, "EV_OTHER inside a part", events)
                expect(len(ev) == 5 and type(ev[1]) is bool, "a malformed EV_OTHER", ev)
                _, _, method, path, extra = ev
                expect(type(method) is bytes and method and set(method) <= TOKEN, "EV_OTHER's method", ev)
                expect(type(path) is bytes and path and b"?" not in path
                       and all(0x20 < c < 0x7F for c in path), "EV_OTHER's path", ev)
                if path.startswith(b"/.gwcore/"):
                    expect(type(extra) is dict and all(
                        type(k) is bytes and k.startswith(b"gwcore-") and k == k.lower() and type(v) is bytes
                        for k, v in extra.items()), "EV_OTHER's gwcore headers", ev)
                else:
                    expect(extra is None, "gwcore headers outside /.gwcore/", ev)
                self.continued = 0
                self.done = not ev[1]
            else:
                raise Finding(f"an unknown event kind: {ev!r}")
        if self.done:
            expect(not parser.in_request, "in_request after the parser finished")
            expect(parser.streamed_body_left() == 0, "streamed_body_left after the parser finished")

    def rejection(self, r: _dedup.Rejection) -> None:
        expect(r.status in REJECTION_STATUSES, "a rejection's status", r.status, r.reason)
        expect(type(r.reason) is str and 0 < len(r.reason) <= 512 and all(" " <= c <= "~" for c in r.reason),
               "a rejection's reason is not a short ASCII phrase", r.reason)
        if not self.signatures:
            expect(r.id is None and r.body is None and r.auth_signature is None, "signed fields without signatures")
        if r.auth_signature is None:
            expect(r.method is None and r.target is None, "method/target on an unsigned rejection")

    def envelope(self, env: _dedup.Envelope) -> None:
        expect(type(env.id) is str and env.id, "an envelope without an id", env.id)
        expect(len(env.id.encode()) <= 400, "an id past max_id_bytes", env.id)
        expect(env.key == SCOPE.encode() + b"\x00" + env.id.encode(), "an envelope's key", env.key, env.id)
        expect(env.accepted_ms == NOW and type(env.expiry_ms) is int and env.expiry_ms >= 0, "an envelope's times",
               env.accepted_ms, env.expiry_ms)
        expect(type(env.body) is bytes, "an envelope's body")
        if not self.allow_get:
            # with a query a "Message" parameter replaces the body (it is bounded by the head)
            expect(len(env.body) <= self.max_body, "a body past max_body", len(env.body))
        if not self.signatures:
            expect(env.auth_date is None and env.auth_signature is None, "auth fields without signatures")
        if env.auth_signature is None:
            expect(env.method is None and env.target is None, "method/target on an unsigned envelope")
        else:
            expect(type(env.method) is str and type(env.target) is str, "a signed envelope's method/target")
        if env.call_type == _dedup.CALL_SUBMIT:
            decoded = _dedup.decode_envelope(env.framed)
            expect(decoded == (env.id, env.headers, env.body, env.expiry_ms, env.accepted_ms),
                   "an envelope's framed bytes do not decode to its fields", decoded)
            expect(type(env.databus) is tuple, "a submit's databus names", env.databus)
        else:
            expect(env.call_type == _dedup.CALL_DATABUS and env.framed == b"" and env.databus == (),
                   "a part envelope's fields", env.call_type, env.framed, env.databus)


def outcome(result: object) -> tuple:
    if type(result) is _dedup.Rejection:
        return ("rejected", result.status, result.reason, result.callback, result.id, result.body,
                result.auth_date, result.auth_signature, result.method, result.target)
    return ("accepted", result.id, result.key, result.call_type, result.expiry_ms, result.accepted_ms,
            list(result.headers.items()), result.body, result.framed, result.callback, result.auth_date,
            result.auth_signature, result.method, result.target, result.databus_key, result.content_md5,
            result.content_digest, result.databus)


def norm(events: list[tuple]) -> list[tuple]:
    """Events as they must agree between runs: no EV_CONTINUE, a part's data joined, an error by
    its status (the reason names the first thing found wrong, which a cut may change)."""
    out: list[tuple] = []
    for ev in events:
        kind = ev[0]
        if kind == EV_CONTINUE:
            continue
        if kind == EV_PART_DATA:
            if out and out[-1][0] == EV_PART_DATA:
                out[-1] = (EV_PART_DATA, out[-1][1] + ev[1])
            else:
                out.append(ev)
        elif kind in (EV_SUBMIT, EV_PART_BEGIN):
            out.append((kind, ev[1], outcome(ev[2])))
        elif kind == EV_ERROR:
            out.append((kind, ev[1]))
        else:
            out.append(ev)
    return out


def check(data: bytes) -> None:
    options, cuts, stream = decode(data)
    whole = norm(run([stream], options))
    split = norm(run(pieces_at(stream, cuts), options))
    expect(split == whole, "fed in pieces, the events differ from those of one feed",
           f"cuts {cuts}", whole, split)
    if options & 128 and len(stream) <= BYTEWISE_MAX:
        bytewise = norm(run([stream[i:i + 1] for i in range(len(stream))], options))
        expect(bytewise == whole, "fed a byte at a time, the events differ from those of one feed",
               whole, bytewise)


if __name__ == "__main__":
    fuzz(check)
