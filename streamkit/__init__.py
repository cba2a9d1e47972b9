"""streamkit: event-driven microservices from plain Python functions."""

from __future__ import annotations

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
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .message import Message

__all__ = [
    "Binder",
    "Capabilities",
    "ConsumerSpec",
    "Delivery",
    "Health",
    "HealthStatus",
    "Message",
    "ProducerSpec",
    "Record",
    "Subscription",
    *_errors_all,
]
