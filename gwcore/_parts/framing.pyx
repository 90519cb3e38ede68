# Part of gwcore/_dedup.pyx (included there, compiled as one module). gwcore._dedup: framing of one NServiceBus gateway request (Envelope, Rejection, Framer).

# ---------------------------------------------------------------------------------------------
# framing of one gateway request

cdef class Envelope:
    def __init__(self):
        raise TypeError("Envelope objects are made by Framer.frame()")

    @property
    def headers(self):
        # Built on demand: the HTTP path stores `framed` and never needs the dict.
        if self._headers is None:
            self._headers = decode_envelope(self.framed)[1] if self.framed else {}
        return self._headers

    def with_framed(self, bytes framed not None):
        """A copy carrying another stored form (a submit whose databus headers were rewritten
        to the local blob keys)."""
        cdef Envelope env = Envelope.__new__(Envelope)
        env.id = self.id
        env.key = self.key
        env.call_type = self.call_type
        env.expiry_ms = self.expiry_ms
        env.accepted_ms = self.accepted_ms
        env.body = self.body
        env.framed = framed
        env.callback = self.callback
        env.auth_date = self.auth_date
        env.auth_signature = self.auth_signature
        env.method = self.method
        env.target = self.target
        env.databus_key = self.databus_key
        env.content_md5 = self.content_md5
        env.content_digest = self.content_digest
        env.databus = self.databus
        env.auth_headers = self.auth_headers
        return env

    def __repr__(self):
        return (f"<Envelope id={self.id!r} call_type={self.call_type} expiry_ms={self.expiry_ms} "
                f"headers={len(self.headers)} body={len(self.body)}B>")


cdef str _clean_reason(str text):
    # The reason doubles as the HTTP reason phrase, so it must be ASCII without control
    # characters (NServiceBus fails to answer at all when the phrase is invalid).
    cdef Py_ssize_t n = min(len(text), MAX_REASON_CHARS), i
    cdef Py_UCS4 ch
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef unsigned char* w = <unsigned char*>PyBytes_AS_STRING(out)
    for i in range(n):
        ch = text[i]
        w[i] = <unsigned char>ch if ASCII_SPACE <= ch < ASCII_DEL else ASCII_QUESTION
    return PyUnicode_DecodeASCII(<const char*>w, n, NULL)


cdef class Rejection:
    def __init__(self, int status, str reason not None, callback=None):
        self.status = status
        self.reason = _clean_reason(reason)
        self.callback = callback

    def __repr__(self):
        return f"<Rejection {self.status} {self.reason!r}>"


cdef str _too_many_headers(Py_ssize_t limit):
    # The 431 reason for more than GWCORE_HTTP_MAX_HEADERS headers: a request's (RequestParser)
    # and a batch message's (Framer.frame_batch) alike.
    return f"Request Header Fields Too Large: more than {limit} headers"


cdef str _header_section_too_big(Py_ssize_t limit):
    # The 431 reason for a header section over GWCORE_HTTP_MAX_HEADER_BYTES: a request's
    # (RequestParser) and a batch message's header block (Framer.frame_batch) alike.
    return f"Request Header Fields Too Large: header section exceeds {limit} bytes"


cdef uint64_t _expiry(const unsigned char* ttbr, Py_ssize_t n, uint64_t now_ms,
                      bint gateway) noexcept nogil:
    # ttbr is NULL when the header is absent. Gateway messages: unparseable counts as zero and
    # anything under a second becomes one second (SingleCallChannelReceiver). Custom messages
    # keep TryParse's value, and a value that is not positive means "no expiry". Both: absent,
    # or 100 years and more, means never.
    cdef long long ms = 0
    cdef bint parsed
    if ttbr == NULL:
        return 0
    parsed = _parse_timespan(ttbr, n, &ms)
    if gateway:
        if not parsed or ms < 1000:
            ms = 1000
    elif not parsed or ms <= 0:
        return 0
    if ms >= NEVER_MS or now_ms > <uint64_t>-1 - <uint64_t>ms:
        return 0
    return now_ms + <uint64_t>ms


cdef int _call_type(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    # Enum.TryParse: trims, case-sensitive names, numeric values accepted. -1: none of them.
    p = _net_strip(p, &n)
    if (n == 16 and memcmp(p, b"SingleCallSubmit", 16) == 0) or (n == 1 and p[0] == ASCII_0):
        return CALL_TYPE_SUBMIT
    if (n == 25 and memcmp(p, b"SingleCallDatabusProperty", 25) == 0) or (n == 1 and p[0] == ASCII_1):
        return CALL_TYPE_DATABUS
    return -1


# Request signing, scheme v2 (gwcore/auth.py, docs/sending.md): the covered headers of a request
# are every NServiceBus.* and gwcore-* header but gwcore-Signature, plus Content-MD5 and
# Content-Digest, each as one line "<name>:<value>": the decoded name in ASCII lower case, the
# decoded value, backslash and LF escaped (and ":" in a name), so the lines split back one way only;
# sorted by the lower-case name's bytes, joined by LF. The framer builds them for a request that
# carries a v2 signature only, and the sender builds them with the same code (signing_headers).

cdef bint _signed_name(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef unsigned char c
    if n < 7:
        return False
    c = FOLD[p[0]]
    if c == 0x6E:                       # "n"
        return n >= 12 and _same(p, <const unsigned char*>b"nservicebus.", 12, False)
    if c == 0x67:                       # "g"
        return (_same(p, <const unsigned char*>b"gwcore-", 7, False)
                and not (n == 16 and _same(p, <const unsigned char*>b"gwcore-signature", 16, False)))
    return c == 0x63 and (             # "c"
        (n == 11 and _same(p, <const unsigned char*>b"content-md5", 11, False))
        or (n == 14 and _same(p, <const unsigned char*>b"content-digest", 14, False)))


cdef struct _Signed:
    # One covered header of the request being signed: its span, its folded name in scratch (as
    # bytes, and as big-endian 64-bit words, zero-padded, for sorting), and how many bytes of name
    # and value need a backslash before them.
    Py_ssize_t span
    Py_ssize_t name
    Py_ssize_t name_n
    Py_ssize_t words
    Py_ssize_t name_esc
    Py_ssize_t value_esc


cdef inline int _words_cmp(const uint64_t* a, Py_ssize_t an, const uint64_t* b,
                           Py_ssize_t bn) noexcept nogil:
    # byte order of two names of an and bn bytes, from their words: zero padding ties where one
    # name is a prefix of the other, and then the shorter comes first
    cdef Py_ssize_t i
    for i in range((min(an, bn) + 7) >> 3):
        if a[i] != b[i]:
            return -1 if a[i] < b[i] else 1
    return (an > bn) - (an < bn)


cdef Py_ssize_t _escapes(const unsigned char* p, Py_ssize_t n, bint name) noexcept nogil:
    # The bytes of p to escape: backslash and LF, and ":" in a name; words of 8 bytes without
    # any (nearly all text) are passed over at once.
    cdef Py_ssize_t i = 0, out = 0, stop
    cdef uint64_t word
    cdef unsigned char c
    while i < n:
        stop = n
        if n - i >= 8:
            memcpy(&word, p + i, 8)
            if not (_has_byte(word, ASCII_BACKSLASH) or _has_byte(word, ASCII_LF)
                    or (name and _has_byte(word, ASCII_COLON))):
                i += 8
                continue
            stop = i + 8
        while i < stop:
            c = p[i]
            out += c == ASCII_BACKSLASH or c == ASCII_LF or (name and c == ASCII_COLON)
            i += 1
    return out


cdef unsigned char* _put_escaped(unsigned char* w, const unsigned char* p, Py_ssize_t n,
                                 Py_ssize_t escapes, bint name) noexcept nogil:
    cdef Py_ssize_t i
    cdef unsigned char c
    if escapes == 0:
        memcpy(w, p, n)
        return w + n
    for i in range(n):
        c = p[i]
        if c == ASCII_BACKSLASH or (name and c == ASCII_COLON):
            w[0] = ASCII_BACKSLASH
            w[1] = c
            w += 2
        elif c == ASCII_LF:
            w[0] = ASCII_BACKSLASH
            w[1] = 0x6E                 # "n"
            w += 2
        else:
            w[0] = c
            w += 1
    return w


def signing_headers(block):
    """See _dedup.pyi."""
    cdef bytes raw = _as_bytes(block)
    cdef const unsigned char* p = _ptr(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw), pos = 0, eol, end, colon, v, e
    cdef const void* hit
    cdef Framer f = Framer.__new__(Framer)
    f._begin(None, raw.count(b"\n") + 1)
    while pos < n:
        hit = memchr(p + pos, ASCII_LF, n - pos)
        eol = n if hit == NULL else <const unsigned char*>hit - p
        end = eol
        if end > pos and p[end - 1] == ASCII_CR:
            end -= 1
        if end > pos:
            hit = memchr(p + pos, ASCII_COLON, end - pos)
            colon = end if hit == NULL else <const unsigned char*>hit - p
            if colon == end or colon == pos:
                raise ValueError(f"not a header line: {raw[pos:end]!r}")
            v = colon + 1
            e = _trim_ows(p, &v, end)
            if f._add_header(p + pos, colon - pos, p + v, e - v) >= 0:
                raise ValueError(f"header {raw[pos:colon]!r} appears more than once")
        pos = eol + 1
    return f._signed_headers(0, f._spans_n)


# The framer decodes every header into one reused text buffer and works on spans of it; Python
# objects are made only for what leaves (id, key, envelope, rejection reason). Text that is not
# valid UTF-8 after decoding is replaced at once by what errors="replace" makes of it, so names
# and values compare and get stored exactly as the decoded str values they stand for.

cdef class Batch:
    def __init__(self, *args, **kwargs):
        raise TypeError("Batch objects are made by Framer.frame()")

    def __repr__(self):
        return f"<Batch version={self.version!r} body={len(self.body)}B>"


cdef Py_ssize_t _block_spans(const unsigned char* p, Py_ssize_t n, _RawSpan** spans,
                             Py_ssize_t* cap, Py_ssize_t limit) except -1:
    # Checks a batch message's header block ("Name: value\r\n" lines) and counts its lines, in
    # one pass. The (name, value) spans of the first `limit` lines go to *spans (room for *cap
    # pairs, grown as needed; the caller frees it): the value without the blanks around it, as
    # an HTTP header's. Lines past the limit are checked, never stored.
    cdef Py_ssize_t i = 0, start, colon, v, end, lines = 0, grown_cap
    cdef _RawSpan* grown
    cdef _RawSpan* line
    cdef const unsigned char* at
    while i < n:
        # memchr (vectorised) finds the CR, the colon and any bare LF or NUL of the line: a
        # block is ~1 KiB of 20 lines, and a byte-by-byte scan was a third of framing a batch.
        start = i
        at = <const unsigned char*>memchr(p + start, ASCII_CR, n - start)
        i = (at - p) if at != NULL else n
        at = <const unsigned char*>memchr(p + start, ASCII_COLON, i - start)
        colon = (at - p) if at != NULL else -1
        if colon == start:
            raise FramingError("a batch message's header line has an empty name")
        if memchr(p + start, ASCII_LF, i - start) != NULL or memchr(p + start, 0, i - start) != NULL:
            raise FramingError("a batch message's header line holds a bare LF or a NUL")
        if colon < 0:
            raise FramingError("a batch message's header line has no colon")
        if i + 1 >= n or p[i + 1] != ASCII_LF:
            raise FramingError("a batch message's header line does not end in CRLF")
        if lines < limit:
            if lines == cap[0]:
                grown_cap = min(max(MIN_SPANS, 2 * cap[0]), limit)
                grown = <_RawSpan*>PyMem_Realloc(spans[0], 2 * grown_cap * sizeof(_RawSpan))
                if grown == NULL:
                    raise MemoryError()
                spans[0] = grown
                cap[0] = grown_cap
            v = colon + 1
            end = _trim_ows(p, &v, i)
            line = spans[0] + 2 * lines
            line[0].p = p + start
            line[0].n = colon - start
            line[1].p = p + v
            line[1].n = end - v
        i += 2
        lines += 1
    return lines


def encode_batch(list messages not None):
    """``messages`` of ``(header block, body)`` -> a batch body (layout in _dedup.pyx). Each
    block is the ``Name: value\r\n`` lines of the message's own request (``encode_submit``'s)."""
    cdef Py_ssize_t total = BATCH_HEAD, n = len(messages)
    cdef tuple m
    cdef bytes block, body, out
    cdef unsigned char* w
    if n > MAX_U32:
        raise FramingError("too many messages for one batch")
    for m in messages:
        total += BATCH_MESSAGE_FIXED + _u32_len(PyBytes_GET_SIZE(<bytes?>m[0]), "a header block") \
            + PyBytes_GET_SIZE(<bytes?>m[1])
    out = PyBytes_FromStringAndSize(NULL, total)
    w = _put_preamble(<unsigned char*>PyBytes_AS_STRING(out), MAGIC_B, BATCH_VERSION, 0, <uint32_t>n)
    for m in messages:
        block = m[0]
        body = m[1]
        w = _put_text(w, PyBytes_AS_STRING(block), PyBytes_GET_SIZE(block))
        w = _put_u64(w, <uint64_t>PyBytes_GET_SIZE(body))
        memcpy(w, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
        w += PyBytes_GET_SIZE(body)
    if w != <unsigned char*>PyBytes_AS_STRING(out) + total:
        raise InternalError("batch size computed wrongly")
    return out


def batch_count(bytes body not None):
    """See _dedup.pyi."""
    cdef _Reader r
    cdef unsigned char flags
    r.p = _ptr(body)
    r.left = PyBytes_GET_SIZE(body)
    try:
        return _take_preamble(&r, MAGIC_B, BATCH_VERSION, 0, "batch", "message", &flags)
    except FramingError:
        return 0   # not a batch: frame_batch says why (400)


cdef class Framer:
    def __cinit__(self):
        self._text = NULL
        self._spans = NULL
        self._slots = NULL

    def __init__(self, str scope not None, *, Py_ssize_t max_id_bytes=400, bint parse_query=False,
                 bint signatures=False):
        if "\x00" in scope:
            raise ConfigurationError("the dedup scope must not contain NUL: it separates scope and id")
        if max_id_bytes < 1:
            raise ConfigurationError(f"max_id_bytes must be positive, got {max_id_bytes}")
        try:
            self._key_prefix = scope.encode("utf-8") + b"\x00"
        except UnicodeEncodeError as exc:
            raise ConfigurationError(f"the dedup scope is not valid text: {scope!r}") from exc
        self.scope = scope
        self.max_id_bytes = max_id_bytes
        self.parse_query = parse_query
        self.signatures = signatures

    def __dealloc__(self):
        PyMem_Free(self._text)
        PyMem_Free(self._spans)
        PyMem_Free(self._slots)

    cdef unsigned char* _room(self, Py_ssize_t n) except NULL:
        # Where n more bytes of text go (never NULL). The buffer may move: spans hold offsets.
        return _grow(&self._text, &self._text_cap, self._text_n, n)

    cdef Py_ssize_t _decode(self, const unsigned char* src, Py_ssize_t n) except -1:
        # Percent-decodes src onto the end of the text; returns where it starts. src must not
        # point into the text unless room for n bytes was made beforehand.
        cdef Py_ssize_t start = self._text_n
        cdef unsigned char* dst = self._room(n)
        cdef bint ascii
        self._text_n += _percent_decode(src, n, dst, &ascii)
        if not ascii and not _utf8_valid(dst, self._text_n - start):
            self._replace_invalid(start)
        return start

    cdef int _replace_invalid(self, Py_ssize_t start) except -1:
        # Rare: not UTF-8 after decoding. Python's decoder decides which bytes become U+FFFD.
        cdef str text = _utf8(self._text + start, self._text_n - start)
        cdef Py_ssize_t n
        cdef const char* p = PyUnicode_AsUTF8AndSize(text, &n)
        self._text_n = start
        memcpy(self._room(n), p, n)
        self._text_n += n
        return 0

    cdef Py_ssize_t _decode_twice(self, const unsigned char* src, Py_ssize_t n) except -1:
        # HttpListener decodes the query once, then the gateway decodes every key and value
        # again (protocol.md 1.2 step 3): "%252B" arrives as "+", "%2B" as a space.
        cdef Py_ssize_t once = self._decode(src, n)
        n = self._text_n - once
        self._room(n)
        return self._decode(self._text + once, n)

    cdef Py_ssize_t _new_span(self) except -1:
        cdef _Span* grown
        cdef Py_ssize_t cap
        if self._spans_n == self._spans_cap:
            cap = max(MIN_SPANS, self._spans_cap * 2)
            grown = <_Span*>PyMem_Realloc(self._spans, cap * sizeof(_Span))
            if grown == NULL:
                raise MemoryError()
            self._spans = grown
            self._spans_cap = cap
        memset(&self._spans[self._spans_n], 0, sizeof(_Span))
        self._spans_n += 1
        return self._spans_n - 1

    cdef Py_ssize_t _add_header(self, const unsigned char* name, Py_ssize_t name_n,
                                const unsigned char* value, Py_ssize_t value_n) except -2:
        # Decodes one raw header into a new span and indexes it. Returns -1, or the new span when
        # its name repeats an indexed one (the request is then rejected).
        cdef Py_ssize_t at = self._new_span(), slot
        cdef _Span* s = &self._spans[at]
        s.name = self._decode(name, name_n)
        s.name_n = self._text_n - s.name
        s.hash = _fold_hash(self._text + s.name, s.name_n)
        s.value = self._decode(value, value_n)
        s.value_n = self._text_n - s.value
        slot = self._index_slot(self._text + s.name, s.name_n, s.hash, False)
        if self._slots[slot]:
            return at
        self._slots[slot] = <uint32_t>(at + 1)
        return -1

    cdef int _parse_query(self, object query) except -1:
        # One span per parameter. A segment without '=' has an empty value; empty segments
        # ("a=1&&b=2") are skipped.
        cdef bytes raw = _as_bytes(query)
        cdef const unsigned char* p = _ptr(raw)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(raw), start = 0, end, eq
        cdef _Span* s
        while start < n:
            end = start
            eq = -1
            while end < n and p[end] != ASCII_AMP:
                if eq < 0 and p[end] == ASCII_EQUALS:
                    eq = end
                end += 1
            if end > start:
                s = &self._spans[self._new_span()]
                s.name = self._decode_twice(p + start, (end if eq < 0 else eq) - start)
                s.name_n = self._text_n - s.name
                s.hash = _fold_hash(self._text + s.name, s.name_n)
                s.value = self._decode_twice(p + eq + 1, end - eq - 1) if eq >= 0 else self._text_n
                s.value_n = self._text_n - s.value
            start = end + 1
        return 0

    cdef int _index_clear(self, Py_ssize_t entries) except -1:
        # Room for `entries` spans at most half full, so probing stays short and always ends.
        cdef Py_ssize_t size = MIN_SLOTS
        cdef uint32_t* grown
        while size < 2 * entries:
            size *= 2
        if size > self._slots_cap:
            grown = <uint32_t*>PyMem_Realloc(self._slots, size * sizeof(uint32_t))
            if grown == NULL:
                raise MemoryError()
            self._slots = grown
            self._slots_cap = size
        memset(self._slots, 0, size * sizeof(uint32_t))
        self._slots_mask = size - 1
        return 0

    cdef Py_ssize_t _index_slot(self, const unsigned char* name, Py_ssize_t n, uint32_t hash,
                                bint exact) noexcept:
        # The slot of the indexed span with this name (ignoring ASCII case unless exact), or the
        # empty slot where it would go.
        cdef Py_ssize_t slot = hash & self._slots_mask
        cdef const _Span* s
        while self._slots[slot]:
            s = &self._spans[self._slots[slot] - 1]
            if s.hash == hash and s.name_n == n and _same(self._text + s.name, name, n, exact):
                break
            slot = (slot + 1) & self._slots_mask
        return slot

    cdef Py_ssize_t _lookup(self, Py_ssize_t control) noexcept:
        # -> the span of a control header, or -1
        cdef const _Name* c = &CONTROLS[control]
        return <Py_ssize_t>self._slots[self._index_slot(c.p, c.n, c.hash, False)] - 1

    cdef int _put(self, _Span entry, bint exact) except -1:
        # Dictionary assignment: an indexed span with the same name takes entry's name and value
        # in place (wire order kept), otherwise entry is appended.
        cdef Py_ssize_t slot = self._index_slot(self._text + entry.name, entry.name_n, entry.hash, exact)
        cdef Py_ssize_t at
        if self._slots[slot]:
            at = self._slots[slot] - 1
        else:
            at = self._new_span()
            self._slots[slot] = <uint32_t>(at + 1)
        self._spans[at] = entry
        return 0

    cdef Py_ssize_t _gateway_headers(self, Py_ssize_t first, Py_ssize_t end,
                                     Py_ssize_t correlation) except -1:
        # The stored headers of a gateway message, appended as spans after `end`; returns their
        # end. Message headers travel as "NServiceBus.Header.<name>". NServiceBus matches the
        # prefix case-sensitively and silently drops headers a proxy lower-cased; gwcore folds
        # case. Stripped names can collide ("NServiceBus.Header." twice, or once): as in a
        # dictionary, the first position stays and the last value wins.
        cdef Py_ssize_t i
        cdef _Span out
        self._index_clear(end - first + 1)
        for i in range(first, end):
            if not self._spans[i].marks & MARK_HEADER:
                continue
            out = self._spans[i]
            if out.marks & MARK_PREFIX_IN_FRONT:
                out.name += HEADER_PREFIX_LEN
                out.name_n -= HEADER_PREFIX_LEN
            else:
                self._room(out.name_n)
                out.name = self._text_n
                out.name_n = _strip_prefix(self._text + self._spans[i].name, out.name_n,
                                           self._text + out.name)
                self._text_n += out.name_n
            out.hash = _fold_hash(self._text + out.name, out.name_n)
            self._put(out, True)
        # and the top-level NServiceBus.CorrelationId, under its canonical spelling
        out = self._spans[correlation]
        out.name = self._text_n
        out.name_n = PyBytes_GET_SIZE(CORRELATION_ID)
        memcpy(self._room(out.name_n), _ptr(CORRELATION_ID), out.name_n)
        self._text_n += out.name_n
        out.hash = _fold_hash(self._text + out.name, out.name_n)
        self._put(out, True)
        return self._spans_n

    cdef bytes _apply_query(self, Py_ssize_t params, bytes body):
        # Each parameter overrides the header of the same name, in place and under its own
        # spelling, or is appended; "message" replaces the body. Returns the body.
        cdef const _Span* s
        cdef Py_ssize_t i
        for i in range(params):
            self._put(self._spans[i], False)
            s = &self._spans[i]
            if s.name_n == 7 and _same(self._text + s.name, <const unsigned char*>b"message", 7, False):
                body = PyBytes_FromStringAndSize(<const char*>self._text + s.value, s.value_n)
        return body

    cdef Py_ssize_t _mark(self, Py_ssize_t first, Py_ssize_t end) noexcept:
        # Sets the marks of the spans [first, end); returns how many are claim-check parts.
        cdef Py_ssize_t i, parts = 0
        cdef _Span* s
        for i in range(first, end):
            s = &self._spans[i]
            s.marks = _name_marks(self._text + s.name, s.name_n)
            parts += s.marks & MARK_DATABUS
        return parts

    cdef bytes _key(self, const _Span* id):
        # the scope prefix, then the id
        cdef Py_ssize_t n = PyBytes_GET_SIZE(self._key_prefix)
        cdef bytes key = PyBytes_FromStringAndSize(NULL, n + id.value_n)
        memcpy(PyBytes_AS_STRING(key), PyBytes_AS_STRING(self._key_prefix), n)
        memcpy(PyBytes_AS_STRING(key) + n, self._text + id.value, id.value_n)
        return key

    cdef str _str(self, Py_ssize_t offset, Py_ssize_t n):
        return PyUnicode_DecodeUTF8(<const char*>self._text + offset, n, NULL)

    cdef bytes _envelope(self, const _Span* id, Py_ssize_t first, Py_ssize_t end, bytes body,
                         uint64_t expiry_ms, uint64_t accepted_ms):
        # encode_envelope() of the spans [first, end) as message headers
        cdef Py_ssize_t total = ENVELOPE_FIXED + id.value_n + PyBytes_GET_SIZE(body), i
        cdef const _Span* s
        cdef bytes out
        cdef unsigned char* w
        for i in range(first, end):
            s = &self._spans[i]
            total += 8 + _u32_len(s.name_n, "a header") + _u32_len(s.value_n, "a header")
        out = PyBytes_FromStringAndSize(NULL, total)
        w = _put_head(<unsigned char*>PyBytes_AS_STRING(out), accepted_ms, expiry_ms,
                      self._text + id.value, id.value_n, end - first)
        for i in range(first, end):
            s = &self._spans[i]
            w = _put_text(w, self._text + s.name, s.name_n)
            w = _put_text(w, self._text + s.value, s.value_n)
        _put_body(out, w, body)
        return out

    cdef Rejection _reject(self, int status, str reason, object callback):
        self.rejected_total += 1
        return Rejection(status, reason, callback)

    cdef Rejection _reject_known(self, int status, str reason, object callback,
                                 const Py_ssize_t* found, bytes body):
        # A rejection decided once the id is known (found: _finish's control spans). With
        # signatures on it carries the signed fields the framer has, so that the receiver can
        # check the signature before it answers with this rejection.
        cdef Rejection r = self._reject(status, reason, callback)
        if self.signatures:
            r.id = self._value_or_none(found[CTL_ID])
            r.body = body
            r.auth_date = self._value_or_none(found[CTL_AUTH_DATE])
            r.auth_signature = self._value_or_none(found[CTL_AUTH_SIGNATURE])
            if found[CTL_AUTH_SIGNATURE] >= 0:
                r.auth_headers = self._auth_headers
                r.content_digest = self._value_or_none(found[CTL_CONTENT_DIGEST])
        return r

    cdef object _batch(self, Py_ssize_t version, bytes body, bint streamed):
        # The request is a batch (gwcore-Batch): its messages are framed later, one by one
        # (frame_batch), once the receiver has checked the batch's signature and limits.
        cdef Batch b
        if streamed:
            return self._reject(400, "Bad Request: a gwcore batch is not a databus part", None)
        b = Batch.__new__(Batch)
        b.version = self._value_or_none(version)
        b.body = body
        b.id = ""
        b.callback = None
        b.content_digest = self._value_or_none(self._lookup(CTL_CONTENT_DIGEST))
        if self.signatures:
            b.auth_date = self._value_or_none(self._lookup(CTL_AUTH_DATE))
            b.auth_signature = self._value_or_none(self._lookup(CTL_AUTH_SIGNATURE))
            if b.auth_signature is not None:
                b.auth_headers = self._auth_headers
        return b

    def frame_batch(self, bytes body not None, uint64_t now_ms, Py_ssize_t max_messages, *,
                    Py_ssize_t max_headers, Py_ssize_t max_header_bytes):
        """The messages of a batch's body (layout in _dedup.pyx), each framed as its own request
        would be: a list of Envelope or Rejection, one per message, in order. A message that is
        not a ``SingleCallSubmit`` is refused (400) on its own, and so is one with more than
        *max_headers* header lines or a header block of more than *max_header_bytes* bytes (431,
        as RequestParser answers such a request).

        :raises FramingError: the body is not one whole batch (truncated, trailing bytes, bad
            magic, version or flags, a header line without a colon).
        :raises ValueError: more than *max_messages* messages (the receiver answers 413)."""
        cdef _Reader r
        cdef unsigned char flags
        cdef const unsigned char* block
        cdef uint32_t count, i, block_n
        cdef uint64_t body_n
        cdef Py_ssize_t lines, cap = 0
        cdef _RawSpan* spans = NULL
        cdef list out = []
        cdef object result
        cdef const unsigned char* message_body
        r.p = _ptr(body)
        r.left = PyBytes_GET_SIZE(body)
        count = _take_preamble(&r, MAGIC_B, BATCH_VERSION, 0, "batch", "message", &flags)
        if count > max_messages:
            raise ValueError(f"{count} messages in one batch, more than GWCORE_MAX_BATCH_MESSAGES={max_messages}")
        _check_fits(&r, count, BATCH_MESSAGE_FIXED, "batch", "message")
        self._in_batch = True
        try:
            for i in range(count):
                block_n = _get_u32(_take(&r, 4, "a message's header block length"))
                block = _take(&r, block_n, "a message's header block")
                lines = _block_spans(block, block_n, &spans, &cap, max_headers)
                body_n = _get_u64(_take(&r, 8, "a message's body length"))
                message_body = _take(&r, body_n, "a message's body")
                if lines > max_headers:
                    # the spans kept stop at the limit, and the framer's scratch is not sized
                    out.append(self._reject(431, _too_many_headers(max_headers), None))
                    continue
                if block_n > max_header_bytes:
                    out.append(self._reject(431, _header_section_too_big(max_header_bytes), None))
                    continue
                result = self._frame_raw(spans, lines, PyBytes_FromStringAndSize(
                    <const char*>message_body, <Py_ssize_t>body_n), None, now_ms)
                if type(result) is Batch:
                    result = self._reject(400, "Bad Request: a batch inside a batch", None)
                elif type(result) is Envelope and (<Envelope>result).call_type != CALL_TYPE_SUBMIT:
                    result = self._reject(400, "Bad Request: a batch carries SingleCallSubmit messages only "
                                               "(databus parts go as requests of their own)", None)
                out.append(result)
        finally:
            self._in_batch = False
            PyMem_Free(spans)
        if r.left:
            raise FramingError(f"{r.left} unexpected bytes after the batch's last message")
        return out

    cdef str _value_or_none(self, Py_ssize_t span):
        if span < 0:
            return None
        return self._str(self._spans[span].value, self._spans[span].value_n)

    cdef bytes _signed_headers(self, Py_ssize_t first, Py_ssize_t end):
        # The v2 canonical header lines of the spans [first, end) (see _signed_name above). The
        # names are folded into scratch once, also as words: they share long prefixes
        # ("nservicebus.header.nservicebus."), which a word compares 8 bytes at a time.
        cdef Py_ssize_t count = 0, names = 0, words = 0, i, j, k, at, total = 0
        cdef const _Span* s
        cdef _Signed* found
        cdef _Signed cur
        cdef uint64_t* word = NULL
        cdef uint64_t v
        cdef unsigned char* folded
        cdef const unsigned char* p
        cdef unsigned char c
        cdef bytes out
        cdef unsigned char* w
        found = <_Signed*>PyMem_Malloc(max(end - first, 1) * sizeof(_Signed))
        if found == NULL:
            raise MemoryError()
        try:
            for i in range(first, end):
                s = &self._spans[i]
                if _signed_name(self._text + s.name, s.name_n):
                    found[count].span = i
                    count += 1
                    names += s.name_n
                    words += (s.name_n + 7) >> 3
            word = <uint64_t*>PyMem_Malloc(words * sizeof(uint64_t) + names + 1)
            if word == NULL:
                raise MemoryError()
            folded = <unsigned char*>(word + words)
            names = words = 0
            for at in range(count):
                i = found[at].span
                s = &self._spans[i]
                cur.span = i
                cur.name = names
                cur.name_n = s.name_n
                cur.words = words
                p = self._text + s.name
                v = 0
                for k in range(s.name_n):
                    c = FOLD[p[k]]
                    folded[names + k] = c
                    v = (v << 8) | c
                    if k & 7 == 7:
                        word[words] = v
                        words += 1
                        v = 0
                if s.name_n & 7:
                    word[words] = v << (8 * (8 - (s.name_n & 7)))
                    words += 1
                names += s.name_n
                cur.name_esc = _escapes(folded + cur.name, cur.name_n, True)
                cur.value_esc = _escapes(self._text + s.value, s.value_n, False)
                total += cur.name_n + cur.name_esc + 2 + s.value_n + cur.value_esc
                # insertion sort (found[at] is in cur): a request has a dozen such headers, and
                # their names are unique
                j = at
                while j > 0:
                    if _words_cmp(word + found[j - 1].words, found[j - 1].name_n, word + cur.words, cur.name_n) <= 0:
                        break
                    found[j] = found[j - 1]
                    j -= 1
                found[j] = cur
            out = PyBytes_FromStringAndSize(NULL, max(total - 1, 0))
            w = <unsigned char*>PyBytes_AS_STRING(out)
            for i in range(count):
                s = &self._spans[found[i].span]
                if i:
                    w[0] = ASCII_LF
                    w += 1
                w = _put_escaped(w, folded + found[i].name, found[i].name_n, found[i].name_esc, True)
                w[0] = ASCII_COLON
                w = _put_escaped(w + 1, self._text + s.value, s.value_n, found[i].value_esc, False)
        finally:
            PyMem_Free(found)
            PyMem_Free(word)
        return out

    cdef tuple _databus_names(self, Py_ssize_t first, Py_ssize_t end, bint gateway):
        # (request header name, stored header name or None) of each claim-check header in
        # [first, end) (marks set). The part is found under the request name (NServiceBus keys
        # its map by it); the stored name is where the rewritten value goes: a gateway message
        # keeps only NServiceBus.Header.* headers, without the prefix.
        cdef list out = []
        cdef Py_ssize_t i, n
        cdef const _Span* s
        cdef unsigned char* dst
        cdef object stored
        for i in range(first, end):
            s = &self._spans[i]
            if not s.marks & MARK_DATABUS:
                continue
            stored = None
            if not gateway:
                stored = self._str(s.name, s.name_n)
            elif s.marks & MARK_HEADER:
                dst = self._room(s.name_n)
                s = &self._spans[i]             # the text may have moved
                n = _strip_prefix(self._text + s.name, s.name_n, dst)
                stored = PyUnicode_DecodeUTF8(<const char*>dst, n, NULL)
            out.append((self._str(s.name, s.name_n), stored))
        return tuple(out)

    cdef object _databus_part(self, const Py_ssize_t* found, bytes body, bint streamed,
                              object callback, uint64_t now_ms):
        # SingleCallDatabusProperty: NServiceBus stores the blob, verifies its hash (412), then
        # wants the DataBusKey (400). A streamed part is checked for its key before its body
        # arrives and for its hash once the body is on disk (gwcore/databus/intake.py).
        cdef const _Span* s
        cdef Py_ssize_t n
        cdef unsigned char md5[MD5_BASE64_LEN]
        cdef Envelope env
        cdef Py_ssize_t key = self._lookup(CTL_DATABUS_KEY)
        if not streamed and found[CTL_CONTENT_MD5] >= 0:
            s = &self._spans[found[CTL_CONTENT_MD5]]
            _content_md5(body, md5)
            if s.value_n != MD5_BASE64_LEN or memcmp(self._text + s.value, md5, MD5_BASE64_LEN):
                return self._reject_known(
                    412, "MD5 hash received does not match hash calculated on server. "
                         "Please resubmit.", callback, found, body)
        if key >= 0:
            n = self._spans[key].value_n
            _net_strip(self._text + self._spans[key].value, &n)
        if key < 0 or n == 0:
            return self._reject_known(400, "Required header 'NServiceBus.Gateway.DataBusKey' missing.",
                                      callback, found, body)
        env = Envelope.__new__(Envelope)
        if found[CTL_TTBR] >= 0:
            s = &self._spans[found[CTL_TTBR]]
            env.expiry_ms = _expiry(self._text + s.value, s.value_n, now_ms, found[CTL_GATEWAY] >= 0)
        s = &self._spans[found[CTL_ID]]
        env.id = self._str(s.value, s.value_n)
        env.key = self._key(s)
        env.call_type = CALL_TYPE_DATABUS
        env.accepted_ms = now_ms
        env.body = body
        env.framed = b""
        env._headers = {}
        env.callback = callback
        env.databus_key = self._str(self._spans[key].value, self._spans[key].value_n)
        env.content_md5 = self._value_or_none(found[CTL_CONTENT_MD5])
        env.content_digest = self._value_or_none(self._lookup(CTL_CONTENT_DIGEST))
        env.databus = ()
        if self.signatures:
            env.auth_date = self._value_or_none(found[CTL_AUTH_DATE])
            env.auth_signature = self._value_or_none(found[CTL_AUTH_SIGNATURE])
            env.auth_headers = self._auth_headers
        self.framed_total += 1
        return env

    def frame(self, list headers not None, body, query, uint64_t now_ms):
        return self._frame(headers, body, query, now_ms)

    cdef object _frame(self, list headers, object body, object query, uint64_t now_ms):
        # Framer.frame: the headers as a flat list of buffers.
        cdef Py_ssize_t count = len(headers), i, first, repeated = -1
        cdef bytes name, value
        cdef object callback
        if count & 1:
            raise InternalError("headers must be a flat [name, value, ...] list")
        callback = self._begin(query, count // 2)
        first = self._spans_n
        for i in range(0, count, 2):
            name = _as_bytes(headers[i])
            value = _as_bytes(headers[i + 1])
            repeated = self._add_header(_ptr(name), PyBytes_GET_SIZE(name), _ptr(value),
                                        PyBytes_GET_SIZE(value))
            if repeated >= 0:
                break
        return self._finish(first, repeated, body, callback, now_ms)

    cdef object _frame_raw(self, const _RawSpan* headers, Py_ssize_t count, bytes body,
                           object query, uint64_t now_ms):
        # The same for `count` headers as (name, value) span pairs in headers[0 : 2 * count],
        # raw as on the wire (RequestParser frames straight from its receive buffer).
        cdef Py_ssize_t i, first, repeated = -1
        cdef object callback = self._begin(query, count)
        first = self._spans_n
        for i in range(count):
            repeated = self._add_header(headers[2 * i].p, headers[2 * i].n,
                                        headers[2 * i + 1].p, headers[2 * i + 1].n)
            if repeated >= 0:
                break
        return self._finish(first, repeated, body, callback, now_ms)

    cdef object _begin(self, object query, Py_ssize_t headers):
        # Resets the scratch for one request and parses its query; returns the JSONP callback.
        cdef Py_ssize_t i
        cdef const _Span* s
        cdef object callback = None
        self._text_n = 0
        self._spans_n = 0
        if self.parse_query and query is not None:
            # parsed first: a rejection carries the JSONP callback too
            self._parse_query(query)
            for i in range(self._spans_n):
                s = &self._spans[i]
                if s.name_n == 8 and _same(self._text + s.name, <const unsigned char*>b"callback", 8, False):
                    callback = self._str(s.value, s.value_n)
        # spans: [query parameters | headers in wire order | parameters no header had]
        self._index_clear(headers + self._spans_n)
        return callback

    cdef object _finish(self, Py_ssize_t first, Py_ssize_t repeated, object body,
                        object callback, uint64_t now_ms):
        # Validates the spans of one request (headers from `first` on, all added unless
        # `repeated` >= 0 names a repeated one) and builds its envelope or rejection.
        cdef Py_ssize_t i, end, n
        cdef Py_ssize_t found[ALL_CONTROLS]
        cdef const _Span* s
        cdef const _Span* id
        cdef const unsigned char* ttbr = NULL
        cdef Py_ssize_t ttbr_n = 0
        cdef unsigned char md5[MD5_BASE64_LEN]
        cdef unsigned char sha256[SHA256_DIGEST_LEN]
        cdef bytes body_bytes
        cdef bint gateway
        cdef bint streamed = body is None        # RequestParser streams a databus part's body
        cdef tuple databus = ()
        cdef Envelope env

        self._auth_headers = None
        if repeated >= 0:
            s = &self._spans[repeated]
            return self._reject(
                400, f"Header '{self._str(s.name, s.name_n)}' appears more than once.", callback)

        if self.signatures:
            # A v2 signature covers the headers as they came, so this is before the query
            # string (GWCORE_HTTP_ALLOW_GET) overrides any: the query is covered with the target.
            i = self._lookup(CTL_AUTH_SIGNATURE)
            if i >= 0 and self._spans[i].value_n > 3 and memcmp(self._text + self._spans[i].value, b"v2.", 3) == 0:
                self._auth_headers = self._signed_headers(first, self._spans_n)
        body_bytes = self._apply_query(first, b"" if streamed else _as_bytes(body))
        i = self._lookup(CTL_BATCH)
        if i >= 0:
            return self._batch(i, body_bytes, streamed)
        end = self._spans_n
        for i in range(CONTROL_COUNT):
            found[i] = self._lookup(i)
        if self.signatures:
            found[CTL_AUTH_DATE] = self._lookup(CTL_AUTH_DATE)
            found[CTL_AUTH_SIGNATURE] = self._lookup(CTL_AUTH_SIGNATURE)
            found[CTL_CONTENT_DIGEST] = self._lookup(CTL_CONTENT_DIGEST)

        if found[CTL_ID] < 0:
            return self._reject(400, "Required header 'NServiceBus.Id' missing.", callback)
        id = &self._spans[found[CTL_ID]]
        n = id.value_n
        _net_strip(self._text + id.value, &n)
        if n == 0:
            return self._reject(400, "Required header 'NServiceBus.Id' missing.", callback)
        if id.value_n > self.max_id_bytes:
            return self._reject(
                400, f"Header 'NServiceBus.Id' is longer than {self.max_id_bytes} bytes.", callback)

        if found[CTL_CALL_TYPE] < 0:
            return self._reject_known(400, "Required header 'NServiceBus.CallType' missing.", callback,
                                      found, body_bytes)
        s = &self._spans[found[CTL_CALL_TYPE]]
        i = _call_type(self._text + s.value, s.value_n)
        if i == CALL_TYPE_DATABUS:
            found[CTL_DATABUS_KEY] = self._lookup(CTL_DATABUS_KEY)
            return self._databus_part(found, body_bytes, streamed, callback, now_ms)
        if i != CALL_TYPE_SUBMIT:
            return self._reject_known(
                400, f"Invalid CallType '{self._str(s.value, s.value_n)}'. CallTypes supported "
                     f"'SingleCallSubmit, SingleCallDatabusProperty'", callback, found, body_bytes)

        if found[CTL_CONTENT_MD5] >= 0:
            s = &self._spans[found[CTL_CONTENT_MD5]]
            _content_md5(body_bytes, md5)
            if s.value_n != MD5_BASE64_LEN or memcmp(self._text + s.value, md5, MD5_BASE64_LEN):
                return self._reject_known(
                    412, "MD5 hash received does not match hash calculated on server. "
                         "Please resubmit.", callback, found, body_bytes)
        if self._in_batch:
            # A batch message's body digest (docs/protocol.md): a Content-Digest of sha-256.
            # (Outside a batch, the verifier checks a signed request's Content-Digest.)
            i = self._lookup(CTL_CONTENT_DIGEST)
            if i >= 0:
                s = &self._spans[i]
                if s.value_n < 9 or memcmp(self._text + s.value, b"sha-256=:", 9):
                    return self._reject_known(
                        400, "Bad Request: a batch message's Content-Digest must be sha-256=:<base64>:",
                        callback, found, body_bytes)
                _content_sha256(body_bytes, sha256)
                if s.value_n != SHA256_DIGEST_LEN or memcmp(self._text + s.value, sha256, SHA256_DIGEST_LEN):
                    return self._reject_known(
                        412, "Content-Digest received does not match the sha-256 calculated on server. "
                             "Please resubmit.", callback, found, body_bytes)
        gateway = found[CTL_GATEWAY] >= 0
        # Claim-check headers: their parts are looked up (and the values rewritten) by the
        # writer, in the transaction that records the message (gwcore/databus/records.py).
        if self._mark(first, end):
            databus = self._databus_names(first, end, gateway)
        if gateway and found[CTL_CORRELATION_ID] < 0:
            # NServiceBus reads it with a throwing indexer: an unhandled exception -> 502
            return self._reject_known(502, "Unexpected server error", callback, found, body_bytes)
        if found[CTL_TTBR] >= 0:
            s = &self._spans[found[CTL_TTBR]]
            ttbr = self._text + s.value
            ttbr_n = s.value_n
        env = Envelope.__new__(Envelope)
        env.expiry_ms = _expiry(ttbr, ttbr_n, now_ms, gateway)
        if gateway:
            first, end = end, self._gateway_headers(first, end, found[CTL_CORRELATION_ID])

        id = &self._spans[found[CTL_ID]]        # spans may have moved
        env.id = self._str(id.value, id.value_n)
        env.key = self._key(id)
        env.call_type = CALL_TYPE_SUBMIT
        env.accepted_ms = now_ms
        env.body = body_bytes
        env.callback = callback
        env.databus = databus
        if self.signatures:
            env.auth_date = self._value_or_none(found[CTL_AUTH_DATE])
            env.auth_signature = self._value_or_none(found[CTL_AUTH_SIGNATURE])
            if found[CTL_AUTH_SIGNATURE] >= 0:
                env.auth_headers = self._auth_headers
                env.content_digest = self._value_or_none(found[CTL_CONTENT_DIGEST])
        env.framed = self._envelope(id, first, end, body_bytes, env.expiry_ms, now_ms)
        self.framed_total += 1
        return env
