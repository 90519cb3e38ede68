"""gwcore's compiled core: framing of NServiceBus Gateway HTTP requests, the stored envelope format
and the LMDB dedup batch loop. Private module; the gwcore package re-exports what users need."""

from typing import Any, Callable, Final

from typing_extensions import Buffer, disjoint_base

CALL_SUBMIT: Final[int]
"""``NServiceBus.CallType`` ``SingleCallSubmit`` (enum value 0)."""
CALL_DATABUS: Final[int]
"""``NServiceBus.CallType`` ``SingleCallDatabusProperty`` (enum value 1)."""
DEBUG_BUILD: Final[bool]
"""True when the extension was built with ``GWCORE_DEBUG=1``."""

def url_decode(data: Buffer) -> str:
    """Decode raw header bytes like .NET ``System.Net.WebUtility.UrlDecode``.

    ``+`` becomes a space and ``%XX`` (either hex case) a byte; a ``%`` not followed by two hex
    digits stays literal. Other bytes, non-ASCII ones included, pass through. The result is
    decoded as UTF-8 with invalid sequences replaced by U+FFFD. There is no ``%uXXXX`` form.
    """

def url_encode(text: str) -> str:
    """Encode like .NET ``WebUtility.UrlEncode`` (Gateway 4.x and later senders).

    UTF-8; ``A-Z a-z 0-9 - _ . ! * ( )`` stay as they are, a space becomes ``+``, every other
    byte ``%XX`` with upper-case hex (``~`` too). Lone surrogates become U+FFFD, as in .NET.
    """

def content_md5(body: Buffer) -> str:
    """``Content-MD5`` value of *body*: standard, padded base64 of its MD5 digest.

    ``content_md5(b"myData") == "4HJGsZlkhfKtZTbdlkaTgw=="``
    """

def parse_timespan(text: str) -> int | None:
    """Parse a .NET ``TimeSpan`` string (``TimeSpan.TryParse``, invariant culture).

    Accepted, with optional surrounding whitespace and an optional leading ``-``: ``d``,
    ``hh:mm``, ``hh:mm:ss``, ``d.hh:mm``, ``d.hh:mm:ss``, ``d:hh:mm:ss``, and each form with
    seconds followed by ``.f`` to ``.fffffff``. Hours 0-23, minutes and seconds 0-59, at most
    ``TimeSpan.MaxValue`` (``10675199.02:48:05.4775807``).

    :return: whole milliseconds (sub-millisecond parts are truncated towards zero), or None
        when *text* is not such a value.
    """

def pack_seq(seq: int) -> bytes:
    """Queue sequence number as an 8-byte big-endian key (sorts in numeric order).

    :raises OverflowError: *seq* is negative or does not fit 64 bits.
    """

def unpack_seq(data: Buffer) -> int:
    """Inverse of :func:`pack_seq`.

    :raises gwcore.errors.FramingError: *data* is not 8 bytes long.
    """

def encode_envelope(
    id: str,
    headers: list[tuple[str, str]] | dict[str, str],
    body: Buffer,
    expiry_ms: int,
    accepted_ms: int,
) -> bytes:
    """Build the stored form of a message (envelope format v1).

    Layout: ``b"GW"``, version byte 1, u64 ``accepted_ms``, u64 ``expiry_ms``, u32 length + id,
    u32 header count, per header u32 length + name and u32 length + value, u64 length + body.
    Integers are big-endian, text is UTF-8. Headers are written in the order given, repeats
    included (decoding keeps the last).

    :raises gwcore.errors.FramingError: a string is longer than 4 GiB.
    """

def decode_envelope(framed: Buffer) -> tuple[str, dict[str, str], bytes, int, int]:
    """Parse an envelope made by :func:`encode_envelope`.

    :return: ``(id, headers, body, expiry_ms, accepted_ms)``; for a repeated header name the
        later value wins.
    :raises gwcore.errors.FramingError: the input is truncated, has trailing bytes, invalid
        UTF-8, a bad magic or an unknown version. Never reads past the input.
    """

def encode_take(records: list[tuple[int, int, int, bytes, bytes]], stop: bool) -> bytes:
    """A distributor's take answer to a worker: ``records`` of ``(seq, attempt, delivery_count,
    envelope, extra)``, each envelope as the store holds it (:func:`encode_envelope`), *extra* a
    record's JSON side facts (its databus blobs) or ``b""``.

    Layout: ``b"GT"``, version ``1``, flags (``1``: stop), u32 record count; per record u64 seq,
    u32 attempt, u32 delivery count, u32 length + envelope, u32 length + extra; all big-endian.
    """

def decode_take(data: Buffer) -> tuple[bool, list[tuple[int, int, int, str, dict[str, str], bytes, int, bytes]]]:
    """Parse a take answer made by :func:`encode_take`.

    :return: ``(stop, [(seq, attempt, delivery_count, id, headers, body, expiry_ms, extra)])``.
    :raises gwcore.errors.FramingError: truncated, trailing bytes, a bad magic, version or flags,
        a record count the bytes cannot hold, or a damaged envelope. Never reads past the input.
    """

@disjoint_base
class Envelope:
    """A message accepted by :meth:`Framer.frame`, ready to be stored."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        """Always raises TypeError: envelopes are made only by :meth:`Framer.frame`, which keeps
        :attr:`key` and :attr:`framed` consistent with the other fields."""
    @property
    def id(self) -> str:
        """The decoded ``NServiceBus.Id``."""
    @property
    def key(self) -> bytes:
        """Dedup key: the framer's scope (UTF-8), ``b"\\x00"``, the id (UTF-8)."""
    @property
    def call_type(self) -> int:
        """:data:`CALL_SUBMIT` or :data:`CALL_DATABUS`."""
    @property
    def expiry_ms(self) -> int:
        """Absolute expiry in ms since the epoch (from ``NServiceBus.TimeToBeReceived``); 0 = never."""
    @property
    def accepted_ms(self) -> int:
        """The ``now_ms`` given to :meth:`Framer.frame`."""
    @property
    def headers(self) -> dict[str, str]:
        """The message headers that are stored, decoded from :attr:`framed` on first access (the
        framer itself never builds this dict). Do not mutate: :attr:`framed` is already built."""
    @property
    def body(self) -> bytes:
        """The message body (owned bytes)."""
    @property
    def framed(self) -> bytes:
        """``encode_envelope(id, headers, body, expiry_ms, accepted_ms)``."""
    @property
    def callback(self) -> str | None:
        """The JSONP ``callback`` query parameter (only when the framer parses queries)."""
    @property
    def auth_date(self) -> str | None:
        """The (URL-decoded) ``gwcore-Date`` header, found like the control headers (ignoring
        ASCII case); None when absent or when the framer was made without ``signatures``."""
    @property
    def auth_signature(self) -> str | None:
        """The ``gwcore-Signature`` header, as :attr:`auth_date`."""
    @property
    def method(self) -> str | None:
        """The request method, set by :class:`RequestParser` when :attr:`auth_signature` is not
        None (a signature covers it); otherwise None."""
    @property
    def target(self) -> str | None:
        """The request target exactly as received (path and query), set like :attr:`method`."""
    @property
    def auth_headers(self) -> bytes | None:
        """A request with a scheme v2 ``gwcore-Signature`` (``v2.…``), framed with
        ``signatures``: the header lines its signature covers (:func:`signing_headers` of the
        request's headers as received, before any query string applies); None otherwise."""
    @property
    def databus_key(self) -> str | None:
        """A ``SingleCallDatabusProperty`` part (:attr:`call_type` :data:`CALL_DATABUS`): the
        decoded ``NServiceBus.Gateway.DataBusKey``; None for a submit."""
    @property
    def content_md5(self) -> str | None:
        """A part: the decoded ``Content-MD5`` to verify its blob against once it is on disk
        (None when absent or for a submit). A part framed with its body was verified already."""
    @property
    def content_digest(self) -> str | None:
        """A part, or a submit with a ``gwcore-Signature`` framed with ``signatures``: the
        decoded ``Content-Digest`` (RFC 9530; gwcore senders add ``sha-256=:…:``); None when
        absent, and for any other submit."""
    @property
    def databus(self) -> tuple[tuple[str, str | None], ...] | None:
        """A submit: one ``(request header name, stored header name or None)`` pair per
        ``NServiceBus.DataBus.*`` header (the part is found by the request name; the stored
        header, if the message keeps one, gets the local blob key); empty when none."""
    def with_framed(self, framed: bytes) -> Envelope:
        """A copy with another :attr:`framed` (the writer's rewrite of databus header values)."""

@disjoint_base
class Batch:
    """A gwcore batch request (``gwcore-Batch`` header), framed no further: its messages are
    framed by :meth:`Framer.frame_batch` once its signature and limits hold."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        """Always raises TypeError: batches are made only by :meth:`Framer.frame`."""
    @property
    def version(self) -> str:
        """The ``gwcore-Batch`` header's value (``"1"``)."""
    @property
    def body(self) -> bytes: ...
    @property
    def id(self) -> str:
        """Always ``""`` (what a signature check reads for a request's id)."""
    @property
    def callback(self) -> None: ...
    @property
    def auth_date(self) -> str | None: ...
    @property
    def auth_signature(self) -> str | None: ...
    @property
    def method(self) -> str | None: ...
    @property
    def target(self) -> str | None: ...
    @property
    def auth_headers(self) -> bytes | None: ...
    @property
    def content_digest(self) -> str | None: ...

def encode_batch(messages: list[tuple[bytes, bytes]]) -> bytes:
    """A batch body of ``(header block, body)`` messages: ``b"GB"``, version ``1``, flags ``0``,
    u32 count; per message u32 length + the block (``Name: value\r\n`` lines, as the message's
    own request carries them), u64 length + the body; all big-endian."""

@disjoint_base
class Rejection:
    """A request the framer refused: answer it with ``status`` and ``reason``."""

    def __init__(self, status: int, reason: str, callback: str | None = None) -> None:
        """:param reason: cleaned to ASCII (non-ASCII and control characters become ``?``) and
        cut to 512 characters, since it is sent as the HTTP reason phrase."""
    @property
    def status(self) -> int:
        """HTTP status code."""
    @property
    def reason(self) -> str:
        """Reason phrase, also the response body."""
    @property
    def callback(self) -> str | None:
        """The JSONP ``callback`` query parameter, if any."""
    @property
    def id(self) -> str | None:
        """The decoded ``NServiceBus.Id`` when the framer has ``signatures`` on and refused the
        request after reading the id (so a receiver that requires signatures can check the
        signature first and answer 401 instead); otherwise None."""
    @property
    def body(self) -> bytes | None:
        """The request body, set together with :attr:`id`."""
    @property
    def auth_date(self) -> str | None:
        """As :attr:`Envelope.auth_date`, set together with :attr:`id`."""
    @property
    def auth_signature(self) -> str | None:
        """As :attr:`Envelope.auth_signature`, set together with :attr:`id`."""
    @property
    def method(self) -> str | None:
        """As :attr:`Envelope.method`."""
    @property
    def target(self) -> str | None:
        """As :attr:`Envelope.target`."""
    @property
    def auth_headers(self) -> bytes | None:
        """As :attr:`Envelope.auth_headers`, set together with :attr:`id` for a signed request."""
    @property
    def content_digest(self) -> str | None:
        """The decoded ``Content-Digest``, set together with :attr:`auth_headers`."""

@disjoint_base
class Framer:
    """Turns one gateway HTTP request into an :class:`Envelope` or a :class:`Rejection`.

    Follows the NServiceBus Gateway receiver (``HttpChannelReceiver`` and
    ``SingleCallChannelReceiver``), with these deliberate differences: a header that appears
    twice (after decoding, ignoring ASCII case) is a 400 instead of a 502; the
    ``NServiceBus.Header.`` prefix of message headers is matched ignoring case, so headers a
    proxy lower-cased are kept rather than dropped; ``SingleCallDatabusProperty`` is answered
    501 for now. A framer is not thread-safe: use it from one thread (the event loop).
    """

    def __init__(
        self, scope: str, *, max_id_bytes: int = 400, parse_query: bool = False, signatures: bool = False
    ) -> None:
        """
        :param scope: dedup scope, the receiving site or endpoint name; it prefixes every
            :attr:`Envelope.key`, so one store can serve several endpoints.
        :param max_id_bytes: longest accepted ``NServiceBus.Id``, in UTF-8 bytes.
        :param parse_query: honour query-string parameters (GET/JSONP clients): each overrides
            the header of the same name, ``Message`` replaces the body, ``callback`` is kept.
        :param signatures: also find ``gwcore-Date`` and ``gwcore-Signature`` (request signing,
            ``gwcore.auth``) and keep them on the envelope, and give rejections decided after
            the id was read the fields a signature check needs; for a ``v2.`` signature also
            build the header lines it covers (:attr:`Envelope.auth_headers`) and keep the
            ``Content-Digest``. Off, the framer does no work for them. These headers are not message headers: a gateway message drops them like
            every header outside ``NServiceBus.Header.*``.
        :raises gwcore.errors.ConfigurationError: *scope* contains NUL or is not encodable, or
            *max_id_bytes* is not positive.
        """
    @property
    def scope(self) -> str: ...
    @property
    def max_id_bytes(self) -> int: ...
    @property
    def parse_query(self) -> bool: ...
    @property
    def signatures(self) -> bool: ...
    @property
    def framed_total(self) -> int:
        """Requests turned into envelopes."""
    @property
    def rejected_total(self) -> int:
        """Requests rejected."""
    def frame(
        self, headers: list[bytes] | list[Buffer], body: Buffer, query: Buffer | None, now_ms: int
    ) -> Envelope | Rejection | Batch:
        """Validate one request and build its envelope (a :class:`Batch` when the request has a
        ``gwcore-Batch`` header: its messages are framed by :meth:`frame_batch`).

        :param headers: flat ``[name0, value0, name1, value1, ...]`` of the raw header bytes as
            an HTTP parser delivered them (still URL-encoded).
        :param body: the request body.
        :param query: the raw query string without ``?``, or None; ignored unless the framer
            was made with ``parse_query=True``.
        :param now_ms: current time in ms since the epoch; becomes ``accepted_ms`` and the base
            of ``expiry_ms``.
        :return: a :class:`Rejection` (400 missing/invalid/duplicate headers or an id too long,
            412 MD5 mismatch or claim-check parts missing, 501 databus call, 502 gateway message
            without ``NServiceBus.CorrelationId``) or an :class:`Envelope`. Gateway messages
            (``NServiceBus.Gateway`` present) keep the ``NServiceBus.Header.*`` headers without
            the prefix plus the top-level ``NServiceBus.CorrelationId``, and expire after their
            ``NServiceBus.TimeToBeReceived`` (at least 1 s); other messages keep every header.
        :raises gwcore.errors.InternalError: *headers* has an odd length.
        """
    def frame_batch(
        self, body: bytes, now_ms: int, max_messages: int, *, max_headers: int, max_header_bytes: int
    ) -> list[Envelope | Rejection]:
        """The messages of a batch body (:func:`encode_batch`'s layout), each framed as its own
        request would be by :meth:`frame`, in order; a message that is not a ``SingleCallSubmit``
        (a databus part, a batch) is a 400 :class:`Rejection` of its own, and one with more than
        *max_headers* header lines (``GWCORE_HTTP_MAX_HEADERS``) or a header block of more than
        *max_header_bytes* bytes (``GWCORE_HTTP_MAX_HEADER_BYTES``) a 431 :class:`Rejection` with
        :class:`RequestParser`'s reason for such a request.

        :raises gwcore.errors.FramingError: not one whole batch (truncated, trailing bytes, bad
            magic, version or flags, a count the bytes cannot hold, a header line that is not
            ``name: value`` CRLF).
        :raises ValueError: more than *max_messages* messages.
        """

@disjoint_base
class DedupIndex:
    """Atomic check-and-record of dedup keys: an append-only dedup log in LMDB plus a hash table of
    every live record in memory.

    Layout: the log maps :func:`pack_seq` (seq) -> u64 accepted_ms + :attr:`Envelope.key`; the
    queue maps :func:`pack_seq` (seq) -> :attr:`Envelope.framed`. Both keys only grow, so a batch
    appends to the right edge of two trees whatever the store's size. The table maps the keyed
    SipHash-1-3 of a key to its seq; a hash match is confirmed against the key in the log, so a
    collision is never a false duplicate. 16 bytes per slot, load at most 3/4.

    The caller owns the transaction: after it commits call :meth:`commit`, after an abort call
    :meth:`rollback` so the table forgets what the aborted batches added. lmdb exceptions
    (``MapFullError`` ...) propagate unchanged. Not thread-safe beyond the GIL: one writer thread;
    other threads may call the read-only methods.
    """

    def __init__(self, key: bytes | None = None) -> None:
        """:param key: 16-byte SipHash key; random (``os.urandom``) by default."""
    def __len__(self) -> int:
        """Records in the table."""
    @property
    def capacity(self) -> int:
        """Slots in the table (a power of two)."""
    @property
    def memory_bytes(self) -> int:
        """Bytes the table (and its undo list) holds."""
    @property
    def new_total(self) -> int:
        """Envelopes recorded as new (counted when a batch completes without error)."""
    @property
    def duplicate_total(self) -> int:
        """Envelopes found already recorded."""
    @property
    def expired_total(self) -> int:
        """Dedup records removed by :meth:`expire`."""
    def load(
        self, txn: object, log_db: object, progress: Callable[[int, int], object] | None = None, every: int = 1000000
    ) -> int:
        """Add every record of the log to the table (start-up); ``progress(done, total)`` is called
        every *every* records. Returns the number loaded.

        :raises gwcore.errors.FramingError: a log entry is malformed (corrupt store).
        """
    def apply_batch(
        self,
        txn: object,
        log_db: object,
        queue_db: object,
        envelopes: list[Envelope],
        accepted_ms: int,
        next_seq: int,
    ) -> tuple[list[bool], int]:
        """Record each envelope's key unless present, and queue the new ones.

        :return: ``(results, next_seq)``: True per new envelope (stored under the next sequence
            number), False per duplicate, including a repeat of a key earlier in the same batch.
        :raises ValueError: *next_seq* is 0 or beyond 2**62.
        :raises gwcore.errors.InternalError: a sequence number is not above the last one in the log
            or the queue (nothing is overwritten).
        """
    def commit(self) -> None:
        """The transaction holding the batches applied since the last commit/rollback committed."""
    def rollback(self) -> int:
        """That transaction aborted: remove what it added from the table; returns how many."""
    def check_batch(self, txn: object, log_db: object, envelopes: list[Envelope]) -> list[bool]:
        """True per envelope whose key is recorded (as of *txn*). Read-only."""
    def contains(self, txn: object, log_db: object, key: bytes) -> bool:
        """Is this dedup key (scope, NUL, id; UTF-8) recorded (as of *txn*)? Read-only."""
    def expire(self, txn: object, log_db: object, cutoff_ms: int, limit: int) -> int:
        """Remove up to *limit* records accepted before *cutoff_ms* from the front of the log and
        from the table. The log is in acceptance order, so the first younger record ends the walk.

        :return: the number of records removed.
        :raises gwcore.errors.FramingError: a log entry is malformed (corrupt store).
        """

def encode_submit(framed: Buffer, extra: list[tuple[str, str]] | None = None) -> tuple[str, bytes, int, bytes]:
    """The HTTP header block NServiceBus's forwarder sends for a stored envelope (protocol.md
    §1.3): ``NServiceBus.Id``, ``NServiceBus.CorrelationId`` (the header, else the id),
    ``NServiceBus.TimeToBeReceived`` and ``NServiceBus.ReplyToAddress`` when present, every
    message header as ``NServiceBus.Header.<name>``, ``NServiceBus.Gateway: True``,
    ``NServiceBus.CallType: SingleCallSubmit`` and ``Content-MD5``; names and values URL-encoded
    with the .NET rules (upper-case hex); each line ends with CRLF.

    :param extra: headers to add (or to replace a stored one of the same name), e.g. the retry
        counters.
    :return: ``(message id, body, expiry_ms, header block)``; the same lines as
        ``gwcore.egress.wire_headers`` gives.
    :raises gwcore.errors.FramingError: *framed* is not a valid envelope.
    """

def batch_count(body: bytes) -> int:
    """The message count a batch body's preamble states (0 when it is not a batch's preamble),
    read without framing anything: what a receiver checks its queue room against first."""

def outgoing_layout(value: Buffer) -> tuple[int, int, int, int]:
    """``(next attempt ms, failed attempts, destination length, envelope offset)`` of an outgoing
    record (its layout: gwcore/egress.py's module docstring).

    :raises gwcore.errors.FramingError: *value* is shorter than its own lengths say.
    """

#: What :func:`encode_outgoing_batch` says of each record.
OUT_IN_BATCH: int  # in the batch
OUT_EXPIRED: int  # its TimeToBeReceived has passed: not sent
OUT_ALONE: int  # holds the *alone* bytes (a databus property): goes in a request of its own
OUT_LEFT: int  # no room left in this batch: for the next one
OUT_TOO_BIG: int  # larger than *max_bytes* by itself: goes in a request of its own

def encode_outgoing_batch(values: list[bytes], alone: bytes, retried_at: str, now_ms: int,
                          max_messages: int, max_bytes: int) -> tuple[bytes | None, bytes]:
    """Outgoing records straight to a batch body (:func:`encode_batch`'s layout), in one call:
    each record's envelope framed as :func:`encode_submit` frames it, a record that failed
    before with ``NServiceBus.Retries`` (its failed attempts) and
    ``NServiceBus.Retries.Timestamp`` (*retried_at*). At most *max_messages* messages and
    *max_bytes* bytes of batch body.

    :return: ``(body, kinds)``: the batch body (None when no record went in) and, per record in
        order, one byte saying what became of it (``OUT_*``).
    :raises gwcore.errors.FramingError: a record or its envelope is damaged.
    """

def encode_publishes(items: list[tuple[bytes, bool]], channel: int, max_content: int, input_queue: bytes,
                     instance_prefix: bytes, *, mandatory: bool = False,
                     ids: list[str | None] | None = None) -> tuple[bytes, list[int]]:
    """The AMQP 0-9-1 frames of one ``basic.publish`` per ``(stored envelope, flagged)`` of
    *items* on *channel*, in order, for one write to the broker (selected-instance mode's
    dispatcher; gwcore/_parts/amqp.pyx says what each publish carries, as ``gwcore.amqp.to_amqp``
    describes it): exchange ``""``, the routing key *input_queue* or, for a reply whose ``RouteTo``
    starts with *instance_prefix*, that queue; body frames of at most *max_content* bytes.
    With *mandatory*, each publish to *input_queue* has the mandatory bit: the broker returns it
    (``basic.return``) instead of dropping it when no queue takes it (a reply routed to an
    instance queue has not: one whose queue expired is dropped). Into *ids*, if given, the ``message_id``
    property of each publish, in order (the id; None when it is longer than a property holds),
    which is what a ``basic.return`` names it by.

    :return: ``(frames, refused)``: the bytes, and the indexes of the items left out because a
        header name is longer than an AMQP field name may be (128 bytes).
    :raises gwcore.errors.FramingError: an envelope is damaged.
    :raises ValueError: *channel* above 65535, *max_content* below 1, *input_queue* longer than
        255 bytes.
    """

def envelope_key(framed: Buffer, prefix: bytes) -> bytes:
    """*prefix* (the scope and the separator of ``gwcore.records.dedup_key``) followed by the
    stored envelope's id as stored: its dedup key, without decoding the envelope.

    :raises gwcore.errors.FramingError: the envelope is damaged before its id's end.
    """

def longest_header_name(framed: Buffer) -> int:
    """The length in bytes of the stored envelope's longest header name (0 without headers).

    :raises gwcore.errors.FramingError: the envelope is damaged.
    """

def signing_headers(block: Buffer) -> bytes:
    """The header lines of a request signature scheme v2 canonical string (``gwcore.auth``,
    docs/sending.md) for the raw header lines *block* (``Name: value`` each, ended by CRLF or LF,
    names and values as on the wire): built by the code the framer uses for
    :attr:`Envelope.auth_headers`, so a sender signs exactly what a receiver checks.

    :raises ValueError: a line is not ``name: value``, or a name appears twice (ignoring ASCII
        case).
    """

def siphash13(key: bytes, data: bytes) -> int:
    """SipHash-1-3 of *data* under a 16-byte *key*, as :class:`DedupIndex` hashes keys."""

EV_SUBMIT: Final[int]
""":meth:`RequestParser.feed` event ``(EV_SUBMIT, keep_alive, result)``: a complete gateway
request, framed; *result* is the :class:`Envelope` or :class:`Rejection` of :meth:`Framer.frame`."""
EV_OTHER: Final[int]
"""Event ``(EV_OTHER, keep_alive, method, path, gwcore_headers)``: any other complete request
(another path, a built-in endpoint, another method); its body was read and dropped. For a path
under ``/.gwcore/`` *gwcore_headers* maps each ``gwcore-*`` header name (lower case bytes) to its
raw value (the signature of a worker call); None for every other path."""
EV_CONTINUE: Final[int]
"""Event ``(EV_CONTINUE,)``: the request being read asked for ``Expect: 100-continue`` and its
body has not arrived yet."""
EV_ERROR: Final[int]
"""Event ``(EV_ERROR, status, reason)``: the input cannot be read on (400 malformed or an
upgrade, 413, 431); the parser is finished and later feeds return ``[]``."""
EV_PART_BEGIN: Final[int]
"""Event ``(EV_PART_BEGIN, keep_alive, envelope)``: the head of a ``SingleCallDatabusProperty``
part the framer accepted; its body follows as ``EV_PART_DATA`` events, never buffered whole."""
EV_PART_DATA: Final[int]
"""Event ``(EV_PART_DATA, chunk)``: the next bytes of the part's body."""
EV_PART_END: Final[int]
"""Event ``(EV_PART_END,)``: the part's body is complete."""

@disjoint_base
class RequestParser:
    """An HTTP/1.1 request parser for one connection that frames gateway requests itself.

    Strict like llhttp's default mode: CRLF line ends, token methods and header names, no
    whitespace before ``:``, no obsolete line folding, no control characters in values, only
    ``HTTP/1.0`` and ``HTTP/1.1``. Header values lose surrounding spaces and tabs. A request with
    ``Content-Length`` and ``Transfer-Encoding``, two ``Content-Length`` headers, or a
    ``Transfer-Encoding`` whose last coding is not ``chunked`` is malformed (request smuggling).
    Requests may be pipelined and split anywhere; a request crosses into Python once, as an event.
    After a request without keep-alive the parser stops reading. Not thread-safe.
    """

    def __init__(
        self,
        framer: Framer,
        channel_paths: list[bytes],
        *,
        max_headers: int,
        max_header_bytes: int,
        max_body: int,
        allow_get: bool,
        max_blob: int = -1,
    ) -> None:
        """
        :param framer: frames the requests to a channel.
        :param channel_paths: the receive channels' paths, lower-case bytes starting and ending
            with ``/``. A request path matches a channel when, ignoring ASCII case and with a
            ``/`` added when it lacks one, it starts with the channel's path; ``/healthz``,
            ``/readyz`` and ``/metrics`` never do.
        :param max_headers: more header lines are answered 431.
        :param max_header_bytes: a longer header section (request line and header lines with
            their CRLFs, or the trailer lines of a chunked body) is answered 431, as soon as
            the buffered part of it is longer.
        :param max_body: a longer body is answered 413 (with ``Content-Length`` once the headers
            are in, chunked once a chunk size goes past it).
        :param allow_get: GET requests to a channel are framed too, with their query string.
        :param max_blob: the bound of a streamed databus part's body instead of ``max_body``
            (default: ``max_body``).
        :raises gwcore.errors.ConfigurationError: a channel path is not as described, or a limit
            is negative.
        """
    @property
    def in_request(self) -> bool:
        """Bytes of an unfinished request are buffered (for the request timeout)."""
    def feed(self, data: Buffer, now_ms: int) -> list[tuple[object, ...]]:
        """Parse received bytes; returns the events they complete, in order.

        :param data: the bytes received, any buffer (copied).
        :param now_ms: current time in ms since the epoch, for the framer.
        :return: ``(EV_SUBMIT, keep_alive, result)``, ``(EV_OTHER, keep_alive, method, path, gwcore_headers)``,
            ``(EV_CONTINUE,)`` and ``(EV_ERROR, status, reason)`` tuples; an error is always last.
            When the framer has ``signatures`` on and a submit carries ``gwcore-Signature``, its
            result's ``method`` and ``target`` are set (unsigned requests pay nothing).
        """
    def streamed_body_left(self) -> int:
        """Bytes of a streamed databus part's body still to come when none of it is buffered in
        the parser (the caller may receive them itself and report them with :meth:`body_taken`);
        0 otherwise, chunked bodies included."""
    def body_taken(self, n: int) -> None:
        """*n* bytes of the streamed part's body were received by the caller. When that ends the
        body, the next :meth:`feed` reports ``EV_PART_END``.

        :raises ValueError: no streamed body is being received, or *n* is more than is left."""

@disjoint_base
class ListenerCore:
    """What every connection of one listener shares and reads per request: the compiled half
    of ``gwcore.http.HTTPState``. Subclass it and implement :meth:`render_ok`."""

    active: bool
    """May take gateway traffic (not starting, standby or passive)."""
    passive: bool
    """A passive node waiting for the data dir's lease."""
    draining: bool
    """Shutting down: submits are answered 503 and idle connections close."""
    writer: Any
    """Takes envelopes: ``writer.ingest_then(envelope, done)`` and ``writer.pending``."""
    inbox: JobInbox | None
    """The writer's compiled inbox: submits go there without a Python call (None: through
    ``writer.ingest_then``)."""
    verifier: Any
    """Checks request signatures, or None when requests are not signed."""
    max_pipeline: int
    """Unanswered requests on a connection at which reading pauses."""
    max_pending: int
    """Envelopes waiting for the writer at which submits are answered 503."""
    answered_ok: int
    """Submits answered 200 since start (``HTTPState.status_counts`` adds them to the rest)."""
    compiled_submits: int
    """Submits handed straight to the writer's inbox by the compiled path (no Python call)."""
    bytes_in: int
    """Bytes received on this listener's connections."""
    bytes_out: int
    """Bytes of answers written (answers streamed from files aside)."""
    def observe_ok(self, started: float) -> None:
        """Count a 200 to a submit answered outside the compiled path; *started* as
        :attr:`AnswerSlot.started`."""
    def ok_durations(self) -> tuple[list[int], float]:
        """``(counts, sum)`` of the compiled path's 200s to submits: counts per bound of
        :data:`DURATION_BOUNDS`, then above them all."""
    idle_connections: Any
    """The connections with no request begun and no answer owed, the one idle the longest first
    (an ``OrderedDict`` of connection -> None): at ``GWCORE_HTTP_MAX_CONNECTIONS`` the first one
    is closed to make room for a newcomer."""
    def date(self) -> bytes:
        """The HTTP ``Date`` value of the current second."""
    def ok(self) -> bytes:
        """The complete 200 answer to a submit, made by :meth:`render_ok` once a second."""
    def render_ok(self, date: bytes) -> bytes:
        """The complete 200 answer carrying ``date`` (the subclass renders it)."""

@disjoint_base
class AnswerSlot:
    """One request's place in its connection's answer order. The writer calls it once the
    request's envelope is durable (or refused): ``slot(ok, value)``; an accepted new message
    without JSONP is answered by the compiled path, every other outcome goes to the protocol's
    ``_ingested(slot, ok, value)``."""

    data: bytes | None
    close: bool
    callback: str | None
    protocol: ConnectionCore | None
    msg_id: str | None
    head: bool
    started: float
    """``time.monotonic()`` of the read that completed the request (a databus part: its head)."""
    kind: int
    """What the request is: an index into :data:`REQUEST_KINDS`."""
    def __call__(self, ok: bool, value: object) -> None: ...

@disjoint_base
class ConnectionCore:
    """One client connection: the compiled half of ``gwcore.http.HTTPProtocol``. It walks the
    parser's events, queues an answer slot per request and hands accepted envelopes to the
    writer; a subclass provides ``_route``, ``_ingested``, ``_other``, ``_fail``, ``_linger``
    and, for streamed databus parts, ``_part_begin``, ``_part_data``, ``_part_end`` and
    ``_take_part_body`` (``gwcore.databus.intake.PartIntake``) for everything else."""

    state: Any
    parser: RequestParser
    transport: Any
    slots: Any
    loop: Any
    closing: bool
    reading_paused: bool
    writing_paused: bool
    request_started: float
    """Loop time the unfinished request's first bytes arrived (later bytes never move it)."""
    request_bytes: int
    """Bytes received of the unfinished request (what ``GWCORE_HTTP_MIN_RATE`` counts)."""
    idle_listed: bool
    """In ``state.idle_connections``."""
    idle_since: float
    linger_until: float
    part: Any
    """The databus part being received (``gwcore.databus.intake._Part``) or None: while its blob threads
    lag behind, reading pauses."""
    parts_open: int
    """Parts of this connection whose body is in and whose record is not yet committed: a submit
    behind them waits (the checked path), so that it finds them."""
    @property
    def in_request(self) -> bool:
        """Bytes of an unfinished request are buffered."""
    @property
    def in_head(self) -> bool:
        """The unfinished request's line and headers are not all in yet."""
    def mark_idle(self, idle: bool) -> None:
        """List it among the listener's idle connections (``state.idle_connections``), or take it out."""
    def data_received(self, data: bytes) -> None:
        """Parse received bytes and act on every request they complete."""
    def _slot(self, keep_alive: bool) -> AnswerSlot:
        """Queue a new answer slot (closing the connection after it when not keep-alive)."""
    def _flush(self) -> None:
        """Write every answer that is next in line; close or go idle as the slots say."""
    def _update_reading(self) -> None:
        """Pause or resume reading by the pipeline depth and the peer's reading."""

DURATION_BOUNDS: Final[tuple[float, ...]]
"""The bucket bounds (seconds) of the answer times the compiled path counts."""
REQUEST_KINDS: Final[tuple[str, ...]]
"""The kinds of request an answer slot can be, its ``call_type`` label in
``gwcore_http_request_seconds``."""

JOB_KINDS: Final[tuple[int, int, int]]
"""The writer's job kinds: ingest an envelope, ack (remove) a queue entry, call a function."""

@disjoint_base
class JobInbox:
    """The loop-thread side of the writer's job queue: the jobs (``(kind, payload, done)``)
    of one event-loop turn gather in a list, and the turn's first job schedules ``hand_over``
    with ``call_soon``, which passes the list to the writer thread with one wake-up."""

    outbox: list[tuple[int, object, Callable[[bool, object], None]]]
    pending: int
    """Jobs added and not yet resolved."""
    closed: bool
    """The writer takes no more jobs (the caller checks before :meth:`add`)."""
    def __init__(self, call_soon: Callable[[Callable[[], None]], object], hand_over: Callable[[], None]) -> None: ...
    def add(self, kind: int, payload: object, done: Callable[[bool, object], None]) -> None:
        """Queue one job for the writer."""
    def take(self) -> list[tuple[int, object, Callable[[bool, object], None]]]:
        """This turn's jobs, leaving the outbox empty."""
    def resolve(self, done: list[tuple[Callable[[bool, object], None], bool, object]]) -> None:
        """Call ``done(ok, value)`` for every answer of a committed batch."""

@disjoint_base
class BatchAnswer:
    """The outcomes of one batch request's messages; ``on_done(body)`` once with the answer's
    JSON (``{"results":[...]}``, as ``orjson.dumps`` writes it) when :meth:`arm` was called and
    no message is waiting. ``on_error(exc)`` gives ``(status, reason)`` for a writer failure."""

    def __init__(self, messages: int, on_done: Callable[[bytes], object],
                 on_error: Callable[[BaseException], tuple[int, str]]) -> None: ...
    @property
    def waiting(self) -> int:
        """Messages handed to the writer and not decided yet."""
    def refuse(self, index: int, status: int, reason: str) -> None:
        """Message *index* was refused before the writer."""
    def slot(self, index: int) -> Callable[[bool, object], None]:
        """The ``done(ok, value)`` of message *index*'s writer job."""
    def arm(self) -> None:
        """Answer as soon as no message is waiting (now, if none is)."""
    def results(self) -> list[dict[str, object] | None]:
        """The outcomes as the answer's dicts (None: still waiting)."""
    def body(self) -> bytes:
        """The answer's JSON (every message decided; ValueError otherwise)."""

def ingest_results(jobs: list[tuple[int, object, Callable[[bool, object], None]]], flags: list[bool]) -> list[tuple[Callable[[bool, object], None], bool, object]]:
    """``[(done, True, flag), ...]`` for a batch of ingest jobs and ``apply_batch``'s flags."""
