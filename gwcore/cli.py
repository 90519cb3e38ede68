"""The ``gwcore`` command."""

from __future__ import annotations

import argparse
import base64
import datetime
import sys

import orjson

from ._version import __version__
from .config import Settings
from .errors import GatewayError

__all__ = ("main",)


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from .server import serve, setup_logging

    setup_logging(settings.log_level)
    return serve(settings)


def _open_readonly(args: argparse.Namespace, settings: Settings):
    from .store import Store

    return Store(args.data_dir or settings.data_dir, readonly=True)


def _fmt_ms(ms: int) -> str:
    if not ms:
        return "never"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).isoformat(timespec="milliseconds")


def _cmd_inspect(args: argparse.Namespace, settings: Settings) -> int:
    from .store import decode_error, queue_entries
    from ._core import core

    store = _open_readonly(args, settings)
    out = sys.stdout
    try:
        if args.what == "dedup":
            counts = store.counts()
            out.write(f"dedup records: {counts['dedup']}\n")
            out.write(f"queued messages: {counts['queue']}\n")
            out.write(f"error store: {counts['errors']}\n")
            out.write(f"store size: {store.size_bytes()} bytes (map {store.map_size} bytes)\n")
        elif args.what == "queue":
            for seq, (msg_id, headers, body, expiry_ms, accepted_ms) in queue_entries(store):
                if args.json:
                    out.write(orjson.dumps({"id": msg_id, "headers": headers,
                                            "body_b64": base64.b64encode(body).decode()}).decode() + "\n")
                else:
                    out.write(f"{seq}\t{msg_id}\taccepted {_fmt_ms(accepted_ms)}\texpires {_fmt_ms(expiry_ms)}"
                              f"\t{len(headers)} headers\t{len(body)} bytes\n")
        else:  # errors
            for key, value in store.iter_db(store.errors):
                failed_ms, reason, framed = decode_error(value)
                msg_id, headers, body, _e, _a = core.decode_envelope(framed)
                if args.json:
                    out.write(orjson.dumps({"id": msg_id, "reason": reason, "failed_at": _fmt_ms(failed_ms),
                                            "headers": headers, "body_b64": base64.b64encode(body).decode()}).decode() + "\n")
                else:
                    out.write(f"{core.unpack_seq(key)}\t{msg_id}\t{_fmt_ms(failed_ms)}\t{reason}\n")
    finally:
        store.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gwcore",
        description="gwcore: a cross-site messaging gateway speaking the NServiceBus Gateway HTTP channel. "
                    "Configured by GWCORE_* environment variables (docs/configuration.md).",
    )
    parser.add_argument("--version", action="version", version=f"gwcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the gateway (configured by GWCORE_* variables)")
    p.set_defaults(func=_cmd_serve)
    p = sub.add_parser("inspect", help="look into a store (safe while the gateway runs)")
    p.add_argument("what", choices=("queue", "dedup", "errors"))
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--data-dir", help="the store to read (default GWCORE_DATA_DIR)")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        return args.func(args, settings)
    except GatewayError as exc:
        print(f"gwcore: error: {exc}", file=sys.stderr)
        return 2
