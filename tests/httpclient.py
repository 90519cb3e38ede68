"""A deliberately small raw HTTP/1.1 client for tests: exact bytes out, exact responses in."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import uuid
from dataclasses import dataclass, field


@dataclass
class Response:
    status: int
    reason: str
    headers: dict = field(default_factory=dict)
    body: bytes = b""


def nsb_request(msg_id: str | None = None, body: bytes = b'{"Hello":"World"}', *, path: str = "/RemoteSite/",
                host: str = "localhost", extra: list[tuple[str, str]] | None = None, md5: str | None = "auto",
                call_type: str | None = "SingleCallSubmit", gateway: bool = True, correlation: bool = True,
                method: str = "POST", close: bool = False) -> bytes:
    """An NServiceBus-shaped submit (protocol.md §8.1), names and values already wire-encoded."""
    msg_id = msg_id if msg_id is not None else str(uuid.uuid4())
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if msg_id:
        lines.append(f"NServiceBus.Id: {msg_id}")
    if correlation:
        lines.append(f"NServiceBus.CorrelationId: {msg_id}")
    lines += [
        "NServiceBus.ReplyToAddress: Headquarters",
        f"NServiceBus.Header.NServiceBus.MessageId: {msg_id}",
        "NServiceBus.Header.NServiceBus.MessageIntent: Send",
        f"NServiceBus.Header.NServiceBus.CorrelationId: {msg_id}",
        "NServiceBus.Header.NServiceBus.ContentType: application%2Fjson",
        "NServiceBus.Header.NServiceBus.EnclosedMessageTypes: Shared.UpdatePrice%2C+Shared%2C+Version%3D1.0.0.0%2C+Culture%3Dneutral%2C+PublicKeyToken%3Dnull",
        "NServiceBus.Header.NServiceBus.OriginatingSite: http%2Chttp%3A%2F%2Flocalhost%3A25899%2FHeadquarters%2F",
    ]
    for name, value in extra or []:
        lines.append(f"{name}: {value}")
    if gateway:
        lines.append("NServiceBus.Gateway: True")
    if call_type is not None:
        lines.append(f"NServiceBus.CallType: {call_type}")
    lines.append("Content-Type: application/x-www-form-urlencoded")
    if md5 == "auto":
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode().replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    if md5 is not None:
        lines.append(f"Content-MD5: {md5}")
    lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> Response:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before a response")
    _version, status, reason = status_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Response(int(status), reason, headers, body)


class Client:
    """One keep-alive connection; *local* binds its end to that address first (any of 127/8 is
    the loopback interface on Linux: a distinct peer address for the server)."""

    def __init__(self, host: str, port: int, *, local: str | None = None) -> None:
        self.host, self.port = host, port
        self.local = local
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> "Client":
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, local_addr=(self.local, 0) if self.local else None)
        return self

    async def __aexit__(self, *exc) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, data: bytes) -> Response:
        await self.send(data)
        return await read_response(self.reader)

    async def response(self) -> Response:
        return await read_response(self.reader)

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the server closed the connection (EOF)."""
        data = await asyncio.wait_for(self.reader.read(), timeout)
        return data == b""


async def get(host: str, port: int, path: str) -> Response:
    async with Client(host, port) as c:
        return await c.request(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def metric_lines(text: str) -> list[str]:
    """The lines of a ``/metrics`` exposition, whole numbers written as integers (prometheus_client
    writes ``gwcore_workers 2.0``; a test reads ``gwcore_workers 2``)."""
    return [re.sub(r" (-?\d+)\.0$", r" \1", line) for line in text.splitlines()]
