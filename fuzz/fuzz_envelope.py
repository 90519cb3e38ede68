"""Fuzz target: the stored envelope format (gwcore/_parts/codec.pyx ``decode_envelope`` and
``encode_envelope``, gwcore/_parts/egress.pyx ``encode_submit``, which reads the same format).

Input layout (tests/fuzz_corpus/envelope/; fuzz/seeds.py writes the seeds), by bit 0 of byte 0:

* 0, raw: the rest is a stored envelope, maybe damaged. ``decode_envelope`` must return
  ``(str, dict[str, str], bytes, int, int)`` or raise ``FramingError`` (never another error, never
  a read past the input) and agree with tests/reference_impl.py; ``encode_submit`` must raise
  ``FramingError`` where the format is broken; ``decode_take`` of the input, and of a one-record take
  answer holding it, must agree with ``decode_envelope`` (``check_take``) and otherwise give the id, body, expiry and header
  block ``gwcore.egress.wire_headers`` gives for it; what decodes re-encodes to a form that
  decodes the same (to the same bytes when no header name repeats).
* 1, built: bit 1 how bytes become text (invalid UTF-8 as U+FFFD, or as lone surrogates), bit 2
  the body as a memoryview instead of bytes, bit 3 the headers as a dict instead of a list, bytes 1-8 ``expiry_ms``, 9-16 ``accepted_ms``, byte 17 the
  body's length, then the body, then NUL-separated id, name, value, name, value...
  ``encode_envelope`` must give the bytes tests/reference_impl.py gives (or fail alike), and
  ``decode_envelope`` of them must give the fields back.
"""

from __future__ import annotations

import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import add_paths, fuzz  # noqa: E402

add_paths()

import reference_impl as ref  # noqa: E402

from gwcore import _dedup  # noqa: E402
from gwcore.egress import wire_headers  # noqa: E402
from gwcore.errors import FramingError  # noqa: E402



class Finding(AssertionError):
    """An invariant does not hold (atheris reports it like a crash and keeps the input)."""


def expect(condition: object, what: str, *details: object) -> None:
    if not condition:
        raise Finding(what + "".join(f"\n  {d!r}" for d in details))


def attempt(function: object, *args: object) -> tuple:
    try:
        return ("ok", function(*args))
    except Exception as exc:
        return ("raised", type(exc))


def header_count(framed: bytes) -> int:
    """The header count field of a well-formed envelope."""
    (id_n,) = struct.unpack_from(">I", framed, 19)
    return struct.unpack_from(">I", framed, 23 + id_n)[0]


def check_take(framed: bytes, decoded: tuple) -> None:
    """The take answer codec: the input itself as an answer is refused with FramingError or read;
    the input as the envelope of a one-record answer decodes as decode_envelope decodes it."""
    whole = attempt(_dedup.decode_take, framed)
    expect(whole[0] == "ok" or whole[1] is FramingError, "decode_take raised something else than FramingError", whole)
    inner = attempt(_dedup.decode_take, _dedup.encode_take([(7, 1, 2, framed, b"x")], True))
    if decoded[0] == "raised":
        expect(inner[0] == "raised" and inner[1] is FramingError, "a take answer held a broken envelope", inner)
    else:
        expect(inner == ("ok", (True, [(7, 1, 2) + decoded[1][:4] + (b"x",)])),
               "decode_take of one record and decode_envelope disagree", decoded, inner)


def check_raw(framed: bytes) -> None:
    got = attempt(_dedup.decode_envelope, framed)
    want = attempt(ref.decode_envelope, framed)
    if got[0] == "raised":
        expect(got[1] is FramingError, "decode_envelope raised something else than FramingError", got)
    else:
        id, headers, body, expiry_ms, accepted_ms = got[1]
        expect(type(id) is str and type(headers) is dict and type(body) is bytes and type(expiry_ms) is int
               and type(accepted_ms) is int and all(type(k) is str and type(v) is str for k, v in headers.items()),
               "decode_envelope's types", got)
    expect(got == want, "decode_envelope and tests/reference_impl.py disagree", want, got)
    check_take(framed, got)

    submit = attempt(_dedup.encode_submit, framed)
    if submit[0] == "raised":
        expect(submit[1] is FramingError, "encode_submit raised something else than FramingError", submit)
    if not layout_ok(framed):
        expect(got[0] == "raised" and submit[0] == "raised", "a broken layout was read", got, submit)
        return
    if got[0] == "raised":
        return      # invalid UTF-8: encode_submit copies text as bytes and may take it
    id, headers, body, expiry_ms, accepted_ms = got[1]
    expect(submit[0] == "ok", "encode_submit refused an envelope decode_envelope reads", submit)
    if header_count(framed) == len(headers):
        block = b"".join(n + b": " + v + b"\r\n" for n, v in wire_headers(id, headers, body))
        expect(submit[1] == (id, body, expiry_ms, block), "encode_submit disagrees with egress.wire_headers",
               submit[1], block)
    again = _dedup.encode_envelope(id, headers, body, expiry_ms, accepted_ms)
    expect(_dedup.decode_envelope(again) == got[1], "a decoded envelope re-encoded decodes differently")
    if header_count(framed) == len(headers):
        expect(again == framed, "a decoded envelope re-encodes to other bytes", again)


def layout_ok(framed: bytes) -> bool:
    """The envelope's layout holds (magic, version, every length, nothing after the body),
    whatever its text: what encode_submit, which copies the text as bytes, must check."""
    if len(framed) < 19 or framed[:3] != b"GW\x01":
        return False
    pos = 19

    def skip(size: int) -> int:
        nonlocal pos
        if pos + size > len(framed):
            raise IndexError(pos)
        pos += size
        return int.from_bytes(framed[pos - size:pos], "big")

    try:
        skip(skip(4))
        count = skip(4)
        if 8 * count > len(framed) - pos:
            return False
        for _ in range(2 * count):
            skip(skip(4))
        skip(skip(8))
    except IndexError:
        return False
    return pos == len(framed)


def check_built(data: bytes) -> None:
    options = data[0]
    errors = "surrogateescape" if options & 2 else "replace"
    expiry_ms = int.from_bytes(data[1:9], "big")
    accepted_ms = int.from_bytes(data[9:17], "big")
    body_n = data[17] if len(data) > 17 else 0
    body = data[18:18 + body_n]
    texts = [t.decode("utf-8", errors) for t in data[18 + body_n:].split(b"\x00")]
    id, rest = texts[0], texts[1:]
    if len(rest) % 2:
        rest.append("")
    pairs = list(zip(rest[0::2], rest[1::2]))
    headers: object = dict(pairs) if options & 8 else pairs
    got = attempt(_dedup.encode_envelope, id, headers, memoryview(body) if options & 4 else body, expiry_ms,
                  accepted_ms)
    want = attempt(ref.encode_envelope, id, headers, body, expiry_ms, accepted_ms)
    if got[0] == "raised" or want[0] == "raised":
        # lone surrogates cannot be UTF-8: both refuse them the same way
        expect(got[0] == want[0] == "raised" and issubclass(got[1], UnicodeError) and issubclass(want[1], UnicodeError),
               "encode_envelope fails unlike tests/reference_impl.py", want, got)
        return
    expect(got == want, "encode_envelope and tests/reference_impl.py disagree", want, got)
    expect(_dedup.decode_envelope(got[1]) == (id, dict(pairs), body, expiry_ms, accepted_ms),
           "an encoded envelope does not decode to its fields")
    check_raw(got[1])


def check(data: bytes) -> None:
    if data[:1] and data[0] & 1:
        check_built(data)
    else:
        check_raw(data[1:])


if __name__ == "__main__":
    fuzz(check)
