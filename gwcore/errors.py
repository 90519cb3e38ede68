"""gwcore's exception hierarchy: one root, grouped by where things go wrong."""

__all__ = (
    "GatewayError",
    "ConfigurationError",
    "FramingError",
    "StoreError",
    "StoreFullError",
    "StoreUnavailableError",
    "HandoverError",
    "InternalError",
    "ExtensionMissingError",
)


class GatewayError(Exception):
    """Root of every error gwcore raises on purpose."""


class ConfigurationError(GatewayError, ValueError):
    """A setting is missing or invalid; the message names the GWCORE_* variable."""


class FramingError(GatewayError, ValueError):
    """A stored envelope or a frame could not be decoded."""


class StoreError(GatewayError):
    """The LMDB store failed; nothing of the failed batch was written."""


class StoreFullError(StoreError):
    """The store reached GWCORE_STORE_MAX_SIZE (or the disk is full); new messages are refused."""


class StoreUnavailableError(StoreError):
    """The store is closed, or the disk refused a write; retry later."""


class HandoverError(GatewayError):
    """Leadership or lease handling failed."""


class InternalError(GatewayError):
    """A broken invariant inside gwcore: a bug, please report it."""


class ExtensionMissingError(GatewayError, ImportError):
    """The compiled core gwcore._dedup is not importable."""
