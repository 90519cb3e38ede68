"""DedupIndex (gwcore._dedup) against a real LMDB environment in a temporary directory: the atomic
check-and-record, the dedup log and queue entries it writes, rollback, reloading the table from the
log, retention, and the hash table itself against a Python set."""

from __future__ import annotations

import random
import struct

import lmdb
import pytest
from hypothesis import given, settings, strategies as st

from gwcore import _dedup
from gwcore.errors import FramingError, InternalError

MINUTE = 60_000


class Store:
    """The two databases DedupIndex works on, opened like store.py does."""

    def __init__(self, path, map_size: int = 32 << 20) -> None:
        self.path, self.map_size = path, map_size
        self.open()

    def open(self) -> None:
        self.env = lmdb.open(str(self.path), max_dbs=8, map_size=self.map_size)
        self.log = self.env.open_db(b"dedup_log")
        self.queue = self.env.open_db(b"queue")

    def reopen(self) -> None:
        self.env.close()
        self.open()

    def items(self, db) -> list[tuple[bytes, bytes]]:
        with self.env.begin(db=db) as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor()]

    def apply(self, index, envelopes, accepted_ms, next_seq=1):
        try:
            with self.env.begin(write=True) as txn:
                out = index.apply_batch(txn, self.log, self.queue, envelopes, accepted_ms, next_seq)
        except BaseException:
            index.rollback()
            raise
        index.commit()
        return out

    def check(self, index, envelopes):
        with self.env.begin() as txn:
            return index.check_batch(txn, self.log, envelopes)

    def expire(self, index, cutoff_ms, limit=1000):
        with self.env.begin(write=True) as txn:
            return index.expire(txn, self.log, cutoff_ms, limit)

    def loaded(self, **kw):
        index = _dedup.DedupIndex()
        with self.env.begin() as txn:
            index.load(txn, self.log, **kw)
        return index


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "lmdb")
    yield s
    s.env.close()


def envelope(msg_id: str, body: bytes = b"body", scope: str = "RemoteSite", now_ms: int = 0):
    headers = [b"NServiceBus.Id", msg_id.encode(), b"NServiceBus.CallType", b"SingleCallSubmit"]
    env = _dedup.Framer(scope).frame(headers, body, None, now_ms)
    assert isinstance(env, _dedup.Envelope), env
    return env


def seq(n: int) -> bytes:
    return struct.pack(">Q", n)


def logged(accepted_ms: int, env) -> bytes:
    return struct.pack(">Q", accepted_ms) + env.key


def test_new_then_duplicate(store):
    index = _dedup.DedupIndex()
    a, b, c = envelope("a"), envelope("b"), envelope("c")
    assert store.apply(index, [a, b], 1000, next_seq=5) == ([True, True], 7)
    assert store.apply(index, [b, c], 2000, next_seq=7) == ([False, True], 8)
    assert store.items(store.log) == [(seq(5), logged(1000, a)), (seq(6), logged(1000, b)), (seq(7), logged(2000, c))]
    assert store.items(store.queue) == [(seq(5), a.framed), (seq(6), b.framed), (seq(7), c.framed)]
    assert (index.new_total, index.duplicate_total, len(index)) == (3, 1, 3)


def test_duplicate_within_one_batch(store):
    index = _dedup.DedupIndex()
    first, again = envelope("x", b"first"), envelope("x", b"second")
    assert store.apply(index, [first, again, envelope("y"), first], 1000) == ([True, False, True, False], 3)
    assert store.items(store.queue)[0] == (seq(1), first.framed)
    assert len(store.items(store.queue)) == 2
    assert (index.new_total, index.duplicate_total) == (2, 2)


def test_scope_separates_ids(store):
    index = _dedup.DedupIndex()
    assert store.apply(index, [envelope("x", scope="SiteA"), envelope("x", scope="SiteB")], 1) == ([True, True], 3)


def test_empty_batch(store):
    assert store.apply(_dedup.DedupIndex(), [], 1, next_seq=9) == ([], 9)


def test_sequence_zero_and_backwards_are_refused(store):
    index = _dedup.DedupIndex()
    with pytest.raises(ValueError):
        store.apply(index, [envelope("a")], 1, next_seq=0)
    store.apply(index, [envelope("a")], 1, next_seq=10)
    # a sequence number that went backwards would overwrite the queue: refused, nothing written
    with pytest.raises(InternalError, match="already taken"):
        store.apply(index, [envelope("b")], 1, next_seq=10)
    assert len(index) == 1 and [k for k, _ in store.items(store.log)] == [seq(10)]


def test_persists_across_reopen(store):
    index = _dedup.DedupIndex()
    a = envelope("persisted")
    store.apply(index, [a], 1000)
    store.reopen()
    fresh = store.loaded()
    assert len(fresh) == 1
    assert store.check(fresh, [a, envelope("other")]) == [True, False]
    assert store.apply(fresh, [a], 2000, next_seq=2) == ([False], 2)
    # an empty table over the same log knows nothing: the table, not the log, answers the check
    assert store.check(_dedup.DedupIndex(), [a]) == [False]


def test_load_reports_progress_and_sizes_the_table(store):
    index = _dedup.DedupIndex()
    envs = [envelope(f"p{i}") for i in range(5000)]
    store.apply(index, envs, 1000)
    calls = []
    fresh = Store.loaded(store, progress=lambda done, total: calls.append((done, total)), every=1000)
    assert calls == [(n, 5000) for n in (1000, 2000, 3000, 4000, 5000)]
    assert len(fresh) == 5000 and fresh.capacity >= 5000 * 4 // 3
    assert store.check(fresh, envs[::97]) == [True] * len(envs[::97])


def test_load_refuses_a_corrupt_log(store):
    with store.env.begin(write=True) as txn:
        txn.put(b"short", b"12345678RemoteSite\x00x", db=store.log)
    with pytest.raises(FramingError, match="corrupt dedup log"):
        store.loaded()


def test_aborted_transaction_rolls_the_table_back(store):
    index = _dedup.DedupIndex()
    store.apply(index, [envelope("kept")], 1)
    txn = store.env.begin(write=True)
    assert index.apply_batch(txn, store.log, store.queue, [envelope("a"), envelope("b")], 1, 2) == ([True, True], 4)
    txn.abort()
    assert index.rollback() == 2
    assert len(index) == 1
    assert len(store.items(store.log)) == len(store.items(store.queue)) == 1
    assert store.apply(index, [envelope("a"), envelope("kept")], 1, next_seq=2) == ([True, False], 3)


def test_map_full_propagates_and_counts_nothing(tmp_path):
    small = Store(tmp_path / "small", map_size=64 << 10)
    index = _dedup.DedupIndex()
    big = [envelope(f"id-{i}", b"x" * 4000) for i in range(64)]
    with pytest.raises(lmdb.MapFullError):
        small.apply(index, big, 1)
    assert (index.new_total, index.duplicate_total, len(index)) == (0, 0, 0)
    assert small.items(small.log) == []
    small.env.close()


def test_a_slot_the_log_does_not_confirm_is_not_a_match(store):
    # The table holds hashes; the key in the log decides. Rewrite a's log entry to another key:
    # the slot still carries a's hash, and a must now read as new (as after a hash collision).
    index = _dedup.DedupIndex()
    a = envelope("a")
    store.apply(index, [a], 1000, next_seq=1)
    with store.env.begin(write=True) as txn:
        txn.put(seq(1), logged(1000, envelope("someone-else")), db=store.log)
    assert store.check(index, [a]) == [False]
    with store.env.begin(write=True) as txn:
        txn.delete(seq(1), db=store.log)
    assert store.check(index, [a]) == [False]


def test_check_batch_is_read_only(store):
    index = _dedup.DedupIndex()
    a, b = envelope("a"), envelope("b")
    store.apply(index, [a], 1)
    with store.env.begin(write=True) as txn:
        assert index.check_batch(txn, store.log, [a, b, b, a]) == [True, False, False, True]
        assert index.contains(txn, store.log, a.key) and not index.contains(txn, store.log, b.key)
    assert [v for _, v in store.items(store.log)] == [logged(1, a)]
    assert (index.new_total, index.duplicate_total) == (1, 0)


def test_rejects_non_envelopes(store):
    index = _dedup.DedupIndex()
    with pytest.raises(TypeError):
        store.apply(index, [b"RemoteSite\x00id"], 1)
    with pytest.raises(TypeError):
        store.check(index, [_dedup.Rejection(400, "no")])


def test_expire_respects_cutoff(store):
    index = _dedup.DedupIndex()
    old, mid, new = envelope("old"), envelope("mid"), envelope("new")
    store.apply(index, [old], 1 * MINUTE, next_seq=1)
    store.apply(index, [mid], 2 * MINUTE, next_seq=2)
    store.apply(index, [new], 3 * MINUTE, next_seq=3)
    assert store.expire(index, cutoff_ms=2 * MINUTE) == 1  # strictly older than the cutoff
    assert store.check(index, [old, mid, new]) == [False, True, True]
    assert store.expire(index, cutoff_ms=3 * MINUTE + 1) == 2
    assert store.items(store.log) == [] and len(index) == 0
    assert index.expired_total == 3
    # retention removes dedup records only: the queued messages are the consumer's business
    assert len(store.items(store.queue)) == 3


def test_expire_respects_limit_oldest_first(store):
    index = _dedup.DedupIndex()
    envs = [envelope(f"id-{i}") for i in range(5)]
    for i, env in enumerate(envs):
        store.apply(index, [env], 1000 + i, next_seq=i + 1)
    assert store.expire(index, cutoff_ms=10_000, limit=2) == 2
    assert store.check(index, envs) == [False, False, True, True, True]
    assert store.expire(index, cutoff_ms=10_000, limit=0) == 0
    assert store.expire(index, cutoff_ms=10_000, limit=10) == 3
    assert store.expire(index, cutoff_ms=10_000, limit=10) == 0


def test_expired_ids_become_new_again(store):
    index = _dedup.DedupIndex()
    a = envelope("again")
    store.apply(index, [a], 1000, next_seq=1)
    assert store.apply(index, [a], 1500, next_seq=2) == ([False], 2)
    assert store.expire(index, cutoff_ms=1001) == 1
    assert store.apply(index, [a], 2000, next_seq=2) == ([True], 3)
    assert store.items(store.log) == [(seq(2), logged(2000, a))]
    assert store.check(store.loaded(), [a]) == [True]


def test_expire_on_empty_store(store):
    assert store.expire(_dedup.DedupIndex(), cutoff_ms=2**64 - 1) == 0


def test_expire_corrupt_entry(store):
    with store.env.begin(write=True) as txn:
        txn.put(b"short", b"x", db=store.log)
    with pytest.raises(FramingError):
        store.expire(_dedup.DedupIndex(), cutoff_ms=10)


def test_buffers_mode(tmp_path):
    # py-lmdb hands out memoryviews that die on the next write: expire() must copy what it keeps
    s = Store(tmp_path / "buffers")
    index = _dedup.DedupIndex()
    envs = [envelope(f"b{i}") for i in range(20)]
    s.apply(index, envs, 1000)
    with s.env.begin(write=True, buffers=True) as txn:
        assert index.check_batch(txn, s.log, envs[:2] + [envelope("new")]) == [True, True, False]
        assert index.expire(txn, s.log, 2000, 100) == 20
    assert s.items(s.log) == [] and len(index) == 0
    s.env.close()


def test_table_matches_a_set_through_growth_expiry_and_rollback(store):
    # Many more records than the initial table, expired from the front, with aborted batches mixed
    # in: linear probing with backward-shift deletion must keep every live key findable.
    rng = random.Random(7)
    index = _dedup.DedupIndex()
    live: dict[str, int] = {}                       # id -> accepted_ms
    next_seq, clock = 1, 0
    for round_ in range(60):
        clock += 10
        ids = [f"r{rng.randrange(4000)}" for _ in range(rng.randrange(1, 120))]
        envs = [envelope(i) for i in ids]
        if round_ % 7 == 3:                          # an aborted batch changes nothing
            txn = store.env.begin(write=True)
            index.apply_batch(txn, store.log, store.queue, envs, clock, next_seq)
            txn.abort()
            index.rollback()
        else:
            flags, next_seq = store.apply(index, envs, clock, next_seq)
            seen = set()
            for i, flag in zip(ids, flags):
                assert flag == (i not in live and i not in seen), i
                seen.add(i)
            for i in seen:
                live.setdefault(i, clock)
        if round_ % 5 == 4:
            cutoff = max(0, clock - 100)
            store.expire(index, cutoff_ms=cutoff, limit=10_000)
            live = {i: t for i, t in live.items() if t >= cutoff}
        assert len(index) == len(live)
    probe = sorted(live) + [f"r{n}" for n in range(4000, 4050)]
    assert store.check(index, [envelope(i) for i in probe]) == [i in live for i in probe]
    assert store.check(store.loaded(), [envelope(i) for i in probe]) == [i in live for i in probe]


# -- SipHash-1-3, against a Python reading of the paper checked on its published 2-4 vectors

def _siphash(key: bytes, data: bytes, c: int, d: int) -> int:
    mask = (1 << 64) - 1

    def rotl(x, b):
        return ((x << b) | (x >> (64 - b))) & mask

    k0, k1 = struct.unpack("<QQ", key)
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D, k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]

    def rounds(n):
        for _ in range(n):
            v[0] = (v[0] + v[1]) & mask; v[1] = rotl(v[1], 13) ^ v[0]; v[0] = rotl(v[0], 32)  # noqa: E702
            v[2] = (v[2] + v[3]) & mask; v[3] = rotl(v[3], 16) ^ v[2]  # noqa: E702
            v[0] = (v[0] + v[3]) & mask; v[3] = rotl(v[3], 21) ^ v[0]  # noqa: E702
            v[2] = (v[2] + v[1]) & mask; v[1] = rotl(v[1], 17) ^ v[2]; v[2] = rotl(v[2], 32)  # noqa: E702

    tail = len(data) % 8
    words = [struct.unpack_from("<Q", data, i)[0] for i in range(0, len(data) - tail, 8)]
    words.append(int.from_bytes(data[len(data) - tail:], "little") | ((len(data) & 0xFF) << 56))
    for m in words:
        v[3] ^= m
        rounds(c)
        v[0] ^= m
    v[2] ^= 0xFF
    rounds(d)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def test_python_siphash_reproduces_the_paper():
    key = bytes(range(16))
    assert _siphash(key, b"", 2, 4) == 0x726FDB47DD0E0E31
    assert _siphash(key, bytes(range(15)), 2, 4) == 0xA129CA6149BE45E5


@settings(max_examples=300, deadline=None)
@given(key=st.binary(min_size=16, max_size=16), data=st.binary(max_size=80))
def test_siphash13_matches_the_reference(key, data):
    assert _dedup.siphash13(key, data) == _siphash(key, data, 1, 3)
