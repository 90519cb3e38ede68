# Part of gwcore/_dedup.pyx (included there, compiled as one module). Byte-level helpers of gwcore._dedup: hex, UTF-8 validation, hashing, big-endian packing.

# ---------------------------------------------------------------------------------------------
# byte-level helpers

cdef inline int _hex_value(unsigned char c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    c |= 0x20
    if 97 <= c <= 102:
        return c - 87
    return -1


cdef inline bint _has_byte(uint64_t word, unsigned char b) noexcept nogil:
    # Whether any of the 8 bytes equals b (the classic zero-byte test, exact for "any").
    cdef uint64_t x = word ^ (0x0101010101010101ULL * b)
    return ((x - 0x0101010101010101ULL) & ~x & 0x8080808080808080ULL) != 0


cdef Py_ssize_t _percent_decode(const unsigned char* src, Py_ssize_t n, unsigned char* dst,
                                bint* ascii) noexcept nogil:
    # WebUtility.UrlDecode on bytes: '+' is a space, %XX (either hex case) is a byte, and a '%'
    # without two hex digits after it stays literal. Output is never longer than the input;
    # *ascii says whether it is all ASCII, so valid UTF-8 without another pass.
    cdef Py_ssize_t i = 0, o = 0, stop
    cdef int hi, lo
    cdef unsigned char c
    cdef uint64_t word, seen_words = 0
    cdef unsigned char seen = 0         # a byte: a word here slowed escape-dense text by 15%
    while i < n:
        stop = n
        if n - i >= 8:
            # most header text has no escapes: copy 8 plain bytes at a time
            memcpy(&word, src + i, 8)
            if not _has_byte(word, ASCII_PERCENT) and not _has_byte(word, ASCII_PLUS):
                memcpy(dst + o, &word, 8)
                seen_words |= word
                i += 8
                o += 8
                continue
            stop = i + 8
        while i < stop:             # an escape may end past stop, which is fine
            c = src[i]
            if c == ASCII_PLUS:
                c = ASCII_SPACE
            elif c == ASCII_PERCENT and i + 2 < n:
                hi = _hex_value(src[i + 1])
                lo = _hex_value(src[i + 2])
                if hi >= 0 and lo >= 0:
                    c = <unsigned char>(hi * 16 + lo)
                    i += 2
            dst[o] = c
            seen |= c
            o += 1
            i += 1
    ascii[0] = not (seen & 0x80 or seen_words & 0x8080808080808080ULL)
    return o


cdef bint _utf8_valid(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    # Exactly what Python's strict UTF-8 decoder accepts (Unicode table 3-7): no overlong forms,
    # no surrogates, nothing above U+10FFFF.
    cdef Py_ssize_t i = 0, k, j
    cdef unsigned char c, lo, hi
    while i < n:
        c = p[i]
        if c < 0x80:
            i += 1
            continue
        if 0xC2 <= c <= 0xDF:
            k, lo, hi = 1, 0x80, 0xBF
        elif 0xE0 <= c <= 0xEF:
            k, lo, hi = 2, (0xA0 if c == 0xE0 else 0x80), (0x9F if c == 0xED else 0xBF)
        elif 0xF0 <= c <= 0xF4:
            k, lo, hi = 3, (0x90 if c == 0xF0 else 0x80), (0x8F if c == 0xF4 else 0xBF)
        else:
            return False
        if n - i <= k or not lo <= p[i + 1] <= hi:
            return False
        for j in range(i + 2, i + k + 1):
            if not 0x80 <= p[j] <= 0xBF:
                return False
        i += k + 1
    return True


cdef inline bint _same(const unsigned char* a, const unsigned char* b, Py_ssize_t n,
                       bint exact) noexcept nogil:
    cdef Py_ssize_t i
    if exact:
        return memcmp(a, b, n) == 0
    for i in range(n):
        if FOLD[a[i]] != FOLD[b[i]]:
            return False
    return True


cdef uint32_t _fold_hash(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    # From the length and the last 16 bytes at most, with bit 0x20 set (coarser than folding, so
    # names equal ignoring case hash alike): names share long prefixes and differ at the end, and
    # a collision only costs a comparison. A multiply per byte (FNV) was most of the framer's time.
    cdef uint64_t a = 0, b = 0
    if n >= 8:
        memcpy(&a, p + n - 16 if n >= 16 else p, 8)
        memcpy(&b, p + n - 8, 8)
    else:
        memcpy(&b, p, n)
    a |= 0x2020202020202020ULL
    b |= 0x2020202020202020ULL
    return <uint32_t>((((a * 0x9E3779B97F4A7C15ULL) ^ b ^ <uint64_t>n) * 0xFF51AFD7ED558CCDULL) >> 32)


cdef Py_ssize_t _ifind(const unsigned char* p, Py_ssize_t n, const char* needle, Py_ssize_t m,
                       Py_ssize_t start) noexcept nogil:
    # First position >= start of the lower-case ASCII needle in p, ignoring ASCII case; or -1.
    cdef Py_ssize_t i
    cdef unsigned char first = <unsigned char>needle[0]
    for i in range(start, n - m + 1):
        if FOLD[p[i]] == first and _same(p + i, <const unsigned char*>needle, m, False):
            return i
    return -1


cdef int _name_marks(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    # MARK_* bits of a header name, in one scan for the common start of the marks.
    cdef int marks = 0
    cdef Py_ssize_t prefixes = 0
    cdef bint in_front = False
    cdef Py_ssize_t i = _ifind(p, n, NSB, 12, 0)
    while i >= 0:
        if n - i >= 20 and _same(p + i + 12, <const unsigned char*>b"databus.", 8, False):
            marks |= MARK_DATABUS
        elif n - i >= 18 and _same(p + i + 12, <const unsigned char*>b"header", 6, False):
            marks |= MARK_HEADER
            if n - i >= 19 and p[i + 18] == ASCII_DOT:
                prefixes += 1
                in_front |= i == 0
        i = _ifind(p, n, NSB, 12, i + 12)
    if prefixes == 1 and in_front:
        marks |= MARK_PREFIX_IN_FRONT
    return marks


cdef Py_ssize_t _strip_prefix(const unsigned char* p, Py_ssize_t n, unsigned char* dst) noexcept nogil:
    # A gateway message header's stored name: every "NServiceBus.Header." (any ASCII case) goes,
    # left to right like String.Replace; the prefix cannot overlap itself. Returns the length.
    cdef Py_ssize_t start = 0, o = 0
    cdef Py_ssize_t hit = _ifind(p, n, HEADER_PREFIX, HEADER_PREFIX_LEN, 0)
    while True:
        if hit < 0:
            hit = n
        memcpy(dst + o, p + start, hit - start)
        o += hit - start
        if hit == n:
            return o
        start = hit + HEADER_PREFIX_LEN
        hit = _ifind(p, n, HEADER_PREFIX, HEADER_PREFIX_LEN, start)


cdef Py_ssize_t _net_space(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    # Length of the char.IsWhiteSpace character (UTF-8) p starts with, else 0: the set behind
    # string.IsNullOrWhiteSpace (the Id) and Enum.TryParse's trim (the CallType). Unlike
    # str.isspace, it leaves out U+001C..U+001F.
    cdef unsigned char c = p[0]
    if c == ASCII_SPACE or 0x09 <= c <= 0x0D:
        return 1
    if n >= 2 and c == 0xC2 and (p[1] == 0x85 or p[1] == 0xA0):               # U+0085 U+00A0
        return 2
    if n >= 3 and (
        (c == 0xE1 and p[1] == 0x9A and p[2] == 0x80)                              # U+1680
        or (c == 0xE2 and p[1] == 0x80 and (p[2] <= 0x8A or p[2] == 0xA8 or p[2] == 0xA9
                                            or p[2] == 0xAF))                      # U+2000..200A 2028 2029 202F
        or (c == 0xE2 and p[1] == 0x81 and p[2] == 0x9F)                           # U+205F
        or (c == 0xE3 and p[1] == 0x80 and p[2] == 0x80)):                         # U+3000
        return 3
    return 0


cdef const unsigned char* _net_strip(const unsigned char* p, Py_ssize_t* n) noexcept nogil:
    # String.Trim() of valid UTF-8: returns the new start, updates n. From the end, trying
    # k = 1, 2, 3 bytes cannot split a character: every match starts with a lead byte.
    cdef Py_ssize_t k
    while n[0]:
        k = _net_space(p, n[0])
        if k == 0:
            break
        p += k
        n[0] -= k
    k = 1
    while k <= 3 and k <= n[0]:
        if _net_space(p + n[0] - k, k) == k:
            n[0] -= k
            k = 1
        else:
            k += 1
    return p


cdef inline bint _is_ascii_blank(unsigned char c) noexcept nogil:
    return c == ASCII_SPACE or 0x09 <= c <= 0x0D      # space, \t \n \v \f \r


cdef inline bint _is_ows(unsigned char c) noexcept nogil:
    return c == ASCII_SPACE or c == ASCII_TAB


cdef inline Py_ssize_t _trim_ows(const unsigned char* p, Py_ssize_t* start, Py_ssize_t end) noexcept nogil:
    # p[*start:end] without the spaces and tabs around it (the OWS around an HTTP field value,
    # RFC 9112): moves *start on and returns the new end.
    cdef Py_ssize_t v = start[0]
    while v < end and _is_ows(p[v]):
        v += 1
    while end > v and _is_ows(p[end - 1]):
        end -= 1
    start[0] = v
    return end


cdef inline str _utf8(const unsigned char* p, Py_ssize_t n):
    return PyUnicode_DecodeUTF8(<const char*>p, n, "replace")


cdef inline unsigned char* _put_u32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v
    return p + 4


cdef inline unsigned char* _put_u64(unsigned char* p, uint64_t v) noexcept nogil:
    _put_u32(p, <uint32_t>(v >> 32))
    _put_u32(p + 4, <uint32_t>v)
    return p + 8


cdef inline uint32_t _get_u32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t _get_u64(const unsigned char* p) noexcept nogil:
    return (<uint64_t>_get_u32(p) << 32) | _get_u32(p + 4)


cdef bytes _pack_u64(uint64_t v):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 8)
    _put_u64(<unsigned char*>PyBytes_AS_STRING(out), v)
    return out


cdef inline bytes _as_bytes(object data):
    # Any contiguous buffer in, owned bytes out; bytes pass through without a copy.
    if type(data) is bytes:
        return <bytes>data
    return _copy_buffer(data)


cdef bytes _copy_buffer(object data):
    cdef const unsigned char[::1] view = data
    if view.shape[0] == 0:
        return b""
    return PyBytes_FromStringAndSize(<const char*>&view[0], view.shape[0])


cdef inline const unsigned char* _ptr(bytes data) noexcept:
    return <const unsigned char*>PyBytes_AS_STRING(data)


cdef void _init_tables():
    cdef int c
    for c in range(256):
        URL_SAFE[c] = (
            (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122)
            or c in (0x2D, 0x5F, 0x2E, 0x21, 0x2A, 0x28, 0x29)   # - _ . ! * ( )
        )
        FOLD[c] = c | 0x20 if 65 <= c <= 90 else c
    for c in range(ALL_CONTROLS):
        CONTROLS[c].p = _ptr(CONTROL_NAMES[c])
        CONTROLS[c].n = len(CONTROL_NAMES[c])
        CONTROLS[c].hash = _fold_hash(CONTROLS[c].p, CONTROLS[c].n)



# Room for n more bytes after `used` in a growable PyMem buffer (doubling); the buffer may move,
# so callers keep offsets, never pointers, into it across calls.
cdef unsigned char* _grow(unsigned char** buf, Py_ssize_t* cap, Py_ssize_t used, Py_ssize_t n) except NULL:
    cdef unsigned char* grown
    cdef Py_ssize_t want
    if cap[0] - used < n or buf[0] == NULL:
        want = max(used + n, MIN_TEXT, cap[0] * 2)
        grown = <unsigned char*>PyMem_Realloc(buf[0], want)
        if grown == NULL:
            raise MemoryError()
        buf[0] = grown
        cap[0] = want
    return buf[0] + used

_init_tables()
