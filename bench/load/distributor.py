#!/usr/bin/env python3
"""Distributor mode against standalone mode, in the same run on the same cores.

Each round, in alternating order, a sender (gwcore site A, its store prefilled with ``--messages``
outgoing messages, about 20 headers and 1 KiB each) forwards to a receiving node B, and we count
how fast B's messages are *handled* (empty handlers):

``standalone``
    B is ``gwcore serve`` in standalone mode with an in-process empty handler
    (``GWCORE_HANDLER``, ``GWCORE_HANDLER_CONCURRENCY`` = the two workers' slots); A sends to B
    directly. Rate from ``gwcore_consumer_acked_total``.
``distributor``
    B is ``gwcore serve`` with ``GWCORE_MODE=distributor`` behind a real nginx (the
    docs/deployment.md configuration); A sends through nginx; two ``gwcore worker`` processes
    (capacity ``--capacity`` each, empty handlers) take the work through nginx. Rate from the
    sum of ``gwcore_worker_processed_total``.

B runs on ``--server-cpu``; A and nginx share ``--client-cpu``. The workers run on B's CPU, as
standalone's in-process handlers do: the receiving site's work is on the receiving site's core
in both kinds, and what distributor mode adds on the way (nginx) is on the other one;
``--workers-cpu 1`` puts them beside A and nginx instead (the layout before 2026-12-03). Each
process's CPU time per handled message is reported with the rate (``/proc/<pid>/stat``), and the
worker calls nginx carried. The rate is taken
between 10 % and 90 % of the messages handled; the ratio distributor ÷ standalone per round is
reported with its median and range. Results go to bench/results/ (gitignored).

With ``--scenario takeover`` the two kinds are instead a distributor node B without workers
``started active`` and one that ``took over``: started passive beside an active node on the same
data dir, which is then SIGKILLed. A sends to B directly; the rate is of accepted submits. A node
that took over must serve submits as fast as one started active (the same compiled path).

    .venv/bin/python bench/load/distributor.py                        # 5 rounds, 100,000 messages
    .venv/bin/python bench/load/distributor.py --rounds 1 --messages 10000   # smoke test
    .venv/bin/python bench/load/distributor.py --scenario takeover --rounds 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent / "tests"))
import run_load as rl  # noqa: E402
import site_to_site as s2s  # noqa: E402
from nginx import Nginx  # noqa: E402  (the tests' nginx runner: the documented configuration)

#: --handler -> the handler of bench/load/handlers.py both modes run
HANDLERS = {"sync": "handlers:noop", "async": "handlers:async_noop"}


def _env(extra: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in extra.items()]


def _node(cfg: argparse.Namespace, work: Path, label: str, env: dict[str, str]) -> rl.Server:
    node_cfg = argparse.Namespace(**vars(cfg))
    node_cfg.gwcore_env = _env(env)
    b = rl.Server("gwcore", node_cfg, work, work / f"b-{label}")
    b.env["PYTHONPATH"] = f"{HERE}{os.pathsep}{b.env.get('PYTHONPATH', '')}"
    return b


def _sender(cfg: argparse.Namespace, work: Path, template: Path, label: str, site_url: str) -> rl.Server:
    a_dir = work / f"a-{label}"
    a_dir.mkdir()
    shutil.copyfile(template / "data.mdb", a_dir / "data.mdb")
    a_cfg = argparse.Namespace(**vars(cfg))
    a_cfg.server_cpu = cfg.client_cpu
    a_cfg.gwcore_env = _env({"GWCORE_ENDPOINT": s2s.A_ENDPOINT, "GWCORE_SITES": f"{rl.ENDPOINT}={site_url}",
                             "GWCORE_SEND_CONCURRENCY": str(cfg.send_concurrency),
                             "GWCORE_RETRY_DELAYS": "0.2s", "GWCORE_RETRIES": "1000"})
    a = rl.Server("gwcore", a_cfg, work, a_dir)
    a.env["GWCORE_RECEIVE_CHANNELS"] = f"http://127.0.0.1:{a.port}/{s2s.A_ENDPOINT}/"
    return a


def _rate(samples: list[tuple[float, float]], n: int) -> float:
    lo = next(s for s in samples if s[1] >= 0.1 * n)
    hi = next(s for s in samples if s[1] >= 0.9 * n)
    return (hi[1] - lo[1]) / (hi[0] - lo[0])


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children that are alive (nginx's workers)."""
    total = 0.0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    return total


def _watch(b: rl.Server, n: int, timeout: float, counter,
           procs: dict[str, int] | None = None) -> list[tuple[float, float, dict[str, float]]]:
    """Samples of (time, messages handled, CPU seconds per process label) until ``n`` are handled."""
    samples: list[tuple[float, float, dict[str, float]]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = counter(b.metrics())
        samples.append((time.monotonic(), got, {k: _cpu_seconds(v) for k, v in (procs or {}).items()}))
        if got >= n:
            return samples
        time.sleep(0.05)
    raise RuntimeError(f"only {samples[-1][1] if samples else 0:.0f} of {n} messages handled within {timeout} s")


def _cpu_per_message(samples: list[tuple[float, float, dict[str, float]]], n: int) -> dict[str, float]:
    """CPU microseconds per handled message of each process, between 10 % and 90 % of ``n``."""
    lo = next(s for s in samples if s[1] >= 0.1 * n)
    hi = next(s for s in samples if s[1] >= 0.9 * n)
    return {k: round((hi[2][k] - lo[2][k]) / (hi[1] - lo[1]) * 1e6, 1) for k in hi[2]}


def run_standalone(cfg: argparse.Namespace, work: Path, template: Path, label: str) -> dict[str, Any]:
    # as many handlers at once as the two workers have slots
    b = _node(cfg, work, f"standalone-{label}", {"GWCORE_HANDLER": HANDLERS[cfg.handler],
                                                 "GWCORE_HANDLER_CONCURRENCY": str(2 * cfg.capacity)})
    b.start(cfg.ready_timeout)
    a = _sender(cfg, work, template, f"standalone-{label}", b.url)
    try:
        a.start(cfg.ready_timeout)
        samples = _watch(b, cfg.messages, cfg.timeout, lambda m: m.get("gwcore_consumer_acked_total", 0.0),
                         {"B": b.proc.pid, "A": a.proc.pid})
    finally:
        a.stop()
        b.stop()
    rate = _rate(samples, cfg.messages)
    cpu = _cpu_per_message(samples, cfg.messages)
    rl.log(f"  [{label}] standalone : {rate:>10,.0f} msg/s handled (A → B, in-process handler); CPU µs/msg {cpu}")
    return {"rps": rate, "cpu_us_per_msg": cpu}


def run_distributor(cfg: argparse.Namespace, work: Path, template: Path, label: str) -> dict[str, Any]:
    # the workers reach B through nginx, as in docs/deployment.md: signed, with a worker key
    secret = work / f"worker-{label}.secret"
    secret.write_text(os.urandom(24).hex())
    worker_port = rl.free_port()
    b = _node(cfg, work, f"distributor-{label}", {"GWCORE_MODE": "distributor",
                                                 "GWCORE_WORKER_KEYS": f"bench:{secret}",
                                                 "GWCORE_WORKER_LISTEN": f"127.0.0.1:{worker_port}"})
    b.start(cfg.ready_timeout)
    proxy = Nginx(str(work / f"nginx-{label.replace('/', 'of')}"), rl.free_port(), [b.port],
                  prefix=rl.pin(cfg.client_cpu), log_buffer="256k")
    workers: list[subprocess.Popen] = []
    a = None
    try:
        proxy.start()
        front = f"http://127.0.0.1:{proxy.port}"
        # the workers' URL: through nginx (as workers on other hosts), or B's own worker listener
        workers_url = front if cfg.workers_via == "nginx" else f"http://127.0.0.1:{worker_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GWCORE_")}
        env["PYTHONPATH"] = f"{HERE}{os.pathsep}{rl.REPO}"
        for i in range(2):
            workers.append(subprocess.Popen(
                rl.pin(cfg.workers_cpu or cfg.server_cpu) + [cfg.python, "-m", "gwcore", "worker", "--distributor", workers_url,
                                          "--capacity", str(cfg.capacity), "--handler", HANDLERS[cfg.handler],
                                          "--name", f"w{i}", "--key-id", "bench", "--secret-file", str(secret)],
                env=env, cwd=rl.REPO, stdout=subprocess.DEVNULL, stderr=open(work / f"worker{i}.log", "ab")))
        a = _sender(cfg, work, template, f"distributor-{label}", f"{front}{rl.CHANNEL_PATH}")
        a.start(cfg.ready_timeout)
        procs = {"B": b.proc.pid, "A": a.proc.pid, "nginx": proxy.proc.pid}
        procs.update({f"w{i}": w.pid for i, w in enumerate(workers)})
        samples = _watch(b, cfg.messages, cfg.timeout, lambda m: sum(
            v for k, v in m.items() if k.startswith("gwcore_worker_processed_total")), procs)
    finally:
        if a is not None:
            a.stop()
        for w in workers:
            w.terminate()
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
        proxy.stop()
        b.stop()
    rate = _rate(samples, cfg.messages)
    cpu = _cpu_per_message(samples, cfg.messages)
    error_log = Path(proxy.dir) / "error.log"
    spilled = error_log.read_text(errors="replace").count("to a temporary file") if error_log.exists() else 0
    if spilled:
        rl.log(f"  [{label}] nginx wrote {spilled} upstream answers to temporary files")
    calls: dict[str, int] = {}
    if cfg.workers_via == "nginx" and os.path.exists(proxy.access_log):
        with open(proxy.access_log) as f:
            for line in f:
                uri = line.rstrip("\n").rpartition("|")[2]
                kind = uri.split("/")[3] if uri.startswith("/.gwcore/worker/") else "submit"
                calls[kind] = calls.get(kind, 0) + 1
        rl.log(f"  [{label}] calls through nginx: {calls}")
    rl.log(f"  [{label}] distributor: {rate:>10,.0f} msg/s handled (A → nginx → B → 2 workers via {cfg.workers_via})"
           f"; CPU µs/msg {cpu}")
    return {"rps": rate, "cpu_us_per_msg": cpu, "calls": calls}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="mode",
                   help="mode: distributor against standalone (default); takeover: a node that took over "
                        "against one started active")
    p.add_argument("--handler", choices=sorted(HANDLERS), default="sync",
                   help="the empty handler both modes run: sync (in a thread, as a sync handler runs; the "
                        "default) or async (on the loop)")
    p.add_argument("--workers-via", choices=("nginx", "listener"), default="nginx",
                   help="how the workers reach B: through nginx (default, as workers on other hosts do) or "
                        "straight to its worker listener (signed all the same)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--capacity", type=int, default=64, help="capacity of each of the 2 workers (default 64)")
    p.add_argument("--send-concurrency", type=int, default=256, help="GWCORE_SEND_CONCURRENCY of A")
    p.add_argument("--client-cpu", default="1", help="CPU of A and nginx (default 1)")
    p.add_argument("--workers-cpu", default=None,
                   help="CPU of the workers (default: --server-cpu, where standalone runs its handlers)")
    s2s.add_common_options(p)
    return p


def _readyz(port: int) -> int:
    try:
        return rl.http_get(port, "/readyz")[0]
    except urllib.error.HTTPError as exc:
        return exc.code


def run_ingest(cfg: argparse.Namespace, work: Path, template: Path, label: str, *, takeover: bool) -> dict[str, Any]:
    """Sender A straight to a distributor node B with no workers; B started active, or (takeover)
    started passive beside an active holder of the same data dir that is then SIGKILLed, so B
    serves as a node that took over. Rate of messages B accepted (10-90 %)."""
    kind = "takeover" if takeover else "active"
    data = work / f"b-{kind}-{label}"
    env = {"GWCORE_MODE": "distributor", "GWCORE_WORKER_LISTEN": f"127.0.0.1:{rl.free_port()}"}
    holder = None
    if takeover:
        hcfg = argparse.Namespace(**vars(cfg))
        hcfg.gwcore_env = _env({**env, "GWCORE_WORKER_LISTEN": f"127.0.0.1:{rl.free_port()}"})
        holder = rl.Server("gwcore", hcfg, work, data)
        holder.start(cfg.ready_timeout)
    b = _node(cfg, work, f"{kind}-{label}", env)
    b.env["GWCORE_DATA_DIR"] = str(data)
    b.start(cfg.ready_timeout)
    a = None
    try:
        if holder is not None:
            assert _readyz(b.port) == 503, "B should be the passive node"
            holder.proc.kill()
            holder.proc.wait()
            deadline = time.monotonic() + cfg.ready_timeout
            while _readyz(b.port) != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("B did not take over")
                time.sleep(0.05)
        a = _sender(cfg, work, template, f"{kind}-{label}", b.url)
        a.start(cfg.ready_timeout)
        samples = _watch(b, cfg.messages, cfg.timeout, lambda m: m.get("gwcore_messages_accepted_total", 0.0))
    finally:
        if a is not None:
            a.stop()
        b.stop()
        if holder is not None:
            holder._log.close()
    rate = _rate(samples, cfg.messages)
    rl.log(f"  [{label}] {kind:<11}: {rate:>10,.0f} msg/s accepted (A → B, B {'took over' if takeover else 'started active'})")
    return {"rps": rate}


#: --scenario -> (first kind, second kind, how to run each, what the table compares)
SCENARIOS = {
    "mode": ("standalone", "distributor", {
        "standalone": run_standalone, "distributor": run_distributor}, "distributor ÷ standalone"),
    "takeover": ("active", "takeover", {
        "active": lambda *a: run_ingest(*a, takeover=False), "takeover": lambda *a: run_ingest(*a, takeover=True)},
        "took over ÷ started active"),
}


def main(argv: list[str] | None = None) -> int:
    cfg = build_parser().parse_args(argv)
    cfg.store_sync, cfg.commit_max_delay_us, cfg.gwcore_env = None, None, []
    base, other, runners, compared = SCENARIOS[cfg.scenario]
    started = dt.datetime.now(dt.timezone.utc)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gwcore-dist-", dir=cfg.work_dir))
    rounds = []
    try:
        template = work / "template"
        rl.log(f"building A's store with {cfg.messages:,} outgoing messages")
        s2s.build_template(template, cfg.messages, rl.make_body(cfg.body_size), f"http://127.0.0.1:1{rl.CHANNEL_PATH}")
        for i in range(cfg.rounds):
            label = f"{i + 1}/{cfg.rounds}"
            order = (base, other) if i % 2 == 0 else (other, base)
            res: dict[str, Any] = {"order": " → ".join(order)}
            for kind in order:
                res[kind] = runners[kind](cfg, work, template, label.replace("/", "of"))
            res["ratio"] = res[other]["rps"] / res[base]["rps"]
            rl.log(f"  [{label}] ratio {res['ratio']:.3f}")
            rounds.append(res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = [r["ratio"] for r in rounds]
    summary = {"scenario": cfg.scenario, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
               "ratio_max": max(ratios), f"{base}_median": statistics.median(r[base]["rps"] for r in rounds),
               f"{other}_median": statistics.median(r[other]["rps"] for r in rounds)}
    setup = (f"2 workers of capacity {cfg.capacity} (via {cfg.workers_via}, on CPU "
             f"{cfg.workers_cpu or cfg.server_cpu}); empty {cfg.handler} handlers; nginx on CPU {cfg.client_cpu}." if cfg.scenario == "mode" else
             "distributor mode, no workers: the rate of accepted submits.")
    lines = [
        f"Node B on CPU {cfg.server_cpu}; sender{' and nginx' if cfg.scenario == 'mode' else ''} on CPU "
        f"{cfg.client_cpu}; {cfg.rounds} rounds of {cfg.messages:,} messages ({cfg.body_size} bytes); {setup}",
        "",
        f"| | {base} msg/s | {other} msg/s | {compared} |",
        "|---|---:|---:|---|",
        f"| median (min–max) | {summary[f'{base}_median']:,.0f} | {summary[f'{other}_median']:,.0f} | "
        f"{summary['ratio_median']:.3f} ({summary['ratio_min']:.3f}–{summary['ratio_max']:.3f}) |",
        "",
        f"| round | order | {base} | {other} | ratio |",
        "|---:|---|---:|---:|---:|",
    ] + [f"| {i + 1} | {r['order']} | {r[base]['rps']:,.0f} | {r[other]['rps']:,.0f} | "
         f"{r['ratio']:.3f} |" for i, r in enumerate(rounds)]
    md = "\n".join(lines) + "\n"
    s2s.write_results(cfg, started, "distributor" if cfg.scenario == "mode" else "takeover", rounds, summary, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
