"""The binary take answer (``take-frames``): the core's codec against a Python reference of the
documented layout, malformed answers refused without reading past them, the distributor's answer
over a real socket equal to its JSON take, and a worker falling back to JSON against a
distributor that does not know the binary form."""

from __future__ import annotations

import base64
import struct
import uuid

import orjson
import pytest
from hypothesis import given, settings, strategies as st
from httpclient import Client
from test_distributor import base_url, dist_settings, submit, until

from gwcore import Gateway, Worker
from gwcore import _dedup as core
from gwcore.distributor import protocol
from gwcore.errors import FramingError

_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
_RECORD = st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                    _TEXT, st.dictionaries(_TEXT, _TEXT, max_size=5), st.binary(max_size=300),
                    st.integers(0, 2**64 - 1), st.binary(max_size=40))


def reference_take(records, stop: bool) -> bytes:
    """The layout of docs/deployment.md ("The binary take answer"), written out in Python."""
    out = [b"GT\x01", bytes([1 if stop else 0]), struct.pack(">I", len(records))]
    for seq, attempt, count, envelope, extra in records:
        out.append(struct.pack(">QII", seq, attempt, count))
        out.append(struct.pack(">I", len(envelope)) + envelope)
        out.append(struct.pack(">I", len(extra)) + extra)
    return b"".join(out)


def _envelopes(records):
    return [(seq, attempt, count, core.encode_envelope(i, headers, body, expiry, 7), extra)
            for seq, attempt, count, i, headers, body, expiry, extra in records]


@settings(max_examples=200, deadline=None)
@given(st.lists(_RECORD, max_size=8), st.booleans())
def test_encode_is_the_documented_layout_and_decode_gives_it_back(records, stop):
    framed = _envelopes(records)
    data = core.encode_take(framed, stop)
    assert data == reference_take(framed, stop)
    got_stop, got = core.decode_take(data)
    assert got_stop == stop
    assert got == [(seq, attempt, count, i, headers, body, expiry, extra)
                   for seq, attempt, count, i, headers, body, expiry, extra in records]


def test_every_truncation_and_trailing_byte_is_refused():
    data = core.encode_take(_envelopes([(5, 1, 2, "a", {"h": "v"}, b"body", 0, b"{}"),
                                        (6, 1, 1, "b", {}, b"", 0, b"")]), False)
    for cut in range(len(data)):
        with pytest.raises(FramingError):
            core.decode_take(data[:cut])
    with pytest.raises(FramingError, match="unexpected bytes"):
        core.decode_take(data + b"\0")


@pytest.mark.parametrize("data, match", [
    (b"GW\x01\x00\0\0\0\0", "bad magic"),
    (b"GT\x02\x00\0\0\0\0", "version"),
    (b"GT\x01\x02\0\0\0\0", "flags"),
    # a count far beyond what the bytes hold is refused before anything is built for it
    (b"GT\x01\x00\xff\xff\xff\xff" + b"\0" * 24, "cannot fit"),
])
def test_malformed_answers(data, match):
    with pytest.raises(FramingError, match=match):
        core.decode_take(data)


def test_a_damaged_envelope_inside_is_refused():
    good = core.encode_envelope("a", {}, b"x", 0, 1)
    data = core.encode_take([(1, 1, 1, good[:-1], b"")], False)
    with pytest.raises(FramingError, match="envelope"):
        core.decode_take(data)
    with pytest.raises(FramingError, match="magic"):
        core.decode_take(core.encode_take([(1, 1, 1, b"XX" + good[2:], b"")], False))


def _post(path: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()


def test_the_binary_take_holds_what_the_json_take_holds(run, make_settings):
    """The same two messages taken in each form (the first taken back with a take that lists
    nothing held) give the same ids, headers, bodies, seqs and delivery counts."""
    ids = [str(uuid.uuid4()) for _ in range(2)]

    async def main():
        async with Gateway(dist_settings(make_settings, worker_lease=30.0)) as gw:
            await submit(gw, ids)
            async with Client(*gw.worker_address) as c:
                r = await c.request(_post("/.gwcore/worker/enlist/w/2"))
                sid = orjson.loads(r.body)["session"]
                await until(lambda: gw.store.counts()["queue"] == 2, 10, "two queued")
                r = await c.request(_post(f"/.gwcore/worker/take/{sid}/2000/"))
                assert r.status == 200
                as_json = orjson.loads(r.body)["messages"]
                while len(as_json) < 2:
                    held = ",".join(str(m["seq"]) for m in as_json)
                    r = await c.request(_post(f"/.gwcore/worker/take/{sid}/2000/{held}"))
                    as_json += orjson.loads(r.body)["messages"]
                # a take that holds nothing: both are handed out again, now in the binary form
                r = await c.request(_post(f"/.gwcore/worker/take-frames/{sid}/2000/"))
                assert r.status == 200
                assert r.headers["content-type"] == "application/octet-stream"
                stop, records = core.decode_take(r.body)
                assert not stop
                while len(records) < 2:
                    held = ",".join(str(rec[0]) for rec in records)
                    r = await c.request(_post(f"/.gwcore/worker/take-frames/{sid}/2000/{held}"))
                    records += core.decode_take(r.body)[1]
            want = {m["seq"]: (m["id"], m["headers"], base64.b64decode(m["body"]), m["attempt"], m["delivery_count"])
                    for m in as_json}
            got = {seq: (i, headers, body, attempt, count - 1)  # handed out once more since
                   for seq, attempt, count, i, headers, body, _expiry, extra in records}
            assert got == want and sorted(v[0] for v in got.values()) == sorted(ids)
            assert all(rec[7] == b"" for rec in records)  # no databus blobs named

    run(main())


def _work_off(run, make_settings, name: str) -> tuple[list[str], list[str], bool]:
    """20 messages through a worker of capacity 4: (ids, handled ids, whether it took binary answers)."""
    ids = [str(uuid.uuid4()) for _ in range(20)]
    handled: list[str] = []
    frames: list[bool] = []

    async def main():
        async with Gateway(dist_settings(make_settings)) as gw:
            w = Worker(base_url(gw), 4, lambda m: handled.append(m.id), name=name)
            async with w:
                await submit(gw, ids)
                await until(lambda: len(handled) == len(ids), 20, "every message handled")
            frames.append(w._frames)

    run(main())
    return ids, handled, frames[0]


def test_a_worker_falls_back_to_json_takes_with_an_older_distributor(run, make_settings, monkeypatch):
    """A distributor without ``take-frames`` answers 404 "no worker operation": the worker takes in
    JSON from then on and every message is handled."""
    monkeypatch.delitem(protocol._OPS, "take-frames")
    ids, handled, frames = _work_off(run, make_settings, "old")
    assert frames is False and sorted(handled) == sorted(ids)


def test_a_worker_takes_binary_answers_from_a_current_distributor(run, make_settings, monkeypatch):
    json_takes = []
    original = protocol._OPS["take"]
    monkeypatch.setitem(protocol._OPS, "take", (3, lambda *a: json_takes.append(1) or original[1](*a)))
    ids, handled, frames = _work_off(run, make_settings, "new")
    assert frames is True and sorted(handled) == sorted(ids) and json_takes == []


def test_the_answer_is_bounded_by_what_the_bytes_hold():
    """decode_take never builds more records than the input can hold (no allocation from a
    damaged count)."""
    data = b"GT\x01\x00" + struct.pack(">I", 2) + b"\0" * 30
    with pytest.raises(FramingError):
        core.decode_take(data)
