"""The sending side: each databus property of an outgoing message is copied into the blob store
durably before the message is queued (its header value names the blob), so a forwarder reads
each part from disk as it sends it (gwcore/egress.py).
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import IO, BinaryIO, Union

from ..filemodes import PRIVATE, Modes
from .digests import b64
from .layout import DATABUS_PREFIX, TMP, fsync_dir, new_name

__all__ = ("Source", "copy_in", "databus_header")

_CHUNK = 1 << 20

#: What the sending API takes for one property: the bytes, a file path, or a binary stream.
Source = Union[bytes, bytearray, memoryview, str, os.PathLike, BinaryIO]


def copy_in(directory: str, source: Source, name: str | None = None, modes: Modes = PRIVATE) -> tuple[str, int, str, str]:
    """Copy one databus property into the blob store durably (blocking: run it in a thread).
    Returns ``(blob name, size, Content-MD5, SHA-256)``; streams, never reads a file whole."""
    name = name or new_name()
    tmp = os.path.join(directory, TMP + name)
    md5 = hashlib.md5(usedforsecurity=False)
    sha = hashlib.sha256()
    size = 0
    close_src = False
    if isinstance(source, (bytes, bytearray, memoryview)):
        src: IO[bytes] = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        src = open(source, "rb")
        close_src = True
    elif hasattr(source, "read"):
        src = source
    else:
        raise TypeError(f"a databus property is bytes, a file path or a binary stream, not {type(source).__name__}")
    fd = modes.open_new(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC)
    try:
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                raise TypeError("a databus stream must be binary (read() returned text)")
            md5.update(chunk)
            sha.update(chunk)
            size += len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, os.path.join(directory, name))
        fsync_dir(directory)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        if close_src:
            src.close()
    return name, size, b64(md5.digest()), b64(sha.digest())


def databus_header(name: str) -> str:
    """The message header of a property: ``NServiceBus.DataBus.<name>`` (a full name as given)."""
    return name if name.startswith(DATABUS_PREFIX) else DATABUS_PREFIX + name
