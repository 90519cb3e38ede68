"""Active/passive on one data dir, with real processes and a real nginx (docs/deployment.md):
never two actives; SIGKILL and SIGTERM takeovers; 40,000 messages from a gwcore sender through
nginx to two `gwcore worker` processes while the active node is SIGKILLed again and again."""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time

from httpclient import Client, get, metric_lines, nsb_request
from nginx import Nginx, takeover_gaps
from procs import ServerProcess, free_port, gwcore_cli, queued_ids
from test_distributor import WorkerProcess, metrics, secret_file
from test_sites import counts, enqueue, wait_for

PASSIVE = "Service Unavailable: passive"


def node(tmp_path, name: str, data_dir: str, port: int, endpoint: str = "RemoteSite", **env: str) -> ServerProcess:
    """A distributor-mode node on the shared *data_dir*, with a log of its own."""
    env = {"GWCORE_MODE": "distributor", "GWCORE_SHUTDOWN_TIMEOUT": "5s", **env}
    proc = ServerProcess(data_dir, port, GWCORE_ENDPOINT=endpoint, **env)
    proc.log = str(tmp_path / f"{name}.log")
    return proc


def readyz(port: int) -> tuple[int, str]:
    r = asyncio.run(get("127.0.0.1", port, "/readyz"))
    return r.status, r.reason


def submit(port: int, msg_id: str, path: str = "/RemoteSite/") -> tuple[int, str]:
    async def main():
        async with Client("127.0.0.1", port) as c:
            return await c.request(nsb_request(msg_id, path=path))

    r = asyncio.run(main())
    return r.status, r.reason


def metric(port: int, line_start: str) -> str:
    body = asyncio.run(get("127.0.0.1", port, "/metrics")).body.decode()
    return next(line for line in metric_lines(body) if line.startswith(line_start))


def active_of(nodes: list[ServerProcess]) -> list[ServerProcess]:
    return [n for n in nodes if n.proc is not None and n.proc.poll() is None and readyz(n.port)[0] == 200]


def test_never_two_actives_and_takeovers(tmp_path):
    shared = str(tmp_path / "shared" / "store")
    a = node(tmp_path, "a", shared, free_port())
    b = node(tmp_path, "b", shared, free_port())
    a.start()
    b.start()
    try:
        assert readyz(a.port) == (200, "OK")
        assert readyz(b.port) == (503, PASSIVE)
        assert asyncio.run(get("127.0.0.1", b.port, "/healthz")).status == 200
        assert submit(a.port, "m1") == (200, "OK")
        assert submit(b.port, "m2") == (503, PASSIVE)
        assert metric(b.port, 'gwcore_role{mode="distributor",role="passive"}').endswith(" 1")
        assert metric(b.port, 'gwcore_http_requests_total{status="503"}').endswith(" 1")
        assert metric(a.port, 'gwcore_role{mode="distributor",role="active"}').endswith(" 1")

        a.kill()
        killed = time.monotonic()
        wait_for(lambda: readyz(b.port)[0] == 200, 10, "the passive to take over")
        print(f"takeover after SIGKILL (seen through /readyz): {(time.monotonic() - killed) * 1000:.0f} ms")
        assert submit(b.port, "m1") == (200, "OK")  # a duplicate: the store came over intact
        assert submit(b.port, "m2") == (200, "OK")
        a.start()  # the killed node comes back as the passive
        assert readyz(a.port) == (503, PASSIVE)
        assert submit(a.port, "m3") == (503, PASSIVE)
        assert len(active_of([a, b])) == 1

        # graceful: SIGTERM drains the active and releases the lease; the passive takes over at once
        stopping = time.monotonic()
        assert b.terminate() == 0
        wait_for(lambda: readyz(a.port)[0] == 200, 10, "the passive to take over after SIGTERM")
        print(f"takeover after SIGTERM: {(time.monotonic() - stopping) * 1000:.0f} ms")
        assert submit(a.port, "m3") == (200, "OK")
    finally:
        for n in (a, b):
            if n.proc is not None and n.proc.poll() is None:
                assert n.terminate() == 0
    assert sorted(queued_ids(shared)) == ["m1", "m2", "m3"]
    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    assert "role: passive:" in logs and "role: passive -> active" in logs and "lease released" in logs


def test_standalone_refuses_a_second_process_unless_ha_is_on(tmp_path):
    shared = str(tmp_path / "shared" / "store")
    a = ServerProcess(shared, free_port()).start()
    try:
        second = ServerProcess(shared, free_port())
        second.log = str(tmp_path / "second.log")
        try:
            second.start()
        except RuntimeError as exc:
            assert "in use by another gwcore process" in str(exc) and "GWCORE_HA=on" in str(exc)
        else:
            raise AssertionError("a second standalone process started on a data dir in use")
        third = node(tmp_path, "third", shared, free_port(), GWCORE_MODE="standalone", GWCORE_HA="on").start()
        try:
            assert readyz(third.port) == (503, PASSIVE)
        finally:
            assert third.terminate() == 0
    finally:
        assert a.terminate() == 0


# The transfer goes on while a killed node restarts (a second or two each time), so the last kill
# comes after about as many messages as three restarts take, whatever the floor: enough messages
# that it still comes under load (at 20,000 a faster receiver sometimes finished first).
N = 40_000
KILLS = 3


def handled_rows(path: str) -> list[tuple[str, bool, int, str]]:
    """``(id, redelivered, delivery_count, worker)`` per line of handlers.log_handled's file."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):  # a line being written is read next time
                msg_id, redelivered, count, worker = line.split()
                rows.append((msg_id, redelivered == "1", int(count), worker))
    return rows


def test_takeover_under_load_through_nginx(tmp_path):
    """Two distributor nodes behind nginx, two `gwcore worker` processes reaching them through
    nginx too; 40,000 messages from a gwcore sender while the active node is SIGKILLed three times:
    every message handled, twice only as a marked redelivery, nothing in the sender's errors."""
    seed = random.randrange(1 << 30)
    print(f"kill schedule seed: {seed}")
    rng = random.Random(seed)
    shared = str(tmp_path / "shared" / "store")
    key = ("workers", secret_file(tmp_path, "workers"))  # signed workers, reaching the nodes through nginx
    # small batches (the sender batches to gwcore nodes), 4 at once: 16 messages in flight, so the
    # batches cross takeovers and the transfer lasts long enough for three kills under load
    nodes = [node(tmp_path, name, shared, free_port(), endpoint="SiteB", GWCORE_WORKER_KEYS=f"{key[0]}:{key[1]}",
                  GWCORE_MAX_BATCH_MESSAGES="4")
             for name in ("b1", "b2")]
    for n in nodes:
        n.start()
    proxy = Nginx(str(tmp_path / "nginx"), free_port(), [n.port for n in nodes]).start()
    url = f"http://127.0.0.1:{proxy.port}/SiteB/"
    handled_log = str(tmp_path / "handled.log")
    workers = [WorkerProcess(f"http://127.0.0.1:{proxy.port}", name, handled_log, capacity=4,
                             handler="handlers:log_handled", key=key) for name in ("w1", "w2")]
    a_dir = str(tmp_path / "a" / "store")
    a_port = free_port()
    ids = enqueue(a_dir, a_port, f"SiteB={url}", N)
    sender = ServerProcess(a_dir, a_port, GWCORE_ENDPOINT="SiteA", GWCORE_SITES=f"SiteB={url}",
                           GWCORE_RETRIES="100000", GWCORE_RETRY_DELAYS="0.05s", GWCORE_SEND_CONCURRENCY="4")
    try:
        wait_for(lambda: "gwcore_workers 2" in metrics(active_of(nodes)[0].port), 30, "two enlisted workers")
        sender.start()
        for kill in range(KILLS):
            floor = (kill + 1) * N // (KILLS + 2) + rng.randrange(N // 10)
            wait_for(lambda: N - counts(a_dir)["outgoing"] >= floor, 120, f"{floor} messages sent")
            active = active_of(nodes)
            assert len(active) == 1, "exactly one active node"
            victim = active[0]
            victim.kill()
            left = counts(a_dir)["outgoing"]
            print(f"kill {kill + 1}: {N - left} messages sent, {left} still to send")
            assert left > 0, "the kill came after the transfer ended: it tests nothing"
            time.sleep(rng.uniform(0.1, 0.6))
            victim.start()
            assert readyz(victim.port) == (503, PASSIVE), "a restarted node comes back as the passive"
        wait_for(lambda: counts(a_dir)["outgoing"] == 0, 180, "the sender's outgoing queue to drain")
        everything_handled = lambda: {r[0] for r in handled_rows(handled_log)} >= set(ids)  # noqa: E731
        wait_for(lambda: everything_handled() and counts(shared)["queue"] == 0, 120,
                 "every message handled and acknowledged")
        assert all(w.proc.poll() is None for w in workers), "a worker exited"
    finally:
        for w in workers:
            w.stop()
        for proc in (sender, *nodes):
            if proc.proc is not None and proc.proc.poll() is None:
                assert proc.terminate() == 0
        proxy.stop()
    assert counts(a_dir)["outgoing_errors"] == 0
    assert gwcore_cli("inspect", "errors", data_dir=a_dir) == ""

    rows = handled_rows(handled_log)
    by_id: dict[str, list[tuple[bool, int]]] = {}
    for msg_id, redelivered, count, _worker in rows:
        by_id.setdefault(msg_id, []).append((redelivered, count))
    assert set(by_id) == set(ids), f"{len(set(ids) - set(by_id))} never handled, {len(set(by_id) - set(ids))} unknown"
    for msg_id, handlings in by_id.items():
        # the first delivery is the only unmarked one; any later one is marked, with its count
        assert all(redelivered == (count > 1) for redelivered, count in handlings), (msg_id, handlings)
        assert sum(1 for redelivered, _c in handlings if not redelivered) <= 1, (msg_id, handlings)
    redeliveries = len(rows) - len(by_id)
    per_worker = {name: sum(1 for r in rows if r[3] == name) for name in ("w1", "w2")}
    print(f"handled {len(rows)} times: {redeliveries} marked redeliveries "
          f"({sum(1 for h in by_id.values() if len(h) > 1)} ids), per worker {per_worker}")

    answers = proxy.answers("/SiteB/")  # gateway submits only (the workers' calls go to the active too)
    gaps = takeover_gaps(answers)
    by_status: dict[int, int] = {}
    for _t, status, _n in answers:
        by_status[status] = by_status.get(status, 0) + 1
    print(f"nginx answers to submits by status: {dict(sorted(by_status.items()))}")
    print(f"takeover (last 200 from the old active to first 200 from the new), {len(gaps)} takeovers: "
          f"p50 {statistics.median(gaps) * 1000:.0f} ms, max {max(gaps) * 1000:.0f} ms")
    assert len(gaps) == KILLS
    # a bound on what a sender sees, generous for a busy machine (the times are benchmarks.md's)
    assert max(gaps) < 60.0


def test_a_passive_gateway_stops_cleanly_and_leaves_the_lease_free(make_settings, run):
    from gwcore import Gateway
    from gwcore.lease import try_lease

    async def main():
        settings = make_settings(ha="on")
        active = await Gateway(settings).start()
        passive = await Gateway(settings).start()
        assert (active.role, passive.role) == ("active", "passive")
        assert passive.store is None  # never opened before the lease is won
        await passive.stop()
        assert passive.takeover.cancelled()
        await active.stop()
        # the abandoned waiter may hold the freed lock for an instant before it lets go
        for _ in range(100):
            fd = try_lease(settings.data_dir)
            if fd is not None:
                os.close(fd)
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the lease stayed held after both gateways stopped")

    run(main())


def test_a_missing_nginx_skips_and_ci_turns_every_skip_into_a_failure(monkeypatch, tmp_path):
    """Without nginx the helper skips; run as CI runs it (CI=true), that skip, and any other, fails
    the run (tests/conftest.py), and an allowed one would have to be listed in tests/ci.py."""
    import subprocess
    import sys

    import pytest

    import nginx

    monkeypatch.setattr(nginx.shutil, "which", lambda name: None)
    monkeypatch.setattr(nginx.os, "access", lambda path, mode: False)
    with pytest.raises(pytest.skip.Exception, match="nginx is not installed"):
        nginx.nginx_binary()
    tests = os.path.dirname(os.path.abspath(__file__))
    probe = tmp_path / "test_probe.py"
    probe.write_text("import pytest\n\ndef test_needs_something():\n    pytest.skip('no frobnicator here')\n"
                     "\n@pytest.mark.skipif(True, reason='never here')\ndef test_marked():\n    pass\n")
    (tmp_path / "conftest.py").write_text(  # the suite's own hook, loaded from tests/conftest.py
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {tests!r})\n"
        f"spec = importlib.util.spec_from_file_location('suite_conftest', {tests!r} + '/conftest.py')\n"
        "suite = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(suite)\n"
        "pytest_runtest_makereport = suite.pytest_runtest_makereport\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    # a skip in the test is a failure, one at set-up (a skipif mark) an error: both fail the run
    for ci_value, expected in (("true", "1 failed, 1 error"), (None, "2 skipped")):
        run_env = dict(env, **({"CI": ci_value} if ci_value else {}))
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
                             cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=120)
        assert expected in res.stdout, res.stdout + res.stderr
        if ci_value:
            assert res.returncode == 1
            assert "skipped in CI (CI is set), which counts as a failure here" in res.stdout
            assert "no frobnicator here" in res.stdout and "never here" in res.stdout
        else:
            assert res.returncode == 0


def test_a_passive_node_answers_passive_from_its_first_connection(make_settings, run, monkeypatch):
    """The listeners have their role before they accept anything: a connection in the instant
    between opening the socket and the role being set was answered "not the active receiver"."""
    from gwcore import Gateway, http

    roles_at_start: list[tuple[bool, str | None]] = []
    real_start = http.HTTPState.start

    def start(self, loop):  # called right after each listener's socket is open
        roles_at_start.append((self.passive, self.not_available()))
        real_start(self, loop)

    monkeypatch.setattr(http.HTTPState, "start", start)

    async def main():
        settings = make_settings(ha="on")
        active = await Gateway(settings).start()
        roles_at_start.clear()
        passive = await Gateway(settings).start()
        try:
            assert roles_at_start and all(r == (True, "Service Unavailable: passive") for r in roles_at_start)
        finally:
            await passive.stop()
            await active.stop()

    run(main())
