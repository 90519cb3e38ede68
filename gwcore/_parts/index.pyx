# Part of gwcore/_dedup.pyx (included there, compiled as one module). gwcore._dedup: the dedup batch loops over an open py-lmdb write transaction (DedupIndex).

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
