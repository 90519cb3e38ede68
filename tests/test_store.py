"""The store and writer thread: group commit, dedup, retention, store full, disk full, consumers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid

import pytest
from tmpfs import small_tmpfs

from gwcore import StoreFullError
from gwcore._core import core
from gwcore.consumer import LocalQueue, run_handler
from gwcore.store import Store, Writer

SCOPE = "RemoteSite"


def envelope(msg_id: str, body: bytes = b"{}", framer=core.Framer(SCOPE)):
    headers = [b"NServiceBus.Id", msg_id.encode(), b"NServiceBus.CallType", b"SingleCallSubmit",
               b"NServiceBus.Gateway", b"True", b"NServiceBus.CorrelationId", msg_id.encode(),
               b"NServiceBus.Header.NServiceBus.MessageId", msg_id.encode()]
    env = framer.frame(headers, body, None, time.time_ns() // 1_000_000)
    assert type(env) is core.Envelope, env.reason
    return env


def open_store(path, **kw):
    return Store(str(path), **kw)


def run_writer(path, coro_fn, **writer_kw):
    async def main():
        store = open_store(path, **{k: writer_kw.pop(k) for k in ("map_size", "max_size") if k in writer_kw})
        writer = Writer(store, asyncio.get_running_loop(), **writer_kw)
        try:
            return await coro_fn(store, writer)
        finally:
            await asyncio.get_running_loop().run_in_executor(None, writer.close)
            store.close()

    return asyncio.run(main())


def test_group_commit_batches_and_dedups(tmp_path):
    async def body(store, writer):
        ids = [str(uuid.uuid4()) for _ in range(500)]
        futs = [writer.ingest(envelope(i)) for i in ids]
        futs += [writer.ingest(envelope(i)) for i in ids[:100]]  # duplicates, some in the same batch
        results = await asyncio.gather(*futs)
        assert results[:500] == [True] * 500 and results[500:] == [False] * 100
        assert writer.stats.batches < 600  # several jobs per commit
        assert store.counts()["queue"] == 500 and store.counts()["dedup"] == 500
        return ids

    ids = run_writer(tmp_path, body, max_delay_us=1000)
    # records survive reopen, and duplicates stay duplicates after it
    async def again(store, writer):
        assert await writer.ingest(envelope(ids[0])) is False
        assert await writer.ingest(envelope(str(uuid.uuid4()))) is True
        assert writer.next_seq == 502

    run_writer(tmp_path, again)


def test_retention_expires_old_records_incrementally(tmp_path):
    async def body(store, writer):
        ids = [str(uuid.uuid4()) for _ in range(50)]
        await asyncio.gather(*(writer.ingest(envelope(i)) for i in ids))
        await asyncio.sleep(1.3)
        writer._cleanup_due = 0  # the next batch runs a cleanup slice
        await writer.ingest(envelope(str(uuid.uuid4())))
        deadline = time.monotonic() + 5
        while store.counts()["dedup"] > 1 and time.monotonic() < deadline:
            writer._cleanup_due = 0
            await writer.ingest(envelope(str(uuid.uuid4())))
            await asyncio.sleep(0.05)
        # slices of at most 10 records each
        assert writer.stats.expired_records >= 50
        assert not writer.is_recorded(SCOPE, ids[0])
        # an expired id is new again (the retention window is the dedup guarantee)
        assert await writer.ingest(envelope(ids[0])) is True

    run_writer(tmp_path, body, dedup_ttl=1.0, cleanup_slice=10)


def test_a_sequence_number_is_never_given_twice_after_retention_and_a_drained_queue(tmp_path):
    """A commit writes no last seq to meta (one page less to sync): the last keys of the dedup log
    and the queue give it. Once the queue is drained and retention has removed every dedup
    record, meta must hold it, or the reopened store would give seq 1 to a new message again."""
    async def body(store, writer):
        await asyncio.gather(*(writer.ingest(envelope(str(uuid.uuid4()))) for _ in range(5)))
        last = writer.next_seq - 1
        assert last == 5

        def drain(txn):
            for key in [bytes(k) for k, _v in txn.cursor(db=store.queue)]:
                txn.delete(key, db=store.queue)

        await writer.call(drain)
        await asyncio.sleep(1.2)
        deadline = time.monotonic() + 5
        while store.counts()["dedup"] and time.monotonic() < deadline:
            writer._cleanup_due = 0
            await writer.call(lambda _txn: None)  # a batch: it runs a retention slice
            await asyncio.sleep(0.02)
        assert store.counts()["dedup"] == 0 and store.counts()["queue"] == 0
        return last

    last = run_writer(tmp_path, body, dedup_ttl=1.0, cleanup_slice=2)

    async def again(store, writer):
        assert store.last_seq() == last and writer.next_seq == last + 1
        assert await writer.ingest(envelope(str(uuid.uuid4()))) is True
        assert writer.next_seq == last + 2

    run_writer(tmp_path, again)


def test_map_grows_then_store_full_refuses_new_keeps_duplicates(tmp_path):
    async def body(store, writer):
        body_ = b"z" * 20_000
        first = str(uuid.uuid4())
        assert await writer.ingest(envelope(first, body_)) is True
        accepted = 1
        refused = None
        for _ in range(400):
            try:
                await writer.ingest(envelope(str(uuid.uuid4()), body_))
                accepted += 1
            except StoreFullError as exc:
                refused = exc
                break
        assert refused is not None and "store full" in str(refused)
        assert writer.stats.map_resizes >= 1
        # nothing half-written: every dedup record has its queue entry
        counts = store.counts()
        assert counts["dedup"] == counts["queue"] == accepted
        # a duplicate of a stored id is still answered (200) while full
        assert await writer.ingest(envelope(first, body_)) is False
        # consuming frees space: acks work while full, and new messages are accepted again
        for seq, _ in store.read_queue(0, 50):
            assert await writer.ack(seq) is True
        assert await writer.ingest(envelope(str(uuid.uuid4()), body_)) is True

    run_writer(tmp_path, body, map_size=256 << 10, max_size=1 << 20)


def test_disk_full_answers_503_and_loses_nothing(tmp_path):
    with small_tmpfs(tmp_path / "small", "1m") as mnt:
        async def body(store, writer):
            stored = []
            failure = None
            for _ in range(200):
                i = str(uuid.uuid4())
                try:
                    await writer.ingest(envelope(i, b"q" * 30_000))
                    stored.append(i)
                except StoreFullError as exc:  # ENOSPC maps to "store full"
                    failure = exc
                    break
            assert failure is not None and str(failure).startswith("store full: the disk is full (")
            assert stored and all(writer.is_recorded(SCOPE, i) for i in stored)
            assert store.counts()["queue"] == len(stored)
            return stored

        stored = run_writer(os.path.join(mnt, "store"), body, map_size=8 << 20, max_size=8 << 20)
        reopened = open_store(os.path.join(mnt, "store"))
        try:
            assert reopened.counts()["queue"] == len(stored)
        finally:
            reopened.close()


def test_consumer_acks_only_after_handler_and_retries_failures(tmp_path):
    async def body(store, writer):
        q = LocalQueue(store, writer, max_attempts=3, retry_base=0.01)
        writer.on_commit = q.notify
        ids = [str(uuid.uuid4()) for _ in range(10)]
        for i in ids:
            await writer.ingest(envelope(i))
        seen: list[str] = []
        failing = {ids[2]: 1, ids[5]: 99}

        async def handler(msg):
            seen.append(msg.id)
            if failing.get(msg.id, 0) >= msg.attempt:
                raise RuntimeError("boom")

        task = asyncio.ensure_future(run_handler(q, handler))
        deadline = time.monotonic() + 5
        while (store.counts()["queue"] or store.counts()["errors"] < 1) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        q.close()
        await task
        assert store.counts() == {"dedup": 10, "queue": 0, "errors": 1, "outgoing": 0, "outgoing_errors": 0,
                                  "databus_parts": 0, "databus_blobs": 0, "databus_replica": 0}
        assert seen.count(ids[2]) == 2 and seen.count(ids[5]) == 3
        assert q.poisoned == 1 and q.acked == 9

    run_writer(tmp_path, body)


def test_unacked_messages_are_redelivered_after_restart(tmp_path):
    async def first(store, writer):
        q = LocalQueue(store, writer)
        writer.on_commit = q.notify
        for i in range(3):
            await writer.ingest(envelope(f"id-{i}"))
        m = await q.get()
        await m.ack()
        await q.get()  # taken, never acknowledged: the process "dies"

    run_writer(tmp_path, first)

    async def second(store, writer):
        q = LocalQueue(store, writer)
        got = [(await q.get()).id, (await q.get()).id]
        assert got == ["id-1", "id-2"]

    run_writer(tmp_path, second)


def test_expired_ttbr_messages_are_discarded(tmp_path):
    framer = core.Framer(SCOPE)

    async def body(store, writer):
        q = LocalQueue(store, writer)
        headers = [b"NServiceBus.Id", b"short", b"NServiceBus.CallType", b"SingleCallSubmit",
                   b"NServiceBus.Gateway", b"True", b"NServiceBus.CorrelationId", b"c",
                   b"NServiceBus.TimeToBeReceived", b"00%3A00%3A01"]
        env = framer.frame(headers, b"", None, time.time_ns() // 1_000_000)
        assert env.expiry_ms > 0
        await writer.ingest(env)
        await writer.ingest(envelope("long"))
        await asyncio.sleep(1.2)
        m = await q.get()
        assert m.id == "long" and q.expired == 1
        assert store.counts()["queue"] == 1

    run_writer(tmp_path, body)


def test_one_writing_process_per_data_dir(tmp_path):
    import subprocess
    import sys

    first = open_store(tmp_path / "s")
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from gwcore.store import Store\n"
            "from gwcore import StoreUnavailableError\n"
            "print(Store(%r, readonly=True).counts()['queue'])\n"  # readers are welcome
            "try:\n    Store(%r)\nexcept StoreUnavailableError as e:\n    print(e); sys.exit(3)\n")
    path = str(tmp_path / "s")
    try:
        res = subprocess.run([sys.executable, "-c", code % (os.getcwd(), path, path)],
                             capture_output=True, text=True, cwd=os.getcwd())
        assert res.returncode == 3, res.stderr
        assert res.stdout.startswith("0\n")
        assert f"in use by another gwcore process (pid {os.getpid()} on " in res.stdout
    finally:
        first.close()
    res = subprocess.run([sys.executable, "-c", code % (os.getcwd(), path, path)],
                         capture_output=True, text=True, cwd=os.getcwd())
    assert res.returncode == 0, res.stdout + res.stderr  # released on close


def test_a_failing_batch_answers_every_job(tmp_path, monkeypatch):
    from gwcore import InternalError

    async def body(store, writer):
        def broken(*args):
            raise RuntimeError("simulated bug")

        monkeypatch.setattr(writer, "index", type("Broken", (), {"apply_batch": broken})())
        results = await asyncio.gather(*(writer.ingest(envelope(str(uuid.uuid4()))) for _ in range(5)),
                                       return_exceptions=True)
        assert all(isinstance(r, InternalError) for r in results)
        assert store.counts()["queue"] == 0

    run_writer(tmp_path, body)


def test_jobs_handed_over_while_the_write_transaction_begins_join_its_commit(tmp_path):
    """py-lmdb lets go of the GIL while it begins a write transaction, and on one core the loop
    thread then runs and hands over what it parsed. The writer begins before it drains its queue,
    so those jobs go into this commit, not the next one (two commits with the drain first)."""
    import threading

    async def body(store, writer):
        writer._cleanup_due = float("inf")  # no retention transaction in between
        entered, release = threading.Event(), threading.Event()
        real = store.env

        class Env:
            blocked = False

            def begin(self, **kw):
                if kw.get("write") and not Env.blocked:
                    Env.blocked = True
                    entered.set()  # the writer is inside its first write begin
                    assert release.wait(10)
                return real.begin(**kw)

            def __getattr__(self, name):
                return getattr(real, name)

        store.env = Env()
        loop = asyncio.get_running_loop()
        first = writer.ingest(envelope(str(uuid.uuid4())))
        assert await loop.run_in_executor(None, entered.wait, 10)
        later = [writer.ingest(envelope(str(uuid.uuid4()))) for _ in range(3)]
        for _ in range(3):
            await asyncio.sleep(0)  # the inbox hands them over at the end of the loop's turn
        assert writer._jobs.qsize() == 1  # the three, handed over while the writer begins
        release.set()
        assert await asyncio.gather(first, *later) == [True] * 4
        assert writer.stats.batches == 1  # one commit carried all four
        store.env = real

    run_writer(tmp_path, body)
