"""`gwcore demo` as a user runs it: a real process starting two real gateway processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from procs import ROOT, free_port

TIMEOUT = 120


def demo_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GWCORE_")}
    # Settings of the caller's shell, even broken ones, must not reach the demo's gateways.
    env.update(PYTHONPATH=ROOT, TMPDIR=str(tmp_path), GWCORE_LOG_LEVEL="bogus", GWCORE_HANDLER="no:such")
    return env


def demo_args(*extra: str) -> tuple[list[str], int, int]:
    hq, remote = free_port(), free_port()
    while remote == hq:
        remote = free_port()
    return ([sys.executable, "-m", "gwcore", "demo", "--hq-port", str(hq), "--remote-port", str(remote),
             "--interval", "0", *extra], hq, remote)


def run_demo(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, int, int]:
    args, hq, remote = demo_args(*extra)
    res = subprocess.run(args, env=demo_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    return res, hq, remote


def events(out: str) -> list[tuple[str, str, dict[str, str]]]:
    """The transcript as (site, headline, fields): a field line is indented under its headline."""
    found: list[tuple[str, str, dict[str, str]]] = []
    for line in out.splitlines():
        m = re.match(r"\[(\w+)\]", line)
        assert m, f"a line without a site prefix: {line!r}"
        site, text = m.group(1), line[15:]
        if text.startswith("    "):
            assert found and found[-1][0] == site, f"a field line outside its event: {line!r}"
            name, value = text.split(None, 1)
            found[-1][2][name] = value
        else:
            found.append((site, text, {}))
    return found


def child_pids(out: str) -> dict[str, int]:
    return {site: int(pid) for site, pid in re.findall(r"^\[demo\] +(\w+) started \(pid (\d+)\)$", out, re.M)}


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped
    except FileNotFoundError:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_three_price_updates_are_acknowledged_and_everything_is_cleaned_up(tmp_path):
    res, hq, remote = run_demo(tmp_path, "--count", "3")
    assert res.returncode == 0, res.stdout + res.stderr
    ev = events(res.stdout)
    hq_url, remote_url = f"http://127.0.0.1:{hq}/Headquarters/", f"http://127.0.0.1:{remote}/RemoteSite/"

    hq_events = [(head, f) for site, head, f in ev if site == "Headquarters"]
    sent = [f for head, f in hq_events if re.fullmatch(r"-> UpdatePrice \d/3 to RemoteSite", head)]
    received = [f for site, head, f in ev if site == "RemoteSite" and head == "<- UpdatePrice received"]
    acks = [(head, f) for head, f in hq_events if head.startswith("<- PriceUpdateAcknowledged")]
    assert len(sent) == len(received) == len(acks) == 3
    ids = [f["MessageId"] for f in sent]
    assert len(set(ids)) == 3 and all(uuid.UUID(i) for i in ids)
    for n, (msg_id, got, (head, ack)) in enumerate(zip(ids, received, acks), 1):
        assert (got["MessageId"], got["MessageIntent"], got["CorrelationId"]) == (msg_id, "Send", msg_id)
        assert got["OriginatingSite"] == f"http,{hq_url}"
        assert re.fullmatch(rf"<- PriceUpdateAcknowledged {n}/3, round trip \d+\.\d ms", head)
        assert ack["CorrelationId"].split()[0] == msg_id
        assert ack["RelatedTo"] == msg_id
        assert ack["MessageIntent"] == "Reply"
        assert ack["OriginatingSite"] == f"http,{remote_url}"
        assert ack["MessageId"] not in ids
        assert '"Status":"Applied at RemoteSite"' in ack["body"]
    assert "3 price updates sent, 3 acknowledged" in res.stdout
    # UpdatePrice 1 is resent on purpose with its id: answered 200, not handled a second time
    resent = [f for head, f in hq_events if head == "-> UpdatePrice 1 again, on purpose, with the same id"]
    assert [f["MessageId"] for f in resent] == [ids[0]]
    (dup,) = [f for head, f in hq_events if head.startswith("<- 200 OK from RemoteSite for the resent id")]
    assert dup["Duplicates"].split()[0] == "1"

    pids = child_pids(res.stdout)
    assert set(pids) == {"Headquarters", "RemoteSite"}
    assert [site for site, pid in pids.items() if running(pid)] == []
    assert (port_free(hq), port_free(remote)) == (True, True)
    (removed,) = re.findall(r"^\[demo\] +removed (.+)$", res.stdout, re.M)
    assert removed.startswith(str(tmp_path)) and not os.path.exists(removed)
    assert os.listdir(tmp_path) == []


def test_keep_leaves_both_stores(tmp_path):
    res, _hq, _remote = run_demo(tmp_path, "--count", "1", "--keep")
    assert res.returncode == 0, res.stdout + res.stderr
    (kept,) = re.findall(r"^\[demo\] +data kept in (.+)$", res.stdout, re.M)
    assert kept.startswith(str(tmp_path))
    assert sorted(os.listdir(kept)) == ["Headquarters", "RemoteSite"]
    pids = child_pids(res.stdout)
    assert set(pids) == {"Headquarters", "RemoteSite"}
    assert [site for site, pid in pids.items() if running(pid)] == []


def test_a_given_data_dir_is_kept_and_can_be_used_again(tmp_path):
    stores = tmp_path / "stores"
    for _run in range(2):
        res, _hq, _remote = run_demo(tmp_path, "--count", "1", "--data-dir", str(stores))
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"data kept in {stores}" in res.stdout
    assert sorted(os.listdir(stores)) == ["Headquarters", "RemoteSite"]
    assert os.listdir(tmp_path) == ["stores"]  # no temporary dir besides


@pytest.mark.parametrize("option,site", [("--remote-port", "RemoteSite"), ("--hq-port", "Headquarters")])
def test_a_busy_port_is_named_with_the_option_that_changes_it(tmp_path, option, site):
    args, hq, remote = demo_args()
    port = remote if option == "--remote-port" else hq
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        res = subprocess.run(args, env=demo_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode != 0
    assert f"port {port} for {site} is already in use" in res.stderr
    assert f"choose another with {option}" in res.stderr
    assert "started" not in res.stdout and os.listdir(tmp_path) == []


def start_and_wait_for_first_ack(tmp_path) -> tuple[subprocess.Popen, list[str]]:
    args, _hq, _remote = demo_args("--count", "1000", "--interval", "0.2")
    proc = subprocess.Popen(args, env=demo_env(tmp_path), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    guard = threading.Timer(TIMEOUT, proc.kill)  # readline below would otherwise wait forever
    guard.start()
    lines: list[str] = []
    try:
        while not any("<- PriceUpdateAcknowledged 1/" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
    finally:
        guard.cancel()
    return proc, lines


def test_ctrl_c_stops_both_sites_and_cleans_up(tmp_path):
    proc, lines = start_and_wait_for_first_ack(tmp_path)
    proc.send_signal(signal.SIGINT)  # what the terminal sends the demo on Ctrl-C
    rest, _ = proc.communicate(timeout=TIMEOUT)
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert "SIGINT: stopping Headquarters and RemoteSite" in out
    pids = child_pids(out)
    assert set(pids) == {"Headquarters", "RemoteSite"}
    assert [site for site, pid in pids.items() if running(pid)] == []
    assert os.listdir(tmp_path) == []


def test_sites_stop_by_themselves_when_the_demo_process_is_killed(tmp_path):
    proc, lines = start_and_wait_for_first_ack(tmp_path)
    pids = child_pids("".join(lines))
    assert set(pids) == {"Headquarters", "RemoteSite"}, "".join(lines)
    assert [site for site, pid in pids.items() if not running(pid)] == []  # both sites run before the kill
    proc.kill()  # no chance to clean up: the sites notice they lost their parent
    proc.wait()
    deadline = time.monotonic() + 30
    while any(running(pid) for pid in pids.values()):
        assert time.monotonic() < deadline, "a site outlived the demo process"
        time.sleep(0.1)
    proc.stdout.close()
