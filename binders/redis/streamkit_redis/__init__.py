"""Redis Streams binder for streamkit (``type: redis``)."""

from __future__ import annotations

from .binder import RedisBinder
from .settings import RedisConsumerOptions, RedisProducerOptions, RedisSettings
from .subscription import RedisSubscription

__all__ = [
    "RedisBinder",
    "RedisConsumerOptions",
    "RedisProducerOptions",
    "RedisSettings",
    "RedisSubscription",
]
