# Part of gwcore/_dedup.pyx (included there, compiled as one module). gwcore._dedup: the sending
# side's framing: a stored envelope straight to the HTTP header block NServiceBus's forwarder sends
# (protocol.md §1.3), in one call. gwcore/egress.py's wire_headers() is the readable reference and
# the tests hold the two equal.

cdef struct _TextSpan:
    const unsigned char* p
    Py_ssize_t n


cdef inline unsigned char* _put_lit(unsigned char* w, const char* s, Py_ssize_t n) noexcept nogil:
    memcpy(w, s, n)
    return w + n


cdef unsigned char* _put_encoded(unsigned char* w, const unsigned char* src, Py_ssize_t n) noexcept nogil:
    # WebUtility.UrlEncode over UTF-8 bytes: safe bytes as they are, space as '+', the rest %XX.
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = src[i]
        if URL_SAFE[c]:
            w[0] = c
            w += 1
        elif c == ASCII_SPACE:
            w[0] = ASCII_PLUS
            w += 1
        else:
            w[0] = ASCII_PERCENT
            w[1] = HEX_DIGITS[c >> 4]
            w[2] = HEX_DIGITS[c & 15]
            w += 3
    return w


cdef unsigned char* _put_line(unsigned char* w, const char* name, Py_ssize_t name_n,
                              const unsigned char* value, Py_ssize_t value_n) noexcept nogil:
    w = _put_lit(w, name, name_n)
    w = _put_lit(w, ": ", 2)
    w = _put_encoded(w, value, value_n)
    return _put_lit(w, "\r\n", 2)


cdef inline bint _span_is(_TextSpan s, const char* text, Py_ssize_t n) noexcept nogil:
    return s.n == n and memcmp(s.p, text, n) == 0


def encode_submit(framed, list extra=None):
    """See _dedup.pyi."""
    cdef const unsigned char[::1] view = framed
    cdef _Reader r
    r.left = view.shape[0]
    r.p = &view[0] if r.left else <const unsigned char*>b""
    return _encode_submit(&r, extra, False)


cdef tuple _encode_submit(_Reader* envelope, list extra, bint sha256):
    # r points at exactly one envelope: (id, body, expiry_ms, header block), see encode_submit;
    # with sha256, the body's digest is a Content-Digest of sha-256 (a batch message's, see
    # encode_outgoing_batch) instead of its Content-MD5.
    cdef _Reader r = envelope[0]
    cdef uint64_t accepted_ms, expiry_ms, body_n
    cdef uint32_t count, i, j, k
    cdef _TextSpan id_span, span
    cdef _TextSpan* names = NULL
    cdef _TextSpan* values = NULL
    cdef Py_ssize_t total, extra_n = 0, slots
    cdef const unsigned char* body_p
    cdef unsigned char digest[SHA256_DIGEST_LEN]
    cdef unsigned char* buf = NULL
    cdef unsigned char* w
    cdef Py_ssize_t correlation = -1, ttbr = -1, reply_to = -1
    cdef const char* text
    cdef Py_ssize_t text_n
    cdef bytes body, block
    cdef str msg_id
    _envelope_begin(&r, &accepted_ms, &expiry_ms)
    id_span.n = _get_u32(_take(&r, 4, "the id"))
    id_span.p = _take(&r, id_span.n, "the id")
    try:
        msg_id = PyUnicode_DecodeUTF8(<const char*>id_span.p, id_span.n, NULL)
    except UnicodeDecodeError as exc:
        # as decode_envelope says it (names and values are copied as bytes, never decoded)
        raise FramingError("envelope has invalid UTF-8 in the id") from exc
    count = _get_u32(_take(&r, 4, "the header count"))
    if count > r.left // 8:
        # every header takes two 4-byte lengths: refuse a count the rest cannot hold before
        # sizing anything by it (a damaged count would ask for up to 64 GiB)
        raise FramingError(f"envelope truncated in the headers: {count} headers need at least "
                           f"{8 * <uint64_t>count} bytes, {r.left} left")
    if extra is not None:
        extra_n = len(extra)
    slots = <Py_ssize_t>count + extra_n
    names = <_TextSpan*>PyMem_Malloc(max(slots, 1) * sizeof(_TextSpan))
    values = <_TextSpan*>PyMem_Malloc(max(slots, 1) * sizeof(_TextSpan))
    try:
        if names == NULL or values == NULL:
            raise MemoryError()
        total = 256 + 3 * id_span.n * 2
        for i in range(count):
            names[i].n = _get_u32(_take(&r, 4, "a header name"))
            names[i].p = _take(&r, names[i].n, "a header name")
            values[i].n = _get_u32(_take(&r, 4, "a header value"))
            values[i].p = _take(&r, values[i].n, "a header value")
        body_n = _get_u64(_take(&r, 8, "the body length"))
        body_p = _take(&r, body_n, "the body")
        if r.left:
            raise FramingError(f"{r.left} unexpected bytes after the envelope body")
        # Extra headers (the retry counters) replace a stored header of the same name in place, or
        # come after the stored ones: the order a dict update gives in egress.wire_headers().
        k = count
        for j in range(extra_n):
            pair = extra[j]
            text = PyUnicode_AsUTF8AndSize(<str?>pair[0], &text_n)
            span.p = <const unsigned char*>text
            span.n = text_n
            text = PyUnicode_AsUTF8AndSize(<str?>pair[1], &text_n)
            for i in range(k):
                if names[i].n == span.n and memcmp(names[i].p, span.p, span.n) == 0:
                    values[i].p = <const unsigned char*>text
                    values[i].n = text_n
                    break
            else:
                names[k] = span
                values[k].p = <const unsigned char*>text
                values[k].n = text_n
                k += 1
        for i in range(k):
            total += 3 * (names[i].n + values[i].n) + 32
            if _span_is(names[i], "NServiceBus.CorrelationId", 25):
                correlation = i
            elif _span_is(names[i], "NServiceBus.TimeToBeReceived", 28):
                ttbr = i
            elif _span_is(names[i], "NServiceBus.ReplyToAddress", 26):
                reply_to = i
        total += 3 * (values[correlation].n if correlation >= 0 else id_span.n)
        if ttbr >= 0:
            total += 3 * values[ttbr].n + 32
        if reply_to >= 0:
            total += 3 * values[reply_to].n + 32
        body = PyBytes_FromStringAndSize(<const char*>body_p, <Py_ssize_t>body_n)
        if sha256:
            _content_sha256(body, digest)
            total += 3 * SHA256_DIGEST_LEN
        else:
            _content_md5(body, digest)
        buf = <unsigned char*>PyMem_Malloc(total)
        if buf == NULL:
            raise MemoryError()
        w = _put_line(buf, "NServiceBus.Id", 14, id_span.p, id_span.n)
        if correlation >= 0:
            w = _put_line(w, "NServiceBus.CorrelationId", 25, values[correlation].p, values[correlation].n)
        else:
            w = _put_line(w, "NServiceBus.CorrelationId", 25, id_span.p, id_span.n)
        if ttbr >= 0:
            w = _put_line(w, "NServiceBus.TimeToBeReceived", 28, values[ttbr].p, values[ttbr].n)
        if reply_to >= 0:
            w = _put_line(w, "NServiceBus.ReplyToAddress", 26, values[reply_to].p, values[reply_to].n)
        for i in range(k):
            w = _put_lit(w, "NServiceBus.Header.", 19)
            w = _put_encoded(w, names[i].p, names[i].n)
            w = _put_lit(w, ": ", 2)
            w = _put_encoded(w, values[i].p, values[i].n)
            w = _put_lit(w, "\r\n", 2)
        w = _put_lit(w, "NServiceBus.Gateway: True\r\nNServiceBus.CallType: SingleCallSubmit\r\n", 67)
        if sha256:
            w = _put_line(w, "Content-Digest", 14, digest, SHA256_DIGEST_LEN)
        else:
            w = _put_line(w, "Content-MD5", 11, digest, MD5_BASE64_LEN)
        block = PyBytes_FromStringAndSize(<const char*>buf, w - buf)
    finally:
        PyMem_Free(names)
        PyMem_Free(values)
        PyMem_Free(buf)
    return msg_id, body, expiry_ms, block


# -- the outgoing record (egress.py's module docstring has its layout) --------------------------------

cdef enum:
    OUTGOING_HEAD = 8 + 4 + 2                          # next attempt ms, attempts, destination length
    # what encode_outgoing_batch says of each record
    _OUT_IN_BATCH = 0
    _OUT_EXPIRED = 1
    _OUT_ALONE = 2
    _OUT_LEFT = 3
    _OUT_TOO_BIG = 4

OUT_IN_BATCH = _OUT_IN_BATCH
OUT_EXPIRED = _OUT_EXPIRED
OUT_ALONE = _OUT_ALONE
OUT_LEFT = _OUT_LEFT
OUT_TOO_BIG = _OUT_TOO_BIG


cdef uint32_t _outgoing_envelope(_Reader* r, const unsigned char* p, Py_ssize_t n) except? 0xFFFFFFFF:
    # Points r at the record's envelope; returns its failed attempts so far.
    cdef uint32_t attempt, error_n
    cdef uint16_t dest_n
    r.p = p
    r.left = n
    _take(r, OUTGOING_HEAD, "the outgoing record's head")
    attempt = _get_u32(p + 8)
    dest_n = (<uint16_t>p[12] << 8) | p[13]
    _take(r, dest_n, "the outgoing record's destination")
    error_n = _get_u32(_take(r, 4, "the outgoing record's last failure length"))
    _take(r, error_n, "the outgoing record's last failure")
    return attempt


def outgoing_layout(value):
    """See _dedup.pyi."""
    cdef const unsigned char[::1] view = value
    cdef _Reader r
    cdef uint32_t attempt
    cdef const unsigned char* p = &view[0] if view.shape[0] else <const unsigned char*>b""
    attempt = _outgoing_envelope(&r, p, view.shape[0])
    return (_get_u64(p), attempt, (<uint16_t>p[12] << 8) | p[13], r.p - p)


def encode_outgoing_batch(list values not None, bytes alone not None, str retried_at not None,
                          uint64_t now_ms, Py_ssize_t max_messages, Py_ssize_t max_bytes):
    """See _dedup.pyi."""
    cdef Py_ssize_t n = len(values), i, size = BATCH_HEAD, add
    cdef bytes kinds = PyBytes_FromStringAndSize(NULL, n)
    cdef unsigned char* kind = <unsigned char*>PyBytes_AS_STRING(kinds)
    cdef list messages = []
    cdef list extra
    cdef bytes value
    cdef tuple framed
    cdef _Reader r
    cdef uint32_t attempt
    cdef bint full = False
    for i in range(n):
        value = <bytes?>values[i]
        attempt = _outgoing_envelope(&r, <const unsigned char*>PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))
        if alone in value:
            kind[i] = _OUT_ALONE
            continue
        if full:
            kind[i] = _OUT_LEFT
            continue
        extra = None
        if attempt:
            extra = [("NServiceBus.Retries", str(attempt)), ("NServiceBus.Retries.Timestamp", retried_at)]
        framed = _encode_submit(&r, extra, True)
        if framed[2] and <uint64_t>framed[2] < now_ms:
            kind[i] = _OUT_EXPIRED
            continue
        add = BATCH_MESSAGE_FIXED + PyBytes_GET_SIZE(<bytes>framed[3]) + PyBytes_GET_SIZE(<bytes>framed[1])
        if BATCH_HEAD + add > max_bytes:
            kind[i] = _OUT_TOO_BIG
            continue
        if size + add > max_bytes or len(messages) >= max_messages:
            kind[i] = _OUT_LEFT
            full = True
            continue
        messages.append((framed[3], framed[1]))
        size += add
        kind[i] = _OUT_IN_BATCH
    return (encode_batch(messages) if messages else None), kinds
