"""Selected-instance mode with real processes, a real nginx and a real RabbitMQ: the election
under SIGKILLs, failover and planned handover under load from a gwcore sender, a broker restart
under load with both ack modes (docs/deployment.md, "Selected-instance mode")."""

from __future__ import annotations

import collections
import json
import random
import signal
import statistics
import time

import pytest
from broker import AMQP_URL, drain, endpoint, rabbitmqctl  # noqa: F401 (endpoint: a fixture)
from nginx import Nginx, takeover_gaps
from procs import ServerProcess, free_port, gwcore_cli
from test_ha import metric, readyz
from test_sites import counts, enqueue, wait_for

STANDBY = "Service Unavailable: standby"


def instance(tmp_path, endpoint: str, name: str, **env: str) -> ServerProcess:
    env = {"GWCORE_MODE": "selected", "GWCORE_INSTANCE": name, "GWCORE_AMQP_URL": AMQP_URL,
           "GWCORE_ELECTION_INTERVAL": "20ms", "GWCORE_SHUTDOWN_TIMEOUT": "15s", **env}
    proc = ServerProcess(str(tmp_path / name / "store"), free_port(), GWCORE_ENDPOINT=endpoint, **env)
    proc.log = str(tmp_path / f"{name}.log")
    return proc


def alive(n: ServerProcess) -> bool:
    return n.proc is not None and n.proc.poll() is None


def leaders(nodes: list[ServerProcess]) -> list[ServerProcess]:
    return [n for n in nodes if alive(n) and readyz(n.port)[0] == 200]


def broker_leader(endpoint: str) -> list[str]:
    """The broker's view: the instance names whose connection owns the leader queue."""
    owners = [q["owner_pid"] for q in json.loads(rabbitmqctl("list_queues", "name", "owner_pid", "-q", "--formatter", "json"))
              if q["name"] == f"{endpoint}.gwcore.leader"]
    names = {}
    for c in json.loads(rabbitmqctl("list_connections", "pid", "client_properties", "-q", "--formatter", "json")):
        props = c["client_properties"]
        items = props.items() if isinstance(props, dict) else ((p[0], p[-1]) for p in props)
        for key, value in items:
            if key == "connection_name":
                names[c["pid"]] = value
    return [names.get(o, f"unknown connection {o}").rsplit(" ", 1)[-1] for o in owners]


def elections_under_kills(nodes: list[ServerProcess], steps: int, rng: random.Random, check=None,
                          limit: float = 60) -> list[float]:
    """Kill an instance (the leader more often than not) or start a stopped one, *steps* times:
    after each, never two leaders, one within *limit* seconds while any runs, every other running
    instance a standby; ``check(step, leader)`` after each step. Returns the times to a leader."""
    names = {n.port: n.env["GWCORE_INSTANCE"] for n in nodes}
    elections = []
    wait_for(lambda: len(leaders(nodes)) == 1, 20, "the first election")
    for step in range(steps):
        running = [n for n in nodes if alive(n)]
        # kill the leader more often than not: that is what makes an election
        if len(running) == len(nodes) or (running and rng.random() < 0.6):
            victim = leaders(running)[0] if leaders(running) and rng.random() < 0.7 else rng.choice(running)
            victim.kill()
        else:
            rng.choice([n for n in nodes if not alive(n)]).start()
        started = time.monotonic()
        while True:
            now = leaders(nodes)
            assert len(now) <= 1, f"step {step}: two leaders {[names[n.port] for n in now]}"
            if now or not any(alive(n) for n in nodes):
                break
            # generous for a busy machine: the times themselves are printed
            assert time.monotonic() - started < limit, f"step {step}: no leader among the running instances"
        elections.append(time.monotonic() - started)
        if check is not None:
            check(step, names[now[0].port] if now else None)
        for n in nodes:
            if alive(n) and n not in now:
                # a standby (one that was just started may still be connecting)
                wait_for(lambda n=n: readyz(n.port) == (503, STANDBY), 30, "the standby to connect")
    print(f"time to a (new) leader as seen through /readyz: p50 {statistics.median(elections) * 1000:.0f} ms, "
          f"max {max(elections) * 1000:.0f} ms")
    return elections


def test_at_most_one_leader_over_100_kills_and_restarts(tmp_path, endpoint):
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    nodes = [instance(tmp_path, endpoint, f"i{i}") for i in range(3)]
    for n in nodes:
        n.start()

    def broker_view(step: int, leader: str | None) -> None:
        if step % 25 == 24 and leader is not None:
            # the broker's view: one owner of the leader queue, the instance that says it leads
            assert broker_leader(endpoint) == [leader]

    try:
        elections_under_kills(nodes, 100, random.Random(seed), broker_view)
    finally:
        for n in nodes:
            if alive(n):
                assert n.terminate() == 0


N = 20_000


def load_through_nginx(tmp_path, nodes: list[ServerProcess], disrupt, n: int, times: int, path: str,
                       check_in_flight: bool = True, ready=None, settle=None, paused=None) -> tuple[list[str], list]:
    """*nodes* (not started) behind nginx, a gwcore sender pushing *n* messages to *path*;
    ``disrupt(nodes, i)`` is called *times* times mid-stream, ``ready(nodes)`` (if given) once a
    leader is elected, before the sender starts, ``settle(nodes)`` once the sender is done, before
    the instances stop. ``paused(nodes)`` (if given) runs before each ``disrupt`` with the sender
    stopped (SIGSTOP), so what it does is in place before the rest of the transfer goes on: a
    disruption slower to take effect than the transfer is to finish still meets load. Nothing may
    end in the sender's error queue. Returns (ids, nginx answers)."""
    for node in nodes:
        node.start()
    proxy = Nginx(str(tmp_path / "nginx"), free_port(), [node.port for node in nodes], tries=0, repeat=2).start()
    url = f"http://127.0.0.1:{proxy.port}{path}"
    a_dir, a_port = str(tmp_path / "a" / "store"), free_port()
    ids = enqueue(a_dir, a_port, f"SiteB={url}", n)
    sender = ServerProcess(a_dir, a_port, GWCORE_ENDPOINT="SiteA", GWCORE_SITES=f"SiteB={url}",
                           GWCORE_RETRIES="100000", GWCORE_RETRY_DELAYS="0.05s", GWCORE_SEND_CONCURRENCY="12")
    rng = random.Random(str(tmp_path))
    try:
        wait_for(lambda: len(leaders(nodes)) == 1, 20, "a leader")
        if ready is not None:
            ready(nodes)
        sender.start()
        for i in range(times):
            floor = (i + 1) * n // (times + 2) + rng.randrange(n // 10)
            wait_for(lambda: n - counts(a_dir)["outgoing"] >= floor, 120, f"{floor} messages sent")
            if paused is not None:
                sender.proc.send_signal(signal.SIGSTOP)
            waiting = counts(a_dir)["outgoing"]
            if paused is not None:
                try:
                    paused(nodes)
                finally:
                    sender.proc.send_signal(signal.SIGCONT)
            disrupt(nodes, i)
            if check_in_flight:
                # (checked before: with ack=stored the rest can be through before a restart is)
                assert waiting > 0, "the disruption came after the transfer ended: it tests nothing"
        wait_for(lambda: counts(a_dir)["outgoing"] == 0, 180, "the sender's outgoing queue to drain")
        if settle is not None:
            settle(nodes)
    finally:
        for proc in (sender, *nodes):
            if alive(proc):
                assert proc.terminate() == 0
        proxy.stop()
    assert counts(a_dir)["outgoing_errors"] == 0
    assert gwcore_cli("inspect", "errors", data_dir=a_dir) == ""
    return ids, proxy.answers(path)


def run_under_load(tmp_path, endpoint: str, disrupt, n: int = N, times: int = 3, check_in_flight: bool = True,
                   ready=None, broker_url: str = AMQP_URL, paused=None, **env: str):
    """3 instances behind nginx, a gwcore sender pushing *n* messages (:func:`load_through_nginx`).
    *broker_url*: where the endpoint queue is read back from (the instances' broker is
    GWCORE_AMQP_URL in *env*, default the tests' broker). Returns (ids, messages in the endpoint
    queue, nginx answers, the instances' count of marked dispatches)."""
    # small batches (the sender batches to gwcore instances), 12 at once: 48 messages in flight, so
    # batches cross every disruption and the transfer lasts long enough for all of them
    env.setdefault("GWCORE_MAX_BATCH_MESSAGES", "4")
    nodes = [instance(tmp_path, endpoint, f"i{i}", **env) for i in range(3)]
    flagged = []

    def settle(nodes):
        for node in nodes:
            if not alive(node):
                node.start()
        # what a killed leader left in its outbox is dispatched once it runs again
        wait_for(lambda: all(counts(node.data_dir)["queue"] == 0 for node in nodes), 60, "every outbox to drain")
        flagged.append(sum(int(metric(node.port, "gwcore_possible_duplicates_total").split()[-1]) for node in nodes))

    ids, answers = load_through_nginx(tmp_path, nodes, disrupt, n, times, f"/{endpoint}/", check_in_flight, ready,
                                      settle, paused)
    return ids, drain(endpoint, url=broker_url), answers, flagged[0]


def check_queue(ids: list[str], got) -> tuple[int, int]:
    """Every id in the queue; an id there twice has at most one unmarked copy. Returns
    (duplicates, copies marked gwcore.PossibleDuplicate)."""
    copies = collections.defaultdict(list)
    for msg_id, headers, _body in got:
        copies[msg_id].append(headers.get("gwcore.PossibleDuplicate") == "true")
    assert set(copies) == set(ids), f"{len(set(ids) - set(copies))} missing, {len(set(copies) - set(ids))} unknown"
    for msg_id, marks in copies.items():
        assert marks.count(False) <= 1, f"{msg_id} is in the queue {len(marks)} times, {marks.count(False)} unmarked"
    return len(got) - len(copies), sum(sum(marks) for marks in copies.values())


def report(what: str, answers) -> None:
    by_status = collections.Counter(status for _t, status, _n in answers)
    gaps = takeover_gaps(answers)
    print(f"{what}: nginx answers {dict(sorted(by_status.items()))}; leader changes {len(gaps)}, "
          f"last 200 of the old to first 200 of the new: p50 {statistics.median(gaps) * 1000:.0f} ms, "
          f"max {max(gaps) * 1000:.0f} ms" if gaps else f"{what}: nginx answers {dict(by_status)}")
    return gaps


@pytest.mark.parametrize("ack", ["dispatched", "stored"])
def test_failover_under_load(tmp_path, endpoint, ack):
    def kill_leader(nodes, i):
        victim = leaders(nodes)
        assert len(victim) == 1
        victim[0].kill()
        time.sleep(0.3)
        victim[0].start()  # comes back as a standby; its outbox is dispatched (marked)

    ids, got, answers, flagged = run_under_load(tmp_path, endpoint, kill_leader, GWCORE_ACK=ack)
    duplicates, marked = check_queue(ids, got)
    print(f"ack={ack}: {len(got)} messages in the queue for {len(ids)} ids: {duplicates} duplicates, "
          f"{marked} copies marked PossibleDuplicate ({flagged} counted by the instances)")
    gaps = report(f"failover ack={ack}", answers)
    assert len(gaps) >= 3 and marked >= flagged  # a killed instance restarts its counters


def test_planned_handover_under_load(tmp_path, endpoint):
    def hand_over(nodes, i):
        leader = leaders(nodes)
        assert len(leader) == 1
        gwcore_cli("handover", "--wait", "30", data_dir=leader[0].data_dir)
        assert leader[0].proc.wait(5) == 0
        leader[0].start()

    ids, got, answers, flagged = run_under_load(tmp_path, endpoint, hand_over)
    duplicates, marked = check_queue(ids, got)
    gaps = report("handover", answers)
    failed = [status for _t, status, _n in answers if status != 200]
    print(f"handover: {len(failed)} failed requests, {duplicates} duplicates, {marked} marked")
    assert (failed, duplicates) == ([], 0)
    assert marked == flagged == 0  # the leader handed over with an empty outbox: nothing is in doubt
    assert len(gaps) >= 3


@pytest.mark.parametrize("ack", ["dispatched", "stored"])
def test_broker_restart_under_load(tmp_path, endpoint, ack):
    """The broker goes away mid-transfer and comes back. ``rabbitmqctl stop_app`` can take longer
    than the rest of a transfer, so the outage is made to meet load either way. With
    ack=dispatched the sender is held (SIGSTOP) until the broker has stopped, then goes on against
    it for a second: submits meet 503s and are sent again. With ack=stored the broker is stopped
    before the sender starts and comes back mid-transfer: the leader keeps accepting into its
    outbox while the broker is away."""
    def stop_broker(nodes=None):
        rabbitmqctl("stop_app")

    def start_broker(nodes=None, i=0):
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")

    def broker_back_after_a_second(nodes, i):
        try:
            time.sleep(1.0)
        finally:
            start_broker()

    dispatched = ack == "dispatched"
    try:
        ids, got, answers, flagged = run_under_load(
            tmp_path, endpoint, broker_back_after_a_second if dispatched else start_broker, n=6000, times=1,
            check_in_flight=dispatched, ready=None if dispatched else stop_broker,
            paused=stop_broker if dispatched else None, GWCORE_ACK=ack)
    finally:
        start_broker()  # whatever failed, the machine's broker runs again
    duplicates, marked = check_queue(ids, got)
    by_status = collections.Counter(status for _t, status, _n in answers)
    print(f"broker restart, ack={ack}: nginx answers {dict(sorted(by_status.items()))}; {duplicates} duplicates, "
          f"{marked} marked")
    assert marked >= flagged
    if dispatched:
        assert by_status[503] > 0, "no submit met the outage: it tests nothing"
    else:
        assert marked > 0, "nothing was accepted while the broker was away: it tests nothing"
