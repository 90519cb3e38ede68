# Layouts of the cdef classes of gwcore._dedup, so that a later Cython module (an HTTP parser in
# gwcore/_http.pyx, say) can cimport them and call the core without a Python-level crossing.

from libc.stdint cimport uint32_t, uint64_t


cdef enum:
    # NServiceBus CallType enum values (GW:src/NServiceBus.Gateway/CallType.cs).
    CALL_TYPE_SUBMIT = 0
    CALL_TYPE_DATABUS = 1


cdef class Envelope:
    cdef:
        readonly str id
        readonly bytes key                  # dedup key: scope UTF-8, NUL, id UTF-8
        readonly int call_type
        readonly uint64_t expiry_ms         # absolute ms since the epoch; 0 = never expires
        readonly uint64_t accepted_ms
        dict _headers                       # decoded from framed on first access; None until then
        readonly bytes body
        readonly bytes framed               # encode_envelope() of the fields above
        readonly object callback            # str or None (JSONP, query string only)


cdef class Rejection:
    cdef:
        readonly int status
        readonly str reason                 # ASCII, no control characters, at most 512 chars
        readonly object callback            # str or None


cdef struct _Span:
    # One decoded header (or query parameter) of the request being framed. Offsets point into
    # Framer._text, which may move while it grows; the text is always valid UTF-8.
    Py_ssize_t name
    Py_ssize_t name_n
    Py_ssize_t value
    Py_ssize_t value_n
    uint32_t hash                       # of the ASCII-folded name
    int marks                           # MARK_* bits, set once all headers are in


cdef class Framer:
    cdef:
        readonly str scope
        readonly Py_ssize_t max_id_bytes
        readonly bint parse_query
        bytes _key_prefix                   # scope UTF-8 + NUL: every dedup key starts with it
        # Per-request scratch, owned (PyMem) and reused: decoded text, spans over it, and an
        # open-addressing index of span numbers (slot 0 = empty, else span index + 1).
        unsigned char* _text
        Py_ssize_t _text_n
        Py_ssize_t _text_cap
        _Span* _spans
        Py_ssize_t _spans_n
        Py_ssize_t _spans_cap
        uint32_t* _slots
        Py_ssize_t _slots_mask
        Py_ssize_t _slots_cap
        readonly unsigned long long framed_total
        readonly unsigned long long rejected_total

    cdef unsigned char* _room(self, Py_ssize_t n) except NULL
    cdef Py_ssize_t _decode(self, const unsigned char* src, Py_ssize_t n) except -1
    cdef int _replace_invalid(self, Py_ssize_t start) except -1
    cdef Py_ssize_t _decode_twice(self, const unsigned char* src, Py_ssize_t n) except -1
    cdef Py_ssize_t _new_span(self) except -1
    cdef Py_ssize_t _add_pair(self, object name, object value) except -1
    cdef int _parse_query(self, object query) except -1
    cdef int _index_clear(self, Py_ssize_t entries) except -1
    cdef Py_ssize_t _index_slot(self, const unsigned char* name, Py_ssize_t n, uint32_t hash,
                                bint exact) noexcept
    cdef Py_ssize_t _lookup(self, Py_ssize_t control) noexcept
    cdef int _put(self, _Span entry, bint exact) except -1
    cdef Py_ssize_t _gateway_headers(self, Py_ssize_t first, Py_ssize_t end,
                                     Py_ssize_t correlation) except -1
    cdef bytes _apply_query(self, Py_ssize_t params, bytes body)
    cdef Py_ssize_t _mark(self, Py_ssize_t first, Py_ssize_t end) noexcept
    cdef bytes _key(self, const _Span* id)
    cdef str _str(self, Py_ssize_t offset, Py_ssize_t n)
    cdef bytes _envelope(self, const _Span* id, Py_ssize_t first, Py_ssize_t end, bytes body,
                         uint64_t expiry_ms, uint64_t accepted_ms)
    cdef object _frame(self, list headers, object body, object query, uint64_t now_ms)
    cdef Rejection _reject(self, int status, str reason, object callback)


cdef class DedupIndex:
    cdef:
        readonly unsigned long long new_total
        readonly unsigned long long duplicate_total
        readonly unsigned long long expired_total
