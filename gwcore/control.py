"""The control socket: ``gwcore send`` and ``gwcore retry`` reach a running gateway through it.

One gateway process owns a data dir (and its LMDB writer), so a second process may not append to
the store. The gateway listens on ``<data dir>/gwcore.sock`` (a Unix socket, mode 0600: whoever
may use it may also read the store) for one JSON object per line and answers one per line:

    {"op": "send", "sites": ["RemoteSite"], "body_b64": "...", "headers": {...}, "id": null,
     "databus": {"Payload": "/absolute/path"}}   (databus optional: files the gateway copies in)
      -> {"ok": true, "id": "..."}
    {"op": "retry", "ids": ["..."]}   (or "ids": null for every failed send)
      -> {"ok": true, "moved": ["..."]}
    {"op": "handover"}   (the gateway stops: a selected-mode leader passes the leadership first)
      -> {"ok": true, "leader": true}
    failures -> {"ok": false, "error": "..."}
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from typing import TYPE_CHECKING, Any

import orjson

from .errors import GatewayError

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ("socket_path", "ControlServer", "call")

log = logging.getLogger("gwcore.control")

SOCKET_NAME = "gwcore.sock"
_MAX_LINE = 64 << 20  # a send carries its body: allow large ones, not unbounded


def socket_path(data_dir: str) -> str:
    return os.path.join(data_dir, SOCKET_NAME)


class ControlServer:
    def __init__(self, gateway: "Gateway") -> None:
        self.gateway = gateway
        self.path = socket_path(gateway.settings.data_dir)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if len(os.fsencode(os.path.abspath(self.path))) >= 104:
            log.warning("control socket path %s is too long for a Unix socket: `gwcore send` and "
                        "`gwcore retry` cannot reach this gateway", self.path)
            return
        try:
            os.unlink(self.path)  # a leftover from a crashed run (we own the data dir's lock)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=self.path, limit=_MAX_LINE)
        finally:
            os.umask(old)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                answer = await self._handle(line)
                writer.write(orjson.dumps(answer) + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
            log.warning("control socket: dropped a client: %s", exc)
        finally:
            writer.close()

    async def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = orjson.loads(line)
            op = req.get("op")
            if op == "send":
                body = base64.b64decode(req.get("body_b64", ""), validate=True)
                msg_id = await self.gateway.send_to_sites(req["sites"], body, req.get("headers") or {},
                                                          message_id=req.get("id"), databus=req.get("databus") or None)
                return {"ok": True, "id": msg_id}
            if op == "retry":
                return {"ok": True, "moved": await self.gateway.retry_failed(req.get("ids"))}
            if op == "handover":
                # answered at once; the process then drains, passes the leadership and exits
                sel = self.gateway.selected
                self.gateway.stop_requested.set()
                return {"ok": True, "leader": bool(sel is not None and sel.leading)}
            return {"ok": False, "error": f"unknown op {op!r} (send, retry, handover)"}
        except (GatewayError, KeyError, TypeError, ValueError) as exc:
            return {"ok": False, "error": str(exc) if not isinstance(exc, KeyError) else f"missing field {exc}"}


async def call(data_dir: str, request: dict[str, Any]) -> dict[str, Any] | None:
    """Send one request to the gateway running on *data_dir*; None when none is listening."""
    try:
        reader, writer = await asyncio.open_unix_connection(socket_path(data_dir), limit=_MAX_LINE)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    try:
        writer.write(orjson.dumps(request) + b"\n")
        await writer.drain()
        line = await reader.readline()
        if not line:
            raise GatewayError("the gateway closed the control socket without an answer")
        return orjson.loads(line)
    finally:
        writer.close()
