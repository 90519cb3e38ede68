"""One durable commit of a growing store, with and without the zeroed tail (gwcore/tail.py).

Each round commits one 2 KiB value appended to a store's queue, as a single connection's submit
does, through ``Store.commit`` (LMDB's data sync and its meta page written with ``O_DSYNC``). With
the tail the new pages land in zeros written ahead; without it every commit extends the file.
It runs in the repository's var/ (the data dir's disk, not a tmpfs):

    pytest bench/bench_store_tail.py --benchmark-only
"""

from __future__ import annotations

import itertools
import os
import shutil
import time

import pytest

from gwcore.store import Store

VALUE = os.urandom(2048)


@pytest.fixture
def store_dir():
    # the repository's var/: the data dir's disk, not the tmpfs a /tmp may be
    base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "var")
    path = os.path.join(base, f"bench-tail-{os.getpid()}-{time.monotonic_ns()}")
    os.makedirs(path)
    return path


@pytest.mark.benchmark(group="store-commit")
@pytest.mark.parametrize("preallocate", [0, 64 << 20], ids=["file-grows", "zeroed-tail"])
def bench_commit_one_message(benchmark, store_dir, preallocate):
    store = Store(str(store_dir), map_size=1 << 30, preallocate=preallocate)
    keys = itertools.count(1)
    try:
        if store.tail is not None:  # start with the runway an idle store has
            deadline = time.monotonic() + 30
            while store.tail.runway < preallocate // 2 and time.monotonic() < deadline:
                time.sleep(0.01)

        def commit() -> None:
            txn = store.env.begin(write=True)
            txn.put(next(keys).to_bytes(8, "big"), VALUE, db=store.queue, append=True)
            store.commit(txn)

        benchmark.pedantic(commit, rounds=400, iterations=1, warmup_rounds=20)
        with store.env.begin() as txn:
            assert txn.stat(store.queue)["entries"] == next(keys) - 1
    finally:
        store.close()
        shutil.rmtree(store_dir)
