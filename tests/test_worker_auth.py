"""The worker API is attack surface: signed calls, secure defaults, no request that can stall the
distributor. Real sockets throughout; every refusal is checked against the queue afterwards
(nothing handed out, nothing deleted)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from httpclient import Client, get, metric_lines
from procs import ServerProcess, free_port
from test_distributor import dist_settings, secret_file, submit, until
from test_sites import counts

from gwcore import ConfigurationError, Gateway, Settings, Worker, auth
from gwcore.config import WorkerListen

SECRET_A = b"a-worker-secret-of-some-length"
SECRET_B = b"another-worker-secret-entirely"


def keyed(make_settings, **kw):
    kw.setdefault("worker_keys", (("ka", SECRET_A), ("kb", SECRET_B)))
    kw.setdefault("worker_lease", 30.0)
    return dist_settings(make_settings, **kw)


class Caller:
    """Signs worker calls by hand, so a test can sign them wrongly on purpose."""

    def __init__(self, key_id: str, secret: bytes) -> None:
        self.key_id, self.secret = key_id, secret
        self.nonces = auth.NonceSource()

    def request(self, method: str, path: str, *, now: float | None = None, nonce: str | None = None,
                secret: bytes | None = None) -> tuple[bytes, str]:
        nonce = nonce or self.nonces.next()
        headers = auth.call_headers(secret or self.secret, self.key_id, method, path, nonce, now)
        head = "".join(f"{k.decode()}: {v.decode()}\r\n" for k, v in headers)
        return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{head}Content-Length: 0\r\n\r\n".encode(), nonce


def plain(method: str, path: str) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()


async def call(c: Client, data: bytes):
    r = await c.request(data)
    return r.status, r.reason, r.body


async def enlist(c: Client, who: Caller, name: str, capacity: int = 10) -> str:
    status, reason, body = await call(c, who.request("POST", f"/.gwcore/worker/enlist/{name}/{capacity}")[0])
    assert status == 200, reason
    return json.loads(body)["session"]


# -- secure by default ------------------------------------------------------------------------------

def test_by_default_the_receive_channel_serves_no_worker_call(run, make_settings):
    """No worker keys: enlist, take, ack and blob on the public channel are 404, and the queue keeps
    all five messages; the same calls on the loopback worker listener work."""
    ids = [str(uuid.uuid4()) for _ in range(5)]

    async def main():
        async with Gateway(dist_settings(make_settings, worker_lease=30.0)) as gw:
            await submit(gw, ids)
            async with Client(*gw.addresses[0]) as c:
                for method, path in [("POST", "/.gwcore/worker/enlist/intruder/10"),
                                     ("POST", "/.gwcore/worker/take/x/100/"),
                                     ("POST", "/.gwcore/worker/ack/x/1,2,3,4,5"),
                                     ("POST", "/.gwcore/worker/drain/intruder"),
                                     ("GET", f"/.gwcore/worker/blob/x/{uuid.uuid4().hex}")]:
                    status, reason, _ = await call(c, plain(method, path))
                    assert (status, reason) == (404, 'Not Found: the worker API is not served on this listener '
                                                     '(docs/deployment.md, "Worker keys")'), path
            assert gw.distributor._sessions == {}
            await asyncio.sleep(0)
            assert gw.store.counts()["queue"] == 5
            host, _port = gw.worker_address
            assert host == "127.0.0.1"
            async with Client(*gw.worker_address) as c:
                status, _, body = await call(c, plain("POST", "/.gwcore/worker/enlist/local/10"))
                assert status == 200
                sid = json.loads(body)["session"]
                status, _, body = await call(c, plain("POST", f"/.gwcore/worker/take/{sid}/2000/"))
                assert sorted(m["id"] for m in json.loads(body)["messages"]) == sorted(ids)

    run(main())


def test_the_defaults_and_the_start_up_line(caplog):
    s = Settings.from_env({"GWCORE_MODE": "distributor"})
    assert (s.worker_listen, s.worker_keys) == (WorkerListen("127.0.0.1", 25901), ())
    assert s.worker_listen.loopback
    with pytest.raises(ConfigurationError, match="not a loopback address and no worker keys"):
        Settings.from_env({"GWCORE_MODE": "distributor", "GWCORE_WORKER_LISTEN": "0.0.0.0:25901"})
    with pytest.raises(ConfigurationError, match="GWCORE_WORKER_LISTEN='nope' is invalid"):
        Settings.from_env({"GWCORE_MODE": "distributor", "GWCORE_WORKER_LISTEN": "nope"})
    with pytest.raises(ConfigurationError, match="expected <key id>:<secret file>"):
        Settings.from_env({"GWCORE_WORKER_KEYS": "justanid"})
    with pytest.raises(ConfigurationError, match="secret_file '/nonexistent/x'"):
        Settings.from_env({"GWCORE_WORKER_KEYS": "w1:/nonexistent/x"})
    with pytest.raises(ConfigurationError, match="uses the port of the receive channel"):
        Settings.from_env({"GWCORE_MODE": "distributor", "GWCORE_WORKER_LISTEN": "127.0.0.1:25900"})


def test_worker_keys_from_files_and_the_config_table(tmp_path):
    f = secret_file(tmp_path, "w1")
    cfg = tmp_path / "gwcore.toml"
    cfg.write_text('[workers.keys]\nw2 = "a-secret-in-the-table-0123"\nw3 = { secret_file = "%s" }\n' % f)
    s = Settings.from_env({"GWCORE_WORKER_KEYS": f"w1:{f}", "GWCORE_CONFIG": str(cfg),
                           "GWCORE_WORKER_LISTEN": "0.0.0.0:25901", "GWCORE_MODE": "distributor"})
    secret = open(f, "rb").read().strip()
    assert dict(s.worker_keys) == {"w1": secret, "w2": b"a-secret-in-the-table-0123", "w3": secret}
    assert "secret" not in repr(s)


def test_start_up_log_says_where_workers_are_served(run, make_settings, caplog):
    async def main():
        caplog.set_level("INFO", logger="gwcore")
        async with Gateway(dist_settings(make_settings)):
            pass
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("workers: "))
        assert "served unsigned on the loopback worker listener http://127.0.0.1:" in line
        assert "not on the receive channels" in line
        caplog.clear()
        async with Gateway(keyed(make_settings, worker_listen=None)):
            pass
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("workers: "))
        assert line == "workers: signed calls only (worker keys ka, kb) on the receive channels"

    run(main())


# -- signed calls -----------------------------------------------------------------------------------

def test_unsigned_forged_stale_and_replayed_calls_are_refused_before_anything_happens(run, make_settings):
    ids = [str(uuid.uuid4()) for _ in range(5)]
    a, b = Caller("ka", SECRET_A), Caller("kb", SECRET_B)

    async def main():
        async with Gateway(keyed(make_settings)) as gw:
            await submit(gw, ids)
            for where in (gw.addresses[0], gw.worker_address):   # keys configured: signed everywhere
                async with Client(*where) as c:
                    status, reason, _ = await call(c, plain("POST", "/.gwcore/worker/enlist/intruder/10"))
                    assert status == 401 and reason.startswith("Unauthorized: missing-signature")
                    # an unknown key id and a wrong secret get the same answer: no key id is revealed
                    forged = Caller("nosuchkey", SECRET_A).request("POST", "/.gwcore/worker/enlist/i/10")[0]
                    wrong = a.request("POST", "/.gwcore/worker/enlist/i/10", secret=b"x" * 32)[0]
                    r1, r2 = await call(c, forged), await call(c, wrong)
                    assert r1[:2] == r2[:2] == (401, "Unauthorized: bad-signature (the signature matches no "
                                                     "worker key configured here)")
                    stale = a.request("POST", "/.gwcore/worker/enlist/i/10", now=time.time() - 3600)[0]
                    status, reason, _ = await call(c, stale)
                    assert status == 401 and reason.startswith("Unauthorized: date-out-of-window"), reason
                    # a signed call for one path does not pass for another
                    data, _ = a.request("POST", "/.gwcore/worker/enlist/i/10")
                    status, _, _ = await call(c, data.replace(b"/enlist/i/10", b"/enlist/i/99"))
                    assert status == 401
            assert gw.distributor._sessions == {}
            async with Client(*gw.addresses[0]) as c:
                sid = await enlist(c, a, "real", 10)
                # a captured take, replayed: refused, and the messages it would hand out stay queued
                take, _ = a.request("POST", f"/.gwcore/worker/take/{sid}/2000/")
                status, _, body = await call(c, take)
                assert status == 200 and len(json.loads(body)["messages"]) == 5
                status, reason, _ = await call(c, take)
                assert (status, reason.split(" (")[0]) == (401, "Unauthorized: replayed")
                ack, _ = a.request("POST", f"/.gwcore/worker/ack/{sid}/1")
                assert (await call(c, ack))[0] == 200
                assert (await call(c, ack))[0] == 401  # an ack replayed
            await until(lambda: gw.store.counts()["queue"] == 4, 10, "the ack to be committed")
            assert gw.distributor.refused >= 11
            text = (await get(*gw.addresses[0], "/metrics")).body.decode()
            assert f"gwcore_worker_calls_refused_total {gw.distributor.refused}" in metric_lines(text)
            r = await get(*gw.addresses[0], "/.gwcore/worker/heartbeat/x")
            assert r.status == 401 and r.headers.get("www-authenticate") == "gwcore-v1"

    run(main())


def test_another_keys_session_is_not_its_to_take_ack_nack_drain_or_read(run, make_settings):
    ids = [str(uuid.uuid4()) for _ in range(3)]
    a, b = Caller("ka", SECRET_A), Caller("kb", SECRET_B)

    async def main():
        async with Gateway(keyed(make_settings)) as gw:
            await submit(gw, ids)
            async with Client(*gw.addresses[0]) as c:
                sid = await enlist(c, a, "wa", 3)
                status, _, body = await call(c, a.request("POST", f"/.gwcore/worker/take/{sid}/2000/")[0])
                held = [m["seq"] for m in json.loads(body)["messages"]]
                assert len(held) == 3
                for method, path in [("POST", f"/.gwcore/worker/take/{sid}/100/"),
                                     ("POST", f"/.gwcore/worker/ack/{sid}/{','.join(map(str, held))}"),
                                     ("POST", f"/.gwcore/worker/nack/{sid}/{held[0]}/boom"),
                                     ("POST", f"/.gwcore/worker/heartbeat/{sid}"),
                                     ("POST", f"/.gwcore/worker/leave/{sid}"),
                                     ("POST", f"/.gwcore/worker/drain/{sid}"),
                                     ("POST", "/.gwcore/worker/drain/wa"),
                                     ("GET", f"/.gwcore/worker/blob/{sid}/{uuid.uuid4().hex}")]:
                    status, reason, _ = await call(c, b.request(method, path)[0])
                    assert (status, reason.split(" (")[0]) == (401, "Unauthorized: session-key-mismatch"), path
                # B enlisting under A's live name is refused too, and A's session is untouched
                status, reason, _ = await call(c, b.request("POST", "/.gwcore/worker/enlist/wa/3")[0])
                assert status == 409 and "is enlisted by a live session" in reason
                s = gw.distributor._sessions[sid]
                assert sorted(s.inflight) == sorted(held) and not s.draining
                # its own key may: the acks delete the messages
                status, _, body = await call(c, a.request("POST", f"/.gwcore/worker/ack/{sid}/"
                                                                   f"{','.join(map(str, held))}")[0])
                assert (status, json.loads(body)) == (200, {"acked": 3})
            await until(lambda: gw.store.counts()["queue"] == 0, 10, "the acks")

    run(main())


def test_two_keys_during_rotation(run, make_settings):
    """Both keys configured at once: a worker on the old key and one on the new share the work."""
    ids = [str(uuid.uuid4()) for _ in range(40)]
    handled: list[tuple[str, str]] = []

    def handler(name):
        async def handle(message):
            handled.append((name, message.id))
            await asyncio.sleep(0.01)
        return handle

    async def main():
        async with Gateway(keyed(make_settings)) as gw:
            host, port = gw.addresses[0]
            url = f"http://{host}:{port}"
            old = Worker(url, 2, handler("old"), name="old", key_id="ka", secret=SECRET_A)
            new = Worker(url, 2, handler("new"), name="new", key_id="kb", secret=SECRET_B)
            async with old, new:
                await until(lambda: len(gw.distributor._sessions) == 2, 10, "both enlisted")
                await submit(gw, ids)
                await until(lambda: len(handled) == len(ids), 30, "every message handled")
                await until(lambda: gw.store.counts()["queue"] == 0, 10, "the acks")
            assert {n for n, _ in handled} == {"old", "new"}
            assert sorted(i for _, i in handled) == sorted(ids)
            assert gw.distributor.refused == 0
            # a worker without a key gets nowhere (it keeps retrying; nothing is handed to it)
            lost = Worker(url, 2, handler("lost"), name="lost")
            async with lost:
                await until(lambda: gw.distributor.refused >= 2, 20, "the keyless worker to be refused twice")
                assert "lost" not in gw.distributor._by_name

    run(main())


def test_worker_key_arguments_are_checked(tmp_path):
    with pytest.raises(ConfigurationError, match="both its key id and its secret"):
        Worker("http://127.0.0.1:1", 1, print, key_id="ka")
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        Worker("http://127.0.0.1:1", 1, print, key_id="ka", secret=b"short")
    with pytest.raises(ConfigurationError, match="not both"):
        Worker("http://127.0.0.1:1", 1, print, key_id="ka", secret=SECRET_A, secret_file="x")
    with pytest.raises(ConfigurationError, match="key id"):
        Worker("http://127.0.0.1:1", 1, print, key_id="bad id", secret=SECRET_A)


def test_the_nonce_window():
    v = auth.CallVerifier([("k", SECRET_A)], 300.0)

    def check(nonce, secret=SECRET_A, now=None):
        headers = {k.lower(): val for k, val in auth.call_headers(secret, "k", "POST", "/p", nonce, now)}
        return v.check("POST", "/p", headers)

    assert check("stream01.5") == "k"
    assert check("stream01.3") == "k"          # out of order, within the window: fine
    for n in ("stream01.5", "stream01.3"):
        with pytest.raises(auth.AuthenticationError) as e:
            check(n)
        assert e.value.reason == auth.REPLAYED
    assert check("stream01.5000") == "k"
    with pytest.raises(auth.AuthenticationError):
        check("stream01.6")                    # more than 1024 behind the highest: too old to tell
    assert check("stream02.1") == "k"          # another process's stream
    with pytest.raises(auth.AuthenticationError) as e:
        v.check("POST", "/p", {b"gwcore-signature": b"v1.k." + b"A" * 43, b"gwcore-date": b"20261202T000000Z"})
    assert e.value.reason == auth.MISSING_NONCE
    # a forged call leaves no trace in the window (it cannot burn a real worker's nonce)
    with pytest.raises(auth.AuthenticationError):
        check("stream03.1", secret=b"y" * 32)
    assert check("stream03.1") == "k"


def test_nonce_streams_are_bounded_per_key_and_forgotten_after_twice_the_window():
    now = [1_800_000_000.0]
    v = auth.CallVerifier([("k", SECRET_A), ("other", SECRET_B)], 300.0, clock=lambda: now[0])

    def check(key, secret, nonce):
        headers = {k.lower(): val for k, val in auth.call_headers(secret, key, "POST", "/p", nonce, now[0])}
        return v.check("POST", "/p", headers)

    for i in range(auth.MAX_STREAMS):
        check("k", SECRET_A, f"stream{i:04d}.1")
    with pytest.raises(auth.AuthenticationError, match="signing streams of key 'k'"):
        check("k", SECRET_A, "overflow.1")
    assert check("other", SECRET_B, "stream0000.1") == "other"   # another key's workers are not crowded out
    now[0] += 601   # twice the window: the old streams are forgotten, a new one fits again
    assert check("k", SECRET_A, "overflow.1") == "k"
    assert list(v._streams) == [("k", "overflow")]   # the rest aged out with their date window


# -- no request stalls the distributor ----------------------------------------------------------------

def test_limits_on_capacity_sessions_and_names(run, make_settings):
    async def main():
        settings = dist_settings(make_settings, worker_lease=30.0, worker_max_sessions=3)
        async with Gateway(settings) as gw:
            async with Client(*gw.worker_address) as c:
                status, reason, _ = await call(c, plain("POST", "/.gwcore/worker/enlist/bomb/10000000"))
                assert (status, reason) == (400, "Bad Request: capacity 10000000 is above "
                                                 "GWCORE_WORKER_MAX_CAPACITY=1000")
                assert (await get(*gw.addresses[0], "/healthz")).status == 200
                assert gw.distributor._sessions == {}
                status, _, body = await call(c, plain("POST", "/.gwcore/worker/enlist/w1/1000"))
                sid = json.loads(body)["session"]
                assert status == 200
                # the name of a live session is not anyone else's (without keys: not even a restart's)
                status, reason, _ = await call(c, plain("POST", "/.gwcore/worker/enlist/w1/1"))
                assert status == 409 and reason.startswith("Conflict: worker name 'w1' is enlisted by a live session")
                assert gw.distributor._by_name["w1"].id == sid
                for name in ("w2", "w3"):
                    assert (await call(c, plain("POST", f"/.gwcore/worker/enlist/{name}/1")))[0] == 200
                status, reason, _ = await call(c, plain("POST", "/.gwcore/worker/enlist/w4/1"))
                assert (status, reason) == (503, "Service Unavailable: 3 worker sessions, the most "
                                                 "GWCORE_WORKER_MAX_SESSIONS allows")
                # a thousand free slots: work still goes out at once
                await submit(gw, ["m1"])
                status, _, body = await call(c, plain("POST", f"/.gwcore/worker/take/{sid}/2000/"))
                assert [m["id"] for m in json.loads(body)["messages"]] == ["m1"]

    run(main())


def test_a_same_key_restart_replaces_its_session(run, make_settings):
    a = Caller("ka", SECRET_A)

    async def main():
        async with Gateway(keyed(make_settings)) as gw:
            await submit(gw, ["r1"])
            async with Client(*gw.addresses[0]) as c:
                old = await enlist(c, a, "same", 1)
                status, _, body = await call(c, a.request("POST", f"/.gwcore/worker/take/{old}/2000/")[0])
                assert [m["id"] for m in json.loads(body)["messages"]] == ["r1"]
                new = await enlist(c, Caller("ka", SECRET_A), "same", 1)   # a new process, same key
                assert old not in gw.distributor._sessions
                status, _, body = await call(c, a.request("POST", f"/.gwcore/worker/take/{new}/2000/")[0])
                (m,) = json.loads(body)["messages"]
                assert (m["id"], m["redelivered"]) == ("r1", True)

    run(main())


def test_metric_series_stay_bounded(run, make_settings):
    async def main():
        async with Gateway(dist_settings(make_settings, worker_lease=30.0)) as gw:
            async with Client(*gw.worker_address) as c:
                await submit(gw, ["x"])
                sid = json.loads((await call(c, plain("POST", "/.gwcore/worker/enlist/first/1")))[2])["session"]
                body = (await call(c, plain("POST", f"/.gwcore/worker/take/{sid}/2000/")))[2]
                seq = json.loads(body)["messages"][0]["seq"]
                assert (await call(c, plain("POST", f"/.gwcore/worker/ack/{sid}/{seq}")))[0] == 200
                assert (await call(c, plain("POST", f"/.gwcore/worker/leave/{sid}")))[0] == 200
                for i in range(300):
                    status, _, body = await call(c, plain("POST", f"/.gwcore/worker/enlist/n{i}/1"))
                    sid = json.loads(body)["session"]
                    assert (await call(c, plain("POST", f"/.gwcore/worker/leave/{sid}")))[0] == 200
            text = (await get(*gw.addresses[0], "/metrics")).body.decode()
            series = [line for line in metric_lines(text) if line.startswith("gwcore_worker_processed_total{")]
            assert len(series) == 64 + 1   # the last 64 departed by name, the rest summed
            assert 'gwcore_worker_processed_total{worker="(departed)"} 1' in series
            assert len(gw.distributor._stats) == 64

    run(main())


def test_signed_worker_process_through_the_cli(tmp_path):
    """`gwcore worker --key-id --secret-file` against a real gateway process whose key comes from
    GWCORE_WORKER_KEYS; `--drain` needs the same key."""
    from test_distributor import WorkerProcess, read_log
    from test_sites import wait_for

    key = ("cli", secret_file(tmp_path, "cli"))
    port = free_port()
    server = ServerProcess(str(tmp_path / "d" / "store"), port, GWCORE_MODE="distributor",
                           GWCORE_WORKER_KEYS=f"{key[0]}:{key[1]}").start()
    log = str(tmp_path / "handled.log")
    worker = WorkerProcess(f"http://127.0.0.1:{port}", "cw", log, capacity=2, sleep=0.0, key=key)
    try:
        ids = [f"c{i}" for i in range(10)]
        asyncio.run(submit(port, ids))
        wait_for(lambda: counts(server.data_dir)["queue"] == 0, 30, "every message handled")
        assert sorted(r[1] for r in read_log(log) if r[0] == "done") == sorted(ids)
        import subprocess
        import sys

        from procs import ROOT
        cmd = [sys.executable, "-m", "gwcore", "worker", "--distributor", f"http://127.0.0.1:{port}", "--drain", "cw"]
        res = subprocess.run(cmd, cwd=ROOT, env={**server.env, "PYTHONPATH": ROOT}, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode != 0 and "401" in res.stderr and worker.proc.poll() is None
        res = subprocess.run(cmd + ["--key-id", key[0], "--secret-file", key[1]], cwd=ROOT,
                             env={**server.env, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert worker.proc.wait(30) == 0
    finally:
        worker.stop()
        assert server.terminate() == 0


def test_a_node_that_took_over_serves_submits_on_the_compiled_path(run, make_settings):
    async def main():
        settings = dist_settings(make_settings, ha="on", receive_channels=f"http://127.0.0.1:{free_port()}/RemoteSite/")
        first = await Gateway(settings).start()
        second = await Gateway(dist_settings(make_settings, ha="on",
                                             receive_channels=f"http://127.0.0.1:{free_port()}/RemoteSite/")).start()
        try:
            assert (first.role, second.role) == ("active", "passive")
            await submit(first, ["a1", "a2"])
            assert first.states[0].compiled_submits == 2
            await first.stop()
            await asyncio.wait_for(second.takeover, 10)
            assert second.role == "active"
            await submit(second, [f"b{i}" for i in range(20)])
            assert second.states[0].compiled_submits == 20
            assert second.states[0].inbox is second.writer.inbox
        finally:
            await first.stop()
            await second.stop()

    run(main())
