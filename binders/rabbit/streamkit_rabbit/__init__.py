"""RabbitMQ binder for streamkit: destinations are exchanges, groups are queues."""

from __future__ import annotations

from .binder import RabbitBinder
from .settings import (
    RabbitConsumerOptions,
    RabbitProducerOptions,
    RabbitSettings,
    redact_url,
)
from .subscription import RabbitSubscription

__all__ = [
    "RabbitBinder",
    "RabbitConsumerOptions",
    "RabbitProducerOptions",
    "RabbitSettings",
    "RabbitSubscription",
    "redact_url",
]
