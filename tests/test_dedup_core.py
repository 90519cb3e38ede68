"""DedupIndex (gwcore._dedup) against a real LMDB environment in a temporary directory: the atomic
check-and-record, the queue and expiry entries it writes, persistence, retention."""

from __future__ import annotations

import struct

import lmdb
import pytest

from gwcore import _dedup
from gwcore.errors import FramingError

MINUTE = 60_000


class Store:
    """The three databases DedupIndex works on, opened like store.py does."""

    def __init__(self, path, map_size: int = 32 << 20) -> None:
        self.path, self.map_size = path, map_size
        self.open()

    def open(self) -> None:
        self.env = lmdb.open(str(self.path), max_dbs=8, map_size=self.map_size)
        self.dedup = self.env.open_db(b"dedup")
        self.queue = self.env.open_db(b"queue")
        self.expiry = self.env.open_db(b"expiry")

    def reopen(self) -> None:
        self.env.close()
        self.open()

    def items(self, db) -> list[tuple[bytes, bytes]]:
        with self.env.begin(db=db) as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor()]

    def apply(self, index, envelopes, accepted_ms, next_seq=0):
        with self.env.begin(write=True) as txn:
            return index.apply_batch(txn, self.dedup, self.queue, self.expiry, envelopes, accepted_ms, next_seq)

    def check(self, index, envelopes):
        with self.env.begin() as txn:
            return index.check_batch(txn, self.dedup, envelopes)

    def expire(self, index, cutoff_ms, limit=1000):
        with self.env.begin(write=True) as txn:
            return index.expire(txn, self.dedup, self.expiry, cutoff_ms, limit)


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


def rec(accepted_ms: int, seq: int) -> bytes:
    return struct.pack(">QQ", accepted_ms, seq)


def test_new_then_duplicate(store):
    index = _dedup.DedupIndex()
    a, b, c = envelope("a"), envelope("b"), envelope("c")
    assert store.apply(index, [a, b], 1000, next_seq=5) == ([True, True], 7)
    assert store.apply(index, [b, c], 2000, next_seq=7) == ([False, True], 8)
    assert store.items(store.dedup) == sorted([(a.key, rec(1000, 5)), (b.key, rec(1000, 6)), (c.key, rec(2000, 7))])
    assert store.items(store.queue) == [(_dedup.pack_seq(5), a.framed), (_dedup.pack_seq(6), b.framed), (_dedup.pack_seq(7), c.framed)]
    assert store.items(store.expiry) == [(rec(1000, 5), a.key), (rec(1000, 6), b.key), (rec(2000, 7), c.key)]
    assert (index.new_total, index.duplicate_total) == (3, 1)


def test_duplicate_within_one_batch(store):
    index = _dedup.DedupIndex()
    first, again = envelope("x", b"first"), envelope("x", b"second")
    assert store.apply(index, [first, again, envelope("y"), first], 1000) == ([True, False, True, False], 2)
    assert store.items(store.queue)[0] == (_dedup.pack_seq(0), first.framed)
    assert len(store.items(store.queue)) == 2
    assert (index.new_total, index.duplicate_total) == (2, 2)


def test_scope_separates_ids(store):
    index = _dedup.DedupIndex()
    assert store.apply(index, [envelope("x", scope="SiteA"), envelope("x", scope="SiteB")], 1) == ([True, True], 2)


def test_empty_batch(store):
    assert store.apply(_dedup.DedupIndex(), [], 1, next_seq=9) == ([], 9)


def test_persists_across_reopen(store):
    index = _dedup.DedupIndex()
    a = envelope("persisted")
    store.apply(index, [a], 1000)
    store.reopen()
    assert store.check(_dedup.DedupIndex(), [a, envelope("other")]) == [True, False]
    assert store.apply(_dedup.DedupIndex(), [a], 2000, next_seq=1) == ([False], 1)


def test_aborted_transaction_leaves_nothing(store):
    index = _dedup.DedupIndex()
    txn = store.env.begin(write=True)
    index.apply_batch(txn, store.dedup, store.queue, store.expiry, [envelope("a")], 1, 0)
    txn.abort()
    assert store.items(store.dedup) == store.items(store.queue) == store.items(store.expiry) == []
    assert store.apply(index, [envelope("a")], 1) == ([True], 1)


def test_map_full_propagates_and_counts_nothing(tmp_path):
    small = Store(tmp_path / "small", map_size=64 << 10)
    index = _dedup.DedupIndex()
    big = [envelope(f"id-{i}", b"x" * 4000) for i in range(64)]
    with pytest.raises(lmdb.MapFullError):
        small.apply(index, big, 1)
    assert (index.new_total, index.duplicate_total) == (0, 0)
    assert small.items(small.dedup) == []
    small.env.close()


def test_check_batch_is_read_only(store):
    index = _dedup.DedupIndex()
    a, b = envelope("a"), envelope("b")
    store.apply(index, [a], 1)
    with store.env.begin(write=True) as txn:
        assert index.check_batch(txn, store.dedup, [a, b, b, a]) == [True, False, False, True]
    assert [k for k, _ in store.items(store.dedup)] == [a.key]
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
    store.apply(index, [old], 1 * MINUTE, next_seq=0)
    store.apply(index, [mid], 2 * MINUTE, next_seq=1)
    store.apply(index, [new], 3 * MINUTE, next_seq=2)
    assert store.expire(index, cutoff_ms=2 * MINUTE) == 1  # strictly older than the cutoff
    assert store.check(index, [old, mid, new]) == [False, True, True]
    assert store.expire(index, cutoff_ms=3 * MINUTE + 1) == 2
    assert store.items(store.dedup) == store.items(store.expiry) == []
    assert index.expired_total == 3
    # retention removes dedup records only: the queued messages are the consumer's business
    assert len(store.items(store.queue)) == 3


def test_expire_respects_limit_oldest_first(store):
    index = _dedup.DedupIndex()
    envs = [envelope(f"id-{i}") for i in range(5)]
    for i, env in enumerate(envs):
        store.apply(index, [env], 1000 + i, next_seq=i)
    assert store.expire(index, cutoff_ms=10_000, limit=2) == 2
    assert store.check(index, envs) == [False, False, True, True, True]
    assert store.expire(index, cutoff_ms=10_000, limit=0) == 0
    assert store.expire(index, cutoff_ms=10_000, limit=10) == 3
    assert store.expire(index, cutoff_ms=10_000, limit=10) == 0


def test_expired_ids_become_new_again(store):
    index = _dedup.DedupIndex()
    a = envelope("again")
    store.apply(index, [a], 1000, next_seq=0)
    assert store.apply(index, [a], 1500, next_seq=1) == ([False], 1)
    assert store.expire(index, cutoff_ms=1001) == 1
    assert store.apply(index, [a], 2000, next_seq=1) == ([True], 2)
    assert store.items(store.dedup) == [(a.key, rec(2000, 1))]


def test_expire_keeps_a_record_written_again_under_a_newer_seq(store):
    index = _dedup.DedupIndex()
    a = envelope("rewritten")
    store.apply(index, [a], 1000, next_seq=0)
    with store.env.begin(write=True) as txn:
        # a stale expiry entry naming a record that now carries seq 9 (e.g. after a restore)
        txn.put(a.key, rec(5000, 9), db=store.dedup)
        txn.put(rec(5000, 9), a.key, db=store.expiry)
    assert store.expire(index, cutoff_ms=2000) == 0
    assert store.items(store.expiry) == [(rec(5000, 9), a.key)]
    assert store.check(index, [a]) == [True]
    assert store.expire(index, cutoff_ms=6000) == 1
    assert store.check(index, [a]) == [False]


def test_expire_entry_without_record(store):
    index = _dedup.DedupIndex()
    with store.env.begin(write=True) as txn:
        txn.put(rec(1, 0), b"RemoteSite\x00gone", db=store.expiry)
    assert store.expire(index, cutoff_ms=10) == 0
    assert store.items(store.expiry) == []


def test_expire_on_empty_store(store):
    assert store.expire(_dedup.DedupIndex(), cutoff_ms=2**64 - 1) == 0


def test_expire_corrupt_entry(store):
    with store.env.begin(write=True) as txn:
        txn.put(b"short", b"RemoteSite\x00x", db=store.expiry)
    with pytest.raises(FramingError):
        store.expire(_dedup.DedupIndex(), cutoff_ms=10)


def test_buffers_mode(tmp_path):
    # py-lmdb hands out memoryviews that die on the next write: expire() must copy what it keeps
    s = Store(tmp_path / "buffers")
    index = _dedup.DedupIndex()
    envs = [envelope(f"b{i}") for i in range(20)]
    s.apply(index, envs, 1000)
    with s.env.begin(write=True, buffers=True) as txn:
        assert index.check_batch(txn, s.dedup, envs[:2] + [envelope("new")]) == [True, True, False]
        assert index.expire(txn, s.dedup, s.expiry, 2000, 100) == 20
    assert s.items(s.dedup) == []
    s.env.close()
