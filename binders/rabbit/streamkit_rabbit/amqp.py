"""Small AMQP helpers the binder and its subscriptions share."""

from __future__ import annotations

import asyncio
import contextlib

import aiormq
from aio_pika.abc import AbstractChannel

from . import topology

__all__ = ["close_quietly", "connection_failure", "declare", "permanent"]


async def declare(channel: AbstractChannel, plan: topology.Plan) -> None:
    """Declare the exchanges, queues and bindings of ``plan`` (idempotent)."""
    for exchange in plan.exchanges:
        await channel.declare_exchange(exchange.name, exchange.type, durable=True)
    for queue in plan.queues:
        declared = await channel.declare_queue(
            queue.name,
            durable=queue.durable,
            exclusive=queue.exclusive,
            auto_delete=queue.auto_delete,
            arguments=queue.arguments or None,
        )
        for exchange_name, key in queue.bindings:
            await declared.bind(exchange_name, key)


async def close_quietly(channel: AbstractChannel, timeout: float) -> None:
    """Close ``channel`` if the broker answers within ``timeout``; never raise."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            await channel.close()


def permanent(exc: BaseException) -> bool:
    """Broker replies no retry can fix: the topology exists with other arguments,
    or the user may not use it."""
    return isinstance(
        exc,
        aiormq.exceptions.ChannelPreconditionFailed
        | aiormq.exceptions.ChannelAccessRefused,
    )


def connection_failure(exc: BaseException) -> bool:
    """True when ``exc`` only says that the connection or the channel went away."""
    return isinstance(
        exc,
        aiormq.exceptions.ConnectionClosed
        | aiormq.exceptions.ChannelInvalidStateError
        | aiormq.exceptions.ChannelClosed
        | ConnectionError
        | asyncio.CancelledError,
    )
