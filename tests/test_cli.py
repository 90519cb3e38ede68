"""The gwcore command as a user runs it: `serve --help`, `inspect … --json`, JSON logs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

from gwcore.config import settings_help, variables
from httpclient import nsb_request
from procs import ROOT, ServerProcess, free_port, gwcore_cli


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GWCORE_")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])  # tests/handlers.py
    env.update(extra)
    return env


def test_serve_help_lists_every_setting_with_its_default():
    # an invalid setting in the environment does not stand in the way of --help
    res = subprocess.run([sys.executable, "-m", "gwcore", "serve", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env=_clean_env(GWCORE_COMMIT_MAX_BATCH="many"))
    assert res.returncode == 0, res.stderr
    listed = dict(re.findall(r"^  (GWCORE_[A-Z0-9_]+) +(\S.*)$", res.stdout, re.M))
    assert list(listed) == list(variables())  # every one, in the table's order
    assert listed == {name: default for name, _attr, default in settings_help()}
    assert listed["GWCORE_COMMIT_MAX_BATCH"] == "1024"
    assert listed["GWCORE_RECEIVE_CHANNELS"] == "http://127.0.0.1:25900/<endpoint>/"
    assert listed["GWCORE_HANDLER"] == "unset"
    assert listed["GWCORE_LOG_FORMAT"] == "text"


def _submit(port: int, msg_id: str, ttbr: str | None = None) -> None:
    extra = [("NServiceBus.TimeToBeReceived", ttbr)] if ttbr else None
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(nsb_request(msg_id, extra=extra, close=True))
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer


def test_inspect_json(tmp_path):
    server = ServerProcess(str(tmp_path / "store"), free_port()).start()
    try:
        ids = [str(uuid.uuid4()), str(uuid.uuid4())]
        _submit(server.port, ids[0])
        _submit(server.port, ids[1], ttbr="01%3A00%3A00")  # one hour: an expiry
        # while the gateway runs
        rows = [json.loads(line) for line in gwcore_cli("inspect", "queue", "--json", data_dir=server.data_dir).splitlines()]
        dedup = gwcore_cli("inspect", "dedup", "--json", data_dir=server.data_dir)
    finally:
        assert server.terminate() == 0
    assert [r["id"] for r in rows] == ids
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows) and len({r["seq"] for r in rows}) == 2
    text = gwcore_cli("inspect", "queue", data_dir=server.data_dir).splitlines()
    for row, line in zip(rows, text):  # the same seq, accepted and expiry as the text lines
        assert line.startswith(f"{row['seq']}\t{row['id']}\taccepted {row['accepted']}\texpires {row['expires']}\t")
    assert rows[0]["expires"] == "never" and rows[1]["expires"] != "never"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", rows[1]["accepted"])
    assert rows[0]["headers"]["NServiceBus.MessageIntent"] == "Send" and rows[0]["body_b64"]
    assert dedup.count("\n") == 1
    counts = json.loads(dedup)
    assert counts["dedup_records"] == 2 and counts["queued"] == 2 and counts["errors"] == 0
    assert counts["outgoing"] == 0 and counts["databus_blobs"] == 0
    assert 0 < counts["store_bytes"] <= counts["map_bytes"]


def _json_lines(text: str) -> list[dict]:
    entries = [json.loads(line) for line in text.splitlines()]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
    return entries


def test_serve_logs_json(tmp_path):
    server = ServerProcess(str(tmp_path / "store"), free_port(), GWCORE_LOG_FORMAT="json").start()
    _submit(server.port, str(uuid.uuid4()))
    assert server.terminate() == 0
    entries = _json_lines(open(server.log).read())
    assert any(e["logger"] == "gwcore" and e["level"] == "info" for e in entries)
    assert any("draining" in e["message"] for e in entries)


def test_serve_logs_text_by_default(tmp_path):
    server = ServerProcess(str(tmp_path / "store"), free_port()).start()
    assert server.terminate() == 0
    lines = open(server.log).read().splitlines()
    assert lines and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ gwcore", line) for line in lines)


def _worker_stderr(tmp_path, *args: str, **env: str) -> str:
    """A worker pointed at a port nobody listens on: it logs that it cannot enlist, retries, and
    stops on SIGTERM."""
    err = tmp_path / "worker.err"
    proc = subprocess.Popen([sys.executable, "-m", "gwcore", "worker", "--distributor",
                             f"http://127.0.0.1:{free_port()}", "--handler", "handlers:record", "--wait", "1", *args],
                            cwd=ROOT, env=_clean_env(**env),
                            stdout=subprocess.DEVNULL, stderr=open(err, "wb"))
    try:
        deadline = time.monotonic() + 30
        while "cannot enlist" not in err.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err.read_text()


def test_worker_logs_json_from_the_variable_and_the_option(tmp_path):
    for args, env in (((), {"GWCORE_LOG_FORMAT": "json"}), (("--log-format", "json"), {})):
        entries = _json_lines(_worker_stderr(tmp_path, *args, **env))
        assert any(e["logger"] == "gwcore.worker" and "cannot enlist" in e["message"] for e in entries)
    # the option wins over the variable
    text = _worker_stderr(tmp_path, "--log-format", "text", GWCORE_LOG_FORMAT="json")
    assert not text.lstrip().startswith("{") and "cannot enlist" in text


def test_worker_refuses_an_invalid_log_format(tmp_path):
    res = subprocess.run([sys.executable, "-m", "gwcore", "worker", "--distributor", "http://127.0.0.1:1",
                          "--handler", "handlers:record"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=_clean_env(GWCORE_LOG_FORMAT="yaml"))
    assert res.returncode == 2
    assert res.stderr.splitlines() == ["gwcore: error: GWCORE_LOG_FORMAT='yaml' is invalid: 'yaml' is not one of text, json"]


def test_json_formatter_keeps_a_message_on_one_line():
    import logging

    from gwcore.server import JSONFormatter

    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("gwcore", logging.ERROR, __file__, 1, "two\nlines %s", ("x",), sys.exc_info())
    line = JSONFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "two\nlines x" and entry["level"] == "error"
    assert "ValueError: boom" in entry["exception"]
