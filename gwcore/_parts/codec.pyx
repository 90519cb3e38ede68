# Part of gwcore/_dedup.pyx (included there, compiled as one module). gwcore._dedup: the public codec functions (URL, MD5, TimeSpan, sequence numbers) and the stored envelope format.

# ---------------------------------------------------------------------------------------------
# public codec functions

def url_decode(data):
    cdef bytes raw = _as_bytes(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw)
    cdef unsigned char* buf = <unsigned char*>PyMem_Malloc(n + 1)
    cdef bint ascii
    if buf == NULL:
        raise MemoryError()
    try:
        return _utf8(buf, _percent_decode(_ptr(raw), n, buf, &ascii))
    finally:
        PyMem_Free(buf)


def url_encode(str text not None):
    cdef const char* src
    cdef Py_ssize_t n, i, o = 0
    cdef unsigned char c
    cdef bytes out
    cdef unsigned char* dst
    try:
        src = PyUnicode_AsUTF8AndSize(text, &n)
    except UnicodeEncodeError:
        # A .NET string is UTF-16: a pair of surrogates is one character, a lone one becomes
        # U+FFFD in Encoding.UTF8. A round trip through UTF-16 does exactly that in Python.
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        src = PyUnicode_AsUTF8AndSize(text, &n)
    out = PyBytes_FromStringAndSize(NULL, n * 3)
    dst = <unsigned char*>PyBytes_AS_STRING(out)
    for i in range(n):
        c = <unsigned char>src[i]
        if URL_SAFE[c]:
            dst[o] = c
            o += 1
        elif c == ASCII_SPACE:
            dst[o] = ASCII_PLUS
            o += 1
        else:
            dst[o] = ASCII_PERCENT
            dst[o + 1] = HEX_DIGITS[c >> 4]
            dst[o + 2] = HEX_DIGITS[c & 15]
            o += 3
    return PyUnicode_DecodeASCII(<const char*>dst, o, NULL)


def content_md5(body):
    cdef unsigned char out[MD5_BASE64_LEN]
    _content_md5(body, out)
    return PyUnicode_DecodeASCII(<const char*>out, MD5_BASE64_LEN, NULL)


cdef int _content_md5(object body, unsigned char* out) except -1:
    # Padded base64 of the MD5 digest into out[0:24].
    cdef object md5 = std_md5_copy()
    md5.update(body)
    _base64_into(_ptr(md5.digest()), 16, out)
    return 0


cdef int _content_sha256(object body, unsigned char* out) except -1:
    # The RFC 9530 Content-Digest value of sha-256 alone into out[0:SHA256_DIGEST_LEN]:
    # "sha-256=:" padded base64 ":".
    cdef object sha = std_sha256_copy()
    sha.update(body)
    memcpy(out, b"sha-256=:", 9)
    _base64_into(_ptr(sha.digest()), 32, out + 9)
    out[SHA256_DIGEST_LEN - 1] = ASCII_COLON
    return 0


cdef void _base64_into(const unsigned char* d, Py_ssize_t n, unsigned char* out) noexcept:
    # Padded standard base64 of d[0:n] into out[0:4 * ceil(n / 3)].
    cdef uint32_t v
    cdef Py_ssize_t i = 0
    while i + 3 <= n:
        v = (<uint32_t>d[i] << 16) | (<uint32_t>d[i + 1] << 8) | d[i + 2]
        out[0] = BASE64_DIGITS[v >> 18]
        out[1] = BASE64_DIGITS[(v >> 12) & 63]
        out[2] = BASE64_DIGITS[(v >> 6) & 63]
        out[3] = BASE64_DIGITS[v & 63]
        out += 4
        i += 3
    if n - i == 1:
        out[0] = BASE64_DIGITS[d[i] >> 2]
        out[1] = BASE64_DIGITS[(d[i] & 3) << 4]
        out[2] = out[3] = ASCII_EQUALS
    elif n - i == 2:
        v = (<uint32_t>d[i] << 8) | d[i + 1]
        out[0] = BASE64_DIGITS[v >> 10]
        out[1] = BASE64_DIGITS[(v >> 4) & 63]
        out[2] = BASE64_DIGITS[(v & 15) << 2]
        out[3] = ASCII_EQUALS


def parse_timespan(str text not None):
    cdef long long ms
    cdef const char* p
    cdef Py_ssize_t n
    if not text.isascii():
        return None
    p = PyUnicode_AsUTF8AndSize(text, &n)
    if _parse_timespan(<const unsigned char*>p, n, &ms):
        return ms
    return None


cdef inline bint _seps_are(const unsigned char* seps, int n, const char* form) noexcept nogil:
    return n == <int>strlen(form) and memcmp(seps, form, n) == 0


cdef bint _parse_timespan(const unsigned char* p, Py_ssize_t n, long long* out_ms) noexcept nogil:
    # .NET TimeSpan.TryParse, invariant culture, in the forms the gateway meets: "d", "hh:mm",
    # "hh:mm:ss", "d.hh:mm[:ss]", "d:hh:mm:ss", each of the ss forms with ".f" to ".fffffff".
    # Non-ASCII bytes never match, as non-ASCII text never parses.
    cdef Py_ssize_t i = 0, start
    cdef unsigned long long nums[5]
    cdef unsigned char seps[5]          # separator after part k
    cdef int count = 0, frac_digits = 0, k
    cdef bint negative = False
    cdef unsigned long long days = 0, hours = 0, minutes = 0, seconds = 0, fraction = 0, ticks
    while i < n and _is_ascii_blank(p[i]):
        i += 1
    if i < n and p[i] == ASCII_MINUS:
        negative = True
        i += 1
    while True:
        start = i
        nums[count] = 0
        while i < n and 48 <= p[i] <= 57:
            nums[count] = min(nums[count] * 10 + (p[i] - 48), NUMBER_CAP)
            i += 1
        if i == start:
            return False
        frac_digits = <int>(i - start)
        count += 1
        if i < n and (p[i] == ASCII_DOT or p[i] == ASCII_COLON) and count < TIMESPAN_PARTS:
            seps[count - 1] = p[i]
            i += 1
        else:
            break
    while i < n and _is_ascii_blank(p[i]):
        i += 1
    if i != n:
        return False
    count -= 1                          # now the number of separators
    # part order per separator pattern: D(ays) H(ours) M(inutes) S(econds) F(raction)
    if _seps_are(seps, count, b""):
        days = nums[0]
    elif _seps_are(seps, count, b":"):
        hours, minutes = nums[0], nums[1]
    elif _seps_are(seps, count, b"::"):
        hours, minutes, seconds = nums[0], nums[1], nums[2]
    elif _seps_are(seps, count, b".:"):
        days, hours, minutes = nums[0], nums[1], nums[2]
    elif _seps_are(seps, count, b".::") or _seps_are(seps, count, b":::"):
        days, hours, minutes, seconds = nums[0], nums[1], nums[2], nums[3]
    elif _seps_are(seps, count, b"::."):
        hours, minutes, seconds, fraction = nums[0], nums[1], nums[2], nums[3]
    elif _seps_are(seps, count, b".::.") or _seps_are(seps, count, b":::."):
        days, hours, minutes, seconds, fraction = nums[0], nums[1], nums[2], nums[3], nums[4]
    else:
        return False
    if count and seps[count - 1] == ASCII_DOT:
        if frac_digits > 7:
            return False
        for k in range(7 - frac_digits):    # ".5" is half a second, as in .NET
            fraction *= 10
    if days > MAX_TIMESPAN_DAYS or hours > 23 or minutes > 59 or seconds > 59:
        return False
    ticks = (((days * 24 + hours) * 60 + minutes) * 60 + seconds) * 10000000ULL + fraction
    if ticks > MAX_TICKS + <unsigned long long>negative:    # TimeSpan.MinValue has one tick more
        return False
    out_ms[0] = <long long>(ticks // TICKS_PER_MS)
    if negative:
        out_ms[0] = -out_ms[0]
    return True


def pack_seq(uint64_t seq):
    return _pack_u64(seq)


def unpack_seq(data):
    cdef bytes raw = _as_bytes(data)
    if PyBytes_GET_SIZE(raw) != 8:
        raise FramingError(f"a sequence number is 8 bytes, got {PyBytes_GET_SIZE(raw)}")
    return _get_u64(_ptr(raw))


# ---------------------------------------------------------------------------------------------
# envelope codec

cdef list _flatten_headers(object headers):
    cdef list flat = []
    if isinstance(headers, dict):
        for name, value in (<dict>headers).items():
            flat.append(<str?>name)
            flat.append(<str?>value)
    else:
        for name, value in headers:
            flat.append(<str?>name)
            flat.append(<str?>value)
    return flat


cdef inline Py_ssize_t _u32_len(Py_ssize_t n, str what) except -1:
    if n > MAX_U32:
        raise FramingError(f"{what} is too long for an envelope ({n} bytes)")
    return n


# Both envelope builders size the bytes object exactly, then write it front to back with these.

cdef unsigned char* _put_head(unsigned char* w, uint64_t accepted_ms, uint64_t expiry_ms,
                              const void* id, Py_ssize_t id_n, Py_ssize_t header_count) noexcept:
    w[0] = MAGIC_G
    w[1] = MAGIC_W
    w[2] = ENVELOPE_VERSION
    w = _put_u64(_put_u64(w + 3, accepted_ms), expiry_ms)
    w = _put_text(w, id, id_n)
    return _put_u32(w, <uint32_t>header_count)


cdef inline unsigned char* _put_preamble(unsigned char* w, unsigned char magic, unsigned char version,
                                        unsigned char flags, uint32_t count) noexcept:
    # The preamble a take answer and a batch share: b"G" + magic, version, flags, u32 count.
    w[0] = MAGIC_G
    w[1] = magic
    w[2] = version
    w[3] = flags
    return _put_u32(w + 4, count)


cdef inline unsigned char* _put_text(unsigned char* w, const void* p, Py_ssize_t n) noexcept:
    w = _put_u32(w, <uint32_t>n)
    memcpy(w, p, n)
    return w + n


cdef int _put_body(bytes out, unsigned char* w, bytes body) except -1:
    cdef Py_ssize_t body_n = PyBytes_GET_SIZE(body)
    w = _put_u64(w, <uint64_t>body_n)
    memcpy(w, PyBytes_AS_STRING(body), body_n)
    if GWCORE_DEBUG:
        if w + body_n != <unsigned char*>PyBytes_AS_STRING(out) + PyBytes_GET_SIZE(out):
            raise InternalError("envelope size computed wrongly")
    return 0


cdef bytes _encode_envelope(str id, list flat, bytes body, uint64_t expiry_ms, uint64_t accepted_ms):
    # `flat` is [name0, value0, name1, value1, ...] of str; it keeps every str alive, so the UTF-8
    # pointers CPython caches inside them stay valid between the sizing pass and the copy pass.
    cdef Py_ssize_t id_n, part_n, i, count = len(flat)
    cdef Py_ssize_t total
    cdef const char* part
    cdef const char* id_p = PyUnicode_AsUTF8AndSize(id, &id_n)
    cdef bytes out
    cdef unsigned char* w
    total = ENVELOPE_FIXED + _u32_len(id_n, "the id") + PyBytes_GET_SIZE(body)
    for i in range(count):
        PyUnicode_AsUTF8AndSize(flat[i], &part_n)
        total += 4 + _u32_len(part_n, "a header")
    out = PyBytes_FromStringAndSize(NULL, total)
    w = _put_head(<unsigned char*>PyBytes_AS_STRING(out), accepted_ms, expiry_ms, id_p, id_n,
                  count // 2)
    for i in range(count):
        part = PyUnicode_AsUTF8AndSize(flat[i], &part_n)
        w = _put_text(w, part, part_n)
    _put_body(out, w, body)
    return out


def encode_envelope(str id not None, headers, body, uint64_t expiry_ms, uint64_t accepted_ms):
    if len(headers) > MAX_U32:
        raise FramingError("too many headers for an envelope")
    return _encode_envelope(id, _flatten_headers(headers), _as_bytes(body), expiry_ms, accepted_ms)


cdef struct _Reader:
    const unsigned char* p
    Py_ssize_t left


cdef const unsigned char* _take(_Reader* r, uint64_t n, str what) except NULL:
    cdef const unsigned char* at = r.p
    if n > <uint64_t>r.left:
        raise FramingError(f"envelope truncated in {what}: {n} bytes needed, {r.left} left")
    r.p += n
    r.left -= <Py_ssize_t>n
    return at


cdef uint32_t _take_preamble(_Reader* r, unsigned char magic, unsigned char version,
                             unsigned char known_flags, str what, str items,
                             unsigned char* flags) except? 0:
    # Reads the preamble _put_preamble writes (a `what` of `items`: "take answer", "record"),
    # checks magic, version and flags (none but known_flags); returns the count.
    cdef const unsigned char* head = _take(r, 4, f"the {what}'s preamble")
    if head[0] != MAGIC_G or head[1] != magic:
        raise FramingError(f"not a gwcore {what} (bad magic)")
    if head[2] != version:
        raise FramingError(f"unsupported {what} version {head[2]}")
    if head[3] & ~known_flags:
        raise FramingError(f"unknown {what} flags {head[3]:#x}")
    flags[0] = head[3]
    return _get_u32(_take(r, 4, f"the {items} count"))


cdef int _check_fits(const _Reader* r, uint32_t count, Py_ssize_t fixed, str what, str items) except -1:
    # Before anything is built for `count` items: each takes at least `fixed` bytes.
    if <uint64_t>count * <uint64_t>fixed > <uint64_t>r.left:
        raise FramingError(f"{what} truncated: {count} {items}s cannot fit in {r.left} bytes")
    return 0


cdef str _take_str(_Reader* r, str what):
    cdef uint32_t n = _get_u32(_take(r, 4, what))
    cdef const unsigned char* p = _take(r, n, what)
    try:
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    except UnicodeDecodeError as exc:
        raise FramingError(f"envelope has invalid UTF-8 in {what}") from exc


cdef int _envelope_begin(_Reader* r, uint64_t* accepted_ms, uint64_t* expiry_ms) except -1:
    # r points at an envelope (and at nothing after it): checks magic and version, reads the times.
    cdef const unsigned char* head
    head = _take(r, 3, "the preamble")
    if head[0] != MAGIC_G or head[1] != MAGIC_W:
        raise FramingError("not a gwcore envelope (bad magic)")
    if head[2] != ENVELOPE_VERSION:
        raise FramingError(f"unsupported envelope version {head[2]}")
    accepted_ms[0] = _get_u64(_take(r, 8, "accepted_ms"))
    expiry_ms[0] = _get_u64(_take(r, 8, "expiry_ms"))
    return 0


cdef tuple _decode_envelope(_Reader* r):
    # r points at exactly one envelope: (id, headers, body, expiry_ms, accepted_ms)
    cdef uint64_t accepted_ms, expiry_ms, body_n
    cdef uint32_t count, i
    cdef dict headers = {}
    cdef str id, name
    cdef bytes body
    _envelope_begin(r, &accepted_ms, &expiry_ms)
    id = _take_str(r, "the id")
    count = _get_u32(_take(r, 4, "the header count"))
    for i in range(count):
        name = _take_str(r, "a header name")
        headers[name] = _take_str(r, "a header value")
    body_n = _get_u64(_take(r, 8, "the body length"))
    body = PyBytes_FromStringAndSize(<const char*>_take(r, body_n, "the body"), <Py_ssize_t>body_n)
    if r.left:
        raise FramingError(f"{r.left} unexpected bytes after the envelope body")
    return id, headers, body, expiry_ms, accepted_ms


def decode_envelope(framed):
    cdef const unsigned char[::1] view = framed
    cdef _Reader r
    r.left = view.shape[0]
    r.p = &view[0] if r.left else <const unsigned char*>b""
    return _decode_envelope(&r)


# ---------------------------------------------------------------------------------------------
# take answers: the stored envelopes a distributor hands a worker, in one buffer (no JSON, no
# base64: the worker decodes each envelope as the store holds it)

def encode_take(list records not None, bint stop):
    """``records`` of ``(seq, attempt, delivery_count, envelope bytes, extra bytes)`` -> a take
    answer (layout in _dedup.pyx)."""
    cdef Py_ssize_t total = TAKE_HEAD, n = len(records), framed_n, extra_n
    cdef tuple rec
    cdef bytes framed, extra, out
    cdef unsigned char* w
    if n > MAX_U32:
        raise FramingError("too many records for a take answer")
    for rec in records:
        framed_n = _u32_len(PyBytes_GET_SIZE(<bytes?>rec[3]), "an envelope")
        extra_n = _u32_len(PyBytes_GET_SIZE(<bytes?>rec[4]), "a record's extra")
        total += TAKE_RECORD_FIXED + framed_n + extra_n
    out = PyBytes_FromStringAndSize(NULL, total)
    w = _put_preamble(<unsigned char*>PyBytes_AS_STRING(out), MAGIC_T, TAKE_VERSION,
                      TAKE_STOP if stop else 0, <uint32_t>n)
    for rec in records:
        framed = rec[3]
        extra = rec[4]
        w = _put_u64(w, <uint64_t>rec[0])
        w = _put_u32(w, <uint32_t>rec[1])
        w = _put_u32(w, <uint32_t>rec[2])
        w = _put_text(w, PyBytes_AS_STRING(framed), PyBytes_GET_SIZE(framed))
        w = _put_text(w, PyBytes_AS_STRING(extra), PyBytes_GET_SIZE(extra))
    if w != <unsigned char*>PyBytes_AS_STRING(out) + total:
        raise InternalError("take answer size computed wrongly")
    return out


def decode_take(data):
    """A take answer -> ``(stop, [(seq, attempt, delivery_count, id, headers, body, expiry_ms,
    extra bytes), ...])``; :class:`FramingError` for anything but one whole, well-formed answer."""
    cdef const unsigned char[::1] view = data
    cdef _Reader r, env
    cdef const unsigned char* head
    cdef uint32_t count, i, n
    cdef uint64_t seq
    cdef uint32_t attempt, deliveries
    cdef tuple decoded
    cdef list out = []
    cdef unsigned char flags
    cdef bint stop
    r.left = view.shape[0]
    r.p = &view[0] if r.left else <const unsigned char*>b""
    count = _take_preamble(&r, MAGIC_T, TAKE_VERSION, TAKE_STOP, "take answer", "record", &flags)
    _check_fits(&r, count, TAKE_RECORD_FIXED, "take answer", "record")
    stop = flags & TAKE_STOP
    for i in range(count):
        seq = _get_u64(_take(&r, 8, "a record's seq"))
        attempt = _get_u32(_take(&r, 4, "a record's attempt"))
        deliveries = _get_u32(_take(&r, 4, "a record's delivery count"))
        n = _get_u32(_take(&r, 4, "a record's envelope length"))
        env.p = _take(&r, n, "a record's envelope")
        env.left = n
        decoded = _decode_envelope(&env)
        n = _get_u32(_take(&r, 4, "a record's extra length"))
        head = _take(&r, n, "a record's extra")
        out.append((seq, attempt, deliveries, decoded[0], decoded[1], decoded[2], decoded[3],
                    PyBytes_FromStringAndSize(<const char*>head, n)))
    if r.left:
        raise FramingError(f"{r.left} unexpected bytes after the take answer's last record")
    return stop, out
