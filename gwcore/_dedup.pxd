# Layouts of the cdef classes of gwcore._dedup, so that a later Cython module (an HTTP parser in
# gwcore/_http.pyx, say) can cimport them and call the core without a Python-level crossing.

from libc.stdint cimport uint64_t


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
        readonly dict headers
        readonly bytes body
        readonly bytes framed               # encode_envelope() of the fields above
        readonly object callback            # str or None (JSONP, query string only)


cdef class Rejection:
    cdef:
        readonly int status
        readonly str reason                 # ASCII, no control characters, at most 512 chars
        readonly object callback            # str or None


cdef class _HeaderSet:
    cdef:
        list names                          # decoded names as sent (or as the query spelled them)
        list folds                          # ASCII-lower-cased names, parallel to names
        list values
        dict index                          # fold -> position in the three lists

    cdef bint add(self, str name, str fold, str value)
    cdef void put(self, str name, str fold, str value)
    cdef object get(self, str fold)
    cdef Py_ssize_t count_containing(self, str fold_part)
    cdef dict gateway_headers(self)
    cdef dict all_headers(self)


cdef class Framer:
    cdef:
        readonly str scope
        readonly Py_ssize_t max_id_bytes
        readonly bint parse_query
        bytes _key_prefix                   # scope UTF-8 + NUL: every dedup key starts with it
        unsigned char* _scratch             # reusable percent-decoding buffer (PyMem, owned)
        Py_ssize_t _scratch_size
        readonly unsigned long long framed_total
        readonly unsigned long long rejected_total

    cdef unsigned char* _reserve(self, Py_ssize_t n) except NULL
    cdef str _decode(self, const unsigned char* src, Py_ssize_t n)
    cdef str _decode_twice(self, const unsigned char* src, Py_ssize_t n)
    cdef str _fold(self, str text)
    cdef list _query_params(self, object query)
    cdef object _frame(self, list headers, object body, object query, uint64_t now_ms)
    cdef Rejection _reject(self, int status, str reason, object callback)


cdef class DedupIndex:
    cdef:
        readonly unsigned long long new_total
        readonly unsigned long long duplicate_total
        readonly unsigned long long expired_total
