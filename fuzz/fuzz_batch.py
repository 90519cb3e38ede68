"""Fuzz target: batches between gwcore sites (docs/protocol.md, "Batches between gwcore sites"):
``Framer.frame_batch``, ``batch_count`` and ``encode_batch`` (gwcore/_parts/framing.pyx).

Input layout (tests/fuzz_corpus/batch/; fuzz/seeds.py writes the seeds). Byte 0 holds the options:
bit 0 raw or built, bits 1-2 ``max_headers`` (0, 2, 8, 256), bits 3-4 ``max_header_bytes`` (16,
96, 300, 65536), bits 5-6 ``max_messages`` (1, 3, 16, 1000).

* raw (bit 0 clear): the rest is a batch body, maybe damaged.
* built (bit 0 set): the rest is messages separated by ``\\xff\\xfe``, each a header block and a
  body separated by the first ``\\xfd``; ``encode_batch`` of them must be the layout
  tests/reference_impl.py writes, and the result is checked as a raw batch.

A raw batch must be read as tests/reference_impl.py reads it: ``FramingError`` exactly when the
body is not one whole batch of well-formed blocks, ``ValueError`` for more than ``max_messages``
(checked first, once the preamble holds), otherwise one outcome per message, in order, each what
that message framed alone would be (``Framer.frame`` on its lines), with the batch's own rules: 431
for more lines than ``max_headers`` or a block longer than ``max_header_bytes``, 400 for a databus
part or a batch inside the batch, and a ``Content-Digest`` checked as sha-256. ``batch_count`` is
the preamble's count, or 0 when the preamble does not hold.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import add_paths, fuzz  # noqa: E402

add_paths()

import reference_impl as ref  # noqa: E402

from gwcore import _dedup  # noqa: E402
from gwcore.errors import FramingError  # noqa: E402

MAX_HEADERS = (0, 2, 8, 256)
MAX_HEADER_BYTES = (16, 96, 300, 65536)
MAX_MESSAGES = (1, 3, 16, 1000)
NOW_MS = 1_000_000
MESSAGE_SEP = b"\xff\xfe"
BODY_SEP = b"\xfd"


class Finding(AssertionError):
    """An invariant does not hold (atheris reports it like a crash and keeps the input)."""


def expect(condition: object, what: str, *details: object) -> None:
    if not condition:
        raise Finding(what + "".join(f"\n  {d!r}" for d in details))


def attempt(function, *args, **kw) -> tuple:
    try:
        return ("ok", function(*args, **kw))
    except Exception as exc:
        return ("raised", type(exc), str(exc))


def reference_encode(messages: list[tuple[bytes, bytes]]) -> bytes:
    out = [ref.BATCH_MAGIC + bytes([ref.BATCH_VERSION, 0]), struct.pack(">I", len(messages))]
    for block, body in messages:
        out += [struct.pack(">I", len(block)), block, struct.pack(">Q", len(body)), body]
    return b"".join(out)


def preamble_count(data: bytes) -> int | None:
    if len(data) < 8 or data[:2] != ref.BATCH_MAGIC or data[2] != ref.BATCH_VERSION or data[3] != 0:
        return None
    return struct.unpack_from(">I", data, 4)[0]


def digest_outcome(lines: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, str] | None | str:
    """What a batch message's Content-Digest makes of a message that frames alone: None (taken),
    a (status, reason), or "either" when the header repeats (which one counts is not specified)."""
    values = [ref.url_decode(v) for n, v in lines if ref.ascii_fold(ref.url_decode(n)) == "content-digest"]
    if not values:
        return None
    if len(values) > 1:
        return "either"
    value = values[0]
    if not value.startswith("sha-256=:"):
        return 400, "Bad Request: a batch message's Content-Digest must be sha-256=:<base64>:"
    if value != "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":":
        return 412, "Content-Digest received does not match the sha-256 calculated on server. Please resubmit."
    return None


def check_message(result: object, block: bytes, body: bytes, limits: tuple[int, int]) -> None:
    max_headers, max_header_bytes = limits
    lines = ref.batch_block_lines(block)
    if len(lines) > max_headers:
        expect(type(result) is _dedup.Rejection and (result.status, result.reason) == (
            431, f"Request Header Fields Too Large: more than {max_headers} headers"),
            "too many header lines, not that message's 431", result)
        return
    if len(block) > max_header_bytes:
        expect(type(result) is _dedup.Rejection and (result.status, result.reason) == (
            431, f"Request Header Fields Too Large: header section exceeds {max_header_bytes} bytes"),
            "too big a header block, not that message's 431", result)
        return
    alone = _dedup.Framer("Ep").frame([x for line in lines for x in line], body, None, NOW_MS)
    if type(alone) is _dedup.Batch or (type(alone) is _dedup.Envelope and alone.call_type != _dedup.CALL_SUBMIT):
        expect(type(result) is _dedup.Rejection and result.status == 400,
               "a batch or a databus part inside a batch was not refused 400", result)
        return
    if type(alone) is _dedup.Rejection:
        expect(type(result) is _dedup.Rejection and (result.status, result.reason) == (alone.status, alone.reason),
               "a batch message refused unlike the message alone", alone, result)
        return
    digest = digest_outcome(lines, body)
    if digest == "either":
        expect(type(result) in (_dedup.Envelope, _dedup.Rejection), "a batch message's outcome", result)
        return
    if digest is not None:
        expect(type(result) is _dedup.Rejection and (result.status, result.reason) == digest,
               "a batch message's Content-Digest not checked as documented", digest, result)
        return
    expect(type(result) is _dedup.Envelope and (result.id, result.key, result.framed, result.expiry_ms)
           == (alone.id, alone.key, alone.framed, alone.expiry_ms),
           "a batch message framed unlike the message alone", alone, result)


def check_raw(data: bytes, options: int) -> None:
    limits = (MAX_HEADERS[(options >> 1) & 3], MAX_HEADER_BYTES[(options >> 3) & 3])
    max_messages = MAX_MESSAGES[(options >> 5) & 3]
    count = preamble_count(data)
    expect(_dedup.batch_count(data) == (count or 0), "batch_count is not the preamble's count", count)
    got = attempt(_dedup.Framer("Ep").frame_batch, data, NOW_MS, max_messages,
                  max_headers=limits[0], max_header_bytes=limits[1])
    if count is not None and count > max_messages:
        expect(got[0] == "raised" and got[1] is ValueError, "more messages than allowed, not a ValueError", got)
        return
    try:
        messages = ref.decode_batch(data)
        for block, _ in messages:
            ref.batch_block_lines(block)
    except FramingError:
        expect(got[0] == "raised" and got[1] is FramingError, "a malformed batch was not refused FramingError", got)
        return
    expect(got[0] == "ok", "a well-formed batch was refused", got)
    results = got[1]
    expect(len(results) == len(messages), "not one outcome per message", len(messages), len(results))
    for result, (block, body) in zip(results, messages):
        check_message(result, block, body, limits)


def check_built(data: bytes, options: int) -> None:
    messages = []
    for piece in data.split(MESSAGE_SEP) if data else []:
        block, _, body = piece.partition(BODY_SEP)
        messages.append((block, body))
    encoded = _dedup.encode_batch(messages)
    expect(encoded == reference_encode(messages), "encode_batch is not the documented layout", messages)
    check_raw(encoded, options)


def check(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1:
        check_built(data[1:], data[0])
    else:
        check_raw(data[1:], data[0])


if __name__ == "__main__":
    fuzz(check)
