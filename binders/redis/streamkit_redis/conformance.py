"""Conformance profiles of the Redis binder (entry point ``streamkit.conformance``).

``redis`` runs the suite against the server at ``STREAMKIT_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``), with short claim and block times so that recovery
cases finish in seconds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from streamkit.conformance import BinderProfile

from .settings import RedisSettings

__all__ = ["DEFAULT_URL", "TEST_SETTINGS", "profiles", "redis_url"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"

#: Claim after 1 s idle, block 0.5 s at a time: a dead member's entries move on
#: within about 2 s.
TEST_SETTINGS: dict[str, Any] = {"claim_idle_ms": 1_000, "block_ms": 500}


def redis_url() -> str:
    return os.environ.get("STREAMKIT_REDIS_URL", DEFAULT_URL)


def _settings() -> Mapping[str, Any]:
    return {"url": redis_url(), **TEST_SETTINGS}


async def ping_redis(settings: Mapping[str, Any]) -> None:
    """Raise with the reason when the profile's server does not answer."""
    from redis.asyncio import Redis

    model = RedisSettings(**settings)
    client = Redis.from_url(
        model.url,
        socket_timeout=model.socket_timeout,
        socket_connect_timeout=model.connect_timeout,
        password=model.password.get_secret_value() if model.password else None,
    )
    try:
        await client.ping()
    finally:
        await client.aclose()


def profiles() -> list[BinderProfile]:
    declared = RedisSettings(**TEST_SETTINGS)
    return [
        BinderProfile(
            name="redis",
            binder_type="redis",
            settings=_settings,
            env=("STREAMKIT_REDIS_URL",),
            check=ping_redis,
            capabilities={
                "crash_recovery_seconds": declared.crash_recovery_seconds,
                "max_message_bytes": declared.max_message_bytes,
            },
        )
    ]
