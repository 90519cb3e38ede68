#!/usr/bin/env python3
"""Databus blob ingest against the raw disk write rate, measured side by side in one run.

Each round, in alternating order:

``disk``
    this script writes ``--size`` MiB to a file on the data dir's file system and fsyncs it,
    twice: through the page cache in 256 KiB writes (``disk_buffered``), and with ``O_DIRECT`` in
    1 MiB writes from aligned memory (``disk_direct``, the raw device rate). ``disk`` is the
    faster of the two: the best a plain writer gets, so the ratio is never flattered by the
    slower way of writing.
``ingest``
    a fresh ``gwcore serve`` receives one ``SingleCallDatabusProperty`` part of ``--size`` MiB
    over loopback from a client in this process, with its Content-MD5: parsing, MD5, writing,
    fsync, rename, the LMDB index commit. Timed from the first byte sent to the 200.

The ratio ingest ÷ disk per round cancels most of what the (shared) machine adds; the report
gives its median and range. Each round also times one MD5 over the same bytes (``md5``): a part
with Content-MD5 (NServiceBus always sends one) cannot be hashed faster than that by one core, so
where MD5 alone is slower than the disk it bounds the ratio; the report gives ingest ÷ min(disk,
MD5 alone) too (how close ingest gets to what bounds it). ``--no-md5`` sends the part without the
header to show the rest of the path; ``--digest`` adds a sha-256 ``Content-Digest`` beside the
Content-MD5, as gwcore's own sender does, so the receiver checks the SHA-256 instead (then the
hash timed alone is SHA-256); ``--parallel N`` sends the same bytes as N parts at once on N
connections (several senders), whose hashes can run on N cores (the hash-alone bound is then
N times one stream's, at most one per CPU). Results go to bench/results/ (gitignored).

    .venv/bin/python bench/load/blob_ingest.py                       # 5 rounds of 512 MiB
    .venv/bin/python bench/load/blob_ingest.py --rounds 1 --size 64  # smoke test
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import datetime as dt
import hashlib
import json
import mmap
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_load as rl  # noqa: E402  (Server, pinning, results dir)

PIECE = 4 << 20
WRITE = 256 << 10
DIRECT_WRITE = 1 << 20


def disk_rate(directory: Path, size: int, piece: bytes, direct: bool = False) -> float:
    """MiB/s of writing *size* bytes plus one fsync (and the directory's): in 256 KiB writes
    through the page cache, or with *direct* in 1 MiB ``O_DIRECT`` writes from page-aligned
    memory (the raw device rate, as ``dd oflag=direct conv=fsync`` measures it)."""
    path = directory / f"disk-{uuid.uuid4().hex}"
    if direct:
        aligned = mmap.mmap(-1, len(piece))
        aligned[:] = piece
        view, step = memoryview(aligned), DIRECT_WRITE
    else:
        view, step = memoryview(piece), WRITE
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if direct else 0), 0o600)
    try:
        left = size
        while left:
            for off in range(0, len(piece), step):
                chunk = view[off:off + min(step, left)]
                os.write(fd, chunk)
                left -= len(chunk)
                if not left:
                    break
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(directory, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    took = time.perf_counter() - started
    os.unlink(path)
    return size / took / (1 << 20)


def hash_rate(size: int, piece: bytes, name: str = "md5") -> float:
    """MiB/s of one MD5 (or SHA-256) over *size* bytes: the ceiling of a part with Content-MD5
    (or a sha-256 Content-Digest); one stream cannot be hashed by two cores."""
    h = hashlib.new(name)
    view = memoryview(piece)
    started = time.perf_counter()
    for off in range(0, size, len(piece)):
        h.update(view[:min(len(piece), size - off)])
    return size / (time.perf_counter() - started) / (1 << 20)


def _wire(value: str) -> str:
    return value.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D").replace(":", "%3A")


def part_head(size: int, md5_b64: str | None, sha_b64: str | None = None) -> bytes:
    msg_id = str(uuid.uuid4())
    md5_line = "" if md5_b64 is None else "Content-MD5: " + _wire(md5_b64) + "\r\n"
    if sha_b64 is not None:  # as gwcore's sender adds it (docs/databus.md)
        md5_line += "Content-Digest: " + _wire(f"sha-256=:{sha_b64}:") + "\r\n"
    return (
        f"POST {rl.CHANNEL_PATH} HTTP/1.1\r\nHost: localhost\r\n"
        f"NServiceBus.Id: {msg_id}\r\nNServiceBus.CorrelationId: {msg_id}\r\n"
        f"NServiceBus.Header.NServiceBus.MessageId: {msg_id}\r\n"
        "NServiceBus.Header.NServiceBus.DataBus.Payload: Payload\r\n"
        "NServiceBus.Gateway.DataBusKey: NServiceBus.Header.NServiceBus.DataBus.Payload\r\n"
        "NServiceBus.Gateway: True\r\nNServiceBus.CallType: SingleCallDatabusProperty\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\n{md5_line}"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()


def _send_part(port: int, size: int, piece: bytes, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.sendall(head)
        left = size
        while left:
            n = min(left, len(piece))
            s.sendall(piece if n == len(piece) else piece[:n])
            left -= n
        return s.recv(4096)


def ingest_rate(cfg: argparse.Namespace, work: Path, size: int, piece: bytes, md5_b64: str | None,
                sha_b64: str | None = None, parallel: int = 1) -> float:
    """MiB/s of *size* bytes received as *parallel* parts of ``size // parallel`` bytes, each on a
    connection of its own, all sent at once (several senders); timed to the last 200."""
    data_dir = work / f"store-{uuid.uuid4().hex[:8]}"
    server = rl.Server("gwcore", cfg, work, data_dir)
    server.start(cfg.ready_timeout)
    try:
        part = size // parallel
        heads = [part_head(part, md5_b64, sha_b64) for _ in range(parallel)]
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            started = time.perf_counter()
            replies = list(pool.map(lambda head: _send_part(server.port, part, piece, head), heads))
            took = time.perf_counter() - started
        for reply in replies:
            if not reply.startswith(b"HTTP/1.1 200 "):
                raise RuntimeError(f"blob not accepted: {reply[:200]!r}\n{server.log_tail()}")
        return part * parallel / took / (1 << 20)
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=512, help="MiB per blob (default 512)")
    p.add_argument("--server-cpu", default="0,1", help="CPUs of the server (default both: a part is hashed and "
                   "written by threads beside the event loop)")
    p.add_argument("--client-cpu", default="0,1")
    p.add_argument("--workdir", default=None, help="where stores and the disk test file go (default: a temp dir)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--no-md5", action="store_true",
                   help="send the part without Content-MD5 (NServiceBus always sends one): the pipeline without hashing")
    p.add_argument("--digest", action="store_true",
                   help="add a sha-256 Content-Digest beside the Content-MD5, as gwcore's sender does: "
                        "a gwcore receiver then checks the SHA-256 instead of the MD5")
    p.add_argument("--parallel", type=int, default=1,
                   help="send the --size MiB as this many parts at once, each on its own connection (several "
                        "senders; the hash of each part runs on its own core); default 1")
    p.add_argument("--ready-timeout", type=float, default=30.0)
    cfg = p.parse_args(argv)
    # what rl.Server reads from its config
    cfg.store_sync = None
    cfg.commit_max_delay_us = None
    cfg.gwcore_env = []
    if cfg.client_cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, rl.cpu_set(cfg.client_cpu))
    size = cfg.size << 20
    piece = os.urandom(PIECE)
    md5, sha = hashlib.md5(), hashlib.sha256()
    part = size // cfg.parallel  # each part's digests (all parts carry the same bytes)
    for off in range(0, part, PIECE):
        md5.update(piece[:min(PIECE, part - off)])
        sha.update(piece[:min(PIECE, part - off)])
    md5_b64 = None if cfg.no_md5 else base64.b64encode(md5.digest()).decode()
    sha_b64 = base64.b64encode(sha.digest()).decode() if cfg.digest else None
    hash_name = "sha256" if cfg.digest else "md5"
    work = Path(cfg.workdir or tempfile.mkdtemp(prefix="gwcore-blob-"))
    work.mkdir(parents=True, exist_ok=True)
    rounds: list[dict[str, Any]] = []
    try:
        for i in range(cfg.rounds):
            order = ("disk", "ingest") if i % 2 == 0 else ("ingest", "disk")
            res: dict[str, float] = {}
            for kind in order:
                if kind == "disk":
                    res["disk_buffered"] = disk_rate(work, size, piece)
                    res["disk_direct"] = disk_rate(work, size, piece, direct=True)
                    res["disk"] = max(res["disk_buffered"], res["disk_direct"])
                else:
                    res["ingest"] = ingest_rate(cfg, work, size, piece, md5_b64, sha_b64, cfg.parallel)
            res["ratio"] = res["ingest"] / res["disk"]
            # one stream per core at most: with parallel parts the hashes run side by side
            res["md5"] = hash_rate(size, piece, hash_name) * min(cfg.parallel, os.cpu_count() or 1)
            res["ratio_md5"] = res["ingest"] / res["md5"]
            res["ratio_bound"] = res["ingest"] / (res["disk"] if cfg.no_md5 and not cfg.digest
                                                  else min(res["disk"], res["md5"]))
            rounds.append(res)
            rl.log(f"round {i + 1}: disk {res['disk']:.0f} MiB/s (buffered {res['disk_buffered']:.0f}, O_DIRECT "
                   f"{res['disk_direct']:.0f}), ingest {res['ingest']:.0f} MiB/s, ratio {res['ratio']:.3f}"
                   f" ({hash_name} alone: {res['md5']:.0f} MiB/s; ingest ÷ the bound {res['ratio_bound']:.3f})")
    finally:
        if cfg.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    ratios = [r["ratio"] for r in rounds]
    bounds = [r["ratio_bound"] for r in rounds]
    summary = {
        "size_mib": cfg.size, "content_md5": not cfg.no_md5, "content_digest": cfg.digest,
        "hash_alone": hash_name, "parallel": cfg.parallel, "rounds": rounds,
        "disk_median": med("disk"), "disk_buffered_median": med("disk_buffered"),
        "disk_direct_median": med("disk_direct"), "ingest_median": med("ingest"), "md5_median": med("md5"),
        "ratio_md5_median": med("ratio_md5"),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "ratio_bound_median": statistics.median(bounds), "ratio_bound_min": min(bounds),
        "ratio_bound_max": max(bounds),
    }
    rl.log(f"ingest ÷ disk: median {summary['ratio_median']:.3f} (range {summary['ratio_min']:.3f}–{summary['ratio_max']:.3f}), "
           f"disk median {summary['disk_median']:.0f} MiB/s (buffered {summary['disk_buffered_median']:.0f}, "
           f"O_DIRECT {summary['disk_direct_median']:.0f}), ingest median {summary['ingest_median']:.0f} MiB/s, "
           f"{hash_name} alone {summary['md5_median']:.0f} MiB/s; ingest ÷ min(disk, {hash_name} alone): median "
           f"{summary['ratio_bound_median']:.3f} (range {summary['ratio_bound_min']:.3f}–{summary['ratio_bound_max']:.3f})")
    rl.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = rl.RESULTS_DIR / f"blob_ingest-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(summary, indent=2))
    rl.log(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
