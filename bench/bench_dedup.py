"""DedupIndex micro benchmarks against a real LMDB environment: the Cython batch loop plus py-lmdb
puts, without commit or fsync (each round runs in a write transaction that is then aborted, so
"new" keys stay new round after round; the commit cost belongs to store benchmarks).

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
        self.dedup = self.env.open_db(b"dedup")
        self.queue = self.env.open_db(b"queue")
        self.expiry = self.env.open_db(b"expiry")

    def in_aborted_txn(self, fn, *args):
        txn = self.env.begin(write=True)
        try:
            return fn(txn, *args)
        finally:
            txn.abort()


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
    """A store holding `recorded`, committed."""
    with store.env.begin(write=True) as txn:
        _dedup.DedupIndex().apply_batch(txn, store.dedup, store.queue, store.expiry, recorded, NOW, 0)
    return store


@pytest.mark.benchmark(group="dedup-apply")
@pytest.mark.parametrize("size", [1, 16, BATCH])
def bench_apply_new(benchmark, store, size):
    envelopes, index = make_envelopes("new", size), _dedup.DedupIndex()
    benchmark.extra_info["batch"] = size

    def apply(txn):
        return index.apply_batch(txn, store.dedup, store.queue, store.expiry, envelopes, NOW, 0)

    results, next_seq = benchmark(store.in_aborted_txn, apply)
    assert all(results) and next_seq == size


@pytest.mark.benchmark(group="dedup-apply")
def bench_apply_duplicates(benchmark, filled, recorded):
    index = _dedup.DedupIndex()
    benchmark.extra_info["batch"] = BATCH

    def apply(txn):
        return index.apply_batch(txn, filled.dedup, filled.queue, filled.expiry, recorded, NOW, BATCH)

    results, next_seq = benchmark(filled.in_aborted_txn, apply)
    assert not any(results) and next_seq == BATCH


@pytest.mark.benchmark(group="dedup-check")
def bench_check_batch(benchmark, filled, recorded):
    index = _dedup.DedupIndex()
    mixed = recorded[: BATCH // 2] + make_envelopes("unseen", BATCH // 2)
    benchmark.extra_info["batch"] = BATCH
    with filled.env.begin() as txn:
        results = benchmark(index.check_batch, txn, filled.dedup, mixed)
    assert results == [True] * (BATCH // 2) + [False] * (BATCH // 2)


@pytest.mark.benchmark(group="dedup-expire")
def bench_expire(benchmark, filled):
    index = _dedup.DedupIndex()
    benchmark.extra_info["batch"] = BATCH

    def expire(txn):
        return index.expire(txn, filled.dedup, filled.expiry, NOW + 1, BATCH)

    assert benchmark(filled.in_aborted_txn, expire) == BATCH
