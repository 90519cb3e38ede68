# Part of gwcore/_dedup.pyx (included there, compiled as one module). gwcore._dedup: an HTTP/1.1 request parser that frames gateway requests straight from its receive buffer (RequestParser).

from libc.string cimport memchr, memmove

# ---------------------------------------------------------------------------------------------
# HTTP/1.1 request parsing

cdef enum:
    EVENT_SUBMIT = 0
    EVENT_OTHER = 1
    EVENT_CONTINUE = 2
    EVENT_ERROR = 3
    EVENT_PART_BEGIN = 4                # a databus part's head: its body follows as PART_DATA
    EVENT_PART_DATA = 5
    EVENT_PART_END = 6

    ASCII_QUOTE = 0x22
    ASCII_SEMICOLON = 0x3B
    ASCII_SLASH = 0x2F
    ASCII_COMMA = 0x2C
    ASCII_STAR = 0x2A

    MAX_EARLY_CHECK = 32                # bytes of an unfinished line checked before its end
    BUFFER_KEEP = 262144                # a receive buffer larger than this shrinks when mostly empty

    # RequestParser._state
    RP_START = 0                        # between requests: empty lines are skipped (as llhttp)
    RP_LINE                             # the request line
    RP_HEADERS                          # header lines, up to the empty line
    RP_BODY                             # a Content-Length body
    RP_CHUNK_SIZE                       # chunk-size [;ext] CRLF
    RP_CHUNK_DATA
    RP_CHUNK_END                        # the CRLF after chunk data
    RP_TRAILER                          # trailer lines after the last chunk, up to the empty line
    RP_COMPLETE                         # a whole request is in: report it
    RP_DONE                             # finished: an error, or a request without keep-alive

EV_SUBMIT = EVENT_SUBMIT
EV_OTHER = EVENT_OTHER
EV_CONTINUE = EVENT_CONTINUE
EV_ERROR = EVENT_ERROR
EV_PART_BEGIN = EVENT_PART_BEGIN
EV_PART_DATA = EVENT_PART_DATA
EV_PART_END = EVENT_PART_END

cdef tuple CONTINUE_EVENT = (EVENT_CONTINUE,)
cdef tuple PART_END_EVENT = (EVENT_PART_END,)
cdef tuple BUILTIN_PATHS = (b"/healthz", b"/readyz", b"/metrics")   # never a channel (http.py)
# gwcore's own calls (the worker protocol) live under this prefix; their gwcore-* headers (the
# signature of a worker call) are handed to Python with the EV_OTHER event.
cdef bytes GWCORE_PREFIX = b"/.gwcore/"

# RFC 9110 tchar: method and header name characters.
cdef unsigned char TOKEN[256]


cdef void _init_http_tables():
    cdef int c
    for c in range(256):
        TOKEN[c] = (
            (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122)
            or c in b"!#$%&'*+-.^_`|~"
        )


_init_http_tables()


cdef inline bint _is_ctl(unsigned char c) noexcept nogil:
    # not allowed in a field value (HTAB is): llhttp's strict mode refuses these too
    return (c < ASCII_SPACE and c != ASCII_TAB) or c == ASCII_DEL


cdef inline bint _has_ctl8(uint64_t x) noexcept nogil:
    # Some byte of x is below 0x20 or is 0x7F (bytes 0x80 and up never count).
    cdef uint64_t low = (x - 0x2020202020202020ULL) & ~x & 0x8080808080808080ULL
    cdef uint64_t d = x ^ 0x7F7F7F7F7F7F7F7FULL
    return (low | ((d - 0x0101010101010101ULL) & ~d & 0x8080808080808080ULL)) != 0


cdef bint _is_word(const unsigned char* p, Py_ssize_t n, const char* word, Py_ssize_t m) noexcept nogil:
    # p[0:n] equals the lower-case ASCII word, ignoring case
    return n == m and _same(p, <const unsigned char*>word, n, False)


cdef const char* _field_error(const unsigned char* p, Py_ssize_t n, Py_ssize_t* colon,
                              Py_ssize_t* value, Py_ssize_t* value_end) noexcept nogil:
    # Checks one header (or trailer) line without its CRLF: name ":" OWS value OWS. Returns NULL
    # and where name, value and its end are, or what is wrong.
    cdef Py_ssize_t i = 0, v, e, k
    cdef uint64_t word
    if _is_ows(p[0]):
        return "obsolete line folding"
    while i < n and TOKEN[p[i]]:
        i += 1
    if i < n and p[i] == ASCII_COLON and i == 0:
        return "empty header name"
    if i == n or p[i] != ASCII_COLON:
        return "invalid header name character"
    colon[0] = i
    v = i + 1
    e = _trim_ows(p, &v, n)
    i = v
    while i + 8 <= e:
        # eight bytes at a time; a word with a byte below 0x20 (a TAB too) or a DEL is looked
        # at byte by byte
        memcpy(&word, p + i, 8)
        if _has_ctl8(word):
            for k in range(i, i + 8):
                if _is_ctl(p[k]):
                    return "invalid header value character"
        i += 8
    while i < e:
        if _is_ctl(p[i]):
            return "invalid header value character"
        i += 1
    value[0] = v
    value_end[0] = e
    return NULL


cdef const char* _line_start_error(const unsigned char* p, Py_ssize_t n, bint request_line) noexcept nogil:
    # What is wrong with the start of an unfinished line already, or NULL: a request line starts
    # with a method (token) and a space, a field line with a name (token) and a colon; a field
    # line may also be the CR of the empty line.
    cdef Py_ssize_t i = 0
    if not request_line and p[0] == ASCII_CR:
        return NULL
    if not request_line and _is_ows(p[0]):
        return "obsolete line folding"
    while i < n and TOKEN[p[i]]:
        i += 1
    if i == n:
        return NULL
    if request_line:
        if i > 0 and p[i] == ASCII_SPACE:
            return NULL
        return "invalid method"
    if i > 0 and p[i] == ASCII_COLON:
        return NULL
    return "invalid header name character"


cdef const char* _early_error(const unsigned char* buf, Py_ssize_t pos, Py_ssize_t checked,
                              Py_ssize_t stop, bint request_line) noexcept nogil:
    # What is wrong with the line at buf[pos] already in its bytes before `stop` (no LF among
    # them), or NULL: a CR with a byte after it, or a start that cannot become a request line or
    # a field. Bytes before `checked` were looked at already (the CR before it is again: what
    # follows it may be new).
    cdef Py_ssize_t i = max(pos, checked - 1)
    if stop - 1 > i and memchr(buf + i, ASCII_CR, stop - 1 - i) != NULL:
        return "CR without LF"
    if checked - pos < MAX_EARLY_CHECK and stop > pos:
        return _line_start_error(buf + pos, min(stop - pos, MAX_EARLY_CHECK), request_line)
    return NULL


cdef bint _absolute_form(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    # scheme "://" ...: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
    cdef Py_ssize_t i = 1
    if n == 0 or not (65 <= (p[0] | 0x20) - 32 <= 90):
        return False
    while i < n and (TOKEN[p[i]] and (p[i] in b"+-." or 48 <= p[i] <= 57 or 65 <= (p[i] | 0x20) - 32 <= 90)):
        i += 1
    return n - i > 3 and memcmp(p + i, b"://", 3) == 0


cdef int _past_limit(RequestParser parser, list events, Py_ssize_t over, Py_ssize_t end,
                     bint request_line) except -1:
    # The header section goes past its bound at byte `over`, in the line at _pos whose bytes
    # before `end` are in: what is wrong with the line by then is a 400, as it would be had the
    # bytes come one at a time; otherwise 431.
    cdef const char* error = _early_error(parser._buf, parser._pos, parser._pos, min(end, over + 1),
                                          request_line)
    if error != NULL:
        return parser._malformed(events, error.decode("ascii"))
    return parser._fail(events, 431, _header_section_too_big(parser._max_header_bytes))


cdef class RequestParser:
    def __cinit__(self):
        self._buf = NULL
        self._headers = NULL
        self._raw = NULL

    def __init__(self, Framer framer not None, list channel_paths not None, *, int max_headers,
                 Py_ssize_t max_header_bytes, Py_ssize_t max_body, bint allow_get,
                 Py_ssize_t max_blob=-1):
        for path in channel_paths:
            if (type(path) is not bytes or not path.startswith(b"/") or not path.endswith(b"/")
                    or path.lower() != path):
                raise ConfigurationError(
                    f"channel paths must be lower-case bytes starting and ending with '/', got {path!r}")
        if max_headers < 0 or max_header_bytes < 0 or max_body < 0:
            raise ConfigurationError("RequestParser limits must not be negative")
        self._framer = framer
        self._channel_paths = list(channel_paths)
        self._max_headers = max_headers
        self._max_header_bytes = max_header_bytes
        self._max_body = max_body
        self._max_blob = max_body if max_blob < 0 else max_blob
        self._limit = max_body
        self._allow_get = allow_get
        self._state = RP_START
        self._reset()

    def __dealloc__(self):
        PyMem_Free(self._buf)
        PyMem_Free(self._headers)
        PyMem_Free(self._raw)

    cdef unsigned char* _room(self, Py_ssize_t n) except NULL:
        return _grow(&self._buf, &self._cap, self._len, n)

    cdef int _reset(self) except -1:
        self._headers_n = 0
        self._length = -1
        self._has_te = self._chunked = False
        self._conn_close = self._conn_keep_alive = self._conn_upgrade = self._has_upgrade = False
        self._expect = self._continue_sent = False
        self._submit = self._part = False
        self._limit = self._max_body
        self._method_bytes = self._path_bytes = None
        self._extra_headers = None
        self._body_n = self._body_total = self._remaining = self._trailer = 0
        return 0

    def feed(self, data, uint64_t now_ms):
        cdef list events = []
        cdef const unsigned char[::1] view
        cdef const unsigned char* p
        cdef Py_ssize_t n, take
        if self._state == RP_DONE:
            return events
        if type(data) is bytes:
            p = <const unsigned char*>PyBytes_AS_STRING(data)
            n = PyBytes_GET_SIZE(data)
        else:
            view = data
            n = view.shape[0]
            p = &view[0] if n else NULL
        if (n and self._part and self._state == RP_BODY and self._pos == self._len
                and type(data) is bytes):
            # A streamed part's body with nothing buffered: hand the received bytes on as they
            # are (no copy into the buffer and out again); only what follows the body is kept.
            take = min(n, self._remaining)
            events.append((EVENT_PART_DATA, data if take == n else data[:take]))
            self._remaining -= take
            if self._remaining == 0:
                self._state = RP_COMPLETE
            p += take
            n -= take
        if n:
            memcpy(self._room(n), p, n)
            self._len += n
        self._parse(events, now_ms)
        if self._state == RP_DONE:
            self._len = self._start = self._pos = self._scan = 0
        else:
            if (self._expect and not self._continue_sent
                    and RP_BODY <= self._state <= RP_TRAILER):
                # .NET WebRequest waits (350 ms) for "100 Continue" before it sends the body
                self._continue_sent = True
                events.append(CONTINUE_EVENT)
            self._compact()
        self.in_request = self._state != RP_START and self._state != RP_DONE
        return events

    def streamed_body_left(self):
        """Bytes of a streamed databus part's body still to come when nothing of it is buffered
        here (the caller may then receive them itself, straight into its own buffers, and report
        them with :meth:`body_taken`); 0 otherwise (chunked bodies included)."""
        if self._part and self._state == RP_BODY and self._pos == self._len:
            return self._remaining
        return 0

    def body_taken(self, Py_ssize_t n):
        """*n* bytes of the streamed part's body were received by the caller, not fed here. When
        that ends the body, the next :meth:`feed` (with ``b""`` or what follows) reports
        ``EV_PART_END``."""
        if not (self._part and self._state == RP_BODY and self._pos == self._len) or not 0 <= n <= self._remaining:
            raise ValueError("body_taken: no streamed part body of that size is being received")
        self._remaining -= n
        if self._remaining == 0:
            self._state = RP_COMPLETE

    cdef Py_ssize_t _line(self) noexcept:
        # The LF ending the line at _pos, or -1 (then nothing before _len needs scanning again).
        cdef const void* hit = memchr(self._buf + self._scan, ASCII_LF, self._len - self._scan)
        if hit == NULL:
            self._scan = self._len
            return -1
        return <const unsigned char*>hit - self._buf

    cdef int _fail(self, list events, int status, str reason) except -1:
        events.append((EVENT_ERROR, status, reason))
        self._state = RP_DONE
        self._method_bytes = self._path_bytes = None
        return 0

    cdef int _malformed(self, list events, str detail) except -1:
        return self._fail(events, 400, f"Bad Request: malformed HTTP ({detail})")

    cdef int _parse(self, list events, uint64_t now_ms) except -1:
        cdef Py_ssize_t k, n, take, over
        cdef int st
        cdef const char* error
        cdef Py_ssize_t colon, value, value_end
        while True:
            st = self._state
            if st == RP_START:
                while self._pos < self._len and (self._buf[self._pos] == ASCII_CR
                                                 or self._buf[self._pos] == ASCII_LF):
                    self._pos += 1
                self._start = self._scan = self._pos
                if self._pos == self._len:
                    return 0
                self._reset()
                self._state = RP_LINE
            elif st == RP_LINE or st == RP_HEADERS or st == RP_TRAILER:
                take = self._scan
                k = self._line()
                # The header section's bound: the line's bytes before `over` fit in it, the byte
                # at `over` is the first past it. A section that is both malformed and too long
                # is answered by whichever comes first in its bytes (400 or 431), so the answer
                # does not depend on how the bytes were cut into reads.
                over = self._max_header_bytes + (
                    self._pos - self._trailer if st == RP_TRAILER else self._start)
                if k < 0:
                    # a CR that is not the end of the line is an error now, not at its LF; and so
                    # is a line that cannot become a request line or a field (garbage after a
                    # request), looked at while the start of the line is short
                    error = _early_error(self._buf, self._pos, take, min(self._len, over + 1), st == RP_LINE)
                    if error != NULL:
                        return self._malformed(events, error.decode("ascii"))
                    # Unfinished: what is buffered bounds the section from below (a lone CR
                    # may still become its closing empty line).
                    if self._len > over and not (st != RP_LINE and self._len - self._pos == 1
                                                 and self._buf[self._pos] == ASCII_CR):
                        return _past_limit(self, events, over, self._len, st == RP_LINE)
                    return 0
                if k == self._pos or self._buf[k - 1] != ASCII_CR:
                    if k > over:
                        return _past_limit(self, events, over, k, st == RP_LINE)
                    return self._malformed(events, "LF without CR")
                n = k - 1 - self._pos
                if n == 0 and st != RP_LINE:
                    self._pos = self._scan = k + 1
                    if st == RP_HEADERS:
                        self._headers_complete(events, now_ms)
                    else:
                        self._state = RP_COMPLETE
                    continue
                if k >= over:
                    # the line with its CRLF goes past the bound
                    return _past_limit(self, events, over, k, st == RP_LINE)
                if st == RP_TRAILER:
                    self._trailer += n + 2
                if st == RP_LINE:
                    self._request_line(events, n)
                elif st == RP_HEADERS:
                    self._header_line(events, n)
                else:
                    error = _field_error(self._buf + self._pos, n, &colon, &value, &value_end)
                    if error != NULL:
                        return self._malformed(events, error.decode("ascii"))
                if self._state == RP_DONE:
                    return 0
                self._pos = self._scan = k + 1
                if not self._submit and st == RP_TRAILER:
                    self._start = self._pos
            elif st == RP_BODY or st == RP_CHUNK_DATA:
                take = min(self._len - self._pos, self._remaining)
                if take == 0:
                    return 0
                if self._part:
                    # streamed: handed out now, never kept (GWCORE_MAX_BLOB may be gigabytes)
                    events.append((EVENT_PART_DATA, PyBytes_FromStringAndSize(
                        <const char*>self._buf + self._pos, take)))
                elif self._submit:
                    if st == RP_CHUNK_DATA:
                        # de-chunked in place, right after the part of the body already in
                        memmove(self._buf + self._body + self._body_n, self._buf + self._pos, take)
                    self._body_n += take
                self._pos += take
                self._remaining -= take
                if not self._submit:
                    self._start = self._pos
                if self._remaining == 0:
                    self._state = RP_COMPLETE if st == RP_BODY else RP_CHUNK_END
            elif st == RP_CHUNK_END:
                n = self._len - self._pos
                if n == 0 or (n == 1 and self._buf[self._pos] == ASCII_CR):
                    return 0
                if self._buf[self._pos] != ASCII_CR or self._buf[self._pos + 1] != ASCII_LF:
                    return self._malformed(events, "no CRLF after chunk data")
                self._pos = self._scan = self._pos + 2
                if not self._submit:
                    self._start = self._pos
                self._state = RP_CHUNK_SIZE
            elif st == RP_CHUNK_SIZE:
                k = self._line()
                if k < 0:
                    if self._len - self._pos > self._max_header_bytes:
                        return self._malformed(events, "chunk size line too long")
                    return 0
                if k - self._pos > self._max_header_bytes:
                    # the same bound when the whole line came in one read
                    return self._malformed(events, "chunk size line too long")
                if k == self._pos or self._buf[k - 1] != ASCII_CR:
                    return self._malformed(events, "LF without CR")
                self._chunk_size(events, k - 1 - self._pos)
                if self._state == RP_DONE:
                    return 0
                self._pos = self._scan = k + 1
                if not self._submit:
                    self._start = self._pos
            elif st == RP_COMPLETE:
                self._complete(events, now_ms)
            else:
                return 0

    cdef int _request_line(self, list events, Py_ssize_t n) except -1:
        # method SP request-target SP HTTP/1.x
        cdef const unsigned char* p = self._buf + self._pos
        cdef Py_ssize_t i = 0, t
        while i < n and TOKEN[p[i]]:
            i += 1
        if i == 0 or i == n or p[i] != ASCII_SPACE:
            return self._malformed(events, "invalid method")
        self._method = self._pos
        self._method_n = i
        t = i = i + 1
        while i < n and ASCII_SPACE < p[i] < ASCII_DEL:
            i += 1
        if i == t or i == n or p[i] != ASCII_SPACE or not (
                p[t] == ASCII_SLASH or p[t] == ASCII_STAR
                or _absolute_form(p + t, i - t)
                or (self._method_n == 7 and memcmp(p, b"CONNECT", 7) == 0)):
            # origin-form, "*", absolute-form; CONNECT's authority-form is refused later
            return self._malformed(events, "invalid request target")
        self._target = self._pos + t
        self._target_n = i - t
        i += 1
        if n - i != 8 or memcmp(p + i, b"HTTP/1.", 7) or not (p[i + 7] == ASCII_0 or p[i + 7] == ASCII_1):
            return self._malformed(events, "invalid HTTP version")
        self._http11 = p[i + 7] == ASCII_1
        self._state = RP_HEADERS
        return 0

    cdef int _header_line(self, list events, Py_ssize_t n) except -1:
        cdef const unsigned char* p = self._buf + self._pos
        cdef Py_ssize_t colon, v, e, i, j, k
        cdef unsigned long long number = 0
        cdef const char* error = _field_error(p, n, &colon, &v, &e)
        cdef _HeaderAt* grown
        cdef _HeaderAt* h
        if error != NULL:
            return self._malformed(events, error.decode("ascii"))
        if self._headers_n >= self._max_headers:
            return self._fail(events, 431, _too_many_headers(self._max_headers))
        if self._headers_n == self._headers_cap:
            grown = <_HeaderAt*>PyMem_Realloc(self._headers, max(MIN_SPANS, 2 * self._headers_cap) * sizeof(_HeaderAt))
            if grown == NULL:
                raise MemoryError()
            self._headers = grown
            self._headers_cap = max(MIN_SPANS, 2 * self._headers_cap)
        h = &self._headers[self._headers_n]
        self._headers_n += 1
        h.name = self._pos
        h.name_n = colon
        h.value = self._pos + v
        h.value_n = e - v
        # the headers that shape the message (RFC 9112 section 6; llhttp's rules)
        if _is_word(p, colon, "content-length", 14):
            if self._length >= 0:
                return self._malformed(events, "duplicate Content-Length")
            if e == v:
                return self._malformed(events, "empty Content-Length")
            for i in range(v, e):
                if not ASCII_0 <= p[i] <= ASCII_0 + 9:
                    return self._malformed(events, "invalid Content-Length")
                if number < NUMBER_CAP:
                    number = number * 10 + (p[i] - ASCII_0)
            self._length = <Py_ssize_t>number
        elif _is_word(p, colon, "transfer-encoding", 17):
            if self._chunked:
                return self._malformed(events, "a coding after chunked in Transfer-Encoding")
            self._has_te = True
            i = e
            while i > v and p[i - 1] != ASCII_COMMA:
                i -= 1
            while i < e and _is_ows(p[i]):
                i += 1
            self._chunked = _is_word(p + i, e - i, "chunked", 7)
        elif _is_word(p, colon, "connection", 10):
            i = v
            while i < e:
                j = i
                while j < e and p[j] != ASCII_COMMA:
                    j += 1
                k = _trim_ows(p, &i, j)
                if _is_word(p + i, k - i, "close", 5):
                    self._conn_close = True
                elif _is_word(p + i, k - i, "keep-alive", 10):
                    self._conn_keep_alive = True
                elif _is_word(p + i, k - i, "upgrade", 7):
                    self._conn_upgrade = True
                i = j + 1
        elif _is_word(p, colon, "upgrade", 7):
            self._has_upgrade = True
        elif _is_word(p, colon, "expect", 6):
            self._expect = _is_word(p + v, e - v, "100-continue", 12)
        return 0

    cdef int _headers_complete(self, list events, uint64_t now_ms) except -1:
        cdef const unsigned char* m = self._buf + self._method
        cdef const unsigned char* t = self._buf + self._target
        cdef const void* q
        cdef object head
        if ((self._conn_upgrade and self._has_upgrade)
                or (self._method_n == 7 and memcmp(m, b"CONNECT", 7) == 0)):
            return self._fail(events, 400, "Bad Request: protocol upgrades are not supported")
        if self._has_te and self._length >= 0:
            # a request smuggling vector: refuse rather than pick one (RFC 9112 section 6.1)
            return self._malformed(events, "both Content-Length and Transfer-Encoding")
        if self._has_te and not self._chunked:
            return self._malformed(events, "Transfer-Encoding does not end in chunked")
        self._keep_alive = not self._conn_close if self._http11 else self._conn_keep_alive
        q = memchr(t, ASCII_QUESTION, self._target_n)
        self._path_n = self._target_n if q == NULL else <const unsigned char*>q - t
        self._submit = (
            ((self._method_n == 4 and memcmp(m, b"POST", 4) == 0)
             or (self._allow_get and self._method_n == 3 and memcmp(m, b"GET", 3) == 0))
            and self._matches_channel())
        if self._submit and self._databus_call():
            # A databus part is framed from its head alone and its body streamed out (to a blob
            # file); a head the framer refuses is read whole and answered like any request.
            self._raw_headers()
            head = self._framer._frame_raw(self._raw, self._headers_n, None, None, now_ms)
            if type(head) is Envelope:
                if self._length > self._max_blob:
                    return self._fail(events, 413, f"Payload Too Large: databus property of "
                                      f"{self._length} bytes exceeds GWCORE_MAX_BLOB={self._max_blob}")
                if self._framer.signatures:
                    self._add_request_line(head)
                self._part = True
                self._submit = False
                self._limit = self._max_blob
                events.append((EVENT_PART_BEGIN, self._keep_alive, head))
        if self._length > self._limit:
            return self._fail(events, 413, f"Payload Too Large: body of {self._length} bytes "
                                           f"exceeds GWCORE_MAX_BODY={self._max_body}")
        if not self._submit:
            self._method_bytes = PyBytes_FromStringAndSize(<const char*>m, self._method_n)
            self._path_bytes = PyBytes_FromStringAndSize(<const char*>t, self._path_n)
            if self._path_n >= 9 and memcmp(t, _ptr(GWCORE_PREFIX), 9) == 0:
                self._extra_headers = self._gwcore_headers()
        self._body = self._pos
        if self._chunked:
            self._state = RP_CHUNK_SIZE
        elif self._length > 0:
            self._remaining = self._length
            self._state = RP_BODY
        else:
            self._state = RP_COMPLETE
        if not self._submit:
            self._start = self._pos         # the head is no longer needed
        return 0

    cdef int _chunk_size(self, list events, Py_ssize_t n) except -1:
        # chunk-size [ ";" name [ "=" token / quoted-string ] ]... (RFC 9112 section 7.1.1)
        cdef const unsigned char* p = self._buf + self._pos
        cdef Py_ssize_t i = 0, j, size = 0
        cdef int digit
        while i < n:
            digit = _hex_value(p[i])
            if digit < 0:
                break
            if size <= self._limit:          # saturates: anything larger is refused below
                size = size * 16 + digit
            i += 1
        if i == 0:
            return self._malformed(events, "invalid chunk size")
        while i < n:
            if p[i] != ASCII_SEMICOLON:
                return self._malformed(events, "invalid chunk size")
            j = i = i + 1
            while i < n and TOKEN[p[i]]:
                i += 1
            if i == j:
                return self._malformed(events, "invalid chunk extension")
            if i < n and p[i] == ASCII_EQUALS:
                j = i = i + 1
                if i < n and p[i] == ASCII_QUOTE:
                    i += 1
                    while i < n and p[i] != ASCII_QUOTE:
                        if p[i] == ASCII_BACKSLASH:
                            i += 1
                        if i < n and _is_ctl(p[i]):
                            return self._malformed(events, "invalid chunk extension")
                        i += 1
                    if i >= n:
                        return self._malformed(events, "invalid chunk extension")
                    i += 1
                else:
                    while i < n and TOKEN[p[i]]:
                        i += 1
                    if i == j:
                        return self._malformed(events, "invalid chunk extension")
        if size > self._limit - self._body_total:
            return self._fail(events, 413, "Payload Too Large: body exceeds " + (
                f"GWCORE_MAX_BLOB={self._max_blob}" if self._part else
                f"GWCORE_MAX_BODY={self._max_body}") + " bytes")
        self._body_total += size
        if size == 0:
            self._state = RP_TRAILER
            self._trailer = 0
        else:
            self._remaining = size
            self._state = RP_CHUNK_DATA
        return 0

    cdef bint _databus_call(self) noexcept:
        # Is this a SingleCallDatabusProperty request? Decided on the raw header as senders
        # write it (NServiceBus.CallType needs no escapes). A request this misses (an escaped
        # name, the call type in a GET query) is framed whole and its body written from memory.
        cdef const _HeaderAt* h
        cdef Py_ssize_t i, n
        cdef unsigned char value[64]
        cdef bint ascii
        if self._allow_get and self._path_n < self._target_n:
            return False
        for i in range(self._headers_n):
            h = &self._headers[i]
            if (h.name_n == 20 and h.value_n <= 64
                    and _same(self._buf + h.name, <const unsigned char*>b"nservicebus.calltype", 20, False)):
                n = _percent_decode(self._buf + h.value, h.value_n, value, &ascii)
                return _call_type(value, n) == CALL_TYPE_DATABUS
        return False

    cdef int _raw_headers(self) except -1:
        # _headers as (name, value) pointer pairs in _raw, for the framer
        cdef Py_ssize_t i
        cdef _RawSpan* grown
        cdef const _HeaderAt* h
        if self._raw_cap < 2 * self._headers_n:
            grown = <_RawSpan*>PyMem_Realloc(self._raw, 2 * self._headers_cap * sizeof(_RawSpan))
            if grown == NULL:
                raise MemoryError()
            self._raw = grown
            self._raw_cap = 2 * self._headers_cap
        for i in range(self._headers_n):
            h = &self._headers[i]
            self._raw[2 * i].p = self._buf + h.name
            self._raw[2 * i].n = h.name_n
            self._raw[2 * i + 1].p = self._buf + h.value
            self._raw[2 * i + 1].n = h.value_n
        return 0

    cdef dict _gwcore_headers(self):
        # name (lower case) -> raw value of every header whose name starts with "gwcore-"; the
        # first of repeated names wins. Bounded by the header limits the request already passed.
        cdef dict out = {}
        cdef Py_ssize_t i, k
        cdef const _HeaderAt* h
        cdef bytes name
        for i in range(self._headers_n):
            h = &self._headers[i]
            if h.name_n < 8 or not _is_word(self._buf + h.name, 7, "gwcore-", 7):
                continue
            name = PyBytes_FromStringAndSize(<const char*>self._buf + h.name, h.name_n).lower()
            if name not in out:
                out[name] = PyBytes_FromStringAndSize(<const char*>self._buf + h.value, h.value_n)
        return out

    cdef bint _matches_channel(self) noexcept:
        # HTTPState.match_channel: case-insensitive prefix match; "/RemoteSite" addresses
        # "/RemoteSite/" as well. The built-in endpoints are never a channel.
        cdef const unsigned char* p = self._buf + self._target
        cdef Py_ssize_t n = self._path_n, m, i
        cdef bint slash = n > 0 and p[n - 1] == ASCII_SLASH
        cdef const unsigned char* c
        cdef unsigned char ch
        cdef bytes path
        for path in BUILTIN_PATHS:
            if n == PyBytes_GET_SIZE(path) and memcmp(p, _ptr(path), n) == 0:
                return False
        for path in self._channel_paths:
            m = PyBytes_GET_SIZE(path)
            if m > n + (0 if slash else 1):
                continue
            c = _ptr(path)
            for i in range(m):
                ch = p[i] if i < n else ASCII_SLASH
                if FOLD[ch] != c[i]:
                    break
            else:
                return True
        return False

    cdef int _complete(self, list events, uint64_t now_ms) except -1:
        cdef bytes body
        cdef object query = None
        cdef object result
        if self._part:
            events.append(PART_END_EVENT)
        elif self._submit:
            body = PyBytes_FromStringAndSize(<const char*>self._buf + self._body, self._body_n)
            if self._allow_get and self._path_n < self._target_n:
                query = PyBytes_FromStringAndSize(
                    <const char*>self._buf + self._target + self._path_n + 1,
                    self._target_n - self._path_n - 1)
            self._raw_headers()
            result = self._framer._frame_raw(self._raw, self._headers_n, body, query, now_ms)
            if self._framer.signatures:
                self._add_request_line(result)
            events.append((EVENT_SUBMIT, self._keep_alive, result))
        else:
            events.append((EVENT_OTHER, self._keep_alive, self._method_bytes, self._path_bytes,
                           self._extra_headers))
        self._start = self._scan = self._pos
        self._method_bytes = self._path_bytes = None
        self._extra_headers = None
        # After a request without keep-alive the connection closes: what follows is not read.
        self._state = RP_START if self._keep_alive else RP_DONE
        return 0

    cdef int _add_request_line(self, object result) except -1:
        # A signature covers the method and the request target as received, which only the
        # parser knows; they are decoded for signed requests only (the target is ASCII here).
        cdef str method, target
        if type(result) is Envelope:
            if (<Envelope>result).auth_signature is None:
                return 0
        elif type(result) is Batch:
            if (<Batch>result).auth_signature is None:
                return 0
        elif (<Rejection>result).auth_signature is None:
            return 0
        method = PyUnicode_DecodeASCII(<const char*>self._buf + self._method, self._method_n, NULL)
        target = PyUnicode_DecodeASCII(<const char*>self._buf + self._target, self._target_n, NULL)
        if type(result) is Envelope:
            (<Envelope>result).method = method
            (<Envelope>result).target = target
        elif type(result) is Batch:
            (<Batch>result).method = method
            (<Batch>result).target = target
        else:
            (<Rejection>result).method = method
            (<Rejection>result).target = target
        return 0

    cdef int _compact(self) except -1:
        # Once per feed: drop what is consumed, so the buffer holds at most one unfinished
        # request (its head, the body so far, the unparsed rest of the last read).
        cdef Py_ssize_t gap, shift, i
        if self._submit and self._chunked and RP_CHUNK_SIZE <= self._state <= RP_TRAILER:
            # close the gap the chunk framing left behind the de-chunked body
            gap = self._pos - (self._body + self._body_n)
            if gap > 0:
                memmove(self._buf + self._body + self._body_n, self._buf + self._pos, self._len - self._pos)
                self._len -= gap
                self._pos -= gap
                self._scan -= gap
        shift = self._start
        if shift == 0:
            return self._shrink()
        memmove(self._buf, self._buf + shift, self._len - shift)
        self._len -= shift
        self._start = 0
        self._pos -= shift
        self._scan -= shift
        self._method -= shift
        self._target -= shift
        self._body -= shift
        for i in range(self._headers_n):
            self._headers[i].name -= shift
            self._headers[i].value -= shift
        return self._shrink()

    cdef int _shrink(self) except -1:
        # A burst of pipelined requests grows the buffer to one read; do not keep that forever.
        cdef unsigned char* smaller
        cdef Py_ssize_t cap
        if self._cap > BUFFER_KEEP and self._len < self._cap // 4:
            cap = max(self._len, MIN_TEXT)
            smaller = <unsigned char*>PyMem_Realloc(self._buf, cap)
            if smaller != NULL:
                self._buf = smaller
                self._cap = cap
        return 0
