r"""Per-site shared-secret request signing (design.md §6): scheme ``v2``, and ``v1`` before it.

Scheme v2 (what gwcore sends). The sender adds three headers to each gateway request::

    Content-Digest: sha-256=:<base64 SHA-256 of the body>:     (RFC 9530, URL-encoded as every value)
    gwcore-Date: 20261126T171029Z
    gwcore-Signature: v2.<key id>.<signature>

*signature* is the unpadded base64url HMAC-SHA256, keyed with the site's secret, of the canonical
string (UTF-8)::

    gwcore-v2 LF <METHOD> LF <target> LF <header lines joined by LF>

*METHOD* upper case, *target* the request target exactly as sent (path and query). The header
lines (:func:`canonical_headers`) are one ``<name>:<value>`` line per *covered* header: every
``NServiceBus.*`` and ``gwcore-*`` header but ``gwcore-Signature``, and ``Content-MD5`` and
``Content-Digest``; the name URL-decoded and in ASCII lower case, the value URL-decoded (as the
receiver's framer decodes both); in names and values a backslash is written ``\\`` and a line
feed ``\n``, in names a colon ``\:``; sorted by the lower-case name (UTF-8 bytes). The headers
are signed as they are on the wire, before the receiver unwraps ``NServiceBus.Header.*``. A
request may not repeat a name (the receiver refuses that with 400), so the lines, and so the
string, split back one way only. The receiver builds the lines from every covered header it
received: a header added, removed or changed on the way changes them, and the request is refused.

Everything v2 covers is in the request's head, so the receiver checks it before it reads the
body: a forged databus part is refused before a byte of it is written. The body is then checked
against the declared Content-Digest (a mismatch is a 412, nothing is kept).

Scheme v1 (still accepted unless ``accept_v1 = false``; worker calls use it, see below): the
canonical string is six lines, ``gwcore-v1``, the method, the target, the date, the decoded
message id and the padded standard base64 SHA-256 of the body (:func:`sign`). It covers no other
header. A v1-signed databus part is checked at its head against its declared Content-Digest,
which it must carry.

Neither scheme signs the Content-MD5 instead of a SHA-256: MD5 collisions are cheap to make, and
the signature must not inherit that.

The date and signature values use only characters that .NET URL encoding leaves alone
(``A-Z a-z 0-9 - _ .``), so they read the same raw, URL-encoded or URL-decoded; the header names
have no dots or underscores, which proxies such as nginx drop by default.

Replays: a captured request verifies again only while its date is within ``max_skew_s`` of the
receiver's clock. Inside that window a replay is harmless: the message id and body are signed, so
it can only be the same message again, and the receiver deduplicates it (200, not stored twice),
as long as dedup records live longer than the window (days against minutes). Outside it, the
request is refused as ``date-out-of-window``. Path and method are signed too, so a request for one
channel cannot be replayed against another; use one secret per pair of sites.
"""

from __future__ import annotations

import base64
import calendar
import collections
import functools
import hashlib
import hmac
import os
import re
import time
from typing import Any, Callable, Iterable, Mapping

from ._core import core
from .databus.digests import content_digest, digest_sha256
from .errors import AuthenticationError

__all__ = (
    "sign",
    "signature_headers",
    "verify",
    "sign_v2",
    "canonical_headers",
    "canonical_v2",
    "signature_lines",
    "signature_headers_v2",
    "verify_v2",
    "body_digest",
    "check_key_id",
    "check_secret",
    "Verifier",
    "format_date",
    "DATE_HEADER",
    "SIGNATURE_HEADER",
    "DIGEST_HEADER",
    "MIN_SECRET_BYTES",
    # AuthenticationError.reason values
    "MISSING_SIGNATURE",
    "MALFORMED_SIGNATURE",
    "V1_REFUSED",
    "MISSING_DATE",
    "MISSING_DIGEST",
    "BAD_DATE",
    "BAD_SIGNATURE",
    "DATE_OUT_OF_WINDOW",
    "REPLAYED",
    "NONCE_HEADER",
    "call_headers",
    "CallVerifier",
    "NonceSource",
)

DATE_HEADER = "gwcore-Date"
SIGNATURE_HEADER = "gwcore-Signature"
DIGEST_HEADER = "Content-Digest"
MIN_SECRET_BYTES = 16

MISSING_SIGNATURE = "missing-signature"
MALFORMED_SIGNATURE = "malformed-signature"
V1_REFUSED = "v1-refused"
MISSING_DATE = "missing-date"
MISSING_DIGEST = "missing-digest"
BAD_DATE = "bad-date"
BAD_SIGNATURE = "bad-signature"
DATE_OUT_OF_WINDOW = "date-out-of-window"
REPLAYED = "replayed"
MISSING_NONCE = "missing-nonce"

#: Worker calls (``/.gwcore/worker/...``) carry this header besides the date and signature.
NONCE_HEADER = "gwcore-Nonce"

_V1, _V2 = "v1", "v2"
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z\Z")
_SIG = re.compile(r"[A-Za-z0-9_-]{43}\Z")  # 32 bytes, unpadded base64url
_NONCE = re.compile(r"([A-Za-z0-9_-]{8,64})\.([1-9][0-9]{0,18})\Z")  # <stream>.<counter>
# An unknown key id is checked against this, so that it costs what a wrong secret costs and gets
# the same answer: a caller cannot tell which key ids exist, by the reason or by the time.
_NO_SECRET = os.urandom(32)
_BAD_SIGNATURE_TEXT = ("the signature does not match: a key id or secret this site does not have, or a "
                       "request changed on the way")


def check_key_id(key_id: str) -> None:
    """:raises ValueError: *key_id* is not 1-64 of ``A-Z a-z 0-9 _ -`` (site and worker keys alike)."""
    if not _KEY_ID.match(key_id):
        raise ValueError(f"key id {key_id!r}: use 1-64 of A-Z a-z 0-9 _ -")


def check_secret(secret: bytes) -> None:
    """:raises ValueError: *secret* is shorter than :data:`MIN_SECRET_BYTES`."""
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"signing secret must be at least {MIN_SECRET_BYTES} bytes")


def body_digest(body: bytes) -> str:
    """The canonical string's body digest: padded standard base64 of SHA-256(*body*)."""
    return base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")


def format_date(now: float) -> str:
    """``gwcore-Date`` value for *now* (seconds since the epoch): ``YYYYMMDDTHHMMSSZ``, UTC."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


def _mac(secret: bytes, canonical: bytes) -> str:
    return base64.urlsafe_b64encode(hmac.digest(secret, canonical, "sha256")).rstrip(b"=").decode("ascii")


# -- scheme v1 --------------------------------------------------------------------------------------

def sign(secret: bytes, method: str, path: str, date_value: str, message_id: str, body_digest: str) -> str:
    """The scheme v1 signature (unpadded base64url HMAC-SHA256) of one request's canonical string.

    :raises ValueError: *secret* is shorter than :data:`MIN_SECRET_BYTES`, or *method*, *path*,
        *date_value* or *body_digest* contains a newline.
    """
    check_secret(secret)
    return _mac(secret, _canonical_v1(method, path, date_value, message_id, body_digest))


def _canonical_v1(method: str, path: str, date_value: str, message_id: str, body_digest: str) -> bytes:
    for name, value in (("method", method), ("path", path), ("date", date_value), ("body digest", body_digest)):
        if "\n" in value:
            raise ValueError(f"{name} must not contain a newline")
    return "\n".join(("gwcore-" + _V1, method.upper(), path, date_value, message_id, body_digest)).encode("utf-8")


def signature_headers(secret: bytes, key_id: str, method: str, path: str, message_id: str, body: bytes,
                      now: float | None = None, *, digest: str | None = None) -> list[tuple[bytes, bytes]]:
    """Scheme v1: the ``gwcore-Date`` and ``gwcore-Signature`` headers for one request, ready for
    the wire. v1 covers no header but the id: sign with :func:`signature_headers_v2`.

    :param key_id: names the secret at the receiver: 1-64 of ``A-Z a-z 0-9 _ -``.
    :param digest: :func:`body_digest` of a body not passed as *body* (a databus blob on disk).
    :param now: seconds since the epoch (default: the current time).
    :raises ValueError: bad *key_id* or *secret* (see :func:`sign`).
    """
    check_key_id(key_id)
    date_value = format_date(time.time() if now is None else now)
    signature = sign(secret, method, path, date_value, message_id, digest if digest is not None else body_digest(body))
    return [
        (DATE_HEADER.encode("ascii"), date_value.encode("ascii")),
        (SIGNATURE_HEADER.encode("ascii"), f"{_V1}.{key_id}.{signature}".encode("ascii")),
    ]


def verify(secrets: Mapping[str, bytes], method: str, path: str,
           headers_lookup: Callable[[str], str | bytes | None] | Mapping[str, str | bytes],
           message_id: str, body_digest: str, now: float, max_skew_s: float) -> None:
    """Check a request's scheme v1 signature; return None when it is valid.

    Checks run in this order, and the first failure is raised: signature header present and well
    formed, date header present, HMAC matches (an unknown key id fails here, like a wrong
    secret), date parses, date within *max_skew_s* of *now*. The HMAC is checked before the date
    is interpreted, so ``date-out-of-window`` always means a genuine request that is too old or
    too new (a replay or a clock problem), never a forgery.

    :param secrets: key id -> secret.
    :param path: the request target as received.
    :param headers_lookup: a callable or mapping giving a header value by name (``gwcore-Date``,
        ``gwcore-Signature``), or None when absent; matching names without regard to case is
        up to it. Raw or URL-decoded values both work.
    :param message_id: the decoded ``NServiceBus.Id``.
    :param body_digest: :func:`body_digest` of the received body.
    :param now: the receiver's time, seconds since the epoch.
    :param max_skew_s: largest accepted distance, either way, between *now* and the date.
    :raises gwcore.errors.AuthenticationError: with ``reason`` one of this module's reason
        constants and a message a person can act on.
    """
    get = headers_lookup.get if isinstance(headers_lookup, Mapping) else headers_lookup
    key_id, given = _split(_text(get(SIGNATURE_HEADER)), (_V1,))[1:]
    date_value = _date_of(_text(get(DATE_HEADER)))
    _check(secrets, key_id, given, date_value, now, max_skew_s,
           lambda: _canonical_v1(method, path, date_value, message_id, body_digest))


# -- scheme v2 --------------------------------------------------------------------------------------

_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_ESCAPE_NAME = str.maketrans({"\\": "\\\\", "\n": "\\n", ":": "\\:"})
_ESCAPE_VALUE = str.maketrans({"\\": "\\\\", "\n": "\\n"})


def _covered(low: str) -> bool:
    return ((low.startswith("nservicebus.") or low.startswith("gwcore-")) and low != "gwcore-signature"
            or low in ("content-md5", "content-digest"))


def canonical_headers(headers: Iterable[tuple[str, str]]) -> bytes:
    """The header lines of a v2 canonical string, from a request's headers as decoded
    ``(name, value)`` text (``gwcore._dedup.url_decode`` of the wire bytes). Headers v2 does not
    cover are left out. This is the readable reference; gwcore itself uses the framer's build of
    the same lines (``gwcore._dedup.signing_headers``), and the tests hold the two equal.

    :raises ValueError: a name appears twice (ignoring ASCII case), which a receiver refuses.
    """
    lines: dict[str, str] = {}
    seen = set()
    for name, value in headers:
        low = name.translate(_LOWER)
        if low in seen:
            raise ValueError(f"header {name!r} appears more than once")
        seen.add(low)
        if _covered(low):
            lines[low] = value
    return "\n".join(f"{n.translate(_ESCAPE_NAME)}:{lines[n].translate(_ESCAPE_VALUE)}"
                     for n in sorted(lines)).encode("utf-8")


def canonical_v2(method: str, target: str, header_lines: bytes) -> bytes:
    """The whole v2 canonical string: ``gwcore-v2``, *method* (upper-cased), *target*, each ended
    by LF, then *header_lines* (:func:`canonical_headers`).

    :raises ValueError: *method* or *target* contains a newline.
    """
    if "\n" in method or "\n" in target:
        raise ValueError("method and target must not contain a newline")
    return f"gwcore-{_V2}\n{method.upper()}\n{target}\n".encode("utf-8") + header_lines


def sign_v2(secret: bytes, method: str, target: str, header_lines: bytes) -> str:
    """The v2 signature (unpadded base64url HMAC-SHA256) of :func:`canonical_v2`.

    :raises ValueError: *secret* is shorter than :data:`MIN_SECRET_BYTES`, or see :func:`canonical_v2`.
    """
    check_secret(secret)
    return _mac(secret, canonical_v2(method, target, header_lines))


def signature_lines(secret: bytes, key_id: str, method: str, target: str, block: bytes, sha256: str,
                    now: float | None = None) -> bytes:
    """The ``Content-Digest``, ``gwcore-Date`` and ``gwcore-Signature`` header lines that sign a
    request whose other header lines are *block* (``Name: value\\r\\n`` each, as on the wire).

    :param sha256: the body's SHA-256, padded standard base64 (:func:`body_digest`).
    :raises ValueError: bad *key_id* or *secret*; *block* has a malformed line, or repeats a name,
        or already holds a ``Content-Digest``, ``gwcore-Date`` or ``gwcore-Signature``.
    """
    check_key_id(key_id)
    date_value = format_date(time.time() if now is None else now)
    added = (b"Content-Digest: " + core.url_encode(content_digest(sha256)).encode("ascii")
             + b"\r\ngwcore-Date: " + date_value.encode("ascii") + b"\r\n")
    signature = sign_v2(secret, method, target, core.signing_headers(block + added))
    return added + f"{SIGNATURE_HEADER}: {_V2}.{key_id}.{signature}\r\n".encode("ascii")


def signature_headers_v2(secret: bytes, key_id: str, method: str, target: str,
                         headers: Iterable[tuple[bytes, bytes]], body: bytes = b"", *,
                         digest: str | None = None, now: float | None = None) -> list[tuple[bytes, bytes]]:
    """Scheme v2: the ``Content-Digest``, ``gwcore-Date`` and ``gwcore-Signature`` headers that
    sign a request with *headers* (``(name, value)`` as written on the wire, URL-encoded as in
    protocol.md §1.2) and *body*; send them along with *headers*, in any order.

    :param target: the request target exactly as written on the request line
        (``SiteClient.target``).
    :param digest: :func:`body_digest` of a body not passed as *body* (a file streamed from disk).
    :raises ValueError: see :func:`signature_lines`.
    """
    block = b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    lines = signature_lines(secret, key_id, method, target, block,
                            digest if digest is not None else body_digest(body), now)
    return [tuple(line.split(b": ", 1)) for line in lines.split(b"\r\n") if line]  # type: ignore[misc]


def verify_v2(secrets: Mapping[str, bytes], method: str, target: str, signature: str | None,
              date_value: str | None, header_lines: bytes, now: float, max_skew_s: float) -> None:
    """Check a request's v2 signature over its head; return None when it is valid. (The body
    is checked separately, against the declared ``Content-Digest``, which *header_lines* holds.)

    Checks in this order: signature present and well formed, date present, HMAC (an unknown key
    id fails here, like a wrong secret), date well formed, date within the window.

    :param signature: the decoded ``gwcore-Signature``; *date_value* the decoded ``gwcore-Date``.
    :param header_lines: :func:`canonical_headers` of the request as received.
    :raises gwcore.errors.AuthenticationError: as :func:`verify`.
    """
    key_id, given = _split(signature, (_V2,))[1:]
    _check(secrets, key_id, given, _date_of(date_value), now, max_skew_s,
           lambda: canonical_v2(method, target, header_lines))


# -- the checks both schemes share --------------------------------------------------------------------

def _split(raw_sig: str | None, versions: tuple[str, ...]) -> tuple[str, str, str]:
    # (version, key id, signature) of a gwcore-Signature value in one of the versions
    if raw_sig is None or not raw_sig.strip():
        raise AuthenticationError(MISSING_SIGNATURE, f"no {SIGNATURE_HEADER} header")
    parts = raw_sig.strip().split(".")
    if len(parts) != 3 or parts[0] not in versions or not _KEY_ID.match(parts[1]) or not _SIG.match(parts[2]):
        forms = " or ".join(f"'{v}.<key id>.<signature>'" for v in versions)
        raise AuthenticationError(MALFORMED_SIGNATURE, f"{SIGNATURE_HEADER} is not {forms}")
    return parts[0], parts[1], parts[2]


def _date_of(value: str | None) -> str:
    if value is None or not value.strip():
        raise AuthenticationError(MISSING_DATE, f"no {DATE_HEADER} header")
    return value.strip()


def _check(secrets: Mapping[str, bytes], key_id: str, given: str, date_value: str, now: float, max_skew_s: float,
           canonical: Callable[[], bytes]) -> None:
    """The HMAC of ``canonical()`` under *key_id*'s secret against *given*, then the date: the one
    check of every scheme. An unknown key id is checked against a random secret, so that it
    costs what a wrong secret costs and gets the same answer."""
    secret = secrets.get(key_id)
    try:
        if secret is not None:
            check_secret(secret)
        expected = _mac(_NO_SECRET if secret is None else secret, canonical())
    except ValueError as exc:
        raise AuthenticationError(BAD_SIGNATURE, f"cannot compute the signature: {exc}") from None
    # on the text form, so that no two spellings of one signature both pass
    if not hmac.compare_digest(expected.encode("ascii"), given.encode("ascii")) or secret is None:
        raise AuthenticationError(BAD_SIGNATURE, _BAD_SIGNATURE_TEXT)
    _check_date(date_value, now, max_skew_s)


def _check_date(date_value: str, now: float, max_skew_s: float) -> None:
    when = _parse_date(date_value)
    if when is None:
        raise AuthenticationError(BAD_DATE, f"{DATE_HEADER} {date_value!r} is not YYYYMMDDTHHMMSSZ")
    delta = now - when
    if delta > max_skew_s:
        raise AuthenticationError(DATE_OUT_OF_WINDOW, f"request dated {date_value} is {delta:.0f} s old "
                                                      f"(limit {max_skew_s:g} s): stale or replayed")
    if -delta > max_skew_s:
        raise AuthenticationError(DATE_OUT_OF_WINDOW, f"request dated {date_value} is {-delta:.0f} s in the "
                                                      f"future (limit {max_skew_s:g} s): check the clocks")


def _text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


@functools.lru_cache(maxsize=256)  # the dates of one second's requests are one string; parsed after the HMAC
def _parse_date(value: str) -> int | None:
    m = _DATE.match(value)
    if m is None:
        return None
    year, month, day, hour, minute, second = map(int, m.groups())
    try:
        time.strptime(value, "%Y%m%dT%H%M%SZ")  # rejects month 13, Feb 30, hour 24 ...
    except ValueError:
        return None
    return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))


# What to do about each refusal, for the 401 reason phrase (read by the sender's operator). None of
# them names a key id: an unknown one and a wrong secret get the very same answer.
_ADVICE = {
    MISSING_SIGNATURE: "this site accepts signed requests only; give the sender a secret for it, "
                       "see docs/security.md",
    V1_REFUSED: "this site accepts scheme v2 signatures only (accept_v1 = false); upgrade the sender",
    MISSING_DATE: f"no {DATE_HEADER} header; sign with gwcore.auth.signature_headers_v2",
    BAD_SIGNATURE: _BAD_SIGNATURE_TEXT,
}
_V2_DIGEST = f"a v2 signature needs {DIGEST_HEADER}: sha-256=:<base64 SHA-256 of the body>: (RFC 9530)"
_V1_PART_DIGEST = (f"a v1-signed databus part needs a sha-256 {DIGEST_HEADER}, so that it is checked before "
                   "its body is stored; sign with v2")
#: The 412 of a signed request whose body does not hash to its declared Content-Digest.
DIGEST_MISMATCH = "Content-Digest received does not match the digest calculated on server. Please resubmit."


class Verifier:
    """The receiving side: decides whether a framed request may pass (docs/security.md).

    :param keys: (key id, secret) pairs, as ``Settings.receive_keys``; several ids may be
        configured side by side while a secret is rotated.
    :param max_skew_s: ``GWCORE_AUTH_MAX_SKEW``.
    :param allow_unsigned: pass requests that carry no ``gwcore-Signature`` at all.
    :param accept_v1: pass scheme v1 signatures too (``GWCORE_AUTH_ACCEPT_V1``).
    :param clock: seconds since the epoch (tests replace it).
    """

    def __init__(self, keys: Iterable[tuple[str, bytes]], max_skew_s: float, allow_unsigned: bool,
                 clock: Callable[[], float] = time.time, *, accept_v1: bool = True) -> None:
        self.secrets = dict(keys)
        self.max_skew_s = max_skew_s
        self.allow_unsigned = allow_unsigned
        self.accept_v1 = accept_v1
        self.clock = clock

    def check(self, result: Any, *, streamed: bool = False) -> tuple[int, str] | None:
        """None when *result* may pass, else the status and reason phrase of its answer: 401
        (the signature does not hold), or 412 (a v2 signature holds, but the body does not hash
        to the ``Content-Digest`` it declares).

        :param result: an ``Envelope`` or ``Rejection`` from a framer made with
            ``signatures=True``. A rejection without ``id`` was refused before the signed fields
            were read; it passes, to be answered as it is.
        :param streamed: *result* is the head of a databus part whose body is still to come. All
            is checked but the body, which the caller checks against the declared digest (its
            ``content_digest``, always present when this passes a signed part).
        """
        if result.id is None:
            return None
        signature = result.auth_signature
        if signature is None and self.allow_unsigned:
            return None
        declared = None
        try:
            version, key_id, given = _split(signature, (_V1, _V2))
            if version == _V1 and not self.accept_v1:
                raise AuthenticationError(V1_REFUSED, "scheme v1 is not accepted here")
            date_value = _date_of(result.auth_date)
            method, target = result.method or "POST", result.target or ""
            canonical: Callable[[], bytes]
            if version == _V2:
                # The HMAC covers the Content-Digest as a header line: here it need only be
                # there. The body is hashed after the HMAC, so a forgery costs no hashing.
                lines = result.auth_headers
                if lines is None:  # the framer saw no "v2." at the start of the decoded value
                    raise AuthenticationError(MALFORMED_SIGNATURE, f"{SIGNATURE_HEADER} must start with 'v2.'")
                declared = result.content_digest
                if streamed or not _plain_digest(declared):
                    declared = f"sha-256=:{_declared_sha256(declared, _V2_DIGEST)}:"
                def canonical() -> bytes:
                    return canonical_v2(method, target, lines)
            else:
                digest = (_declared_sha256(result.content_digest, _V1_PART_DIGEST) if streamed
                          else body_digest(result.body))

                def canonical() -> bytes:
                    return _canonical_v1(method, target, date_value, result.id, digest)
            _check(self.secrets, key_id, given, date_value, self.clock(), self.max_skew_s, canonical)
        except AuthenticationError as exc:
            advice = _ADVICE.get(exc.reason)
            if advice is None:
                advice = str(exc).partition(": ")[2]     # auth's own detail says it best
            return 401, f"Unauthorized: {exc.reason} ({advice})"
        if declared is not None and not streamed:
            body = f"sha-256=:{body_digest(result.body)}:"
            # the form gwcore sends, else the same digest spelled otherwise (non-canonical base64)
            if body != declared and body != _normalised(declared):
                return 412, DIGEST_MISMATCH
        return None


def _normalised(declared: str) -> str | None:
    try:
        return f"sha-256=:{digest_sha256(declared)}:"
    except ValueError:  # signed, but not base64: no body matches it
        return None


def _plain_digest(value: str | None) -> bool:
    # "sha-256=:<44 characters>:", the one member gwcore sends; its base64 is checked with the body
    return value is not None and len(value) == 54 and value.startswith("sha-256=:") and value[53] == ":"


def _declared_sha256(value: str | None, need: str) -> str:
    # the base64 SHA-256 a Content-Digest declares, or a 401 saying what is missing
    try:
        sha = digest_sha256(value) if value is not None else None
    except ValueError as exc:
        raise AuthenticationError(MISSING_DIGEST, f"{need}; {exc}") from None
    if sha is None:
        raise AuthenticationError(MISSING_DIGEST, need)
    return sha


# -- worker calls -----------------------------------------------------------------------------------
#
# A distributor's workers sign every call of the worker protocol with scheme v1: the canonical
# string of :func:`sign` with the call's nonce where a submit has its message id, and the digest of
# the (always empty) body. v1 is enough there: a call has no body and no header the worker API
# reads but these (its parameters are in the signed path), so there is nothing v2 would add. The nonce, ``<stream>.<counter>``, is what makes a captured
# call worthless: a worker process picks a random stream and counts its calls; the gateway keeps,
# per key and stream, the highest counter seen and which of the 1024 below it were used, and
# refuses a call seen before (``replayed``) or too far behind (also ``replayed``). A stream not
# heard from for twice the date window is forgotten: its calls are refused by their date by then.

_EMPTY_DIGEST = body_digest(b"")
_WINDOW = 1024          # counters a call may lag behind the stream's highest and still pass
MAX_STREAMS = 1024      # live nonce streams the gateway remembers at once, per key


class NonceSource:
    """The nonces of one signing process: a random stream, then 1, 2, 3 ..."""

    __slots__ = ("stream", "counter")

    def __init__(self) -> None:
        self.stream = base64.urlsafe_b64encode(os.urandom(12)).decode("ascii")
        self.counter = 0

    def next(self) -> str:
        self.counter += 1
        return f"{self.stream}.{self.counter}"


def call_headers(secret: bytes, key_id: str, method: str, target: str, nonce: str,
                 now: float | None = None) -> list[tuple[bytes, bytes]]:
    """The ``gwcore-Date``, ``gwcore-Nonce`` and ``gwcore-Signature`` headers of one bodiless
    worker call to *target* (the path exactly as sent)."""
    check_key_id(key_id)
    if not _NONCE.match(nonce):
        raise ValueError(f"nonce {nonce!r} is not <stream>.<counter>")
    date_value = format_date(time.time() if now is None else now)
    signature = sign(secret, method, target, date_value, nonce, _EMPTY_DIGEST)
    return [
        (DATE_HEADER.encode("ascii"), date_value.encode("ascii")),
        (NONCE_HEADER.encode("ascii"), nonce.encode("ascii")),
        (SIGNATURE_HEADER.encode("ascii"), f"{_V1}.{key_id}.{signature}".encode("ascii")),
    ]


class _Stream:
    __slots__ = ("top", "seen", "last")

    def __init__(self) -> None:
        self.top = 0     # highest counter accepted
        self.seen = 0    # bit i: counter top - i was accepted
        self.last = 0.0  # receiver time of the last accepted call


class CallVerifier:
    """Checks signed worker calls (docs/security.md, "Workers"): signature, date window, nonce.

    :param keys: (key id, secret) pairs, ``Settings.worker_keys``; several may be configured at
        once while a worker's secret is rotated.
    :param max_skew_s: ``GWCORE_AUTH_MAX_SKEW``.
    """

    def __init__(self, keys: Iterable[tuple[str, bytes]], max_skew_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.secrets = dict(keys)
        self.max_skew_s = max_skew_s
        self.clock = clock
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._per_key: collections.Counter[str] = collections.Counter()  # live streams of each key
        self._pruned = 0.0

    def check(self, method: str, target: str, headers: Mapping[bytes, bytes] | None) -> str:
        """The key id that signed the call.

        :param headers: the call's ``gwcore-*`` headers, lower-case names (as the parser hands
            them over), or None.
        :raises gwcore.errors.AuthenticationError: the call is unsigned, forged, stale or a
            replay; its message is the 401 reason. An unknown key id and a wrong secret get the
            same answer, so a caller learns nothing about which key ids exist.
        """
        h = headers or {}
        raw_sig = _text(h.get(b"gwcore-signature"))
        if raw_sig is None or not raw_sig.strip():
            raise AuthenticationError(MISSING_SIGNATURE, "the worker API needs signed calls (gwcore worker --key-id "
                                                         "ID --secret-file FILE); see docs/security.md")
        nonce = _text(h.get(b"gwcore-nonce"))
        match = _NONCE.match(nonce.strip()) if nonce else None
        if match is None:
            raise AuthenticationError(MISSING_NONCE, f"a signed worker call needs {NONCE_HEADER}: <stream>.<counter>")
        now = self.clock()
        try:
            verify(self.secrets, method, target, {SIGNATURE_HEADER: raw_sig, DATE_HEADER: h.get(b"gwcore-date") or ""},
                   match.group(0), _EMPTY_DIGEST, now, self.max_skew_s)
        except AuthenticationError as exc:
            if exc.reason == BAD_SIGNATURE:
                raise AuthenticationError(BAD_SIGNATURE, "the signature matches no worker key configured here") from None
            raise
        key_id = raw_sig.strip().split(".")[1]
        self._admit(key_id, match.group(1), int(match.group(2)), now)
        return key_id

    def _admit(self, key_id: str, stream_id: str, counter: int, now: float) -> None:
        streams = self._streams
        if now - self._pruned >= self.max_skew_s / 4:
            self._pruned = now
            horizon = now - 2 * self.max_skew_s
            for k in [k for k, st in streams.items() if st.last < horizon]:
                del streams[k]
                self._per_key[k[0]] -= 1
        st = streams.get((key_id, stream_id))
        if st is None:
            # bounded per key, so that one key's holder cannot crowd out the others' workers
            if self._per_key[key_id] >= MAX_STREAMS:
                raise AuthenticationError(REPLAYED, f"more than {MAX_STREAMS} signing streams of key {key_id!r} "
                                                    "at once: refused until older ones lapse")
            st = streams[(key_id, stream_id)] = _Stream()
            self._per_key[key_id] += 1
        if counter > st.top:
            shift = counter - st.top
            st.seen = ((st.seen << shift) | 1) & ((1 << _WINDOW) - 1) if shift < _WINDOW else 1
            st.top = counter
        else:
            back = st.top - counter
            if back >= _WINDOW or st.seen >> back & 1:
                raise AuthenticationError(REPLAYED, f"nonce {stream_id}.{counter} was used before: a replayed call")
            st.seen |= 1 << back
        st.last = now
