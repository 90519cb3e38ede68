"""gwcore's compiled core: NServiceBus Gateway request framing, the stored envelope codec and the
LMDB dedup batch loop. User-facing documentation lives in _dedup.pyi."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from gwcore.includes.debug cimport GWCORE_DEBUG

import binascii
import hashlib

from .errors import ConfigurationError, FramingError, InternalError

# Bound once: the hot paths below must not look these up per request.
cdef object std_md5 = hashlib.md5
cdef object std_b2a_base64 = binascii.b2a_base64

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
    ASCII_QUESTION = 0x3F
    ASCII_DEL = 0x7F

    MAX_REASON_CHARS = 512
    MAX_U32 = 0xFFFFFFFF

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

    # .NET TimeSpan limits, in 100 ns ticks.
    TICKS_PER_MS = 10000
    MAX_TIMESPAN_DAYS = 10675199
    TIMESPAN_PARTS = 5

# 100 years. TimeSpan.MaxValue (what NServiceBus 4.x sent for "infinite") and anything else this
# far out means "never expires".
cdef long long NEVER_MS = 100LL * 365 * 24 * 3600 * 1000
cdef unsigned long long MAX_TICKS = 9223372036854775807ULL
cdef unsigned long long NUMBER_CAP = 1000000000000000ULL   # saturates digits: way past any limit

# Folded (ASCII lower-case) control header names: lookups are case-insensitive like the
# gateway's header dictionary (StringComparer.CurrentCultureIgnoreCase).
cdef str F_ID = "nservicebus.id"
cdef str F_CALL_TYPE = "nservicebus.calltype"
cdef str F_CONTENT_MD5 = "content-md5"
cdef str F_GATEWAY = "nservicebus.gateway"
cdef str F_CORRELATION_ID = "nservicebus.correlationid"
cdef str F_TTBR = "nservicebus.timetobereceived"
cdef str F_MESSAGE = "message"
cdef str F_CALLBACK = "callback"
cdef str F_DATABUS_PART = "nservicebus.databus."      # not "nservicebus.databusconfig.contenttype"
cdef str F_HEADER_MARK = "nservicebus.header"         # selects message headers ...
cdef str F_HEADER_PREFIX = "nservicebus.header."      # ... and this is what gets stripped
cdef Py_ssize_t HEADER_PREFIX_LEN = len(F_HEADER_PREFIX)
cdef str CORRELATION_ID = "NServiceBus.CorrelationId"

# The set char.IsWhiteSpace accepts: string.IsNullOrWhiteSpace (the Id check) and the trim inside
# Enum.TryParse (the CallType parse) use it. Python's str.isspace differs (U+001C..U+001F).
cdef str NET_WHITESPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)

cdef const char* HEX_DIGITS = b"0123456789ABCDEF"     # upper case, as WebUtility.UrlEncode

# WebUtility.UrlEncode leaves exactly these bytes alone (s_safeUrlChars plus alphanumerics).
cdef unsigned char URL_SAFE[256]


cdef void _init_url_safe():
    cdef int c
    for c in range(256):
        URL_SAFE[c] = (
            (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122)
            or c in (0x2D, 0x5F, 0x2E, 0x21, 0x2A, 0x28, 0x29)   # - _ . ! * ( )
        )


_init_url_safe()


# ---------------------------------------------------------------------------------------------
# byte-level helpers

cdef inline int _hex_value(unsigned char c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    c |= 0x20
    if 97 <= c <= 102:
        return c - 87
    return -1


cdef Py_ssize_t _percent_decode(const unsigned char* src, Py_ssize_t n,
                                unsigned char* dst) noexcept nogil:
    # WebUtility.UrlDecode on bytes: '+' is a space, %XX (either hex case) is a byte, and a '%'
    # without two hex digits after it stays literal. Output is never longer than the input.
    cdef Py_ssize_t i = 0, o = 0
    cdef int hi, lo
    cdef unsigned char c
    while i < n:
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
        o += 1
        i += 1
    return o


cdef inline void _ascii_lower(unsigned char* p, Py_ssize_t n) noexcept nogil:
    # Folding the UTF-8 bytes equals folding the decoded text, even for invalid UTF-8: ASCII
    # bytes are single characters to the decoder whatever their case, so errors='replace' makes
    # the same replacements either way and the two strings stay aligned character by character.
    cdef Py_ssize_t i
    for i in range(n):
        if 65 <= p[i] <= 90:
            p[i] |= 0x20


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


cdef bytes _as_bytes(object data):
    # Any contiguous buffer in, owned bytes out; bytes pass through without a copy.
    cdef const unsigned char[::1] view
    if type(data) is bytes:
        return <bytes>data
    view = data
    if view.shape[0] == 0:
        return b""
    return PyBytes_FromStringAndSize(<const char*>&view[0], view.shape[0])


cdef inline const unsigned char* _ptr(bytes data) noexcept:
    return <const unsigned char*>PyBytes_AS_STRING(data)


# ---------------------------------------------------------------------------------------------
# public codec functions

def url_decode(data):
    cdef bytes raw = _as_bytes(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw)
    cdef unsigned char* buf = <unsigned char*>PyMem_Malloc(n + 1)
    if buf == NULL:
        raise MemoryError()
    try:
        return _utf8(buf, _percent_decode(_ptr(raw), n, buf))
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
    return _content_md5(body)


cdef str _content_md5(object body):
    # usedforsecurity=False: an integrity check, and it keeps FIPS-mode OpenSSL builds working.
    cdef bytes digest = std_md5(body, usedforsecurity=False).digest()
    return std_b2a_base64(digest, newline=False).decode("ascii")


def parse_timespan(str text not None):
    cdef long long ms
    if _parse_timespan(text, &ms):
        return ms
    return None


cdef bint _parse_timespan(str text, long long* out_ms) except -1:
    # .NET TimeSpan.TryParse, invariant culture, in the forms the gateway meets: "d", "hh:mm",
    # "hh:mm:ss", "d.hh:mm[:ss]", "d:hh:mm:ss", each of the ss forms with ".f" to ".fffffff".
    cdef const unsigned char* p
    cdef Py_ssize_t n, i = 0, start
    cdef unsigned long long nums[5]
    cdef unsigned char seps[5]          # separator before part k (seps[0] unused)
    cdef int count = 0, frac_digits = 0, k
    cdef bint negative = False
    cdef unsigned long long days = 0, hours = 0, minutes = 0, seconds = 0, fraction = 0, ticks
    cdef bytes pattern
    if not text.isascii():
        return False
    p = <const unsigned char*>PyUnicode_AsUTF8AndSize(text, &n)
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
            seps[count] = p[i]
            i += 1
        else:
            break
    while i < n and _is_ascii_blank(p[i]):
        i += 1
    if i != n:
        return False
    pattern = PyBytes_FromStringAndSize(<const char*>&seps[1], count - 1)
    # part order per separator pattern: D(ays) H(ours) M(inutes) S(econds) F(raction)
    if pattern == b"":
        days = nums[0]
    elif pattern == b":":
        hours, minutes = nums[0], nums[1]
    elif pattern == b"::":
        hours, minutes, seconds = nums[0], nums[1], nums[2]
    elif pattern == b".:":
        days, hours, minutes = nums[0], nums[1], nums[2]
    elif pattern == b".::" or pattern == b":::":
        days, hours, minutes, seconds = nums[0], nums[1], nums[2], nums[3]
    elif pattern == b"::.":
        hours, minutes, seconds, fraction = nums[0], nums[1], nums[2], nums[3]
    elif pattern == b".::." or pattern == b":::.":
        days, hours, minutes, seconds, fraction = nums[0], nums[1], nums[2], nums[3], nums[4]
    else:
        return False
    if pattern.endswith(b"."):
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


cdef bytes _encode_envelope(str id, list flat, bytes body, uint64_t expiry_ms, uint64_t accepted_ms):
    # `flat` is [name0, value0, name1, value1, ...] of str; it keeps every str alive, so the UTF-8
    # pointers CPython caches inside them stay valid between the sizing pass and the copy pass.
    cdef Py_ssize_t id_n, part_n, i, count = len(flat)
    cdef Py_ssize_t body_n = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t total
    cdef const char* part
    cdef const char* id_p = PyUnicode_AsUTF8AndSize(id, &id_n)
    cdef bytes out
    cdef unsigned char* w
    total = ENVELOPE_PREAMBLE + 4 + _u32_len(id_n, "the id") + 4 + 8 + body_n
    for i in range(count):
        PyUnicode_AsUTF8AndSize(flat[i], &part_n)
        total += 4 + _u32_len(part_n, "a header")
    out = PyBytes_FromStringAndSize(NULL, total)
    w = <unsigned char*>PyBytes_AS_STRING(out)
    w[0] = MAGIC_G
    w[1] = MAGIC_W
    w[2] = ENVELOPE_VERSION
    w = _put_u64(_put_u64(w + 3, accepted_ms), expiry_ms)
    w = _put_u32(w, <uint32_t>id_n)
    memcpy(w, id_p, id_n)
    w = _put_u32(w + id_n, <uint32_t>(count // 2))
    for i in range(count):
        part = PyUnicode_AsUTF8AndSize(flat[i], &part_n)
        w = _put_u32(w, <uint32_t>part_n)
        memcpy(w, part, part_n)
        w += part_n
    w = _put_u64(w, <uint64_t>body_n)
    memcpy(w, PyBytes_AS_STRING(body), body_n)
    if GWCORE_DEBUG:
        if w + body_n != <unsigned char*>PyBytes_AS_STRING(out) + total:
            raise InternalError("envelope size computed wrongly")
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


cdef class _HeaderSet:
    def __cinit__(self):
        self.names = []
        self.folds = []
        self.values = []
        self.index = {}

    cdef bint add(self, str name, str fold, str value):
        # False when the name is already present: the gateway's Dictionary.Add would throw.
        if fold in self.index:
            return False
        self.index[fold] = len(self.names)
        self.names.append(name)
        self.folds.append(fold)
        self.values.append(value)
        return True

    cdef void put(self, str name, str fold, str value):
        # A query parameter replaces a header in place (wire order kept) under its own spelling.
        cdef object at = self.index.get(fold)
        if at is None:
            self.add(name, fold, value)
        else:
            self.names[<Py_ssize_t>at] = name
            self.values[<Py_ssize_t>at] = value

    cdef object get(self, str fold):
        cdef object at = self.index.get(fold)
        return None if at is None else self.values[<Py_ssize_t>at]

    cdef Py_ssize_t count_containing(self, str fold_part):
        cdef Py_ssize_t count = 0
        for fold in self.folds:
            if fold_part in <str>fold:
                count += 1
        return count

    cdef dict gateway_headers(self):
        # Message headers travel as "NServiceBus.Header.<name>". NServiceBus matches the prefix
        # case-sensitively and silently drops headers a proxy lower-cased; gwcore folds case.
        # Every occurrence of the prefix goes, in one left-to-right pass like String.Replace.
        cdef dict out = {}
        cdef Py_ssize_t i, start, hit
        cdef str fold, name
        cdef list pieces
        for i in range(len(self.folds)):
            fold = self.folds[i]
            if F_HEADER_MARK not in fold:
                continue
            name = self.names[i]
            hit = fold.find(F_HEADER_PREFIX)
            if hit == 0 and fold.find(F_HEADER_PREFIX, HEADER_PREFIX_LEN) < 0:
                name = name[HEADER_PREFIX_LEN:]     # the usual case: one prefix, in front
            elif hit >= 0:
                pieces = []
                start = 0
                while hit >= 0:
                    pieces.append(name[start:hit])
                    start = hit + HEADER_PREFIX_LEN
                    hit = fold.find(F_HEADER_PREFIX, start)
                pieces.append(name[start:])
                name = "".join(pieces)
            out[name] = self.values[i]
        return out

    cdef dict all_headers(self):
        return dict(zip(self.names, self.values))


cdef uint64_t _expiry(object ttbr, uint64_t now_ms, bint gateway) except? 0:
    # Gateway messages: unparseable counts as zero and anything under a second becomes one
    # second (SingleCallChannelReceiver). Custom messages keep TryParse's value, and a value that
    # is not positive means "no expiry". Both: absent, or 100 years and more, means never.
    cdef long long ms = 0
    cdef bint parsed
    if ttbr is None:
        return 0
    parsed = _parse_timespan(<str>ttbr, &ms)
    if gateway:
        if not parsed or ms < 1000:
            ms = 1000
    elif not parsed or ms <= 0:
        return 0
    if ms >= NEVER_MS or now_ms > <uint64_t>-1 - <uint64_t>ms:
        return 0
    return now_ms + <uint64_t>ms


cdef class Framer:
    def __cinit__(self):
        self._scratch = NULL
        self._scratch_size = 0

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
        PyMem_Free(self._scratch)

    cdef unsigned char* _reserve(self, Py_ssize_t n) except NULL:
        cdef unsigned char* grown
        if n >= self._scratch_size:
            n = max(n + 1, 256, self._scratch_size * 2)
            grown = <unsigned char*>PyMem_Realloc(self._scratch, n)
            if grown == NULL:
                raise MemoryError()
            self._scratch = grown
            self._scratch_size = n
        return self._scratch

    cdef str _decode(self, const unsigned char* src, Py_ssize_t n):
        cdef unsigned char* dst = self._reserve(n)
        return _utf8(dst, _percent_decode(src, n, dst))

    cdef str _decode_twice(self, const unsigned char* src, Py_ssize_t n):
        # HttpListener decodes the query once, then the gateway decodes every key and value
        # again (protocol.md 1.2 step 3): "%252B" arrives as "+", "%2B" as a space.
        cdef str once = self._decode(src, n)
        cdef const char* p = PyUnicode_AsUTF8AndSize(once, &n)
        return self._decode(<const unsigned char*>p, n)

    cdef str _fold(self, str text):
        cdef Py_ssize_t n
        cdef const char* p = PyUnicode_AsUTF8AndSize(text, &n)
        cdef unsigned char* dst = self._reserve(n)
        memcpy(dst, p, n)
        _ascii_lower(dst, n)
        return _utf8(dst, n)

    cdef list _query_params(self, object query):
        # -> [(name, fold, value), ...]; a segment without '=' has an empty value, empty
        # segments ("a=1&&b=2") are skipped.
        cdef bytes raw = _as_bytes(query)
        cdef const unsigned char* p = _ptr(raw)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(raw), start = 0, end, eq
        cdef list params = []
        cdef str name, value
        while start < n:
            end = start
            eq = -1
            while end < n and p[end] != ASCII_AMP:
                if eq < 0 and p[end] == ASCII_EQUALS:
                    eq = end
                end += 1
            if end > start:
                if eq < 0:
                    name = self._decode_twice(p + start, end - start)
                    value = ""
                else:
                    name = self._decode_twice(p + start, eq - start)
                    value = self._decode_twice(p + eq + 1, end - eq - 1)
                params.append((name, self._fold(name), value))
            start = end + 1
        return params

    cdef Rejection _reject(self, int status, str reason, object callback):
        self.rejected_total += 1
        return Rejection(status, reason, callback)

    def frame(self, list headers not None, body, query, uint64_t now_ms):
        return self._frame(headers, body, query, now_ms)

    cdef object _frame(self, list headers, object body, object query, uint64_t now_ms):
        cdef Py_ssize_t count = len(headers), i, n, id_n
        cdef bytes raw, body_bytes
        cdef unsigned char* dst
        cdef str id, name, fold, value, call_type
        cdef object callback = None, found, ttbr
        cdef list params = None
        cdef _HeaderSet hs = _HeaderSet()
        cdef dict message_headers
        cdef bint gateway
        cdef Envelope env

        if count & 1:
            raise InternalError("headers must be a flat [name, value, ...] list")
        if self.parse_query and query is not None:
            # parsed first: a rejection carries the JSONP callback too
            params = self._query_params(query)
            for name, fold, value in params:
                if fold == F_CALLBACK:
                    callback = value

        for i in range(0, count, 2):
            raw = _as_bytes(headers[i])
            n = PyBytes_GET_SIZE(raw)
            dst = self._reserve(n)
            n = _percent_decode(_ptr(raw), n, dst)
            name = _utf8(dst, n)
            _ascii_lower(dst, n)
            fold = _utf8(dst, n)
            raw = _as_bytes(headers[i + 1])
            value = self._decode(_ptr(raw), PyBytes_GET_SIZE(raw))
            if not hs.add(name, fold, value):
                return self._reject(400, f"Header '{name}' appears more than once.", callback)

        body_bytes = _as_bytes(body)
        if params:
            for name, fold, value in params:
                hs.put(name, fold, value)
                if fold == F_MESSAGE:
                    body_bytes = value.encode("utf-8")

        found = hs.get(F_ID)
        if found is None or not (<str>found).strip(NET_WHITESPACE):
            return self._reject(400, "Required header 'NServiceBus.Id' missing.", callback)
        id = <str>found
        PyUnicode_AsUTF8AndSize(id, &id_n)
        if id_n > self.max_id_bytes:
            return self._reject(
                400, f"Header 'NServiceBus.Id' is longer than {self.max_id_bytes} bytes.", callback)

        found = hs.get(F_CALL_TYPE)
        if found is None:
            return self._reject(400, "Required header 'NServiceBus.CallType' missing.", callback)
        # Enum.TryParse: trims, case-sensitive names, numeric values accepted
        call_type = (<str>found).strip(NET_WHITESPACE)
        if call_type == "SingleCallDatabusProperty" or call_type == "1":
            return self._reject(
                501, "SingleCallDatabusProperty is not supported by this gwcore version yet: "
                     "claim-check properties cannot be received.", callback)
        if call_type != "SingleCallSubmit" and call_type != "0":
            return self._reject(
                400, f"Invalid CallType '{found}'. CallTypes supported "
                     f"'SingleCallSubmit, SingleCallDatabusProperty'", callback)

        found = hs.get(F_CONTENT_MD5)
        if found is not None and <str>found != _content_md5(body_bytes):
            return self._reject(
                412, "MD5 hash received does not match hash calculated on server. Please resubmit.",
                callback)
        # No part can have arrived while SingleCallDatabusProperty is refused above.
        n = hs.count_containing(F_DATABUS_PART)
        if n:
            return self._reject(
                412, f"Expected {n} claimcheck properties. None were received. Please resubmit.",
                callback)

        ttbr = hs.get(F_TTBR)
        gateway = F_GATEWAY in hs.index
        if gateway:
            found = hs.get(F_CORRELATION_ID)
            if found is None:
                # NServiceBus reads it with a throwing indexer: an unhandled exception -> 502
                return self._reject(502, "Unexpected server error", callback)
            message_headers = hs.gateway_headers()
            message_headers[CORRELATION_ID] = found
        else:
            message_headers = hs.all_headers()

        env = Envelope.__new__(Envelope)
        env.id = id
        env.key = self._key_prefix + id.encode("utf-8")
        env.call_type = CALL_TYPE_SUBMIT
        env.expiry_ms = _expiry(ttbr, now_ms, gateway)
        env.accepted_ms = now_ms
        env.headers = message_headers
        env.body = body_bytes
        env.callback = callback
        env.framed = _encode_envelope(
            id, _flatten_headers(message_headers), body_bytes, env.expiry_ms, now_ms)
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
