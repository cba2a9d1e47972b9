"""Behaviour specific to the memory binder; the shared contract is in conformance."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Iterator

import pytest

from streamkit.binder import ConsumerSpec, ProducerSpec, Record
from streamkit.errors import MessageTooLarge, PublishTimeout
from streamkit.memory import (
    MemoryBinder,
    MemorySettings,
    drop_broker,
    get_broker,
    new_broker_name,
)


@pytest.fixture
def broker_name() -> Iterator[str]:
    name = new_broker_name()
    yield name
    drop_broker(name)


async def started(broker: str, **settings: object) -> MemoryBinder:
    binder = MemoryBinder(MemorySettings(broker=broker, **settings))
    await binder.start()
    return binder


def records(count: int, key: bytes | None = None) -> list[Record]:
    return [Record(str(i).encode(), key=key) for i in range(count)]


async def test_settled_records_stay_as_history_until_room_is_needed(
    broker_name: str,
) -> None:
    binder = await started(broker_name, buffer_size=4, publish_timeout=0.2)
    sub = await binder.subscribe(ConsumerSpec("t", group="g"))
    await binder.publish(ProducerSpec("t"), records(4))
    batch = await sub.next_batch()
    assert batch is not None
    for delivery in batch[:2]:
        await delivery.ack()
    part = get_broker(broker_name).destinations["t"].partitions[0]
    assert (part.base, len(part)) == (0, 4)

    await binder.publish(ProducerSpec("t"), [Record(b"4"), Record(b"5")])

    assert (part.base, len(part)) == (2, 4)
    await binder.close()


async def test_a_full_partition_waits_for_the_slowest_group(broker_name: str) -> None:
    binder = await started(broker_name, buffer_size=3, publish_timeout=0.2)
    fast = await binder.subscribe(ConsumerSpec("t", group="fast"))
    await binder.subscribe(ConsumerSpec("t", group="slow"))
    await binder.publish(ProducerSpec("t"), records(3))
    batch = await fast.next_batch()
    assert batch is not None
    for delivery in batch:
        await delivery.ack()

    with pytest.raises(PublishTimeout):
        await binder.publish(ProducerSpec("t"), records(1))
    await binder.close()


async def test_publish_times_out_naming_buffer_size_when_consumers_lag(
    broker_name: str,
) -> None:
    binder = await started(broker_name, buffer_size=3, publish_timeout=0.2)
    await binder.subscribe(ConsumerSpec("t", group="g"))

    with pytest.raises(PublishTimeout, match="buffer_size=3"):
        await binder.publish(ProducerSpec("t"), records(4))
    await binder.close()


async def test_blocked_publish_resumes_when_a_consumer_acks(broker_name: str) -> None:
    binder = await started(broker_name, buffer_size=2, publish_timeout=5)
    sub = await binder.subscribe(ConsumerSpec("t", group="g", batch_size=1))
    publishing = asyncio.create_task(binder.publish(ProducerSpec("t"), records(3)))

    seen = []
    while len(seen) < 3:
        batch = await asyncio.wait_for(sub.next_batch(), 5)
        assert batch is not None
        for delivery in batch:
            seen.append(delivery.value)
            await delivery.ack()

    await asyncio.wait_for(publishing, 5)
    assert seen == [b"0", b"1", b"2"]
    await binder.close()


async def test_without_any_group_the_log_keeps_the_newest_buffer_size(
    broker_name: str,
) -> None:
    binder = await started(broker_name, buffer_size=3, publish_timeout=0.2)
    await binder.publish(ProducerSpec("t"), records(5))

    sub = await binder.subscribe(ConsumerSpec("t", group="late"))
    batch = await sub.next_batch()

    assert batch is not None
    assert [d.value for d in batch] == [b"2", b"3", b"4"]
    await binder.close()


async def test_a_key_held_by_one_member_is_not_handed_to_another(
    broker_name: str,
) -> None:
    binder = await started(broker_name)
    first = await binder.subscribe(ConsumerSpec("t", group="g", batch_size=1))
    second = await binder.subscribe(ConsumerSpec("t", group="g"))
    await binder.publish(
        ProducerSpec("t"),
        [Record(b"a1", key=b"a"), Record(b"a2", key=b"a"), Record(b"b1", key=b"b")],
    )

    held = await first.next_batch()
    other = await second.next_batch()
    assert held is not None and other is not None
    assert [d.value for d in held] == [b"a1"]
    assert [d.value for d in other] == [b"b1"]

    await held[0].ack()
    after = await first.next_batch()
    assert after is not None
    assert [d.value for d in after] == [b"a2"]
    await binder.close()


async def test_a_released_key_goes_to_another_member_in_order(
    broker_name: str,
) -> None:
    binder = await started(broker_name)
    first = await binder.subscribe(ConsumerSpec("t", group="g"))
    await binder.publish(ProducerSpec("t"), records(3, key=b"k"))
    batch = await first.next_batch()
    assert batch is not None
    second = await binder.subscribe(ConsumerSpec("t", group="g"))

    await first.close()
    again = await second.next_batch()

    assert again is not None
    assert [d.value for d in again] == [b"0", b"1", b"2"]
    await binder.close()


async def test_record_attempt_counts_towards_the_next_delivery(
    broker_name: str,
) -> None:
    binder = await started(broker_name)
    sub = await binder.subscribe(ConsumerSpec("t", group="g"))
    await binder.publish(ProducerSpec("t"), records(1))
    batch = await sub.next_batch()
    assert batch is not None

    await sub.record_attempt(batch[0])
    await batch[0].release()
    again = await sub.next_batch()

    assert again is not None and again[0].attempt == 2
    await binder.close()


async def test_oversized_record_raises_naming_the_limit(broker_name: str) -> None:
    binder = await started(broker_name, max_message_bytes=10)

    with pytest.raises(MessageTooLarge, match="max_message_bytes=10"):
        await binder.publish(ProducerSpec("t"), [Record(b"x" * 11)])
    assert binder.capabilities.max_message_bytes == 10
    await binder.close()


async def test_group_state_survives_a_binder_restart(broker_name: str) -> None:
    binder = await started(broker_name)
    sub = await binder.subscribe(ConsumerSpec("t", group="g"))
    await binder.publish(ProducerSpec("t"), records(4))
    batch = await sub.next_batch()
    assert batch is not None
    for delivery in batch[:2]:
        await delivery.ack()
    await binder.close()

    restarted = await started(broker_name)
    sub = await restarted.subscribe(ConsumerSpec("t", group="g"))
    batch = await sub.next_batch()

    assert batch is not None
    assert [d.value for d in batch] == [b"2", b"3"]
    await restarted.close()


async def test_keyed_records_spread_over_partitions_by_stable_hash(
    broker_name: str,
) -> None:
    binder = await started(broker_name)
    await binder.publish(
        ProducerSpec("t", partition_count=4),
        [Record(b"v", key=k) for k in (b"a", b"b", b"c", b"d")],
    )
    sub = await binder.subscribe(ConsumerSpec("t", group="g", partition_count=4))

    batch = await sub.next_batch()

    assert batch is not None
    assert {(d.key, d.partition) for d in batch} == {
        (k, zlib.crc32(k) % 4) for k in (b"a", b"b", b"c", b"d")
    }
    await binder.close()


async def test_a_partitioned_instance_reads_only_its_partitions(
    broker_name: str,
) -> None:
    binder = await started(broker_name)
    spec = ConsumerSpec(
        "t", group="g", partitioned=True, partition_count=4, instance_count=2
    )
    sub = await binder.subscribe(spec)

    await binder.publish(
        ProducerSpec("t", partition_count=4),
        [Record(str(p).encode(), partition=p) for p in range(4)],
    )
    batch = await sub.next_batch()

    assert batch is not None
    assert sorted(d.partition for d in batch) == [0, 2]
    await binder.close()
