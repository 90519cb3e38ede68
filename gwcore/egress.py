"""The sending side: the durable outgoing queue, NServiceBus framing on the wire, and the forwarder.

``send_to_sites`` appends one outgoing record per destination site in one fsync'd write transaction
and returns once it is committed. The forwarder reads committed records, sends each with the
framing of protocol.md §1.3 over a bounded keep-alive pool per site (:class:`gwcore.client.SiteClient`),
and then, in another transaction, removes it (200), schedules its next attempt (a failure that may
pass), or moves it to the ``outgoing_errors`` database (a permanent refusal, or the retries ran out).
A crash between the send and the removal sends the message again after restart, with the same
``NServiceBus.Id``: the receiver's dedup turns that into a duplicate, so every message arrives once.

Outgoing record (``outgoing`` database, key u64 seq)::

    u64 BE next_attempt_ms   (0 = as soon as possible)
    u32 BE failed attempts so far
    u16 BE destination length, destination (a site key, or a channel URL for replies)
    u32 BE last failure length, last failure (UTF-8; empty before the first failure)
    the envelope (core.encode_envelope) of id, headers, body and TimeToBeReceived expiry

Failed record (``outgoing_errors``, key u64 seq): u64 BE failed_ms, then the outgoing record.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import functools
import hashlib
import heapq
import itertools
import logging
import os
import ssl
import struct
import time
import uuid
from typing import Any, Callable, Iterable, Iterator, Mapping

import orjson

from . import auth, databus
from ._core import core
from .batch import BatchLimits, advertised
from .client import FileBody, SiteClient, make_client_ssl_context, wait_turn
from .config import Settings, Site
from .errors import ConfigurationError, GatewayError, SendError, StoreError, UnknownSiteError
from .metrics import SECONDS, Buckets, Families, counter, gauge, histogram
from .records import now_ms, pack_seq, unpack_seq
from .store import Store, Writer

__all__ = (
    "OutgoingRecord", "wire_headers", "prepare", "Forwarder", "PERMANENT_STATUSES",
    "encode_outgoing", "decode_outgoing", "encode_failed", "decode_failed", "time_sent", "prepare_to",
    "record_id", "reply_destination", "append_records", "retry_failed", "peek_outgoing", "outgoing_records",
    "outgoing_schedule", "failed_sends",
)

log = logging.getLogger("gwcore.egress")

_HEAD = struct.Struct(">QIH")
_U32 = struct.Struct(">I")

#: Answers that cannot succeed on a retry: the message goes to the error queue at once.
PERMANENT_STATUSES = frozenset({400, 401, 403, 413})

_GATEWAY_TRUE = (b"NServiceBus.Gateway", b"True")
_DATABUS = databus.DATABUS_PREFIX.encode("ascii")
_SUBMIT_TAIL = b"NServiceBus.Gateway: True\r\n"   # where encode_submit's control lines begin
_BLOB_MISSING = -1  # a local failure, no request made: permanent
_READ_AHEAD = 63  # records read along with the one a worker needs
# A batch to a gwcore receiver (gwcore/batch.py): its request's own header line, and how long a
# receiver that refused a batch gets one message per request.
_BATCH_LINES = b"gwcore-Batch: 1\r\n"
_BATCH_RETRY_AFTER = 60.0
# A batch refused whole with 503 (the receiver's ingest queue is full, or it is not the ready
# instance) is back-pressure, not a failed attempt: its messages are sent again after a back-off
# that doubles from _HOLD_BACK_FIRST to _HOLD_BACK_CAP seconds, without counting an attempt, until
# the destination has answered nothing but 503 for _HOLD_BACK_LIMIT seconds; from then on a 503
# counts as any failure does (retries, the outgoing error queue).
_HOLD_BACK_FIRST = 0.05
_HOLD_BACK_CAP = 2.0
_HOLD_BACK_LIMIT = 60.0
# A reply destination that is not a configured site (a channel URL a remote sender named) is
# closed after this long without a message, and one past GWCORE_REPLY_DESTINATIONS_MAX waits this
# long in the outgoing queue before it is tried again.
_REPLY_IDLE = 60.0
_REPLY_WAIT_MS = 1000
_HEADER_PREFIX = "NServiceBus.Header."
#: The metrics label of every destination that is not a configured site (Forwarder.metrics).
OTHER_SITE = "other"


@dataclasses.dataclass
class OutgoingRecord:
    dest: str
    attempt: int
    next_ms: int
    last_error: str
    framed: bytes | memoryview


def encode_outgoing(rec: OutgoingRecord) -> bytes:
    dest = rec.dest.encode("utf-8")
    err = rec.last_error.encode("utf-8", "replace")[:2000]
    return b"".join((_HEAD.pack(rec.next_ms, rec.attempt, len(dest)), dest, _U32.pack(len(err)), err, rec.framed))


#: ``(next_ms, attempt, destination length, envelope offset)`` of a record (the core reads the
#: layout for the forwarder's batches too: one reader of it).
_layout = core.outgoing_layout


def decode_outgoing(value: bytes | memoryview) -> OutgoingRecord:
    """Decode a record; ``framed`` is a zero-copy view into *value*."""
    next_ms, attempt, n, framed_at = _layout(value)
    pos = _HEAD.size
    dest = bytes(value[pos:pos + n]).decode("utf-8")
    err = bytes(value[pos + n + 4:framed_at]).decode("utf-8", "replace")
    return OutgoingRecord(dest, attempt, next_ms, err, memoryview(value)[framed_at:])


def peek_outgoing(value: bytes | memoryview) -> tuple[str, int]:
    """``(destination, next attempt ms)`` of a record, without copying its envelope."""
    next_ms, _attempt, n = _HEAD.unpack_from(value)
    return bytes(value[_HEAD.size:_HEAD.size + n]).decode("utf-8"), next_ms


def encode_failed(failed_ms: int, rec: OutgoingRecord) -> bytes:
    return pack_seq(failed_ms) + encode_outgoing(rec)


def decode_failed(value: bytes) -> tuple[int, OutgoingRecord]:
    view = memoryview(value)
    return unpack_seq(view[:8]), decode_outgoing(view[8:])


def time_sent(now: float | None = None) -> str:
    """NServiceBus's wire format for times (``yyyy-MM-dd HH:mm:ss:ffffff Z``, UTC)."""
    t = time.time() if now is None else now
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + f":{int(t % 1 * 1_000_000):06d} Z"


def _file_sha256(path: str) -> str:
    """The base64 SHA-256 of a file (a blob recorded without one), read in pieces."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return base64.b64encode(sha.digest()).decode("ascii")


def _enc(text: str) -> bytes:
    return core.url_encode(text).encode("ascii")


def wire_headers(msg_id: str, headers: Mapping[str, str], body: bytes,
                 call_type: str = "SingleCallSubmit", in_batch: bool = False) -> list[tuple[bytes, bytes]]:
    """The HTTP headers NServiceBus's forwarder sends for one message (protocol.md §1.3), in its
    order, every name and value URL-encoded with the .NET rules (upper-case hex).

    :param msg_id: the message id (``NServiceBus.Id``); ``headers`` should carry it as
        ``NServiceBus.MessageId`` too.
    :param headers: the message headers; each crosses as ``NServiceBus.Header.<name>``.
    :param in_batch: the lines of a message in a gwcore batch: its body's digest is a
        ``Content-Digest`` of sha-256 instead of a ``Content-MD5`` (docs/protocol.md).
    """
    out = [(b"NServiceBus.Id", _enc(msg_id)),
           (b"NServiceBus.CorrelationId", _enc(headers.get("NServiceBus.CorrelationId", msg_id)))]
    ttbr = headers.get("NServiceBus.TimeToBeReceived")
    if ttbr is not None:
        out.append((b"NServiceBus.TimeToBeReceived", _enc(ttbr)))
    reply_to = headers.get("NServiceBus.ReplyToAddress")
    if reply_to is not None:
        out.append((b"NServiceBus.ReplyToAddress", _enc(reply_to)))
    for name, value in headers.items():
        out.append((_enc(_HEADER_PREFIX + name), _enc(value)))
    out.append(_GATEWAY_TRUE)
    out.append((b"NServiceBus.CallType", _enc(call_type)))
    if in_batch:
        out.append((b"Content-Digest", _enc(databus.content_digest(auth.body_digest(body)))))
    else:
        out.append((b"Content-MD5", _enc(core.content_md5(body))))
    return out


def prepare(settings: Settings, sites: Iterable[str], body: bytes, headers: Mapping[str, str] | None = None,
            message_id: str | None = None, now: float | None = None,
            reply_uri: str | None = None) -> tuple[str, list[tuple[str, bytes]]]:
    """Check the destinations and build one envelope per site (protocol.md §4.2–§4.4).

    :return: ``(message id, [(site key, envelope)])``.
    :raises UnknownSiteError: a site is not configured (NServiceBus's text, with every missing key).
    :raises ConfigurationError: no reply URI is known (needed for ``NServiceBus.OriginatingSite``).
    """
    keys = list(dict.fromkeys(sites))
    if not keys:
        raise UnknownSiteError("no destination sites given")
    missing = [k for k in keys if settings.site(k) is None]
    if missing:
        raise UnknownSiteError(f"The following sites have not been configured: {', '.join(missing)}")
    return _build(settings, [(k, k) for k in keys], body, headers, message_id, now, reply_uri)


def prepare_to(settings: Settings, url: str, body: bytes, headers: Mapping[str, str] | None = None,
               message_id: str | None = None, now: float | None = None,
               reply_uri: str | None = None) -> tuple[str, list[tuple[str, bytes]]]:
    """Like :func:`prepare` for one channel URL that need not be a configured site (a reply to
    ``NServiceBus.OriginatingSite``)."""
    site = settings.site_at(url)
    return _build(settings, [(url, site.key if site else None)], body, headers, message_id, now, reply_uri)


def _build(settings: Settings, dests: list[tuple[str, str | None]], body: bytes, headers: Mapping[str, str] | None,
           message_id: str | None, now: float | None, reply_uri: str | None) -> tuple[str, list[tuple[str, bytes]]]:
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise TypeError("the message body must be bytes")
    h = dict(headers or {})
    msg_id = message_id or h.get("NServiceBus.MessageId") or str(uuid.uuid4())
    h["NServiceBus.MessageId"] = msg_id
    h.setdefault("NServiceBus.CorrelationId", msg_id)
    h.setdefault("NServiceBus.MessageIntent", "Send")
    h.setdefault("NServiceBus.ConversationId", msg_id)
    h.setdefault("NServiceBus.TimeSent", time_sent(now))
    h.setdefault("NServiceBus.OriginatingEndpoint", settings.endpoint)
    reply_uri = reply_uri or settings.reply_uri
    if reply_uri is None:
        raise ConfigurationError("GWCORE_REPLY_TO_URI is needed to send (the receive channel binds a wildcard address)")
    h["NServiceBus.OriginatingSite"] = f"http,{reply_uri}"
    expiry = _expiry_ms(h, now)
    out = []
    accepted = now_ms(now)
    for dest, key in dests:
        per_site = dict(h)
        if key is not None:
            per_site["NServiceBus.DestinationSites"] = key   # one key per copy, as NServiceBus does
        out.append((dest, core.encode_envelope(msg_id, per_site, bytes(body), expiry, accepted)))
    return msg_id, out


def record_id(rec: OutgoingRecord) -> str:
    """The message id of an outgoing record."""
    return core.decode_envelope(rec.framed)[0]


def _expiry_ms(headers: Mapping[str, str], now: float | None) -> int:
    ttbr = headers.get("NServiceBus.TimeToBeReceived")
    if ttbr is None:
        return 0
    ms = core.parse_timespan(ttbr)
    if ms is None or ms <= 0:
        raise ValueError(f"NServiceBus.TimeToBeReceived {ttbr!r} is not a positive .NET TimeSpan")
    if ms >= 100 * 365 * 86400 * 1000:
        return 0
    return now_ms(now) + ms


def reply_destination(incoming_headers: Mapping[str, str]) -> str:
    """The channel URL a reply goes to: the address part of ``NServiceBus.OriginatingSite``."""
    site = incoming_headers.get("NServiceBus.OriginatingSite")
    if not site:
        raise GatewayError("No destination found for message: the incoming message has no NServiceBus.OriginatingSite")
    kind, sep, address = site.partition(",")
    if not sep or not address.strip():
        raise GatewayError(f"NServiceBus.OriginatingSite {site!r} is not of the form type,address")
    return address.strip()


# -- the store side: reads (any thread) -------------------------------------------------------------

def outgoing_records(store: Store) -> Iterator[tuple[int, OutgoingRecord]]:
    """Every ``(out seq, OutgoingRecord)`` waiting to be sent (inspection; one read transaction
    held throughout)."""
    for k, v in store.iter_db(store.outgoing):
        yield unpack_seq(k), decode_outgoing(v)


def outgoing_schedule(store: Store) -> list[tuple[int, str, int]]:
    """``(out seq, destination, next attempt ms)`` of every waiting record (forwarder start)."""
    with store.resize_lock, store.env.begin(buffers=True) as txn:
        return [(unpack_seq(k), *peek_outgoing(v)) for k, v in txn.cursor(db=store.outgoing)]


def failed_sends(store: Store) -> list[tuple[int, OutgoingRecord]]:
    """Every ``(out seq, OutgoingRecord)`` in the outgoing error queue."""
    with store.resize_lock, store.env.begin() as txn:
        return [(unpack_seq(k), decode_failed(v)[1]) for k, v in txn.cursor(db=store.outgoing_errors)]


# -- the store side: functions run inside the writer's transaction --------------------------------

def append_records(store: Store, items: list[tuple[str, bytes]]) -> Callable[[Any], list[int]]:
    """A writer job that appends one outgoing record per (destination, envelope); returns the seqs."""
    def job(txn: Any) -> list[int]:
        raw = txn.get(b"out_seq", db=store.meta)
        seq = unpack_seq(raw) if raw else 0
        seqs = []
        for dest, framed in items:
            seq += 1
            txn.put(pack_seq(seq), encode_outgoing(OutgoingRecord(dest, 0, 0, "", framed)), db=store.outgoing)
            seqs.append(seq)
        txn.put(b"out_seq", pack_seq(seq), db=store.meta)
        return seqs
    return job


def retry_failed(store: Store, match: Callable[[int, OutgoingRecord], bool]) -> Callable[[Any], list[tuple[int, str, str]]]:
    """A writer job moving matching ``outgoing_errors`` records back to ``outgoing`` (attempts
    reset); returns ``(seq, destination, message id)`` of each."""
    def job(txn: Any) -> list[tuple[int, str, str]]:
        moved = []
        for key, value in list(txn.cursor(db=store.outgoing_errors)):
            _failed, rec = decode_failed(value)
            seq = unpack_seq(key)
            if match(seq, rec):
                rec.attempt, rec.next_ms = 0, 0
                txn.put(bytes(key), encode_outgoing(rec), db=store.outgoing)
                txn.delete(bytes(key), db=store.outgoing_errors)
                moved.append((seq, rec.dest, record_id(rec)))
        return moved
    return job


# -- the forwarder ------------------------------------------------------------------------------------

class _Outgoing:
    """One outgoing record read and made ready to send (``Forwarder._prepare``)."""

    __slots__ = ("seq", "value", "framed", "msg_id", "body", "block")

    def __init__(self, seq: int, value: bytes, framed: memoryview, msg_id: str, body: bytes, block: bytes) -> None:
        self.seq = seq
        self.value = value
        self.framed = framed
        self.msg_id = msg_id
        self.body = body
        self.block = block


def _outgoing(seq: int, value: bytes) -> tuple[_Outgoing, int]:
    """The record *seq* made ready to send, and its TimeToBeReceived expiry (ms, 0: none). Only
    the attempt count and where the envelope starts are read: the rest of the record is read
    when an attempt fails."""
    _next, attempt, _n, framed_at = _layout(value)
    framed = memoryview(value)[framed_at:]
    extra = [("NServiceBus.Retries", str(attempt)),
             ("NServiceBus.Retries.Timestamp", time_sent())] if attempt else None
    # The header block straight from the stored envelope, in the core (wire_headers is the
    # readable reference of the same lines).
    msg_id, body, expiry_ms, block = core.encode_submit(framed, extra)
    return _Outgoing(seq, value, framed, msg_id, body, block), expiry_ms


def _batch_results(response: Any, n: int) -> list[tuple[int, str]] | None:
    """``(status, reason)`` per message of a batch's 200 answer, ``[]`` when every message was
    accepted, or None when it is not one outcome per message of the batch."""
    try:
        results = orjson.loads(response.body)["results"]
        if len(results) != n:
            return None
        if [r["status"] for r in results].count(200) == n:
            return []
        return [(int(r["status"]), str(r.get("reason", ""))) for r in results]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class _Ready:
    """The due records of one destination, in order: a deque plus the workers waiting on it."""

    __slots__ = ("items", "waiters")

    def __init__(self) -> None:
        self.items: collections.deque[int] = collections.deque()
        self.waiters: collections.deque[asyncio.Future[int]] = collections.deque()

    def put_nowait(self, seq: int) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(seq)
                return
        self.items.append(seq)

    async def get(self) -> int:
        if self.items:
            return self.items.popleft()
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return await waiter

    def get_more(self, n: int) -> list[int]:
        """Up to *n* more records that are due now, without waiting."""
        items = self.items
        return [items.popleft() for _ in range(min(n, len(items)))]


class SendWindow:
    """How many requests may be in flight to one destination: a congestion window within
    ``limit`` (the site's concurrency), in the manner of TCP's AIMD.

    It starts at *limit*. An answered request (any status but 503) grows it by ``1/size``, so by
    one request per window of answers, up to *limit*; a 503 (the receiver's queue is full, it is
    not ready) or a request that got no answer (timeout, connection lost) halves it, at most once
    per *hold* seconds or per the failed request's own duration (the requests already on the way
    when it shrank say nothing new), never below one. Workers wait in :meth:`acquire` while
    ``in_flight >= size``.
    """

    __slots__ = ("size", "limit", "in_flight", "waiters", "shrunk_at", "hold", "shrinks")

    def __init__(self, limit: int, hold: float = 0.1) -> None:
        self.limit = limit
        self.size = float(limit)
        self.in_flight = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.shrunk_at = -1e9
        self.hold = hold
        self.shrinks = 0

    async def acquire(self) -> None:
        while self.in_flight >= int(self.size):
            await wait_turn(self.waiters, self._wake)
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def answered(self, status: int, elapsed: float = 0.0) -> None:
        """The outcome of one request: its status (0: no answer) and how long it took (s)."""
        if status == 503 or status == 0:
            now = time.monotonic()
            if now - self.shrunk_at >= max(self.hold, elapsed):
                self.size = max(1.0, self.size / 2)
                self.shrunk_at = now
                self.shrinks += 1
        elif self.size < self.limit:
            self.size = min(float(self.limit), self.size + 1.0 / self.size)
            self._wake()

    def _wake(self) -> None:
        free = int(self.size) - self.in_flight
        while free > 0 and self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1


class _Destination:
    def __init__(self, name: str, url: str, site: Site | None, client: SiteClient) -> None:
        self.name = name
        self.url = url
        self.site = site
        self.client = client
        self.ready = _Ready()
        self.cache: dict[int, bytes] = {}  # records read ahead for the workers, by seq
        self.tasks: list[asyncio.Task] = []
        self.sent = 0
        self.failed_attempts = 0
        self.retried = 0
        self.in_flight = 0
        self.latency = Buckets(SECONDS)  # one request's time, from writing it to its answer
        #: What the receiver said it takes in one batch (gwcore/batch.py), once a 200 of its
        #: said so; None: one message per request (NServiceBus, or not known yet).
        self.batch: BatchLimits | None = None
        self.batch_refused_until = 0.0  # monotonic: a refused batch, one per request until then
        self.batches = 0
        self.window = SendWindow(client.concurrency)
        self.busy = 0  # workers holding messages of this destination (taken, not yet done with)
        #: held by the worker taking messages: with GWCORE_SEND_LINGER, one worker lingers at a time
        #: and its batch takes what the idle others would have taken one by one
        self.taking = asyncio.Lock()
        self.used = time.monotonic()  # the last time a message was handed to it
        self.busy_since: float | None = None  # monotonic: the first of an unbroken run of 503s
        self.busy_streak = 0
        self.held_back = 0  # messages of batches refused 503, sent again without an attempt

    def answered(self, status: int, started: float) -> None:
        """A request to this destination, begun at *started* (``time.perf_counter``), got
        *status* (0: no answer): its time is observed and the send window told."""
        elapsed = time.perf_counter() - started
        self.latency.observe(elapsed)
        self.window.answered(status, elapsed)
        if status == 503:
            if self.busy_since is None:
                self.busy_since = time.monotonic()
            self.busy_streak += 1
        elif status:
            self.busy_since, self.busy_streak = None, 0

    def batch_size(self) -> int:
        """How many messages the next batch to this destination may carry (it takes batches)."""
        assert self.batch is not None
        return self.batch.per_request(int(self.window.size))

    def hold_back(self, n: int) -> float | None:
        """A batch of *n* messages was refused 503: the seconds to wait before sending them again
        without counting an attempt, or None when the receiver has been refusing everything for
        longer than _HOLD_BACK_LIMIT (then it counts as a failure)."""
        if self.busy_since is None or time.monotonic() - self.busy_since > _HOLD_BACK_LIMIT:
            return None
        self.held_back += n
        return min(_HOLD_BACK_CAP, _HOLD_BACK_FIRST * 2 ** min(self.busy_streak - 1, 16))


def _metrics_row(start: list[Any] | None = None) -> list[Any]:
    """A per-site metrics row: in flight, sent, failed attempts, retries, request times, held
    back (a copy of *start*, or zeros)."""
    row: list[Any] = [0, 0, 0, 0, Buckets(SECONDS), 0]
    if start is not None:
        row[:4], row[5] = start[:4], start[5]
        row[4].merge(start[4])
    return row


def _count_into(row: list[Any], d: _Destination) -> None:
    """Add destination *d*'s counts to the metrics *row*."""
    row[0] += d.in_flight
    row[1] += d.sent
    row[2] += d.failed_attempts
    row[3] += d.retried
    row[4].merge(d.latency)
    row[5] += d.held_back


class Forwarder:
    """Sends committed outgoing records to their sites; one per gateway."""

    def __init__(self, settings: Settings, store: Store, writer: Writer) -> None:
        self.settings = settings
        self.store = store
        self.writer = writer
        self._dests: dict[str, _Destination] = {}
        self._delayed: list[tuple[int, int, str]] = []  # (due ms, seq, destination)
        self._timer_wakeup = asyncio.Event()
        self._timer: asyncio.Task | None = None
        self._closed = False
        self._ssl_default: ssl.SSLContext | None = None
        self._delivered: list[int] = []  # sent (200), their removal not yet handed to the writer
        self._removals: set[asyncio.Future] = set()
        #: What the reply destinations closed for idleness had counted (a metrics row, as
        #: _count_into keeps it): the "other" row of the metrics starts from it. None: none closed.
        self._closed_replies: list[Any] | None = None
        self._closing: set[asyncio.Task] = set()
        self.replies_deferred = 0  # messages to a new reply destination kept waiting at the limit
        self.sent = 0
        self.retried = 0
        self.failed = 0
        self.expired = 0

    # -- lifecycle

    async def start(self) -> None:
        pending = 0
        for seq, dest, next_ms in outgoing_schedule(self.store):
            self.schedule(seq, dest, next_ms)
            pending += 1
        if pending:
            log.info("forwarder: %d outgoing messages waiting from before the restart", pending)
        self._timer = asyncio.get_running_loop().create_task(self._run_timer(), name="gwcore-forwarder-timer")

    async def stop(self) -> None:
        self._closed = True
        self._flush_delivered()
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
        tasks = [t for d in self._dests.values() for t in d.tasks]
        if self._timer is not None:
            tasks.append(self._timer)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, *self._closing, return_exceptions=True)
        for d in self._dests.values():
            await d.client.close()

    # -- scheduling

    def schedule(self, seq: int, dest: str, due_ms: int = 0) -> None:
        if self._closed:
            return
        if due_ms and due_ms > now_ms():
            heapq.heappush(self._delayed, (due_ms, seq, dest))
            self._timer_wakeup.set()
            return
        self._hand(seq, dest)

    def _hand(self, seq: int, dest: str) -> None:
        """A due message to its destination's workers; to a new reply destination beyond
        GWCORE_REPLY_DESTINATIONS_MAX, a second later (its record waits in the store)."""
        d = self._dests.get(dest)
        if d is None:
            d = self._destination(dest)
            if d is None:
                self.replies_deferred += 1
                heapq.heappush(self._delayed, (now_ms() + _REPLY_WAIT_MS, seq, dest))
                self._timer_wakeup.set()
                return
        d.used = time.monotonic()
        d.ready.put_nowait(seq)

    def _destination(self, name: str) -> _Destination | None:
        """The destination *name* (a configured site's key, or a reply's channel URL), made on
        first use; None for a new reply destination while GWCORE_REPLY_DESTINATIONS_MAX are open
        and none of them is idle."""
        d = self._dests.get(name)
        if d is not None:
            return d
        site = self.settings.site(name)
        url = site.url if site is not None else name
        if site is None:
            # A reply goes to a channel URL; sign it if that URL is a configured site's.
            site = self.settings.site_at(url)
        if site is None and self._replies_open() >= self.settings.reply_destinations_max:
            self._close_idle_replies(0.0)
            if self._replies_open() >= self.settings.reply_destinations_max:
                return None
        concurrency = site.concurrency if site is not None else self.settings.send_concurrency
        client = SiteClient(url, concurrency=concurrency, ssl_context=self._ssl_for(site, url),
                            request_timeout=self.settings.send_timeout)
        d = _Destination(name, url, site, client)
        self._dests[name] = d
        loop = asyncio.get_running_loop()
        d.tasks = [loop.create_task(self._work(d), name=f"gwcore-forward-{name}-{i}") for i in range(concurrency)]
        return d

    def _ssl_for(self, site: Site | None, url: str) -> ssl.SSLContext | None:
        if not url.lower().startswith("https:"):
            return None
        if site is not None and site.ca_file:
            return make_client_ssl_context(site.ca_file)
        if self._ssl_default is None:
            self._ssl_default = make_client_ssl_context(self.settings.tls_ca)
        return self._ssl_default

    async def _run_timer(self) -> None:
        while True:
            self._timer_wakeup.clear()
            now = now_ms()
            while self._delayed and self._delayed[0][0] <= now:
                _due, seq, dest = heapq.heappop(self._delayed)
                self._hand(seq, dest)
            self._close_idle_replies(_REPLY_IDLE)
            timeout = (self._delayed[0][0] - now) / 1000 if self._delayed else None
            if self._replies_open():
                timeout = min(timeout or _REPLY_IDLE, _REPLY_IDLE / 4)  # idle replies get closed
            try:
                await asyncio.wait_for(self._timer_wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _replies_open(self) -> int:
        return sum(1 for d in self._dests.values() if d.site is None)

    def _close_idle_replies(self, idle: float) -> None:
        """Close every reply destination that is not a configured site and has had nothing to
        do for *idle* seconds: its workers, its connections. A message for it later makes it
        again; what it counted stays in the metrics' "other" row."""
        now = time.monotonic()
        for name, d in list(self._dests.items()):
            if d.site is not None or d.busy or d.in_flight or d.ready.items or now - d.used < idle:
                continue
            del self._dests[name]
            if self._closed_replies is None:
                self._closed_replies = _metrics_row()
            _count_into(self._closed_replies, d)
            for t in d.tasks:
                t.cancel()
            task = asyncio.get_running_loop().create_task(self._close_destination(d))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_destination(d: _Destination) -> None:
        await asyncio.gather(*d.tasks, return_exceptions=True)
        await d.client.close()

    # -- sending

    async def _work(self, d: _Destination) -> None:
        window, linger = d.window, self.settings.send_linger
        while True:
            # A place in the send window first: while the window is full, due messages gather in
            # the ready queue and the next batch takes them all.
            await window.acquire()
            try:
                async with d.taking:
                    seqs = [await d.ready.get()]
                    d.busy += 1
                    if d.batch is not None and self.settings.send_batch:
                        # what else is due goes along: a batch fills from the queue (waiting up to
                        # GWCORE_SEND_LINGER for more when it is not full), up to the receiver's
                        # limit and its room shared among the requests in flight
                        more = d.batch_size() - 1
                        if linger and len(d.ready.items) < more:
                            await asyncio.sleep(linger)
                            more = d.batch_size() - 1 if d.batch is not None else 0
                        seqs += d.ready.get_more(more)
                try:
                    if len(seqs) == 1:
                        await self._forward(d, seqs[0])
                    else:
                        await self._forward_batch(d, seqs)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug: keep the worker alive, try the messages again later
                    log.exception("forwarder: unexpected error sending record(s) %s to %s", seqs[:5], d.name)
                    for seq in seqs:
                        self.schedule(seq, d.name, now_ms() + 5000)
                finally:
                    d.busy -= 1
            finally:
                window.release()

    async def _prepare(self, d: _Destination, seq: int) -> _Outgoing | None:
        """The record *seq* ready to send, or None: gone already (a duplicate schedule, or moved
        by `gwcore retry`), or expired (then removed here)."""
        value = d.cache.pop(seq, None)
        if value is None:
            value = self._read_ahead(d, seq)
        if value is None:
            return None
        out, expiry_ms = _outgoing(seq, value)
        if expiry_ms and expiry_ms < now_ms():
            await self._expire(d, out)
            return None
        return out

    async def _expire(self, d: _Destination, out: _Outgoing) -> None:
        log.info("message %s to %s expired (TimeToBeReceived) before it could be sent; discarded", out.msg_id, d.name)
        self.expired += 1
        seq = out.seq
        await self._commit(seq, d, lambda txn: txn.delete(pack_seq(seq), db=self.store.outgoing))

    async def _forward(self, d: _Destination, seq: int) -> None:
        out = await self._prepare(d, seq)
        if out is not None:
            await self._send_one(d, out)

    async def _send_one(self, d: _Destination, out: _Outgoing) -> None:
        """One message in a request of its own (its databus parts first), as NServiceBus sends."""
        msg_id, body, block = out.msg_id, out.body, out.block
        parts: list[tuple[bytes, FileBody]] = []
        problem = ""
        if _DATABUS in out.value:
            parts, problem = await self._databus_parts(d, out.framed, block, msg_id)
        if d.site is not None and d.site.secret:
            block += self._signature(d, block, auth.body_digest(body))
        d.in_flight += 1
        started = time.perf_counter()
        try:
            if problem:
                status = _BLOB_MISSING
            else:
                status, problem = await self._send_all(d, msg_id, parts, block, body)
        except SendError as exc:
            status, problem = 0, str(exc)
        finally:
            d.in_flight -= 1
        if status != _BLOB_MISSING:
            d.answered(status, started)
        if status == 503 and d.batch is not None and self._held_back(d, [out.seq], problem):
            return
        await self._outcome(d, out, status, problem)

    def _held_back(self, d: _Destination, seqs: list[int], problem: str) -> bool:
        """A gwcore receiver (one that takes batches) refused *seqs* 503: back-pressure. They are
        scheduled again after a back-off without counting an attempt, unless the receiver has
        refused everything for too long (then False: they count as failed)."""
        wait = d.hold_back(len(seqs))
        if wait is None:
            return False
        log.debug("%d message(s) to %s refused (%s): sent again in %g s", len(seqs), d.name, problem, wait)
        due = now_ms() + int(wait * 1000)
        for seq in seqs:
            self.schedule(seq, d.name, due)
        return True

    async def _forward_batch(self, d: _Destination, seqs: list[int]) -> None:
        """Several due messages: those with databus properties one by one (parts first), the
        others in batches within the receiver's limits, each message's answer handled as its own
        request's would be. The core frames a whole batch from the stored records in one call
        (``encode_outgoing_batch``); Python sees each message only when it is not simply sent."""
        assert d.batch is not None
        limits = d.batch
        records = self._read_many(d, seqs)
        while records:
            body, kinds = core.encode_outgoing_batch([value for _seq, value in records], _DATABUS, time_sent(),
                                                     now_ms(), limits.messages, limits.bytes)
            if kinds.count(core.OUT_IN_BATCH) == len(records):
                batch, records = records, []
            else:
                batch, left = [], []
                for record, kind in zip(records, kinds):
                    if kind == core.OUT_IN_BATCH:
                        batch.append(record)
                    elif kind == core.OUT_LEFT:
                        left.append(record)
                    elif kind == core.OUT_EXPIRED:
                        await self._expire(d, _outgoing(*record)[0])
                    else:  # a databus property (parts first), or too big for any batch of d's
                        await self._send_one(d, _outgoing(*record)[0])
                records = left
            if len(batch) == 1:
                await self._send_one(d, _outgoing(*batch[0])[0])
            elif batch:
                assert body is not None
                await self._send_batch(d, batch, body)

    def _read_many(self, d: _Destination, seqs: list[int]) -> list[tuple[int, bytes]]:
        """``(seq, record)`` of those of *seqs* still there, in one read transaction."""
        cache = d.cache
        store = self.store
        db = store.outgoing
        pack = pack_seq
        out = []
        with store.resize_lock, store.env.begin() as txn:
            get = txn.get
            for seq in seqs:
                value = cache.pop(seq, None) if cache else None
                if value is None:
                    value = get(pack(seq), db=db)
                if value is not None:
                    out.append((seq, value))
        return out

    async def _send_batch(self, d: _Destination, batch: list[tuple[int, bytes]], body: bytes) -> None:
        """*body*: the batch of the records *batch* (``(seq, record)`` each)."""
        block = _BATCH_LINES
        if d.site is not None and d.site.secret:
            block += self._signature(d, block, auth.body_digest(body))
        d.in_flight += len(batch)
        started = time.perf_counter()
        try:
            response = await d.client.post_block(block, body)
            status, problem = response.status, f"{response.status} {response.reason}"
        except SendError as exc:
            response, status, problem = None, 0, str(exc)
        finally:
            d.in_flight -= len(batch)
        d.answered(status, started)
        results = _batch_results(response, len(batch)) if status == 200 else None
        if status == 200 and results is None:
            status, problem = 502, "502 the batch's answer does not list one outcome per message"
        if results is not None:
            d.batches += 1
            if not results:  # every message accepted
                self._delivered_all(d, [seq for seq, _value in batch])
                return
            await self._outcomes(d, [(seq, value, one_status, f"{one_status} {reason}")
                                     for (seq, value), (one_status, reason) in zip(batch, results)])
            return
        if status in (400, 404, 405, 413, 415, 501):
            # The receiver does not take this batch as a batch (no longer a gwcore receiver with
            # batches, or other limits now): one message per request until it says so again.
            log.warning("batch of %d messages to %s refused (%s): sending them one per request", len(batch), d.name,
                        problem)
            d.batch = None
            d.batch_refused_until = time.monotonic() + _BATCH_RETRY_AFTER
            for record in batch:
                await self._send_one(d, _outgoing(*record)[0])
            return
        if status == 503 and self._held_back(d, [seq for seq, _value in batch], problem):
            return
        # the whole batch failed: each message as if its own request had
        await self._outcomes(d, [(seq, value, status, problem) for seq, value in batch])

    async def _outcome(self, d: _Destination, out: _Outgoing, status: int, problem: str) -> None:
        await self._outcomes(d, [(out.seq, out.value, status, problem)])

    def _delivered_all(self, d: _Destination, seqs: list[int]) -> None:
        """*seqs* were accepted: their records go, with those of every message delivered in this
        loop turn, as one writer job."""
        d.sent += len(seqs)
        self.sent += len(seqs)
        if not self._delivered:
            asyncio.get_running_loop().call_soon(self._flush_delivered)
        self._delivered += seqs

    async def _outcomes(self, d: _Destination, answers: list[tuple[int, bytes, int, str]]) -> None:
        """What each message's answer (``(seq, record, status, problem)``) means: delivered (its
        record goes), a retry later, or the outgoing error queue. The records of the failed ones
        change in one writer job."""
        changes: list[tuple[int, bytes, bool]] = []  # (seq, new record, to the error queue)
        retries: list[tuple[int, int]] = []
        for seq, value, status, problem in answers:
            if status == 200:
                self._delivered_all(d, [seq])
                continue
            d.failed_attempts += 1
            rec = decode_outgoing(value)
            rec.attempt += 1
            rec.last_error = problem
            if status in PERMANENT_STATUSES or status == _BLOB_MISSING or rec.attempt > self.settings.retries:
                why = "refused for good" if status in PERMANENT_STATUSES else f"failed {rec.attempt} times"
                log.warning("message %s to %s %s (%s): moved to the outgoing error queue", record_id(rec), d.name,
                            why, problem)
                self.failed += 1
                changes.append((seq, encode_failed(now_ms(), rec), True))
                continue
            delay = self.settings.retry_delay(rec.attempt)
            rec.next_ms = now_ms() + int(delay * 1000)
            log.info("message %s to %s failed (%s); retry %d of %d in %g s", record_id(rec), d.name, problem,
                     rec.attempt, self.settings.retries, delay)
            self.retried += 1
            d.retried += 1
            changes.append((seq, encode_outgoing(rec), False))
            retries.append((seq, rec.next_ms))
        if not changes:
            return
        store = self.store

        def record(txn: Any) -> None:
            for seq, value, failed in changes:
                key = pack_seq(seq)
                if failed:
                    txn.put(key, value, db=store.outgoing_errors)
                    txn.delete(key, db=store.outgoing)
                else:
                    txn.put(key, value, db=store.outgoing)

        if await self._commit([seq for seq, _v, _f in changes], d, record):
            for seq, due in retries:
                self.schedule(seq, d.name, due)

    def _learn(self, d: _Destination, response: Any) -> None:
        """A 200 from *d*: whether it takes batches, and within which limits."""
        if d.batch is None and self.settings.send_batch and time.monotonic() >= d.batch_refused_until:
            d.batch = advertised(response.headers)

    def _signature(self, d: _Destination, block: bytes, sha256: str) -> bytes:
        """The lines that sign a request of the header lines *block* and a body of SHA-256
        *sha256* (base64): its ``Content-Digest``, ``gwcore-Date`` and a scheme v2
        ``gwcore-Signature`` over both and every ``NServiceBus.*`` header (gwcore/auth.py)."""
        assert d.site is not None and d.site.secret
        return auth.signature_lines(d.site.secret, d.site.key_id or self.settings.endpoint, "POST",
                                    d.client.target, block, sha256)

    async def _databus_parts(self, d: _Destination, framed: memoryview, block: bytes,
                             msg_id: str) -> tuple[list[tuple[bytes, FileBody]], str]:
        """One ``SingleCallDatabusProperty`` request per databus header, as NServiceBus's
        forwarder makes them (protocol.md §1.4): the submit's header lines, then the
        ``DataBusKey`` (the mapped header name), the call type and the blob's own Content-MD5,
        plus its SHA-256 as an RFC 9530 ``Content-Digest`` (docs/databus.md).
        Returns ``(parts, "")``, or ``([], why)`` when a blob is gone."""
        headers = core.decode_envelope(framed)[1]
        head = block[:block.rindex(_SUBMIT_TAIL)]
        parts = []
        for name, value in headers.items():
            if databus.DATABUS_PREFIX not in name:
                continue
            info = databus.blob_info(self.store, value)
            path = os.path.join(self.store.blob_dir, value)
            if info is None or not os.path.exists(path):
                return [], (f"databus property {name}: its blob {value!r} is no longer in the blob store "
                            "(expired, GWCORE_DATABUS_TTL)")
            lines = (head + b"NServiceBus.Gateway.DataBusKey: " + _enc(_HEADER_PREFIX + name) + b"\r\n"
                     + _SUBMIT_TAIL + b"NServiceBus.CallType: SingleCallDatabusProperty\r\n")
            if info.md5:  # unknown for a blob received without one (then sent without one)
                lines += b"Content-MD5: " + _enc(info.md5) + b"\r\n"
            # A gwcore receiver checks the Content-Digest instead of the MD5 (SHA-256 is the faster
            # of the two on CPUs with SHA extensions); NServiceBus ignores it and checks the MD5.
            if d.site is not None and d.site.secret:
                # signed: the signature covers the digest, so the receiver checks it at the head
                sha256 = info.sha256 or await asyncio.to_thread(_file_sha256, path)
                lines += self._signature(d, lines, sha256)
            elif info.sha256:
                lines += b"Content-Digest: " + _enc(databus.content_digest(info.sha256)) + b"\r\n"
            parts.append((lines, FileBody(path, info.size)))
        return parts, ""

    async def _send_all(self, d: _Destination, msg_id: str, parts: list[tuple[bytes, FileBody]],
                        block: bytes, body: bytes) -> tuple[int, str]:
        """The parts, then the submit; ``(status, problem)`` of the first answer that is not 200.

        A 412 to the submit after every part was answered 200 means the parts did not reach the
        node that got the submit (a restart without them, a failover to another node): the parts
        and the submit go again at once, once, instead of after the next retry delay
        (docs/databus.md)."""
        for again in (False, True):
            for lines, blob in parts:
                response = await d.client.post_block(lines, blob)
                if response.status != 200:
                    return response.status, f"{response.status} {response.reason} (databus property)"
            response = await d.client.post_block(block, body)
            if response.status == 200:
                self._learn(d, response)
            if response.status == 412 and parts and not again:
                log.info("message %s to %s: the submit found its databus properties missing (412); "
                         "sending them again now", msg_id, d.name)
                continue
            break
        return response.status, f"{response.status} {response.reason}"

    def _read_ahead(self, d: _Destination, seq: int) -> bytes | None:
        """Read *seq* and the next due records of *d* in one read transaction; the others wait in
        ``d.cache`` for the workers that take them."""
        upcoming = list(itertools.islice(d.ready.items, _READ_AHEAD))
        store = self.store
        with store.resize_lock, store.env.begin() as txn:
            value = txn.get(pack_seq(seq), db=store.outgoing)
            for other in upcoming:
                if other not in d.cache:
                    found = txn.get(pack_seq(other), db=store.outgoing)
                    if found is not None:
                        d.cache[other] = found
        return value

    def _flush_delivered(self) -> None:
        seqs, self._delivered = self._delivered, []
        if not seqs:
            return
        outgoing = self.store.outgoing

        def remove(txn: Any) -> None:
            for seq in seqs:
                txn.delete(pack_seq(seq), db=outgoing)

        fut = self.writer.call(remove)
        self._removals.add(fut)
        fut.add_done_callback(functools.partial(self._removed, seqs))

    def _removed(self, seqs: list[int], fut: asyncio.Future) -> None:
        self._removals.discard(fut)
        exc = fut.exception() if not fut.cancelled() else None
        if exc is not None:
            # The sites have these messages; the records stay and go again later (duplicates there).
            log.error("forwarder: cannot remove %d delivered records: %s; they will be sent again", len(seqs), exc)

    async def _commit(self, seqs: int | list[int], d: _Destination, job: Callable[[Any], Any]) -> bool:
        try:
            await self.writer.call(job)
            return True
        except StoreError as exc:
            # The send happened; the records stay and are sent again later (duplicates there).
            seqs = [seqs] if isinstance(seqs, int) else seqs
            log.error("forwarder: cannot record the outcome for %d record(s) to %s (first %d): %s; will resend",
                      len(seqs), d.name, seqs[0], exc)
            for seq in seqs:
                self.schedule(seq, d.name, now_ms() + 5000)
            return False

    def metrics(self) -> Families:
        """The forwarder's counts, and per configured site its requests in flight, deliveries,
        failed attempts, retries and request times. Every destination that is not a configured
        site (a reply address a remote sender chose) is summed under ``site="other"``, so a sender
        cannot add a series per address."""
        rows: dict[str, list[Any]] = {}
        if self._closed_replies is not None:
            rows[OTHER_SITE] = _metrics_row(self._closed_replies)
        for d in self._dests.values():
            site = d.site.key if d.site is not None else OTHER_SITE
            row = rows.get(site)
            if row is None:
                row = rows[site] = _metrics_row()
            _count_into(row, d)
        per_site = sorted(rows.items())

        def site_family(kind: Any, name: str, help_text: str, column: int) -> Any:
            return kind(name, help_text, labels=("site",), samples=[((site,), row[column]) for site, row in per_site])

        return [
            counter("gwcore_outgoing_sent_total", "Messages a site answered 200 (removed from the outgoing queue).",
                    self.sent),
            counter("gwcore_outgoing_retries_total", "Failed send attempts scheduled for a retry.", self.retried),
            counter("gwcore_outgoing_failed_total", "Messages moved to the outgoing error queue.", self.failed),
            counter("gwcore_outgoing_expired_total", "Outgoing messages discarded after their TimeToBeReceived.",
                    self.expired),
            gauge("gwcore_outgoing_reply_destinations", "Reply destinations that are not configured sites, open now "
                  "(at most GWCORE_REPLY_DESTINATIONS_MAX).", self._replies_open()),
            counter("gwcore_outgoing_replies_deferred_total",
                    "Times a message to a new reply destination waited because GWCORE_REPLY_DESTINATIONS_MAX were open.",
                    self.replies_deferred),
            site_family(gauge, "gwcore_outgoing_in_flight", "Messages being sent, per destination site.", 0),
            site_family(counter, "gwcore_outgoing_site_sent_total", "Messages delivered, per destination site.", 1),
            site_family(counter, "gwcore_outgoing_site_failures_total",
                        "Failed send attempts (an answer other than 200, or no answer), per destination site.", 2),
            site_family(counter, "gwcore_outgoing_site_retries_total",
                        "Failed attempts scheduled for a retry, per destination site.", 3),
            site_family(counter, "gwcore_outgoing_site_held_back_total",
                        "Messages of batches a site refused 503 (back-pressure), sent again after a back-off "
                        "without counting an attempt, per destination site.", 5),
            histogram("gwcore_outgoing_request_seconds",
                      "Time of one request to a site (a message, with its databus parts, or a batch), from writing "
                      "it to its answer, per destination site.", labels=("site",),
                      samples=[((site,), row[4]) for site, row in per_site]),
        ]
