"""gwcore's compiled core: NServiceBus Gateway request framing, the stored envelope codec and the
LMDB dedup batch loop. User-facing documentation lives in _dedup.pyi."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy, memset, strlen

from gwcore.includes.debug cimport GWCORE_DEBUG

import hashlib

import orjson

from .errors import ConfigurationError, FramingError, InternalError

# Bound once, not looked up per request. usedforsecurity=False: an integrity check, and it keeps
# FIPS-mode OpenSSL builds working. Copying a hash object beats making one (OpenSSL 3 fetches).
cdef object std_md5_copy = hashlib.md5(usedforsecurity=False).copy
cdef object std_sha256_copy = hashlib.sha256().copy

CALL_SUBMIT = CALL_TYPE_SUBMIT
CALL_DATABUS = CALL_TYPE_DATABUS
DEBUG_BUILD = bool(GWCORE_DEBUG)


cdef enum:
    ASCII_TAB = 0x09
    ASCII_LF = 0x0A
    ASCII_CR = 0x0D
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
    ASCII_BACKSLASH = 0x5C
    ASCII_DEL = 0x7F

    MAX_REASON_CHARS = 512
    MAX_U32 = 0xFFFFFFFF
    MD5_BASE64_LEN = 24                 # 16 bytes, padded
    SHA256_BASE64_LEN = 44              # 32 bytes, padded
    SHA256_DIGEST_LEN = 9 + SHA256_BASE64_LEN + 1   # a Content-Digest of sha-256 alone: sha-256=:…:

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

    # A distributor's take answer to a worker (docs/deployment.md, "The worker protocol"):
    #   b"GT"  magic
    #   u8     version (1)
    #   u8     flags (1: stop, the worker is to take nothing more)
    #   u32 BE record count, then per record:
    #     u64 BE seq, u32 BE attempt, u32 BE delivery count,
    #     u32 BE length + the stored envelope (above), u32 BE length + extra (JSON, may be empty)
    # and nothing after the last record.
    MAGIC_T = 0x54
    TAKE_VERSION = 1
    TAKE_STOP = 1
    TAKE_HEAD = 2 + 1 + 1 + 4
    TAKE_RECORD_FIXED = 8 + 4 + 4 + 4 + 4               # plus the envelope and the extra

    # A batch between gwcore sites (docs/protocol.md, "Batches between gwcore sites"), the body
    # of a POST with a gwcore-Batch: 1 header:
    #   b"GB"  magic
    #   u8     version (1)
    #   u8     flags (0)
    #   u32 BE message count, then per message:
    #     u32 BE length + its header block: "Name: value\r\n" lines exactly as the message's own
    #     request would carry them (values URL-encoded, Content-MD5 included)
    #     u64 BE length + its body
    # and nothing after the last body.
    MAGIC_B = 0x42
    BATCH_VERSION = 1
    BATCH_HEAD = 2 + 1 + 1 + 4
    BATCH_MESSAGE_FIXED = 4 + 8                         # plus the header block and the body

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
    CONTROL_COUNT                       # the controls every request looks up
    CTL_AUTH_DATE = CONTROL_COUNT       # looked up only by a Framer made with signatures=True
    CTL_AUTH_SIGNATURE
    CTL_DATABUS_KEY                     # looked up for SingleCallDatabusProperty only
    CTL_CONTENT_DIGEST                  # likewise (RFC 9530 Content-Digest, docs/databus.md)
    CTL_BATCH                           # gwcore-Batch: a batch between gwcore sites
    ALL_CONTROLS

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
    b"gwcore-date", b"gwcore-signature", b"nservicebus.gateway.databuskey", b"content-digest",
    b"gwcore-batch",
)
cdef _Name CONTROLS[ALL_CONTROLS]

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


# The module is one compilation unit, kept in parts (as asyncpg and uvloop do):
include "_parts/bytes.pyx"
include "_parts/codec.pyx"
include "_parts/framing.pyx"
include "_parts/http.pyx"
include "_parts/protocol.pyx"
include "_parts/index.pyx"
include "_parts/egress.pyx"
include "_parts/amqp.pyx"
