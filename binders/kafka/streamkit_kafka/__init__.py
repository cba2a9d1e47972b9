"""The Kafka binder for streamkit (aiokafka).

Installed as the ``kafka`` entry point of the ``streamkit.binders`` group; select it
with ``type: kafka`` in a binder section of the configuration.
"""

from __future__ import annotations

from .binder import KafkaBinder
from .settings import KafkaConsumerOptions, KafkaProducerOptions, KafkaSettings
from .subscription import KafkaSubscription

__all__ = [
    "KafkaBinder",
    "KafkaConsumerOptions",
    "KafkaProducerOptions",
    "KafkaSettings",
    "KafkaSubscription",
]
