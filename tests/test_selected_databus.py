"""Databus (claim-check) properties in selected-instance mode (docs/databus.md, "Selected-instance
mode"): part records in the dedup stream, a shared blob dir (GWCORE_BLOB_DIR), what a new leader
does with a submit whose parts reached the old one, and the start-up sweep of a shared blob dir.

The failover tests run real instance processes behind a real nginx on a real RabbitMQ, a gwcore
sender process, and a relay between the sender and nginx that counts the requests by call type
and holds the submit back until the leader that took the parts has been SIGKILLed."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import uuid

import aio_pika
from broker import AMQP_URL, drain, endpoint  # noqa: F401 (endpoint: a fixture)
from httpclient import Client
from nginx import Nginx
from procs import ROOT, ServerProcess, free_port
from test_databus import part_request, submit_request
from test_ha import metric, readyz
from test_selected import Relay, append_record, port_of, selected_settings, until
from test_selected_ha import STANDBY, alive, instance, leaders
from test_sites import counts, wait_for

from gwcore import Gateway, Settings, databus
from gwcore.records import now_ms, split_part_key
from gwcore.store import Store

PART = "SingleCallDatabusProperty"
SUBMIT = "SingleCallSubmit"
KEY_PREFIX = "NServiceBus.Header.NServiceBus.DataBus."


def prefix_of(data_dir: str) -> str:
    store = Store(data_dir, readonly=True)
    try:
        return store.blob_prefix
    finally:
        store.close()


def metric_value(port: int, name: str) -> int:
    return int(metric(port, name + " ").split()[-1])


# -- the mechanism, in process --------------------------------------------------------------------------

async def append_part(endpoint: str, msg_id: str, key: str, name: str, blob: bytes, expiry_ms: int,
                      sender: str = "crashed") -> None:
    """A part record as another instance appends it when it takes a part (gwcore/databus/records.py)."""
    part_key = f"{endpoint}\0{msg_id}\0{KEY_PREFIX}{key}".encode()
    job = databus.PartJob(None, part_key, name, len(blob), "", "", expiry_ms, lambda _n: None)
    conn = await aio_pika.connect(AMQP_URL)
    try:
        ch = await conn.channel(publisher_confirms=True)
        await ch.declare_queue(f"{endpoint}.gwcore.dedup", durable=True,
                               arguments={"x-queue-type": "stream", "x-max-age": "604800s"})
        await ch.default_exchange.publish(
            aio_pika.Message(job.stream_record(), headers={"gwcore.kind": "part", "gwcore.instance": sender}),
            routing_key=f"{endpoint}.gwcore.dedup")
    finally:
        await conn.close()


def replicated(gw: Gateway) -> set[str]:
    """The message ids of the part records an instance keeps."""
    return {split_part_key(k)[1] for k, _v in list(gw.store.iter_db(gw.store.databus_replica))}


def test_a_submit_takes_the_parts_another_instance_stored_in_the_shared_blob_dir(tmp_path, endpoint, run):
    shared = tmp_path / "blobs"
    shared.mkdir()
    blob = os.urandom(200_000)
    # what a leader that died between the parts and the submits left: blob files in the shared
    # dir (named with its store's prefix) and its part records in the stream
    there = "0ddba11a" + uuid.uuid4().hex[8:]
    (shared / there).write_bytes(blob)
    absent = "0ddba11a" + uuid.uuid4().hex[8:]
    truncated = "0ddba11a" + uuid.uuid4().hex[8:]
    (shared / truncated).write_bytes(blob[:1000])
    path = f"/{endpoint}/"

    async def main():
        expiry = now_ms() + 600_000
        await append_part(endpoint, "m1", "Payload", there, blob, expiry)
        await append_part(endpoint, "m2", "Payload", absent, blob, expiry)
        await append_part(endpoint, "m3", "Payload", truncated, blob, expiry)
        gw = await Gateway(selected_settings(tmp_path, endpoint, "i1", blob_dir=str(shared))).start()
        try:
            await until(lambda: gw.ready, 10, "the election")  # the stream is read to its end then
            async with Client("127.0.0.1", port_of(gw)) as c:
                r = await c.request(submit_request("m1", ("Payload",), path=path))
                assert (r.status, r.reason) == (200, "OK")
                for msg_id in ("m2", "m3"):  # the file is not there, or not whole: the sender re-sends
                    r = await c.request(submit_request(msg_id, ("Payload",), path=path))
                    assert (r.status, r.reason) == (412, "Expected 1 claimcheck properties. None were received. Please resubmit.")
                # m3 as a sender sends it again: its parts, then the submit, at this instance
                r = await c.request(part_request("m3", "Payload", blob, parts=("Payload",), path=path))
                assert (r.status, r.reason) == (200, "OK")
                r = await c.request(submit_request("m3", ("Payload",), path=path))
                assert (r.status, r.reason) == (200, "OK")
            assert gw.writer.parts_adopted == 1
            assert gw.selected.parts_published == 1
            # the three records from before, and this instance's own (read back from the stream)
            await until(lambda: gw.selected.parts_followed == 4, 10, "its own part record")
            # this instance indexes the blob it took, with the expiry the other one gave it
            info = databus.blob_info(gw.store, there)
            assert info is not None and info.expiry_ms == expiry and info.size == len(blob) and info.part is None
        finally:
            await gw.stop()

    run(main())
    got = {m[0]: m for m in drain(endpoint)}
    assert set(got) == {"m1", "m3"}
    assert got["m1"][1]["NServiceBus.DataBus.Payload"] == there
    own = got["m3"][1]["NServiceBus.DataBus.Payload"]
    assert own != truncated and (shared / own).read_bytes() == blob


def test_a_databus_message_is_read_on_another_instance_from_the_shared_blob_dir(tmp_path, endpoint, run):
    """Parts and submit at the leader; the handler of the standby reads the blob."""
    shared = str(tmp_path / "blobs")
    blob = os.urandom(300_000)
    read: list[tuple[str, bytes]] = []

    async def standby_handler(message):
        read.append((message.id, message.databus["NServiceBus.DataBus.Payload"].read()))

    async def main():
        leader = await Gateway(selected_settings(tmp_path, endpoint, "i0", blob_dir=shared)).start()
        await until(lambda: leader.ready, 10, "the election")
        standby = await Gateway(selected_settings(tmp_path, endpoint, "i1", blob_dir=shared),
                                handler=standby_handler).start()
        try:
            path = f"/{endpoint}/"
            async with Client("127.0.0.1", port_of(leader)) as c:
                r = await c.request(part_request("m1", "Payload", blob, parts=("Payload",), path=path))
                assert r.status == 200
                r = await c.request(submit_request("m1", ("Payload",), path=path))
                assert r.status == 200
            await until(lambda: read, 10, "the standby's handler")
            # the standby follows the part record (the stream may reach it after the queue did),
            # and drops it once the message was dispatched
            await until(lambda: standby.selected.parts_followed == 1, 10, "the part record")
            await until(lambda: not replicated(standby), 5, "the record to go")
        finally:
            await standby.stop()
            await leader.stop()

    run(main())
    assert read == [("m1", blob)]


def test_a_part_is_answered_503_broker_unavailable_while_the_broker_is_away(tmp_path, endpoint, run):
    """Acknowledged once dispatched (the default), a leader cut off from the broker is fenced: a
    databus part is refused at its head, as a submit is, and nothing of it is written."""
    blob = os.urandom(300_000)
    path = f"/{endpoint}/"

    async def main():
        relay = await Relay().start()
        gw = await Gateway(selected_settings(tmp_path, endpoint, "i1", amqp_url=relay.url)).start()
        try:
            await until(lambda: gw.ready, 10, "the election")
            await relay.cut()
            await until(lambda: not gw.selected.link.connected, 5, "the instance to notice")
            async with Client("127.0.0.1", port_of(gw)) as c:
                for size in (10, len(blob)):  # framed from its head; its body read past the parser
                    r = await c.request(part_request("m1", "Payload", blob[:size], parts=("Payload",), path=path))
                    assert (r.status, r.reason) == (503, "Service Unavailable: broker unavailable")
            assert gw.store.counts()["databus_parts"] == 0 and gw.selected.parts_published == 0
            assert os.listdir(gw.store.blob_dir) == []
            await relay.restore()
            await until(lambda: gw.ready, 10, "the instance to be elected again")
            async with Client("127.0.0.1", port_of(gw)) as c:
                r = await c.request(part_request("m1", "Payload", blob, parts=("Payload",), path=path))
                assert (r.status, r.reason) == (200, "OK")
                r = await c.request(submit_request("m1", ("Payload",), path=path))
                assert (r.status, r.reason) == (200, "OK")
        finally:
            await gw.stop()
            await relay.cut()

    run(main())
    (got,) = drain(endpoint)
    assert got[0] == "m1"


def test_replicated_part_records_expire_and_go_once_their_message_is_dispatched(tmp_path, endpoint, run):
    async def main():
        gw = await Gateway(selected_settings(tmp_path, endpoint, "i1")).start()
        try:
            now = now_ms()
            name = uuid.uuid4().hex
            await append_part(endpoint, "soon", "P", name, b"x", now + 1500)  # a TimeToBeReceived of 1.5 s
            await append_part(endpoint, "kept", "P", name, b"x", now + 600_000)
            await append_part(endpoint, "sent", "P", name, b"x", now + 600_000)
            await append_part(endpoint, "stale", "P", name, b"x", now - 1)  # expired before it was read
            await until(lambda: replicated(gw) == {"soon", "kept", "sent"}, 5, "the records")
            await append_record(endpoint, "done", ["sent"])  # a leader dispatched it: its parts are used
            await until(lambda: replicated(gw) == {"soon", "kept"}, 5, "the dispatched message's record to go")
            await until(lambda: replicated(gw) == {"kept"}, 5, "the expired record to go")
        finally:
            await gw.stop()
        # kept in the instance's own store across a restart
        gw = await Gateway(selected_settings(tmp_path, endpoint, "i1")).start()
        try:
            assert replicated(gw) == {"kept"}
        finally:
            await gw.stop()

    run(main())


def test_shared_blob_dir_sweep_spares_other_stores_files(tmp_path):
    """In process, without a broker: a store sweeping a shared blob dir at start-up removes its own
    leftovers only."""
    shared = str(tmp_path / "blobs")
    os.makedirs(shared)
    mine = Store(str(tmp_path / "mine"), blob_dir=shared)
    prefix = mine.blob_prefix
    other = "%08x" % ((int(prefix, 16) + 1) % (1 << 32))
    files = {
        f".tmp-{prefix}{'1' * 24}": "mine: an upload a crash interrupted",
        f"{prefix}{'2' * 24}": "mine: renamed, never committed",
        f".tmp-{other}{'3' * 24}": "another store's upload in progress",
        f"{other}{'4' * 24}": "a blob another store indexes",
        "README": "not a blob",
    }
    for name in files:
        with open(os.path.join(shared, name), "w") as f:
            f.write(files[name])
    try:
        assert databus.sweep(mine) == 2
    finally:
        mine.close()
    assert sorted(os.listdir(shared)) == sorted(n for n, why in files.items() if not why.startswith("mine"))
    # the default blob dir (<data dir>/blobs) is this store's alone: everything no record names goes
    private = Store(str(tmp_path / "private"))
    try:
        assert os.path.isdir(private.blob_dir)  # the store makes it, private (gwcore/filemodes.py)
        for name in files:
            open(os.path.join(private.blob_dir, name), "w").close()
        assert databus.sweep(private) == len(files)
    finally:
        private.close()


# -- real processes: failover between the parts and the submit -------------------------------------------

class HoldingRelay:
    """An HTTP/1.1 relay from the sender to nginx, in a thread of its own. It logs every request
    as ``(call type, status, reason)`` and holds the first submit until :meth:`release`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.port = free_port()
        self.calls: list[tuple[str, int, str]] = []
        self.submit_waiting = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._released: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> "HoldingRelay":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(5)
        return self

    async def _listen(self) -> None:
        self._released = asyncio.Event()
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    def release(self) -> None:
        self._loop.call_soon_threadsafe(self._released.set)

    def stop(self) -> None:
        async def close():
            self._server.close()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def of(self, call: str) -> list[tuple[int, str]]:
        return [(status, reason) for c, status, reason in self.calls if c == call]

    @staticmethod
    async def _read_message(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        fields = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(fields.get("content-length", "0")))
        return head, fields, body

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head, fields, body = await self._read_message(reader)
                call = fields.get("nservicebus.calltype", "")
                if call == SUBMIT and not self._released.is_set():
                    self.submit_waiting.set()
                    await self._released.wait()
                up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)
                try:
                    up_w.write(head + body)
                    rhead, _fields, rbody = await self._read_message(up_r)
                finally:
                    up_w.close()
                _version, status, reason = rhead.decode("latin-1").split("\r\n", 1)[0].split(" ", 2)
                self.calls.append((call, int(status), reason))
                writer.write(rhead + rbody)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()


def queue_with_databus(data_dir: str, port: int, sites: str, props: dict[str, bytes]) -> str:
    """Queue one message with databus properties in SiteA's store before SiteA runs."""
    settings = Settings.from_env({}, data_dir=data_dir, endpoint="SiteA", sites=sites,
                                 receive_channels=f"http://127.0.0.1:{port}/SiteA/")

    async def main() -> str:
        gw = Gateway(settings)
        await gw.start(listen=False, forward=False)
        try:
            return await gw.send_to_sites(["SiteB"], b'{"claim":"check"}', databus=props)
        finally:
            await gw.stop()

    return asyncio.run(main())


def handled(log: str) -> list[list[str]]:
    """``[id, header, sha256, size, instance]`` per line tests/handlers.py:log_databus wrote."""
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [line.split() for line in f if line.strip()]


def failover_between_parts_and_submit(tmp_path, endpoint: str, *, shared: bool):
    """Instances i0 and i1 (and i2 for reading) behind nginx; the sender's parts reach the leader
    i0, which is SIGKILLed before the submit; the submit reaches i1. Returns what was observed."""
    props = {"Payload": os.urandom(3 << 20), "Note": b"a small property"}
    digests = {f"NServiceBus.DataBus.{k}": (hashlib.sha256(v).hexdigest(), len(v)) for k, v in props.items()}
    log = str(tmp_path / "handled.log")
    common = {"HANDLER_LOG": log, "GWCORE_HANDLER": "handlers:log_databus",
              "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    if shared:
        common["GWCORE_BLOB_DIR"] = str(tmp_path / "shared-blobs")
    # with a shared blob dir nobody handles the message until i2 runs; without one, i1 does
    # (the only instance that has its blobs)
    nodes = [instance(tmp_path, endpoint, f"i{i}", INSTANCE_NAME=f"i{i}",
                      **{k: v for k, v in common.items() if k != "GWCORE_HANDLER" or (i == 2 if shared else i == 1)})
             for i in range(3)]
    a, b, c = nodes
    proxy = Nginx(str(tmp_path / "nginx"), free_port(), [n.port for n in nodes], tries=0, repeat=2)
    relay = HoldingRelay(proxy.port)
    s_dir, s_port = str(tmp_path / "sender" / "store"), free_port()
    site = f"SiteB=http://127.0.0.1:{relay.port}/{endpoint}/"
    msg_id = queue_with_databus(s_dir, s_port, site, props)
    sender = ServerProcess(s_dir, s_port, GWCORE_ENDPOINT="SiteA", GWCORE_SITES=site,
                           GWCORE_RETRIES="20", GWCORE_RETRY_DELAYS="0.5s")
    seen: dict = {"id": msg_id, "digests": digests, "a_prefix": None}
    try:
        a.start()
        wait_for(lambda: leaders(nodes) == [a], 10, "i0 to lead")
        b.start()
        wait_for(lambda: readyz(b.port) == (503, STANDBY), 10, "i1 to stand by")
        proxy.start()
        relay.start()
        sender.start()
        assert relay.submit_waiting.wait(30), "the submit never came"
        assert relay.of(PART) == [(200, "OK"), (200, "OK")]
        a.kill()
        wait_for(lambda: leaders(nodes) == [b], 10, "i1 to lead")
        relay.release()
        wait_for(lambda: counts(s_dir)["outgoing"] == 0, 30, "the sender to deliver")
        seen["adopted"] = metric_value(b.port, "gwcore_databus_parts_adopted_total")
        seen["followed"] = metric_value(b.port, "gwcore_databus_parts_followed_total")
        seen["retries"] = metric_value(s_port, "gwcore_outgoing_retries_total")
        if shared:
            # i0 runs again (its start-up sweep must spare what it stored and i1 took), then i2,
            # which neither stored nor took the blobs, handles the message
            a.start()
            wait_for(lambda: readyz(a.port) == (503, STANDBY), 10, "i0 to stand by")
            c.start()
        wait_for(lambda: len(handled(log)) >= len(props), 30, "the message to be handled")
        # acknowledged to the broker: a second delivery from here on is handled again (more lines
        # in the log) or left in the queue (drained below), and fails the test either way
        handler = c if shared else b
        wait_for(lambda: metric_value(handler.port, "gwcore_broker_consumer_acked_total") == 1, 30,
                 "the handler's acknowledgement")
        seen["a_prefix"] = prefix_of(a.data_dir) if shared else None
    finally:
        for proc in (sender, *nodes):
            if alive(proc):
                assert proc.terminate() == 0
        relay.stop()
        proxy.stop()
    seen["calls"] = list(relay.calls)
    seen["handled"] = handled(log)
    seen["left"] = drain(endpoint)
    seen["sender_errors"] = counts(s_dir)["outgoing_errors"]
    return seen


def test_failover_between_parts_and_submit_with_a_shared_blob_dir(tmp_path, endpoint):
    seen = failover_between_parts_and_submit(tmp_path, endpoint, shared=True)
    # each part went once, to i0; the submit once, to i1, which took the parts from the stream
    assert seen["calls"] == [(PART, 200, "OK"), (PART, 200, "OK"), (SUBMIT, 200, "OK")]
    assert seen["adopted"] == 2 and seen["followed"] == 2 and seen["retries"] == 0
    # delivered once, read whole on i2 from the blobs i0 wrote
    rows = seen["handled"]
    assert sorted(r[1] for r in rows) == sorted(seen["digests"])
    for msg_id, header, sha, size, where in rows:
        assert msg_id == seen["id"] and (sha, int(size)) == seen["digests"][header] and where == "i2"
    assert seen["left"] == [] and seen["sender_errors"] == 0


def test_failover_between_parts_and_submit_with_separate_blob_dirs(tmp_path, endpoint):
    seen = failover_between_parts_and_submit(tmp_path, endpoint, shared=False)
    # i1 has the part records but not the files: 412 with NServiceBus's text, and the sender sends
    # the parts and the submit again at once (no retry delay, no second 412)
    none = "Expected 2 claimcheck properties. None were received. Please resubmit."
    assert seen["calls"] == [(PART, 200, "OK"), (PART, 200, "OK"), (SUBMIT, 412, none),
                             (PART, 200, "OK"), (PART, 200, "OK"), (SUBMIT, 200, "OK")]
    assert seen["adopted"] == 0 and seen["followed"] == 4 and seen["retries"] == 0
    rows = seen["handled"]
    assert sorted(r[1] for r in rows) == sorted(seen["digests"])
    for msg_id, header, sha, size, where in rows:
        assert msg_id == seen["id"] and (sha, int(size)) == seen["digests"][header] and where == "i1"
    assert seen["left"] == [] and seen["sender_errors"] == 0


# -- real processes: the start-up sweep of a shared blob dir ---------------------------------------------

def start_upload(port: int, request: bytes, sent: int) -> socket.socket:
    """A part request whose first *sent* bytes are on their way (an upload in progress)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(request[:sent])
    return s


def answer(s: socket.socket) -> tuple[int, str]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, "connection closed before a response"
        buf += chunk
    _v, status, reason = buf.split(b"\r\n", 1)[0].decode().split(" ", 2)
    return int(status), reason


def tmp_files(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(".tmp-"))


def test_instance_restarting_on_a_shared_blob_dir_spares_the_leaders_blobs_and_uploads(tmp_path, endpoint):
    shared = str(tmp_path / "shared-blobs")
    x, y = (instance(tmp_path, endpoint, name, GWCORE_BLOB_DIR=shared) for name in ("x", "y"))
    path = f"/{endpoint}/"
    blobs = {"Done": os.urandom(500_000), "Flowing": os.urandom(2 << 20)}
    keys = tuple(blobs)
    msg_id = str(uuid.uuid4())
    y_upload = x_upload = None
    try:
        # y leads and is SIGKILLed during an upload: its own leftovers, the unfinished upload and
        # (as if it had died between a blob's rename and its commit) a file no record names
        y.start()
        wait_for(lambda: leaders([y]) == [y], 10, "y to lead")
        y_upload = start_upload(y.port, part_request("other", "P", os.urandom(1 << 20), path=path), 600_000)
        wait_for(lambda: len(tmp_files(shared)) == 1, 5, "y's upload to reach the disk")
        y.kill()
        y_leftovers = set(os.listdir(shared))
        y_prefix = prefix_of(y.data_dir)
        never_committed = y_prefix + uuid.uuid4().hex[8:]
        open(os.path.join(shared, never_committed), "wb").close()
        y_leftovers.add(never_committed)
        # x leads: one part stored, one streaming in
        x.start()
        wait_for(lambda: leaders([x, y]) == [x], 10, "x to lead")
        assert asyncio.run(_post(x.port, part_request(msg_id, "Done", blobs["Done"], parts=keys, path=path))) == (200, "OK")
        flowing = part_request(msg_id, "Flowing", blobs["Flowing"], parts=keys, path=path)
        x_upload = start_upload(x.port, flowing, len(flowing) // 2)
        wait_for(lambda: len(tmp_files(shared)) == 2, 5, "x's upload to reach the disk")
        x_files = set(os.listdir(shared)) - y_leftovers
        assert len(x_files) == 2 and all(n.removeprefix(".tmp-").startswith(prefix_of_running(x)) for n in x_files)
        # y starts again (a standby now) and sweeps the shared dir
        y.start()
        wait_for(lambda: readyz(y.port) == (503, STANDBY), 10, "y to stand by")
        with open(y.log) as f:
            assert "removed 2 blob files no record names" in f.read()
        assert set(os.listdir(shared)) == x_files
        # x's upload ends well, and its message names both blobs
        x_upload.sendall(flowing[len(flowing) // 2:])
        assert answer(x_upload) == (200, "OK")
        assert asyncio.run(_post(x.port, submit_request(msg_id, keys, path=path))) == (200, "OK")
    finally:
        for s in (y_upload, x_upload):
            if s is not None:
                s.close()
        for proc in (x, y):
            if alive(proc):
                assert proc.terminate() == 0
    (got,) = drain(endpoint)
    for key, blob in blobs.items():
        with open(os.path.join(shared, got[1][f"NServiceBus.DataBus.{key}"]), "rb") as f:
            assert f.read() == blob


def prefix_of_running(proc: ServerProcess) -> str:
    """The blob prefix of a running instance's store (a read-only look beside its writer)."""
    return prefix_of(proc.data_dir)


async def _post(port: int, request: bytes) -> tuple[int, str]:
    async with Client("127.0.0.1", port) as c:
        r = await c.request(request)
        return r.status, r.reason
