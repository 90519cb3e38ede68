"""The consuming side: the databus properties of a received message, each a local blob file
named by its header's value.
"""

from __future__ import annotations

import os
from typing import BinaryIO, Mapping

from .layout import DATABUS_PREFIX, is_name

__all__ = ("Blob", "message_blobs")


class Blob:
    """A databus property of a received message: the local blob behind one header.

    :ivar header: the message header (``NServiceBus.DataBus.<sender's key>``).
    :ivar key: the local blob key (the header's value).
    :ivar path: the blob file; it lives until the message's TimeToBeReceived, else
        ``GWCORE_DATABUS_TTL``, after acceptance.
    """

    __slots__ = ("header", "key", "path")

    def __init__(self, header: str, key: str, path: str) -> None:
        self.header = header
        self.key = key
        self.path = path

    def open(self) -> BinaryIO:
        """A binary reader of the blob (a file: read it in pieces for large properties)."""
        return open(self.path, "rb")

    def read(self) -> bytes:
        """The whole property (only for properties that fit in memory)."""
        with self.open() as f:
            return f.read()

    @property
    def size(self) -> int:
        return os.path.getsize(self.path)

    def __repr__(self) -> str:
        return f"<Blob {self.header!r} key={self.key!r}>"


def message_blobs(directory: str, headers: Mapping[str, str]) -> dict[str, Blob]:
    """``header name -> Blob`` for every databus header whose value names a local blob."""
    out = {}
    for name, value in headers.items():
        if name.startswith(DATABUS_PREFIX) and is_name(value):
            out[name] = Blob(name, value, os.path.join(directory, value))
    return out
