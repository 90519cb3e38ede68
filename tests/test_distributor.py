"""Distributor mode: workers with capacity over the worker protocol, least recently freed slot
first, lapsed sessions redelivered (marked), drain, handler failures, metrics. Real sockets
throughout; the kill and drain tests run real `gwcore worker` processes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from httpclient import Client, get, metric_lines, nsb_request
from procs import ROOT, ServerProcess, free_port
from test_sites import counts, wait_for

from gwcore import ConfigurationError, Gateway, Worker
from gwcore.config import WorkerListen
from gwcore.worker import drain_worker

TESTS = os.path.dirname(os.path.abspath(__file__))


def dist_settings(make_settings, **kw):
    kw.setdefault("mode", "distributor")
    kw.setdefault("worker_lease", 1.0)
    return make_settings(**kw)


def base_url(gw: Gateway) -> str:
    """The worker URL of an in-process distributor: its (loopback, unsigned) worker listener."""
    host, port = gw.worker_address
    return f"http://{host}:{port}"


async def submit(gw_or_port, ids) -> None:
    host, port = gw_or_port.addresses[0] if isinstance(gw_or_port, Gateway) else ("127.0.0.1", gw_or_port)
    async with Client(host, port) as c:
        for i in ids:
            assert (await c.request(nsb_request(i))).status == 200


async def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_two_workers_of_capacity_three_never_hold_more_than_three(run, make_settings):
    ids = [str(uuid.uuid4()) for _ in range(36)]
    running: collections.Counter = collections.Counter()
    most: collections.Counter = collections.Counter()
    handled: list[tuple[str, str]] = []

    def slow(name):
        async def handle(message):
            running[name] += 1
            most[name] = max(most[name], running[name])
            await asyncio.sleep(0.05)
            running[name] -= 1
            handled.append((name, message.id))
        return handle

    async def main():
        async with Gateway(dist_settings(make_settings)) as gw:
            d = gw.distributor
            workers = [Worker(base_url(gw), 3, slow(n), name=n) for n in ("w1", "w2")]
            async with workers[0], workers[1]:
                await until(lambda: len(d._sessions) == 2, 10, "two enlisted workers")
                await submit(gw, ids)
                await until(lambda: len(handled) == len(ids), 30, "every message handled")
                await until(lambda: gw.store.counts()["queue"] == 0, 10, "the acks")
                seen_by_distributor = {n: d._by_name[n].max_in_flight for n in ("w1", "w2")}
            assert [w.max_in_flight for w in workers] == [3, 3]
            assert seen_by_distributor == {"w1": 3, "w2": 3}
            assert sum(w.processed for w in workers) == len(ids)

    run(main())
    assert max(most.values()) == 3 and set(most) == {"w1", "w2"}
    assert sorted(i for _n, i in handled) == sorted(ids)  # each exactly once


def test_a_sync_handler_runs_in_as_many_threads_as_slots_and_no_more(run, make_settings):
    """Blocking handlers run side by side, one thread per slot: four messages held in a handler
    at once on a worker of capacity four (a barrier of four only opens then), never a fifth
    thread; a handler that raises is a nack, and the message comes back."""
    ids = [str(uuid.uuid4()) for _ in range(12)]
    barrier = threading.Barrier(4, timeout=10)
    threads: set[str] = set()
    lock = threading.Lock()
    handled: list[str] = []
    failed_once: set[str] = set()

    entered = [0]

    def handle(message):
        with lock:
            threads.add(threading.current_thread().name)
            entered[0] += 1
            first_four = entered[0] <= 4
        if first_four:
            # (counted on entry: a fifth handler may start before the first four return)
            barrier.wait()  # raises BrokenBarrierError unless four handlers are in here at once
        if message.id == ids[5] and message.id not in failed_once:
            failed_once.add(message.id)
            raise RuntimeError("first attempt fails")
        with lock:
            handled.append(message.id)

    async def main():
        async with Gateway(dist_settings(make_settings)) as gw:
            d = gw.distributor
            w = Worker(base_url(gw), 4, handle, name="sync")
            await submit(gw, ids)
            async with w:
                await until(lambda: len(handled) == len(ids), 30, "every message handled")
                await until(lambda: gw.store.counts()["queue"] == 0, 10, "the acks")
            assert d is not None
            assert w.failed == 1 and w.processed == len(ids)
            assert w.max_in_flight == 4

    run(main())
    assert not barrier.broken
    assert 1 <= len(threads) <= 4
    assert sorted(handled) == sorted(ids)


def test_least_recently_freed_slot_first(run, make_settings):
    async def main():
        async with Gateway(dist_settings(make_settings, worker_lease=30.0)) as gw:
            d = gw.distributor
            a, b = d.enlist("A", 2), d.enlist("B", 1)   # free slots: A A B

            async def take(s):
                batch, stop = await d.take(s.id, 10.0)
                assert not stop
                return [m for m, _count in batch]

            async def send_one(msg_id, *takers):
                tasks = {s.name: asyncio.ensure_future(take(s)) for s in takers}
                await until(lambda: all(s.waiter is not None for s in takers), 5, "the takes to wait")
                await submit(gw, [msg_id])
                done, _ = await asyncio.wait(tasks.values(), timeout=5, return_when=asyncio.FIRST_COMPLETED)
                (name,) = [n for n, t in tasks.items() if t in done]
                for t in tasks.values():
                    if t not in done:
                        t.cancel()
                d._flush(a), d._flush(b)
                for t in tasks.values():
                    if t not in done:
                        try:
                            await t
                        except asyncio.CancelledError:
                            pass
                return name, tasks[name].result()

            # A's two slots are older than B's: m1 and m2 both go to A
            assert (await send_one("m1", a, b))[0] == "A"
            assert (await send_one("m2", a, b))[0] == "A"
            name, (m3,) = await send_one("m3", a, b)
            assert name == "B"
            held = {m.id: m for m in (*a.inflight.values(), *b.inflight.values())}
            # frees in this order: m2 (A), m3 (B), m1 (A)
            for s, msg_id in ((a, "m2"), (b, "m3"), (a, "m1")):
                assert await d.ack(s.id, [held[msg_id].seq]) == 1
            # the free slots are now A(m2) B(m3) A(m1): A, then B, then A again
            assert [(await send_one(m, a, b))[0] for m in ("m4", "m5", "m6")] == ["A", "B", "A"]
            assert gw.store.counts()["queue"] == 3

    run(main())


def test_a_batch_the_worker_never_got_is_handed_out_again(run, make_settings):
    async def main():
        async with Gateway(dist_settings(make_settings, worker_lease=30.0)) as gw:
            d = gw.distributor
            s = d.enlist("w", 2)
            await submit(gw, ["lost"])
            ((msg, count),), _stop = await d.take(s.id, 5.0, held=set())
            assert (msg.id, count) == ("lost", 1)
            # the answer never arrived: the next take says the worker holds nothing
            ((again, count),), _stop = await d.take(s.id, 5.0, held=set())
            assert (again.id, count) == ("lost", 2)
            # held: not handed out again
            batch, _stop = await d.take(s.id, 0.1, held={again.seq})
            assert batch == [] and list(s.inflight) == [again.seq]

    run(main())


def test_handler_failures_are_retried_then_poisoned(run, make_settings):
    attempts: collections.Counter = collections.Counter()
    marks: dict[str, list[tuple[int, bool]]] = collections.defaultdict(list)

    def handle(message):
        attempts[message.id] += 1
        marks[message.id].append((message.delivery_count, message.redelivered))
        if message.id == "poison" or (message.id == "flaky" and message.attempt == 1):
            raise ValueError(f"cannot handle {message.id}")

    async def main():
        async with Gateway(dist_settings(make_settings, handler_max_attempts=2)) as gw:
            async with Worker(base_url(gw), 2, handle, name="w") as worker:
                await submit(gw, ["fine", "flaky", "poison"])
                await until(lambda: gw.store.counts()["queue"] == 0, 20, "an empty queue")
            assert gw.store.counts()["errors"] == 1
            assert worker.failed == 3 and worker.processed == 2
            text = gw.render_metrics()
            assert 'gwcore_worker_failed_total{worker="w"} 3' in text
            assert "gwcore_consumer_poisoned_total 1" in text

    run(main())
    assert attempts == {"fine": 1, "flaky": 2, "poison": 2}
    assert marks["flaky"] == [(1, False), (2, True)]


def test_a_handler_longer_than_the_lease_keeps_its_message(run, make_settings):
    handled: list[tuple[str, int]] = []
    release = asyncio.Event()
    lease = 1.0

    async def slow(message):
        await release.wait()   # held until the session has outlived its lease three times
        handled.append((message.id, message.delivery_count))

    async def main():
        async with Gateway(dist_settings(make_settings, worker_lease=lease)) as gw:
            d = gw.distributor
            async with Worker(base_url(gw), 1, slow, name="w"):
                await submit(gw, ["long"])
                await until(lambda: "w" in d._by_name and d._by_name["w"].inflight, 10, "the message handed out")
                session = d._by_name["w"]
                since = time.monotonic()
                leases = set()   # what the session's lease was renewed to: the worker's heartbeats

                def outlived() -> bool:
                    leases.add(session.expires)
                    return len(leases) > 3 and time.monotonic() - since > 3 * lease

                await until(outlived, 30, "three leases' time and heartbeats")
                assert d._by_name["w"] is session and list(session.inflight)
                release.set()
                await until(lambda: gw.store.counts()["queue"] == 0, 10, "the ack")
            assert d.redelivered == 0

    run(main())
    assert handled == [("long", 1)]


def test_delivery_count_survives_a_distributor_restart(run, make_settings):
    settings = dist_settings(make_settings, worker_lease=30.0)

    async def take_one(gw, name):
        s = gw.distributor.enlist(name, 1)
        batch, _stop = await gw.distributor.take(s.id, 5.0)
        return batch

    async def main():
        ids = ["held"] + [f"q{i}" for i in range(5)]
        async with Gateway(settings) as gw:
            await submit(gw, ids)
            ((msg, count),) = await take_one(gw, "w")
            assert (msg.id, count) == ("held", 1)
            # the mark goes twice the enlisted slots (1) beyond what was handed out
            assert gw.distributor._handed_mark == msg.seq + 2
            # the distributor stops while the worker holds "held"
        async with Gateway(settings) as gw:
            got = []
            for i in range(len(ids)):
                got += await take_one(gw, f"w{i}")
            # possibly handled before the restart: marked (and the two behind it, within the
            # mark's window); never handed out: not marked
            assert [(m.id, c) for m, c in got] == [("held", 2), ("q0", 2), ("q1", 2), ("q2", 1), ("q3", 1), ("q4", 1)]

    run(main())


def test_concurrent_takes_never_lower_the_handed_out_mark(run, make_settings):
    """Two takes record their batch's top seq at once and the writes commit in submit order: the
    smaller one committed last must not lower the stored mark, or after a takeover the larger
    batch's messages would be handed out again unmarked."""
    settings = dist_settings(make_settings, worker_lease=30.0)

    async def main():
        async with Gateway(settings) as gw:
            d = gw.distributor
            await asyncio.gather(d._record_mark(100), d._record_mark(95))
            assert d._handed_mark == 100
        async with Gateway(settings) as gw:
            assert gw.distributor._restart_mark == 100

    run(main())


def test_a_message_held_twice_across_a_restart_is_listed_until_both_copies_are_answered(run, make_settings):
    """The distributor restarts (a takeover) while a worker handles "x"; the new one hands "x" out
    again (marked) to the same worker, which now handles two copies. When the old copy's ack is
    refused, the new copy is still held: the worker's takes keep listing it, so the distributor
    does not hand it out a third time."""
    settings = dist_settings(make_settings, worker_lease=30.0,
                             receive_channels=f"http://127.0.0.1:{free_port()}/RemoteSite/",
                             worker_listen=WorkerListen("127.0.0.1", free_port()))
    counts_seen: list[int] = []
    release = {1: asyncio.Event(), 2: asyncio.Event()}

    async def handle(message):
        counts_seen.append(message.delivery_count)
        await release[min(message.delivery_count, 2)].wait()

    async def main():
        async with Gateway(settings) as gw:
            worker = Worker(base_url(gw), 2, handle, name="w", wait=0.2)
            run_task = asyncio.ensure_future(worker.run())
            await until(lambda: "w" in gw.distributor._by_name, 10, "the worker enlisted")
            await submit(gw, ["x"])
            await until(lambda: counts_seen == [1], 10, "the first delivery")
        async with Gateway(settings) as gw:
            await until(lambda: counts_seen == [1, 2], 20, "the redelivery to the re-enlisted worker")
            release[1].set()   # the old copy: its ack goes to a session the new distributor never knew
            await until(lambda: sum(worker._held.values()) == 1, 10, "the old copy's answer")
            answers = {worker._proto.last_answer}

            def takes_answered() -> bool:   # takes in the meantime list what the worker holds
                answers.add(worker._proto.last_answer)
                return len(answers) > 3

            await until(takes_answered, 10, "three takes after the old copy's answer")
            assert counts_seen == [1, 2] and gw.distributor.redelivered == 1
            release[2].set()
            await until(lambda: gw.store.counts()["queue"] == 0, 10, "the ack of the second copy")
            assert gw.distributor.redelivered == 1
            worker.drain()
            await run_task
        assert counts_seen == [1, 2]

    run(main())


def test_metrics_show_each_worker_and_the_queue(run, make_settings):
    async def main():
        async with Gateway(dist_settings(make_settings)) as gw:
            async with Worker(base_url(gw), 4, lambda m: None, name="alpha"):
                await submit(gw, [f"x{i}" for i in range(5)])
                await until(lambda: gw.store.counts()["queue"] == 0, 10, "an empty queue")
                text = (await get(*gw.addresses[0], "/metrics")).body.decode()
            expected = ['gwcore_worker_capacity{worker="alpha"} 4', 'gwcore_worker_in_flight{worker="alpha"} 0',
                        'gwcore_worker_processed_total{worker="alpha"} 5', "gwcore_workers 1", "gwcore_queue_depth 0"]
            assert [line for line in expected if line not in metric_lines(text)] == []

    run(main())


def test_protocol_errors_and_standalone_mode(run, make_settings, tmp_path):
    async def call(gw, path):
        async with Client(*(gw.worker_address or gw.addresses[0])) as c:
            return await c.request(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())

    async def main():
        async with Gateway(dist_settings(make_settings)) as gw:
            assert (await call(gw, "/.gwcore/worker/take/nosuchsession/100/")).status == 404
            assert (await call(gw, "/.gwcore/worker/enlist/w/0")).status == 400
            assert (await call(gw, "/.gwcore/worker/frobnicate/x")).status == 404
            r = await call(gw, "/.gwcore/worker/enlist/w%2F1/2")
            assert r.status == 200 and b'"session"' in r.body
            assert gw.distributor._by_name["w/1"].capacity == 2
            assert not await drain_worker(base_url(gw), "nobody")
            assert await drain_worker(base_url(gw), "w/1")
        async with Gateway(make_settings(data_dir=str(tmp_path / "standalone"))) as gw:
            assert (await call(gw, "/.gwcore/worker/enlist/w/1")).status == 404

    run(main())
    with pytest.raises(ConfigurationError, match="GWCORE_HANDLER"):
        Gateway(dist_settings(make_settings, handler="handlers:record"))
    with pytest.raises(ConfigurationError, match="reserves"):
        asyncio.run(Gateway(dist_settings(make_settings, receive_channels="http://127.0.0.1:0/")).start())


# -- real processes ---------------------------------------------------------------------------------


class WorkerProcess:
    """A `gwcore worker` process running a handler of tests/handlers.py that logs to *log*."""

    def __init__(self, url: str, name: str, log: str, capacity: int = 3, sleep: float = 0.3,
                 handler: str = "handlers:log_slowly", env: dict[str, str] | None = None,
                 key: tuple[str, str] | None = None) -> None:
        extra = env or {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("GWCORE_")}
        env.update(PYTHONPATH=os.pathsep.join([ROOT, TESTS]), HANDLER_LOG=log, HANDLER_SLEEP=str(sleep),
                   WORKER_NAME=name, **extra)
        self.name = name
        self.stderr_path = log + f".{name}.err"
        self.stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gwcore", "worker", "--distributor", url, "--capacity", str(capacity),
             "--handler", handler, "--name", name, "--wait", "2",
             *(["--key-id", key[0], "--secret-file", key[1]] if key else [])],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.stderr)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def read_log(path: str) -> list[tuple[str, str, int, bool, int]]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            kind, msg_id, count, redelivered, pid = line.split()
            rows.append((kind, msg_id, int(count), redelivered == "1", int(pid)))
    return rows


def metrics(port: int) -> str:
    return asyncio.run(get("127.0.0.1", port, "/metrics")).body.decode()


def secret_file(tmp_path, key_id: str) -> str:
    """A worker key's secret in a file of its own (mode 0600), as an operator would keep it."""
    path = tmp_path / f"{key_id}.secret"
    path.write_text(uuid.uuid4().hex + "\n")
    path.chmod(0o600)
    return str(path)


@contextlib.contextmanager
def two_workers(tmp_path, ids, keyed: bool = False):
    """A distributor process (lease 1 s) with `gwcore worker` processes A and B (capacity 3, handler
    0.3 s, both logging to one file), and *ids* submitted once both enlisted. *keyed*: the
    distributor has a worker key and the workers sign with it through the receive channel's
    port; otherwise they use the (unsigned, loopback) worker listener."""
    log = str(tmp_path / "handled.log")
    port = free_port()
    env = {"GWCORE_MODE": "distributor", "GWCORE_WORKER_LEASE": "1s"}
    key = None
    if keyed:
        key = ("wk1", secret_file(tmp_path, "wk1"))
        env["GWCORE_WORKER_KEYS"] = f"{key[0]}:{key[1]}"
    server = ServerProcess(str(tmp_path / "dist" / "store"), port, **env).start()
    url = f"http://127.0.0.1:{port if keyed else server.worker_port}"
    workers: list[WorkerProcess] = []
    try:
        workers = [WorkerProcess(url, "A", log, key=key), WorkerProcess(url, "B", log, key=key)]
        wait_for(lambda: "gwcore_workers 2" in metrics(port), 30, "two workers")
        asyncio.run(submit(port, ids))
        yield server, url, workers, log
    finally:
        for w in workers:
            w.stop()
        assert server.terminate() == 0


def test_sigkilled_worker_messages_go_to_the_other_worker_marked(tmp_path):
    """Signed workers (a key file each) on the receive channel's port: one is SIGKILLed mid-batch,
    every message is still handled, none lost."""
    ids = [f"m{i:03d}" for i in range(40)]
    with two_workers(tmp_path, ids, keyed=True) as (server, _url, workers, log):
        a_pid = workers[0].proc.pid

        def a_mid_batch() -> bool:
            rows = read_log(log)
            started = [r[1] for r in rows if r[0] == "start" and r[4] == a_pid]
            finished = {r[1] for r in rows if r[0] == "done" and r[4] == a_pid}
            return len(started) >= 4 and len(set(started) - finished) >= 2

        wait_for(a_mid_batch, 30, "worker A in the middle of a batch")
        workers[0].proc.send_signal(signal.SIGKILL)
        workers[0].proc.wait()
        wait_for(lambda: counts(server.data_dir)["queue"] == 0, 60, "every message handled and acknowledged")
        text = metrics(server.port)
    rows = read_log(log)
    done = {r[1] for r in rows if r[0] == "done"}
    assert done == set(ids)
    a_started = [r for r in rows if r[0] == "start" and r[4] == a_pid]
    a_done = {r[1] for r in rows if r[0] == "done" and r[4] == a_pid}
    lost_by_a = {r[1] for r in a_started} - a_done
    assert lost_by_a, "A was killed with nothing in flight: the test tests nothing"
    starts: dict[str, list] = collections.defaultdict(list)
    for r in rows:
        if r[0] == "start":
            starts[r[1]].append(r)
    for msg_id, rs in starts.items():
        # the first delivery is unmarked; each later one is marked with its count
        assert [(r[2], r[3]) for r in rs] == [(n, n > 1) for n in range(1, len(rs) + 1)], rs
        if len(rs) > 1:
            assert rs[0][4] == a_pid and all(r[4] != a_pid for r in rs[1:])
    redelivered = {m for m, rs in starts.items() if len(rs) > 1}
    # exactly once, except what A took and did not acknowledge: the messages it was handling when
    # killed (and, rarely, one whose handler had returned but whose ack was not through yet)
    assert lost_by_a <= redelivered <= {r[1] for r in a_started}
    assert f"gwcore_distributor_redelivered_total {len(redelivered)}" in text


def test_sigterm_drains_a_worker_and_cli_drain_stops_another(tmp_path):
    ids = [f"d{i:03d}" for i in range(30)]
    with two_workers(tmp_path, ids) as (server, url, workers, log):
        a_pid = workers[0].proc.pid
        wait_for(lambda: sum(1 for r in read_log(log) if r[0] == "start" and r[4] == a_pid) >= 4, 30,
                 "worker A busy")
        workers[0].proc.send_signal(signal.SIGTERM)
        assert workers[0].proc.wait(30) == 0
        a_rows = [r for r in read_log(log) if r[4] == a_pid]
        assert {r[1] for r in a_rows if r[0] == "start"} == {r[1] for r in a_rows if r[0] == "done"}
        wait_for(lambda: counts(server.data_dir)["queue"] == 0, 60, "B to handle the rest")
        res = subprocess.run([sys.executable, "-m", "gwcore", "worker", "--distributor", url, "--drain", "B"],
                             cwd=ROOT, env={**server.env, "PYTHONPATH": ROOT},
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert workers[1].proc.wait(30) == 0
        wait_for(lambda: "gwcore_workers 0" in metrics(server.port), 10, "both sessions gone")
    rows = read_log(log)
    assert sorted(r[1] for r in rows if r[0] == "done") == sorted(ids)   # each exactly once
    assert not any(r[3] for r in rows)                                    # nothing redelivered
