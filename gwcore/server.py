"""Running a gateway as a process: loop choice, signals, graceful drain."""

from __future__ import annotations

import asyncio
import ctypes
import datetime
import gc
import logging
import signal
import sys
from typing import Callable

import orjson

from .config import Settings, malloc_set_by_operator
from .errors import ConfigurationError
from .gateway import Gateway

__all__ = ("LOOP_FACTORIES", "JSONFormatter", "loop_factory", "serve", "setup_logging")

log = logging.getLogger("gwcore")
#: The cyclic collector's youngest-generation threshold once serving (see settle_gc).
_GC_GEN0 = 50_000
#: glibc malloc once serving (see tune_malloc): blocks below this come from the heap, not mmap
#: (32 MiB is glibc's largest), and up to _TRIM_THRESHOLD of free heap is kept for reuse.
_MMAP_THRESHOLD = 32 << 20
_TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


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


def tune_malloc(set_by_operator: bool | None = None) -> bool:
    """Once serving, on glibc: a receive buffer that grew to a batch (megabytes) and shrank again
    leaves its memory in the heap for the next batch instead of giving it back to the kernel.

    By default glibc serves such blocks with mmap and unmaps them when they shrink or are freed,
    so every batch request faulted its buffer's pages in afresh and had the kernel zero them:
    1,024 page faults per 4 MiB buffer, about a tenth of a batch receiver's loop thread in a
    ``perf`` profile (docs/benchmarks.md). With blocks below 32 MiB from the heap and up to
    64 MiB of free heap kept, the same buffers cost no fault after the first.

    Nothing is changed when ``GLIBC_TUNABLES`` already sets malloc options (the operator's word
    wins; *set_by_operator*, by default :func:`gwcore.config.malloc_set_by_operator`) or the C
    library is not glibc. Returns whether the settings were applied."""
    if malloc_set_by_operator() if set_by_operator is None else set_by_operator:
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) & bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain and exit 0."""
    if tune_malloc():
        log.debug("glibc malloc: mmap threshold %d MiB, trim threshold %d MiB",
                  _MMAP_THRESHOLD >> 20, _TRIM_THRESHOLD >> 20)
    with asyncio.Runner(loop_factory=loop_factory(settings.loop)) as runner:
        return runner.run(_serve(settings))
