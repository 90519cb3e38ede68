# Part of gwcore/_dedup.pyx (included there, compiled as one module): the AMQP 0-9-1 frames of
# basic.publish, built from stored envelopes (selected-instance mode's dispatcher, gwcore/amqp.py).
#
# One call turns a whole dispatch batch into the bytes of its publishes (method frame, content
# header frame with the properties and the header table, body frames), which the dispatcher hands
# the connection's writer as one write. The envelope's text is UTF-8 already and goes to the wire
# as it is stored: nothing is decoded to str and encoded again, no properties object per message.
#
# What a publish carries (as gwcore.amqp.to_amqp describes it, the reference the tests hold this
# to): exchange "" and the routing key of the message's queue (the requesting instance's queue for
# a reply whose RouteTo names one, else the input queue); message_id = the id, correlation_id =
# NServiceBus.CorrelationId (else the id), reply_to = NServiceBus.ReplyToAddress, content_type =
# NServiceBus.ContentType, delivery_mode 2 (an empty value is no property); the header table holds every header as a long string
# ('S'), with gwcore.PossibleDuplicate: true when flagged and gwcore.ExpiryMs when the message
# expires, a repeated name once with its last value, sorted by name. A property value longer than
# a short string (255 bytes) is left out of the properties (it is in the header table, where
# NServiceBus reads it); a header name longer than a field name may be (128 bytes) cannot be a table
# key, and such a message is not encoded (its index is returned).

cdef enum:
    AMQP_FRAME_METHOD = 1
    AMQP_FRAME_HEADER = 2
    AMQP_FRAME_BODY = 3
    AMQP_FRAME_END = 0xCE
    AMQP_FRAME_OVERHEAD = 7 + 1          # type, channel, size; the end octet
    AMQP_CLASS_BASIC = 60
    AMQP_METHOD_PUBLISH = 40
    AMQP_SHORTSTR_MAX = 255
    AMQP_FIELD_NAME_MAX = 128            # a field table's names (AMQP 0-9-1, 4.2.5.5)
    # Basic property flags (AMQP 0-9-1, 4.2.6.1): bit 15 is the first property
    PROP_CONTENT_TYPE = 1 << 15
    PROP_HEADERS = 1 << 13
    PROP_DELIVERY_MODE = 1 << 12
    PROP_CORRELATION_ID = 1 << 10
    PROP_REPLY_TO = 1 << 9
    PROP_MESSAGE_ID = 1 << 7


cdef struct _Text:
    const unsigned char* p
    Py_ssize_t n


cdef struct _Entry:
    _Text name
    _Text value


cdef bytes _POSSIBLE_DUPLICATE = b"gwcore.PossibleDuplicate"
cdef bytes _EXPIRY_MS = b"gwcore.ExpiryMs"
cdef bytes _TRUE = b"true"
cdef bytes _H_CORRELATION_ID = b"NServiceBus.CorrelationId"
cdef bytes _H_REPLY_TO = b"NServiceBus.ReplyToAddress"
cdef bytes _H_CONTENT_TYPE = b"NServiceBus.ContentType"
cdef bytes _H_ROUTE_TO = b"RouteTo"
cdef bytes _H_ROUTE_TO_PREFIXED = b"NServiceBus.Header.RouteTo"


cdef inline bint _same_text(_Text a, const unsigned char* p, Py_ssize_t n) noexcept nogil:
    return a.n == n and memcmp(a.p, p, n) == 0


cdef inline bint _is(_Text a, bytes name) noexcept:
    return _same_text(a, _ptr(name), PyBytes_GET_SIZE(name))


cdef inline bint _before(_Text a, _Text b) noexcept nogil:
    cdef int c = memcmp(a.p, b.p, min(a.n, b.n))
    return c < 0 or (c == 0 and a.n < b.n)


cdef inline unsigned char* _put_u16(unsigned char* p, unsigned int v) noexcept nogil:
    p[0] = <unsigned char>(v >> 8)
    p[1] = <unsigned char>v
    return p + 2


cdef inline Py_ssize_t _short_property(unsigned int* flags, unsigned int flag, _Text t) noexcept nogil:
    # A short-string property goes in when it has a value that fits (1 to 255 bytes): its flag
    # is set and its bytes counted.
    if 0 < t.n <= AMQP_SHORTSTR_MAX:
        flags[0] |= flag
        return 1 + t.n
    return 0


cdef inline unsigned char* _put_short(unsigned char* w, _Text t) noexcept nogil:
    w[0] = <unsigned char>t.n
    memcpy(w + 1, t.p, t.n)
    return w + 1 + t.n


cdef class _PublishScratch:
    # the header entries of the message being encoded, reused from one message to the next
    cdef _Entry* entries
    cdef Py_ssize_t cap
    cdef Py_ssize_t n

    def __dealloc__(self):
        PyMem_Free(self.entries)

    cdef int add(self, _Text name, _Text value) except -1:
        # a repeated name keeps its first place and takes the last value (a dict's assignment)
        cdef Py_ssize_t i
        cdef _Entry* grown
        for i in range(self.n):
            if _same_text(self.entries[i].name, name.p, name.n):
                self.entries[i].value = value
                return 0
        if self.n == self.cap:
            grown = <_Entry*>PyMem_Realloc(self.entries, max(32, self.cap * 2) * sizeof(_Entry))
            if grown == NULL:
                raise MemoryError()
            self.entries = grown
            self.cap = max(32, self.cap * 2)
        self.entries[self.n].name = name
        self.entries[self.n].value = value
        self.n += 1
        return 0

    cdef int add_bytes(self, bytes name, bytes value) except -1:
        cdef _Text n, v
        n.p = _ptr(name)
        n.n = PyBytes_GET_SIZE(name)
        v.p = _ptr(value)
        v.n = PyBytes_GET_SIZE(value)
        return self.add(n, v)

    cdef void sort(self) noexcept:
        # by name, as bytes (UTF-8's byte order is its code point order): insertion sort, stable
        cdef Py_ssize_t i, j
        cdef _Entry e
        for i in range(1, self.n):
            e = self.entries[i]
            j = i - 1
            while j >= 0 and _before(e.name, self.entries[j].name):
                self.entries[j + 1] = self.entries[j]
                j -= 1
            self.entries[j + 1] = e

    cdef Py_ssize_t find(self, bytes name) noexcept:
        cdef Py_ssize_t i
        for i in range(self.n):
            if _is(self.entries[i].name, name):
                return i
        return -1


cdef class _Out:
    # a growing output buffer
    cdef unsigned char* buf
    cdef Py_ssize_t n
    cdef Py_ssize_t cap

    def __dealloc__(self):
        PyMem_Free(self.buf)

    cdef unsigned char* reserve(self, Py_ssize_t more) except NULL:
        cdef Py_ssize_t want = self.n + more
        cdef unsigned char* grown
        if want > self.cap:
            want = max(want, self.cap * 2, 4096)
            grown = <unsigned char*>PyMem_Realloc(self.buf, want)
            if grown == NULL:
                raise MemoryError()
            self.buf = grown
            self.cap = want
        return self.buf + self.n


def encode_publishes(list items not None, unsigned int channel, Py_ssize_t max_content,
                     bytes input_queue not None, bytes instance_prefix not None, *,
                     bint mandatory=False, list ids=None):
    """See _dedup.pyi."""
    cdef _PublishScratch s = _PublishScratch()
    cdef _Out out = _Out()
    cdef list refused = []
    cdef _Reader r
    cdef uint64_t accepted_ms, expiry_ms, body_n, left
    cdef uint32_t count, k
    cdef _Text id, name, value, route, text
    cdef _Text correlation, reply_to, content_type
    cdef Py_ssize_t i, at, index = -1, props_n, table_n, chunk
    cdef unsigned int flags
    cdef const unsigned char* body
    cdef unsigned char* w
    cdef unsigned char* size_at
    cdef bytes framed, expiry_text = None
    cdef bint flagged, too_long
    cdef tuple item
    if channel > 0xFFFF:
        raise ValueError(f"channel {channel} out of range")
    if max_content < 1:
        raise ValueError("max_content must be at least 1")
    if PyBytes_GET_SIZE(input_queue) > AMQP_SHORTSTR_MAX:
        raise ValueError("the input queue's name is longer than 255 bytes")
    for obj in items:
        index += 1
        item = <tuple?>obj
        framed = <bytes?>item[0]
        flagged = bool(item[1])
        r.p = _ptr(framed)
        r.left = PyBytes_GET_SIZE(framed)
        _envelope_begin(&r, &accepted_ms, &expiry_ms)
        id.n = _get_u32(_take(&r, 4, "the id"))
        id.p = _take(&r, id.n, "the id")
        count = _get_u32(_take(&r, 4, "the header count"))
        s.n = 0
        too_long = False
        for k in range(count):
            name.n = _get_u32(_take(&r, 4, "a header name"))
            name.p = _take(&r, name.n, "a header name")
            value.n = _get_u32(_take(&r, 4, "a header value"))
            value.p = _take(&r, value.n, "a header value")
            if name.n > AMQP_FIELD_NAME_MAX:
                too_long = True
            s.add(name, value)
        body_n = _get_u64(_take(&r, 8, "the body length"))
        body = _take(&r, body_n, "the body")
        if r.left:
            raise FramingError(f"{r.left} unexpected bytes after the envelope body")
        if too_long:
            refused.append(index)
            continue
        if ids is not None:
            # what the broker's basic.return names the publish by: its message_id property
            ids.append(PyUnicode_DecodeUTF8(<const char*>id.p, id.n, "replace") if id.n <= AMQP_SHORTSTR_MAX
                       else None)
        # the properties, from the headers as they are before gwcore's own are added
        correlation = id
        at = s.find(_H_CORRELATION_ID)
        if at >= 0:
            correlation = s.entries[at].value
        reply_to.p = NULL
        reply_to.n = -1
        at = s.find(_H_REPLY_TO)
        if at >= 0:
            reply_to = s.entries[at].value
        content_type.p = NULL
        content_type.n = -1
        at = s.find(_H_CONTENT_TYPE)
        if at >= 0:
            content_type = s.entries[at].value
        route.p = _ptr(input_queue)
        route.n = PyBytes_GET_SIZE(input_queue)
        at = s.find(_H_ROUTE_TO)
        if at < 0 or s.entries[at].value.n == 0:
            at = s.find(_H_ROUTE_TO_PREFIXED)
        if at >= 0:
            text = s.entries[at].value
            if (text.n <= AMQP_SHORTSTR_MAX and text.n >= PyBytes_GET_SIZE(instance_prefix)
                    and memcmp(text.p, _ptr(instance_prefix), PyBytes_GET_SIZE(instance_prefix)) == 0):
                route = text
        if flagged:
            s.add_bytes(_POSSIBLE_DUPLICATE, _TRUE)
        if expiry_ms:
            expiry_text = str(expiry_ms).encode("ascii")   # alive until this message is written
            s.add_bytes(_EXPIRY_MS, expiry_text)

        s.sort()
        table_n = 0
        for i in range(s.n):
            table_n += 1 + s.entries[i].name.n + 1 + 4 + s.entries[i].value.n
        if table_n > MAX_U32:
            raise FramingError("a header table longer than 4 GiB")
        flags = PROP_HEADERS | PROP_DELIVERY_MODE
        props_n = 4 + table_n + 1
        props_n += _short_property(&flags, PROP_CONTENT_TYPE, content_type)
        props_n += _short_property(&flags, PROP_CORRELATION_ID, correlation)
        props_n += _short_property(&flags, PROP_REPLY_TO, reply_to)
        props_n += _short_property(&flags, PROP_MESSAGE_ID, id)

        # method frame: basic.publish(reserved, exchange "", routing key, no flags)
        w = out.reserve(AMQP_FRAME_OVERHEAD + 9 + route.n)
        w[0] = AMQP_FRAME_METHOD
        w = _put_u16(w + 1, channel)
        w = _put_u32(w, <uint32_t>(9 + route.n))
        w = _put_u16(w, AMQP_CLASS_BASIC)
        w = _put_u16(w, AMQP_METHOD_PUBLISH)
        w = _put_u16(w, 0)
        w[0] = 0                                    # exchange: the default one
        w = _put_short(w + 1, route)
        # bit 0 mandatory (returned if no queue takes it), for the input queue only: a reply to an
        # instance queue that expired is dropped as before; immediate: no
        w[0] = 1 if mandatory and route.p == _ptr(input_queue) else 0
        w[1] = AMQP_FRAME_END
        out.n += AMQP_FRAME_OVERHEAD + 9 + route.n

        # content header frame: class, weight, body size, property flags, properties
        w = out.reserve(AMQP_FRAME_OVERHEAD + 14 + props_n)
        w[0] = AMQP_FRAME_HEADER
        w = _put_u16(w + 1, channel)
        w = _put_u32(w, <uint32_t>(14 + props_n))
        w = _put_u16(w, AMQP_CLASS_BASIC)
        w = _put_u16(w, 0)
        w = _put_u64(w, body_n)
        w = _put_u16(w, flags)
        if flags & PROP_CONTENT_TYPE:
            w = _put_short(w, content_type)
        w = _put_u32(w, <uint32_t>table_n)
        for i in range(s.n):
            w = _put_short(w, s.entries[i].name)
            w[0] = 0x53                             # 'S': a long string
            w = _put_u32(w + 1, <uint32_t>s.entries[i].value.n)
            memcpy(w, s.entries[i].value.p, s.entries[i].value.n)
            w += s.entries[i].value.n
        w[0] = 2                                    # delivery mode: persistent
        w += 1
        if flags & PROP_CORRELATION_ID:
            w = _put_short(w, correlation)
        if flags & PROP_REPLY_TO:
            w = _put_short(w, reply_to)
        if flags & PROP_MESSAGE_ID:
            w = _put_short(w, id)
        w[0] = AMQP_FRAME_END
        out.n += AMQP_FRAME_OVERHEAD + 14 + props_n

        # body frames of at most max_content bytes
        left = body_n
        while left:
            chunk = <Py_ssize_t>min(left, <uint64_t>max_content)
            w = out.reserve(AMQP_FRAME_OVERHEAD + chunk)
            w[0] = AMQP_FRAME_BODY
            w = _put_u16(w + 1, channel)
            w = _put_u32(w, <uint32_t>chunk)
            memcpy(w, body, chunk)
            w[chunk] = AMQP_FRAME_END
            out.n += AMQP_FRAME_OVERHEAD + chunk
            body += chunk
            left -= <uint64_t>chunk
    if out.buf == NULL:
        return b"", refused
    return PyBytes_FromStringAndSize(<const char*>out.buf, out.n), refused


def envelope_key(framed, bytes prefix not None):
    """See _dedup.pyi."""
    cdef const unsigned char[::1] view = framed
    cdef _Reader r
    cdef uint64_t accepted_ms, expiry_ms
    cdef uint32_t n
    cdef const unsigned char* p
    cdef bytes out
    r.left = view.shape[0]
    r.p = &view[0] if r.left else <const unsigned char*>b""
    _envelope_begin(&r, &accepted_ms, &expiry_ms)
    n = _get_u32(_take(&r, 4, "the id"))
    p = _take(&r, n, "the id")
    out = PyBytes_FromStringAndSize(NULL, PyBytes_GET_SIZE(prefix) + n)
    memcpy(PyBytes_AS_STRING(out), _ptr(prefix), PyBytes_GET_SIZE(prefix))
    memcpy(PyBytes_AS_STRING(out) + PyBytes_GET_SIZE(prefix), p, n)
    return out


def longest_header_name(framed):
    """See _dedup.pyi."""
    cdef const unsigned char[::1] view = framed
    cdef _Reader r
    cdef uint64_t accepted_ms, expiry_ms
    cdef uint32_t count, k, n, longest = 0
    r.left = view.shape[0]
    r.p = &view[0] if r.left else <const unsigned char*>b""
    _envelope_begin(&r, &accepted_ms, &expiry_ms)
    _take(&r, _get_u32(_take(&r, 4, "the id")), "the id")
    count = _get_u32(_take(&r, 4, "the header count"))
    for k in range(count):
        n = _get_u32(_take(&r, 4, "a header name"))
        _take(&r, n, "a header name")
        longest = max(longest, n)
        _take(&r, _get_u32(_take(&r, 4, "a header value")), "a header value")
    return longest
