"""Fixtures shared by the binders' own broker tests."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from streamkit.conformance.helpers import broker_unreachable

REDIS_URL = os.environ.get("STREAMKIT_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBIT_URL_ENV = "STREAMKIT_RABBIT_URL"
RABBIT_URL = os.environ.get(RABBIT_URL_ENV, "amqp://guest:guest@127.0.0.1:5672/")


@pytest_asyncio.fixture
async def redis_client() -> AsyncIterator[Any]:
    """A plain redis-py client on the test server, to arrange and inspect."""
    redis = pytest.importorskip("redis.asyncio")
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        broker_unreachable(
            f"Redis at {REDIS_URL} not reachable ({exc}); set STREAMKIT_REDIS_URL"
        )
    yield client
    await client.aclose()


@pytest.fixture
def needs_rabbit() -> None:
    """Fail (CI) or skip unless RabbitMQ accepts connections."""
    from yarl import URL

    url = URL(RABBIT_URL)
    try:
        with socket.create_connection((url.host or "", url.port or 5672), 2):
            return
    except OSError as exc:
        broker_unreachable(
            f"RabbitMQ at {url.with_password('***')} unreachable ({exc}); "
            f"set {RABBIT_URL_ENV} to a running broker"
        )
