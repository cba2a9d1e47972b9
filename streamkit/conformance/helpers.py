"""Helpers the conformance cases share: numbered records and bounded reads.

Every wait here ends as soon as its condition holds and never later than its
timeout; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import NoReturn

import pytest

from ..binder import Binder, Delivery, ProducerSpec, Record, Subscription

__all__ = [
    "ID_HEADER",
    "Names",
    "collect",
    "collect_ids",
    "id_of",
    "numbered",
    "publish_all",
    "read_until",
]

#: Header carrying a record's number, so cases can match what came back.
ID_HEADER = "sk-id"


class Names:
    """Fresh destination and group names: every call returns a new one."""

    def __init__(self, prefix: str = "skc") -> None:
        self.prefix = prefix

    def _fresh(self, label: str) -> str:
        return f"{self.prefix}-{label}-{secrets.token_hex(4)}"

    def destination(self, label: str = "t") -> str:
        return self._fresh(label)

    def group(self, label: str = "g") -> str:
        return self._fresh(label)


def numbered(
    count: int,
    *,
    start: int = 0,
    key: Callable[[int], bytes | None] | None = None,
    partition: Callable[[int], int | None] | None = None,
    headers: Callable[[int], dict[str, bytes]] | None = None,
) -> list[Record]:
    """Records ``start .. start+count-1``, each with its number in ``sk-id``."""
    out = []
    for i in range(start, start + count):
        extra = headers(i) if headers else {}
        out.append(
            Record(
                value=f"payload-{i}".encode(),
                headers={ID_HEADER: str(i).encode(), **extra},
                key=key(i) if key else None,
                partition=partition(i) if partition else None,
            )
        )
    return out


def id_of(delivery: Delivery) -> int:
    """The number ``numbered`` gave the delivered record."""
    return int(delivery.headers[ID_HEADER])


async def publish_all(
    binder: Binder,
    spec: ProducerSpec,
    records: Sequence[Record],
    *,
    batch: int = 100,
) -> None:
    """Publish ``records`` in order, ``batch`` per call."""
    for i in range(0, len(records), batch):
        await binder.publish(spec, records[i : i + batch])


async def read_until(
    sub: Subscription,
    done: Callable[[list[Delivery]], bool],
    timeout: float,
    *,
    ack: bool = True,
) -> list[Delivery]:
    """Read batches until ``done(received)`` or ``timeout``; returns what arrived.

    Deliveries are acked as they arrive unless ``ack`` is false. The read ends early
    when the subscription closes. A timeout is not an error here: the case asserts on
    what was received, which gives a better message.
    """
    received: list[Delivery] = []
    if done(received):
        return received
    try:
        async with asyncio.timeout(timeout):
            while True:
                batch = await sub.next_batch()
                if batch is None:
                    break
                for delivery in batch:
                    received.append(delivery)
                    if ack:
                        await delivery.ack()
                if done(received):
                    break
    except TimeoutError:
        pass
    return received


async def collect(
    sub: Subscription, count: int, timeout: float, *, ack: bool = True
) -> list[Delivery]:
    """Read until ``count`` deliveries arrived (or ``timeout``)."""
    return await read_until(sub, lambda got: len(got) >= count, timeout, ack=ack)


async def collect_ids(
    sub: Subscription, expected: Iterable[int], timeout: float, *, ack: bool = True
) -> list[Delivery]:
    """Read until every id in ``expected`` arrived at least once (or ``timeout``)."""
    missing = set(expected)
    checked = 0

    def done(got: list[Delivery]) -> bool:
        nonlocal checked
        missing.difference_update(id_of(d) for d in got[checked:])
        checked = len(got)
        return not missing

    return await read_until(sub, done, timeout, ack=ack)


def broker_unreachable(reason: str) -> NoReturn:
    """The suite's rule for a broker that cannot be reached: with ``CI=true`` the
    test fails (a CI run must not pass by skipping), elsewhere it is skipped with
    ``reason``. Binder authors' own broker tests should use it too."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)
