"""The key and record layouts of gwcore/records.py and gwcore/databus/layout.py, byte for byte:
stores written by earlier builds must still open, so a change to any of these fails here."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given, strategies as st

from gwcore import records
from gwcore._core import core
from gwcore.databus import layout
from gwcore.errors import FramingError
from gwcore.store import Store, Writer

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


# -- u64 -------------------------------------------------------------------------------------------

def test_u64_is_the_cores_big_endian_eight_bytes():
    assert records.pack_seq is core.pack_seq and records.unpack_seq is core.unpack_seq
    assert records.pack_seq(0) == b"\x00" * 8
    assert records.pack_seq(1) == b"\x00\x00\x00\x00\x00\x00\x00\x01"
    assert records.pack_seq(0x0102030405060708) == b"\x01\x02\x03\x04\x05\x06\x07\x08"
    assert records.pack_seq(2**64 - 1) == b"\xff" * 8
    assert records.unpack_seq(memoryview(b"\x00\x00\x00\x00\x00\x00\x01\x00")) == 256


@pytest.mark.parametrize("data", [b"", b"\x00" * 7, b"\x00" * 9])
def test_u64_is_exactly_eight_bytes(data):
    with pytest.raises(FramingError):
        records.unpack_seq(data)


@pytest.mark.parametrize("value", [-1, 2**64])
def test_u64_out_of_range(value):
    with pytest.raises(OverflowError):
        records.pack_seq(value)


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_u64_round_trips_and_sorts_as_numbers(a, b):
    assert records.unpack_seq(records.pack_seq(a)) == a
    assert (records.pack_seq(a) < records.pack_seq(b)) == (a < b)


# -- time ------------------------------------------------------------------------------------------

def test_now_ms():
    before = time.time_ns() // 1_000_000
    now = records.now_ms()
    assert before <= now <= time.time_ns() // 1_000_000
    assert records.now_ms(1.5) == 1500 and records.now_ms(1_700_000_000.0123) == 1_700_000_000_012


# -- dedup and part keys ---------------------------------------------------------------------------

def test_dedup_key_layout():
    assert records.dedup_key("RemoteSite", "m1") == b"RemoteSite\x00m1"
    assert records.dedup_key("Sitë", "a/b ü") == b"Sit\xc3\xab\x00a/b \xc3\xbc"
    assert records.split_dedup_key(b"RemoteSite\x00m1") == ("RemoteSite", "m1")
    # the scope ends at the first NUL (it holds none); the id may hold one
    assert records.split_dedup_key(b"S\x00a\x00b") == ("S", "a\x00b")


def test_dedup_key_is_the_framers_envelope_key():
    env = core.Framer("Sitë").frame([b"NServiceBus.Id", "id ü".encode(), b"NServiceBus.CallType",
                                     b"SingleCallSubmit"], b"{}", None, 0)
    assert isinstance(env, core.Envelope)
    assert env.key == records.dedup_key("Sitë", "id ü")


def test_part_key_layout():
    message = records.dedup_key("RemoteSite", "m1")
    key = records.part_key(message, "NServiceBus.DataBus.Report")
    assert key == b"RemoteSite\x00m1\x00NServiceBus.DataBus.Report"
    assert records.part_prefix(message) == b"RemoteSite\x00m1\x00" and key.startswith(records.part_prefix(message))
    assert records.part_message_key(key) == message
    assert records.part_message_key(memoryview(key)) == message
    assert records.split_part_key(key) == ("RemoteSite", "m1", "NServiceBus.DataBus.Report")
    # an id with a NUL: the message key ends at the last NUL
    odd = records.part_key(records.dedup_key("S", "a\x00b"), "k")
    assert records.part_message_key(odd) == b"S\x00a\x00b" and records.split_part_key(odd) == ("S", "a\x00b", "k")


@given(scope=_text.filter(lambda s: "\x00" not in s), msg_id=_text, databus_key=_text.filter(lambda s: "\x00" not in s))
def test_keys_round_trip(scope, msg_id, databus_key):
    message = records.dedup_key(scope, msg_id)
    assert records.split_dedup_key(message) == (scope, msg_id)
    assert records.split_part_key(records.part_key(message, databus_key)) == (scope, msg_id, databus_key)


# -- error record ----------------------------------------------------------------------------------

def test_error_record_layout():
    value = records.encode_error(b"GW\x01envelope", "boom ü", 0x0102030405060708)
    assert value == (b"\x01\x02\x03\x04\x05\x06\x07\x08" + b"\x00\x00\x00\x07" + "boom ü".encode() + b"GW\x01envelope")
    assert records.decode_error(value) == (0x0102030405060708, "boom ü", b"GW\x01envelope")
    # a reason that is not encodable is kept readable, not refused
    assert records.decode_error(records.encode_error(b"", "x\ud800", 1)) == (1, "x?", b"")


@given(framed=st.binary(max_size=64), reason=_text, failed_ms=st.integers(0, 2**64 - 1))
def test_error_record_round_trips(framed, reason, failed_ms):
    assert records.decode_error(records.encode_error(framed, reason, failed_ms)) == (failed_ms, reason, framed)


# -- the databus's expiry keys (gwcore/databus/layout.py) -----------------------------------------

def test_expiry_key_layout():
    key = layout.expiry_key(0x0102030405060708, b"0123abcd")
    assert key == b"\x01\x02\x03\x04\x05\x06\x07\x08" + b"0123abcd"
    assert layout.expiry_of(key) == 0x0102030405060708 and layout.expiring(key) == b"0123abcd"
    # a blob record begins with the same u64
    record = layout.blob_record(77, 5, "md5", "sha", b"owner")
    assert record[:8] == records.pack_seq(77) and layout.expiry_of(record) == 77
    assert layout.expiry_of(memoryview(record)) == 77


# -- as the writer stores them ---------------------------------------------------------------------

def test_the_writer_stores_these_layouts(tmp_path):
    framer = core.Framer("RemoteSite")
    env = framer.frame([b"NServiceBus.Id", b"m1", b"NServiceBus.CallType", b"SingleCallSubmit"], b"{}", None,
                       records.now_ms())

    async def main(store: Store) -> None:
        writer = Writer(store, asyncio.get_running_loop())
        try:
            assert await writer.ingest(env) is True
            assert writer.is_recorded("RemoteSite", "m1")
        finally:
            await asyncio.get_running_loop().run_in_executor(None, writer.close)

    store = Store(str(tmp_path / "store"))
    try:
        asyncio.run(main(store))
        with store.env.begin() as txn:
            ((seq, value),) = list(txn.cursor(db=store.dedup_log))
            assert seq == b"\x00" * 7 + b"\x01"
            assert value[8:] == b"RemoteSite\x00m1" and records.unpack_seq(value[:8]) <= records.now_ms()
            assert [bytes(k) for k, _v in txn.cursor(db=store.queue)] == [seq]
            assert txn.get(b"seq", db=store.meta) is None  # a commit does not write it: the trees' last keys say it
        assert store.last_seq() == 1
    finally:
        store.close()


# -- the replica log (selected mode) ---------------------------------------------------------------

def test_replica_record_layout():
    value = records.encode_replica_record(0x0102, [(b"E\0a", 1), (b"E\0bc", 2)])
    assert value == (b"\x00" * 6 + b"\x01\x02" + b"\x01" + b"\x00\x00\x00\x03" + b"E\0a"
                     + b"\x02" + b"\x00\x00\x00\x04" + b"E\0bc")
    assert records.decode_replica_record(memoryview(value)) == (0x0102, [(b"E\0a", 1), (b"E\0bc", 2)])
    assert records.decode_replica_record(records.encode_replica_record(5, [])) == (5, [])


def test_a_replica_record_cut_short_is_refused():
    value = records.encode_replica_record(1, [(b"E\0abc", 2)])
    with pytest.raises(ValueError, match="cut short"):
        records.decode_replica_record(value[:-1])


@given(st.integers(0, 2**64 - 1), st.lists(st.tuples(st.binary(max_size=40), st.sampled_from([1, 2])), max_size=30))
def test_replica_records_round_trip(recorded_ms, items):
    assert records.decode_replica_record(records.encode_replica_record(recorded_ms, items)) == (recorded_ms, items)


def test_a_schema_3_replica_tree_becomes_the_replica_log_when_opened(tmp_path):
    """Stores of schema 2 and 3 kept the replica as a tree keyed by dedup key (u8 state, u64 ms):
    opened by this gwcore, its records are in the log, grouped by time, oldest first."""
    import struct

    import lmdb

    path = str(tmp_path / "store")
    Store(path).close()
    env = lmdb.open(path, max_dbs=16)
    old = env.open_db(b"replica")
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"replica_log", txn=txn), delete=True)
        for key, state, ms in [(b"E\0a", 2, 2000), (b"E\0b", 1, 1000), (b"E\0c", 2, 2000)]:
            txn.put(key, struct.pack(">BQ", state, ms), db=old)
        txn.put(b"schema", b"3", db=env.open_db(b"meta", txn=txn))
    env.close()
    store = Store(path)
    try:
        assert store.get(store.meta, b"schema") == b"4"
        got = [(records.unpack_seq(k), records.decode_replica_record(v)) for k, v in store.iter_db(store.replica_log)]
        assert got == [(1, (1000, [(b"E\0b", 1)])), (2, (2000, [(b"E\0a", 2), (b"E\0c", 2)]))]
        with store.env.begin() as txn, pytest.raises(lmdb.NotFoundError):
            store.env.open_db(b"replica", txn=txn, create=False)
    finally:
        store.close()
