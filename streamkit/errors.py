"""The exceptions streamkit raises.

Every error is a :class:`StreamkitError`, so one ``except`` catches them all. Binders
translate their driver's exceptions into this tree at one boundary and chain the
original (``raise ... from exc``), so user code never imports a broker client to
handle a failure::

    StreamkitError
    ├── ConfigError                 bad configuration; the message names the key
    ├── BinderNotFound              no plug-in installed for a binder type
    ├── ConversionError             a payload could not be decoded or encoded
    │   └── UnsupportedContentType
    └── BinderError                 a broker operation failed
        ├── BrokerUnavailable       the broker cannot be reached (yet)
        ├── PublishError            the broker did not take a record
        │   ├── PublishTimeout      ... within the delivery timeout
        │   ├── MessageTooLarge     ... because it exceeds the broker's limit
        │   └── Unroutable          ... because no queue is bound (when asked)
        └── SubscriptionClosed      the subscription was closed under the caller
"""

from __future__ import annotations

__all__ = [
    "BinderError",
    "BinderNotFound",
    "BrokerUnavailable",
    "ConfigError",
    "ConversionError",
    "MessageTooLarge",
    "PublishError",
    "PublishTimeout",
    "StreamkitError",
    "SubscriptionClosed",
    "Unroutable",
    "UnsupportedContentType",
]


class StreamkitError(Exception):
    """Root of every exception streamkit raises."""


class ConfigError(StreamkitError):
    """The configuration is invalid. ``key`` is the dotted path of the bad setting."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class BinderNotFound(ConfigError):
    """No binder plug-in is installed for the requested binder type."""


class ConversionError(StreamkitError):
    """A payload could not be converted from or to its wire form."""


class UnsupportedContentType(ConversionError):
    """No converter is registered for the message's content type."""


class BinderError(StreamkitError):
    """A broker operation failed."""


class BrokerUnavailable(BinderError):
    """The broker could not be reached; the binder keeps retrying where it can."""


class PublishError(BinderError):
    """The broker did not accept a record."""


class PublishTimeout(PublishError):
    """The broker did not confirm a record within the delivery timeout."""


class MessageTooLarge(PublishError):
    """A record exceeds the broker's size limit; nothing was truncated."""


class Unroutable(PublishError):
    """The broker took a record but no queue was bound to receive it."""


class SubscriptionClosed(BinderError):
    """The subscription was closed; its deliveries can no longer be settled."""
