"""Conformance profiles of the RabbitMQ binder.

``rabbit`` runs on classic queues, ``rabbit-quorum`` on quorum queues. The broker is
``STREAMKIT_RABBIT_URL`` (default ``amqp://guest:guest@127.0.0.1:5672/``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from streamkit.conformance import BinderProfile

from .settings import DEFAULT_URL

__all__ = ["profiles", "settings"]

ENV = "STREAMKIT_RABBIT_URL"

# The suite makes a few hundred queues per run with fresh names; the broker drops
# each once it has been unused for a while (x-expires), so they do not pile up.
_QUEUES = {"expires_ms": 300_000, "dlq_expires_ms": 300_000}

# Small enough that the over-limit case stays cheap to build.
_TEST_MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def settings() -> Mapping[str, Any]:
    return {
        "url": os.environ.get(ENV, DEFAULT_URL),
        "max_message_bytes": _TEST_MAX_MESSAGE_BYTES,
        "connect_timeout": 5.0,
        "delivery_timeout": 15.0,
        "close_timeout": 5.0,
    }


def profiles() -> list[BinderProfile]:
    return [
        BinderProfile(
            name="rabbit",
            binder_type="rabbit",
            settings=settings,
            consumer_options=_QUEUES,
            producer_options=_QUEUES,
            env=(ENV,),
        ),
        BinderProfile(
            name="rabbit-quorum",
            binder_type="rabbit",
            settings=settings,
            consumer_options={**_QUEUES, "quorum": True},
            producer_options={**_QUEUES, "quorum": True},
            env=(ENV,),
        ),
    ]
