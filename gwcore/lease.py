"""The data dir's lease: an exclusive ``flock`` on ``<data dir>/gwcore.lock``.

Whoever holds it is the one process that writes the store (the active node). The lock belongs to
an open file description, so it is released by the kernel the instant its process dies, however it
dies: a crashed active never leaves a stale lease behind, and a passive node blocked on the same
lock wakes at once (docs/deployment.md, "Active/passive on shared storage", has the measurement
that chose a blocking wait over polling).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import threading

from .errors import StoreUnavailableError

__all__ = ("LOCK_NAME", "take_lease", "try_lease", "lease_holder", "LeaseWaiter", "data_dir_error")

LOCK_NAME = "gwcore.lock"


def data_dir_error(path: str, exc: OSError, what: str = "data dir (GWCORE_DATA_DIR)") -> StoreUnavailableError:
    """The one-line error for a directory gwcore cannot make or write (the data dir, or *what*
    else): what is wrong with *path*, not where in gwcore it was noticed."""
    if os.path.lexists(path) and not os.path.isdir(path):
        problem = "is not a directory"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        problem = f"is not writable ({os.strerror(exc.errno)})"
    elif exc.errno == errno.ENOTDIR:
        problem = "cannot be created: a part of its path is not a directory"
    else:
        problem = f"cannot be used: {exc.strerror or exc}"
    name, _, variable = what.partition(" (")
    return StoreUnavailableError(f"the {name} {path!r}{' (' + variable if variable else ''} {problem}")


def _open(path: str) -> int:
    """Make the data dir if needed and open its lock file (private until the store,
    gwcore/filemodes.py, gives the data dir its configured modes).

    :raises StoreUnavailableError: the data dir is not a directory, or cannot be made or written.
    """
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        return os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise data_dir_error(path, exc) from None


def _stamp(fd: int) -> int:
    # Who holds it, for the passive's log line and the "in use" error; informative only.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


def lease_holder(path: str) -> str:
    """``"pid <n> on <host>"`` of the process that took the lease last (``"unknown"`` if none)."""
    try:
        with open(os.path.join(path, LOCK_NAME), "rb") as f:
            pid, _, host = f.read(256).decode(errors="replace").strip().partition(" ")
    except OSError:
        return "unknown"
    return f"pid {pid} on {host}" if host else (f"pid {pid}" if pid else "unknown")


def try_lease(path: str) -> int | None:
    """Take the lease if it is free: the locked descriptor (close it to release), else None.

    :raises StoreUnavailableError: the data dir is not a directory, or cannot be made or written.
    """
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return _stamp(fd)


def take_lease(path: str) -> int:
    """Like :func:`try_lease`, but a held lease is an error naming its holder.

    :raises StoreUnavailableError: another process holds the lease.
    """
    fd = try_lease(path)
    if fd is None:
        raise StoreUnavailableError(
            f"the store at {path!r} is in use by another gwcore process ({lease_holder(path)}); "
            "one data dir serves one gateway process (GWCORE_DATA_DIR; GWCORE_HA=on waits as passive)")
    return fd


class LeaseWaiter:
    """Waits for the lease in a thread blocked in ``flock`` (the kernel wakes it when the holder
    releases the lock or dies) and hands the locked descriptor to the event loop.

    :meth:`acquire` is cancellable: a lease won after the waiter was abandoned is released at
    once, so an abandoned waiter never keeps a store locked (a thread in ``flock`` cannot be
    interrupted, so in a process that goes on running it takes the freed lock for an instant).
    """

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop) -> None:
        self._fd = _open(path)
        self._loop = loop
        self._future: asyncio.Future[int] = loop.create_future()
        self._mutex = threading.Lock()
        self._abandoned = False
        self._won = False
        self._handed = False
        self._thread = threading.Thread(target=self._run, name="gwcore-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # EINTR is retried by Python (PEP 475)
            _stamp(self._fd)
        except OSError as exc:
            os.close(self._fd)  # not locked: nothing to release, nothing to hand over
            self._deliver(False, exc)
            return
        with self._mutex:
            if self._abandoned:
                os.close(self._fd)
                return
            self._won = True
        self._deliver(True, self._fd)

    def _deliver(self, ok: bool, value: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._settle, ok, value)
        except RuntimeError:  # the loop is closed: nobody will take the lease, release it
            self.abandon()

    def _settle(self, ok: bool, value: object) -> None:
        if self._future.done():
            return
        if ok:
            self._future.set_result(value)  # type: ignore[arg-type]
        else:
            self._future.set_exception(value)  # type: ignore[arg-type]

    async def acquire(self) -> int:
        """The locked descriptor once the lease is ours (the caller then owns it)."""
        try:
            fd = await self._future
        except BaseException:
            self.abandon()
            raise
        with self._mutex:
            self._handed = True
        return fd

    def abandon(self) -> None:
        """Give up waiting; releases the lease if it was won and not handed over yet."""
        with self._mutex:
            if self._abandoned:
                return
            self._abandoned = True
            if self._won and not self._handed:
                os.close(self._fd)
