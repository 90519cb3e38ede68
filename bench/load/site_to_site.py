#!/usr/bin/env python3
"""Site-to-site throughput: gwcore site A forwarding its outgoing queue to gwcore site B, against B's
ingest rate from the wrk load driver, measured in the same run on the same cores.

Each round, in alternating order:

``ingest``
    a fresh site B (``gwcore serve``, pinned to ``--server-cpu``) takes unique NServiceBus submits
    from wrk (``nsb_submit.lua``, pinned to ``--wrk-cpu``, ``-c`` connections): B's req/s.
``site-to-site``
    a fresh site B on the same CPU, and a site A (pinned where wrk ran) whose store already holds
    ``--messages`` outgoing messages for B (about 20 headers and a 1 KiB body, like wrk's): A
    forwards them with ``GWCORE_SEND_CONCURRENCY`` requests in flight. The rate is read from B's
    ``gwcore_messages_accepted_total`` (polled every 50 ms) between 10 % and 90 % of the messages,
    so start-up and the tail do not count.

The ratio A→B rate ÷ B's ingest rate per round cancels most of what the machine adds; the report
gives its median and range. Results go to bench/results/ (gitignored).

Two more things each round can measure (issue 14, site to site at link speed):

``--rtt 0,10,50,150``
    the site-to-site run once per round-trip time, in ms: for an RTT above 0, A sends to B through
    ``bench/load/delay_proxy.py`` (its own process, pinned to ``--proxy-cpu``), which delays each
    direction's bytes by RTT/2 without limiting the bandwidth; 0 is A straight to B (through the
    proxy with no delay with ``--proxy-at-zero``). A row per RTT.
``--jetstream`` (on when ``nats-server`` and the jsbench client are there)
    a throwaway ``nats-server`` with JetStream (free port, store in the work dir, pinned to
    ``--server-cpu``) takes async publishes of unique 1 KiB messages from jsbench
    (/work/shared/tools/peers/jsbench, built into ``--jsbench`` if missing; pinned to
    ``--wrk-cpu``) for ``-d``: JetStream's msg/s, and A→B ÷ JetStream in the same round.

With either, the report also gives A's CPU per message between the 10 % and the 90 % sample
(utime + stime from /proc/<pid>/stat, over the messages B accepted in between), and the proxy's.
``bench/load/plot.py --rtt`` draws msg/s against the RTT from the results file.

    .venv/bin/python bench/load/site_to_site.py                    # 5 rounds, 150,000 messages
    .venv/bin/python bench/load/site_to_site.py --rounds 1 --messages 20000 -d 3s   # smoke test
    .venv/bin/python bench/load/site_to_site.py --rtt 0,10,50,150  # A→B per RTT, JetStream beside
    .venv/bin/python bench/load/site_to_site.py --rounds 1 --messages 5000 --rtt 0,50 -d 3s   # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plot as plot_py  # noqa: E402  (the pictures of the results files)
import run_load as rl  # noqa: E402  (the shared driver pieces: Server, run_wrk, pinning, metrics)

PROXY = rl.HERE / "delay_proxy.py"

A_ENDPOINT = "Headquarters"
HEADERS = {  # with what send_to_sites adds: 13 message headers, 19 wire headers + Content-MD5
    "NServiceBus.EnclosedMessageTypes": "Shared.UpdatePrice, Shared, Version=1.0.0.0, Culture=neutral, PublicKeyToken=null",
    "NServiceBus.ContentType": "application/json",
    "NServiceBus.ReplyToAddress": "Headquarters",
    "NServiceBus.OriginatingMachine": "HQ-SRV01",
    "NServiceBus.Version": "10.2.8",
}


def build_template(path: Path, n: int, body: bytes, b_url: str) -> None:
    """A's store holding n outgoing messages for site B (built once, copied into each round)."""
    sys.path.insert(0, str(rl.REPO))
    from gwcore import Gateway, Settings

    settings = Settings.from_env({}, data_dir=str(path), endpoint=A_ENDPOINT, sites=f"{rl.ENDPOINT}={b_url}",
                                 receive_channels=f"http://127.0.0.1:1/{A_ENDPOINT}/")

    async def main() -> None:
        gw = Gateway(settings)
        await gw.start(listen=False, forward=False)
        try:
            t0 = time.monotonic()
            for start in range(0, n, 1000):
                await asyncio.gather(*(gw.send_to_sites([rl.ENDPOINT], body, HEADERS)
                                       for _ in range(start, min(n, start + 1000))))
                if (start // 1000) % 25 == 0:
                    rl.log(f"  template: {start + 1000:,}/{n:,} ({time.monotonic() - t0:.0f} s)")
        finally:
            await gw.stop()

    asyncio.run(main())


def drop_stores(*dirs: Path) -> None:
    """A finished run's stores removed at once, not at the end of the benchmark: their page cache
    goes with them. Left in place, the runs' stores add up to gigabytes of cached pages, and on
    this virtual machine the pages a write takes once the page cache has grown past about 2 GB
    cost about five times the CPU (LMDB commits of 1,000 2 KiB values: 1.0 µs of CPU per value
    up to 1.9 GB cached, 5.5 µs from 2.1 GB on; docs/benchmarks.md): the later runs of a round,
    gwcore's or JetStream's, would pay for the earlier ones."""
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


#: The page cache above which the benchmark warns before it starts (drop_stores says why).
PAGE_CACHE_WARN = 1 << 30


def page_cache_bytes() -> int | None:
    """The page cache's size (``Cached`` in /proc/meminfo), or None where there is none to read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Cached:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_ingest(cfg: argparse.Namespace, work: Path, label: str) -> dict[str, Any]:
    b_dir = work / f"b-ingest-{label.replace('/', 'of')}"
    b = rl.Server("gwcore", cfg, work, b_dir)
    b.start(cfg.ready_timeout)
    try:
        if cfg.warmup and rl.parse_duration_s(cfg.warmup) > 0:
            rl.run_wrk(cfg, b.url, duration=cfg.warmup, connections=cfg.connections)
        res = rl.run_wrk(cfg, b.url, duration=cfg.duration, connections=cfg.connections)
    finally:
        b.stop()
        drop_stores(b_dir)
    rl.log(f"  [{label}] ingest      : {res['rps']:>10,.0f} msg/s into B (wrk c{cfg.connections})")
    return {"rps": res["rps"], "non_2xx": res.get("non_2xx", 0)}


class DelayProxy:
    """bench/load/delay_proxy.py in its own process, pinned: a link of ``rtt`` ms to ``target_port``."""

    def __init__(self, cfg: argparse.Namespace, work: Path, target_port: int, rtt: float) -> None:
        self.rtt = rtt
        self.log_path = work / f"proxy-{target_port}-rtt{rtt:g}.log"
        self.cmd = rl.pin(cfg.proxy_cpu) + [cfg.python, str(PROXY), "--target", f"127.0.0.1:{target_port}",
                                            "--rtt", f"{rtt:g}"] + (["--handshake"] if cfg.handshake else [])
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.stats: dict[str, Any] = {}

    def start(self, timeout: float) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=rl.REPO, stdout=subprocess.PIPE, stderr=self._log)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"delay proxy not ready after {timeout:g}s: {line!r} "
                               f"{self.log_path.read_text(errors='replace')[-2000:]}")
        self.port = int(line.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc is None or self._log.closed:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            rl.log(f"  warning: the delay proxy (pid {self.proc.pid}) ignored SIGTERM: killing it")
            self.proc.kill()
            out, _ = self.proc.communicate()
        self._log.close()
        for line in reversed(out.decode(errors="replace").splitlines()):
            if line.startswith("{"):
                self.stats = json.loads(line)
                break


def _in_flight(cfg: argparse.Namespace) -> str:
    return (f"GWCORE_SEND_CONCURRENCY={cfg.send_concurrency}" if cfg.send_concurrency
            else "its defaults (GWCORE_SEND_CONCURRENCY 8, the send window, batches)")


def _per_msg_us(cpu_lo: float | None, cpu_hi: float | None, msgs: float) -> float | None:
    if cpu_lo is None or cpu_hi is None or msgs <= 0:
        return None
    return 1e6 * (cpu_hi - cpu_lo) / msgs


def _profile(cfg: argparse.Namespace, pid: int, name: str) -> subprocess.Popen | None:
    """``--profile-b DIR``: sample site B for the transfer: py-spy (without stopping it; folded
    stacks into DIR/<name>.txt; on PATH or beside the interpreter) or, with ``--profiler perf``,
    perf record with call graphs (DIR/<name>.perf.data: native frames, the core's functions)."""
    if cfg.profile_b is None:
        return None
    cfg.profile_b.mkdir(parents=True, exist_ok=True)
    if cfg.profiler == "perf":
        out = cfg.profile_b / f"{name}.perf.data"
        cmd = ["perf", "record", "-F", "997", "-g", "-o", str(out), "-p", str(pid)]
    else:
        out = cfg.profile_b / f"{name}.txt"
        spy = shutil.which("py-spy") or str(Path(cfg.python).with_name("py-spy"))
        cmd = [spy, "record", "--nonblocking", "--rate", "250", "--format", "raw", "-o", str(out), "-p", str(pid)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rl.log(f"  {cfg.profiler} on B (pid {pid}) into {out}")
    return proc


def run_site_to_site(cfg: argparse.Namespace, work: Path, template: Path, label: str,
                     rtt: float = 0.0) -> dict[str, Any]:
    tag = label.replace("/", "of") + (f"-rtt{rtt:g}" if cfg.extended else "")
    b_dir = work / f"b-s2s-{tag}"
    b = rl.Server("gwcore", cfg, work, b_dir)
    b.start(cfg.ready_timeout)
    proxy = DelayProxy(cfg, work, b.port, rtt) if rtt > 0 or cfg.proxy_at_zero else None
    a_dir = work / f"a-{tag}"
    a_dir.mkdir()
    shutil.copyfile(template / "data.mdb", a_dir / "data.mdb")
    a_cfg = argparse.Namespace(**vars(cfg))
    a_cfg.server_cpu = cfg.wrk_cpu
    a = rl.Server("gwcore", a_cfg, work, a_dir)
    n = cfg.messages
    # (time, accepted by B, CPU seconds of A, of B, of the proxy)
    samples: list[tuple[float, float, float | None, float | None, float | None]] = []
    proxy_affinity: list[str] = []
    try:
        if proxy is not None:
            proxy.start(cfg.ready_timeout)
            proxy_affinity = rl.affinity(proxy.proc.pid)
        site_url = f"http://127.0.0.1:{proxy.port}{rl.CHANNEL_PATH}" if proxy is not None else b.url
        a.env.update(GWCORE_ENDPOINT=A_ENDPOINT, GWCORE_SITES=f"{rl.ENDPOINT}={site_url}",
                     GWCORE_RETRY_DELAYS="0.2s",
                     **({"GWCORE_SEND_CONCURRENCY": str(cfg.send_concurrency)} if cfg.send_concurrency else {}),
                     GWCORE_RETRIES="1000", GWCORE_RECEIVE_CHANNELS=f"http://127.0.0.1:{a.port}/{A_ENDPOINT}/")
        a.url = f"http://127.0.0.1:{a.port}/{A_ENDPOINT}/"
        a.start(cfg.ready_timeout)
        a_cpu0 = rl.process_cpu_s(a.proc.pid)
        spy = _profile(cfg, b.proc.pid, f"b-{tag}")
        deadline = time.monotonic() + cfg.timeout
        while time.monotonic() < deadline:
            got = b.metrics().get("gwcore_messages_accepted_total", 0.0)
            samples.append((time.monotonic(), got, rl.process_cpu_s(a.proc.pid), rl.process_cpu_s(b.proc.pid),
                            rl.process_cpu_s(proxy.proc.pid) if proxy is not None else None))
            if got >= n:
                break
            time.sleep(0.05)
        a_cpu = (rl.process_cpu_s(a.proc.pid) or 0) - (a_cpu0 or 0)
        left = a.metrics()
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits
            spy.wait(60)
    finally:
        a.stop()
        if proxy is not None:
            proxy.stop()
        b.stop()
        drop_stores(a_dir, b_dir)
    done = samples[-1][1] if samples else 0
    where = f"{label} RTT {rtt:g} ms" if cfg.extended else label
    if done < n:
        raise RuntimeError(f"[{where}] only {done:.0f} of {n} messages reached B within {cfg.timeout} s")
    lo = next(s for s in samples if s[1] >= 0.1 * n)
    hi = next(s for s in samples if s[1] >= 0.9 * n)
    rate = (hi[1] - lo[1]) / (hi[0] - lo[0])
    whole = samples[-1][0] - next(s for s in samples if s[1] > 0)[0]
    between = hi[1] - lo[1]
    window = {"a_cpu_us_per_msg_10_90": _per_msg_us(lo[2], hi[2], between),
              "b_cpu_us_per_msg_10_90": _per_msg_us(lo[3], hi[3], between),
              "proxy_cpu_us_per_msg_10_90": _per_msg_us(lo[4], hi[4], between)}
    line = (f"  [{where}] site-to-site: {rate:>10,.0f} msg/s A→B (10–90 %), all {n:,} in {whole:.1f} s; "
            f"A CPU {a_cpu / max(whole, 1e-9):.0%}, {1e6 * a_cpu / n:.1f} µs/msg")
    if cfg.extended:
        line += "; 10–90 %: " + ", ".join(f"{who} {window[f'{key}_cpu_us_per_msg_10_90']:.1f} µs/msg"
                                          for who, key in (("A", "a"), ("B", "b"), ("proxy", "proxy"))
                                          if window[f"{key}_cpu_us_per_msg_10_90"] is not None)
    rl.log(line)
    res = {"rps": rate, "seconds_all": whole, "a_cpu_us_per_msg": 1e6 * a_cpu / n,
           "a_retries": left.get("gwcore_outgoing_retries_total", 0.0)}
    if cfg.extended:
        res.update(rtt_ms=rtt, via_proxy=proxy is not None, messages_10_90=between,
                   seconds_10_90=hi[0] - lo[0], **window)
        if proxy is not None:
            res.update(proxy=proxy.stats, proxy_affinity=proxy_affinity)
            if proxy.stats.get("failed_connects"):
                rl.log(f"  [{where}] warning: the proxy could not reach B {proxy.stats['failed_connects']} times")
    return res


# -- the JetStream column ------------------------------------------------------------------------

def jsbench_ready(cfg: argparse.Namespace) -> str | None:
    """None when nats-server and the jsbench client are there (building jsbench if it can),
    otherwise why not."""
    if shutil.which(cfg.nats_server) is None:
        return f"{cfg.nats_server} not found (apt-get install nats-server)"
    return go_peer_ready(cfg.jsbench, cfg.jsbench_src, "golang-github-nats-io-go-nats-dev")


def go_peer_ready(binary: str, source: str, library: str) -> str | None:
    """None when the peer's native client *binary* is there (built from its Go *source* in
    ../shared/tools/peers/ if missing, with Debian's Go and *library*), otherwise why not."""
    name = Path(binary).name
    if Path(binary).is_file():
        return None
    src = Path(source)
    if not (src / "main.go").is_file():
        return f"{binary} is missing and there is no {name} source in {src}"
    if shutil.which("go") is None:
        return f"{binary} is missing and go is not installed (apt-get install -y golang-go {library})"
    rl.log(f"building {binary} from {src}")
    env = dict(os.environ, GOPATH="/usr/share/gocode", GO111MODULE="off")
    env.setdefault("GOCACHE", str(Path(tempfile.gettempdir()) / "gwcore-bench-gocache"))
    try:
        r = subprocess.run(["go", "build", "-o", str(Path(binary).resolve()), "."], cwd=src, env=env,
                           capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"building {name} failed: {exc}"
    if r.returncode != 0:
        return f"building {name} failed (is {library} installed?): {(r.stderr or r.stdout).strip()[-500:]}"
    return None


def run_jetstream(cfg: argparse.Namespace, work: Path, label: str) -> dict[str, Any]:
    """A throwaway nats-server with JetStream on a free port, jsbench against it, both pinned."""
    d = work / f"js-{label.replace('/', 'of')}"
    (d / "store").mkdir(parents=True)
    port, http_port = rl.free_port(), rl.free_port()
    (d / "js.conf").write_text(f'listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http_port}\n'
                               f'jetstream {{ store_dir: "{d / "store"}" }}\n')
    log = open(d / "nats-server.log", "wb")
    server = subprocess.Popen(rl.pin(cfg.server_cpu) + [cfg.nats_server, "-c", str(d / "js.conf")],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + cfg.ready_timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"nats-server exited with {server.returncode}: "
                                   f"{(d / 'nats-server.log').read_text(errors='replace')[-2000:]}")
            try:
                if rl.http_get(http_port, "/healthz?js-enabled=true", timeout=1.0)[0] == 200:
                    break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server not ready after {cfg.ready_timeout:g}s")
            time.sleep(0.05)
        server_affinity = rl.affinity(server.pid)

        def jsbench(seconds: float) -> tuple[dict[str, Any], list[str], float]:
            cmd = rl.pin(cfg.wrk_cpu) + [cfg.jsbench, "-url", f"nats://127.0.0.1:{port}", "-inflight",
                                         str(cfg.js_inflight), "-seconds", f"{seconds:g}", "-size", str(cfg.body_size)]
            cpu0 = rl.children_cpu_s()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(0.3)
            aff = rl.affinity(proc.pid)
            out, err = proc.communicate(timeout=seconds + 120)
            if proc.returncode != 0:
                raise RuntimeError(f"jsbench failed ({proc.returncode}): {err.strip() or out.strip()}")
            return json.loads(out.strip().splitlines()[-1]), aff, rl.children_cpu_s() - cpu0

        warmup = rl.parse_duration_s(cfg.warmup) if cfg.warmup else 0
        if warmup > 0:
            jsbench(warmup)
        cpu0 = rl.process_cpu_s(server.pid)
        res, client_affinity, client_cpu = jsbench(rl.parse_duration_s(cfg.duration))
        cpu1 = rl.process_cpu_s(server.pid)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        log.close()
        shutil.rmtree(d / "store", ignore_errors=True)      # up to a GiB per round
    out = {"rps": res["rps"], "published": res.get("published"), "stored": res.get("stored"),
           "errors": res.get("errors"), "seconds": res.get("seconds"), "inflight": cfg.js_inflight,
           "server_affinity": server_affinity, "client_affinity": client_affinity,
           "server_cpu_us_per_msg": _per_msg_us(cpu0, cpu1, res.get("published") or 0),
           "client_cpu_us_per_msg": _per_msg_us(0.0, client_cpu, res.get("published") or 0)}
    rl.log(f"  [{label}] jetstream   : {res['rps']:>10,.0f} msg/s into nats-server "
           f"(jsbench, {cfg.js_inflight} in flight; {res.get('stored', 0):,} stored, {res.get('errors', 0)} errors; "
           f"server {out['server_cpu_us_per_msg'] or 0:.1f} µs/msg)")
    if res.get("errors") or (res.get("stored") is not None and res["stored"] < (res.get("published") or 0)):
        rl.log(f"  [{label}] warning: jetstream had errors or stored fewer than published")
    return out


def parse_rtts(text: str) -> list[float]:
    try:
        rtts = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rtt takes milliseconds separated by commas, not {text!r}") from None
    if not rtts or any(r < 0 for r in rtts):
        raise argparse.ArgumentTypeError(f"--rtt: one or more round-trip times of 0 ms or more, not {text!r}")
    if len(set(rtts)) != len(rtts):
        raise argparse.ArgumentTypeError(f"--rtt: each round-trip time once, not {text!r}")
    return rtts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--messages", type=int, default=150_000, help="outgoing messages in A's store per round")
    p.add_argument("--send-concurrency", type=int, default=None,
                   help="GWCORE_SEND_CONCURRENCY of A (default: not set, A on its defaults)")
    p.add_argument("-c", "--connections", type=int, default=256, help="wrk -c of the ingest run (default 256)")
    p.add_argument("-d", "--duration", default="10s", help="wrk -d of the ingest run (default 10s)")
    p.add_argument("--warmup", default="1s")
    p.add_argument("--wrk-cpu", default="1", help="CPU of wrk, and of site A (default 1)")
    p.add_argument("--wrk", default="wrk")
    g = p.add_argument_group("link speed (issue 14)")
    g.add_argument("--rtt", type=parse_rtts, default=None, metavar="MS[,MS...]",
                   help="round-trip time(s) between A and B in ms, each run every round (default 0: A "
                        "straight to B, no proxy); above 0 through bench/load/delay_proxy.py")
    g.add_argument("--profile-b", type=Path, default=None, metavar="DIR",
                   help="sample site B during each transfer, into DIR (--profiler)")
    g.add_argument("--profiler", choices=("py-spy", "perf"), default="py-spy")
    g.add_argument("--proxy-cpu", default=None, help="CPU of the delay proxy (default: --server-cpu)")
    g.add_argument("--proxy-at-zero", action="store_true", help="RTT 0 also through the proxy (no delay)")
    g.add_argument("--handshake", action="store_true",
                   help="the proxy also delays a connection's first bytes by a TCP handshake's round trip")
    g.add_argument("--jetstream", action=argparse.BooleanOptionalAction, default=None,
                   help="a NATS JetStream run every round, with A→B ÷ JetStream (default: on when "
                        "nats-server and jsbench are there)")
    g.add_argument("--nats-server", default="nats-server")
    g.add_argument("--jsbench", default="/tmp/jsbench", help="the jsbench client (built here if missing)")
    g.add_argument("--jsbench-src", default=os.environ.get("JSBENCH_SRC", "/work/shared/tools/peers/jsbench"),
                   help="its Go source (default $JSBENCH_SRC or /work/shared/tools/peers/jsbench)")
    g.add_argument("--js-inflight", type=int, default=256, help="jsbench -inflight (default 256)")
    add_common_options(p)
    return p


def add_common_options(p: argparse.ArgumentParser) -> None:
    """Options this driver shares with bench/load/distributor.py."""
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a round's transfer may take")
    p.add_argument("--server-cpu", default="0", help="CPU of site B (default 0)")
    p.add_argument("--body-size", type=int, default=1024)
    p.add_argument("--python", default=str(rl.REPO / ".venv" / "bin" / "python"))
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.add_argument("--work-dir", type=Path, default=rl.REPO / "var")
    p.add_argument("--results-dir", type=Path, default=rl.RESULTS_DIR)


def write_results(cfg: argparse.Namespace, started: dt.datetime, stem: str, rounds: list, summary: dict,
                  md: str, plot: str = "ratios", keys: tuple[str, ...] = (), **extra: Any) -> Path:
    """bench/results/<stem>-<UTC time>.json, .md and .png (the *plot* kind of plot.py, of the
    rounds' *keys* for ``ratios``), and the Markdown on standard output. *extra*: more top-level
    fields of the JSON. Returns the JSON's path."""
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.results_dir / f"{stem}-{stamp}.json"
    path.write_text(json.dumps(
        {"started": started.isoformat(timespec="seconds"), "argv": sys.argv[1:], "rounds": rounds,
         "summary": summary, **extra}, indent=2, default=str) + "\n")
    (cfg.results_dir / f"{stem}-{stamp}.md").write_text(md)
    print(md)
    plot_py.write_plot(plot, path, keys, log=rl.log)
    return path


def wrk_setup(cfg: argparse.Namespace, prefix: str) -> tuple[dt.datetime, Path, bytes]:
    """What run_load's Server and run_wrk read, set on *cfg*; a work dir with the body file.
    Returns (start time, work dir, body)."""
    cfg.threads, cfg.wrk_timeout, cfg.store_sync, cfg.commit_max_delay_us, cfg.gwcore_env = 1, "10s", None, None, []
    cfg.think_dist = "exp"
    started = dt.datetime.now(dt.timezone.utc)
    cached = page_cache_bytes()
    if cached is not None and cached > PAGE_CACHE_WARN:
        rl.log(f"warning: the page cache holds {cached / (1 << 30):.1f} GiB before the benchmark starts "
               f"(leftover test stores?): on this machine a write's new pages cost several times the CPU "
               f"once it passes about 2 GB (see drop_stores); for comparable runs remove them, or "
               f"`sync; echo 1 > /proc/sys/vm/drop_caches`")
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=cfg.work_dir))
    body = rl.make_body(cfg.body_size)
    cfg.body_file = work / "body.bin"
    cfg.body_file.write_bytes(body)
    cfg.body_md5 = rl.content_md5(body)
    return started, work, body


def _mmm(values: list[float | None]) -> dict[str, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def _fmt_mmm(m: dict[str, float] | None, fmt: str) -> str:
    if m is None:
        return "–"
    return f"{m['median']:{fmt}} ({m['min']:{fmt}}–{m['max']:{fmt}})"


def _rtt_name(rtt: float) -> str:
    return f"s2s {rtt:g} ms"


def extended_report(cfg: argparse.Namespace, rounds: list, summary: dict) -> str:
    """The report with a row per RTT and, when measured, the JetStream column."""
    js = cfg.jetstream_on
    proxy = any(rtt > 0 or cfg.proxy_at_zero for rtt in cfg.rtts)
    where = [f"Site B on CPU {cfg.server_cpu}; wrk, then site A, on CPU {cfg.wrk_cpu}"]
    if proxy:
        where.append(f"delay proxy on CPU {cfg.proxy_cpu}{' (with a handshake RTT)' if cfg.handshake else ''}")
    if js:
        where.append(f"nats-server on CPU {cfg.server_cpu}, jsbench on CPU {cfg.wrk_cpu} "
                     f"({cfg.js_inflight} in flight, -d {cfg.duration})")
    lines = [
        "; ".join(where) + f"; {cfg.rounds} rounds, {cfg.messages:,} messages of {cfg.body_size} bytes, "
        f"A with {_in_flight(cfg)}, wrk c{cfg.connections}. Medians (min–max) over the "
        "rounds; ratios per round; CPU per message between the 10 % and 90 % samples.",
        "",
    ]
    if not js:
        lines += [f"JetStream: not measured ({cfg.jetstream_reason}).", ""]
    head = "| | msg/s | ÷ B ingest |" + (" ÷ JetStream |" if js else "") + " A CPU µs/msg |" + \
        (" proxy CPU µs/msg |" if proxy else "")
    lines += [head, "|---|---:|---|" + ("---|" if js else "") + "---:|" + ("---:|" if proxy else "")]
    dashes = " – |" * (2 + js + proxy)       # the ratio and CPU columns of the two reference rows
    lines.append(f"| B ingest (wrk c{cfg.connections}) | {_fmt_mmm(summary['ingest_rps'], ',.0f')} |{dashes}")
    if js:
        lines.append(f"| JetStream (jsbench) | {_fmt_mmm(summary['jetstream_rps'], ',.0f')} |{dashes}")
    for key, s in summary["by_rtt"].items():
        row = (f"| A→B, RTT {key} ms{' (direct)' if not s['via_proxy'] else ''} | {_fmt_mmm(s['s2s_rps'], ',.0f')} "
               f"| {_fmt_mmm(s['ratio'], '.3f')} |")
        if js:
            row += f" {_fmt_mmm(s['js_ratio'], '.3f')} |"
        row += f" {_fmt_mmm(s['a_cpu_us_per_msg_10_90'], '.1f')} |"
        if proxy:
            row += f" {_fmt_mmm(s['proxy_cpu_us_per_msg_10_90'], '.1f')} |"
        lines.append(row)
    lines += ["", "| round | order | RTT ms | A→B msg/s | ingest msg/s |" + (" JetStream msg/s |" if js else "")
              + " A→B ÷ ingest |" + (" A→B ÷ JetStream |" if js else "") + " A CPU µs/msg |",
              "|---:|---|---:|---:|---:|" + ("---:|" if js else "") + "---:|" + ("---:|" if js else "") + "---:|"]
    for i, r in enumerate(rounds):
        for key, s in r["s2s_by_rtt"].items():
            cpu = s.get("a_cpu_us_per_msg_10_90")
            row = f"| {i + 1} | {r['order']} | {key} | {s['rps']:,.0f} | {r['ingest']['rps']:,.0f} |"
            if js:
                row += f" {r['jetstream']['rps']:,.0f} |"
            row += f" {r['ratio_by_rtt'][key]:.3f} |"
            if js:
                row += f" {r['js_ratio_by_rtt'][key]:.3f} |"
            row += f" {'–' if cpu is None else f'{cpu:.1f}'} |"
            lines.append(row)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    cfg = build_parser().parse_args(argv)
    cfg.rtts = cfg.rtt or [0.0]
    if cfg.proxy_cpu is None:
        cfg.proxy_cpu = cfg.server_cpu
    if cfg.jetstream is False:
        cfg.jetstream_on, cfg.jetstream_reason = False, "--no-jetstream"
    else:
        reason = jsbench_ready(cfg)
        if reason and cfg.jetstream:
            raise SystemExit(f"--jetstream: {reason}")
        if reason:
            rl.log(f"no JetStream column: {reason} (--no-jetstream to skip this check)")
        cfg.jetstream_on, cfg.jetstream_reason = reason is None, reason
    # the report as before unless an RTT (even a single 0), JetStream or a profile was asked for
    cfg.extended = cfg.rtt is not None or cfg.proxy_at_zero or cfg.jetstream_on or cfg.profile_b is not None
    started, work, body = wrk_setup(cfg, "gwcore-s2s-")
    rounds = []
    try:
        template = work / "template"
        rl.log(f"building A's store with {cfg.messages:,} outgoing messages")
        build_template(template, cfg.messages, body, f"http://127.0.0.1:1{rl.CHANNEL_PATH}")
        kinds: list[tuple[str, float]] = [("ingest", 0.0)] + [("s2s", rtt) for rtt in cfg.rtts]
        if cfg.jetstream_on:
            kinds.append(("jetstream", 0.0))
        for i in range(cfg.rounds):
            label = f"{i + 1}/{cfg.rounds}"
            order = kinds if i % 2 == 0 else kinds[::-1]
            names = [_rtt_name(rtt) if kind == "s2s" and cfg.extended else kind for kind, rtt in order]
            res: dict[str, Any] = {"order": " → ".join(names)}
            by_rtt: dict[str, Any] = {}
            for kind, rtt in order:
                if kind == "ingest":
                    res["ingest"] = run_ingest(cfg, work, label)
                elif kind == "jetstream":
                    res["jetstream"] = run_jetstream(cfg, work, label)
                else:
                    by_rtt[f"{rtt:g}"] = run_site_to_site(cfg, work, template, label, rtt)
            keys = [f"{rtt:g}" for rtt in cfg.rtts]
            res["s2s"] = by_rtt[keys[0]]
            res["ratio"] = res["s2s"]["rps"] / res["ingest"]["rps"]
            if cfg.extended:
                res["s2s_by_rtt"] = {k: by_rtt[k] for k in keys}
                res["ratio_by_rtt"] = {k: by_rtt[k]["rps"] / res["ingest"]["rps"] for k in keys}
                if cfg.jetstream_on:
                    res["js_ratio_by_rtt"] = {k: by_rtt[k]["rps"] / res["jetstream"]["rps"] for k in keys}
                    res["js_ratio"] = res["js_ratio_by_rtt"][keys[0]]
                rl.log(f"  [{label}] ratio ÷ ingest " + ", ".join(
                    f"RTT {k} ms {v:.3f}" for k, v in res["ratio_by_rtt"].items())
                    + ("; ÷ JetStream " + ", ".join(f"RTT {k} ms {v:.3f}" for k, v in res["js_ratio_by_rtt"].items())
                       if cfg.jetstream_on else ""))
            else:
                rl.log(f"  [{label}] ratio {res['ratio']:.3f}")
            rounds.append(res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = [r["ratio"] for r in rounds]
    summary = {
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "s2s_rps_median": statistics.median(r["s2s"]["rps"] for r in rounds),
        "ingest_rps_median": statistics.median(r["ingest"]["rps"] for r in rounds),
        "a_cpu_us_per_msg_median": statistics.median(r["s2s"]["a_cpu_us_per_msg"] for r in rounds),
    }
    if cfg.extended:
        summary.update(
            rtts_ms=cfg.rtts, proxy_cpu=cfg.proxy_cpu, proxy_at_zero=cfg.proxy_at_zero, handshake=cfg.handshake,
            ingest_rps=_mmm([r["ingest"]["rps"] for r in rounds]),
            jetstream=({"nats_server": rl.run_text([cfg.nats_server, "--version"]), "jsbench": cfg.jsbench,
                        "inflight": cfg.js_inflight} if cfg.jetstream_on else {"skipped": cfg.jetstream_reason}),
            by_rtt={})
        if cfg.jetstream_on:
            summary["jetstream_rps"] = _mmm([r["jetstream"]["rps"] for r in rounds])
            summary["js_ratio_median"] = statistics.median(r["js_ratio"] for r in rounds)
        for rtt in cfg.rtts:
            k = f"{rtt:g}"
            runs = [r["s2s_by_rtt"][k] for r in rounds]
            summary["by_rtt"][k] = {
                "rtt_ms": rtt, "via_proxy": runs[0]["via_proxy"],
                "s2s_rps": _mmm([x["rps"] for x in runs]),
                "ratio": _mmm([r["ratio_by_rtt"][k] for r in rounds]),
                "js_ratio": _mmm([r["js_ratio_by_rtt"][k] for r in rounds]) if cfg.jetstream_on else None,
                "a_cpu_us_per_msg_10_90": _mmm([x["a_cpu_us_per_msg_10_90"] for x in runs]),
                "b_cpu_us_per_msg_10_90": _mmm([x["b_cpu_us_per_msg_10_90"] for x in runs]),
                "proxy_cpu_us_per_msg_10_90": _mmm([x["proxy_cpu_us_per_msg_10_90"] for x in runs]),
            }
        md = extended_report(cfg, rounds, summary)
        write_results(cfg, started, "s2s", rounds, summary, md, plot="rtt" if len(cfg.rtts) > 1 else "ratios")
        return 0
    lines = [
        f"Site B on CPU {cfg.server_cpu}; wrk, then site A, on CPU {cfg.wrk_cpu}; {cfg.rounds} rounds, "
        f"{cfg.messages:,} messages of {cfg.body_size} bytes, A with {_in_flight(cfg)}, "
        f"wrk c{cfg.connections}.",
        "",
        "| | B ingest (wrk) msg/s | A→B msg/s | A→B ÷ ingest | A CPU µs/msg |",
        "|---|---:|---:|---|---:|",
        f"| median (min–max) | {summary['ingest_rps_median']:,.0f} | {summary['s2s_rps_median']:,.0f} | "
        f"{summary['ratio_median']:.3f} ({summary['ratio_min']:.3f}–{summary['ratio_max']:.3f}) | "
        f"{summary['a_cpu_us_per_msg_median']:.1f} |",
        "",
        "| round | order | ingest msg/s | A→B msg/s | ratio |",
        "|---:|---|---:|---:|---:|",
    ] + [f"| {i + 1} | {r['order']} | {r['ingest']['rps']:,.0f} | {r['s2s']['rps']:,.0f} | {r['ratio']:.3f} |"
         for i, r in enumerate(rounds)]
    md = "\n".join(lines) + "\n"
    write_results(cfg, started, "s2s", rounds, summary, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
