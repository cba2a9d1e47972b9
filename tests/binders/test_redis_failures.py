"""The Redis binder when processes and servers die (CASES.md C11, C12, C16).

Servers that are stopped here are private ``redis-server`` processes on free ports;
the shared server is only used by the SIGKILL test, and never stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
from collections import Counter
from collections.abc import Iterator

import pytest

pytest.importorskip("streamkit_redis")

from redis.asyncio import Redis
from streamkit_redis import RedisBinder, RedisSettings
from streamkit_redis.testing import RedisServer

from streamkit.binder import ConsumerSpec, Delivery, ProducerSpec
from streamkit.conformance.helpers import (
    broker_unreachable,
    collect_ids,
    id_of,
    numbered,
)
from streamkit.errors import PublishTimeout

pytestmark = pytest.mark.slow

URL = os.environ.get("STREAMKIT_REDIS_URL", "redis://127.0.0.1:6379/0")
WAIT = 15.0


def _server(persistent: bool) -> Iterator[RedisServer]:
    try:
        server = RedisServer(persistent=persistent)
    except FileNotFoundError as exc:
        broker_unreachable(str(exc))
    with server:
        yield server


@pytest.fixture
def server() -> Iterator[RedisServer]:
    yield from _server(persistent=False)


@pytest.fixture
def durable_server() -> Iterator[RedisServer]:
    yield from _server(persistent=True)


async def health_becomes(binder: RedisBinder, ok: bool, timeout: float) -> None:
    # Health is pulled, like a readiness probe does: poll it, bounded.
    async with asyncio.timeout(timeout):
        while (await binder.health()).ok is not ok:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def binder_for(url: str, **settings: object) -> RedisBinder:
    base: dict[str, object] = {
        "url": url,
        "claim_idle_ms": 500,
        "block_ms": 200,
        "publish_timeout": 1.0,
        "connect_timeout": 0.5,
        "socket_timeout": 1.0,
    }
    return RedisBinder(RedisSettings(**{**base, **settings}))  # type: ignore[arg-type]


class Reader:
    """Consumes a subscription in the background, acking and counting every id."""

    def __init__(self, sub: object) -> None:
        self.sub = sub
        self.seen: Counter[int] = Counter()
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for batch in self.sub:  # type: ignore[attr-defined]
            for delivery in batch:
                self.seen[id_of(delivery)] += 1
                await delivery.ack()
            self.changed.set()

    async def wait_for(self, ids: set[int], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not ids <= set(self.seen):
                self.changed.clear()
                await self.changed.wait()


# -- C11, C12: a restart of the server -------------------------------------------------


async def test_consumption_resumes_after_a_restart_that_lost_everything(
    server: RedisServer,
) -> None:
    binder = binder_for(server.url)
    await binder.start()
    stream = f"skr-{secrets.token_hex(4)}"
    reader = Reader(await binder.subscribe(ConsumerSpec(stream, group="g")))
    await binder.publish(ProducerSpec(stream), numbered(20))
    await reader.wait_for(set(range(20)), WAIT)

    server.stop()
    await health_becomes(binder, ok=False, timeout=WAIT)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PublishTimeout):
        await binder.publish(ProducerSpec(stream), numbered(1, start=999))
    publish_failed_after = loop.time() - started
    server.start()
    await health_becomes(binder, ok=True, timeout=WAIT)
    # The restart lost the stream and the group; the consumer makes them again.
    await binder.publish(ProducerSpec(stream), numbered(20, start=20))
    await reader.wait_for(set(range(40)), WAIT)
    await asyncio.wait_for(binder.close(), 5)
    await asyncio.wait_for(reader.task, 5)

    assert publish_failed_after < 3.0
    assert set(reader.seen) == set(range(40))


async def test_nothing_is_lost_across_a_crash_of_a_server_that_keeps_its_data(
    durable_server: RedisServer,
) -> None:
    binder = binder_for(durable_server.url)
    await binder.start()
    stream = f"skr-{secrets.token_hex(4)}"
    sub = await binder.subscribe(ConsumerSpec(stream, group="g"))
    await binder.publish(ProducerSpec(stream), numbered(30))
    reader = Reader(sub)
    await reader.wait_for({0}, WAIT)

    durable_server.stop(signal.SIGKILL)
    await health_becomes(binder, ok=False, timeout=WAIT)
    durable_server.start()
    await binder.publish(ProducerSpec(stream), numbered(10, start=30))
    await reader.wait_for(set(range(40)), WAIT)
    await binder.close()
    await asyncio.wait_for(reader.task, 5)

    assert set(reader.seen) == set(range(40))


async def test_stop_returns_promptly_while_the_server_is_down(
    server: RedisServer,
) -> None:
    binder = binder_for(server.url)
    await binder.start()
    stream = f"skr-{secrets.token_hex(4)}"
    sub = await binder.subscribe(ConsumerSpec(stream, group="g"))
    waiting = asyncio.create_task(sub.next_batch())
    await asyncio.sleep(0.1)

    server.stop()
    await health_becomes(binder, ok=False, timeout=WAIT)
    await asyncio.wait_for(binder.close(), 5)

    assert await asyncio.wait_for(waiting, 5) is None


# -- C16 across processes: kill -9 a consumer holding entries --------------------------

CHILD = """
import asyncio, json, sys
from streamkit.binder import ConsumerSpec
from streamkit_redis import RedisBinder, RedisSettings

async def main(url, stream, hold):
    binder = RedisBinder(RedisSettings(url=url, consumer_name="doomed"))
    await binder.start()
    sub = await binder.subscribe(ConsumerSpec(stream, group="g", prefetch=hold))
    held = []
    while len(held) < hold:
        held += [int(d.headers["sk-id"]) for d in await sub.next_batch()]
    print(json.dumps(held), flush=True)
    await asyncio.Event().wait()  # hold them, unsettled, until killed

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_a_killed_consumers_entries_are_claimed_by_a_live_one(
    redis_client: Redis,
) -> None:
    stream = f"skr-kill-{secrets.token_hex(4)}"
    total, hold = 100, 40
    binder = binder_for(URL)
    await binder.start()
    await (await binder.subscribe(ConsumerSpec(stream, group="g"))).close()
    await binder.publish(ProducerSpec(stream), numbered(total))
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, URL, stream, str(hold),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), WAIT)
        held = set(json.loads(line))
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()

    survivor = await binder.subscribe(ConsumerSpec(stream, group="g"))
    got: list[Delivery] = await collect_ids(survivor, range(total), WAIT)
    await survivor.close()  # flushes the acks
    pending_after = (await redis_client.xpending(stream, "g"))["pending"]
    doomed = {
        row["name"]: row["pending"]
        for row in await redis_client.xinfo_consumers(stream, "g")
    }[b"doomed"]
    await binder.close()
    await redis_client.delete(stream)

    counts = Counter(id_of(d) for d in got)
    assert len(held) == hold
    assert set(counts) == set(range(total))
    assert all(counts[i] == 1 for i in range(total)), counts
    assert {d.attempt for d in got if id_of(d) in held} == {1}
    assert pending_after == 0 and doomed == 0
