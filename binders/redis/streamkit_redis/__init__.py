"""Redis Streams binder for streamkit (``type: redis``)."""

from __future__ import annotations

from .binder import RedisBinder, RedisSubscription
from .settings import RedisConsumerOptions, RedisProducerOptions, RedisSettings

__all__ = [
    "RedisBinder",
    "RedisConsumerOptions",
    "RedisProducerOptions",
    "RedisSettings",
    "RedisSubscription",
]
