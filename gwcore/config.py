"""Settings: the only module that reads ``GWCORE_*`` environment variables.

Precedence: an explicit keyword argument to :meth:`Settings.from_env`, then the environment, then
the default. Every variable is documented in ``docs/configuration.md``; an invalid value raises
:class:`~gwcore.errors.ConfigurationError` naming the variable, which stops start-up.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from typing import Any, Callable, Mapping

from .errors import ConfigurationError

__all__ = ("Settings", "ReceiveChannel", "MODES", "parse_duration", "parse_size")

MODES = ("standalone", "distributor", "selected")
LOOPS = ("auto", "uvloop", "asyncio")

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


def _positive_size(text: str) -> int:
    value = parse_size(text)
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


def _handler(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    module, sep, func = text.partition(":")
    if not sep or not module or not func:
        raise ValueError(f"{text!r} is not of the form module:function")
    return text


@dataclasses.dataclass(frozen=True)
class ReceiveChannel:
    """One receive channel: an HTTP listener address plus the path prefix it answers under."""

    url: str
    host: str
    port: int
    path: str  # always starts and ends with '/'

    @classmethod
    def parse(cls, url: str) -> "ReceiveChannel":
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme.lower() != "http":
            raise ValueError(f"{url!r}: only http:// receive channels are supported so far")
        # NServiceBus (HttpListener) accepts '+' and '*' as "every interface".
        host = parts.hostname or ""
        netloc_host = parts.netloc.rsplit(":", 1)[0] if parts.port is not None else parts.netloc
        if netloc_host in ("+", "*") or host in ("+", "*"):
            host = "0.0.0.0"
        if not host:
            raise ValueError(f"{url!r}: no host")
        try:
            port = parts.port if parts.port is not None else 80   # ":0" = an ephemeral port
        except ValueError as exc:
            raise ValueError(f"{url!r}: {exc}") from None
        path = parts.path or "/"
        if not path.startswith("/"):
            path = "/" + path
        if not path.endswith("/"):
            # HttpListener prefixes must end with '/'; a missing one is an easy slip, not an error.
            path += "/"
        return cls(url=url.strip(), host=host, port=port, path=path)


# name -> (attribute, parser, default text). The default goes through the parser too, so a default
# can never be of another shape than a value a user could set.
_VARIABLES: dict[str, tuple[str, Callable[[str], Any] | None, str]] = {
    "GWCORE_MODE": ("mode", _choice(MODES), "standalone"),
    "GWCORE_ENDPOINT": ("endpoint", str.strip, "gwcore"),
    "GWCORE_RECEIVE_CHANNELS": ("receive_channels", None, ""),  # parsed with the endpoint
    "GWCORE_DATA_DIR": ("data_dir", str.strip, "./var/gwcore"),
    "GWCORE_COMMIT_MAX_BATCH": ("commit_max_batch", _positive_int, "1024"),
    "GWCORE_COMMIT_MAX_DELAY_US": ("commit_max_delay_us", _non_negative_int, "200"),
    "GWCORE_COMMIT_MAX_PENDING": ("commit_max_pending", _positive_int, "8192"),
    "GWCORE_STORE_SYNC": ("store_sync", _parse_bool, "1"),
    "GWCORE_STORE_MAP_SIZE": ("store_map_size", _positive_size, "256MiB"),
    "GWCORE_STORE_MAX_SIZE": ("store_max_size", _positive_size, "64GiB"),
    "GWCORE_DEDUP_TTL": ("dedup_ttl", _positive_duration, "7d"),
    "GWCORE_DEDUP_CLEANUP_SLICE": ("dedup_cleanup_slice", _positive_int, "2000"),
    "GWCORE_MAX_BODY": ("max_body", _positive_size, "16MiB"),
    "GWCORE_HTTP_MAX_HEADERS": ("http_max_headers", _positive_int, "256"),
    "GWCORE_HTTP_MAX_HEADER_BYTES": ("http_max_header_bytes", _positive_size, "64KiB"),
    "GWCORE_HTTP_REQUEST_TIMEOUT": ("http_request_timeout", _positive_duration, "30s"),
    "GWCORE_HTTP_KEEPALIVE_TIMEOUT": ("http_keepalive_timeout", _positive_duration, "15s"),
    "GWCORE_HTTP_MAX_PIPELINE": ("http_max_pipeline", _positive_int, "64"),
    "GWCORE_HTTP_MAX_CONNECTIONS": ("http_max_connections", _positive_int, "4096"),
    "GWCORE_HTTP_ALLOW_GET": ("http_allow_get", _parse_bool, "0"),
    "GWCORE_HANDLER": ("handler", _handler, ""),
    "GWCORE_HANDLER_CONCURRENCY": ("handler_concurrency", _positive_int, "1"),
    "GWCORE_HANDLER_MAX_ATTEMPTS": ("handler_max_attempts", _positive_int, "5"),
    "GWCORE_SHUTDOWN_TIMEOUT": ("shutdown_timeout", _positive_duration, "30s"),
    "GWCORE_LOOP": ("loop", _choice(LOOPS), "auto"),
    "GWCORE_LOG_LEVEL": ("log_level", _choice(("debug", "info", "warning", "error")), "info"),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything gwcore can be told, parsed once. Durations are seconds, sizes bytes."""

    mode: str = "standalone"
    endpoint: str = "gwcore"
    receive_channels: tuple[ReceiveChannel, ...] = ()
    data_dir: str = "./var/gwcore"
    commit_max_batch: int = 1024
    commit_max_delay_us: int = 200
    commit_max_pending: int = 8192
    store_sync: bool = True
    store_map_size: int = 256 << 20
    store_max_size: int = 64 << 30
    dedup_ttl: float = 7 * 86400.0
    dedup_cleanup_slice: int = 2000
    max_body: int = 16 << 20
    http_max_headers: int = 256
    http_max_header_bytes: int = 64 << 10
    http_request_timeout: float = 30.0
    http_keepalive_timeout: float = 15.0
    http_max_pipeline: int = 64
    http_max_connections: int = 4096
    http_allow_get: bool = False
    handler: str | None = None
    handler_concurrency: int = 1
    handler_max_attempts: int = 5
    shutdown_timeout: float = 30.0
    loop: str = "auto"
    log_level: str = "info"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Build settings from ``GWCORE_*`` variables; keyword arguments win over the environment.

        :param environ: the mapping to read (default ``os.environ``).
        :param overrides: attribute values that take precedence, already typed.
        :raises ConfigurationError: a variable has an invalid value (the message names it).
        """
        env = os.environ if environ is None else environ
        unknown = sorted(k for k in env if k.startswith("GWCORE_") and k not in _VARIABLES and k not in _BUILD_VARIABLES)
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
        values.update({k: v for k, v in overrides.items() if k != "receive_channels"})
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
        if self.mode != "standalone":
            raise ConfigurationError(
                f"GWCORE_MODE={self.mode!r} is not available in this version yet; use 'standalone'"
            )
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


# Build-time flags read by setup.py only; listed so that from_env does not call them unknown.
_BUILD_VARIABLES = frozenset({"GWCORE_DEBUG", "GWCORE_ANNOTATE", "GWCORE_CYTHON_ALWAYS"})


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
