"""Per-site shared-secret request signing (design.md §6), scheme ``v1``.

The sender adds two headers to each gateway request::

    gwcore-Date: 20261126T171029Z
    gwcore-Signature: v1.<key id>.<signature>

*signature* is the unpadded base64url HMAC-SHA256, keyed with the site's secret, of the canonical
string (UTF-8, lines joined by ``\\n``, no trailing newline)::

    gwcore-v1
    <METHOD>          upper case, e.g. POST
    <path>            the request target exactly as sent, e.g. /RemoteSite/
    <date>            the gwcore-Date value
    <message id>      the decoded NServiceBus.Id
    <body digest>     padded standard base64 of SHA-256(body)

Only the message id may contain a newline (the other fields are refused if they do), so the
string splits back into its fields in exactly one way. The body digest is SHA-256 and not the
Content-MD5 value: MD5 collisions are cheap to make, and the signature must not inherit that.

Both header values use only characters that .NET URL encoding leaves alone (``A-Z a-z 0-9 - _ .``),
so they read the same raw, URL-encoded or URL-decoded, whichever way a receiver looks them up;
the names have no dots or underscores, which proxies such as nginx drop by default.

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
import hashlib
import hmac
import os
import re
import time
from typing import Any, Callable, Iterable, Mapping

from .errors import AuthenticationError

__all__ = (
    "sign",
    "signature_headers",
    "verify",
    "body_digest",
    "check_key_id",
    "Verifier",
    "format_date",
    "DATE_HEADER",
    "SIGNATURE_HEADER",
    "MIN_SECRET_BYTES",
    # AuthenticationError.reason values
    "MISSING_SIGNATURE",
    "MALFORMED_SIGNATURE",
    "UNKNOWN_KEY",
    "MISSING_DATE",
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
MIN_SECRET_BYTES = 16

MISSING_SIGNATURE = "missing-signature"
MALFORMED_SIGNATURE = "malformed-signature"
UNKNOWN_KEY = "unknown-key"
MISSING_DATE = "missing-date"
BAD_DATE = "bad-date"
BAD_SIGNATURE = "bad-signature"
DATE_OUT_OF_WINDOW = "date-out-of-window"
REPLAYED = "replayed"
MISSING_NONCE = "missing-nonce"

#: Worker calls (``/.gwcore/worker/...``) carry this header besides the date and signature.
NONCE_HEADER = "gwcore-Nonce"

_VERSION = "v1"
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z\Z")
_SIG = re.compile(r"[A-Za-z0-9_-]{43}\Z")  # 32 bytes, unpadded base64url
_NONCE = re.compile(r"([A-Za-z0-9_-]{8,64})\.([1-9][0-9]{0,18})\Z")  # <stream>.<counter>


def check_key_id(key_id: str) -> None:
    """:raises ValueError: *key_id* is not 1-64 of ``A-Z a-z 0-9 _ -`` (site and worker keys alike)."""
    if not _KEY_ID.match(key_id):
        raise ValueError(f"key id {key_id!r}: use 1-64 of A-Z a-z 0-9 _ -")


def body_digest(body: bytes) -> str:
    """The canonical string's body digest: padded standard base64 of SHA-256(*body*)."""
    return base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")


def format_date(now: float) -> str:
    """``gwcore-Date`` value for *now* (seconds since the epoch): ``YYYYMMDDTHHMMSSZ``, UTC."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


def sign(secret: bytes, method: str, path: str, date_value: str, message_id: str, body_digest: str) -> str:
    """The signature (unpadded base64url HMAC-SHA256) of one request's canonical string.

    :raises ValueError: *secret* is shorter than :data:`MIN_SECRET_BYTES`, or *method*, *path*,
        *date_value* or *body_digest* contains a newline.
    """
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"signing secret must be at least {MIN_SECRET_BYTES} bytes")
    for name, value in (("method", method), ("path", path), ("date", date_value), ("body digest", body_digest)):
        if "\n" in value:
            raise ValueError(f"{name} must not contain a newline")
    canonical = "\n".join(("gwcore-" + _VERSION, method.upper(), path, date_value, message_id, body_digest))
    mac = hmac.new(secret, canonical.encode("utf-8"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def signature_headers(secret: bytes, key_id: str, method: str, path: str, message_id: str, body: bytes,
                      now: float | None = None, *, digest: str | None = None) -> list[tuple[bytes, bytes]]:
    """The ``gwcore-Date`` and ``gwcore-Signature`` headers for one request, ready for the wire.

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
        (SIGNATURE_HEADER.encode("ascii"), f"{_VERSION}.{key_id}.{signature}".encode("ascii")),
    ]


def verify(secrets: Mapping[str, bytes], method: str, path: str,
           headers_lookup: Callable[[str], str | bytes | None] | Mapping[str, str | bytes],
           message_id: str, body_digest: str, now: float, max_skew_s: float) -> None:
    """Check a request's signature; return None when it is valid.

    Checks run in this order, and the first failure is raised: signature header present and well
    formed, key id known, date header present, HMAC matches, date parses, date within
    *max_skew_s* of *now*. The HMAC is checked before the date is interpreted, so
    ``date-out-of-window`` always means a genuine request that is too old or too new (a replay
    or a clock problem), never a forgery.

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
    raw_sig = _text(get(SIGNATURE_HEADER))
    if raw_sig is None or not raw_sig.strip():
        raise AuthenticationError(MISSING_SIGNATURE, f"no {SIGNATURE_HEADER} header")
    parts = raw_sig.strip().split(".")
    if len(parts) != 3 or parts[0] != _VERSION or not _KEY_ID.match(parts[1]) or not _SIG.match(parts[2]):
        raise AuthenticationError(MALFORMED_SIGNATURE,
                                  f"{SIGNATURE_HEADER} is not '{_VERSION}.<key id>.<signature>'")
    _, key_id, given = parts
    secret = secrets.get(key_id)
    if secret is None:
        raise AuthenticationError(UNKNOWN_KEY, f"key id {key_id!r} is not configured for this site")
    date_value = _text(get(DATE_HEADER))
    if date_value is None or not date_value.strip():
        raise AuthenticationError(MISSING_DATE, f"no {DATE_HEADER} header")
    date_value = date_value.strip()
    try:
        expected = sign(secret, method, path, date_value, message_id, body_digest)
    except ValueError as exc:
        raise AuthenticationError(BAD_SIGNATURE, f"cannot compute the signature: {exc}") from None
    if not hmac.compare_digest(expected.encode("ascii"), given.encode("ascii")):
        raise AuthenticationError(BAD_SIGNATURE, f"signature does not match (key id {key_id!r}): wrong secret, "
                                                 "or method, path, date, id or body changed on the way")
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


# What to do about each refusal, for the 401 reason phrase (read by the sender's operator).
_ADVICE = {
    MISSING_SIGNATURE: "this site accepts signed requests only; give the sender a secret for it, "
                       "see docs/security.md",
    MALFORMED_SIGNATURE: f"{SIGNATURE_HEADER} must be '{_VERSION}.<key id>.<signature>'",
    UNKNOWN_KEY: "key id {key!r} is not in this site's [receive.keys]",
    MISSING_DATE: f"no {DATE_HEADER} header; sign with gwcore.auth.signature_headers",
    BAD_SIGNATURE: "the request's signature does not match; check the shared secret for key {key!r}",
}


class Verifier:
    """The receiving side: decides whether a framed request may pass (docs/security.md).

    :param keys: (key id, secret) pairs, as ``Settings.receive_keys``; several ids may be
        configured side by side while a secret is rotated.
    :param max_skew_s: ``GWCORE_AUTH_MAX_SKEW``.
    :param allow_unsigned: pass requests that carry no ``gwcore-Signature`` at all.
    :param clock: seconds since the epoch (tests replace it).
    """

    def __init__(self, keys: Iterable[tuple[str, bytes]], max_skew_s: float, allow_unsigned: bool,
                 clock: Callable[[], float] = time.time) -> None:
        self.secrets = dict(keys)
        self.max_skew_s = max_skew_s
        self.allow_unsigned = allow_unsigned
        self.clock = clock

    def refusal(self, result: Any, digest: str | None = None) -> str | None:
        """None when *result* may pass, else the reason phrase of its ``401 Unauthorized``.

        :param result: an ``Envelope`` or ``Rejection`` from a framer made with
            ``signatures=True`` (its ``id``, ``body``, ``auth_date``, ``auth_signature``,
            ``method`` and ``target``). A rejection without ``id`` was refused before the signed
            fields were read; it passes, to be answered as it is.
        :param digest: :func:`body_digest` of the body when *result* does not carry it (a
            databus part streamed to disk, hashed on the way).
        """
        if result.id is None:
            return None
        signature = result.auth_signature
        if signature is None and self.allow_unsigned:
            return None
        try:
            verify(self.secrets, result.method or "POST", result.target or "",
                   {SIGNATURE_HEADER: signature, DATE_HEADER: result.auth_date}, result.id,
                   digest if digest is not None else body_digest(result.body), self.clock(), self.max_skew_s)
        except AuthenticationError as exc:
            advice = _ADVICE.get(exc.reason)
            if advice is None:
                advice = str(exc).partition(": ")[2]     # auth's own detail says it best
            else:
                advice = advice.format(key=_key_id(signature))
            return f"Unauthorized: {exc.reason} ({advice})"
        return None


def _key_id(signature: str | None) -> str:
    parts = (signature or "").strip().split(".")
    return parts[1] if len(parts) == 3 else ""


# -- worker calls -----------------------------------------------------------------------------------
#
# A distributor's workers sign every call of the worker protocol with the same scheme: the
# canonical string of :func:`sign` with the call's nonce where a submit has its message id, and the
# digest of the (always empty) body. The nonce, ``<stream>.<counter>``, is what makes a captured
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
        (SIGNATURE_HEADER.encode("ascii"), f"{_VERSION}.{key_id}.{signature}".encode("ascii")),
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
            if exc.reason in (UNKNOWN_KEY, BAD_SIGNATURE):
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
