"""gwcore: a cross-site messaging gateway, wire-compatible with the NServiceBus Gateway HTTP channel."""

from ._version import __version__
from ._core import core as _core  # fails loudly when the compiled core is missing
from .config import ReceiveChannel, Settings
from .consumer import Message
from .errors import (
    ConfigurationError,
    ExtensionMissingError,
    FramingError,
    GatewayError,
    HandoverError,
    InternalError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
)
from .gateway import Gateway

DEBUG_BUILD: bool = bool(_core.DEBUG_BUILD)

__all__ = (
    # running a gateway
    "Gateway",
    "Settings",
    "ReceiveChannel",
    "Message",
    # errors
    "GatewayError",
    "ConfigurationError",
    "FramingError",
    "StoreError",
    "StoreFullError",
    "StoreUnavailableError",
    "HandoverError",
    "InternalError",
    "ExtensionMissingError",
    # build
    "DEBUG_BUILD",
    "__version__",
)
