"""Real server processes: graceful SIGTERM, the CLI, and the SIGKILL crash test."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
from httpclient import Client, get, nsb_request
from procs import ROOT, ServerProcess, free_port, gwcore_cli, queued_ids  # noqa: F401


async def submit_all(port: int, ids: list[str], acked: set[str], connections: int = 8) -> None:
    """Send every id (keep-alive, several connections); record 200s; stop a worker on a dead server."""
    chunks = [ids[i::connections] for i in range(connections)]

    async def worker(chunk: list[str]) -> None:
        try:
            async with Client("127.0.0.1", port) as c:
                for msg_id in chunk:
                    r = await c.request(nsb_request(msg_id, body=b'{"n":"' + msg_id.encode() + b'"}'))
                    if r.status == 200:
                        acked.add(msg_id)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass

    await asyncio.gather(*(worker(c) for c in chunks))


def test_serve_sigterm_drains_and_inspect_shows_queue(tmp_path):
    data = str(tmp_path / "store")
    port = free_port()
    server = ServerProcess(data, port).start()
    ids = [str(uuid.uuid4()) for _ in range(50)]
    acked: set[str] = set()
    asyncio.run(submit_all(port, ids, acked, connections=4))
    assert acked == set(ids)
    r = asyncio.run(get("127.0.0.1", port, "/readyz"))
    assert r.status == 200
    assert server.terminate() == 0
    lines = gwcore_cli("inspect", "queue", "--json", data_dir=data).splitlines()
    assert len(lines) == 50
    first = json.loads(lines[0])
    assert set(first) == {"seq", "id", "accepted", "expires", "headers", "body_b64"}
    assert base64.b64decode(first["body_b64"]) == b'{"n":"' + first["id"].encode() + b'"}'
    assert first["headers"]["NServiceBus.MessageIntent"] == "Send"
    dedup = gwcore_cli("inspect", "dedup", data_dir=data)
    assert "dedup records: 50" in dedup and "store size:" in dedup


def test_sigterm_answers_what_is_in_flight_refuses_what_comes_later_and_loses_nothing(tmp_path):
    """SIGTERM to a loaded server: requests it holds are answered (a held-back group commit keeps
    some in flight), a request completed once it drains is 503 "shutting down", new connections
    are refused, and what is stored is exactly what was answered 200."""
    data = str(tmp_path / "store")
    port = free_port()
    server = ServerProcess(data, port, GWCORE_COMMIT_MAX_DELAY_US="300000").start()
    acked: set[str] = set()
    other: list[tuple[int, str]] = []
    acked_after_sigterm = 0
    sigterm_sent = asyncio.Event()

    async def load() -> None:
        nonlocal acked_after_sigterm
        try:
            async with Client("127.0.0.1", port) as c:
                while True:
                    ids = [str(uuid.uuid4()) for _ in range(10)]
                    await c.send(b"".join(nsb_request(i) for i in ids))
                    for i in ids:
                        r = await c.response()
                        if r.status != 200:
                            other.append((r.status, r.reason))
                            return  # a 503 while draining closes the connection
                        acked.add(i)
                        acked_after_sigterm += sigterm_sent.is_set()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            return  # closed by the drain between two batches

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return False
        except ConnectionRefusedError:
            return True

    async def main() -> tuple:
        loads = [asyncio.ensure_future(load()) for _ in range(4)]
        deadline = time.monotonic() + 60
        while len(acked) < 200:
            assert time.monotonic() < deadline and not any(t.done() for t in loads), "the load does not run"
            await asyncio.sleep(0.01)
        # one request half sent: its head is read (the server invites the body), its body comes later
        late = str(uuid.uuid4())
        head, _, body = nsb_request(late, extra=[("Expect", "100-continue")]).partition(b"\r\n\r\n")
        async with Client("127.0.0.1", port) as c:
            await c.send(head + b"\r\n\r\n")
            assert await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 10) == b"HTTP/1.1 100 Continue\r\n\r\n"
            server.proc.send_signal(signal.SIGTERM)
            sigterm_sent.set()
            while not refused():  # the listener closes once the server drains
                assert time.monotonic() < deadline, "the server never stopped listening"
                await asyncio.sleep(0.01)
            await c.send(body)
            r = await c.response()
            assert r.headers.get("connection") == "close" and await c.closed()
        await asyncio.gather(*loads)
        return late, r

    late, r = asyncio.run(main())
    assert server.proc.wait(30) == 0
    assert (r.status, r.reason) == (503, "Service Unavailable: gwcore is shutting down")
    assert set(other) <= {(503, "Service Unavailable: gwcore is shutting down")}, other
    assert acked_after_sigterm > 0, "no request was in flight when the signal came"
    stored = queued_ids(data)
    assert len(stored) == len(set(stored))
    assert set(stored) == acked  # every 200 is kept, and nothing that was not answered 200
    assert late not in stored


def test_invalid_setting_stops_startup_naming_the_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GWCORE_")}
    env.update(GWCORE_COMMIT_MAX_BATCH="lots", GWCORE_DATA_DIR=str(tmp_path), PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "gwcore", "serve"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "GWCORE_COMMIT_MAX_BATCH" in res.stderr


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_acknowledged_message(tmp_path):
    data = str(tmp_path / "store")
    port = free_port()
    seed = random.randrange(1 << 30)
    print(f"kill schedule seed: {seed}")
    rng = random.Random(seed)
    ids = [str(uuid.uuid4()) for _ in range(10000)]
    acked: set[str] = set()
    kills = 0
    mid_stream = 0  # kills that hit while ids were still unacknowledged
    server = ServerProcess(data, port)
    while kills < 5:
        server.start()

        async def load_and_kill() -> None:
            load = asyncio.ensure_future(submit_all(port, [i for i in ids if i not in acked], acked))
            # Kill at a random point of the remaining load (after 1 to a third of what is left
            # has been acknowledged), not after a fixed time: a fast server would otherwise have
            # finished before the later kills, and a slow one not have started.
            target = len(acked) + rng.randint(1, max(1, (len(ids) - len(acked)) // 3))
            while len(acked) < target and not load.done():
                await asyncio.sleep(0.001)
            server.kill()
            await load

        before = len(acked)
        asyncio.run(load_and_kill())
        kills += 1
        mid_stream += len(acked) < len(ids)
        print(f"kill {kills}: {len(acked) - before} new 200s in this round, {len(acked)} in all")
        stored = queued_ids(data)
        # every 200 so far is on disk, exactly once, and nothing else is
        assert len(stored) == len(set(stored))
        assert acked <= set(stored), f"{len(acked - set(stored))} acknowledged messages lost after kill {kills}"
        assert set(stored) <= set(ids)
    assert mid_stream >= 3 and acked, "the kills must hit a running load"
    # resubmit everything: retries of stored ids are duplicates, the rest is stored now
    server.start()
    again: set[str] = set()
    asyncio.run(submit_all(port, ids, again))
    assert again == set(ids)
    assert server.terminate() == 0
    stored = queued_ids(data)
    assert len(stored) == len(ids) and set(stored) == set(ids)


def test_server_process_answers_every_case(tmp_path):
    from test_http import ERROR_CASES

    data = str(tmp_path / "store")
    port = free_port()
    server = ServerProcess(data, port, GWCORE_MAX_BODY="4096", GWCORE_HTTP_REQUEST_TIMEOUT="0.5s").start()

    async def main() -> None:
        async with Client("127.0.0.1", port) as c:
            for _ in range(3):
                assert (await c.request(nsb_request("dup-id"))).status == 200
            for kwargs, status, reason in ERROR_CASES:
                kwargs = dict(kwargs)
                r = await c.request(nsb_request(kwargs.pop("msg_id", "err-id"), **kwargs))
                assert (r.status, r.reason) == (status, reason)
            ids = [str(uuid.uuid4()) for _ in range(20)]
            await c.send(b"".join(nsb_request(i) for i in ids))
            assert [(await c.response()).status for _ in ids] == [200] * 20
        async with Client("127.0.0.1", port) as c:
            r = await c.request(nsb_request("big", body=b"x" * 5000))
            assert r.status == 413
        async with Client("127.0.0.1", port) as c:
            await c.send(nsb_request("slow")[:-3])
            r = await c.response()
            assert r.status == 408

    try:
        asyncio.run(main())
    finally:
        assert server.terminate() == 0
    stored = queued_ids(data)
    assert len(stored) == 21 and "dup-id" in stored and "err-id" not in stored
    assert not {"big", "slow"} & set(stored)


def test_handler_process_killed_mid_stream_redelivers(tmp_path):
    data = str(tmp_path / "store")
    log = tmp_path / "handled.log"
    port = free_port()
    env = dict(GWCORE_HANDLER="handlers:append_slowly", HANDLER_LOG=str(log),
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    server = ServerProcess(data, port, **env).start()
    ids = [str(uuid.uuid4()) for _ in range(200)]
    acked: set[str] = set()
    asyncio.run(submit_all(port, ids, acked, connections=4))
    assert acked == set(ids)
    # killed once the handler is part-way through the queue (10 ms a message)
    deadline = time.monotonic() + 20
    while not (log.exists() and len(log.read_text().split()) >= 5):
        assert time.monotonic() < deadline, "the handler does not run"
        time.sleep(0.005)
    server.kill()
    handled_before = log.read_text().split()
    assert 0 < len(handled_before) < len(ids)
    server.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and set(log.read_text().split()) != set(ids):
        time.sleep(0.1)
    assert server.terminate() == 0
    handled = log.read_text().split()
    assert set(handled) == set(ids)
    # at-least-once: only a message in the handler at the instant of the kill can appear twice
    assert len(handled) - len(ids) <= 1
    assert queued_ids(data) == []
