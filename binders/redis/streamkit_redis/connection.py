"""Client plumbing shared by the binder and its subscriptions."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from redis import exceptions as rx
from redis.asyncio import Redis

__all__ = [
    "CONNECTION_ERRORS",
    "RAW_COMMANDS",
    "Backoff",
    "cancel_safe",
    "execute",
    "is_nogroup",
    "raw_reply",
]

# Redis replies are parsed in wire.py: these commands bypass redis-py's callbacks.
RAW_COMMANDS = ("XAUTOCLAIM", "XPENDING", "XREADGROUP", "XREAD", "XCLAIM", "EVALSHA")

# Connection failures: the broker is away (or restarting); retry with backoff.
CONNECTION_ERRORS = (rx.ConnectionError, rx.TimeoutError, OSError)


async def execute(client: Redis, *args: Any) -> Any:
    """``client.execute_command``, typed (redis-py leaves it unannotated)."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def raw_reply(response: Any, **options: Any) -> Any:
    return response


def is_nogroup(exc: BaseException) -> bool:
    """The group (or its stream) is gone: FLUSHALL, DEL, a restart without data.

    A read blocked on a stream that is deleted ends with ``UNBLOCKED``; the next
    read would answer ``NOGROUP``.
    """
    text = str(exc)
    return isinstance(exc, rx.ResponseError) and (
        "NOGROUP" in text or text.startswith("UNBLOCKED")
    )


_SAFE_CLASSES: dict[type[Any], type[Any]] = {}


def cancel_safe(connection_class: type[Any]) -> type[Any]:
    """``connection_class`` with sends bounded by ``asyncio.timeout``.

    redis-py bounds a send with ``asyncio.wait_for``, which on Python 3.11 swallows
    a cancellation that arrives as the send completes: the cancelled command then
    runs on (a blocking read blocks on) and the caller never sees the cancel.
    """
    found = _SAFE_CLASSES.get(connection_class)
    if found is None:
        found = type(
            f"CancelSafe{connection_class.__name__}",
            (_CancelSafeSend, connection_class),
            {},
        )
        _SAFE_CLASSES[connection_class] = found
    return found


class _CancelSafeSend:
    socket_timeout: float | None

    async def send_packed_command(
        self, command: Any, check_health: bool = True
    ) -> None:
        timeout = self.socket_timeout
        send = super().send_packed_command  # type: ignore[misc]
        if not timeout:
            await send(command, check_health)
            return
        self.socket_timeout = None
        try:
            async with asyncio.timeout(timeout):
                await send(command, check_health)
        except TimeoutError as exc:
            # The cancelled send already dropped the connection.
            raise rx.TimeoutError("Timeout writing to socket") from exc
        finally:
            self.socket_timeout = timeout


class Backoff:
    """Exponential delays with full jitter, so restarts do not stampede."""

    def __init__(self, first: float = 0.05, cap: float = 5.0) -> None:
        self._first = first
        self._cap = cap
        self._failures = 0

    @property
    def failing(self) -> bool:
        return self._failures > 0

    def next(self) -> float:
        ceiling = min(self._cap, self._first * 2**self._failures)
        self._failures += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._failures = 0
