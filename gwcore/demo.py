"""``gwcore demo``: the NServiceBus gateway sample in one command, two real gateways on loopback.

The demo process checks the ports, gives each site a data dir and starts two children, each
``python -m gwcore.demo <site>`` and configured only by the ``GWCORE_*`` variables it is given:

- RemoteSite serves until SIGTERM. Its handler (``GWCORE_HANDLER=gwcore.demo:acknowledge_price``)
  prints each UpdatePrice it receives and replies with a PriceUpdateAcknowledged.
- Headquarters sends ``--count`` UpdatePrice requests (:meth:`Gateway.request`), prints each reply
  with its round-trip time, then stops.

Then the demo process stops RemoteSite with SIGTERM and removes the temporary data dirs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from typing import Any, Iterator, Mapping

import orjson

from .config import Settings, child_environment
from .consumer import Message
from .errors import ConfigurationError, GatewayError
from .gateway import Gateway

__all__ = ("run", "acknowledge_price", "unexpected_message")

HQ = "Headquarters"
REMOTE = "RemoteSite"
HOST = "127.0.0.1"
REPLY_TIMEOUT = 15.0  # seconds Headquarters waits for each acknowledgement
START_TIMEOUT = 30.0  # seconds for RemoteSite to listen (a busy machine starts Python slowly)
STOP_TIMEOUT = 15.0  # seconds a child gets after SIGTERM before it is killed

UPDATE_PRICE = {"NServiceBus.EnclosedMessageTypes": "Shared.UpdatePrice, Shared",
                "NServiceBus.ContentType": "application/json"}
PRICE_ACK = {"NServiceBus.EnclosedMessageTypes": "Shared.PriceUpdateAcknowledged, Shared",
             "NServiceBus.ContentType": "application/json"}

_PREFIX_WIDTH = len(f"[{HQ}] ")

# The gateway of this child process. GWCORE_HANDLER names a plain function, and a reply needs the
# gateway, so the child runner publishes it here before the gateway starts consuming.
_gateway: Gateway | None = None


# One event as one write, so the lines of the two sites never interleave inside an event.
def _say(who: str, headline: str, fields: Mapping[str, object] | None = None) -> None:
    prefix = f"[{who}]".ljust(_PREFIX_WIDTH)
    lines = [headline] + [f"    {name:<16}{value}" for name, value in (fields or {}).items()]
    text = "".join(f"{prefix}{line}\n" for line in lines)
    sys.stdout.write(text)
    sys.stdout.flush()


# 'Shared.UpdatePrice, Shared' -> 'UpdatePrice'
def _message_type(headers: dict[str, str]) -> str:
    full = headers.get("NServiceBus.EnclosedMessageTypes", "message")
    return full.split(",", 1)[0].rsplit(".", 1)[-1]


def _updates(count: int) -> str:
    return f"{count} price update{'s' if count != 1 else ''}"


def _text(body: bytes) -> str:
    return body.decode("utf-8", errors="replace")


# The headers that tell where a message came from and what it answers.
def _headers_shown(msg: Message) -> dict[str, str]:
    shown = {"MessageId": msg.id}
    for name in ("MessageIntent", "CorrelationId", "RelatedTo", "OriginatingSite"):
        value = msg.headers.get(f"NServiceBus.{name}")
        if value is not None:
            shown[name] = value
    shown["body"] = _text(msg.body)
    return shown


def _running_gateway() -> Gateway:
    if _gateway is None:
        raise RuntimeError("gwcore.demo handlers run only inside `gwcore demo`")
    return _gateway


# -- the handlers GWCORE_HANDLER names -------------------------------------------------------------

async def acknowledge_price(msg: Message) -> None:
    """RemoteSite's handler: print the price update, reply with an acknowledgement."""
    gw = _running_gateway()
    _say(REMOTE, f"<- {_message_type(msg.headers)} received", _headers_shown(msg))
    try:
        update = orjson.loads(msg.body)
    except orjson.JSONDecodeError:
        update = None
    if not isinstance(update, dict):
        update = {"Body": _text(msg.body)}
    ack = orjson.dumps({**update, "Status": "Applied at RemoteSite"})
    # Choosing the reply's id lets the line go out before the reply does, so it always precedes
    # Headquarters' line about receiving it.
    reply_id = str(uuid.uuid4())
    _say(REMOTE, f"-> {_message_type(PRICE_ACK)} (reply)", {"MessageId": reply_id, "body": _text(ack)})
    await gw.reply(msg, ack, {**PRICE_ACK, "NServiceBus.MessageId": reply_id})


async def unexpected_message(msg: Message) -> None:
    """Headquarters' handler: what no pending request took (e.g. a reply that came too late)."""
    _say(HQ, f"<- {_message_type(msg.headers)}: no request is waiting for it", _headers_shown(msg))


# -- the two child processes -----------------------------------------------------------------------

# Send the price updates one at a time; *took* receives each round trip (ms).
async def _price_updates(gw: Gateway, count: int, interval: float, timeout: float, took: list[float]) -> int:
    first: tuple[str, bytes] = ("", b"")
    for n in range(1, count + 1):
        if n > 1 and interval:
            await asyncio.sleep(interval)
        body = orjson.dumps({"ProductId": f"P-{1000 + n}", "NewPrice": round(9.5 + 1.25 * n, 2)})
        msg_id = str(uuid.uuid4())
        if n == 1:
            first = (msg_id, body)
        _say(HQ, f"-> {_message_type(UPDATE_PRICE)} {n}/{count} to {REMOTE}",
             {"MessageId": msg_id, "body": _text(body)})
        started = time.perf_counter()
        try:
            reply = await gw.request(REMOTE, body, UPDATE_PRICE, timeout=timeout, message_id=msg_id)
        except TimeoutError as exc:
            _say(HQ, f"no acknowledgement: {exc}")
            return 1
        took.append((time.perf_counter() - started) * 1000)
        fields = _headers_shown(reply)
        if fields.get("CorrelationId") == msg_id:
            fields["CorrelationId"] += f"  (= the id of {_message_type(UPDATE_PRICE)} {n})"
        _say(HQ, f"<- {_message_type(reply.headers)} {n}/{count}, round trip {took[-1]:.1f} ms", fields)
    _say(HQ, f"{_updates(count)} sent, {len(took)} acknowledged; round trip min {min(took):.1f} ms, "
             f"median {statistics.median(took):.1f} ms, max {max(took):.1f} ms")
    return await _resend_first(gw, first, timeout)


async def _resend_first(gw: Gateway, first: tuple[str, bytes], timeout: float) -> int:
    """Send UpdatePrice 1 again with its id, as a sender whose 200 got lost would: RemoteSite
    answers 200 and neither stores nor handles it a second time."""
    msg_id, body = first
    forwarder = gw.forwarder
    assert forwarder is not None
    delivered = forwarder.sent
    _say(HQ, f"-> {_message_type(UPDATE_PRICE)} 1 again, on purpose, with the same id", {"MessageId": msg_id})
    await gw.send_to_sites([REMOTE], body, UPDATE_PRICE, message_id=msg_id)
    deadline = time.monotonic() + timeout
    while forwarder.sent == delivered:
        if time.monotonic() > deadline:
            _say(HQ, "the resent message was not answered in time")
            return 1
        await asyncio.sleep(0.01)
    site = gw.settings.site(REMOTE)
    assert site is not None
    parts = urllib.parse.urlsplit(site.url)
    metrics = await asyncio.to_thread(_fetch, f"{parts.scheme}://{parts.netloc}/metrics")
    value = next((line.split()[-1] for line in metrics.splitlines()
                  if line.startswith("gwcore_messages_duplicate_total ")), None)
    # the exposition writes every value as a float ("1.0"); a count reads better whole
    suppressed = f"{float(value):.0f}" if value is not None else "?"
    _say(HQ, f"<- 200 OK from {REMOTE} for the resent id: a duplicate, suppressed (stored once, handled once)",
         {"Duplicates": f"{suppressed} so far at {REMOTE} (gwcore_messages_duplicate_total)"})
    return 0


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode("utf-8", "replace")


async def _headquarters(gw: Gateway, stop: asyncio.Event, count: int, interval: float, timeout: float) -> int:
    _say(HQ, f"listening on {gw.reply_uri}; sending {_updates(count)} to {REMOTE}")
    took: list[float] = []
    sending = asyncio.ensure_future(_price_updates(gw, count, interval, timeout, took))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({sending, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if sending.done():
        return sending.result()
    sending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sending
    _say(HQ, f"interrupted: {len(took)} of {_updates(count)} acknowledged")
    return 1


async def _remote_site(gw: Gateway, stop: asyncio.Event) -> int:
    _say(REMOTE, f"listening on {gw.reply_uri}; handler {gw.settings.handler}")
    await stop.wait()
    return 0


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    # Without the demo process nobody would stop us (it was killed, or it crashed): stop ourselves.
    while os.getppid() == parent:
        await asyncio.sleep(0.5)
    stop.set()


async def _run_site(settings: Settings, parent: int, args: argparse.Namespace) -> int:
    global _gateway
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    watchdog = asyncio.ensure_future(_watch_parent(parent, stop))
    gw = _gateway = Gateway(settings)  # its handler comes from GWCORE_HANDLER
    try:
        try:
            await gw.start()
        except OSError as exc:
            _say(settings.endpoint, f"error: cannot listen on {settings.receive_channels[0].url}: {exc.strerror}")
            return 1
        try:
            if args.site == HQ:
                return await _headquarters(gw, stop, args.count, args.interval, REPLY_TIMEOUT)
            return await _remote_site(gw, stop)
        finally:
            await gw.stop()
            _say(settings.endpoint, "stopped")
    finally:
        watchdog.cancel()
        _gateway = None


def _child_main(argv: list[str]) -> int:
    parent = os.getppid()
    p = argparse.ArgumentParser(prog="python -m gwcore.demo", description="one site of `gwcore demo`")
    p.add_argument("site", choices=(HQ, REMOTE))
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--interval", type=float, default=0.5)
    args = p.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigurationError as exc:
        _say(args.site, f"error: {exc}")
        return 2
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format=f"[{settings.endpoint}]".ljust(_PREFIX_WIDTH) + "%(levelname)s %(name)s: %(message)s")
    from .server import loop_factory

    with asyncio.Runner(loop_factory=loop_factory(settings.loop)) as runner:
        return runner.run(_run_site(settings, parent, args))


# -- the demo process ------------------------------------------------------------------------------

class _Interrupted(Exception):
    pass  # Ctrl-C, SIGTERM or SIGHUP reached the demo process


# The first stop signal becomes _Interrupted; later ones (and any once the demo is cleaning up) are
# ignored, so that cleaning up is never cut short.
class _Signals:
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.armed = True
        self.name: str | None = None

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.armed:
            self.armed = False
            self.name = signal.Signals(signum).name
            raise _Interrupted(self.name)

    @contextlib.contextmanager
    def installed(self) -> Iterator["_Signals"]:
        previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


# One child gateway process as the demo process sees it.
class _Site:
    def __init__(self, name: str, port: int, option: str) -> None:
        self.name = name
        self.port = port
        self.option = option  # the `gwcore demo` option that changes the port
        self.url = f"http://{HOST}:{port}/{name}/"
        self.data_dir = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def check_port(self) -> None:
        with socket.socket() as s:
            # as the gateway binds: a port in TIME_WAIT is free, one with a listener is not
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, self.port))
            except OSError as exc:
                why = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror})"
                raise GatewayError(f"port {self.port} for {self.name} {why} on {HOST}; "
                                   f"choose another with {self.option} PORT") from None

    def start(self, variables: dict[str, str], args: list[str]) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        env = child_environment({"GWCORE_ENDPOINT": self.name, "GWCORE_RECEIVE_CHANNELS": self.url,
                                 "GWCORE_DATA_DIR": self.data_dir, **variables})
        # Its own process group: Ctrl-C reaches only the demo process, which stops the sites in order.
        self.proc = subprocess.Popen([sys.executable, "-m", "gwcore.demo", self.name, *args], env=env,
                                     stdin=subprocess.DEVNULL, process_group=0)
        _say("demo", f"{self.name} started (pid {self.proc.pid})")

    def wait_listening(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise GatewayError(f"{self.name} exited with status {self.proc.returncode} before it listened "
                                   f"on port {self.port} (if the port is taken, choose another with {self.option})")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise GatewayError(f"{self.name} did not listen on port {self.port} within {timeout:g} s")

    # SIGTERM, wait, and SIGKILL if it does not stop in time; the exit status.
    def stop(self) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _say("demo", f"{self.name} did not stop within {STOP_TIMEOUT:g} s: killing it")
                proc.kill()
                proc.wait()
            _say("demo", f"{self.name} stopped (exit {proc.returncode})")
        return proc.returncode


def _remove(root: str) -> None:
    try:
        shutil.rmtree(root)
    except OSError as exc:
        _say("demo", f"could not remove {root}: {exc}")
    else:
        _say("demo", f"removed {root}")


def run(*, count: int = 5, hq_port: int = 25899, remote_port: int = 25900, data_dir: str | None = None,
        keep: bool = False, interval: float = 0.5, verbose: bool = False) -> int:
    """Run the demo; returns the exit status (0: every price update acknowledged, 130: interrupted).

    :param data_dir: where the sites keep their stores (``<data_dir>/Headquarters`` and
        ``<data_dir>/RemoteSite``); never removed. Default: a new temporary dir, removed at the end
        unless *keep*.
    :raises GatewayError: bad arguments, a port in use, or RemoteSite did not start.
    """
    if count < 1:
        raise GatewayError(f"--count {count}: send at least 1 price update")
    if interval < 0:
        raise GatewayError(f"--interval {interval:g}: cannot be negative")
    hq, remote = _Site(HQ, hq_port, "--hq-port"), _Site(REMOTE, remote_port, "--remote-port")
    for site in (hq, remote):
        if not 0 < site.port < 65536:
            raise GatewayError(f"{site.option} {site.port}: a port is 1-65535")
    if hq_port == remote_port:
        raise GatewayError(f"--hq-port and --remote-port are both {hq_port}: each site needs its own port")
    for site in (remote, hq):
        site.check_port()

    temporary = data_dir is None
    root = tempfile.mkdtemp(prefix="gwcore-demo-") if data_dir is None else os.path.abspath(data_dir)
    shared = {"GWCORE_LOG_LEVEL": "info" if verbose else "warning",
              "GWCORE_RETRY_DELAYS": "1s",  # a send that fails is tried again soon, not after a minute
              "GWCORE_SHUTDOWN_TIMEOUT": "5s"}
    _say("demo", f"the NServiceBus gateway sample on loopback: {HQ} sends {_updates(count)} to {REMOTE}, "
                 f"which acknowledges {'each' if count > 1 else 'it'}")
    for site in (hq, remote):
        site.data_dir = os.path.join(root, site.name)
        _say("demo", f"{site.name:<13} {site.url:<38} data {site.data_dir}")
    signals = _Signals()
    status = 1
    with signals.installed():
        try:
            remote.start({**shared, "GWCORE_HANDLER": "gwcore.demo:acknowledge_price"}, [])
            remote.wait_listening(START_TIMEOUT)
            hq.start({**shared, "GWCORE_HANDLER": "gwcore.demo:unexpected_message",
                      "GWCORE_SITES": f"{REMOTE}={remote.url}"},
                     ["--count", str(count), "--interval", repr(interval)])
            assert hq.proc is not None
            hq_status = hq.proc.wait()
            _say("demo", f"{HQ} finished (exit {hq_status}); stopping {REMOTE} with SIGTERM")
            signals.armed = False
            remote_status = remote.stop()
            status = 0 if hq_status == 0 and remote_status == 0 else 1
        except _Interrupted:
            _say("demo", f"{signals.name}: stopping {HQ} and {REMOTE}")
            status = 130
        finally:
            signals.armed = False
            hq.stop()
            remote.stop()
            if temporary and not keep:
                _remove(root)
            else:
                _say("demo", f"data kept in {root}")
    return status


if __name__ == "__main__":
    # `python -m gwcore.demo` runs this file as __main__; run the children in the module proper, the
    # one GWCORE_HANDLER=gwcore.demo:... imports, so that the handlers see the gateway.
    from gwcore.demo import _child_main as child_main

    raise SystemExit(child_main(sys.argv[1:]))
