#!/usr/bin/env python3
"""Load test: gwcore against two bare uvloop + httptools servers, driven by wrk.

Each round runs the strict bare server (``bench/load/bare_server.py --strict``: httptools'
complete-message callback only, the headline baseline), the parsing bare server (every header
through a Python callback, as gwcore's front end once did) and gwcore one after the other, the
order alternating between rounds, each pinned to one CPU with wrk pinned to another, with the same
NServiceBus-shaped requests (bench/load/nsb_submit.lua). The ratio gwcore/bare per round cancels
most of what the machine adds; the report gives its median and its range over the rounds.

Scenarios (``--scenarios``, comma-separated):

``unique``
    every request carries a new NServiceBus.Id: each one is a dedup insert + queue append + commit.
``dup``
    ``--dup-percent`` (default 20) of the requests resend a recently sent id (answered 200, not stored).
``half``
    latency at about half of gwcore's maximum: measures the maximum (or takes it from ``unique`` if
    that ran in this invocation), then offers ``--half-fraction`` of it with wrk's per-connection
    think time (``delay()``; exponentially distributed around ``--think-ms`` unless
    ``--think-dist fixed``), the connection count calibrated per server with short probe runs,
    and reports achieved req/s and p50/p90/p99 for both servers.

``-c 1,4,16,64,256`` runs ``unique`` and ``dup`` once per connection count (req/s and latency
against load; ``plot.py --load`` draws it). The run also measures the disk's 4 KiB fdatasync
time before and after (the single-connection latency is compared with it).

``--prefill N`` gives every gwcore run a store that already holds N dedup records (built once with
py-lmdb, copied into each fresh data dir); compare a run with ``--prefill 10000000`` against one
without to see what a big store costs.

Results: a JSON file and a Markdown table (also printed) in bench/results/ (gitignored).

    .venv/bin/python bench/load/run_load.py                      # make load: defaults below
    .venv/bin/python bench/load/run_load.py --scenarios unique --rounds 1 -d 3s   # smoke test
    .venv/bin/python bench/load/run_load.py --scenarios unique --prefill 10000000

Needs: wrk (classic, not wrk2), taskset, the venv with uvloop/httptools (and lmdb for --prefill).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import plot as plot_py  # noqa: E402  (the pictures of the results files)
LUA_SCRIPT = HERE / "nsb_submit.lua"
BARE_SERVER = HERE / "bare_server.py"
RESULTS_DIR = REPO / "bench" / "results"

ENDPOINT = "RemoteSite"          # GWCORE_ENDPOINT: also the dedup scope of every record
CHANNEL_PATH = f"/{ENDPOINT}/"
SCENARIOS = ("unique", "dup", "half")
#: the strict baseline (complete-message callback only), the parsing baseline, gwcore
SERVERS = ("strict", "bare", "gwcore")
#: the baseline gwcore's headline ratio is taken against, when it ran
HEADLINE = "strict"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- request body --------------------------------------------------------------------------------

def make_body(size: int) -> bytes:
    """A JSON-looking body of exactly ``size`` bytes (1024 = nsb_submit.lua's built-in body)."""
    if size < 14:
        raise ValueError("--body-size must be at least 14 bytes")
    return b'{"Payload":"' + b"x" * (size - 14) + b'"}'


def content_md5(body: bytes) -> str:
    """protocol.md §1.5: standard base64 of the MD5 digest (the Lua script URL-encodes it)."""
    return base64.b64encode(hashlib.md5(body).digest()).decode("ascii")


# -- wrk output ----------------------------------------------------------------------------------

_TIME_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME = r"([\d.]+)(us|ms|s|m|h)"


def _ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS_MS[unit]


def parse_duration_s(text: str) -> float:
    """wrk's duration syntax ("10s", "2m", "1h", bare number = seconds) in seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a wrk duration: {text!r} (use e.g. 10s, 2m)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """The numbers of one wrk --latency report (classic wrk 4.x text format).

    Latencies in ms. The ``NSB_RESULT`` line written by nsb_submit.lua's ``done()`` adds exact
    microsecond values, p99.9 and the error breakdown; the text report stays the primary source.
    """
    res: dict[str, Any] = {}
    m = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if not m:
        raise ValueError("no 'Requests/sec' line in wrk output")
    res["rps"] = float(m.group(1))
    m = re.search(r"^\s*(\d+) requests in " + _TIME, out, re.M)
    res["requests"] = int(m.group(1)) if m else None
    res["duration_s"] = _ms(m.group(2), m.group(3)) / 1e3 if m else None
    m = re.search(r"^\s+Latency\s+" + _TIME + r"\s+" + _TIME + r"\s+" + _TIME, out, re.M)
    if m:
        res["latency_avg_ms"] = _ms(m.group(1), m.group(2))
        res["latency_max_ms"] = _ms(m.group(5), m.group(6))
    for pct, value, unit in re.findall(r"^\s+(\d+)%\s+" + _TIME + r"\s*$", out, re.M):
        res[f"p{pct}_ms"] = _ms(value, unit)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()))) if m else \
        {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"^NSB_RESULT (.*)$", out, re.M)
    if m:
        exact = {k: float(v) for k, v in (kv.split("=", 1) for kv in m.group(1).split())}
        res["exact"] = exact
        if "p999_us" in exact:
            res["p99.9_ms"] = exact["p999_us"] / 1e3
    return res


# -- processes -----------------------------------------------------------------------------------

def run_text(cmd: list[str], **kw: Any) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, **kw).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def affinity(pid: int) -> list[str]:
    """CPU list of every thread of ``pid`` as taskset reports it (e.g. ["0", "0"])."""
    out = run_text(["taskset", "-a", "-c", "-p", str(pid)])
    return re.findall(r"current affinity list: (\S+)", out)


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a running process, all threads (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_set(cpulist: str) -> set[int]:
    """taskset's CPU list syntax ("0", "1,3", "0-2") as a set, to compare lists written differently."""
    cpus: set[int] = set()
    for part in cpulist.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def pin(cpu: str | None) -> list[str]:
    return ["taskset", "-c", cpu] if cpu else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.status, r.read().decode("utf-8", "replace")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {"name{labels}": value}, histogram buckets left out."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or "_bucket{" in line:
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


class Server:
    """One server process (bare or gwcore) on its own port, pinned, logging to a file."""

    def __init__(self, kind: str, cfg: argparse.Namespace, work: Path, data_dir: Path | None) -> None:
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{CHANNEL_PATH}"
        self.log_path = work / f"{kind}-{self.port}.log"
        # Inherit nothing GWCORE_*: gwcore refuses unknown ones and any other setting skews the run.
        env = {k: v for k, v in os.environ.items() if not k.startswith("GWCORE_")}
        if kind in ("bare", "strict"):
            cmd = [cfg.python, str(BARE_SERVER), "--port", str(self.port)] + (["--strict"] if kind == "strict" else [])
        else:
            cmd = [cfg.python, "-m", "gwcore", "serve"]
            env.update(GWCORE_DATA_DIR=str(data_dir), GWCORE_ENDPOINT=ENDPOINT,
                       GWCORE_RECEIVE_CHANNELS=f"http://127.0.0.1:{self.port}{CHANNEL_PATH}")
            # every load generator here is one peer (127.0.0.1) standing for many senders: the
            # per-address limits are the listener's, as behind a proxy (docs/security.md)
            env.update(GWCORE_HTTP_MAX_CONNECTIONS_PER_PEER="4096", GWCORE_HTTP_MAX_PARTS_PER_PEER="4096")
            if cfg.store_sync is not None:
                env["GWCORE_STORE_SYNC"] = cfg.store_sync
            if cfg.commit_max_delay_us is not None:
                env["GWCORE_COMMIT_MAX_DELAY_US"] = str(cfg.commit_max_delay_us)
            for item in cfg.gwcore_env:
                key, _, value = item.partition("=")
                env[key] = value
        self.cmd = pin(cfg.server_cpu) + cmd
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self, ready_timeout: float) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode} before it was ready:\n"
                                   + self.log_tail())
            try:
                if http_get(self.port, "/healthz", timeout=1.0)[0] == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.kind} not ready after {ready_timeout:g}s:\n" + self.log_tail())
            time.sleep(0.05)

    def metrics(self) -> dict[str, float]:
        if self.kind != "gwcore":
            return {}
        try:
            return parse_metrics(http_get(self.port, "/metrics", timeout=10.0)[1])
        except (OSError, urllib.error.URLError) as exc:
            log(f"  warning: GET /metrics failed: {exc}")
            return {}

    def stop(self) -> int | None:
        """SIGTERM (gwcore drains, then exits 0), SIGKILL only if it hangs."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                log(f"  warning: {self.kind} (pid {self.proc.pid}) ignored SIGTERM for 45 s: killing it")
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def run_wrk(cfg: argparse.Namespace, url: str, *, duration: str, connections: int,
            delay_ms: int = 0, dup_percent: float = 0.0) -> dict[str, Any]:
    """One wrk run with a fresh id prefix (so no run replays another's ids)."""
    threads = min(cfg.threads, connections)
    env = dict(os.environ, NSB_BODY_FILE=str(cfg.body_file), NSB_CONTENT_MD5=cfg.body_md5,
               NSB_RUN_PREFIX=secrets.token_hex(6), NSB_DUP_PERCENT=str(dup_percent),
               NSB_DELAY_MS=str(int(delay_ms)), NSB_THINK=cfg.think_dist)
    cmd = pin(cfg.wrk_cpu) + [cfg.wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}", "--latency",
                              f"--timeout={cfg.wrk_timeout}", "-s", str(LUA_SCRIPT), url]
    cpu0 = children_cpu_s()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # let taskset exec wrk and wrk start its threads, then check where they may run
    wrk_affinity = affinity(proc.pid)
    out, err = proc.communicate(timeout=parse_duration_s(duration) + 120)
    # taskset execs wrk, so the reaped child's rusage is wrk's (plus the tiny taskset -p above).
    wrk_cpu_s = children_cpu_s() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.strip() or out.strip()}")
    if err.strip():
        log(f"  wrk stderr: {err.strip()}")
    res = parse_wrk(out)
    res.update(connections=connections, threads=threads, delay_ms=int(delay_ms), dup_percent=dup_percent,
               wrk_affinity=wrk_affinity, wrk_cpu_s=wrk_cpu_s, wrk_output=out)
    return res


# -- prefill -------------------------------------------------------------------------------------

_U64 = struct.Struct(">Q")
LAYOUT = 2                        # gwcore/store.py SCHEMA_VERSION this prefill writes


def prefill_store(path: Path, n: int, *, batch: int = 1_000_000) -> None:
    """Write ``n`` dedup records for scope ``ENDPOINT`` straight into an LMDB environment.

    Layout as gwcore/store.py keeps it (schema 2): ``dedup_log`` maps u64 BE seq → u64 BE
    accepted_ms + dedup key (scope NUL id); ``meta`` holds the schema and the last seq, so
    gwcore's own sequence numbers start after these. Ids are random GUID-shaped strings (like real
    senders'). accepted_ms spreads evenly over the last six days, inside the default 7-day
    retention: nothing expires during the run.
    """
    import lmdb  # only this option needs it; the rest of the driver is standard library

    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=64 << 30, max_dbs=8, sync=False)
    try:
        log_db = env.open_db(b"dedup_log")
        meta = env.open_db(b"meta")
        prefix = ENDPOINT.encode() + b"\0"
        span_ms = 6 * 86400 * 1000
        start_ms = time.time_ns() // 1_000_000 - span_ms - 60_000
        pack = _U64.pack
        t0 = time.monotonic()
        seq = 0
        while seq < n:
            count = min(batch, n - seq)
            h = os.urandom(16 * count).hex()
            items = []
            for i in range(0, 32 * count, 32):
                seq += 1
                key = prefix + f"{h[i:i+8]}-{h[i+8:i+12]}-{h[i+12:i+16]}-{h[i+16:i+20]}-{h[i+20:i+32]}".encode()
                items.append((pack(seq), pack(start_ms + seq * span_ms // n) + key))
            with env.begin(write=True) as txn:
                txn.cursor(db=log_db).putmulti(items, append=True)
            log(f"  prefill: {seq:,}/{n:,} records ({time.monotonic() - t0:.0f} s)")
        with env.begin(write=True) as txn:
            txn.put(b"schema", str(LAYOUT).encode(), db=meta)
            txn.put(b"seq", pack(seq), db=meta)
        env.sync(True)
    finally:
        env.close()


class Prefill:
    """A store holding N records, built once; every gwcore run gets its own copy of it."""

    def __init__(self, n: int, work: Path, cache: Path | None) -> None:
        self.n = n
        self.dir = (cache or work) / f"prefill-v{LAYOUT}-{ENDPOINT}-{n}"
        stamp = self.dir / "COMPLETE"
        if stamp.exists():
            log(f"prefill: reusing {self.dir}")
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        log(f"prefill: writing {n:,} dedup records to {self.dir}")
        prefill_store(self.dir, n)
        stamp.write_text(f"{n}\n")

    def copy_to(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.dir / "data.mdb", data_dir / "data.mdb")  # lock.mdb is recreated


# -- one measured run ----------------------------------------------------------------------------

@dataclasses.dataclass
class Context:
    cfg: argparse.Namespace
    work: Path
    prefill: Prefill | None
    problems: list[str]                 # the run is invalid (exit status 1)
    notes: list[str]                    # worth a look, not invalidating


def measure(ctx: Context, kind: str, label: str, *, connections: int, delay_ms: int = 0,
            dup_percent: float = 0.0, duration: str | None = None, warmup: bool = True) -> dict[str, Any]:
    """Start ``kind`` on a fresh port (gwcore: fresh data dir), warm up, measure, stop."""
    cfg = ctx.cfg
    data_dir = None
    if kind == "gwcore":
        data_dir = Path(tempfile.mkdtemp(prefix="data-", dir=ctx.work))
        if ctx.prefill:
            t0 = time.monotonic()
            ctx.prefill.copy_to(data_dir)
            log(f"  {label} {kind}: copied the prefilled store ({time.monotonic() - t0:.1f} s)")
    server = Server(kind, cfg, ctx.work, data_dir)
    loadavg_before = os.getloadavg()
    server.start(cfg.ready_timeout)
    try:
        server_affinity = affinity(server.proc.pid)
        if cfg.warmup and warmup and parse_duration_s(cfg.warmup) > 0:
            run_wrk(cfg, server.url, duration=cfg.warmup, connections=connections,
                    delay_ms=delay_ms, dup_percent=dup_percent)
        before = server.metrics()
        cpu0 = process_cpu_s(server.proc.pid)
        res = run_wrk(cfg, server.url, duration=duration or cfg.duration, connections=connections,
                      delay_ms=delay_ms, dup_percent=dup_percent)
        cpu1 = process_cpu_s(server.proc.pid)
        after = server.metrics()
    finally:
        rc = server.stop()
    res.update(server=kind, port=server.port, server_affinity=server_affinity, server_exit=rc,
               loadavg_before=loadavg_before, data_dir=str(data_dir) if data_dir else None,
               server_cpu_s=cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None)
    # Share of one CPU each side used while measured: a pinned server far below 100% while wrk is
    # not saturated means it waited (fsync, or another process on its CPU); wrk near 100% means the
    # client may be the limit.
    for side in ("server", "wrk"):
        if res.get(f"{side}_cpu_s") is not None and res.get("duration_s"):
            res[f"{side}_cpu_util"] = res[f"{side}_cpu_s"] / res["duration_s"]
    if res.get("server_cpu_s") is not None and res.get("requests"):
        res["server_cpu_us_per_req"] = res["server_cpu_s"] * 1e6 / res["requests"]
    if after:
        res["metrics_after"] = after
        delta = {k: v - before.get(k, 0.0) for k, v in after.items() if k.endswith("_total") or "_total{" in k}
        res["metrics_delta"] = delta
        accepted = delta.get("gwcore_messages_accepted_total", 0.0)
        duplicates = delta.get("gwcore_messages_duplicate_total", 0.0)
        res["accepted"], res["duplicates"] = accepted, duplicates
        if accepted + duplicates:
            res["duplicate_share"] = duplicates / (accepted + duplicates)
    _check(ctx, kind, label, res)
    if data_dir is not None and not cfg.keep_data:
        shutil.rmtree(data_dir, ignore_errors=True)
    log(f"  {label} {kind:6}: {res['rps']:>10,.0f} req/s  p50 {fmt_ms(res.get('p50_ms'))}"
        f"  p99 {fmt_ms(res.get('p99_ms'))}  non-2xx {res['non_2xx']}"
        f"  cpu server {res.get('server_cpu_util', 0):.0%} wrk {res.get('wrk_cpu_util', 0):.0%}"
        + (f"  (c{connections}, think {delay_ms} ms)" if delay_ms else ""))
    return res


def _check(ctx: Context, kind: str, label: str, res: dict[str, Any]) -> None:
    """Record what makes a run invalid; gwcore must answer every request with a 2xx."""
    cfg, problems = ctx.cfg, ctx.problems
    errors = {k: v for k, v in res["socket_errors"].items() if v}
    if kind == "gwcore" and res["non_2xx"]:
        problems.append(f"{label} gwcore: {res['non_2xx']} non-2xx responses")
    if errors:
        problems.append(f"{label} {kind}: socket errors {errors}")
    if cfg.server_cpu and any(cpu_set(a) != cpu_set(cfg.server_cpu) for a in res["server_affinity"]):
        problems.append(f"{label} {kind}: server threads not pinned to CPU {cfg.server_cpu}: {res['server_affinity']}")
    if cfg.wrk_cpu and (not res["wrk_affinity"] or
                        any(cpu_set(a) != cpu_set(cfg.wrk_cpu) for a in res["wrk_affinity"])):
        problems.append(f"{label} {kind}: wrk not seen pinned to CPU {cfg.wrk_cpu}: {res['wrk_affinity']}")
    if res["server_exit"] not in (0, None):
        problems.append(f"{label} {kind}: server exited with {res['server_exit']} (log: {ctx.work})")
    if kind == "gwcore" and not res["dup_percent"] and res.get("duplicates"):
        problems.append(f"{label} gwcore: {res['duplicates']:.0f} duplicates with unique ids (id generation broken?)")
    # wrk can use at most min(threads, CPUs it is pinned to) CPUs.
    wrk_cpus = min(res["threads"], len(cpu_set(cfg.wrk_cpu))) if cfg.wrk_cpu else res["threads"]
    if (res.get("wrk_cpu_util") or 0) > 0.9 * wrk_cpus:
        ctx.notes.append(f"{label} {kind}: wrk used {res['wrk_cpu_util']:.0%} of a CPU: the client may be the limit")
    after = res.get("metrics_after", {})
    if kind == "gwcore" and ctx.prefill and after.get("gwcore_dedup_records", ctx.prefill.n) < ctx.prefill.n:
        problems.append(f"{label} gwcore: the store reports {after['gwcore_dedup_records']:.0f} dedup records, "
                        f"fewer than the {ctx.prefill.n} prefilled (layout mismatch?)")


# -- scenarios -----------------------------------------------------------------------------------

def run_rounds(ctx: Context, name: str, params: dict[str, Any],
               per_server: dict[str, dict[str, Any]] | None = None, **kw: Any) -> dict[str, Any]:
    """``cfg.rounds`` rounds of each server; ``per_server`` overrides measure() arguments per kind."""
    cfg = ctx.cfg
    rounds = []
    for r in range(cfg.rounds):
        # Alternate which server goes first, so drift (heat, other load) does not favour one.
        order = [s for s in (SERVERS if r % 2 == 0 else SERVERS[::-1]) if s in cfg.servers]
        row: dict[str, Any] = {"round": r + 1, "order": order}
        for kind in order:
            row[kind] = measure(ctx, kind, f"[{name} {r + 1}/{cfg.rounds}]",
                                **{**kw, **(per_server or {}).get(kind, {})})
        for base, key in (("bare", "ratio"), ("strict", "ratio_strict")):
            if base in row and "gwcore" in row and row[base]["rps"] > 0:
                row[key] = row["gwcore"]["rps"] / row[base]["rps"]
        rounds.append(row)
    return {"name": name, "params": params, "rounds": rounds, "summary": summarize(rounds)}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("ratio", "ratio_strict"):
        ratios = [r[key] for r in rounds if key in r]
        if ratios:
            out[f"{key}_median"] = statistics.median(ratios)
            out[f"{key}_min"] = min(ratios)
            out[f"{key}_max"] = max(ratios)
    for kind in SERVERS:
        runs = [r[kind] for r in rounds if kind in r]
        if not runs:
            continue
        s: dict[str, Any] = {"rps_median": statistics.median(x["rps"] for x in runs),
                             "rps_min": min(x["rps"] for x in runs), "rps_max": max(x["rps"] for x in runs),
                             "non_2xx": sum(x["non_2xx"] for x in runs)}
        for p in ("p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "server_cpu_us_per_req"):
            vals = [x[p] for x in runs if x.get(p) is not None]
            if vals:
                s[f"{p}_median"] = statistics.median(vals)
        out[kind] = s
    return out


def subject(cfg: argparse.Namespace) -> str:
    """The server whose maximum the half-rate scenario halves: gwcore unless only bare is run."""
    return "gwcore" if "gwcore" in cfg.servers else "bare"


def scenario_half(ctx: Context, max_rps: float | None) -> dict[str, Any]:
    """Both servers at about the same offered rate, ``--half-fraction`` of gwcore's maximum.

    wrk's delay() makes each connection a closed loop: rate = c*1000/(think + latency). The same
    (c, think) would offer the faster server more, so each server gets its own connection count.
    """
    cfg = ctx.cfg
    who = subject(cfg)
    if cfg.max_rps:
        max_rps, source = cfg.max_rps, "--max-rps"
    elif max_rps:
        source = "median of the unique scenario"
    else:
        log(f"[half] measuring {who}'s maximum (unique ids, c{cfg.connections})")
        max_rps, source = measure(ctx, who, "[half max]", connections=cfg.connections)["rps"], "own max run"
    target = max_rps * cfg.half_fraction
    think = cfg.think_ms
    conns: dict[str, int] = {}
    probes: dict[str, list] = {}
    for kind in cfg.servers:
        conns[kind], probes[kind] = calibrate(ctx, kind, target, think)
        if conns[kind] >= cfg.max_connections:
            ctx.problems.append(f"[half] {kind} needed more than --max-connections={cfg.max_connections}: "
                                "lower --think-ms or raise the cap")
    params = {"max_rps": max_rps, "max_rps_source": source, "fraction": cfg.half_fraction,
              "target_rps": target, "think_ms": think, "think_dist": cfg.think_dist,
              "connections": conns, "probes": probes}
    log(f"[half] offering ~{target:,.0f} req/s, think {think} ms: "
        + ", ".join(f"{k} c{c}" for k, c in conns.items()))
    return run_rounds(ctx, "half", params, per_server={k: {"connections": c} for k, c in conns.items()},
                      delay_ms=think)


def calibrate(ctx: Context, kind: str, target: float, think: int) -> tuple[int, list[dict[str, Any]]]:
    """The connection count at which ``kind`` achieves about ``target`` req/s with ``think`` ms.

    Short probe runs on one server process. The first guess assumes 1 ms of latency; then secant
    steps on (connections → achieved rate), since latency itself grows with the load.
    """
    cfg = ctx.cfg
    conns = _clamp_conns(cfg, round(target * (think + 1.0) / 1000))
    probes: list[dict[str, Any]] = []
    data_dir = Path(tempfile.mkdtemp(prefix="data-", dir=ctx.work)) if kind == "gwcore" else None
    if data_dir is not None and ctx.prefill:
        ctx.prefill.copy_to(data_dir)
    server = Server(kind, cfg, ctx.work, data_dir)
    server.start(cfg.ready_timeout)
    try:
        if parse_duration_s(cfg.warmup) > 0:
            run_wrk(cfg, server.url, duration=cfg.warmup, connections=conns, delay_ms=think)
        for _ in range(cfg.calibration_runs):
            res = run_wrk(cfg, server.url, duration=cfg.calibration_duration, connections=conns, delay_ms=think)
            rate = res["rps"]
            probes.append({"connections": conns, "rps": rate, "p50_ms": res.get("p50_ms")})
            log(f"[half] {kind} probe c{conns}: {rate:,.0f} req/s (target {target:,.0f})")
            if rate <= 0 or abs(rate - target) <= 0.05 * target:
                break
            if len(probes) >= 2 and rate != probes[-2]["rps"] and \
                    (slope := (rate - probes[-2]["rps"]) / (conns - probes[-2]["connections"])) > 0:
                new = conns + (target - rate) / slope
            else:
                new = conns * target / rate
            new = _clamp_conns(cfg, round(new))
            if new == conns:
                break
            conns = new
    finally:
        server.stop()
        if data_dir is not None and not cfg.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
    return conns, probes


def _clamp_conns(cfg: argparse.Namespace, n: int) -> int:
    return max(cfg.threads, min(cfg.max_connections, n))


# -- environment and report ----------------------------------------------------------------------

def fdatasync_probe(directory: Path, n: int = 300, size: int = 4096) -> dict[str, Any]:
    """What one durable commit costs this disk at least: ``n`` times, write ``size`` bytes at the
    end of a file in *directory* and fdatasync it. p50/p90/max in ms (the single-connection latency
    target of docs/benchmarks.md is a multiple of this p50). ``in_place``: the same into blocks
    written (and synced) before, so that the sync carries no file-system metadata, as gwcore's
    commits into the store's zeroed tail (gwcore/tail.py)."""
    path = directory / "fdatasync-probe"
    block = os.urandom(size)

    def summary(times: list[float]) -> dict[str, float]:
        times.sort()
        return {"p50_ms": times[n // 2], "p90_ms": times[n * 9 // 10], "max_ms": times[-1]}

    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            os.write(fd, block)
            os.fdatasync(fd)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(fd)
    in_place = []
    fd = os.open(path, os.O_WRONLY)
    try:
        for i in range(n):
            t0 = time.perf_counter()
            os.pwrite(fd, block, i * size)
            os.fdatasync(fd)
            in_place.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    out: dict[str, Any] = {**summary(times), "n": n, "bytes": size, "in_place": summary(in_place)}
    log(f"  fdatasync of {size} bytes: p50 {fmt_ms(out['p50_ms'])}, p90 {fmt_ms(out['p90_ms'])} at the end "
        f"of a file; p50 {fmt_ms(out['in_place']['p50_ms'])} in place")
    return out


def environment(cfg: argparse.Namespace, work: Path) -> dict[str, Any]:
    lscpu = run_text(["lscpu"], env=dict(os.environ, LC_ALL="C"))
    field = lambda name: (re.search(rf"^{name}:\s+(.+)$", lscpu, re.M) or [None, None])[1]  # noqa: E731
    versions_code = (
        "import json, sys, importlib.metadata as m\n"
        "v = {'python': sys.version.split()[0]}\n"
        "for p in ('uvloop', 'httptools', 'lmdb', 'orjson', 'Cython'):\n"
        "    try: v[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: v[p] = None\n"
        "try:\n"
        "    import gwcore; v['gwcore_debug_build'] = bool(gwcore.DEBUG_BUILD)\n"
        "except Exception as exc: v['gwcore_import_error'] = repr(exc)\n"
        "print(json.dumps(v))\n")
    try:
        versions = json.loads(run_text([cfg.python, "-c", versions_code], cwd=REPO) or "{}")
    except json.JSONDecodeError:
        versions = {}
    version_py = (REPO / "gwcore" / "_version.py")
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", version_py.read_text()) if version_py.exists() else None
    versions["gwcore"] = m.group(1) if m else None
    # wrk -v prints its banner and usage and exits 1; the first line names the version.
    wrk_v = subprocess.run([cfg.wrk, "-v"], capture_output=True, text=True)
    versions["wrk"] = ((wrk_v.stdout or wrk_v.stderr).splitlines() or [""])[0].strip()
    commit = run_text(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = bool(run_text(["git", "-C", str(REPO), "status", "--porcelain"]))
    return {
        "cpu_model": field("Model name"),
        "cpus": field(r"CPU\(s\)"),
        "hypervisor": field("Hypervisor vendor"),
        "lscpu": lscpu,
        "kernel": platform.release(),
        "hostname": platform.node(),
        "versions": versions,
        "git_commit": (commit or "no commit") + ("+dirty" if dirty else ""),
        "data_fs": run_text(["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", "-T", str(work)]),
        "server_python": cfg.python,
    }


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v * 1000:.0f} µs" if v < 1 else f"{v:.2f} ms" if v < 10 else f"{v:.1f} ms"


def fmt_rps(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


_SCENARIO_TITLES = {"unique": "unique ids", "dup": "{dup}% duplicate ids", "half": "half rate"}


def _load_text(sc: dict[str, Any]) -> str:
    p = sc["params"]
    if sc["name"] != "half":
        return f"c{p['connections']}"
    conns = ", ".join(f"{k} c{c}" for k, c in p["connections"].items())
    return (f"think {p.get('think_dist', 'fixed')} {p['think_ms']} ms, ≈{fmt_rps(p['target_rps'])}/s offered "
            f"({p['fraction']:.0%} of {fmt_rps(p['max_rps'])}); {conns}")


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.0%}"


def markdown(report: dict[str, Any]) -> str:
    """The summary table (paste into docs/benchmarks.md), then the per-round detail."""
    cfg, envd = report["config"], report["environment"]
    v = envd["versions"]
    store = f"{cfg['prefill']:,} records" if cfg["prefill"] else "empty"
    fs = envd["data_fs"].split()[0] if envd["data_fs"] else "?"
    lines = [
        f"<!-- bench/load/run_load.py, {report['started']}, {report['json']} -->",
        f"{envd['cpu_model']} ({envd['cpus']} CPUs{', ' + envd['hypervisor'] if envd['hypervisor'] else ''}), "
        f"Linux {envd['kernel']}, data dir on {fs}; Python {v.get('python')}, uvloop {v.get('uvloop')}, "
        f"httptools {v.get('httptools')}, lmdb {v.get('lmdb')}; {v.get('wrk')}; "
        f"gwcore {v.get('gwcore')} ({envd['git_commit']}).",
        "",
        f"Servers on CPU {cfg['server_cpu'] or 'any'}, wrk on CPU {cfg['wrk_cpu'] or 'any'} "
        f"(-t{cfg['threads']} -d{cfg['duration']} after a {cfg['warmup']} warm-up), {cfg['rounds']} rounds in "
        f"alternating order, {cfg['body_size']}-byte body, gwcore store sync "
        f"{'on (default)' if cfg['store_sync'] in (None, '1') else 'OFF'}"
        f"{', commit max delay ' + str(cfg['commit_max_delay_us']) + ' µs' if cfg['commit_max_delay_us'] is not None else ''}. "
        "Medians over the rounds; ratio = gwcore req/s ÷ the baseline's req/s of the same round: "
        "strict = bare_server.py --strict (the complete-message callback only; the headline), "
        "bare = bare_server.py (every header through a Python callback).",
        "",
        "| Scenario | Store | Load | strict req/s | bare req/s | gwcore req/s | gwcore/strict median (min–max) "
        "| gwcore/bare median (min–max) | gwcore p50 / p90 / p99 | strict p50 / p90 / p99 "
        "| server CPU µs/req strict / bare / gwcore | gwcore non-2xx |",
        "|---|---|---|---:|---:|---:|---|---|---|---|---|---:|",
    ]
    fsync = report.get("fdatasync") or {}
    if fsync:
        lines[2:2] = [f"4 KiB write + fdatasync on the data dir's disk, same run, p50 at the end of a file "
                      "(in place, into blocks written before): "
                      + ", ".join(f"{fmt_ms(v['p50_ms'])} ({fmt_ms(v.get('in_place', {}).get('p50_ms'))}) {k}"
                                  for k, v in fsync.items()) + ".", ""]
    for sc in report["scenarios"]:
        s = sc["summary"]
        b, g, st = s.get("bare", {}), s.get("gwcore", {}), s.get("strict", {})
        title = _SCENARIO_TITLES[sc["name"]].format(dup=f"{sc['params'].get('dup_percent', 0):g}")
        ratio = lambda key: (f"{s[key + '_median']:.3f} ({s[key + '_min']:.3f}–{s[key + '_max']:.3f})"  # noqa: E731
                             if key + "_median" in s else "–")
        lat = lambda x: " / ".join(fmt_ms(x.get(f"{p}_ms_median")) for p in ("p50", "p90", "p99"))  # noqa: E731
        cpu = lambda x: "–" if x.get("server_cpu_us_per_req_median") is None \
            else f"{x['server_cpu_us_per_req_median']:.1f}"  # noqa: E731
        lines.append(
            f"| {title} | {store} | {_load_text(sc)} | {fmt_rps(st.get('rps_median'))} | {fmt_rps(b.get('rps_median'))} "
            f"| {fmt_rps(g.get('rps_median'))} | {ratio('ratio_strict')} | {ratio('ratio')} | {lat(g)} | {lat(st)} "
            f"| {cpu(st)} / {cpu(b)} / {cpu(g)} | {g.get('non_2xx', '–')} |")
    lines += ["", "<details><summary>Per round</summary>", "",
              "| Scenario | Load | Round | Order | strict req/s | bare req/s | gwcore req/s | ÷ strict | ÷ bare "
              "| gwcore p50 / p99 | strict p50 / p99 | CPU use server (strict / bare / gwcore) "
              "| CPU use wrk (strict / bare / gwcore) |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---|---|---|---|"]
    for sc in report["scenarios"]:
        for r in sc["rounds"]:
            b, g, st = r.get("bare", {}), r.get("gwcore", {}), r.get("strict", {})
            ratio = lambda key: f"{r[key]:.3f}" if key in r else "–"  # noqa: E731
            use = lambda side: " / ".join(_pct(x.get(f"{side}_cpu_util")) for x in (st, b, g))  # noqa: E731
            lines.append(
                f"| {sc['name']} | {_load_text(sc)} | {r['round']} | {' → '.join(r['order'])} "
                f"| {fmt_rps(st.get('rps'))} | {fmt_rps(b.get('rps'))} "
                f"| {fmt_rps(g.get('rps'))} | {ratio('ratio_strict')} | {ratio('ratio')} "
                f"| {fmt_ms(g.get('p50_ms'))} / {fmt_ms(g.get('p99_ms'))} "
                f"| {fmt_ms(st.get('p50_ms'))} / {fmt_ms(st.get('p99_ms'))} | {use('server')} | {use('wrk')} |")
    lines += ["", "</details>"]
    if report["problems"]:
        lines += ["", "**Problems (the run is not valid):**", ""] + [f"- {p}" for p in report["problems"]]
    if report["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    default_python = REPO / ".venv" / "bin" / "python"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See docs/benchmarks.md for the method.")
    p.add_argument("--scenarios", default="unique,dup,half",
                   help=f"comma-separated, from {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--servers", default="strict,bare,gwcore",
                   help="which servers to run (default: all three; 'bare' alone smoke-tests the driver)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("-d", "--duration", default="10s", help="wrk -d of each measured run (default 10s)")
    p.add_argument("--warmup", default="1s", help="wrk run before each measured run, 0 = none (default 1s)")
    p.add_argument("-t", "--threads", type=int, default=1, help="wrk -t (default 1)")
    p.add_argument("-c", "--connections", default="64",
                   help="wrk -c for unique/dup, or a comma-separated sweep such as 1,4,16,64,256: one "
                        "scenario row per count (default 64; the half scenario's maximum uses the largest)")
    p.add_argument("--wrk-timeout", default="10s", help="wrk --timeout (default 10s)")
    p.add_argument("--server-cpu", default="0", help="CPU list for the servers (taskset -c; default 0)")
    p.add_argument("--wrk-cpu", default="1", help="CPU list for wrk (default 1)")
    p.add_argument("--no-pin", action="store_true", help="do not use taskset at all")
    p.add_argument("--dup-percent", type=float, default=20.0, help="dup scenario: share of resent ids (default 20)")
    p.add_argument("--half-fraction", type=float, default=0.5, help="half scenario: share of max offered (default 0.5)")
    p.add_argument("--think-ms", type=int, default=10, help="half scenario: mean wrk delay() per request, whole ms (default 10)")
    p.add_argument("--think-dist", choices=("exp", "fixed"), default="exp",
                   help="half scenario: think times drawn from an exponential distribution (Poisson-like "
                        "arrivals, default) or all equal (lock-step bursts after each group commit)")
    p.add_argument("--max-rps", type=float, help="half scenario: use this maximum instead of measuring it")
    p.add_argument("--max-connections", type=int, default=1000, help="half scenario: cap on wrk -c (default 1000)")
    p.add_argument("--calibration-duration", default="3s", help="half scenario: length of each probe run (default 3s)")
    p.add_argument("--calibration-runs", type=int, default=3, help="half scenario: probe runs at most (default 3)")
    p.add_argument("--prefill", type=int, default=0, metavar="N", help="gwcore runs start with N dedup records")
    p.add_argument("--prefill-cache", type=Path, help="keep/reuse the prefilled store template in this dir")
    p.add_argument("--body-size", type=int, default=1024, help="request body bytes (default 1024)")
    p.add_argument("--store-sync", choices=("0", "1"), help="GWCORE_STORE_SYNC (default: gwcore's, fsync on)")
    p.add_argument("--commit-max-delay-us", type=int, help="GWCORE_COMMIT_MAX_DELAY_US (default: gwcore's)")
    p.add_argument("--gwcore-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra gwcore setting (repeatable)")
    p.add_argument("--python", default=str(default_python if default_python.exists() else sys.executable),
                   help="interpreter for the servers (default: .venv/bin/python)")
    p.add_argument("--wrk", default="wrk")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for /healthz")
    p.add_argument("--work-dir", type=Path, default=REPO / "var",
                   help="parent of the temporary data dirs: same disk as the repo (default ./var)")
    p.add_argument("--keep-data", action="store_true", help="keep data dirs and server logs")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = build_parser().parse_args(argv)
    scenarios = [s.strip() for s in cfg.scenarios.split(",") if s.strip()]
    cfg.servers = [s.strip() for s in cfg.servers.split(",") if s.strip()]
    for s in scenarios:
        if s not in SCENARIOS:
            raise SystemExit(f"unknown scenario {s!r}: choose from {', '.join(SCENARIOS)}")
    for s in cfg.servers:
        if s not in SERVERS:
            raise SystemExit(f"unknown server {s!r}: choose from {', '.join(SERVERS)}")
    try:
        cfg.connection_list = [int(c) for c in str(cfg.connections).split(",") if c.strip()]
    except ValueError:
        raise SystemExit(f"-c/--connections: whole numbers, comma-separated (got {cfg.connections!r})") from None
    if not cfg.connection_list or min(cfg.connection_list) < 1:
        raise SystemExit("-c/--connections: at least one count, each at least 1")
    cfg.connections = max(cfg.connection_list)
    for name in ("duration", "warmup", "calibration_duration"):
        parse_duration_s(getattr(cfg, name))
    if cfg.no_pin:
        cfg.server_cpu = cfg.wrk_cpu = None
    if shutil.which(cfg.wrk) is None:
        raise SystemExit(f"{cfg.wrk} not found: install wrk (classic wrk 4.x)")
    if (cfg.server_cpu or cfg.wrk_cpu) and shutil.which("taskset") is None:
        raise SystemExit("taskset not found: install util-linux or pass --no-pin")

    started = dt.datetime.now(dt.timezone.utc)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gwcore-load-", dir=cfg.work_dir))
    body = make_body(cfg.body_size)
    cfg.body_file = work / "body.bin"
    cfg.body_file.write_bytes(body)
    cfg.body_md5 = content_md5(body)
    env_info = environment(cfg, work)
    if "gwcore" in cfg.servers and env_info["versions"].get("gwcore_debug_build") is not False:
        # A debug build (bounds checks, line tracing, -O0) would measure the wrong thing.
        shutil.rmtree(work, ignore_errors=True)
        raise SystemExit("refusing to load-test a debug build of gwcore._dedup (or gwcore does not import: "
                         f"{env_info['versions'].get('gwcore_import_error', 'DEBUG_BUILD is True')}); "
                         "run `make compile` first")
    log(f"{env_info['cpu_model']} · {env_info['versions']} · data on {env_info['data_fs']}")
    log(f"work dir {work}")

    ctx = Context(cfg, work, None, [], [])
    report: dict[str, Any] = {"started": started.isoformat(timespec="seconds"), "argv": sys.argv[1:]}
    try:
        if cfg.prefill and "gwcore" in cfg.servers:
            ctx.prefill = Prefill(cfg.prefill, work, cfg.prefill_cache)
        results = []
        unique_max = None
        report["fdatasync"] = {"before": fdatasync_probe(work)}
        for name in scenarios:
            log(f"== scenario {name}")
            if name == "half":
                results.append(scenario_half(ctx, unique_max))
                continue
            for c in cfg.connection_list:
                if name == "unique":
                    sc = run_rounds(ctx, name, {"connections": c}, connections=c)
                    best = sc["summary"].get(subject(cfg), {}).get("rps_median")
                    unique_max = max(unique_max or 0, best or 0) or None
                else:
                    sc = run_rounds(ctx, name, {"connections": c, "dup_percent": cfg.dup_percent},
                                    connections=c, dup_percent=cfg.dup_percent)
                results.append(sc)
        report["fdatasync"]["after"] = fdatasync_probe(work)
    finally:
        if not cfg.keep_data:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")

    cfg_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    json_path = cfg.results_dir / f"load-{stamp}.json"
    md_path = cfg.results_dir / f"load-{stamp}.md"
    report.update(config=cfg_json, environment=env_info, scenarios=results, problems=ctx.problems, notes=ctx.notes,
                  json=str(json_path.relative_to(REPO) if json_path.is_relative_to(REPO) else json_path))
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    md_path.write_text(md)
    print(md)
    sweep = len(cfg.connection_list) > 1 and "unique" in scenarios
    plot_py.write_plot("load" if sweep else "ratios", json_path, () if sweep else ("ratio_strict", "ratio"), log=log)
    log(f"wrote {json_path} and {md_path}")
    for note in ctx.notes:
        log(f"note: {note}")
    for problem in ctx.problems:
        log(f"PROBLEM: {problem}")
    return 1 if ctx.problems else 0


if __name__ == "__main__":
    sys.exit(main())
