"""gwcore: a cross-site messaging gateway, wire-compatible with the NServiceBus Gateway HTTP channel."""

from ._version import __version__
from ._core import core as _core  # fails loudly when the compiled core is missing
from .client import Response, SiteClient, make_client_ssl_context
from .config import ReceiveChannel, Settings
from .consumer import Message
from .databus import Blob
from .errors import (
    AuthenticationError,
    BlobError,
    BlobIntegrityError,
    BrokerUnavailableError,
    DatabaseUnavailableError,
    ConfigurationError,
    ExtensionMissingError,
    FramingError,
    GatewayError,
    HandoverError,
    InternalError,
    ResponseTooLargeError,
    SendConnectError,
    SendError,
    SendProtocolError,
    SendTimeoutError,
    SendTLSError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
    UnknownSessionError,
    UnknownSiteError,
    WorkerHandlerError,
)
from .gateway import Gateway
from .worker import Worker, WorkerMessage

DEBUG_BUILD: bool = bool(_core.DEBUG_BUILD)

__all__ = (
    # running a gateway
    "Gateway",
    "Settings",
    "ReceiveChannel",
    "Message",
    "Blob",
    # distributor workers
    "Worker",
    "WorkerMessage",
    # sending to a remote site
    "SiteClient",
    "Response",
    "make_client_ssl_context",
    # errors
    "GatewayError",
    "ConfigurationError",
    "FramingError",
    "StoreError",
    "StoreFullError",
    "StoreUnavailableError",
    "BrokerUnavailableError",
    "DatabaseUnavailableError",
    "HandoverError",
    "InternalError",
    "ExtensionMissingError",
    "SendError",
    "SendConnectError",
    "SendTLSError",
    "SendTimeoutError",
    "SendProtocolError",
    "ResponseTooLargeError",
    "AuthenticationError",
    "UnknownSiteError",
    "UnknownSessionError",
    "WorkerHandlerError",
    "BlobError",
    "BlobIntegrityError",
    # build
    "DEBUG_BUILD",
    "__version__",
)
