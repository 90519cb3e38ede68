"""DedupIndex micro benchmarks against a real LMDB environment: the Cython batch loop plus py-lmdb
puts, without commit or fsync (each round runs in a write transaction that is then aborted and
rolled back, so "new" keys stay new round after round; the commit cost belongs to store benchmarks).

    pytest bench/bench_dedup.py --benchmark-only
"""

from __future__ import annotations

import lmdb
import pytest

from gwcore import _dedup

NOW = 1_787_000_000_000
BODY = b'{"Sku":"HQ-0001","Price":12.5}'.ljust(1024, b" ")
BATCH = 128


def make_envelopes(prefix: str, count: int) -> list:
    framer = _dedup.Framer("RemoteSite")
    envelopes = []
    for i in range(count):
        headers = [
            b"NServiceBus.Id", f"{prefix}-{i:08d}-5d8a-4f43-b1d5-b3a400c1d2e3".encode(),
            b"NServiceBus.CallType", b"SingleCallSubmit",
            b"NServiceBus.Gateway", b"True",
            b"NServiceBus.CorrelationId", b"c",
            b"NServiceBus.Header.NServiceBus.EnclosedMessageTypes", b"Shared.UpdatePrice%2C+Shared",
        ]
        envelopes.append(framer.frame(headers, BODY, None, NOW))
    return envelopes


class Lmdb:
    def __init__(self, path) -> None:
        self.env = lmdb.open(str(path), max_dbs=8, map_size=256 << 20, sync=False)
        self.log = self.env.open_db(b"dedup_log")
        self.queue = self.env.open_db(b"queue")

    def in_aborted_txn(self, index, fn, *args):
        txn = self.env.begin(write=True)
        try:
            return fn(txn, *args)
        finally:
            txn.abort()
            index.rollback()


@pytest.fixture
def store(tmp_path):
    s = Lmdb(tmp_path / "bench")
    yield s
    s.env.close()


@pytest.fixture(scope="module")
def recorded() -> list:
    return make_envelopes("seen", BATCH)


@pytest.fixture
def filled(store, recorded):
    """A store holding `recorded`, committed, and the index that knows them."""
    index = _dedup.DedupIndex()
    with store.env.begin(write=True) as txn:
        index.apply_batch(txn, store.log, store.queue, recorded, NOW, 1)
    index.commit()
    return store, index


@pytest.mark.benchmark(group="dedup-apply")
@pytest.mark.parametrize("size", [1, 16, BATCH])
def bench_apply_new(benchmark, store, size):
    envelopes, index = make_envelopes("new", size), _dedup.DedupIndex()
    benchmark.extra_info["batch"] = size

    def apply(txn):
        return index.apply_batch(txn, store.log, store.queue, envelopes, NOW, 1)

    results, next_seq = benchmark(store.in_aborted_txn, index, apply)
    assert all(results) and next_seq == size + 1


@pytest.mark.benchmark(group="dedup-apply")
def bench_apply_duplicates(benchmark, filled, recorded):
    store, index = filled
    benchmark.extra_info["batch"] = BATCH

    def apply(txn):
        return index.apply_batch(txn, store.log, store.queue, recorded, NOW, BATCH + 1)

    results, next_seq = benchmark(store.in_aborted_txn, index, apply)
    assert not any(results) and next_seq == BATCH + 1


@pytest.mark.benchmark(group="dedup-check")
def bench_check_batch(benchmark, filled, recorded):
    store, index = filled
    mixed = recorded[: BATCH // 2] + make_envelopes("unseen", BATCH // 2)
    benchmark.extra_info["batch"] = BATCH
    with store.env.begin() as txn:
        results = benchmark(index.check_batch, txn, store.log, mixed)
    assert results == [True] * (BATCH // 2) + [False] * (BATCH // 2)


@pytest.mark.benchmark(group="dedup-expire")
def bench_expire(benchmark, filled):
    # The aborted transaction keeps the log; the table forgets after the first round, which
    # leaves the log walk and deletes (the cost that matters) the same each round.
    store, index = filled
    benchmark.extra_info["batch"] = BATCH

    def expire(txn):
        return index.expire(txn, store.log, NOW + 1, BATCH)

    assert benchmark(store.in_aborted_txn, index, expire) == BATCH


@pytest.mark.benchmark(group="dedup-load")
def bench_load(benchmark, tmp_path):
    """Start-up: filling the table from a log of 100,000 records (per-record cost x 10M = the
    start-up time of a 10M-record store)."""
    big = Lmdb(tmp_path / "load")
    index = _dedup.DedupIndex()
    envs = make_envelopes("load", 100_000)
    with big.env.begin(write=True) as txn:
        index.apply_batch(txn, big.log, big.queue, envs, NOW, 1)
    index.commit()

    def load():
        fresh = _dedup.DedupIndex()
        with big.env.begin() as txn:
            return fresh.load(txn, big.log)

    assert benchmark.pedantic(load, rounds=3, iterations=1) == 100_000
    big.env.close()
