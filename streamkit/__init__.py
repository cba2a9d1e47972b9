"""streamkit: event-driven microservices from plain Python functions.

Decorate functions on a :class:`StreamApp`; the runtime binds them to destinations on
a broker through a binder chosen by configuration.
"""

from __future__ import annotations

from .app import Bridge, StreamApp
from .binder import (
    Binder,
    Capabilities,
    ConsumerSpec,
    Delivery,
    Health,
    HealthStatus,
    ProducerSpec,
    Record,
    Subscription,
)
from .config import Settings, load_settings
from .converters import register_converter
from .errors import (
    BinderError,
    BinderNotFound,
    BrokerUnavailable,
    ConfigError,
    ConversionError,
    MessageTooLarge,
    PublishError,
    PublishTimeout,
    StreamkitError,
    SubscriptionClosed,
    Unroutable,
    UnsupportedContentType,
)
from .message import Message
from .runtime import AppRunner

__all__ = [
    "AppRunner",
    "Binder",
    "BinderError",
    "BinderNotFound",
    "Bridge",
    "BrokerUnavailable",
    "Capabilities",
    "ConfigError",
    "ConsumerSpec",
    "ConversionError",
    "Delivery",
    "Health",
    "HealthStatus",
    "Message",
    "MessageTooLarge",
    "ProducerSpec",
    "PublishError",
    "PublishTimeout",
    "Record",
    "Settings",
    "StreamApp",
    "StreamkitError",
    "Subscription",
    "SubscriptionClosed",
    "Unroutable",
    "UnsupportedContentType",
    "load_settings",
    "register_converter",
]
