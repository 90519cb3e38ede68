"""Real gwcore processes for tests: start, SIGKILL, SIGTERM, the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc: subprocess.Popen, port: int, timeout: float, what: str, output) -> None:
    """Wait until *proc* accepts connections on 127.0.0.1:*port*; its *output()* goes into the
    error when it exits first or never listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {output()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start listening: {output()}")


class ServerProcess:
    def __init__(self, data_dir: str, port: int, **env: str) -> None:
        self.data_dir = data_dir
        self.port = port
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GWCORE_")}
        self.env.update(
            GWCORE_DATA_DIR=data_dir,
            GWCORE_ENDPOINT=env.pop("GWCORE_ENDPOINT", "RemoteSite"),
            PYTHONPATH=ROOT,
        )
        self.env.setdefault("GWCORE_RECEIVE_CHANNELS", f"http://127.0.0.1:{port}/{self.env['GWCORE_ENDPOINT']}/")
        self.env.update(env)
        #: distributor mode: the worker listener's port (a free one unless the caller chose)
        self.worker_port: int | None = None
        if self.env.get("GWCORE_MODE") == "distributor":
            self.env.setdefault("GWCORE_WORKER_LISTEN", f"127.0.0.1:{free_port()}")
            listen = self.env["GWCORE_WORKER_LISTEN"]
            if listen != "off":
                self.worker_port = int(listen.rpartition(":")[2])
        self.proc: subprocess.Popen | None = None
        self.log = os.path.join(data_dir + ".log")

    def start(self, timeout: float = 20.0) -> "ServerProcess":
        os.makedirs(os.path.dirname(self.data_dir), exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "gwcore", "serve"], env=self.env, cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        wait_listening(self.proc, self.port, timeout, "server", lambda: open(self.log).read()[-2000:])
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def gwcore_cli(*args: str, data_dir: str, check: bool = True, **extra_env: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GWCORE_")}
    env.update(GWCORE_DATA_DIR=data_dir, PYTHONPATH=ROOT, **extra_env)
    res = subprocess.run([sys.executable, "-m", "gwcore", *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    if check:
        assert res.returncode == 0, res.stderr
    return res.stdout


def queued_ids(data_dir: str) -> list[str]:
    out = gwcore_cli("inspect", "queue", "--json", data_dir=data_dir)
    return [json.loads(line)["id"] for line in out.splitlines() if line]


def vm_hwm_kib(pid: int) -> int:
    """Peak resident memory (VmHWM) of process *pid*, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmHWM for process {pid}")
