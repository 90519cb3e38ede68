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
        # Request signing (Framer signatures=True only; None otherwise): the gwcore-Date and
        # gwcore-Signature values, and the method and request target RequestParser adds when
        # a signature is present.
        readonly str auth_date
        readonly str auth_signature
        readonly str method
        readonly str target
        # A v2 signature (gwcore-Signature "v2.…"): the canonical header lines it covers, as
        # gwcore/auth.py specifies them (UTF-8, sorted, escaped); None for any other request.
        readonly bytes auth_headers
        # Claim check (docs/databus.md). A SingleCallDatabusProperty part (call_type
        # CALL_TYPE_DATABUS): its decoded NServiceBus.Gateway.DataBusKey and Content-MD5 (or None);
        # framed is empty, body empty when RequestParser streams the part. A submit: one
        # (request header name, stored header name or None) pair per NServiceBus.DataBus.* header.
        readonly str databus_key
        readonly str content_md5
        readonly str content_digest         # a part's or a signed submit's decoded Content-Digest, or None
        readonly tuple databus


cdef class Batch:
    # A gwcore batch request (the gwcore-Batch header, docs/protocol.md "Batches between gwcore
    # sites"): its body still to be split into messages by Framer.frame_batch, and what a
    # signature check needs (as an Envelope has them; id is "" so that a signature is checked).
    cdef:
        readonly str version                # the gwcore-Batch header's value
        readonly bytes body
        readonly str id
        readonly object callback            # always None: a batch has no JSONP form
        readonly str auth_date
        readonly str auth_signature
        readonly str method
        readonly str target
        readonly bytes auth_headers
        readonly str content_digest


cdef class Rejection:
    cdef:
        readonly int status
        readonly str reason                 # ASCII, no control characters, at most 512 chars
        readonly object callback            # str or None
        # With Framer signatures=True, a rejection decided once the id is known carries what a
        # signature check needs, so that the receiver can answer 401 first; None otherwise.
        readonly str id
        readonly bytes body
        readonly str auth_date
        readonly str auth_signature
        readonly str method
        readonly str target
        readonly bytes auth_headers
        readonly str content_digest


cdef struct _Span:
    # One decoded header (or query parameter) of the request being framed. Offsets point into
    # Framer._text, which may move while it grows; the text is always valid UTF-8.
    Py_ssize_t name
    Py_ssize_t name_n
    Py_ssize_t value
    Py_ssize_t value_n
    uint32_t hash                       # of the ASCII-folded name
    int marks                           # MARK_* bits, set once all headers are in


cdef struct _RawSpan:
    # Raw bytes of one header name or value in a caller's buffer (still URL-encoded).
    const unsigned char* p
    Py_ssize_t n


cdef class Framer:
    cdef:
        readonly str scope
        readonly Py_ssize_t max_id_bytes
        readonly bint parse_query
        readonly bint signatures            # find gwcore-Date and gwcore-Signature (request signing)
        bytes _key_prefix                   # scope UTF-8 + NUL: every dedup key starts with it
        bytes _auth_headers                 # the request being framed: Envelope.auth_headers
        bint _in_batch                      # framing a batch's messages (frame_batch)
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
    cdef Py_ssize_t _add_header(self, const unsigned char* name, Py_ssize_t name_n,
                                const unsigned char* value, Py_ssize_t value_n) except -2
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
    cdef object _frame_raw(self, const _RawSpan* headers, Py_ssize_t count, bytes body,
                           object query, uint64_t now_ms)
    cdef object _begin(self, object query, Py_ssize_t headers)
    cdef object _finish(self, Py_ssize_t first, Py_ssize_t repeated, object body,
                        object callback, uint64_t now_ms)
    cdef Rejection _reject(self, int status, str reason, object callback)
    cdef Rejection _reject_known(self, int status, str reason, object callback,
                                 const Py_ssize_t* found, bytes body)
    cdef str _value_or_none(self, Py_ssize_t span)
    cdef object _batch(self, Py_ssize_t version, bytes body, bint streamed)
    cdef bytes _signed_headers(self, Py_ssize_t first, Py_ssize_t end)
    cdef tuple _databus_names(self, Py_ssize_t first, Py_ssize_t end, bint gateway)
    cdef object _databus_part(self, const Py_ssize_t* found, bytes body, bint streamed,
                              object callback, uint64_t now_ms)


cdef struct _IndexSlot:
    uint64_t hash                       # SipHash-1-3 of the dedup key
    uint64_t seq                        # the dedup log entry (and queue position); 0 = empty


cdef class DedupIndex:
    cdef:
        readonly unsigned long long new_total
        readonly unsigned long long duplicate_total
        readonly unsigned long long expired_total
        uint64_t _k0                        # the SipHash key, random per index
        uint64_t _k1
        _IndexSlot* _slots                  # open addressing, a power of two, load at most 3/4
        Py_ssize_t _mask
        Py_ssize_t _count
        _IndexSlot* _undo                   # inserted since the last commit()/rollback()
        Py_ssize_t _undo_n
        Py_ssize_t _undo_cap

    cdef uint64_t _hash(self, const unsigned char* p, Py_ssize_t n) noexcept
    cdef int _resize(self, Py_ssize_t slots) except -1
    cdef int _insert(self, uint64_t h, uint64_t seq) except -1
    cdef bint _remove(self, uint64_t h, uint64_t seq) noexcept
    cdef int _remember(self, uint64_t h, uint64_t seq) except -1
    cdef uint64_t _find(self, object get, object log_db, bytes key, uint64_t h,
                        uint64_t batch_start, list pending) except? 0


cdef struct _HeaderAt:
    # One header line of the request being parsed: offsets into RequestParser._buf.
    Py_ssize_t name
    Py_ssize_t name_n
    Py_ssize_t value
    Py_ssize_t value_n


cdef class RequestParser:
    cdef:
        Framer _framer
        list _channel_paths                 # lower-case bytes, each starting and ending with "/"
        Py_ssize_t _max_headers
        Py_ssize_t _max_header_bytes
        Py_ssize_t _max_body
        Py_ssize_t _max_blob                # GWCORE_MAX_BLOB: the bound of a streamed databus part
        Py_ssize_t _limit                   # the current request's body bound (one of the two)
        bint _allow_get
        readonly bint in_request
        # Receive buffer, owned (PyMem): [_start, _len) is unconsumed; offsets below are into it.
        unsigned char* _buf
        Py_ssize_t _len
        Py_ssize_t _cap
        Py_ssize_t _start                   # where the current request (or what is kept of it) begins
        Py_ssize_t _pos                     # parsed up to here
        Py_ssize_t _scan                    # no LF in [_pos, _scan): where the line search resumes
        int _state                          # RP_*
        # the current request
        Py_ssize_t _method
        Py_ssize_t _method_n
        Py_ssize_t _target
        Py_ssize_t _target_n
        Py_ssize_t _path_n                  # of the target, up to '?'
        bint _http11
        _HeaderAt* _headers
        Py_ssize_t _headers_n
        Py_ssize_t _headers_cap
        _RawSpan* _raw                      # _headers as pointers, built just before framing
        Py_ssize_t _raw_cap
        Py_ssize_t _length                  # Content-Length, -1 when absent
        bint _has_te
        bint _chunked
        bint _conn_close
        bint _conn_keep_alive
        bint _conn_upgrade
        bint _has_upgrade
        bint _expect
        bint _continue_sent
        bint _keep_alive
        bint _submit                        # for the framer; otherwise the body is dropped
        bint _part                          # a databus part: the body leaves as PART_DATA events
        bytes _method_bytes                 # of a request that is not framed (EV_OTHER)
        bytes _path_bytes
        object _extra_headers               # EV_OTHER of a /.gwcore/ path: its gwcore-* headers
        Py_ssize_t _body                    # where the (de-chunked) body begins
        Py_ssize_t _body_n                  # body bytes kept so far
        Py_ssize_t _body_total              # body bytes seen so far, kept or not
        Py_ssize_t _remaining               # of the Content-Length body or the current chunk
        Py_ssize_t _trailer                 # where the trailer section begins

    cdef unsigned char* _room(self, Py_ssize_t n) except NULL
    cdef int _reset(self) except -1
    cdef int _parse(self, list events, uint64_t now_ms) except -1
    cdef Py_ssize_t _line(self) noexcept
    cdef int _fail(self, list events, int status, str reason) except -1
    cdef int _malformed(self, list events, str detail) except -1
    cdef int _request_line(self, list events, Py_ssize_t n) except -1
    cdef int _header_line(self, list events, Py_ssize_t n) except -1
    cdef int _headers_complete(self, list events, uint64_t now_ms) except -1
    cdef bint _databus_call(self) noexcept
    cdef int _raw_headers(self) except -1
    cdef int _chunk_size(self, list events, Py_ssize_t n) except -1
    cdef dict _gwcore_headers(self)
    cdef bint _matches_channel(self) noexcept
    cdef int _complete(self, list events, uint64_t now_ms) except -1
    cdef int _add_request_line(self, object result) except -1
    cdef int _compact(self) except -1
    cdef int _shrink(self) except -1
