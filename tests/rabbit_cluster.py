"""A three-node RabbitMQ cluster on this machine for tests, beside (never instead of) the
machine's own broker on 5672.

Every node has its own name (``gwc1@localhost``...), free AMQP and distribution ports on
127.0.0.1, its own data, log, config and pid files in a test directory, and no plugins (a shorter
start). The nodes share an Erlang cookie in a HOME of their own, so neither the machine's node nor
its cookie is touched; the CLI calls run with that HOME too. The scripts are run directly (not
through the packages' wrapper in /usr/sbin, which switches to the ``rabbitmq`` user and its HOME),
each node in a process group of its own, so teardown ends exactly the processes started here; a
node also gets SIGKILL when the test process dies without a teardown.

Outside CI a machine without ``rabbitmq-server`` skips; in CI (``CI=true``) that, and any failure to
start or join the cluster, is a test failure (tests/ci.py, tests/conftest.py).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from procs import free_port, wait_listening

import ci

#: What the nodes may take of the machine: one scheduler each (2 cores here, shared with the
#: machine's broker, the gwcore processes and nginx), distribution on loopback only.
ERL_ARGS = "+S 1:1 -kernel inet_dist_use_interface {127,0,0,1}"


def _scripts_dir() -> str | None:
    """The directory of RabbitMQ's own scripts (rabbitmq-server, rabbitmqctl). The Debian and
    RPM packages' /usr/sbin/rabbitmq-server is a wrapper that re-runs the script as the
    ``rabbitmq`` user; the scripts are in /usr/lib/rabbitmq/bin (beside the wrapper, which
    /usr/sbin links to). Elsewhere (a generic install): where rabbitmq-server is."""
    found = shutil.which("rabbitmq-server")
    candidates = ["/usr/lib/rabbitmq/bin"] + ([os.path.dirname(os.path.realpath(found))] if found else [])
    return next((d for d in candidates
                 if all(os.access(os.path.join(d, exe), os.X_OK) for exe in ("rabbitmq-server", "rabbitmqctl"))), None)


class ClusterError(RuntimeError):
    pass


class RabbitNode:
    def __init__(self, cluster: "RabbitCluster", name: str) -> None:
        self.cluster = cluster
        self.name = f"{name}@localhost"
        self.dir = os.path.join(cluster.dir, name)
        self.port = free_port()
        self.dist_port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.pid_file = os.path.join(self.dir, "pid")
        self.log = os.path.join(self.dir, "stdout.log")
        self.proc: subprocess.Popen | None = None
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "rabbitmq.conf"), "w") as f:
            f.write(f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
                    # what docs/deployment.md recommends for a cluster gwcore runs on
                    "cluster_partition_handling = pause_minority\n"
                    "log.console = false\n"
                    "log.file.level = info\n")
        self.env = dict(
            cluster.env,
            # The script then runs the VM in its own process (exec) instead of a child it waits
            # for: so the parent-death signal reaches the VM (the variable is the script's own
            # switch for running under systemd, which has no proxy process either; without it
            # the node runs under the script, and teardown still ends both).
            RUNNING_UNDER_SYSTEMD="true",
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONFIG_FILE=os.path.join(self.dir, "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=os.path.join(self.dir, "advanced.config"),  # none
            RABBITMQ_MNESIA_BASE=os.path.join(self.dir, "mnesia"),
            RABBITMQ_LOG_BASE=os.path.join(self.dir, "log"),
            RABBITMQ_PID_FILE=self.pid_file,
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=ERL_ARGS,
        )

    def start(self) -> "RabbitNode":
        """Start the node (in the background: :meth:`await_startup` waits for it)."""
        if os.path.exists(self.pid_file):
            os.unlink(self.pid_file)  # a killed node's: wait for the new one's
        self.proc = subprocess.Popen([os.path.join(self.cluster.scripts, "rabbitmq-server")], env=self.env,
                                     cwd=self.dir, stdin=subprocess.DEVNULL, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ctl(self, *args: str, timeout: float = 60) -> str:
        return self.cluster.ctl("-n", self.name, *args, timeout=timeout)

    def await_startup(self, timeout: float = 60) -> None:
        """Wait until the node accepts AMQP connections and says it has booted (the CLI cannot
        wait for a node that has not registered with epmd yet: it fails at once)."""
        wait_listening(self.proc, self.port, timeout, f"RabbitMQ node {self.name}", self.tail)
        self.ctl("await_startup", "--timeout", str(int(timeout)), timeout=timeout + 15)

    def os_pid(self) -> int:
        """The Erlang VM's OS pid (the node writes it to its pid file once it runs)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with open(self.pid_file) as f:
                    return int(f.read().strip())
            except (OSError, ValueError):
                time.sleep(0.05)
        return int(self.ctl("eval", "os:getpid().").strip().strip('"'))

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM: a crash, no chance to tell the cluster anything."""
        os.kill(self.os_pid(), signal.SIGKILL)
        self.proc.wait(30)  # the VM is the process started (the script execs it), or its child

    def stop(self) -> None:
        """SIGKILL everything started for this node (its process group): teardown, data deleted after."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self.proc = None

    def tail(self, n: int = 3000) -> str:
        text = ""
        for path in (self.log, os.path.join(self.dir, "log", f"{self.name}.log")):
            if os.path.exists(path):
                text += f"--- {path}\n" + open(path, errors="replace").read()[-n:]
        return text


class RabbitCluster:
    """``size`` RabbitMQ nodes, started and joined by :meth:`start`, removed by :meth:`stop`."""

    def __init__(self, directory: str, size: int = 3, prefix: str = "gwc") -> None:
        scripts = _scripts_dir()
        if scripts is None:
            raise ClusterError("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        self.scripts = scripts
        self.dir = directory
        home = os.path.join(directory, "home")
        os.makedirs(home, exist_ok=True)
        cookie = os.path.join(home, ".erlang.cookie")
        with open(cookie, "w") as f:
            f.write(f"GWCORETEST{os.urandom(10).hex().upper()}")
        os.chmod(cookie, 0o400)
        plugins = os.path.join(directory, "enabled_plugins")
        with open(plugins, "w") as f:
            f.write("[].\n")
        env_conf = os.path.join(directory, "rabbitmq-env.conf")  # instead of /etc/rabbitmq's
        open(env_conf, "w").close()
        # Nothing of the caller's RabbitMQ or Erlang settings (nor the machine's) reaches the nodes.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        self.env.update(HOME=home, RABBITMQ_CONF_ENV_FILE=env_conf, RABBITMQ_ENABLED_PLUGINS_FILE=plugins)
        self.nodes = [RabbitNode(self, f"{prefix}{i + 1}") for i in range(size)]
        self._epmd_was_up = _epmd_up()
        #: the nodes this machine ran before (its own broker's; not CLI runs): still there after stop()
        self.names_before = {name for name in epmd_names() if not name.startswith("rabbitmqcli")}
        taken = {n.name.partition("@")[0] for n in self.nodes} & self.names_before
        if taken:
            raise ClusterError(f"nodes named {sorted(taken)} run already on this machine")

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def ctl(self, *args: str, timeout: float = 60) -> str:
        res = subprocess.run([os.path.join(self.scripts, "rabbitmqctl"), *args], env=self.env, cwd=self.dir,
                             capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise ClusterError(f"rabbitmqctl {' '.join(args)} exited with {res.returncode}: "
                               f"{res.stderr.strip() or res.stdout.strip()}")
        return res.stdout

    def node(self, name: str) -> RabbitNode:
        return next(n for n in self.nodes if n.name == name)

    def start(self, timeout: float = 90) -> "RabbitCluster":
        """Start every node, wait for them, join the others to the first one."""
        try:
            for n in self.nodes:
                n.start()
            for n in self.nodes:
                n.await_startup(timeout)
            first = self.nodes[0]
            for n in self.nodes[1:]:
                n.ctl("stop_app")
                n.ctl("join_cluster", first.name)
                n.ctl("start_app")
            running = self.running_nodes()
            if sorted(running) != sorted(n.name for n in self.nodes):
                raise ClusterError(f"the cluster runs {running}, not {[n.name for n in self.nodes]}")
        except (RuntimeError, subprocess.TimeoutExpired) as exc:  # ClusterError, or a node that exited
            logs = "\n".join(n.tail() for n in self.nodes)
            self.stop()
            raise ClusterError(f"{exc}\n{logs}") from None
        return self

    def running_nodes(self, via: RabbitNode | None = None) -> list[str]:
        via = via or next(n for n in self.nodes if n.alive())
        status = json.loads(via.ctl("cluster_status", "--formatter", "json"))
        return status["running_nodes"]

    def queues(self, via: RabbitNode | None = None) -> dict[str, dict]:
        """name -> {type, leader, members, online} of every queue, asked of a running node."""
        via = via or next(n for n in self.nodes if n.alive())
        rows = json.loads(via.ctl("list_queues", "name", "type", "leader", "members", "online", "-q",
                                  "--formatter", "json"))
        return {row["name"]: row for row in rows}

    def wait_online(self, names: list[str], timeout: float = 30) -> dict[str, dict]:
        """Wait until every node runs its replica of each queue in *names* (a restarted node's
        come back some time after it has booted); returns :meth:`queues`."""
        everyone = sorted(n.name for n in self.nodes)
        deadline = time.monotonic() + timeout
        while True:
            queues = self.queues()
            if all(sorted(queues.get(name, {}).get("online") or []) == everyone for name in names):
                return queues
            if time.monotonic() > deadline:
                raise AssertionError(f"not every replica online: { {name: queues.get(name) for name in names} }")
            time.sleep(0.5)

    def stop(self) -> None:
        """End every node and delete its data (its logs stay, with the test's other files)."""
        for n in self.nodes:
            n.stop()
            shutil.rmtree(os.path.join(n.dir, "mnesia"), ignore_errors=True)
        if not self._epmd_was_up and _epmd_up():
            # the first node started it; leave it only if someone else registered since
            names = subprocess.run(["epmd", "-names"], capture_output=True, text=True).stdout
            if "name " not in names:
                subprocess.run(["epmd", "-kill"], capture_output=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies without its teardown
    (killed, or a timeout), so that no node outlives a run on a shared machine."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def epmd_names() -> set[str]:
    """The names of the Erlang nodes registered with this machine's epmd."""
    try:
        res = subprocess.run(["epmd", "-names"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {line.split()[1] for line in res.stdout.splitlines() if line.startswith("name ")}


def _epmd_up() -> bool:
    try:
        res = subprocess.run(["epmd", "-names"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


@pytest.fixture(scope="module")
def rabbit_cluster(tmp_path_factory):
    """A running three-node cluster for the module's tests; gone afterwards, data and all."""
    if _scripts_dir() is None and not ci.in_ci():
        pytest.skip("rabbitmq-server is not installed (apt-get install rabbitmq-server; .ci/run has it)")
    try:
        cluster = RabbitCluster(str(tmp_path_factory.mktemp("rabbit"))).start()
    except ClusterError as exc:
        # in CI as outside it: a cluster that was expected to start and did not is a failure
        pytest.fail(f"the RabbitMQ cluster did not start: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
    # the machine's own nodes (its broker) are still there, and none of the cluster's is
    deadline = time.monotonic() + 10
    while (names := epmd_names()) & {n.name.partition("@")[0] for n in cluster.nodes} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.names_before <= names and not names & {n.name.partition("@")[0] for n in cluster.nodes}, names
