# Part of gwcore/_dedup.pyx (included there, compiled as one module). gwcore._dedup: the dedup
# index (DedupIndex): an append-only dedup log in LMDB plus a hash table in memory.
#
# Why not a B-tree keyed by the id: ids are random (GUIDs), so every new message dirtied a random
# 4 KiB leaf of a tree that outgrows the page cache, and every commit wrote and synced one page per
# message. The log is keyed by the queue sequence number, so a batch appends to the right edge of
# two trees (log and queue) and the commit writes a handful of pages whatever the store's size.
# The table answers "seen before?" in memory; a candidate whose 64-bit hash matches is confirmed
# against the key stored in the log, so a hash collision costs one read and is never a false
# duplicate.

# ---------------------------------------------------------------------------------------------
# SipHash-1-3 (Aumasson and Bernstein), keyed per process: an id chosen by a remote sender cannot be
# crafted to pile up in one run of the table.

cdef inline uint64_t _rotl(uint64_t x, int b) noexcept nogil:
    return (x << b) | (x >> (64 - b))


cdef struct _Sip:
    uint64_t v0
    uint64_t v1
    uint64_t v2
    uint64_t v3


cdef inline void _sip_round(_Sip* s) noexcept nogil:
    s.v0 += s.v1
    s.v1 = _rotl(s.v1, 13)
    s.v1 ^= s.v0
    s.v0 = _rotl(s.v0, 32)
    s.v2 += s.v3
    s.v3 = _rotl(s.v3, 16)
    s.v3 ^= s.v2
    s.v0 += s.v3
    s.v3 = _rotl(s.v3, 21)
    s.v3 ^= s.v0
    s.v2 += s.v1
    s.v1 = _rotl(s.v1, 17)
    s.v1 ^= s.v2
    s.v2 = _rotl(s.v2, 32)


cdef inline uint64_t _get_le64(const unsigned char* p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(7, -1, -1):
        v = (v << 8) | p[i]
    return v


cdef uint64_t _siphash13(uint64_t k0, uint64_t k1, const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef _Sip s
    cdef uint64_t m, last
    cdef Py_ssize_t i, full = n & ~(<Py_ssize_t>7)
    cdef int left = <int>(n & 7), j
    s.v0 = k0 ^ 0x736f6d6570736575ULL
    s.v1 = k1 ^ 0x646f72616e646f6dULL
    s.v2 = k0 ^ 0x6c7967656e657261ULL
    s.v3 = k1 ^ 0x7465646279746573ULL
    i = 0
    while i < full:
        m = _get_le64(p + i)
        s.v3 ^= m
        _sip_round(&s)
        s.v0 ^= m
        i += 8
    last = (<uint64_t>n & 0xFF) << 56
    for j in range(left - 1, -1, -1):
        last |= (<uint64_t>p[full + j]) << (8 * j)
    s.v3 ^= last
    _sip_round(&s)
    s.v0 ^= last
    s.v2 ^= 0xFF
    _sip_round(&s)
    _sip_round(&s)
    _sip_round(&s)
    return s.v0 ^ s.v1 ^ s.v2 ^ s.v3


def siphash13(bytes key not None, bytes data not None):
    """SipHash-1-3 of *data* under a 16-byte *key* (little-endian halves), as DedupIndex uses it."""
    if PyBytes_GET_SIZE(key) != 16:
        raise ValueError("the SipHash key is 16 bytes")
    return _siphash13(_get_le64(_ptr(key)), _get_le64(_ptr(key) + 8), _ptr(data), PyBytes_GET_SIZE(data))


# ---------------------------------------------------------------------------------------------
# the table: open addressing, linear probing, backward-shift deletion (no tombstones)

cdef enum:
    LOG_VALUE_PREFIX = 8                # u64 accepted_ms, then the dedup key
    MIN_TABLE = 1024                    # slots; a power of two


cdef inline bint _between(Py_ssize_t home, Py_ssize_t hole, Py_ssize_t at) noexcept nogil:
    # Is `home` cyclically in (hole, at]? Then the entry at `at` may not move back to `hole`.
    if hole <= at:
        return hole < home <= at
    return home > hole or home <= at


cdef class DedupIndex:
    def __cinit__(self):
        self._slots = NULL
        self._undo = NULL

    def __init__(self, key=None):
        cdef bytes k
        if key is None:
            import os
            k = os.urandom(16)
        else:
            k = bytes(key)
            if PyBytes_GET_SIZE(k) != 16:
                raise ValueError("DedupIndex key must be 16 bytes")
        self._k0 = _get_le64(_ptr(k))
        self._k1 = _get_le64(_ptr(k) + 8)
        self._resize(MIN_TABLE)

    def __dealloc__(self):
        PyMem_Free(self._slots)
        PyMem_Free(self._undo)

    def __len__(self):
        return self._count

    @property
    def capacity(self):
        return self._mask + 1

    @property
    def memory_bytes(self):
        return (self._mask + 1) * sizeof(_IndexSlot) + self._undo_cap * sizeof(_IndexSlot)

    # -- table primitives (no Python, no GIL release: another thread holding the GIL always sees a
    #    consistent table)

    cdef uint64_t _hash(self, const unsigned char* p, Py_ssize_t n) noexcept:
        return _siphash13(self._k0, self._k1, p, n)

    cdef int _resize(self, Py_ssize_t slots) except -1:
        cdef _IndexSlot* old = self._slots
        cdef Py_ssize_t old_n = self._mask + 1 if old != NULL else 0
        cdef _IndexSlot* fresh = <_IndexSlot*>PyMem_Malloc(slots * sizeof(_IndexSlot))
        cdef Py_ssize_t i, j, mask = slots - 1
        if fresh == NULL:
            raise MemoryError()
        memset(fresh, 0, slots * sizeof(_IndexSlot))
        for i in range(old_n):
            if old[i].seq:
                j = <Py_ssize_t>(old[i].hash & <uint64_t>mask)
                while fresh[j].seq:
                    j = (j + 1) & mask
                fresh[j] = old[i]
        self._slots = fresh
        self._mask = mask
        PyMem_Free(old)
        return 0

    cdef int _insert(self, uint64_t h, uint64_t seq) except -1:
        cdef Py_ssize_t i
        if (self._count + 1) * 4 > (self._mask + 1) * 3:        # keep the load at most 3/4
            self._resize((self._mask + 1) * 2)
        i = <Py_ssize_t>(h & <uint64_t>self._mask)
        while self._slots[i].seq:
            i = (i + 1) & self._mask
        self._slots[i].hash = h
        self._slots[i].seq = seq
        self._count += 1
        return 0

    cdef bint _remove(self, uint64_t h, uint64_t seq) noexcept:
        cdef Py_ssize_t mask = self._mask
        cdef Py_ssize_t hole = <Py_ssize_t>(h & <uint64_t>mask), at, home
        while True:
            if self._slots[hole].seq == 0:
                return False
            if self._slots[hole].seq == seq and self._slots[hole].hash == h:
                break
            hole = (hole + 1) & mask
        at = hole
        while True:
            at = (at + 1) & mask
            if self._slots[at].seq == 0:
                break
            home = <Py_ssize_t>(self._slots[at].hash & <uint64_t>mask)
            if _between(home, hole, at):
                continue
            self._slots[hole] = self._slots[at]
            hole = at
        self._slots[hole].hash = 0
        self._slots[hole].seq = 0
        self._count -= 1
        return True

    cdef int _remember(self, uint64_t h, uint64_t seq) except -1:
        cdef _IndexSlot* grown
        cdef Py_ssize_t want
        if self._undo_n == self._undo_cap:
            want = max(64, self._undo_cap * 2)
            grown = <_IndexSlot*>PyMem_Realloc(self._undo, want * sizeof(_IndexSlot))
            if grown == NULL:
                raise MemoryError()
            self._undo = grown
            self._undo_cap = want
        self._undo[self._undo_n].hash = h
        self._undo[self._undo_n].seq = seq
        self._undo_n += 1
        return 0

    cdef uint64_t _find(self, object get, object log_db, bytes key, uint64_t h,
                        uint64_t batch_start, list pending) except? 0:
        # The seq of the log entry recording `key`, or 0. Every slot with the same hash is checked
        # against the log, so a collision is a read, never a wrong answer. Records of the batch
        # being applied (seq >= batch_start) are not in the log yet: `pending` holds their keys.
        cdef Py_ssize_t i = <Py_ssize_t>(h & <uint64_t>self._mask)
        cdef uint64_t seq
        cdef bytes value, other
        cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
        while self._slots[i].seq:
            if self._slots[i].hash == h:
                # A slot the log does not confirm (a hash collision, or a reader whose snapshot
                # predates the writer's open transaction) is simply not a match.
                seq = self._slots[i].seq
                if pending is not None and seq >= batch_start:
                    other = <bytes>pending[seq - batch_start]
                    if PyBytes_GET_SIZE(other) == n and memcmp(_ptr(other), _ptr(key), n) == 0:
                        return seq
                    i = (i + 1) & self._mask
                    continue
                found = get(_pack_u64(seq), db=log_db)
                if found is not None:
                    value = _as_bytes(found)
                    if (PyBytes_GET_SIZE(value) == LOG_VALUE_PREFIX + n
                            and memcmp(_ptr(value) + LOG_VALUE_PREFIX, _ptr(key), n) == 0):
                        return seq
            i = (i + 1) & self._mask
        return 0

    # -- the batch operations

    def load(self, txn, log_db, progress=None, Py_ssize_t every=1000000):
        """Fill the table from the dedup log (start-up); returns the number of records."""
        cdef Py_ssize_t loaded = 0
        cdef bytes key, value
        cdef Py_ssize_t want = MIN_TABLE
        entries = txn.stat(log_db)["entries"]
        while want * 3 < (entries + self._count) * 4 + 4:
            want *= 2
        if want > self._mask + 1:
            self._resize(want)
        cursor = txn.cursor(db=log_db)
        try:
            for k, v in cursor.iternext():
                key = _as_bytes(k)
                value = _as_bytes(v)
                if PyBytes_GET_SIZE(key) != 8 or PyBytes_GET_SIZE(value) < LOG_VALUE_PREFIX:
                    raise FramingError(
                        f"corrupt dedup log entry: key of {PyBytes_GET_SIZE(key)} bytes, "
                        f"value of {PyBytes_GET_SIZE(value)} bytes")
                self._insert(self._hash(_ptr(value) + LOG_VALUE_PREFIX,
                                        PyBytes_GET_SIZE(value) - LOG_VALUE_PREFIX),
                             _get_u64(_ptr(key)))
                loaded += 1
                if progress is not None and loaded % every == 0:
                    progress(loaded, entries)
        finally:
            cursor.close()
        return loaded

    def apply_batch(self, txn, log_db, queue_db, list envelopes not None,
                    uint64_t accepted_ms, uint64_t next_seq):
        cdef object get = txn.get
        cdef list results = []
        cdef list pending = []              # keys of this batch's new records, by seq - next_seq
        cdef list queue_items = []
        cdef list log_items = []
        cdef uint64_t seq = next_seq, h
        cdef unsigned long long new = 0, duplicate = 0
        cdef bytes seq_key, key, value
        cdef Envelope env
        cdef Py_ssize_t n
        if next_seq == 0 or next_seq >= (1ULL << 62):
            raise ValueError(f"next_seq out of range: {next_seq}")
        for obj in envelopes:
            env = <Envelope?>obj
            key = env.key
            n = PyBytes_GET_SIZE(key)
            h = self._hash(_ptr(key), n)
            if self._find(get, log_db, key, h, next_seq, pending):
                results.append(False)
                duplicate += 1
                continue
            seq_key = _pack_u64(seq)
            value = PyBytes_FromStringAndSize(NULL, LOG_VALUE_PREFIX + n)
            _put_u64(<unsigned char*>PyBytes_AS_STRING(value), accepted_ms)
            memcpy(<unsigned char*>PyBytes_AS_STRING(value) + LOG_VALUE_PREFIX, _ptr(key), n)
            queue_items.append((seq_key, env.framed))
            log_items.append((seq_key, value))
            pending.append(key)
            self._insert(h, seq)
            self._remember(h, seq)
            results.append(True)
            seq += 1
            new += 1
        if new:
            # Both keys only grow: append at the right edge of each tree, one call per tree. A
            # pair not added means its key was not above the last one: a sequence went backwards.
            if txn.cursor(db=queue_db).putmulti(queue_items, append=True)[1] != <Py_ssize_t>new:
                raise InternalError(f"queue positions from {next_seq} already taken (sequence went backwards)")
            if txn.cursor(db=log_db).putmulti(log_items, append=True)[1] != <Py_ssize_t>new:
                raise InternalError(f"dedup log positions from {next_seq} already taken (sequence went backwards)")
        # Counted only once every put went through: an lmdb error makes the caller abort the
        # whole transaction (and call rollback()), and then nothing of this batch happened.
        self.new_total += new
        self.duplicate_total += duplicate
        return results, seq

    def commit(self):
        """The transaction of the batches applied since the last commit()/rollback() committed."""
        self._undo_n = 0

    def rollback(self):
        """The transaction aborted: forget the records it added. Returns how many."""
        cdef Py_ssize_t i, n = self._undo_n
        for i in range(n - 1, -1, -1):
            self._remove(self._undo[i].hash, self._undo[i].seq)
        self._undo_n = 0
        return n

    def check_batch(self, txn, log_db, list envelopes not None):
        cdef object get = txn.get
        cdef list results = []
        cdef bytes key
        for obj in envelopes:
            key = (<Envelope?>obj).key
            results.append(self._find(get, log_db, key, self._hash(_ptr(key), PyBytes_GET_SIZE(key)), 0, None) != 0)
        return results

    def contains(self, txn, log_db, bytes key not None):
        return self._find(txn.get, log_db, key, self._hash(_ptr(key), PyBytes_GET_SIZE(key)), 0, None) != 0

    def expire(self, txn, log_db, uint64_t cutoff_ms, Py_ssize_t limit):
        cdef object cursor
        cdef Py_ssize_t deleted = 0
        cdef bytes key, value
        if limit <= 0:
            return 0
        cursor = txn.cursor(db=log_db)
        try:
            if not cursor.first():
                return 0
            while deleted < limit:
                # copies: with buffers=True py-lmdb hands out views that die on the next write
                key = _as_bytes(cursor.key())
                if PyBytes_GET_SIZE(key) == 0:
                    break           # the cursor ran off the end after the last delete
                value = _as_bytes(cursor.value())
                if PyBytes_GET_SIZE(key) != 8 or PyBytes_GET_SIZE(value) < LOG_VALUE_PREFIX:
                    raise FramingError(
                        f"corrupt dedup log entry: key of {PyBytes_GET_SIZE(key)} bytes, "
                        f"value of {PyBytes_GET_SIZE(value)} bytes")
                # The log is in acceptance order: the first young entry ends the walk.
                if _get_u64(_ptr(value)) >= cutoff_ms:
                    break
                self._remove(self._hash(_ptr(value) + LOG_VALUE_PREFIX,
                                        PyBytes_GET_SIZE(value) - LOG_VALUE_PREFIX),
                             _get_u64(_ptr(key)))
                deleted += 1
                cursor.delete()     # deletes and steps to the next entry
        finally:
            cursor.close()
        self.expired_total += deleted
        return deleted
