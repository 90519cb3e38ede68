"""Pure-Python oracle for the framing half of gwcore._dedup (test-only, never shipped).

Written for clarity, not speed, and on purpose by other means than the extension (regular
expressions, urllib, struct), so the differential tests compare two independent readings of
protocol.md rather than one algorithm twice.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import struct
from urllib.parse import quote_plus

from gwcore.errors import ConfigurationError, FramingError, InternalError

CALL_SUBMIT = 0
CALL_DATABUS = 1

NEVER_MS = 100 * 365 * 24 * 3600 * 1000
MAX_TICKS = 2**63 - 1

# char.IsWhiteSpace (string.IsNullOrWhiteSpace, and the trim in Enum.TryParse)
NET_WHITESPACE = "\t\n\v\f\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def ascii_fold(text: str) -> str:
    return text.translate(_ASCII_LOWER)


def url_decode(data) -> str:
    raw = bytes(data).replace(b"+", b" ")
    return re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m[1], 16)]), raw).decode("utf-8", "replace")


def url_encode(text: str) -> str:
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return quote_plus(text, safe="!*()").replace("~", "%7E")


def content_md5(body) -> str:
    return base64.b64encode(hashlib.md5(bytes(body)).digest()).decode("ascii")


_TIMESPAN = re.compile(r"[ \t\n\v\f\r]*(-?)([0-9]+(?:[.:][0-9]+)*)[ \t\n\v\f\r]*")
# separator pattern -> names of the numbers in order
_TIMESPAN_FORMS = {
    "": "d",
    ":": "hm",
    "::": "hms",
    ".:": "dhm",
    ".::": "dhms",
    ":::": "dhms",
    "::.": "hmsf",
    ".::.": "dhmsf",
    ":::.": "dhmsf",
}


def parse_timespan(text: str) -> int | None:
    m = _TIMESPAN.fullmatch(text)
    if m is None:
        return None
    tokens = re.split(r"([.:])", m[2])
    numbers, seps = tokens[0::2], "".join(tokens[1::2])
    form = _TIMESPAN_FORMS.get(seps)
    if form is None:
        return None
    parts = dict(zip(form, numbers))
    if "f" in parts and len(parts["f"]) > 7:
        return None
    d, h, mi, s = (int(parts.get(k, "0")) for k in "dhms")
    f = int(parts.get("f", "0").ljust(7, "0"))
    if h > 23 or mi > 59 or s > 59:
        return None
    ticks = (((d * 24 + h) * 60 + mi) * 60 + s) * 10**7 + f
    if ticks > MAX_TICKS + (1 if m[1] else 0):
        return None
    ms = ticks // 10_000
    return -ms if m[1] else ms


def pack_seq(seq: int) -> bytes:
    return struct.pack(">Q", seq)


def unpack_seq(data) -> int:
    data = bytes(data)
    if len(data) != 8:
        raise FramingError("a sequence number is 8 bytes")
    return struct.unpack(">Q", data)[0]


def _lp32(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack(">I", len(raw)) + raw


def encode_envelope(id: str, headers, body, expiry_ms: int, accepted_ms: int) -> bytes:
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers)
    body = bytes(body)
    return b"".join(
        [b"GW\x01", struct.pack(">QQ", accepted_ms, expiry_ms), _lp32(id), struct.pack(">I", len(pairs))]
        + [_lp32(name) + _lp32(value) for name, value in pairs]
        + [struct.pack(">Q", len(body)), body]
    )


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise FramingError("envelope truncated")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def int(self, fmt: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def text(self) -> str:
        try:
            return self.take(self.int(">I")).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FramingError("invalid UTF-8") from exc


def decode_envelope(framed):
    cur = _Cursor(bytes(framed))
    if cur.take(2) != b"GW" or cur.take(1) != b"\x01":
        raise FramingError("bad magic or version")
    accepted_ms, expiry_ms = cur.int(">Q"), cur.int(">Q")
    id = cur.text()
    headers = {}
    for _ in range(cur.int(">I")):
        name = cur.text()
        headers[name] = cur.text()
    body = cur.take(cur.int(">Q"))
    if cur.pos != len(cur.data):
        raise FramingError("trailing bytes")
    return id, headers, body, expiry_ms, accepted_ms


@dataclasses.dataclass(frozen=True)
class Envelope:
    id: str
    key: bytes
    call_type: int
    expiry_ms: int
    accepted_ms: int
    headers: dict
    body: bytes
    framed: bytes
    callback: str | None
    auth_date: str | None = None
    auth_signature: str | None = None
    method: str | None = None
    target: str | None = None
    auth_headers: bytes | None = None
    databus_key: str | None = None
    content_md5: str | None = None
    content_digest: str | None = None
    databus: tuple | None = ()


@dataclasses.dataclass(frozen=True)
class Rejection:
    status: int
    reason: str
    callback: str | None = None
    id: str | None = None
    body: bytes | None = None
    auth_date: str | None = None
    auth_signature: str | None = None
    method: str | None = None
    target: str | None = None
    auth_headers: bytes | None = None
    content_digest: str | None = None

    def __post_init__(self) -> None:
        clean = "".join(c if " " <= c <= "~" else "?" for c in self.reason[:512])
        object.__setattr__(self, "reason", clean)


def _expiry(ttbr: str | None, now_ms: int, gateway: bool) -> int:
    if ttbr is None:
        return 0
    ms = parse_timespan(ttbr)
    if gateway:
        ms = max(ms or 0, 1000)
    elif ms is None or ms <= 0:
        return 0
    if ms >= NEVER_MS or now_ms + ms >= 2**64:
        return 0
    return now_ms + ms


def _v2_lines(headers: list[tuple[str, str]]) -> bytes:
    """The header lines a v2 signature covers (docs/sending.md), of decoded (name, value) pairs
    whose names are unique ignoring ASCII case."""
    covered = sorted((ascii_fold(n), v) for n, v in headers
                     if (ascii_fold(n).startswith(("nservicebus.", "gwcore-")) and ascii_fold(n) != "gwcore-signature")
                     or ascii_fold(n) in ("content-md5", "content-digest"))

    def esc(text: str, name: bool) -> str:
        return "".join("\\\\" if c == "\\" else "\\n" if c == "\n" else "\\:" if c == ":" and name else c for c in text)

    return "\n".join(f"{esc(n, True)}:{esc(v, False)}" for n, v in covered).encode("utf-8")


def _strip_header_prefix(name: str) -> str:
    return re.sub(re.escape("NServiceBus.Header."), "", name, flags=re.IGNORECASE | re.ASCII)


class Framer:
    def __init__(self, scope: str, *, max_id_bytes: int = 400, parse_query: bool = False,
                 signatures: bool = False) -> None:
        if "\x00" in scope or max_id_bytes < 1:
            raise ConfigurationError("bad framer settings")
        self.scope, self.max_id_bytes, self.parse_query = scope, max_id_bytes, parse_query
        self.signatures = signatures
        self.framed_total = self.rejected_total = 0

    def _reject(self, status: int, reason: str, callback: str | None) -> Rejection:
        self.rejected_total += 1
        return Rejection(status, reason, callback)

    def frame(self, headers: list, body, query, now_ms: int):
        if len(headers) % 2:
            raise InternalError("odd header list")
        params = []
        if self.parse_query and query is not None:
            for part in bytes(query).split(b"&"):
                if part:
                    key, _, value = part.partition(b"=")
                    twice = lambda raw: url_decode(url_decode(raw).encode("utf-8"))  # noqa: E731
                    params.append((twice(key), twice(value)))
        callback = None
        for name, value in params:
            if ascii_fold(name) == "callback":
                callback = value

        # fold -> [name, value]; dicts keep insertion (wire) order
        merged: dict[str, list[str]] = {}
        for raw_name, raw_value in zip(headers[0::2], headers[1::2]):
            name = url_decode(raw_name)
            if ascii_fold(name) in merged:
                return self._reject(400, f"Header '{name}' appears more than once.", callback)
            merged[ascii_fold(name)] = [name, url_decode(raw_value)]
        # a v2 signature covers the headers as sent, before the query string overrides any
        wire_signature = merged.get("gwcore-signature", [None, ""])[1]
        lines = _v2_lines(list(map(tuple, merged.values()))) if self.signatures and wire_signature.startswith("v2.") else None
        body = bytes(body)
        for name, value in params:
            if ascii_fold(name) in merged:
                merged[ascii_fold(name)][:] = [name, value]
            else:
                merged[ascii_fold(name)] = [name, value]
            if ascii_fold(name) == "message":
                body = value.encode("utf-8")

        def get(name: str) -> str | None:
            entry = merged.get(name.lower())
            return None if entry is None else entry[1]

        id = get("NServiceBus.Id")
        if id is None or id.strip(NET_WHITESPACE) == "":
            return self._reject(400, "Required header 'NServiceBus.Id' missing.", callback)
        if len(id.encode("utf-8")) > self.max_id_bytes:
            return self._reject(400, f"Header 'NServiceBus.Id' is longer than {self.max_id_bytes} bytes.", callback)
        auth = {}
        if self.signatures:
            auth = {"auth_date": get("gwcore-Date"), "auth_signature": get("gwcore-Signature")}
        signed = {"id": id, "body": body, **auth} if self.signatures else {}
        if self.signatures and get("gwcore-Signature") is not None:
            signed.update(auth_headers=lines, content_digest=get("Content-Digest"))

        def refuse(status: int, reason: str) -> Rejection:
            # decided once the id is known: with signatures on, the signed fields come along
            self.rejected_total += 1
            return Rejection(status, reason, callback, **signed)

        call_type = get("NServiceBus.CallType")
        if call_type is None:
            return refuse(400, "Required header 'NServiceBus.CallType' missing.")
        kind = {"SingleCallSubmit": CALL_SUBMIT, "0": CALL_SUBMIT, "SingleCallDatabusProperty": CALL_DATABUS, "1": CALL_DATABUS}.get(
            call_type.strip(NET_WHITESPACE)
        )
        if kind is None:
            return refuse(
                400,
                f"Invalid CallType '{call_type}'. CallTypes supported 'SingleCallSubmit, SingleCallDatabusProperty'",
            )
        md5 = get("Content-MD5")
        if md5 is not None and md5 != content_md5(body):
            return refuse(412, "MD5 hash received does not match hash calculated on server. Please resubmit.")
        gateway = get("NServiceBus.Gateway") is not None
        if kind == CALL_DATABUS:
            # a part: hash (above), then the key; stored by the receiver, not as a message
            key = get("NServiceBus.Gateway.DataBusKey")
            if key is None or key.strip(NET_WHITESPACE) == "":
                return refuse(400, "Required header 'NServiceBus.Gateway.DataBusKey' missing.")
            self.framed_total += 1
            return Envelope(
                id=id, key=self.scope.encode("utf-8") + b"\x00" + id.encode("utf-8"), call_type=CALL_DATABUS,
                expiry_ms=_expiry(get("NServiceBus.TimeToBeReceived"), now_ms, gateway), accepted_ms=now_ms,
                headers={}, body=body, framed=b"", callback=callback, databus_key=key, content_md5=md5,
                content_digest=get("Content-Digest"), auth_headers=lines, **auth,
            )
        # claim-check headers: (request name, stored name or None), looked up by the writer
        databus = tuple(
            (name, (_strip_header_prefix(name) if "nservicebus.header" in fold else None) if gateway else name)
            for fold, (name, _value) in merged.items() if "nservicebus.databus." in fold
        )

        if gateway:
            correlation_id = get("NServiceBus.CorrelationId")
            if correlation_id is None:
                return refuse(502, "Unexpected server error")
            message_headers = {
                _strip_header_prefix(name): value for fold, (name, value) in merged.items() if "nservicebus.header" in fold
            }
            message_headers["NServiceBus.CorrelationId"] = correlation_id
        else:
            message_headers = dict(merged.values())
        expiry_ms = _expiry(get("NServiceBus.TimeToBeReceived"), now_ms, gateway)
        self.framed_total += 1
        return Envelope(
            id=id,
            key=self.scope.encode("utf-8") + b"\x00" + id.encode("utf-8"),
            call_type=CALL_SUBMIT,
            expiry_ms=expiry_ms,
            accepted_ms=now_ms,
            headers=message_headers,
            body=body,
            framed=encode_envelope(id, message_headers, body, expiry_ms, now_ms),
            callback=callback,
            databus=databus,
            **auth,
            **({"auth_headers": lines, "content_digest": get("Content-Digest")}
               if self.signatures and get("gwcore-Signature") is not None else {}),
        )


# -- batches between gwcore sites (protocol.md, "Batches between gwcore sites") ------------------

BATCH_MAGIC = b"GB"
BATCH_VERSION = 1


def decode_batch(data: bytes) -> list[tuple[bytes, bytes]]:
    """A batch body's ``(header block, body)`` per message, read with struct; FramingError for a
    body that is not one whole batch (the block's lines are read by :func:`batch_block_lines`)."""
    if len(data) < 8:
        raise FramingError("truncated batch preamble")
    magic, version, flags, count = struct.unpack_from(">2sBBI", data)
    if magic != BATCH_MAGIC or version != BATCH_VERSION or flags != 0:
        raise FramingError("not a version 1 batch")
    if count * 12 > len(data) - 8:      # each message takes at least its two lengths
        raise FramingError("a count the bytes cannot hold")
    out, at = [], 8
    for _ in range(count):
        if at + 4 > len(data):
            raise FramingError("truncated block length")
        (n,) = struct.unpack_from(">I", data, at)
        block, at = data[at + 4:at + 4 + n], at + 4 + n
        if at > len(data) or at + 8 > len(data):
            raise FramingError("truncated block or body length")
        (m,) = struct.unpack_from(">Q", data, at)
        body, at = data[at + 8:at + 8 + m], at + 8 + m
        if at > len(data):
            raise FramingError("truncated body")
        out.append((block, body))
    if at != len(data):
        raise FramingError("bytes after the last message")
    return out


_BLOCK_LINE = re.compile(rb"([^:\r\n\0]+):([^\r\n\0]*)\r\n")


def batch_block_lines(block: bytes) -> list[tuple[bytes, bytes]]:
    """A header block's ``(name, value)`` lines: each ``name: value`` CRLF, a name of at least one
    byte without CR, LF, NUL or a colon, the value without the blanks around it and without CR, LF
    or NUL; FramingError otherwise."""
    out, at = [], 0
    while at < len(block):
        m = _BLOCK_LINE.match(block, at)
        if m is None:
            raise FramingError("a header block line that is not name: value CRLF")
        out.append((m.group(1), m.group(2).strip(b" \t")))
        at = m.end()
    return out
