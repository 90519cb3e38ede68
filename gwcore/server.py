"""Running a gateway as a process: loop choice, signals, graceful drain."""

from __future__ import annotations

import asyncio
import datetime
import gc
import logging
import signal
import sys
from typing import Callable

import orjson

from . import malloc
from .config import Settings, malloc_set_by_operator
from .errors import ConfigurationError
from .gateway import Gateway

__all__ = ("LOOP_FACTORIES", "JSONFormatter", "loop_factory", "serve", "setup_logging")

log = logging.getLogger("gwcore")
#: The cyclic collector's youngest-generation threshold once serving (see settle_gc).
_GC_GEN0 = 50_000

def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError as exc:
        raise ConfigurationError(f"GWCORE_LOOP=uvloop but uvloop is not importable: {exc}") from exc
    return uvloop.new_event_loop


def _auto_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        return _uvloop_factory()
    except ConfigurationError:
        log.warning("uvloop is not installed: running on the asyncio default loop (slower)")
        return asyncio.new_event_loop


LOOP_FACTORIES: dict[str, Callable[[], Callable[[], asyncio.AbstractEventLoop]]] = {
    "auto": _auto_factory,
    "uvloop": _uvloop_factory,
    "asyncio": lambda: asyncio.new_event_loop,
}


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        return LOOP_FACTORIES[name]()
    except KeyError:
        raise ConfigurationError(f"GWCORE_LOOP={name!r} is not one of {', '.join(LOOP_FACTORIES)}") from None


class JSONFormatter(logging.Formatter):
    """GWCORE_LOG_FORMAT=json: one JSON object per line, ``time`` (UTC, ISO 8601 with
    milliseconds), ``level``, ``logger``, ``message``, and ``exception`` (the traceback's text)
    when there is one. A message never spans lines: its newlines are escaped by JSON."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr at *level*, as ``text`` lines or ``json`` objects (GWCORE_LOG_FORMAT)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


async def _serve(settings: Settings) -> int:
    gateway = Gateway(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await gateway.start()
    settle_gc()
    try:
        requested = asyncio.ensure_future(gateway.stop_requested.wait())  # `gwcore handover`
        requested.add_done_callback(lambda _f: stop.set())
        stopping = asyncio.ensure_future(stop.wait())
        takeover = gateway.takeover
        if takeover is not None:
            # A passive node: a takeover that fails ends the process (status 1), so a supervisor
            # restarts it rather than leaving a node that answers 503 for ever.
            await asyncio.wait([stopping, takeover], return_when=asyncio.FIRST_COMPLETED)
            if takeover.done() and not takeover.cancelled() and takeover.exception() is not None:
                stopping.cancel()
                return 1
        await stopping
        if gateway.failure is None:
            log.info("signal received: draining (up to %gs)", settings.shutdown_timeout)
    finally:
        await gateway.stop()
    if gateway.failure is not None:
        raise gateway.failure  # gwcore serve exits with it (status 2), as with a start that failed
    return 0


def settle_gc() -> None:
    """Once started: what start-up allocated moves out of the collector's sight (``gc.freeze``),
    and the youngest generation is collected every 50,000 allocations instead of 700. The hot
    paths allocate short-lived objects (envelopes, answer slots, per-message outcomes) that
    reference counting frees; at 700 the cyclic collector ran every few dozen messages and took
    about a tenth of a batch receiver's loop thread (py-spy, docs/architecture.md)."""
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(_GC_GEN0, gen1, gen2)


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain and exit 0."""
    malloc.allow(malloc_set_by_operator())  # applied at the first batch (gwcore/malloc.py)
    with asyncio.Runner(loop_factory=loop_factory(settings.loop)) as runner:
        return runner.run(_serve(settings))
