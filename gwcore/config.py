"""Settings: the only module that reads ``GWCORE_*`` environment variables.

Precedence: an explicit keyword argument to :meth:`Settings.from_env`, then the environment, then
the default. Every variable is documented in ``docs/configuration.md``; an invalid value raises
:class:`~gwcore.errors.ConfigurationError` naming the variable, which stops start-up.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import urllib.parse
from typing import Any, Callable, Mapping

from .auth import MIN_SECRET_BYTES, check_key_id
from .errors import ConfigurationError
from .filemodes import FILE_MODES

__all__ = ("Settings", "ReceiveChannel", "Site", "MODES", "parse_duration", "parse_size", "child_environment")

MODES = ("standalone", "distributor", "selected")
LOOPS = ("auto", "uvloop", "asyncio")
HA_CHOICES = ("auto", "on", "off")
FILE_MODE_CHOICES = tuple(FILE_MODES)
ACK_CHOICES = ("dispatched", "stored")
TRANSPORTS = ("rabbitmq", "postgresql")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str) -> float:
    """``"30"``, ``"30s"``, ``"250ms"``, ``"15m"``, ``"12h"``, ``"7d"`` -> seconds (float)."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (examples: 30s, 250ms, 15m, 12h, 7d)")
    return float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "s").lower()]


def parse_size(text: str) -> int:
    """``"1048576"``, ``"512k"``, ``"64MiB"``, ``"2G"`` -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 65536, 512k, 64MiB, 2G)")
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "")[:1].lower()]


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r} (use 1/0, true/false, yes/no)")


def _positive_int(text: str) -> int:
    value = int(text.strip())
    if value <= 0:
        raise ValueError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text.strip())
    if value < 0:
        raise ValueError(f"must be zero or more, got {value}")
    return value


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def _non_negative_duration(text: str) -> float:
    value = parse_duration(text)
    if value < 0:
        raise ValueError("cannot be negative")
    return value


def _positive_size(text: str) -> int:
    value = parse_size(text)
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def _rate(text: str) -> int:
    """A transfer rate in bytes per second: a size, optionally followed by ``/s`` (``64KiB/s``)."""
    t = text.strip()
    if t.lower().endswith("/s"):
        t = t[:-2]
    try:
        value = parse_size(t)
    except ValueError:
        raise ValueError(f"not a rate: {text!r} (examples: 65536, 64KiB/s, 1MiB/s)") from None
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"{text!r} is not one of {', '.join(options)}")
        return value

    return parse


def _optional_text(text: str) -> str | None:
    return text.strip() or None


def _optional_file(text: str) -> str | None:
    path = text.strip()
    if not path:
        return None
    if not os.path.isfile(path):
        raise ValueError(f"no such file: {path!r}")
    return path


def _optional_uri(text: str) -> str | None:
    uri = text.strip()
    if not uri:
        return None
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{uri!r} is not an http:// or https:// URL")
    if parts.hostname in ("+", "*", "0.0.0.0", "::"):
        raise ValueError(f"{uri!r} contains a wildcard host: replies need an address other sites can reach")
    return uri


def _amqp_url(text: str) -> str:
    """One broker URL, or the URLs of a cluster's nodes separated by commas (or whitespace):
    each checked, all on one virtual host; returned joined by commas (``Settings.amqp_urls``)."""
    urls = split_amqp_urls(text)
    if not urls:
        raise ValueError("give at least one amqp:// or amqps:// URL")
    vhosts: dict[str, str] = {}
    for url in urls:
        parts = _url_parts(url, ("amqp", "amqps"), f"{redacted_url(url)!r} is not an amqp:// or amqps:// URL",
                           repr(redacted_url(url)))
        # the client's reading of the path: empty or "/" is the default virtual host "/"
        vhosts.setdefault(urllib.parse.unquote(parts.path[1:]) or "/", url)
    if len(vhosts) > 1:
        raise ValueError(f"the nodes of one cluster are on one virtual host, not {' and '.join(map(repr, vhosts))}: "
                         "another one would be another set of queues (and another leader)")
    if len(set(urls)) < len(urls):
        raise ValueError("a URL is listed twice")
    return ",".join(urls)


def _url_parts(url: str, schemes: tuple[str, ...], not_one: str, where: str) -> urllib.parse.SplitResult:
    """*url* split, checked to be one of *schemes* with a host and a valid port (ValueError:
    *not_one*, or *where* and what is wrong with the port)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in schemes or not parts.hostname:
        raise ValueError(not_one)
    try:
        parts.port
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return parts


def split_amqp_urls(text: str) -> list[str]:
    """The URLs of a ``GWCORE_AMQP_URL`` value (one, or a cluster's nodes separated by commas or
    whitespace; a comma in a password is written ``%2C``, which the client decodes)."""
    return [u for u in re.split(r"[,\s]+", text) if u]


def redacted_url(url: str) -> str:
    """*url* without its password, for logs and errors."""
    head, sep, tail = url.rpartition("@")
    if not sep:
        return url
    scheme, _, userinfo = head.partition("://")
    return f"{scheme}://{userinfo.split(':')[0]}@{tail}"


def _pg_dsn(text: str) -> str:
    """A libpq connection URI (``postgresql://`` or ``postgres://``), as asyncpg takes it."""
    dsn = text.strip()
    _url_parts(dsn, ("postgresql", "postgres"), f"{redacted_url(dsn)!r} is not a postgresql:// URL",
               repr(redacted_url(dsn)))
    return dsn


def _pg_schema(text: str) -> str:
    name = text.strip()
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"{name!r}: use lower-case letters, digits and '_' (at most 63, not a digit first)")
    return name


#: Seconds between the heartbeats every instance on PostgreSQL writes (gwcore/pgsql/instances.py;
#: the round of gwcore/pgsql/mode.py's housekeeping). Not a setting.
PG_HEARTBEAT = 5.0
#: The shortest GWCORE_PG_INSTANCE_EXPIRY: twelve heartbeats, so a live instance that misses a few
#: is never taken for gone.
PG_INSTANCE_EXPIRY_MIN = 12 * PG_HEARTBEAT


def _pg_instance_expiry(text: str) -> float:
    value = parse_duration(text)
    if value < PG_INSTANCE_EXPIRY_MIN:
        raise ValueError(f"must be at least {PG_INSTANCE_EXPIRY_MIN:g}s: every instance renews its heartbeat every "
                         f"{PG_HEARTBEAT:g}s, and the reply table of one not seen for this long is dropped")
    return value


def _instance_name(text: str) -> str | None:
    name = text.strip()
    if name and not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", name):
        raise ValueError(f"{name!r}: use letters, digits, '.', '_' and '-' (it names a queue)")
    return name or None


def _durations(text: str) -> tuple[float, ...]:
    items = [t for t in re.split(r"[,\s]+", text) if t]
    if not items:
        raise ValueError("give at least one delay (example: 60s,120s,180s,240s)")
    values = tuple(parse_duration(t) for t in items)
    if any(v < 0 for v in values):
        raise ValueError("delays cannot be negative")
    return values


def _handler(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    module, sep, func = text.partition(":")
    if not sep or not module or not func:
        raise ValueError(f"{text!r} is not of the form module:function")
    return text


@dataclasses.dataclass(frozen=True)
class Site:
    """A remote site this gateway sends to: its key, channel address and how to talk to it."""

    key: str
    url: str
    concurrency: int = 8
    secret: bytes | None = dataclasses.field(default=None, repr=False)  # signs our requests to it
    key_id: str | None = None  # the name the site knows our secret by (default: our endpoint)
    ca_file: str | None = None  # CA bundle to verify an https site (default: GWCORE_TLS_CA, then system)

    @classmethod
    def parse_url(cls, key: str, url: str, **kw: Any) -> "Site":
        url = url.strip()
        _url_parts(url, ("http", "https"), f"site {key!r}: {url!r} is not an http:// or https:// channel address",
                   f"site {key!r}: {url!r}")
        if not key or any(c in key for c in ",= \t"):
            raise ValueError(f"site key {key!r} must be non-empty without commas, '=' or spaces")
        return cls(key=key, url=url, **kw)


def _parse_sites(text: str) -> dict[str, str]:
    """``"Key=url, Key2=url2"`` -> {key: url} (GWCORE_SITES)."""
    out: dict[str, str] = {}
    for item in (t for t in re.split(r"[,\s]+", text) if t):
        key, sep, url = item.partition("=")
        if not sep or not key.strip() or not url.strip():
            raise ValueError(f"{item!r} is not of the form Key=url")
        out[key.strip()] = url.strip()
    return out


def _worker_listen(text: str) -> "WorkerListen | None":
    """``[http://|https://]host:port`` of the worker listener, or ``off``."""
    text = text.strip()
    if text.lower() in ("off", "none", "0", ""):
        return None
    tls = False
    for scheme in ("http://", "https://"):
        if text.lower().startswith(scheme):
            tls, text = scheme == "https://", text[len(scheme):].rstrip("/")
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError("expected host:port (for example 127.0.0.1:25901), or off")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return WorkerListen(host, port, tls)


def _admin_listen(text: str) -> "WorkerListen | None":
    """``host:port`` of the admin listener (plain HTTP), or unset/``off``."""
    listen = _worker_listen(text)
    if listen is not None and listen.tls:
        raise ValueError("the admin listener serves plain http: give host:port (terminate TLS in front of it)")
    return listen


def _metrics_public(text: str) -> str:
    """``auto``, or a boolean: ``on``/``off``."""
    if text.strip().lower() == "auto":
        return "auto"
    return "on" if _parse_bool(text) else "off"


def _worker_key_files(text: str) -> dict[str, str]:
    """``id:/path/to/secret,id2:/path`` -> {id: path}."""
    out: dict[str, str] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        key_id, sep, path = item.partition(":")
        if not sep or not key_id.strip() or not path.strip():
            raise ValueError(f"{item!r}: expected <key id>:<secret file>")
        out[key_id.strip()] = path.strip()
    return out


def _worker_keys(config: Mapping[str, Any], files: Mapping[str, str]) -> tuple[tuple[str, bytes], ...]:
    workers = config.get("workers", {})
    if not isinstance(workers, dict):
        raise ValueError("[workers] must be a table")
    unknown = sorted(set(workers) - {"keys"})
    if unknown:
        raise ValueError(f"[workers]: unknown keys {', '.join(unknown)} (known: keys)")
    keys = workers.get("keys", {})
    if not isinstance(keys, dict):
        raise ValueError("[workers.keys] must map key ids to secrets")
    tables: dict[str, Mapping[str, Any]] = {}
    for key_id, value in keys.items():
        tables[key_id] = value if isinstance(value, dict) else {"secret": value}
    for key_id, path in files.items():
        if key_id in tables:
            raise ValueError(f"worker key {key_id!r} is given in GWCORE_WORKER_KEYS and in [workers.keys]")
        tables[key_id] = {"secret_file": path}
    out = []
    for key_id, table in tables.items():
        try:
            check_key_id(key_id)
        except ValueError as exc:
            raise ValueError(f"worker {exc}") from None
        secret = _secret(f"worker key {key_id}", table)
        if secret is None:
            raise ValueError(f"worker key {key_id}: no secret or secret_file")
        out.append((key_id, secret))
    return tuple(out)


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigurationError(f"GWCORE_CONFIG={path!r}: cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"GWCORE_CONFIG={path!r} is not valid TOML: {exc}") from None


def _secret(where: str, table: Mapping[str, Any]) -> bytes | None:
    if "secret" in table and "secret_file" in table:
        raise ValueError(f"{where}: give secret or secret_file, not both")
    if "secret_file" in table:
        try:
            with open(str(table["secret_file"]), "rb") as f:
                value = f.read().strip()
        except OSError as exc:
            raise ValueError(f"{where}: secret_file {table['secret_file']!r}: {exc.strerror}") from None
    elif "secret" in table:
        value = str(table["secret"]).encode()
    else:
        return None
    if len(value) < MIN_SECRET_BYTES:
        raise ValueError(f"{where}: a shared secret needs at least {MIN_SECRET_BYTES} bytes")
    return value


_SITE_KEYS = frozenset({"url", "concurrency", "secret", "secret_file", "key_id", "ca_file"})


def _sites_from(config: Mapping[str, Any], env_sites: Mapping[str, str], concurrency: int) -> tuple["Site", ...]:
    tables = config.get("sites", {})
    if not isinstance(tables, dict):
        raise ValueError("[sites] must be a table of [sites.<Key>] tables")
    sites: dict[str, Site] = {}
    for key, table in tables.items():
        where = f"[sites.{key}]"
        if not isinstance(table, dict):
            raise ValueError(f"{where} must be a table")
        unknown = sorted(set(table) - _SITE_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(_SITE_KEYS))})")
        if "url" not in table and key not in env_sites:
            raise ValueError(f"{where} has no url")
        conc = table.get("concurrency", concurrency)
        if not isinstance(conc, int) or isinstance(conc, bool) or conc <= 0:
            raise ValueError(f"{where}: concurrency must be a positive integer")
        sites[key] = Site.parse_url(
            key, env_sites.get(key, str(table.get("url", ""))), concurrency=conc,
            secret=_secret(where, table), key_id=table.get("key_id"), ca_file=table.get("ca_file"),
        )
    for key, url in env_sites.items():
        if key not in sites:
            sites[key] = Site.parse_url(key, url, concurrency=concurrency)
    return tuple(sites.values())


def _receive_keys(config: Mapping[str, Any]) -> tuple[tuple[tuple[str, bytes], ...], bool]:
    receive = config.get("receive", {})
    if not isinstance(receive, dict):
        raise ValueError("[receive] must be a table")
    unknown = sorted(set(receive) - {"keys", "allow_unsigned", "accept_v1"})
    if unknown:
        raise ValueError(f"[receive]: unknown keys {', '.join(unknown)} (known: keys, allow_unsigned, accept_v1)")
    keys = receive.get("keys", {})
    if not isinstance(keys, dict):
        raise ValueError("[receive.keys] must map key ids to secrets")
    out = []
    for key_id, value in keys.items():
        secret = _secret(f"[receive.keys] {key_id}", value if isinstance(value, dict) else {"secret": value})
        assert secret is not None
        out.append((key_id, secret))
    allow = receive.get("allow_unsigned", not out)
    if not isinstance(allow, bool):
        raise ValueError("[receive] allow_unsigned must be true or false")
    return tuple(out), allow


def _accept_v1(config: Mapping[str, Any], environ: Mapping[str, str], where: str) -> bool:
    # GWCORE_AUTH_ACCEPT_V1, else [receive] accept_v1, else true
    raw = environ.get("GWCORE_AUTH_ACCEPT_V1")
    if raw is not None:
        try:
            return _parse_bool(raw)
        except ValueError as exc:
            raise ConfigurationError(f"GWCORE_AUTH_ACCEPT_V1={raw!r} is invalid: {exc}") from None
    receive = config.get("receive", {})
    value = receive.get("accept_v1", True) if isinstance(receive, dict) else True
    if not isinstance(value, bool):
        raise ConfigurationError(f"{where}: [receive] accept_v1 must be true or false")
    return value


@dataclasses.dataclass(frozen=True)
class WorkerListen:
    """The distributor's worker listener (``GWCORE_WORKER_LISTEN``)."""

    host: str
    port: int
    tls: bool = False

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class ReceiveChannel:
    """One receive channel: an HTTP listener address plus the path prefix it answers under."""

    url: str
    host: str
    port: int
    path: str  # always starts and ends with '/'
    tls: bool = False  # https:// (needs GWCORE_TLS_CERT and GWCORE_TLS_KEY)

    @classmethod
    def parse(cls, url: str) -> "ReceiveChannel":
        parts = urllib.parse.urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"{url!r}: a receive channel is an http:// or https:// URL")
        # NServiceBus (HttpListener) accepts '+' and '*' as "every interface".
        host = parts.hostname or ""
        netloc_host = parts.netloc.rsplit(":", 1)[0] if parts.port is not None else parts.netloc
        if netloc_host in ("+", "*") or host in ("+", "*"):
            host = "0.0.0.0"
        if not host:
            raise ValueError(f"{url!r}: no host")
        try:
            default_port = 443 if scheme == "https" else 80
            port = parts.port if parts.port is not None else default_port   # ":0" = an ephemeral port
        except ValueError as exc:
            raise ValueError(f"{url!r}: {exc}") from None
        path = parts.path or "/"
        if not path.startswith("/"):
            path = "/" + path
        if not path.endswith("/"):
            # HttpListener prefixes must end with '/'; a missing one is an easy slip, not an error.
            path += "/"
        return cls(url=url.strip(), host=host, port=port, path=path, tls=scheme == "https")


# name -> (attribute, parser, default text). The default goes through the parser too, so a default
# can never be of another shape than a value a user could set.
_VARIABLES: dict[str, tuple[str, Callable[[str], Any] | None, str]] = {
    "GWCORE_MODE": ("mode", _choice(MODES), "standalone"),
    "GWCORE_ENDPOINT": ("endpoint", str.strip, "gwcore"),
    "GWCORE_RECEIVE_CHANNELS": ("receive_channels", None, ""),  # parsed with the endpoint
    "GWCORE_DATA_DIR": ("data_dir", str.strip, "./var/gwcore"),
    "GWCORE_BLOB_DIR": ("blob_dir", str.strip, ""),  # empty: <data dir>/blobs
    "GWCORE_COMMIT_MAX_BATCH": ("commit_max_batch", _positive_int, "1024"),
    "GWCORE_COMMIT_MAX_DELAY_US": ("commit_max_delay_us", _non_negative_int, "0"),
    "GWCORE_COMMIT_MAX_PENDING": ("commit_max_pending", _positive_int, "8192"),
    "GWCORE_STORE_SYNC": ("store_sync", _parse_bool, "1"),
    "GWCORE_STORE_MAP_SIZE": ("store_map_size", _positive_size, "256MiB"),
    "GWCORE_STORE_MAX_SIZE": ("store_max_size", _positive_size, "64GiB"),
    "GWCORE_STORE_PREALLOCATE": ("store_preallocate", parse_size, "8MiB"),
    "GWCORE_DEDUP_TTL": ("dedup_ttl", _positive_duration, "7d"),
    "GWCORE_DEDUP_CLEANUP_SLICE": ("dedup_cleanup_slice", _positive_int, "2000"),
    "GWCORE_MAX_BODY": ("max_body", _positive_size, "16MiB"),
    "GWCORE_MAX_BATCH_MESSAGES": ("max_batch_messages", _positive_int, "1000"),
    "GWCORE_MAX_BATCH_BYTES": ("max_batch_bytes", _positive_size, "4MiB"),
    "GWCORE_SEND_BATCH": ("send_batch", _parse_bool, "1"),
    "GWCORE_MAX_BLOB": ("max_blob", _positive_size, "4GiB"),
    "GWCORE_DATABUS_TTL": ("databus_ttl", _positive_duration, "7d"),
    "GWCORE_BLOB_DIRECT_IO": ("blob_direct_io", _parse_bool, "1"),
    "GWCORE_FILE_MODE": ("file_mode", _choice(FILE_MODE_CHOICES), "private"),
    "GWCORE_HTTP_MAX_HEADERS": ("http_max_headers", _positive_int, "256"),
    "GWCORE_HTTP_MAX_HEADER_BYTES": ("http_max_header_bytes", _positive_size, "64KiB"),
    "GWCORE_HTTP_REQUEST_TIMEOUT": ("http_request_timeout", _positive_duration, "30s"),
    "GWCORE_HTTP_KEEPALIVE_TIMEOUT": ("http_keepalive_timeout", _positive_duration, "15s"),
    "GWCORE_HTTP_MAX_PIPELINE": ("http_max_pipeline", _positive_int, "64"),
    "GWCORE_HTTP_MIN_RATE": ("http_min_rate", _rate, "64KiB/s"),
    "GWCORE_HTTP_MAX_CONNECTIONS": ("http_max_connections", _positive_int, "4096"),
    "GWCORE_HTTP_MAX_CONNECTIONS_PER_PEER": ("http_max_connections_per_peer", _positive_int, "256"),
    "GWCORE_HTTP_MAX_PARTS_PER_PEER": ("http_max_parts_per_peer", _positive_int, "16"),
    "GWCORE_HTTP_ALLOW_GET": ("http_allow_get", _parse_bool, "0"),
    "GWCORE_HANDLER": ("handler", _handler, ""),
    "GWCORE_HANDLER_CONCURRENCY": ("handler_concurrency", _positive_int, "1"),
    "GWCORE_HANDLER_MAX_ATTEMPTS": ("handler_max_attempts", _positive_int, "5"),
    "GWCORE_SHUTDOWN_TIMEOUT": ("shutdown_timeout", _positive_duration, "30s"),
    "GWCORE_LOOP": ("loop", _choice(LOOPS), "auto"),
    "GWCORE_LOG_LEVEL": ("log_level", _choice(LOG_LEVELS), "info"),
    "GWCORE_LOG_FORMAT": ("log_format", _choice(LOG_FORMATS), "text"),
    "GWCORE_ADMIN_LISTEN": ("admin_listen", _admin_listen, "off"),
    "GWCORE_METRICS_PUBLIC": ("metrics_public", _metrics_public, "auto"),
    # sending side
    "GWCORE_SITES": ("sites", None, ""),  # parsed with GWCORE_CONFIG
    "GWCORE_CONFIG": ("config_file", _optional_file, ""),
    "GWCORE_REPLY_TO_URI": ("reply_to_uri", _optional_uri, ""),
    "GWCORE_RETRIES": ("retries", _non_negative_int, "4"),
    "GWCORE_RETRY_DELAYS": ("retry_delays", _durations, "60s,120s,180s,240s"),
    "GWCORE_SEND_CONCURRENCY": ("send_concurrency", _positive_int, "8"),
    "GWCORE_SEND_TIMEOUT": ("send_timeout", _positive_duration, "30s"),
    "GWCORE_SEND_LINGER": ("send_linger", _non_negative_duration, "0"),
    "GWCORE_REPLY_DESTINATIONS_MAX": ("reply_destinations_max", _positive_int, "256"),
    # security
    "GWCORE_TLS_CERT": ("tls_cert", _optional_file, ""),
    "GWCORE_TLS_KEY": ("tls_key", _optional_file, ""),
    "GWCORE_TLS_CA": ("tls_ca", _optional_file, ""),
    "GWCORE_AUTH_MAX_SKEW": ("auth_max_skew", _positive_duration, "5m"),
    "GWCORE_AUTH_ACCEPT_V1": ("auth_accept_v1", None, "1"),  # read with GWCORE_CONFIG's [receive]
    # distributor mode
    "GWCORE_WORKER_LEASE": ("worker_lease", _positive_duration, "30s"),
    "GWCORE_WORKER_LISTEN": ("worker_listen", _worker_listen, "127.0.0.1:25901"),
    "GWCORE_WORKER_KEYS": ("worker_keys", None, ""),  # parsed with GWCORE_CONFIG
    "GWCORE_WORKER_MAX_CAPACITY": ("worker_max_capacity", _positive_int, "1000"),
    "GWCORE_WORKER_MAX_SESSIONS": ("worker_max_sessions", _positive_int, "256"),
    # active/passive on one data dir
    "GWCORE_HA": ("ha", _choice(HA_CHOICES), "auto"),
    # selected-instance mode (RabbitMQ)
    "GWCORE_AMQP_URL": ("amqp_url", _amqp_url, "amqp://guest:guest@127.0.0.1:5672/"),
    "GWCORE_AMQP_PREFETCH": ("amqp_prefetch", _positive_int, "64"),
    "GWCORE_ACK": ("ack", _choice(ACK_CHOICES), "dispatched"),
    "GWCORE_OUTBOX_MAX": ("outbox_max", _positive_int, "100000"),
    "GWCORE_OUTBOX_MAX_BYTES": ("outbox_max_bytes", _positive_size, "256MiB"),
    "GWCORE_ELECTION_INTERVAL": ("election_interval", _positive_duration, "250ms"),
    "GWCORE_INSTANCE": ("instance", _instance_name, ""),
    # selected-instance mode on PostgreSQL
    "GWCORE_TRANSPORT": ("transport", _choice(TRANSPORTS), "rabbitmq"),
    "GWCORE_PG_DSN": ("pg_dsn", _pg_dsn, "postgresql://postgres@127.0.0.1:5432/postgres"),
    "GWCORE_PG_SCHEMA": ("pg_schema", _pg_schema, "public"),
    "GWCORE_PG_INSTANCE_EXPIRY": ("pg_instance_expiry", _pg_instance_expiry, "1h"),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything gwcore can be told, parsed once. Durations are seconds, sizes bytes."""

    mode: str = "standalone"
    endpoint: str = "gwcore"
    receive_channels: tuple[ReceiveChannel, ...] = ()
    data_dir: str = "./var/gwcore"
    #: GWCORE_BLOB_DIR as given; empty means ``<data dir>/blobs``, this store's own (docs/databus.md).
    blob_dir: str = ""
    commit_max_batch: int = 1024
    commit_max_delay_us: int = 0
    commit_max_pending: int = 8192
    store_sync: bool = True
    store_map_size: int = 256 << 20
    store_preallocate: int = 8 << 20
    store_max_size: int = 64 << 30
    dedup_ttl: float = 7 * 86400.0
    dedup_cleanup_slice: int = 2000
    max_body: int = 16 << 20
    max_batch_messages: int = 1000
    max_batch_bytes: int = 4 << 20
    send_batch: bool = True
    max_blob: int = 4 << 30
    databus_ttl: float = 7 * 86400.0
    blob_direct_io: bool = True
    file_mode: str = "private"
    http_max_headers: int = 256
    http_max_header_bytes: int = 64 << 10
    http_request_timeout: float = 30.0
    http_keepalive_timeout: float = 15.0
    http_max_pipeline: int = 64
    #: Bytes per second a request must average since its first byte, once its
    #: GWCORE_HTTP_REQUEST_TIMEOUT is used up: each byte received extends its deadline by 1/rate s.
    http_min_rate: int = 64 << 10
    http_max_connections: int = 4096
    #: Connections from one address (IP) at once; one more is answered 503 and closed.
    http_max_connections_per_peer: int = 256
    #: Streamed databus parts being received from one address at once; one more is 503 at its head.
    http_max_parts_per_peer: int = 16
    http_allow_get: bool = False
    handler: str | None = None
    handler_concurrency: int = 1
    handler_max_attempts: int = 5
    shutdown_timeout: float = 30.0
    loop: str = "auto"
    log_level: str = "info"
    #: GWCORE_LOG_FORMAT: ``text`` lines, or ``json``: one JSON object per line.
    log_format: str = "text"
    sites: tuple[Site, ...] = ()
    config_file: str | None = None
    reply_to_uri: str | None = None
    retries: int = 4
    retry_delays: tuple[float, ...] = (60.0, 120.0, 180.0, 240.0)
    send_concurrency: int = 8
    send_timeout: float = 30.0
    send_linger: float = 0.0
    reply_destinations_max: int = 256
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    auth_max_skew: float = 300.0
    #: Whether signature scheme v1 is accepted beside v2 (docs/security.md).
    auth_accept_v1: bool = True
    worker_lease: float = 30.0
    #: Where the worker API is served besides (with worker keys) the receive channels; None: off.
    worker_listen: WorkerListen | None = WorkerListen("127.0.0.1", 25901)
    #: (key id, secret) pairs workers sign their calls with; none: workers only on worker_listen.
    worker_keys: tuple[tuple[str, bytes], ...] = dataclasses.field(default=(), repr=False)
    worker_max_capacity: int = 1000
    worker_max_sessions: int = 256
    ha: str = "auto"
    amqp_url: str = dataclasses.field(default="amqp://guest:guest@127.0.0.1:5672/", repr=False)
    amqp_prefetch: int = 64
    ack: str = "dispatched"
    outbox_max: int = 100_000
    outbox_max_bytes: int = 256 * 1024 * 1024
    election_interval: float = 0.25
    instance: str | None = None
    #: GWCORE_TRANSPORT: what selected mode runs on, ``rabbitmq`` or ``postgresql``.
    transport: str = "rabbitmq"
    pg_dsn: str = dataclasses.field(default="postgresql://postgres@127.0.0.1:5432/postgres", repr=False)
    pg_schema: str = "public"
    #: An instance not seen for this long (s) is gone: the leader drops its reply table.
    pg_instance_expiry: float = 3600.0
    receive_keys: tuple[tuple[str, bytes], ...] = dataclasses.field(default=(), repr=False)
    allow_unsigned: bool = True
    #: The admin listener (``/metrics``, ``/healthz``, ``/readyz`` only); None: none.
    admin_listen: WorkerListen | None = None
    #: Whether ``/metrics`` is served on the receive channels and the worker listener:
    #: ``auto`` (see :meth:`metrics_public_on`), ``on``, ``off``.
    metrics_public: str = "auto"

    @property
    def amqp_urls(self) -> tuple[str, ...]:
        """The broker's URLs, one per node of a cluster (``GWCORE_AMQP_URL`` may list several)."""
        return tuple(split_amqp_urls(self.amqp_url))

    def site(self, key: str) -> Site | None:
        for s in self.sites:
            if s.key == key:
                return s
        return None

    def site_at(self, url: str) -> Site | None:
        """The configured site whose channel address is *url* (a trailing '/' aside), if any: a
        reply addressed by URL is signed with that site's secret."""
        want = url.rstrip("/")
        return next((s for s in self.sites if s.url.rstrip("/") == want), None)

    @property
    def reply_uri(self) -> str | None:
        """Where other sites send replies (NServiceBus.OriginatingSite): GWCORE_REPLY_TO_URI, else the
        first receive channel unless it binds a wildcard address."""
        if self.reply_to_uri:
            return self.reply_to_uri
        if self.receive_channels and self.receive_channels[0].host not in ("0.0.0.0", "::"):
            return self.receive_channels[0].url
        return None

    def metrics_public_on(self, *, workers: bool = False) -> bool:
        """Whether ``/metrics`` is served on a public listener: a receive channel, or with
        *workers* the worker listener. ``GWCORE_METRICS_PUBLIC=on``: yes; ``off``: no; ``auto``:
        only when there is no admin listener and the listener takes unsigned requests anyway (a
        receive channel without ``[receive.keys]`` or with ``allow_unsigned``; the worker
        listener without worker keys, which is then on a loopback address). A listener that
        requires signatures never shows an unsigned caller its metrics by default."""
        if self.metrics_public != "auto":
            return self.metrics_public == "on"
        if self.admin_listen is not None:
            return False
        if workers:
            return not self.worker_keys
        return not self.receive_keys or self.allow_unsigned

    @property
    def passive_allowed(self) -> bool:
        """Whether a node that finds the data dir's lease held waits as passive (GWCORE_HA; auto
        means: in distributor mode) rather than stopping with "the store is in use"."""
        return self.ha == "on" or (self.ha == "auto" and self.mode == "distributor")

    def retry_delay(self, retry: int) -> float:
        """Seconds before retry number ``retry`` (1-based); the last delay repeats."""
        return self.retry_delays[min(retry, len(self.retry_delays)) - 1]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Build settings from ``GWCORE_*`` variables; keyword arguments win over the environment.

        :param environ: the mapping to read (default ``os.environ``).
        :param overrides: attribute values that take precedence, already typed.
        :raises ConfigurationError: a variable has an invalid value (the message names it).
        """
        env = os.environ if environ is None else environ
        unknown = sorted(k for k in env if k.startswith("GWCORE_") and k not in _VARIABLES
                         and k not in BUILD_VARIABLES and not k.startswith(TEST_PREFIX))
        if unknown:
            raise ConfigurationError(
                f"unknown setting {', '.join(unknown)}: see docs/configuration.md for the GWCORE_* variables"
            )
        values: dict[str, Any] = {}
        for name, (attr, parser, default) in _VARIABLES.items():
            if attr in overrides or parser is None:
                continue
            raw = env.get(name)
            text = default if raw is None else raw
            try:
                values[attr] = parser(text)
            except ValueError as exc:
                raise ConfigurationError(f"{name}={text!r} is invalid: {exc}") from None
        values.update({k: v for k, v in overrides.items() if k not in ("receive_channels", "sites")})
        config = _read_config_file(values["config_file"]) if values.get("config_file") else {}
        where = f"GWCORE_CONFIG={values.get('config_file')!r}"
        try:
            if "sites" in overrides:
                sites = overrides["sites"]
                env_sites = _parse_sites(sites) if isinstance(sites, str) else dict(sites)
            else:
                env_sites = _parse_sites(env.get("GWCORE_SITES", ""))
        except ValueError as exc:
            raise ConfigurationError(f"GWCORE_SITES is invalid: {exc}") from None
        try:
            values["sites"] = _sites_from(config, env_sites, values.get("send_concurrency", 8))
            if "worker_keys" not in overrides:
                try:
                    files = _worker_key_files(env.get("GWCORE_WORKER_KEYS", ""))
                except ValueError as exc:
                    raise ConfigurationError(f"GWCORE_WORKER_KEYS is invalid: {exc}") from None
                values["worker_keys"] = _worker_keys(config, files)
            if "receive_keys" not in overrides:
                values["receive_keys"], allow = _receive_keys(config)
                values.setdefault("allow_unsigned", allow)
            else:
                # as in the file: keys given means unsigned requests are refused unless said otherwise
                values.setdefault("allow_unsigned", not values["receive_keys"])
        except ValueError as exc:
            raise ConfigurationError(f"{where if config else 'GWCORE_SITES'}: {exc}") from None
        if "auth_accept_v1" not in overrides:
            values["auth_accept_v1"] = _accept_v1(config, env, where)
        unknown_tables = sorted(set(config) - {"sites", "receive", "workers"})
        if unknown_tables:
            raise ConfigurationError(
                f"{where}: unknown tables {', '.join(unknown_tables)} (known: sites, receive, workers)")
        if not values.get("endpoint"):
            raise ConfigurationError("GWCORE_ENDPOINT must not be empty: it names the endpoint and its dedup scope")
        if "receive_channels" in overrides:
            channels = overrides["receive_channels"]
            if isinstance(channels, str):
                channels = _parse_channels("receive_channels argument", channels, values["endpoint"])
            else:
                channels = tuple(c if isinstance(c, ReceiveChannel) else ReceiveChannel.parse(c) for c in channels)
        else:
            channels = _parse_channels("GWCORE_RECEIVE_CHANNELS", env.get("GWCORE_RECEIVE_CHANNELS", ""), values["endpoint"])
        values["receive_channels"] = channels
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Cross-field checks; raises :class:`ConfigurationError`."""
        if self.store_map_size > self.store_max_size:
            raise ConfigurationError(
                f"GWCORE_STORE_MAP_SIZE ({self.store_map_size}) is larger than GWCORE_STORE_MAX_SIZE ({self.store_max_size})"
            )
        if self.mode not in _AVAILABLE_MODES:
            raise ConfigurationError(
                f"GWCORE_MODE={self.mode!r} is not available in this version yet; use "
                + " or ".join(repr(m) for m in _AVAILABLE_MODES)
            )
        if self.mode == "selected" and self.ha == "on":
            raise ConfigurationError("GWCORE_HA=on does not go with GWCORE_MODE=selected: selected instances each "
                                     "have a data dir of their own and are elected through the broker")
        seen: dict[tuple[int, str], str] = {}
        for ch in self.receive_channels:
            k = (ch.port, ch.path)
            if k in seen:
                raise ConfigurationError(
                    f"GWCORE_RECEIVE_CHANNELS: {ch.url!r} and {seen[k]!r} share port {ch.port} and path {ch.path}"
                )
            seen[k] = ch.url
            if ch.path in ("/healthz/", "/readyz/", "/metrics/"):
                raise ConfigurationError(f"GWCORE_RECEIVE_CHANNELS: {ch.url!r} collides with a built-in endpoint")
        schemes: dict[tuple[str, int], bool] = {}
        for ch in self.receive_channels:
            if schemes.setdefault((ch.host, ch.port), ch.tls) != ch.tls:
                raise ConfigurationError(
                    f"GWCORE_RECEIVE_CHANNELS: http:// and https:// channels on one port ({ch.host}:{ch.port})")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigurationError("GWCORE_TLS_CERT and GWCORE_TLS_KEY go together: set both or neither")
        for ch in self.receive_channels:
            if ch.tls and not self.tls_cert:
                raise ConfigurationError(
                    f"GWCORE_RECEIVE_CHANNELS: {ch.url!r} is https:// and needs GWCORE_TLS_CERT and GWCORE_TLS_KEY")
        if self.tls_cert and not any(ch.tls for ch in self.receive_channels) and not (
                self.mode == "distributor" and self.worker_listen is not None and self.worker_listen.tls):
            raise ConfigurationError("GWCORE_TLS_CERT is set but no receive channel is https://")
        wl = self.worker_listen
        if self.mode == "distributor" and wl is not None:
            if not wl.loopback and not self.worker_keys:
                raise ConfigurationError(
                    f"GWCORE_WORKER_LISTEN={wl} is not a loopback address and no worker keys are configured: "
                    "anyone who reaches it could take and delete the queue. Set GWCORE_WORKER_KEYS (or "
                    "[workers.keys] in GWCORE_CONFIG), or listen on 127.0.0.1")
            if wl.tls and not self.tls_cert:
                raise ConfigurationError(f"GWCORE_WORKER_LISTEN={wl} is https:// and needs GWCORE_TLS_CERT and GWCORE_TLS_KEY")
            for ch in self.receive_channels:
                if ch.port == wl.port and ch.port != 0 and (ch.host == wl.host or "0.0.0.0" in (ch.host, wl.host)
                                                            or "::" in (ch.host, wl.host)):
                    raise ConfigurationError(
                        f"GWCORE_WORKER_LISTEN={wl} uses the port of the receive channel {ch.url!r}: the worker "
                        "listener needs a port of its own")
        al = self.admin_listen
        if al is not None and al.port != 0:
            taken = [(ch.host, ch.port, f"the receive channel {ch.url!r}") for ch in self.receive_channels]
            if self.mode == "distributor" and wl is not None:
                taken.append((wl.host, wl.port, f"GWCORE_WORKER_LISTEN={wl}"))
            for host, port, what in taken:
                if port == al.port and (host == al.host or "0.0.0.0" in (host, al.host) or "::" in (host, al.host)):
                    raise ConfigurationError(f"GWCORE_ADMIN_LISTEN={al.host}:{al.port} uses the port of {what}: "
                                             "the admin listener needs a port of its own")
        if self.sites and self.reply_uri is None:
            raise ConfigurationError(
                "GWCORE_REPLY_TO_URI is required: the first receive channel binds a wildcard address, "
                "and other sites need an address to send replies to")


# Modes this version runs (MODES lists every name the design has).
_AVAILABLE_MODES = ("standalone", "distributor", "selected")

#: Build-time flags read by setup.py only; listed so that from_env does not call them unknown.
BUILD_VARIABLES = frozenset({"GWCORE_DEBUG", "GWCORE_FUZZ", "GWCORE_ANNOTATE", "GWCORE_CYTHON_ALWAYS"})
#: Variables of gwcore's own test suite (GWCORE_TEST_AMQP_URL, docs/development.md) begin with
#: this; gwcore itself never reads them, and one left in a developer's shell must not stop it.
TEST_PREFIX = "GWCORE_TEST_"


def _parse_channels(name: str, text: str, endpoint: str) -> tuple[ReceiveChannel, ...]:
    urls = [u for u in re.split(r"[,\s]+", text) if u]
    if not urls:
        # NServiceBus's convention channel is http://localhost/<Endpoint>/; port 80 needs root, so
        # gwcore's default keeps the path convention on the port of the NServiceBus samples.
        urls = [f"http://127.0.0.1:25900/{endpoint}/"]
    try:
        return tuple(ReceiveChannel.parse(u) for u in urls)
    except ValueError as exc:
        raise ConfigurationError(f"{name} is invalid: {exc}") from None


def variables() -> dict[str, str]:
    """Name -> default text of every runtime variable (used by the docs check)."""
    return {name: default for name, (_a, _p, default) in _VARIABLES.items()}


# What a default is when the table's text is empty because it is computed or means "unset".
_COMPUTED_DEFAULTS = {
    "GWCORE_RECEIVE_CHANNELS": "http://127.0.0.1:25900/<endpoint>/",
    "GWCORE_BLOB_DIR": "<data dir>/blobs",
    "GWCORE_INSTANCE": "<host>-<pid>-<random>",
}


def settings_help() -> list[tuple[str, str, str]]:
    """(variable, setting, default as a reader should see it) of every runtime variable, in the
    table's order: what ``gwcore serve --help`` lists."""
    return [(name, attr, _COMPUTED_DEFAULTS.get(name) or default or "unset")
            for name, (attr, _p, default) in _VARIABLES.items()]


def log_format(environ: Mapping[str, str] | None = None) -> str:
    """GWCORE_LOG_FORMAT alone, for ``gwcore worker``, which takes no other ``GWCORE_*`` setting:
    a worker run beside its gateway logs in the same format.

    :raises ConfigurationError: the value is not ``text`` or ``json``.
    """
    env = os.environ if environ is None else environ
    text = env.get("GWCORE_LOG_FORMAT", _VARIABLES["GWCORE_LOG_FORMAT"][2])
    try:
        return _choice(LOG_FORMATS)(text)
    except ValueError as exc:
        raise ConfigurationError(f"GWCORE_LOG_FORMAT={text!r} is invalid: {exc}") from None


def malloc_set_by_operator(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``GLIBC_TUNABLES`` sets any of glibc's malloc options (``glibc.malloc.*``): then
    ``gwcore serve`` leaves malloc as the operator set it (gwcore/malloc.py). Not a
    ``GWCORE_*`` setting: glibc's own variable, read here as every variable is."""
    env = os.environ if environ is None else environ
    return "glibc.malloc." in env.get("GLIBC_TUNABLES", "")


def child_environment(variables: Mapping[str, str]) -> dict[str, str]:
    """The environment for a child gwcore process configured by *variables* alone: this process's
    environment without its ``GWCORE_*`` variables (so the caller's shell cannot change the child),
    plus *variables*.

    :raises ConfigurationError: a name in *variables* is not a runtime ``GWCORE_*`` setting.
    """
    unknown = sorted(name for name in variables if name not in _VARIABLES)
    if unknown:
        raise ConfigurationError(f"not a gwcore setting: {', '.join(unknown)}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GWCORE_")}
    env.update(variables)
    return env
