"""The ``gwcore`` command."""

from __future__ import annotations

import argparse
import base64
import datetime
import os
import sys

import orjson

from ._version import __version__
from .config import LOG_FORMATS, LOG_LEVELS, Settings, log_format, settings_help
from .errors import GatewayError

__all__ = ("main",)


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from .server import serve, setup_logging

    setup_logging(settings.log_level, settings.log_format)
    return serve(settings)


def _open_readonly(args: argparse.Namespace, settings: Settings):
    from .store import Store

    return Store(args.data_dir or settings.data_dir, readonly=True, blob_dir=settings.blob_dir or None)


def _fmt_ms(ms: int) -> str:
    if not ms:
        return "never"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).isoformat(timespec="milliseconds")


def _direct(settings: Settings, data_dir: str, fn):
    """Run ``fn(gateway)`` on a gateway over the store itself, without listeners or forwarding
    (the data dir's gateway is not running; what is queued goes out when it starts)."""
    import asyncio
    import dataclasses

    from .gateway import Gateway

    async def run():
        s = dataclasses.replace(settings, data_dir=data_dir)
        gw = Gateway(s)
        await gw.start(listen=False, forward=False)
        try:
            return await fn(gw)
        finally:
            await gw.stop()

    return asyncio.run(run())


def _control(settings: Settings, args: argparse.Namespace, request: dict, fallback):
    import asyncio

    from .control import call

    data_dir = args.data_dir or settings.data_dir
    answer = asyncio.run(call(data_dir, request))
    if answer is None:
        result = _direct(settings, data_dir, fallback)
        print("gwcore: the gateway is not running: recorded in the store; it is sent when `gwcore serve` starts",
              file=sys.stderr)
        return result
    if not answer.get("ok"):
        raise GatewayError(answer.get("error", "the gateway refused the request"))
    return answer


def _cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    if args.body is not None:
        body = args.body.encode("utf-8")
    elif args.body_file:
        with open(args.body_file, "rb") as f:
            body = f.read()
    else:
        body = sys.stdin.buffer.read()
    headers = {}
    for item in args.header or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise GatewayError(f"--header {item!r}: use NAME=VALUE")
        headers[name] = value
    databus = {}
    for item in args.databus or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not os.path.isfile(path):
            raise GatewayError(f"--databus {item!r}: use NAME=FILE with an existing file")
        databus[name] = os.path.abspath(path)  # the running gateway reads it
    request = {"op": "send", "sites": args.to, "body_b64": base64.b64encode(body).decode(),
               "headers": headers, "id": args.id, "databus": databus}

    async def direct(gw):
        return {"id": await gw.send_to_sites(args.to, body, headers, message_id=args.id, databus=databus or None)}

    print(_control(settings, args, request, direct)["id"])
    return 0


def _cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    if not args.all and not args.ids:
        raise GatewayError("name message ids to retry, or --all")
    ids = None if args.all else args.ids

    async def direct(gw):
        return {"moved": await gw.retry_failed(ids)}

    moved = _control(settings, args, {"op": "retry", "ids": ids}, direct)["moved"]
    for msg_id in moved:
        print(msg_id)
    if ids is not None and len(set(moved)) < len(set(ids)):
        missing = sorted(set(ids) - set(moved))
        print(f"gwcore: not in the outgoing error queue: {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"gwcore: {len(moved)} message(s) queued for sending again", file=sys.stderr)
    return 0


def _cmd_handover(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    import time

    from .control import call
    from .lease import try_lease

    data_dir = args.data_dir or settings.data_dir
    answer = asyncio.run(call(data_dir, {"op": "handover"}))
    if answer is None:
        raise GatewayError(f"no gateway is running on {data_dir}")
    if not answer.get("ok"):
        raise GatewayError(answer.get("error", "the gateway refused the handover"))
    print("gwcore: handing over the leadership; the gateway exits when it is done" if answer.get("leader")
          else "gwcore: not the leader: the gateway stops", file=sys.stderr)
    if args.wait:
        # the process holds the data dir's lease until it exits
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            fd = try_lease(data_dir)
            if fd is not None:
                import os

                os.close(fd)
                return 0
            time.sleep(0.05)
        print("gwcore: the gateway is still running", file=sys.stderr)
        return 1
    return 0


def _cmd_inspect(args: argparse.Namespace, settings: Settings) -> int:
    from .egress import decode_failed, outgoing_records
    from .records import decode_error, split_part_key, unpack_seq
    from .store import queue_entries
    from ._core import core

    store = _open_readonly(args, settings)
    out = sys.stdout
    try:
        if args.what == "dedup" and args.json:
            counts = store.counts()
            out.write(orjson.dumps({
                "dedup_records": counts["dedup"], "queued": counts["queue"], "errors": counts["errors"],
                "outgoing": counts["outgoing"], "outgoing_errors": counts["outgoing_errors"],
                "databus_blobs": counts["databus_blobs"], "databus_parts": counts["databus_parts"],
                "store_bytes": store.size_bytes(), "map_bytes": store.map_size,
            }).decode() + "\n")
        elif args.what == "dedup":
            counts = store.counts()
            out.write(f"dedup records: {counts['dedup']}\n")
            out.write(f"queued messages: {counts['queue']}\n")
            out.write(f"error store: {counts['errors']}\n")
            out.write(f"outgoing: {counts['outgoing']}, failed sends: {counts['outgoing_errors']}\n")
            out.write(f"databus: {counts['databus_blobs']} blobs, {counts['databus_parts']} parts waiting for their submit\n")
            out.write(f"store size: {store.size_bytes()} bytes (map {store.map_size} bytes)\n")
        elif args.what == "blobs":
            from . import databus

            for info in databus.blobs(store):
                state = "part" if info.part else "message"
                path = os.path.join(store.blob_dir, info.name)
                if args.json:
                    part = split_part_key(info.part) if info.part else None
                    out.write(orjson.dumps({
                        "key": info.name, "path": path, "size": info.size, "expires": _fmt_ms(info.expiry_ms),
                        "state": state, "content_md5": info.md5,
                        "part": None if part is None else dict(zip(("scope", "id", "databus_key"), part)),
                    }).decode() + "\n")
                else:
                    waiting = ""
                    if info.part:
                        waiting = "\twaiting for the submit of " + split_part_key(info.part)[1]
                    out.write(f"{info.name}\t{info.size} bytes\texpires {_fmt_ms(info.expiry_ms)}\t{state}{waiting}\n")
        elif args.what == "queue":
            for seq, (msg_id, headers, body, expiry_ms, accepted_ms) in queue_entries(store):
                if args.json:
                    out.write(orjson.dumps({"seq": seq, "id": msg_id, "accepted": _fmt_ms(accepted_ms),
                                            "expires": _fmt_ms(expiry_ms), "headers": headers,
                                            "body_b64": base64.b64encode(body).decode()}).decode() + "\n")
                else:
                    out.write(f"{seq}\t{msg_id}\taccepted {_fmt_ms(accepted_ms)}\texpires {_fmt_ms(expiry_ms)}"
                              f"\t{len(headers)} headers\t{len(body)} bytes\n")
        elif args.what == "outgoing":
            for seq, rec in outgoing_records(store):
                msg_id, headers, body, expiry_ms, _a = core.decode_envelope(rec.framed)
                if args.json:
                    out.write(orjson.dumps({"id": msg_id, "site": rec.dest, "attempts": rec.attempt,
                                            "next_attempt": _fmt_ms(rec.next_ms) if rec.next_ms else "now",
                                            "last_error": rec.last_error, "headers": headers,
                                            "body_b64": base64.b64encode(body).decode()}).decode() + "\n")
                else:
                    out.write(f"{seq}\t{msg_id}\tto {rec.dest}\tattempts {rec.attempt}\t"
                              f"{rec.last_error or 'not tried yet'}\n")
        else:  # errors: failed handlers (local queue) and failed sends (outgoing)
            for key, value in store.iter_db(store.errors):
                failed_ms, reason, framed = decode_error(value)
                msg_id, headers, body, _e, _a = core.decode_envelope(framed)
                if args.json:
                    out.write(orjson.dumps({"kind": "handler", "id": msg_id, "reason": reason,
                                            "failed_at": _fmt_ms(failed_ms), "headers": headers,
                                            "body_b64": base64.b64encode(body).decode()}).decode() + "\n")
                else:
                    out.write(f"handler\t{unpack_seq(key)}\t{msg_id}\t{_fmt_ms(failed_ms)}\t{reason}\n")
            for key, value in store.iter_db(store.outgoing_errors):
                failed_ms, rec = decode_failed(value)
                msg_id, headers, body, _e, _a = core.decode_envelope(rec.framed)
                if args.json:
                    out.write(orjson.dumps({"kind": "send", "id": msg_id, "site": rec.dest, "attempts": rec.attempt,
                                            "reason": rec.last_error, "failed_at": _fmt_ms(failed_ms),
                                            "headers": headers, "body_b64": base64.b64encode(body).decode()}).decode() + "\n")
                else:
                    out.write(f"send\t{unpack_seq(key)}\t{msg_id}\t{_fmt_ms(failed_ms)}\tto {rec.dest} after "
                              f"{rec.attempt} attempt(s): {rec.last_error}\n")
    finally:
        store.close()
    return 0


def _cmd_backup(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from .filemodes import modes

    target = os.path.abspath(args.dir)
    if os.path.lexists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise GatewayError(f"the backup directory {args.dir!r} exists and is not an empty directory")
    started = time.monotonic()
    store = _open_readonly(args, settings)
    try:
        store.modes = modes(settings.file_mode)  # the copy's files get the configured modes
        try:
            store.modes.make_dir(target)
        except OSError as exc:
            raise GatewayError(f"cannot make the backup directory {args.dir!r}: {exc.strerror or exc}") from None
        summary = store.backup(target)
    finally:
        store.close()
    counts, gone = summary["counts"], summary["gone"]
    print(f"gwcore: backed up {store.path} to {target} in {time.monotonic() - started:.1f} s: {counts['dedup']} "
          f"dedup records, {counts['queue']} queued, {counts['outgoing']} outgoing, "
          f"{counts['databus_blobs'] - len(gone)} blobs, {summary['bytes']} bytes", file=sys.stderr)
    if gone:
        print(f"gwcore: {len(gone)} blob(s) expired while the backup ran and are not in it", file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from .demo import run

    return run(count=args.count, hq_port=args.hq_port, remote_port=args.remote_port, data_dir=args.data_dir,
               keep=args.keep, interval=args.interval, verbose=args.verbose)


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    import signal

    from .consumer import load_handler
    from .server import loop_factory, setup_logging
    from .worker import Worker, drain_worker

    setup_logging(args.log_level, args.log_format or log_format())
    if args.drain is not None:
        if not asyncio.run(drain_worker(args.distributor, args.drain, key_id=args.key_id,
                                        secret_file=args.secret_file)):
            print(f"gwcore: no worker named {args.drain!r} is enlisted at {args.distributor}", file=sys.stderr)
            return 1
        return 0
    if not args.handler:
        raise GatewayError("gwcore worker needs --handler module:function (or --drain NAME)")
    handler = load_handler(args.handler, what="--handler")

    async def run() -> None:
        worker = Worker(args.distributor, args.capacity, handler, name=args.name, wait=args.wait,
                        blob_dir=args.blob_dir, download_dir=args.download_dir, key_id=args.key_id,
                        secret_file=args.secret_file)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.drain)
        await worker.run()

    with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
        runner.run(run())
    return 0


def _settings_epilog() -> str:
    rows = settings_help()
    width = max(len(name) for name, _a, _d in rows)
    lines = ["settings (environment variable, default; docs/configuration.md says what each does):"]
    lines += [f"  {name:<{width}}  {default}" for name, _attr, default in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gwcore",
        description="gwcore: a cross-site messaging gateway speaking the NServiceBus Gateway HTTP channel. "
                    "Configured by GWCORE_* environment variables (docs/configuration.md).",
    )
    parser.add_argument("--version", action="version", version=f"gwcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the gateway (configured by GWCORE_* variables)",
                       description="Run the gateway until SIGTERM or SIGINT, which drain it and exit 0.\n"
                                   "It takes no options: every setting is a GWCORE_* environment variable\n"
                                   "(docs/configuration.md). A setting that is invalid or unknown, or a\n"
                                   "problem found at start-up, stops it with one line and status 2.",
                       epilog=_settings_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=_cmd_serve)
    p = sub.add_parser("inspect", help="look into a store (safe while the gateway runs)")
    p.add_argument("what", choices=("queue", "dedup", "errors", "outgoing", "blobs"))
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--data-dir", help="the store to read (default GWCORE_DATA_DIR)")
    p.set_defaults(func=_cmd_inspect)
    p = sub.add_parser("backup", help="copy the store, also while the gateway runs: a data dir a fresh gateway "
                                      "starts from (docs/operations.md, \"Backup and restore\")",
                       description="Copy the store into DIR (made if missing; it must be empty): one consistent "
                                   "snapshot, compacted, safe while the gateway runs, and the databus blobs it names "
                                   "into DIR/blobs. `gwcore serve` with GWCORE_DATA_DIR=DIR starts from it.")
    p.add_argument("dir", metavar="DIR", help="where the copy goes")
    p.add_argument("--data-dir", help="the store to copy (default GWCORE_DATA_DIR)")
    p.set_defaults(func=_cmd_backup)
    p = sub.add_parser("send", help="send a message to one or more sites (durably queued, then forwarded)")
    p.add_argument("--to", action="append", required=True, metavar="SITE", help="site key (repeat for several)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--body", help="the body as text (UTF-8)")
    src.add_argument("--body-file", help="read the body from this file (default: standard input)")
    p.add_argument("--header", action="append", metavar="NAME=VALUE", help="a message header (repeatable)")
    p.add_argument("--id", help="the message id (default: a new UUID)")
    p.add_argument("--databus", action="append", metavar="NAME=FILE",
                   help="a large property sent as a databus part (header NServiceBus.DataBus.NAME; repeatable)")
    p.add_argument("--data-dir", help="the gateway's data dir (default GWCORE_DATA_DIR)")
    p.set_defaults(func=_cmd_send)
    p = sub.add_parser("retry", help="send failed messages (gwcore inspect errors) again")
    p.add_argument("ids", nargs="*", metavar="ID", help="message ids")
    p.add_argument("--all", action="store_true", help="every message in the outgoing error queue")
    p.add_argument("--data-dir", help="the gateway's data dir (default GWCORE_DATA_DIR)")
    p.set_defaults(func=_cmd_retry)
    p = sub.add_parser("handover", help="stop a running gateway; a selected-mode leader first drains and passes "
                                        "the leadership to another instance")
    p.add_argument("--data-dir", help="the gateway's data dir (default GWCORE_DATA_DIR)")
    p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help="wait this long for the gateway to exit (0: do not wait; default 60)")
    p.set_defaults(func=_cmd_handover)
    p = sub.add_parser("worker", help="work off a distributor's queue (GWCORE_MODE=distributor on the gateway)",
                       description="Enlist with a gateway in distributor mode and run a handler on the messages "
                                   "it hands out; SIGTERM drains (finish in-flight work, take nothing new, leave). "
                                   "Configured by these options only, not by GWCORE_* variables (but for "
                                   "GWCORE_LOG_FORMAT, the default of --log-format).")
    p.add_argument("--distributor", required=True, metavar="URL",
                   help="the distributor's worker URL: its worker listener (GWCORE_WORKER_LISTEN, default "
                        "http://127.0.0.1:25901) or, with worker keys, its receive channel's host and port")
    p.add_argument("--key-id", metavar="ID", help="sign every call with this worker key (GWCORE_WORKER_KEYS on "
                                                  "the distributor); needs --secret-file")
    p.add_argument("--secret-file", metavar="FILE", help="the file holding that key's secret")
    p.add_argument("--capacity", type=int, default=1, metavar="N", help="messages handled at once (default 1)")
    p.add_argument("--handler", metavar="MODULE:FUNCTION", help="sync or async callable taking one message")
    p.add_argument("--name", help="the worker's name on the distributor (default host-pid)")
    p.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                   help="longest a request for work waits (default 10)")
    p.add_argument("--blob-dir", metavar="DIR",
                   help="the distributor's blob dir (its GWCORE_BLOB_DIR, by default <data dir>/blobs) as this host sees it: databus blobs "
                        "found there are read from it instead of being streamed from the distributor")
    p.add_argument("--download-dir", metavar="DIR",
                   help="where a blob's .path downloads it to (default the system's temporary directory)")
    p.add_argument("--drain", metavar="NAME",
                   help="instead of working: tell the distributor to give worker NAME nothing new")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    p.add_argument("--log-format", choices=LOG_FORMATS,
                   help="text lines, or json: one JSON object per line (default GWCORE_LOG_FORMAT, else text; "
                        "the one GWCORE_* variable a worker reads)")
    p.set_defaults(func=_cmd_worker, reads_environment=False)
    p = sub.add_parser("demo", help="watch two sites talk: Headquarters and RemoteSite on loopback (no setup)",
                       description="The NServiceBus gateway sample in one command: Headquarters and RemoteSite, "
                                   "each a gateway process with its own data dir; Headquarters sends UpdatePrice "
                                   "requests, RemoteSite replies to each. GWCORE_* variables are not used.")
    p.add_argument("--count", type=int, default=5, metavar="N", help="price updates to send (default 5)")
    p.add_argument("--interval", type=float, default=0.5, metavar="SECONDS",
                   help="pause between price updates (default 0.5)")
    p.add_argument("--hq-port", type=int, default=25899, metavar="PORT", help="Headquarters' port (default 25899)")
    p.add_argument("--remote-port", type=int, default=25900, metavar="PORT", help="RemoteSite's port (default 25900)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="keep the two stores under DIR (never removed; default: a temporary dir)")
    p.add_argument("--keep", action="store_true", help="do not remove the temporary data dir")
    p.add_argument("--verbose", action="store_true", help="the gateways' info logs too (default: warnings only)")
    p.set_defaults(func=_cmd_demo, reads_environment=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # the demo configures its own gateways: a GWCORE_* variable of this shell must not stop it
        settings = Settings.from_env() if getattr(args, "reads_environment", True) else Settings()
        return args.func(args, settings)
    except GatewayError as exc:
        print(f"gwcore: error: {exc}", file=sys.stderr)
        return 2
