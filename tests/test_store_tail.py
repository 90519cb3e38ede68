"""The store's zeroed tail (gwcore/tail.py): zeros written ahead of LMDB's pages, never over them."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import time
import uuid

import lmdb
import pytest
from test_store import SCOPE, envelope
from tmpfs import small_tmpfs

from gwcore import tail as tail_module
from gwcore.config import Settings
from gwcore.store import Store, Writer
from gwcore.tail import ZeroedTail


def _used(env) -> int:
    """The bytes a raw environment's pages take (what Store.size_bytes says of a store's)."""
    return (env.info()["last_pgno"] + 1) * env.stat()["psize"]


def commit_one(store: Store, key: bytes = b"tail-test") -> None:
    txn = store.env.begin(write=True)
    txn.put(key, b"v", db=store.meta)
    store.commit(txn)


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_commits_write_into_zeros_written_ahead(tmp_path):
    store = Store(str(tmp_path), map_size=16 << 20, preallocate=2 << 20)
    data = os.path.join(str(tmp_path), "data.mdb")

    async def main():
        writer = Writer(store, asyncio.get_running_loop())
        try:
            ids = [str(uuid.uuid4()) for _ in range(400)]
            assert await asyncio.gather(*(writer.ingest(envelope(i, os.urandom(3000))) for i in ids)) == [True] * 400
            return ids, writer
        finally:
            await asyncio.get_running_loop().run_in_executor(None, writer.close)

    try:
        ids, writer = asyncio.run(main())
        tail = store.tail
        assert tail is not None
        wait_for(lambda: tail.runway >= 2 << 20)  # all of it: the thread is done writing
        with tail.lock:
            st = os.stat(data)
        # the file holds the data and the zeros past it, and the zeros are real blocks, not a hole
        assert st.st_size == tail.end >= store.size_bytes() + (2 << 20)
        assert st.st_blocks * 512 >= st.st_size
        assert tail.written > 0 and tail.errors == 0
        families = {f.name: f for f in store.metrics()}
        assert families["gwcore_store_preallocated_bytes"].samples[0].value == tail.runway
        assert all(writer.is_recorded(SCOPE, i) for i in ids)
    finally:
        store.close()
    # reopened, the store reads the same (LMDB ignores the zeros past its last page)
    again = Store(str(tmp_path), preallocate=0)
    try:
        assert again.counts()["queue"] == 400 and again.tail is None
        assert os.stat(data).st_size == st.st_size  # nothing truncated
    finally:
        again.close()


def test_no_tail_without_sync_or_when_set_to_zero(tmp_path):
    for kw in ({"sync": False, "preallocate": 1 << 20}, {"preallocate": 0}):
        store = Store(str(tmp_path / str(len(kw))), **kw)
        try:
            assert store.tail is None
        finally:
            store.close()
    assert Settings.from_env({}).store_preallocate == 8 << 20
    assert Settings.from_env({"GWCORE_STORE_PREALLOCATE": "0"}).store_preallocate == 0
    with pytest.raises(Exception, match="GWCORE_STORE_PREALLOCATE"):
        Settings.from_env({"GWCORE_STORE_PREALLOCATE": "lots"})


def test_zeros_never_land_on_committed_pages(tmp_path, monkeypatch):
    """Commits of random sizes (inserts, overwrites, deletes) race a tail that writes small
    pieces a short way ahead, so LMDB often outruns it and it often writes right behind a
    commit: every value must read back as written, before and after a reopen."""
    monkeypatch.setattr(tail_module, "MAX_GROWTH", 1 << 40)  # never pause: race every commit
    path = str(tmp_path)
    env = lmdb.open(path, map_size=64 << 20, max_dbs=2)
    db = env.open_db(b"t")

    tail = ZeroedTail(os.path.join(path, "data.mdb"), 64 << 10, limit=lambda: 64 << 20,
                      size_bytes=lambda: _used(env), piece=4096, sync_every=64 << 10)
    rng = random.Random(7)
    model: dict[bytes, bytes] = {}
    try:
        for _ in range(400):
            txn = env.begin(write=True, db=db)
            for _ in range(rng.randint(1, 40)):
                if model and rng.random() < 0.25:
                    key = rng.choice(list(model))
                    assert txn.delete(key)
                    del model[key]
                else:
                    key = rng.randbytes(rng.choice((8, 16)))
                    value = rng.randbytes(rng.choice((50, 900, 3000, 9000)))
                    txn.put(key, value)
                    model[key] = value
            tail.commit(txn)
        wait_for(lambda: tail.runway >= 32 << 10)
        assert tail.written > 0
    finally:
        tail.close()

    def check(e) -> None:
        with e.begin(db=e.open_db(b"t")) as txn:
            assert dict(txn.cursor()) == model

    check(env)
    env.close()
    env = lmdb.open(path, map_size=64 << 20, max_dbs=2)
    try:
        check(env)
    finally:
        env.close()


def test_the_tail_leaves_a_nearly_full_disk_to_the_store(tmp_path):
    with small_tmpfs(tmp_path / "small", "6m") as mnt:
        store = Store(os.path.join(mnt, "store"), map_size=32 << 20, preallocate=2 << 20)
        try:
            tail = store.tail
            commit_one(store)
            wait_for(lambda: tail.written > 0)
            time.sleep(0.3)
            st = os.statvfs(mnt)
            assert st.f_bavail * st.f_frsize >= 2 << 20  # the disk's last 2 MiB are not zeros
            assert tail.errors == 0
        finally:
            store.close()


def test_the_tail_pauses_while_the_store_grows_fast(tmp_path):
    path = str(tmp_path)
    env = lmdb.open(path, map_size=256 << 20, max_dbs=2)

    tail = ZeroedTail(os.path.join(path, "data.mdb"), 32 << 20, limit=lambda: 256 << 20,
                      size_bytes=lambda: _used(env))
    try:
        txn = env.begin(write=True)
        txn.put(b"\0", b"first")
        tail.commit(txn)
        wait_for(lambda: tail.runway >= 16 << 20)  # an idle store gets its zeros
        value = b"v" * 3000
        n = 0
        deadline = time.monotonic() + 1.5
        paused_written = None
        while time.monotonic() < deadline:  # about 40 MiB/s of growth: well above MAX_GROWTH
            txn = env.begin(write=True)
            for _ in range(40):
                txn.put(n.to_bytes(8, "big"), value, append=True)
                n += 1
            tail.commit(txn)
            if tail.growth > tail_module.MAX_GROWTH and paused_written is None:
                time.sleep(0.05)  # the piece under way, if any, is done
                paused_written = tail.written
            time.sleep(0.002)
        assert paused_written is not None
        assert tail.written == paused_written  # no zeros while it grew fast
        assert tail.runway < 16 << 20  # the commits ate into the runway meanwhile
        wait_for(lambda: tail.runway >= 16 << 20)  # quiet again (no commit needed to wake it)
    finally:
        tail.close()
        env.close()


def test_a_failed_write_is_logged_counted_and_tried_again(tmp_path, monkeypatch, caplog):
    real_pwrite = os.pwrite
    failing = [True]

    def pwrite(fd, data, offset):
        if failing[0] and isinstance(data, memoryview):  # the tail's zeros, not the lease's line
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(tail_module.os, "pwrite", pwrite)
    monkeypatch.setattr(tail_module, "RETRY_AFTER", 0.2)
    caplog.set_level(logging.WARNING, logger="gwcore.store")
    store = Store(str(tmp_path), map_size=16 << 20, preallocate=1 << 20)
    try:
        tail = store.tail
        time.sleep(0.1)
        assert tail.written == tail.errors == 0  # nothing at open
        commit_one(store)
        wait_for(lambda: tail.errors == 1)
        assert "cannot write zeros ahead of the data" in caplog.text and "No space left" in caplog.text
        assert tail.written == 0
        # commits go on meanwhile (the file grows as without a tail)
        txn = store.env.begin(write=True)
        txn.put(b"k", b"v" * 5000, db=store.meta)
        store.commit(txn)
        failing[0] = False
        time.sleep(0.25)
        txn = store.env.begin(write=True)
        txn.put(b"k2", b"v", db=store.meta)
        store.commit(txn)  # wakes the tail, past its retry time
        wait_for(lambda: tail.runway >= 1 << 19)
        assert tail.errors == 1
    finally:
        store.close()
