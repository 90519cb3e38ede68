"""A real nginx in front of gwcore nodes for tests: its own config, logs and temp dirs in a test
directory, free ports, run as a non-daemon child process (never the system's nginx)."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess

import pytest
from procs import wait_listening

LOG_FORMAT = "$msec|$status|$upstream_addr|$upstream_status|$uri"


def _location(path: str, read_timeout: int, tries: int = 2, upstream_defaults: bool = False) -> str:
    """A location proxied to both nodes with failover; *read_timeout* (s) must exceed the longest
    answer there: a submit's group commit, or a worker's take waiting for work (at most 20 s).
    *upstream_defaults*: talk to the nodes as nginx does unless told otherwise (HTTP/1.0, a new
    connection per request, ``Connection: close``)."""
    http11 = "" if upstream_defaults else """
            proxy_http_version 1.1;
            proxy_set_header Connection "";"""
    return f"""        location {path} {{
            proxy_pass http://gwcore_nodes;{http11}
            proxy_next_upstream error timeout http_503 non_idempotent;
            proxy_next_upstream_tries {tries};
            proxy_next_upstream_timeout 10s;
            proxy_connect_timeout 1s;
            proxy_send_timeout 10s;
            proxy_read_timeout {read_timeout}s;
        }}"""


def nginx_binary() -> str:
    """The nginx executable; without one the test is skipped (which fails it in CI: tests/ci.py),
    so a CI run cannot pass without having tested failover through a real load balancer."""
    path = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                         if os.access(p, os.X_OK)), None)
    if path is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light; .ci/run installs it)")
    return path


class Nginx:
    """nginx listening on 127.0.0.1:port, proxying to the gwcore nodes at *upstreams* with the
    failover settings of docs/deployment.md ("nginx in front")."""

    def __init__(self, directory: str, port: int, upstreams: list[int], tries: int = 2, repeat: int = 1,
                 upstream_defaults: bool = False, prefix: list[str] | None = None,
                 log_buffer: str | None = None) -> None:
        """:param tries: proxy_next_upstream_tries (0: every upstream, the selected-mode setting).
        :param repeat: list every upstream this many times (selected mode: 2, docs/deployment.md).
        :param upstream_defaults: leave nginx's own upstream protocol (HTTP/1.0, no kept-alive
            connections) instead of the documented HTTP/1.1 with keepalive.
        :param prefix: a command nginx is started under (the benchmarks' ``taskset -c N``).
        :param log_buffer: buffer the access log (e.g. ``"256k"``, written out at least every 5 s
            and at stop) instead of a write per request: the benchmarks, which read it after."""
        self.log_buffer = log_buffer
        self.prefix = list(prefix or ())
        self.upstream_defaults = upstream_defaults
        self.tries = tries
        self.repeat = repeat
        self.dir = directory
        self.port = port
        self.upstreams = upstreams
        self.access_log = os.path.join(directory, "access.log")
        self.proc: subprocess.Popen | None = None

    def config(self) -> str:
        temp = "\n".join(f"    {kind}_temp_path {self.dir}/{kind}_temp;"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=0;" for p in self.upstreams * self.repeat)
        user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""
        buffered = f" buffer={self.log_buffer} flush=5s" if self.log_buffer else ""
        keepalive = "" if self.upstream_defaults else "\n        keepalive 512;\n        keepalive_timeout 10s;"
        return f"""{user}worker_processes 1;
events {{ worker_connections 1024; }}
http {{
{temp}
    log_format failover '{LOG_FORMAT}';
    access_log {self.access_log} failover{buffered};
    upstream gwcore_nodes {{
{servers}{keepalive}
    }}
    server {{
        listen 127.0.0.1:{self.port};
        ignore_invalid_headers off;
        client_max_body_size 16m;
{_location("/", 10, self.tries, self.upstream_defaults)}
{_location("/.gwcore/worker/", 30, upstream_defaults=self.upstream_defaults)}
    }}
}}
"""

    def start(self, timeout: float = 10.0) -> "Nginx":
        binary = nginx_binary()
        os.makedirs(self.dir, exist_ok=True)
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(self.config())
        directives = f"daemon off; pid {self.dir}/nginx.pid; error_log {self.dir}/error.log warn;"
        self.proc = subprocess.Popen(self.prefix + [binary, "-p", self.dir, "-c", conf, "-g", directives],
                                     stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "stderr.log"), "ab"))
        wait_listening(self.proc, self.port, timeout, "nginx", self.errors)
        return self

    def errors(self) -> str:
        text = ""
        for name in ("stderr.log", "error.log"):
            path = os.path.join(self.dir, name)
            if os.path.exists(path):
                text += open(path, errors="replace").read()[-2000:]
        return text

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: lets the access log be written out
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def answers(self, prefix: str = "/") -> list[tuple[float, int, str]]:
        """``(time, status, node)`` of every request whose path starts with *prefix*, in log order;
        *node* is the upstream that gave the final answer (the last of ``$upstream_addr`` after
        retries on the other node)."""
        out = []
        with open(self.access_log) as f:
            for line in f:
                msec, status, addrs, _statuses, uri = line.rstrip("\n").split("|")
                if uri.startswith(prefix):
                    out.append((float(msec), int(status), addrs.split(",")[-1].strip()))
        return out


def takeover_gaps(answers: list[tuple[float, int, str]]) -> list[float]:
    """Seconds from the last 200 of one node to the first 200 of the next, at each change, in
    :meth:`Nginx.answers`' rows."""
    oks = sorted((t, n) for t, status, n in answers if status == 200)
    return [t1 - t0 for (t0, n0), (t1, n1) in zip(oks, oks[1:]) if n1 != n0]
