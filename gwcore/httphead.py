"""The head of an HTTP/1.1 answer, shared by every listener module (gwcore/http.py, the
distributor's file answers in gwcore/distributor/listener.py): the status line, the headers
every answer has, and a reason phrase made fit for it."""

from __future__ import annotations

import logging

from .errors import StoreError

__all__ = ("ascii_reason", "render_head", "error_answer")

log = logging.getLogger("gwcore.http")


def ascii_reason(text: str) -> str:
    """*text* as a reason phrase: one line of visible ASCII (.NET writes '?' for what it cannot
    encode), at most 512 characters."""
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)[:512]


def render_head(status: int, reason: str, date: bytes, length: int, content_type: bytes, close: bool,
                extra: bytes) -> bytes:
    """The head of an answer with a body of *length* bytes; *reason* is visible ASCII already
    (:func:`ascii_reason`), *extra* further header lines, each ending in CRLF."""
    return b"HTTP/1.1 %d %s\r\nServer: gwcore\r\nDate: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n" % (
        status, reason.encode("ascii"), date, content_type, length, extra,
        b"Connection: close\r\n" if close else b"",
    )


def error_answer(exc: BaseException, what: str) -> tuple[int, str]:
    """The status and reason for a request that failed with *exc* inside gwcore: a store or
    broker that cannot take it now is 503 with its reason (retry later); anything else is a bug,
    logged, and 502 as NServiceBus answers it."""
    if isinstance(exc, StoreError):
        return 503, f"Service Unavailable: {exc}"
    log.error("%s failed: %r", what, exc, exc_info=exc)
    return 502, "Unexpected server error"
