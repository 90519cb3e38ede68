"""Batches between gwcore sites: many messages in one HTTP request (docs/protocol.md, "Batches
between gwcore sites").

The receiving side: a ``POST`` to a receive channel with a ``gwcore-Batch: 1`` header reaches
:func:`receive` (the compiled framer returns a ``core.Batch`` instead of an envelope). Once the
batch's signature (if any) and limits hold, ``Framer.frame_batch`` frames each message as its own
request would be framed, every envelope goes to the writer in the same loop turn (so all are
committed in one fsync'd transaction), and the answer lists each message's outcome once the last
is durable. A refused message never fails the others.

The sending side's format helpers: :func:`advertised` reads what a receiver said it takes,
:data:`ADVERTISE` is what a gwcore receiver says on every 200 to a submit.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from . import malloc
from ._core import core
from .errors import FramingError
from .httphead import error_answer
from .records import now_ms

_INGEST = core.JOB_KINDS[0]

if TYPE_CHECKING:  # pragma: no cover
    from .http import HTTPProtocol

__all__ = ("receive", "advertise_header", "advertised", "BatchLimits", "HEADER")

log = logging.getLogger("gwcore.http")

#: The request header that makes a request a batch, and the response header a receiver
#: advertises batches with (``gwcore-Batch: 1; messages=N; bytes=M``).
HEADER = "gwcore-Batch"
_VERSION = "1"
_JSON = b"application/json; charset=utf-8"
_V2_PREFIX = "v2."


class BatchLimits:
    """What a receiver takes in one batch (``GWCORE_MAX_BATCH_MESSAGES``, ``GWCORE_MAX_BATCH_BYTES``)
    and, as *room*, how many messages it holds waiting for its writer before it answers 503
    (``GWCORE_COMMIT_MAX_PENDING``; 0: not said, as by a receiver before this field)."""

    __slots__ = ("messages", "bytes", "room")

    def __init__(self, messages: int, size: int, room: int = 0) -> None:
        self.messages = messages
        self.bytes = size
        self.room = room

    def per_request(self, in_flight: int) -> int:
        """The most messages one batch of *in_flight* concurrent ones should carry: the
        receiver's limit, and no more than its room shared among them (at least one)."""
        if self.room <= 0:
            return self.messages
        return max(1, min(self.messages, self.room // max(1, in_flight)))

    def __repr__(self) -> str:
        return f"BatchLimits(messages={self.messages}, bytes={self.bytes}, room={self.room})"


def advertise_header(limits: BatchLimits) -> bytes:
    """The response header line a gwcore receiver adds to a 200 for a submit."""
    room = f"; room={limits.room}" if limits.room > 0 else ""
    return f"{HEADER}: {_VERSION}; messages={limits.messages}; bytes={limits.bytes}{room}\r\n".encode("ascii")


def advertised(headers: list[tuple[bytes, bytes]]) -> BatchLimits | None:
    """The batch limits a response advertises, or None (not a gwcore receiver, or another
    version of batches than this sender speaks). Fields this sender does not know are ignored."""
    for name, value in headers:
        if name.lower() == b"gwcore-batch":
            parts = [p.strip() for p in value.decode("latin-1").split(";")]
            if parts[0] != _VERSION:
                return None
            fields = {}
            for p in parts[1:]:
                key, _, number = p.partition("=")
                if number.isdigit():
                    fields[key.strip()] = int(number)
            messages, size = fields.get("messages", 0), fields.get("bytes", 0)
            if messages < 1 or size < 1:
                return None
            return BatchLimits(messages, size, fields.get("room", 0))
    return None


def receive(protocol: HTTPProtocol, slot: core.AnswerSlot, batch: Any) -> None:
    """Answer one batch request (its signature, if the listener checks them, already held)."""
    state = protocol.state
    state.batches += 1
    if state.batches == 1:
        malloc.batch_seen()  # the first batch of this listener: its buffers kept in the heap
    limits: BatchLimits = state.batch_limits
    if batch.version != _VERSION:
        protocol._answer(slot, 400, f"Bad Request: unsupported {HEADER} version {batch.version!r} (this "
                                    f"receiver speaks {_VERSION})")
        return
    if len(batch.body) > limits.bytes:
        protocol._answer(slot, 413, f"Payload Too Large: a batch of {len(batch.body)} bytes exceeds "
                                    f"GWCORE_MAX_BATCH_BYTES={limits.bytes}")
        return
    writer = state.writer
    if writer.pending and writer.pending + core.batch_count(batch.body) > state.max_pending:
        # refused before any message is framed: a full queue costs the sender, not us
        protocol._answer(slot, 503, "Service Unavailable: ingest queue full, retry later")
        return
    try:
        framed = state.framer.frame_batch(batch.body, now_ms(), limits.messages,
                                          max_headers=state.settings.http_max_headers,
                                          max_header_bytes=state.settings.http_max_header_bytes)
    except FramingError as exc:  # (a ValueError too: first)
        protocol._answer(slot, 400, f"Bad Request: malformed batch: {exc}")
        return
    except ValueError as exc:
        protocol._answer(slot, 413, f"Payload Too Large: {exc}")
        return
    messages = len(framed)

    def answer(body: bytes) -> None:
        state.batch_messages += messages
        protocol._answer(slot, 200, "OK", body=body, content_type=_JSON)

    outcomes = core.BatchAnswer(messages, answer, _writer_failed)
    # All in this loop turn: the writer takes them in one hand-over, so one transaction. The
    # listener's compiled inbox (the local writer's) takes them straight, as it does a plain
    # submit; a closed one, or none, goes through the sink's ingest_then.
    inbox = state.inbox
    add = inbox.add if inbox is not None and not inbox.closed else None
    ingest_then = writer.ingest_then
    for i, result in enumerate(framed):
        if type(result) is core.Rejection:
            outcomes.refuse(i, result.status, result.reason)
        elif add is not None:
            add(_INGEST, result, outcomes.slot(i))
        else:
            ingest_then(result, outcomes.slot(i))
    outcomes.arm()


def _writer_failed(exc: BaseException) -> tuple[int, str]:
    return error_answer(exc, "batch ingest")


def check_signature(verifier: Any, batch: Any) -> tuple[int, str] | None:
    """The verifier's answer for a batch: as for a submit, but a batch is signed with scheme v2
    only, and a body that does not match its signed digest is refused 401 like a forged one (the
    digest is what the batch's signature covers)."""
    sig = batch.auth_signature
    if sig is not None and not sig.startswith(_V2_PREFIX):
        return 401, "Unauthorized: v1-refused (a gwcore batch is signed with scheme v2)"
    refused = verifier.check(batch)
    if refused is not None and refused[0] == 412:
        return 401, f"Unauthorized: batch body does not match its signed Content-Digest ({refused[1]})"
    return refused
