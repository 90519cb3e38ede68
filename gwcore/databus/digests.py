"""Body digests of blobs: base64 as the index records and the headers carry them, and the RFC 9530
``Content-Digest`` header (a part's SHA-256; the sender adds it, the receiver checks it)."""

from __future__ import annotations

import base64

__all__ = ("b64", "content_digest", "digest_sha256")


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def content_digest(sha256_b64: str) -> str:
    """The RFC 9530 ``Content-Digest`` value of a body whose SHA-256 is *sha256_b64* (base64)."""
    return f"sha-256=:{sha256_b64}:"


def digest_sha256(value: str) -> str | None:
    """The base64 SHA-256 a ``Content-Digest`` value gives (RFC 9530), or None when it names
    only other algorithms (those are ignored, as the RFC says).

    :raises ValueError: the ``sha-256`` member is not a base64 SHA-256 between colons.
    """
    for member in value.split(","):
        alg, eq, rest = member.strip().partition("=")
        if not eq or alg.strip().lower() != "sha-256":
            continue
        rest = rest.strip()
        if len(rest) < 2 or rest[0] != ":" or rest[-1] != ":":
            raise ValueError("the sha-256 member of Content-Digest is not a byte sequence (:base64:)")
        try:
            raw = base64.b64decode(rest[1:-1], validate=True)
        except (ValueError, TypeError):
            raise ValueError("the sha-256 member of Content-Digest is not base64") from None
        if len(raw) != 32:
            raise ValueError("the sha-256 member of Content-Digest is not 32 bytes")
        return b64(raw)
    return None
