"""gwcore's compiled core: NServiceBus Gateway request framing, the stored envelope codec and the
LMDB dedup batch loop. User-facing documentation lives in _dedup.pyi."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset, strlen

from gwcore.includes.debug cimport GWCORE_DEBUG

import hashlib

from .errors import ConfigurationError, FramingError, InternalError

# Bound once, not looked up per request. usedforsecurity=False: an integrity check, and it keeps
# FIPS-mode OpenSSL builds working. Copying a hash object beats making one (OpenSSL 3 fetches).
cdef object std_md5_copy = hashlib.md5(usedforsecurity=False).copy

CALL_SUBMIT = CALL_TYPE_SUBMIT
CALL_DATABUS = CALL_TYPE_DATABUS
DEBUG_BUILD = bool(GWCORE_DEBUG)


cdef enum:
    ASCII_SPACE = 0x20
    ASCII_PLUS = 0x2B
    ASCII_PERCENT = 0x25
    ASCII_AMP = 0x26
    ASCII_EQUALS = 0x3D
    ASCII_DOT = 0x2E
    ASCII_COLON = 0x3A
    ASCII_MINUS = 0x2D
    ASCII_0 = 0x30
    ASCII_1 = 0x31
    ASCII_QUESTION = 0x3F
    ASCII_DEL = 0x7F

    MAX_REASON_CHARS = 512
    MAX_U32 = 0xFFFFFFFF
    MD5_BASE64_LEN = 24                 # 16 bytes, padded

    # Envelope v1:
    #   b"GW"  magic
    #   u8     version (1)
    #   u64 BE accepted_ms
    #   u64 BE expiry_ms (0 = never)
    #   u32 BE length + NServiceBus.Id, UTF-8
    #   u32 BE header count, then per header: u32 BE length + name UTF-8, u32 BE length + value UTF-8
    #   u64 BE length + body
    # and nothing after the body. Every integer is big-endian so stored frames sort and hexdump
    # readably; a new layout gets a new version byte, and old stores stay readable by version.
    MAGIC_G = 0x47
    MAGIC_W = 0x57
    ENVELOPE_VERSION = 1
    ENVELOPE_PREAMBLE = 2 + 1 + 8 + 8
    ENVELOPE_FIXED = ENVELOPE_PREAMBLE + 4 + 4 + 8      # plus id, headers and body

    # .NET TimeSpan limits, in 100 ns ticks.
    TICKS_PER_MS = 10000
    MAX_TIMESPAN_DAYS = 10675199
    TIMESPAN_PARTS = 5

    # Control headers, looked up by name ignoring ASCII case like the gateway's header
    # dictionary (StringComparer.CurrentCultureIgnoreCase); indexes into CONTROLS.
    CTL_ID = 0
    CTL_CALL_TYPE
    CTL_CONTENT_MD5
    CTL_GATEWAY
    CTL_CORRELATION_ID
    CTL_TTBR
    CONTROL_COUNT

    # What a folded header name contains (_Span.marks).
    MARK_DATABUS = 1                    # "nservicebus.databus.": a claim-check part
    MARK_HEADER = 2                     # "nservicebus.header": a message header (gateway messages)
    MARK_PREFIX_IN_FRONT = 4            # "nservicebus.header." once, at the start: strip = slice

    # Smallest scratch allocations: a typical request fits without growing.
    MIN_TEXT = 2048
    MIN_SPANS = 32
    MIN_SLOTS = 64

# 100 years. TimeSpan.MaxValue (what NServiceBus 4.x sent for "infinite") and anything else this
# far out means "never expires".
cdef long long NEVER_MS = 100LL * 365 * 24 * 3600 * 1000
cdef unsigned long long MAX_TICKS = 9223372036854775807ULL
cdef unsigned long long NUMBER_CAP = 1000000000000000ULL   # saturates digits: way past any limit

cdef struct _Name:
    const unsigned char* p              # ASCII, already folded
    Py_ssize_t n
    uint32_t hash

# Order as the CTL_* values. The bytes stay alive as module constants.
cdef tuple CONTROL_NAMES = (
    b"nservicebus.id", b"nservicebus.calltype", b"content-md5", b"nservicebus.gateway",
    b"nservicebus.correlationid", b"nservicebus.timetobereceived",
)
cdef _Name CONTROLS[CONTROL_COUNT]

cdef const char* NSB = b"nservicebus."                 # common start of both marks
cdef const char* HEADER_PREFIX = b"nservicebus.header."  # stripped from gateway message headers
cdef Py_ssize_t HEADER_PREFIX_LEN = 19
cdef bytes CORRELATION_ID = b"NServiceBus.CorrelationId"

cdef const char* HEX_DIGITS = b"0123456789ABCDEF"     # upper case, as WebUtility.UrlEncode
cdef const char* BASE64_DIGITS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

# WebUtility.UrlEncode leaves exactly these bytes alone (s_safeUrlChars plus alphanumerics).
cdef unsigned char URL_SAFE[256]
# ASCII case folding (A-Z only); on valid UTF-8 the same as folding the decoded text.
cdef unsigned char FOLD[256]


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


cdef bytes _pack_pair(uint64_t a, uint64_t b):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 16)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    _put_u64(_put_u64(p, a), b)
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
    for c in range(CONTROL_COUNT):
        CONTROLS[c].p = _ptr(CONTROL_NAMES[c])
        CONTROLS[c].n = len(CONTROL_NAMES[c])
        CONTROLS[c].hash = _fold_hash(CONTROLS[c].p, CONTROLS[c].n)


_init_tables()


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
    # Padded base64 of the MD5 digest into out[0:24]: 5 groups of 3 bytes, then 1 byte and "==".
    cdef object md5 = std_md5_copy()
    cdef bytes digest
    cdef const unsigned char* d
    cdef uint32_t v
    cdef int g
    md5.update(body)
    digest = md5.digest()
    d = _ptr(digest)
    for g in range(5):
        v = (<uint32_t>d[3 * g] << 16) | (<uint32_t>d[3 * g + 1] << 8) | d[3 * g + 2]
        out[4 * g] = BASE64_DIGITS[v >> 18]
        out[4 * g + 1] = BASE64_DIGITS[(v >> 12) & 63]
        out[4 * g + 2] = BASE64_DIGITS[(v >> 6) & 63]
        out[4 * g + 3] = BASE64_DIGITS[v & 63]
    out[20] = BASE64_DIGITS[d[15] >> 2]
    out[21] = BASE64_DIGITS[(d[15] & 3) << 4]
    out[22] = out[23] = ASCII_EQUALS
    return 0


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


cdef str _take_str(_Reader* r, str what):
    cdef uint32_t n = _get_u32(_take(r, 4, what))
    cdef const unsigned char* p = _take(r, n, what)
    try:
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    except UnicodeDecodeError as exc:
        raise FramingError(f"envelope has invalid UTF-8 in {what}") from exc


def decode_envelope(framed):
    cdef const unsigned char[::1] view = framed
    cdef _Reader r
    cdef const unsigned char* head
    cdef uint64_t accepted_ms, expiry_ms, body_n
    cdef uint32_t count, i
    cdef dict headers = {}
    cdef str id, name
    cdef bytes body
    r.left = view.shape[0]
    r.p = &view[0] if r.left else <const unsigned char*>b""
    head = _take(&r, 3, "the preamble")
    if head[0] != MAGIC_G or head[1] != MAGIC_W:
        raise FramingError("not a gwcore envelope (bad magic)")
    if head[2] != ENVELOPE_VERSION:
        raise FramingError(f"unsupported envelope version {head[2]}")
    accepted_ms = _get_u64(_take(&r, 8, "accepted_ms"))
    expiry_ms = _get_u64(_take(&r, 8, "expiry_ms"))
    id = _take_str(&r, "the id")
    count = _get_u32(_take(&r, 4, "the header count"))
    for i in range(count):
        name = _take_str(&r, "a header name")
        headers[name] = _take_str(&r, "a header value")
    body_n = _get_u64(_take(&r, 8, "the body length"))
    body = PyBytes_FromStringAndSize(<const char*>_take(&r, body_n, "the body"), <Py_ssize_t>body_n)
    if r.left:
        raise FramingError(f"{r.left} unexpected bytes after the envelope body")
    return id, headers, body, expiry_ms, accepted_ms


# ---------------------------------------------------------------------------------------------
# framing of one gateway request

cdef class Envelope:
    def __init__(self):
        raise TypeError("Envelope objects are made by Framer.frame()")

    @property
    def headers(self):
        # Built on demand: the HTTP path stores `framed` and never needs the dict.
        if self._headers is None:
            self._headers = decode_envelope(self.framed)[1]
        return self._headers

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


# The framer decodes every header into one reused text buffer and works on spans of it; Python
# objects are made only for what leaves (id, key, envelope, rejection reason). Text that is not
# valid UTF-8 after decoding is replaced at once by what errors="replace" makes of it, so names
# and values compare and get stored exactly as the decoded str values they stand for.

cdef class Framer:
    def __cinit__(self):
        self._text = NULL
        self._spans = NULL
        self._slots = NULL

    def __init__(self, str scope not None, *, Py_ssize_t max_id_bytes=400, bint parse_query=False):
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

    def __dealloc__(self):
        PyMem_Free(self._text)
        PyMem_Free(self._spans)
        PyMem_Free(self._slots)

    cdef unsigned char* _room(self, Py_ssize_t n) except NULL:
        # Where n more bytes of text go (never NULL). The buffer may move: spans hold offsets.
        cdef unsigned char* grown
        cdef Py_ssize_t cap
        if self._text_cap - self._text_n < n or self._text == NULL:
            cap = max(self._text_n + n, MIN_TEXT, self._text_cap * 2)
            grown = <unsigned char*>PyMem_Realloc(self._text, cap)
            if grown == NULL:
                raise MemoryError()
            self._text = grown
            self._text_cap = cap
        return self._text + self._text_n

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

    cdef Py_ssize_t _add_pair(self, object name, object value) except -1:
        cdef Py_ssize_t at = self._new_span()
        cdef _Span* s = &self._spans[at]
        cdef bytes raw = _as_bytes(name)
        s.name = self._decode(_ptr(raw), PyBytes_GET_SIZE(raw))
        s.name_n = self._text_n - s.name
        s.hash = _fold_hash(self._text + s.name, s.name_n)
        raw = _as_bytes(value)
        s.value = self._decode(_ptr(raw), PyBytes_GET_SIZE(raw))
        s.value_n = self._text_n - s.value
        return at

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

    def frame(self, list headers not None, body, query, uint64_t now_ms):
        return self._frame(headers, body, query, now_ms)

    cdef object _frame(self, list headers, object body, object query, uint64_t now_ms):
        cdef Py_ssize_t count = len(headers), i, first, end, slot, n
        cdef Py_ssize_t found[CONTROL_COUNT]
        cdef const _Span* s
        cdef const _Span* id
        cdef const unsigned char* ttbr = NULL
        cdef Py_ssize_t ttbr_n = 0
        cdef unsigned char md5[MD5_BASE64_LEN]
        cdef bytes body_bytes
        cdef object callback = None
        cdef bint gateway
        cdef Envelope env

        if count & 1:
            raise InternalError("headers must be a flat [name, value, ...] list")
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
        first = self._spans_n
        self._index_clear(count // 2 + first)
        for i in range(0, count, 2):
            end = self._add_pair(headers[i], headers[i + 1])
            s = &self._spans[end]
            slot = self._index_slot(self._text + s.name, s.name_n, s.hash, False)
            if self._slots[slot]:
                return self._reject(
                    400, f"Header '{self._str(s.name, s.name_n)}' appears more than once.", callback)
            self._slots[slot] = <uint32_t>(end + 1)

        body_bytes = self._apply_query(first, _as_bytes(body))
        end = self._spans_n
        for i in range(CONTROL_COUNT):
            found[i] = self._lookup(i)

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
            return self._reject(400, "Required header 'NServiceBus.CallType' missing.", callback)
        s = &self._spans[found[CTL_CALL_TYPE]]
        i = _call_type(self._text + s.value, s.value_n)
        if i == CALL_TYPE_DATABUS:
            return self._reject(
                501, "SingleCallDatabusProperty is not supported by this gwcore version yet: "
                     "claim-check properties cannot be received.", callback)
        if i != CALL_TYPE_SUBMIT:
            return self._reject(
                400, f"Invalid CallType '{self._str(s.value, s.value_n)}'. CallTypes supported "
                     f"'SingleCallSubmit, SingleCallDatabusProperty'", callback)

        if found[CTL_CONTENT_MD5] >= 0:
            s = &self._spans[found[CTL_CONTENT_MD5]]
            _content_md5(body_bytes, md5)
            if s.value_n != MD5_BASE64_LEN or memcmp(self._text + s.value, md5, MD5_BASE64_LEN):
                return self._reject(
                    412, "MD5 hash received does not match hash calculated on server. "
                         "Please resubmit.", callback)
        # No part can have arrived while SingleCallDatabusProperty is refused above.
        n = self._mark(first, end)
        if n:
            return self._reject(
                412, f"Expected {n} claimcheck properties. None were received. Please resubmit.",
                callback)

        gateway = found[CTL_GATEWAY] >= 0
        if gateway and found[CTL_CORRELATION_ID] < 0:
            # NServiceBus reads it with a throwing indexer: an unhandled exception -> 502
            return self._reject(502, "Unexpected server error", callback)
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
        env.framed = self._envelope(id, first, end, body_bytes, env.expiry_ms, now_ms)
        self.framed_total += 1
        return env


# ---------------------------------------------------------------------------------------------
# dedup index over an open py-lmdb write transaction

cdef class DedupIndex:
    def apply_batch(self, txn, dedup_db, queue_db, expiry_db, list envelopes not None,
                    uint64_t accepted_ms, uint64_t next_seq):
        cdef object put = txn.put
        cdef list results = []
        cdef uint64_t seq = next_seq
        cdef unsigned long long new = 0, duplicate = 0
        cdef bytes rec
        cdef Envelope env
        for obj in envelopes:
            env = <Envelope?>obj
            # dedup value = accepted_ms + seq; the expiry key is the same 16 bytes, so the
            # expiry db sorts by acceptance time and names the record it may delete.
            rec = _pack_pair(accepted_ms, seq)
            if put(env.key, rec, db=dedup_db, overwrite=False):
                put(_pack_u64(seq), env.framed, db=queue_db)
                put(rec, env.key, db=expiry_db)
                results.append(True)
                seq += 1
                new += 1
            else:
                results.append(False)
                duplicate += 1
        # Counted only once every put went through: an lmdb error makes the caller abort the
        # whole transaction, and then nothing of this batch happened.
        self.new_total += new
        self.duplicate_total += duplicate
        return results, seq

    def check_batch(self, txn, dedup_db, list envelopes not None):
        cdef object get = txn.get
        cdef list results = []
        for obj in envelopes:
            results.append(get((<Envelope?>obj).key, db=dedup_db) is not None)
        return results

    def expire(self, txn, dedup_db, expiry_db, uint64_t cutoff_ms, Py_ssize_t limit):
        cdef object get = txn.get
        cdef object delete = txn.delete
        cdef object cursor
        cdef Py_ssize_t walked = 0, deleted = 0
        cdef bytes key, dedup_key, rec
        if limit <= 0:
            return 0
        cursor = txn.cursor(db=expiry_db)
        try:
            if not cursor.first():
                return 0
            while walked < limit:
                # copies: with buffers=True py-lmdb hands out views that die on the next write
                key = _as_bytes(cursor.key())
                if PyBytes_GET_SIZE(key) == 0:
                    break           # the cursor ran off the end after the last delete
                if PyBytes_GET_SIZE(key) != 16:
                    raise FramingError(f"corrupt expiry entry: key of {PyBytes_GET_SIZE(key)} bytes")
                if _get_u64(_ptr(key)) >= cutoff_ms:
                    break
                dedup_key = _as_bytes(cursor.value())
                found = get(dedup_key, db=dedup_db)
                if found is not None:
                    rec = _as_bytes(found)
                    # Only the record this entry was written with: a re-recorded id (after its
                    # old record expired) carries a newer seq and must stay.
                    if PyBytes_GET_SIZE(rec) == 16 and memcmp(_ptr(rec) + 8, _ptr(key) + 8, 8) == 0:
                        delete(dedup_key, db=dedup_db)
                        deleted += 1
                walked += 1
                cursor.delete()     # deletes and steps to the next entry
        finally:
            cursor.close()
        self.expired_total += deleted
        return deleted
