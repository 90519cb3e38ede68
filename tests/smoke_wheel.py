"""CI's wheel smoke test (.ci/run): what a user installs, run where the source tree is not.

Builds the sdist and, from it, the wheel (``python -m build``), checks what the wheel holds,
installs it without extras into a fresh venv in a temporary directory, and there runs
``gwcore serve`` on a free port with a temporary data dir: one NServiceBus submit, ``gwcore
inspect queue --json`` and ``inspect dedup`` find it, SIGTERM ends the process with status 0.

    .venv/bin/python tests/smoke_wheel.py [--keep]

Exits non-zero with the reason on the first check that fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from httpclient import nsb_request  # noqa: E402
from procs import free_port, wait_listening  # noqa: E402


def _run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise SystemExit(f"smoke: {' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def _outside_env(**extra: str) -> dict[str, str]:
    # nothing of the source tree or the caller's gwcore settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("GWCORE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def build(dist: str) -> tuple[str, str]:
    _run(sys.executable, "-m", "build", "--outdir", dist, ROOT, env=_outside_env())
    sdists = [f for f in os.listdir(dist) if f.endswith(".tar.gz")]
    wheels = [f for f in os.listdir(dist) if f.endswith(".whl")]
    if len(sdists) != 1 or len(wheels) != 1:
        raise SystemExit(f"smoke: expected one sdist and one wheel in {dist}: {os.listdir(dist)}")
    return os.path.join(dist, sdists[0]), os.path.join(dist, wheels[0])


def check_sdist(sdist: str) -> None:
    import tarfile

    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    missing = {"LICENSE", "README.md", "setup.py", "pyproject.toml", "gwcore/_dedup.pyx"} - names
    if missing:
        raise SystemExit(f"smoke: the sdist lacks {sorted(missing)}")


def check_wheel(wheel: str, work: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        so = [n for n in names if n.startswith("gwcore/_dedup") and n.endswith(".so")]
        if len(so) != 1:
            raise SystemExit(f"smoke: the wheel has no single gwcore/_dedup*.so: {so}")
        if any(n.endswith((".c", ".html")) for n in names):
            raise SystemExit("smoke: generated C or annotation files in the wheel")
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(meta).decode()
        if "License-Expression: MIT" not in metadata:
            raise SystemExit("smoke: the wheel's metadata has no License-Expression: MIT")
        if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
            raise SystemExit("smoke: the wheel does not carry LICENSE")
        requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
        if any("aio-pika" in r and "extra ==" not in r for r in requires):
            raise SystemExit(f"smoke: aio-pika is not an extra: {requires}")
        path = zf.extract(so[0], os.path.join(work, "unpacked"))
    if shutil.which("file"):
        kind = _run("file", path).stdout
        if "not stripped" in kind or "debug_info" in kind:
            raise SystemExit(f"smoke: the wheel's extension keeps debug info: {kind}")
    size = os.path.getsize(path)
    if size > 1_500_000:
        raise SystemExit(f"smoke: the wheel's extension is {size} bytes: not stripped?")


def submit(port: int, msg_id: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(nsb_request(msg_id, close=True))
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status = answer.split(b"\r\n", 1)[0]
    if status != b"HTTP/1.1 200 OK":
        raise SystemExit(f"smoke: the submit was answered {answer[:300]!r}")


def smoke(work: str) -> None:
    dist = os.path.join(work, "dist")
    sdist, wheel = build(dist)
    check_sdist(sdist)
    check_wheel(wheel, work)
    venv = os.path.join(work, "venv")
    _run(sys.executable, "-m", "venv", venv, env=_outside_env())
    py, gwcore = os.path.join(venv, "bin", "python"), os.path.join(venv, "bin", "gwcore")
    _run(py, "-m", "pip", "install", "-q", wheel, env=_outside_env(), cwd=work)
    where = _run(py, "-c", "import gwcore, importlib.util as u; print(gwcore.__file__); "
                           "print(u.find_spec('aio_pika') is None); print(gwcore.DEBUG_BUILD)",
                 env=_outside_env(), cwd=work).stdout.split()
    if where[0].startswith(ROOT + os.sep) or not where[0].startswith(venv + os.sep):
        raise SystemExit(f"smoke: gwcore imported from {where[0]}, not from the fresh venv")
    if where[1] != "True":
        raise SystemExit("smoke: the plain install brought the RabbitMQ client (it is the rabbitmq extra)")
    if where[2] != "False":
        raise SystemExit("smoke: the wheel holds a debug build")
    port, data_dir = free_port(), os.path.join(work, "data")
    env = _outside_env(GWCORE_DATA_DIR=data_dir, GWCORE_ENDPOINT="RemoteSite",
                       GWCORE_RECEIVE_CHANNELS=f"http://127.0.0.1:{port}/RemoteSite/")
    log_path = os.path.join(work, "serve.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([gwcore, "serve"], env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_listening(proc, port, 60, "gwcore serve (wheel)", lambda: open(log_path).read()[-2000:])
        msg_id = str(uuid.uuid4())
        submit(port, msg_id)
        queue = _run(gwcore, "inspect", "queue", "--json", env=env, cwd=work).stdout
        ids = [json.loads(line)["id"] for line in queue.splitlines() if line]
        if ids != [msg_id]:
            raise SystemExit(f"smoke: inspect queue --json shows {ids}, expected [{msg_id}]")
        dedup = _run(gwcore, "inspect", "dedup", env=env, cwd=work).stdout
        if "dedup records: 1" not in dedup:
            raise SystemExit(f"smoke: inspect dedup says {dedup!r}")
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(60)
        if status != 0:
            raise SystemExit(f"smoke: gwcore serve exited with {status} after SIGTERM: {open(log_path).read()[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"smoke: {os.path.basename(sdist)} and {os.path.basename(wheel)} built; the wheel served, stored, "
          "was inspected and stopped cleanly in a fresh venv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="gwcore-smoke-")
    started = time.monotonic()
    try:
        smoke(work)
    finally:
        if args.keep:
            print(f"smoke: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"smoke: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
