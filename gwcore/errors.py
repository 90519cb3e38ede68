"""gwcore's exception hierarchy: one root, grouped by where things go wrong."""

__all__ = (
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


class BrokerUnavailableError(StoreUnavailableError):
    """The broker cannot be reached (or refused a publish): the submit is answered 503
    (selected-instance mode)."""


class DatabaseUnavailableError(StoreUnavailableError):
    """The PostgreSQL database cannot be reached (or gave up a transaction): the submit is
    answered 503 and nothing of it is acknowledged (selected-instance mode on PostgreSQL)."""


class HandoverError(GatewayError):
    """Leadership or lease handling failed."""


class InternalError(GatewayError):
    """A broken invariant inside gwcore: a bug, please report it."""


class ExtensionMissingError(GatewayError, ImportError):
    """The compiled core gwcore._dedup is not importable."""


class SendError(GatewayError):
    """Forwarding a request to a remote site failed; the message names the site's URL."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url


class SendConnectError(SendError, ConnectionError):
    """No connection to the remote site (refused, unreachable, name not resolved)."""


class SendTLSError(SendConnectError):
    """The TLS handshake with the remote site failed (untrusted certificate, wrong host name)."""


class SendTimeoutError(SendError, TimeoutError):
    """Connecting, or waiting for the whole response, took longer than the client's timeout."""


class SendProtocolError(SendError):
    """The remote site's answer is not a valid HTTP/1.1 response, or the connection ended inside it."""


class ResponseTooLargeError(SendProtocolError):
    """The remote site's response (headers or body) is larger than the client accepts."""


class AuthenticationError(GatewayError):
    """A request's signature is missing, unknown, wrong or outside the time window (see ``reason``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class UnknownSiteError(GatewayError, ValueError):
    """A send names a site that is not configured (GWCORE_SITES, GWCORE_CONFIG)."""


class UnknownSessionError(GatewayError):
    """The worker session is not known here (it lapsed, left, or the distributor restarted)."""


class WorkerHandlerError(GatewayError):
    """A worker reported that its handler failed on a message (the reason is the worker's)."""


class BlobError(GatewayError):
    """A distributor worker could not read a databus blob from the distributor (connection, or
    an answer other than the blob; an expired or unknown blob is ``FileNotFoundError``)."""


class BlobIntegrityError(BlobError):
    """The bytes a worker received are not the blob: their length or digest differs from the
    distributor's record."""
