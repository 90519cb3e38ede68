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

    .venv/bin/python bench/load/site_to_site.py                    # 5 rounds, 150,000 messages
    .venv/bin/python bench/load/site_to_site.py --rounds 1 --messages 20000 -d 3s   # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_load as rl  # noqa: E402  (the shared driver pieces: Server, run_wrk, pinning, metrics)

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


def run_ingest(cfg: argparse.Namespace, work: Path, label: str) -> dict[str, Any]:
    b = rl.Server("gwcore", cfg, work, work / f"b-ingest-{label.replace('/', 'of')}")
    b.start(cfg.ready_timeout)
    try:
        if cfg.warmup and rl.parse_duration_s(cfg.warmup) > 0:
            rl.run_wrk(cfg, b.url, duration=cfg.warmup, connections=cfg.connections)
        res = rl.run_wrk(cfg, b.url, duration=cfg.duration, connections=cfg.connections)
    finally:
        b.stop()
    rl.log(f"  [{label}] ingest      : {res['rps']:>10,.0f} msg/s into B (wrk c{cfg.connections})")
    return {"rps": res["rps"], "non_2xx": res.get("non_2xx", 0)}


def run_site_to_site(cfg: argparse.Namespace, work: Path, template: Path, label: str) -> dict[str, Any]:
    b = rl.Server("gwcore", cfg, work, work / f"b-s2s-{label.replace('/', 'of')}")
    b.start(cfg.ready_timeout)
    a_dir = work / f"a-{label.replace('/', 'of')}"
    a_dir.mkdir()
    shutil.copyfile(template / "data.mdb", a_dir / "data.mdb")
    a_cfg = argparse.Namespace(**vars(cfg))
    a_cfg.server_cpu = cfg.wrk_cpu
    a_cfg.gwcore_env = [f"GWCORE_ENDPOINT={A_ENDPOINT}", f"GWCORE_SITES={rl.ENDPOINT}={b.url}",
                        f"GWCORE_SEND_CONCURRENCY={cfg.send_concurrency}", "GWCORE_RETRY_DELAYS=0.2s",
                        "GWCORE_RETRIES=1000"]
    a = rl.Server("gwcore", a_cfg, work, a_dir)
    a.env["GWCORE_RECEIVE_CHANNELS"] = f"http://127.0.0.1:{a.port}/{A_ENDPOINT}/"
    a.url = f"http://127.0.0.1:{a.port}/{A_ENDPOINT}/"
    n = cfg.messages
    samples: list[tuple[float, float]] = []
    try:
        a.start(cfg.ready_timeout)
        a_cpu0 = rl.process_cpu_s(a.proc.pid)
        deadline = time.monotonic() + cfg.timeout
        while time.monotonic() < deadline:
            got = b.metrics().get("gwcore_messages_accepted_total", 0.0)
            samples.append((time.monotonic(), got))
            if got >= n:
                break
            time.sleep(0.05)
        a_cpu = (rl.process_cpu_s(a.proc.pid) or 0) - (a_cpu0 or 0)
        left = a.metrics()
    finally:
        a.stop()
        b.stop()
    done = samples[-1][1] if samples else 0
    if done < n:
        raise RuntimeError(f"[{label}] only {done:.0f} of {n} messages reached B within {cfg.timeout} s")
    lo = next(s for s in samples if s[1] >= 0.1 * n)
    hi = next(s for s in samples if s[1] >= 0.9 * n)
    rate = (hi[1] - lo[1]) / (hi[0] - lo[0])
    whole = samples[-1][0] - next(s for s in samples if s[1] > 0)[0]
    rl.log(f"  [{label}] site-to-site: {rate:>10,.0f} msg/s A→B (10–90 %), all {n:,} in {whole:.1f} s; "
           f"A CPU {a_cpu / max(whole, 1e-9):.0%}, {1e6 * a_cpu / n:.1f} µs/msg")
    return {"rps": rate, "seconds_all": whole, "a_cpu_us_per_msg": 1e6 * a_cpu / n,
            "a_retries": left.get("gwcore_outgoing_retries_total", 0.0)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--messages", type=int, default=150_000, help="outgoing messages in A's store per round")
    p.add_argument("--send-concurrency", type=int, default=256, help="GWCORE_SEND_CONCURRENCY of A (default 256)")
    p.add_argument("-c", "--connections", type=int, default=256, help="wrk -c of the ingest run (default 256)")
    p.add_argument("-d", "--duration", default="10s", help="wrk -d of the ingest run (default 10s)")
    p.add_argument("--warmup", default="1s")
    p.add_argument("--wrk-cpu", default="1", help="CPU of wrk, and of site A (default 1)")
    p.add_argument("--wrk", default="wrk")
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
                  md: str) -> None:
    """bench/results/<stem>-<UTC time>.json and .md, and the Markdown on standard output."""
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    (cfg.results_dir / f"{stem}-{stamp}.json").write_text(json.dumps(
        {"started": started.isoformat(timespec="seconds"), "argv": sys.argv[1:], "rounds": rounds,
         "summary": summary}, indent=2, default=str) + "\n")
    (cfg.results_dir / f"{stem}-{stamp}.md").write_text(md)
    print(md)


def wrk_setup(cfg: argparse.Namespace, prefix: str) -> tuple[dt.datetime, Path, bytes]:
    """What run_load's Server and run_wrk read, set on *cfg*; a work dir with the body file.
    Returns (start time, work dir, body)."""
    cfg.threads, cfg.wrk_timeout, cfg.store_sync, cfg.commit_max_delay_us, cfg.gwcore_env = 1, "10s", None, None, []
    cfg.think_dist = "exp"
    started = dt.datetime.now(dt.timezone.utc)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=cfg.work_dir))
    body = rl.make_body(cfg.body_size)
    cfg.body_file = work / "body.bin"
    cfg.body_file.write_bytes(body)
    cfg.body_md5 = rl.content_md5(body)
    return started, work, body


def main(argv: list[str] | None = None) -> int:
    cfg = build_parser().parse_args(argv)
    started, work, body = wrk_setup(cfg, "gwcore-s2s-")
    rounds = []
    try:
        template = work / "template"
        rl.log(f"building A's store with {cfg.messages:,} outgoing messages")
        build_template(template, cfg.messages, body, f"http://127.0.0.1:1{rl.CHANNEL_PATH}")
        for i in range(cfg.rounds):
            label = f"{i + 1}/{cfg.rounds}"
            order = ("ingest", "s2s") if i % 2 == 0 else ("s2s", "ingest")
            res: dict[str, Any] = {"order": " → ".join(order)}
            for kind in order:
                res[kind] = run_ingest(cfg, work, label) if kind == "ingest" else run_site_to_site(cfg, work, template, label)
            res["ratio"] = res["s2s"]["rps"] / res["ingest"]["rps"]
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
    lines = [
        f"Site B on CPU {cfg.server_cpu}; wrk, then site A, on CPU {cfg.wrk_cpu}; {cfg.rounds} rounds, "
        f"{cfg.messages:,} messages of {cfg.body_size} bytes, A with {cfg.send_concurrency} requests in flight, "
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
