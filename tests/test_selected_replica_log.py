"""Selected mode's replica in the store (gwcore/selected/stream.py): one log record per flush at
the end of ``replica_log``, read back at start, its records dropped at the dedup TTL. A real store
and writer; the stream's broker side is not involved (``Stream.load`` and ``Stream.flush`` only)."""

from __future__ import annotations

import asyncio
import types
from typing import Awaitable, Callable

from gwcore import records
from gwcore.selected.stream import DONE, INTENT, Stream
from gwcore.store import Store, Writer


def _stream(store: Store, writer: Writer, ttl: float) -> Stream:
    mode = types.SimpleNamespace(store=store, writer=writer, instance="i1",
                                 settings=types.SimpleNamespace(dedup_ttl=ttl))
    return Stream(mode)  # type: ignore[arg-type]


def _log(store: Store) -> list[tuple[int, int, list[tuple[bytes, int]]]]:
    return [(records.unpack_seq(k), *records.decode_replica_record(v)) for k, v in store.iter_db(store.replica_log)]


def _with_writer(tmp_path, body: Callable[[Store, Writer], Awaitable[None]]) -> None:
    """*body* on a real store and writer, both closed after it."""
    async def main(store: Store) -> None:
        loop = asyncio.get_running_loop()
        writer = Writer(store, loop)
        try:
            await body(store, writer)
        finally:
            await loop.run_in_executor(None, writer.close)

    store = Store(str(tmp_path / "store"))
    try:
        asyncio.run(main(store))
    finally:
        store.close()


def test_a_flush_appends_one_log_record_and_a_restart_reads_the_replica_back(tmp_path):
    keys = [f"E\0m{i}".encode() for i in range(50)]

    async def main(store: Store, writer: Writer) -> None:
        loop = asyncio.get_running_loop()
        stream = _stream(store, writer, 3600.0)
        assert await loop.run_in_executor(None, stream.load) == []
        stream._apply(keys, INTENT)
        stream.offset = 7
        await stream.flush()
        stream._apply(keys[:10], DONE)
        stream._apply(keys[:5], INTENT)  # a done record is never taken back
        await stream.flush()
        got = _log(store)
        # one record per flush, however many keys: the log's end, not a page per key
        assert [(seq, len(items)) for seq, _ms, items in got] == [(1, 50), (2, 10)]
        assert got[1][2] == [(k, DONE) for k in keys[:10]]

        again = _stream(store, writer, 3600.0)
        assert await loop.run_in_executor(None, again.load) == []
        assert again.replica == stream.replica
        assert again.replica[keys[0]] == DONE and again.replica[keys[20]] == INTENT
        assert again.offset == 7
        again._apply([b"E\0new"], DONE)
        await again.flush()
        assert [seq for seq, _ms, _items in _log(store)] == [1, 2, 3]  # on after the last

    _with_writer(tmp_path, main)


def test_log_records_past_the_dedup_ttl_go_at_start_and_at_a_flush(tmp_path):
    async def main(store: Store, writer: Writer) -> None:
        loop = asyncio.get_running_loop()
        old_ms = records.now_ms() - 10_000
        await writer.call(lambda txn: txn.put(records.pack_seq(1), records.encode_replica_record(
            old_ms, [(b"E\0old", DONE)]), db=store.replica_log))
        await writer.call(lambda txn: txn.put(records.pack_seq(2), records.encode_replica_record(
            records.now_ms(), [(b"E\0fresh", DONE)]), db=store.replica_log))
        stream = _stream(store, writer, 5.0)
        expired = await loop.run_in_executor(None, stream.load)
        assert expired == [1]
        assert stream.replica == {b"E\0fresh": DONE}  # the old record's key is not back
        await stream.drop(expired)
        assert [seq for seq, _ms, _items in _log(store)] == [2]

        # at run time: a flush drops the records as old as the TTL, and forgets their keys
        await asyncio.sleep(0.3)
        short = _stream(store, writer, 0.2)
        assert await loop.run_in_executor(None, short.load) == [2]  # now past 0.2 s too
        assert short.replica == {}
        await short.drop([2])
        short._apply([b"E\0a"], DONE)
        await short.flush()
        await asyncio.sleep(0.3)
        short._apply([b"E\0b"], DONE)
        await short.flush()
        assert [items for _seq, _ms, items in _log(store)] == [[(b"E\0b", DONE)]]
        assert short.replica == {b"E\0b": DONE}

    _with_writer(tmp_path, main)
