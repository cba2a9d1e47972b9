"""The Redis binder against a real server: CASES.md C14-C17, leases, lost groups.

The server is the one at ``STREAMKIT_REDIS_URL`` (default the machine's shared one);
nothing here stops it. Every stream is named freshly and deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio

pytest.importorskip("streamkit_redis")

from redis.asyncio import Redis
from streamkit_redis import RedisBinder, RedisProducerOptions, RedisSettings
from streamkit_redis.testing import free_port

from streamkit.binder import ConsumerSpec, Delivery, ProducerSpec, Subscription
from streamkit.conformance.helpers import collect, collect_ids, id_of, numbered
from streamkit.errors import BrokerUnavailable

URL = os.environ.get("STREAMKIT_REDIS_URL", "redis://127.0.0.1:6379/0")
FAST = {"claim_idle_ms": 1_000, "block_ms": 300}
WAIT = 10.0

MakeBinder = Callable[..., Awaitable[RedisBinder]]


@pytest_asyncio.fixture
async def stream(redis_client: Redis) -> AsyncIterator[str]:
    name = f"skr-{secrets.token_hex(4)}"
    yield name
    await redis_client.delete(name)


@pytest_asyncio.fixture
async def make_binder(redis_client: Redis) -> AsyncIterator[MakeBinder]:
    made: list[RedisBinder] = []

    async def make(**settings: Any) -> RedisBinder:
        binder = RedisBinder(RedisSettings(url=URL, **{**FAST, **settings}))
        await binder.start()
        made.append(binder)
        return binder

    yield make
    for binder in made:
        await asyncio.wait_for(binder.close(), WAIT)


async def pending_count(redis_client: Redis, stream: str, group: str) -> int:
    summary = await redis_client.xpending(stream, group)
    return int(summary["pending"])


async def consumers(redis_client: Redis, stream: str, group: str) -> dict[str, int]:
    rows = await redis_client.xinfo_consumers(stream, group)
    return {row["name"].decode(): int(row["pending"]) for row in rows}


async def ack_all(batch: list[Delivery] | None) -> list[Delivery]:
    for delivery in batch or []:
        await delivery.ack()
    return batch or []


# -- C14 -------------------------------------------------------------------------------


async def test_a_block_longer_than_the_socket_timeout_is_an_empty_read(
    make_binder: MakeBinder, stream: str, caplog: pytest.LogCaptureFixture
) -> None:
    binder = await make_binder(socket_timeout=0.2, block_ms=1_000)
    sub = await binder.subscribe(ConsumerSpec(stream, group="g"))
    reading = asyncio.create_task(sub.next_batch())

    # Several socket timeouts pass inside one block: the read must go on waiting.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(reading), 1.5)
    await binder.publish(ProducerSpec(stream), numbered(1))
    batch = await asyncio.wait_for(reading, WAIT)

    assert batch is not None and [id_of(d) for d in batch] == [0]
    assert (await binder.health()).ok
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- C15 -------------------------------------------------------------------------------


async def test_cancelled_reads_lose_nothing_and_leave_no_connection_out_of_step(
    make_binder: MakeBinder, redis_client: Redis, stream: str
) -> None:
    # Claims come far too late to help: whatever a cancelled read got must come
    # back from this consumer's own pending list.
    binder = await make_binder(claim_idle_ms=60_000)
    sub = await binder.subscribe(ConsumerSpec(stream, group="g", batch_size=4))
    got: list[Delivery] = []

    # Cancel after 0..29 loop turns: some cancels land before the command is sent,
    # some while it waits, some after Redis handed entries out to it.
    for round_ in range(60):
        await binder.publish(ProducerSpec(stream), numbered(2, start=2 * round_))
        reading = asyncio.create_task(sub.next_batch())
        for _ in range(round_ % 30):
            await asyncio.sleep(0)
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            got += await ack_all(await reading)
    got += await collect_ids(sub, set(range(120)) - {id_of(d) for d in got}, WAIT)

    assert {id_of(d) for d in got} == set(range(120))
    await sub.close()  # flushes the acks
    # Each payload matches its id: no reply was read for the wrong command.
    assert all(d.value == f"payload-{id_of(d)}".encode() for d in got)
    assert await pending_count(redis_client, stream, "g") == 0


# -- C16 -------------------------------------------------------------------------------


async def test_a_dead_consumers_pending_list_is_claimed_to_the_end(
    make_binder: MakeBinder, redis_client: Redis, stream: str
) -> None:
    binder = await make_binder(claim_idle_ms=100)
    await redis_client.xgroup_create(stream, "g", "0", mkstream=True)
    await binder.publish(ProducerSpec(stream), numbered(300))
    held = await redis_client.xreadgroup("g", "dead", {stream: ">"}, count=300)
    ids = [entry_id for entry_id, _ in held[0][1]]
    await redis_client.xdel(stream, *ids[::60])  # deleted while pending

    # COUNT follows the room of a small prefetch, so the claim takes many pages.
    sub = await binder.subscribe(
        ConsumerSpec(stream, group="g", prefetch=32, batch_size=16)
    )
    expected = set(range(300)) - set(range(0, 300, 60))
    got = await collect_ids(sub, expected, WAIT)

    counts = Counter(id_of(d) for d in got)
    assert set(counts) == expected
    assert set(counts.values()) == {1}
    assert {d.attempt for d in got} == {1}  # a crash is not a failed attempt
    await sub.close()
    assert await pending_count(redis_client, stream, "g") == 0
    assert (await consumers(redis_client, stream, "g"))["dead"] == 0


# -- C17 -------------------------------------------------------------------------------


async def test_a_consumer_leaves_the_group_only_when_it_holds_nothing(
    make_binder: MakeBinder, redis_client: Redis, stream: str
) -> None:
    name = f"c17-{secrets.token_hex(3)}"
    binder = await make_binder(consumer_name=name)
    await binder.publish(ProducerSpec(stream), numbered(3))

    first = await binder.subscribe(ConsumerSpec(stream, group="g"))
    held = await collect(first, 3, WAIT, ack=False)
    await held[0].ack()
    await first.close()
    after_first = await consumers(redis_client, stream, "g")
    again = await binder.subscribe(ConsumerSpec(stream, group="g"))
    rest = await collect(again, 2, WAIT)
    await again.close()

    assert after_first == {name: 2}
    assert {id_of(d) for d in rest} == {id_of(d) for d in held[1:]}
    assert await consumers(redis_client, stream, "g") == {}


# -- leases, attempts ------------------------------------------------------------------


async def test_a_long_handler_keeps_its_entry_from_other_members(
    make_binder: MakeBinder, redis_client: Redis, stream: str
) -> None:
    binder = await make_binder(claim_idle_ms=300)
    holder = await binder.subscribe(ConsumerSpec(stream, group="g"))
    other_binder = await make_binder(claim_idle_ms=300)
    other = await other_binder.subscribe(ConsumerSpec(stream, group="g"))
    await binder.publish(ProducerSpec(stream), numbered(1))
    held = await collect(holder, 1, WAIT, ack=False)

    # Four idle times pass while the handler runs; the heartbeat keeps the entry.
    stolen = await collect(other, 1, 1.2)
    await held[0].ack()
    late = await collect(other, 1, 0.5)
    await holder.close()

    assert [id_of(d) for d in held] == [0]
    assert stolen == [] and late == []
    assert await pending_count(redis_client, stream, "g") == 0


async def test_recorded_failures_raise_the_attempt_and_give_backs_do_not(
    make_binder: MakeBinder, stream: str
) -> None:
    binder = await make_binder()
    sub = await binder.subscribe(ConsumerSpec(stream, group="g"))
    await binder.publish(ProducerSpec(stream), numbered(1))

    first = (await collect(sub, 1, WAIT, ack=False))[0]
    await sub.record_attempt(first)
    await sub.record_attempt(first)
    await first.release()
    second = (await collect(sub, 1, WAIT, ack=False))[0]
    await second.release()
    third = (await collect(sub, 1, WAIT))[0]

    assert [first.attempt, second.attempt, third.attempt] == [1, 3, 3]


# -- lost topology, trimming, credentials ----------------------------------------------


async def test_a_deleted_stream_and_group_are_created_again(
    make_binder: MakeBinder,
    redis_client: Redis,
    stream: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    binder = await make_binder()
    sub = await binder.subscribe(ConsumerSpec(stream, group="g"))
    await binder.publish(ProducerSpec(stream), numbered(1))
    assert len(await collect(sub, 1, WAIT)) == 1
    reading = asyncio.create_task(sub.next_batch())
    await asyncio.sleep(0.1)  # let the read block on the stream

    await redis_client.delete(stream)  # what FLUSHALL or a restart without data does
    await binder.publish(ProducerSpec(stream), numbered(5, start=1))
    got = await ack_all(await asyncio.wait_for(reading, WAIT))
    got += await collect_ids(sub, set(range(1, 6)) - {id_of(d) for d in got}, WAIT)

    assert {id_of(d) for d in got} == set(range(1, 6))
    assert (await binder.health()).ok
    gone = [r for r in caplog.records if "is gone" in r.getMessage()]
    assert 1 <= len(gone) <= 2  # recovered at once, not in a loop


async def test_trimming_caps_the_stream_and_warns(
    make_binder: MakeBinder,
    redis_client: Redis,
    stream: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    binder = await make_binder()
    spec = ProducerSpec(stream, options=RedisProducerOptions(max_len=10))

    for start in range(0, 1000, 100):
        await binder.publish(spec, numbered(100, start=start))

    # Approximate trimming drops whole radix-tree nodes (100 entries by default).
    assert await redis_client.xlen(stream) <= 10 + 200
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "drops entries" in warnings[0].getMessage()


async def test_an_unreachable_server_is_reported_without_the_password() -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    binder = RedisBinder(RedisSettings(url=url, connect_timeout=0.5))

    with pytest.raises(BrokerUnavailable) as failure:
        await binder.start()

    assert "s3cret" not in str(failure.value)
    assert "redis://:***@127.0.0.1" in str(failure.value)
    assert not (await binder.health()).ok


async def test_the_connection_error_names_the_binder_setting_not_a_test_variable() -> (
    None
):
    url = f"redis://127.0.0.1:{free_port()}/0"
    binder = RedisBinder(RedisSettings(url=url, connect_timeout=0.5), name="cache")

    with pytest.raises(BrokerUnavailable) as failure:
        await binder.start()

    assert "binders.cache.url" in str(failure.value)
    assert "STREAMKIT_REDIS_URL" not in str(failure.value)


async def test_partitions_are_streams_named_after_the_destination(
    make_binder: MakeBinder, redis_client: Redis, stream: str
) -> None:
    binder = await make_binder()
    spec = ProducerSpec(stream, partition_count=3)

    await binder.publish(spec, numbered(3, partition=lambda i: i))
    sub: Subscription = await binder.subscribe(
        ConsumerSpec(
            stream, group="g", partitioned=True, partition_count=3, instance_count=2
        )
    )
    got = await collect(sub, 2, WAIT)
    lengths = [await redis_client.xlen(f"{stream}-{p}") for p in range(3)]
    await redis_client.delete(*(f"{stream}-{p}" for p in range(3)))

    assert lengths == [1, 1, 1]
    assert sorted((d.partition, id_of(d)) for d in got) == [(0, 0), (2, 2)]


async def test_a_restarted_consumer_pages_through_its_own_pending_list(
    make_binder: MakeBinder, redis_client: Redis, stream: str
) -> None:
    binder = await make_binder(consumer_name=f"pager-{secrets.token_hex(3)}")
    await binder.publish(ProducerSpec(stream), numbered(50))
    first = await binder.subscribe(ConsumerSpec(stream, group="g"))
    assert len(await collect(first, 50, WAIT, ack=False)) == 50
    await first.close()

    again = await binder.subscribe(
        ConsumerSpec(stream, group="g", prefetch=10, batch_size=3)
    )
    got = await collect(again, 50, WAIT)
    await again.close()

    counts = Counter(id_of(d) for d in got)
    assert set(counts) == set(range(50)) and set(counts.values()) == {1}
    assert await pending_count(redis_client, stream, "g") == 0


async def test_an_unpartitioned_consumer_reads_every_partition_of_the_producer(
    make_binder: MakeBinder, redis_client: Redis, stream: str
) -> None:
    binder = await make_binder()
    producer = ProducerSpec(stream, partition_count=3)
    try:
        await binder.provision_producer(producer)
        group_sub = await binder.subscribe(ConsumerSpec(stream, group="g"))
        anonymous = await binder.subscribe(ConsumerSpec(stream))
        await binder.publish(producer, numbered(6, partition=lambda i: i % 3))
        await binder.publish(ProducerSpec(stream), numbered(1, start=6))

        grouped = await collect_ids(group_sub, range(7), WAIT)
        broadcast = await collect_ids(anonymous, range(7), WAIT)
        noted = await redis_client.hget("streamkit:partitions", stream)
    finally:
        await redis_client.hdel("streamkit:partitions", stream)
        await redis_client.delete(*(f"{stream}-{p}" for p in range(3)))

    assert noted == b"3"
    assert sorted({id_of(d) for d in grouped}) == list(range(7))
    assert sorted({id_of(d) for d in broadcast}) == list(range(7))
    assert {(id_of(d), d.partition) for d in grouped if id_of(d) < 6} == {
        (i, i % 3) for i in range(6)
    }
