"""Start-up errors of the real `gwcore serve` process: one line on stderr naming the problem and
status 2, never a traceback (docs/configuration.md, docs/operations.md)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from procs import ROOT, free_port, wait_listening


def _env(data_dir, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GWCORE_")}
    env.update(PYTHONPATH=ROOT, GWCORE_DATA_DIR=str(data_dir), GWCORE_ENDPOINT="RemoteSite",
               GWCORE_RECEIVE_CHANNELS=f"http://127.0.0.1:{port}/RemoteSite/", **extra)
    return env


def _serve_fails(env: dict[str, str]) -> str:
    """Run `gwcore serve`, which must stop at once with status 2 and one line: that line."""
    res = subprocess.run([sys.executable, "-m", "gwcore", "serve"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("gwcore: error: "), res.stderr
    return lines[0]


def _serve_starts_and_stops(tmp_path, port: int, args: list[str], env: dict[str, str]) -> None:
    """Run the interpreter with *args* (a `gwcore serve`): it must listen on *port*, and exit 0 on SIGTERM."""
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_listening(proc, port, 30, "gwcore serve", log.read_text)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _serve_fails(_env(tmp_path / "store", port))
    assert f"GWCORE_RECEIVE_CHANNELS: cannot listen on 127.0.0.1:{port}: Address already in use" in line


def test_data_dir_is_a_file(tmp_path):
    (tmp_path / "store").write_text("not a directory")
    line = _serve_fails(_env(tmp_path / "store", free_port()))
    assert f"the data dir '{tmp_path / 'store'}' (GWCORE_DATA_DIR) is not a directory" in line


def test_data_dir_below_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    line = _serve_fails(_env(tmp_path / "file" / "store", free_port()))
    assert "(GWCORE_DATA_DIR) cannot be created: a part of its path is not a directory" in line


def test_blob_dir_is_a_file(tmp_path):
    (tmp_path / "blobs").write_text("")
    line = _serve_fails(_env(tmp_path / "store", free_port(), GWCORE_BLOB_DIR=str(tmp_path / "blobs")))
    assert f"the blob dir '{tmp_path / 'blobs'}' (GWCORE_BLOB_DIR) is not a directory" in line


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write: mode 0500, or for root (whom modes do not stop) a
    read-only tmpfs."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        yield path
        path.chmod(0o700)
        return
    if shutil.which("mount") is None:
        pytest.skip("root needs mount(8) for a read-only directory")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs: {res.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def test_data_dir_not_writable(read_only_dir):
    line = _serve_fails(_env(read_only_dir, free_port()))
    assert f"the data dir '{read_only_dir}' (GWCORE_DATA_DIR) is not writable" in line


def test_data_dir_cannot_be_created_in_a_read_only_dir(read_only_dir):
    line = _serve_fails(_env(read_only_dir / "store", free_port()))
    assert f"the data dir '{read_only_dir / 'store'}' (GWCORE_DATA_DIR) is not writable" in line


def test_an_invalid_setting_is_one_line_too(tmp_path):
    line = _serve_fails(_env(tmp_path / "store", free_port(), GWCORE_COMMIT_MAX_BATCH="many"))
    assert "GWCORE_COMMIT_MAX_BATCH='many' is invalid" in line


def test_test_suite_and_build_variables_do_not_stop_serve(tmp_path):
    # docs/development.md has developers export GWCORE_TEST_AMQP_URL; setup.py's flags may be
    # left in a shell after a debug or fuzz build
    port = free_port()
    env = _env(tmp_path / "store", port, GWCORE_TEST_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/",
               GWCORE_TEST_ANYTHING="1", GWCORE_FUZZ="0", GWCORE_DEBUG="0")
    _serve_starts_and_stops(tmp_path, port, ["-m", "gwcore", "serve"], env)


def test_a_typo_is_still_refused(tmp_path):
    line = _serve_fails(_env(tmp_path / "store", free_port(), GWCORE_COMMIT_MAX_BATCHES="10"))
    assert "unknown setting GWCORE_COMMIT_MAX_BATCHES" in line


# The RabbitMQ client is the rabbitmq extra: a process where it is missing, simulated by a finder
# that refuses its modules as an absent package would (ModuleNotFoundError naming the module).
_WITHOUT_BROKER_CLIENT = (
    "import sys, importlib.abc\n"
    "class Absent(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path, target=None):\n"
    "        if name.partition('.')[0] in ('aio_pika', 'aiormq', 'pamqp'):\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, Absent())\n"
    "from gwcore.cli import main\n"
    "status = main(['serve'])\n"
    "assert not any(m.partition('.')[0] in ('aio_pika', 'aiormq', 'pamqp') for m in sys.modules)\n"
    "raise SystemExit(status)\n"
)


def test_selected_mode_without_the_rabbitmq_extra(tmp_path):
    env = _env(tmp_path / "store", free_port(), GWCORE_MODE="selected")
    res = subprocess.run([sys.executable, "-c", _WITHOUT_BROKER_CLIENT], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [
        "gwcore: error: GWCORE_MODE=selected needs the RabbitMQ client, and aio_pika is not installed: "
        "pip install 'gwcore[rabbitmq]'"], res.stderr
    assert not (tmp_path / "store").exists()  # refused before anything was made


def test_selected_mode_on_postgresql_without_the_postgresql_extra(tmp_path):
    script = _WITHOUT_BROKER_CLIENT.replace("('aio_pika', 'aiormq', 'pamqp')", "('asyncpg',)")
    env = _env(tmp_path / "store", free_port(), GWCORE_MODE="selected", GWCORE_TRANSPORT="postgresql")
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [
        "gwcore: error: GWCORE_TRANSPORT=postgresql needs asyncpg, and asyncpg is not installed: "
        "pip install 'gwcore[postgresql]'"], res.stderr
    assert not (tmp_path / "store").exists()


def test_standalone_runs_without_the_rabbitmq_extra(tmp_path):
    port = free_port()
    _serve_starts_and_stops(tmp_path, port, ["-c", _WITHOUT_BROKER_CLIENT], _env(tmp_path / "store", port))
