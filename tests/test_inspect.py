"""`gwcore inspect` on a store holding one record of every kind it lists: an outgoing message, a
failed send, a message whose handler kept failing and a blob waiting for its submit."""

from __future__ import annotations

import base64
import json

import pytest

from gwcore import cli, databus, egress
from gwcore._core import core
from gwcore.records import encode_error
from gwcore.store import Store

PART_KEY = b"RemoteSite\x00m-part\x00NServiceBus.DataBus.Report"
BLOB = "0123456789abcdef0123456789abcdef"


def framed(msg_id: str, body: bytes = b"{}") -> bytes:
    return core.encode_envelope(msg_id, {"NServiceBus.MessageId": msg_id}, body, 0, 1_000)


@pytest.fixture
def data_dir(tmp_path):
    path = str(tmp_path / "store")
    store = Store(path)
    try:
        with store.env.begin(write=True) as txn:
            assert egress.append_records(store, [("SiteB", framed("m-out", b"out"))])(txn) == [1]
            failed = egress.OutgoingRecord("SiteC", 3, 0, "503 nope", framed("m-failed"))
            txn.put(core.pack_seq(2), egress.encode_failed(86_400_000, failed), db=store.outgoing_errors)
            txn.put(core.pack_seq(7), encode_error(framed("m-poison"), "handler broke", 172_800_000), db=store.errors)
            databus.record_part(store, PART_KEY, BLOB, 5, "", "", 259_200_000, lambda _name: None)(txn)
    finally:
        store.close()
    return path


def inspect(capsys, data_dir: str, *args: str) -> str:
    assert cli.main(["inspect", *args, "--data-dir", data_dir]) == 0
    return capsys.readouterr().out


def test_outgoing(capsys, data_dir):
    assert inspect(capsys, data_dir, "outgoing") == "1\tm-out\tto SiteB\tattempts 0\tnot tried yet\n"
    (line,) = inspect(capsys, data_dir, "outgoing", "--json").splitlines()
    assert json.loads(line) == {"id": "m-out", "site": "SiteB", "attempts": 0, "next_attempt": "now", "last_error": "",
                                "headers": {"NServiceBus.MessageId": "m-out"},
                                "body_b64": base64.b64encode(b"out").decode()}


def test_errors(capsys, data_dir):
    assert inspect(capsys, data_dir, "errors").splitlines() == [
        "handler\t7\tm-poison\t1970-01-03T00:00:00.000+00:00\thandler broke",
        "send\t2\tm-failed\t1970-01-02T00:00:00.000+00:00\tto SiteC after 3 attempt(s): 503 nope",
    ]
    handler, send = (json.loads(x) for x in inspect(capsys, data_dir, "errors", "--json").splitlines())
    assert (handler["kind"], handler["id"], handler["reason"]) == ("handler", "m-poison", "handler broke")
    assert (send["kind"], send["id"], send["site"], send["attempts"]) == ("send", "m-failed", "SiteC", 3)


def test_blob_waiting_for_its_submit(capsys, data_dir):
    assert inspect(capsys, data_dir, "blobs") == (
        f"{BLOB}\t5 bytes\texpires 1970-01-04T00:00:00.000+00:00\tpart\twaiting for the submit of m-part\n")
    (line,) = inspect(capsys, data_dir, "blobs", "--json").splitlines()
    assert json.loads(line)["part"] == {"scope": "RemoteSite", "id": "m-part", "databus_key": "NServiceBus.DataBus.Report"}
