"""Core conformance cases (CONFORMANCE.md 1-16 and 30), at the binder SPI level.

Each case talks to a binder through :class:`~streamkit.binder.Binder`,
:class:`~streamkit.binder.Subscription` and :class:`~streamkit.binder.Delivery`
only, so it holds every binder to the contract the runtime relies on. A consumer
group is always attached (subscribed once) before records are published to it: on
brokers without replay (RabbitMQ) a group only receives what arrives after its queue
exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections import defaultdict

import pytest

from ..binder import Binder, Delivery, HealthStatus, Record, Subscription
from ..errors import MessageTooLarge
from .helpers import (
    ID_HEADER,
    Names,
    collect,
    collect_ids,
    id_of,
    numbered,
    publish_all,
    read_until,
)
from .plugin import ActiveProfile, BinderFactory

pytestmark = pytest.mark.asyncio

MiB = 1024 * 1024


async def attach(binder: Binder, profile: ActiveProfile, dest: str, group: str) -> None:
    """Provision ``group`` on ``dest`` by subscribing once, so it keeps what follows."""
    sub = await binder.subscribe(profile.consumer_spec(dest, group=group))
    await sub.close()


def ids(deliveries: list[Delivery]) -> set[int]:
    return {id_of(d) for d in deliveries}


# -- 1-3: round trip, competing consumers, many destinations ---------------------------


@pytest.mark.capability("consumer_groups")
async def test_round_trip_keeps_payloads_and_headers(
    profile: ActiveProfile, binder: Binder, names: Names
) -> None:
    dest, group = names.destination(), names.group()
    await attach(binder, profile, dest, group)
    sent = numbered(100, headers=lambda i: {"x-seq": f"h-{i}".encode()})
    await publish_all(binder, profile.producer_spec(dest), sent)

    sub = await binder.subscribe(profile.consumer_spec(dest, group=group))
    got = await collect_ids(sub, range(100), profile.timeout())

    by_id = {id_of(d): d for d in got}
    assert set(by_id) == set(range(100))
    for record in sent:
        delivery = by_id[int(record.headers[ID_HEADER])]
        assert delivery.value == record.value
        assert delivery.headers[ID_HEADER] == record.headers[ID_HEADER]
        assert delivery.headers["x-seq"] == record.headers["x-seq"]
        assert delivery.destination == dest


@pytest.mark.capability("consumer_groups")
async def test_closing_the_binder_ends_a_waiting_consumer(
    profile: ActiveProfile, binder: Binder, names: Names
) -> None:
    sub = await binder.subscribe(profile.consumer_spec(names.destination(), group="g"))
    waiting = asyncio.create_task(sub.next_batch())

    await asyncio.wait_for(binder.close(), profile.timeout())

    assert await asyncio.wait_for(waiting, profile.timeout()) is None
    assert [batch async for batch in sub] == []


@pytest.mark.capability("consumer_groups")
async def test_competing_consumers_together_receive_everything(
    profile: ActiveProfile,
    binder: Binder,
    binder_factory: BinderFactory,
    names: Names,
) -> None:
    dest, group = names.destination(), names.group()
    total = profile.sized(300, 3000)
    members = [
        await (await binder_factory()).subscribe(
            profile.consumer_spec(dest, group=group)
        )
        for _ in range(profile.sized(3, 5))
    ]
    seen: set[int] = set()
    all_in = asyncio.Event()

    async def consume(sub: Subscription) -> None:
        async for batch in sub:
            for delivery in batch:
                seen.add(id_of(delivery))
                await delivery.ack()
            if len(seen) == total:
                all_in.set()

    consumers = [asyncio.create_task(consume(sub)) for sub in members]
    spec = profile.producer_spec(dest)
    half = total // 2
    await asyncio.gather(
        publish_all(binder, spec, numbered(half)),
        publish_all(binder, spec, numbered(total - half, start=half)),
    )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_in.wait(), profile.timeout())
    for sub in members:
        await sub.close()
    await asyncio.gather(*consumers)

    assert seen == set(range(total))


@pytest.mark.capability("consumer_groups")
async def test_each_destination_delivers_only_its_own_records(
    profile: ActiveProfile, binder: Binder, names: Names
) -> None:
    dests = [names.destination(f"d{n}") for n in range(profile.sized(4, 10))]
    per_dest = profile.sized(25, 100)
    subs = [
        await binder.subscribe(profile.consumer_spec(dest, group="g")) for dest in dests
    ]

    for n, dest in enumerate(dests):
        records = numbered(per_dest)
        for record in records:
            record.headers["x-dest"] = str(n).encode()
        await publish_all(binder, profile.producer_spec(dest), records)
    results = await asyncio.gather(
        *(collect(sub, per_dest, profile.timeout()) for sub in subs)
    )

    for n, (dest, got) in enumerate(zip(dests, results, strict=True)):
        assert ids(got) == set(range(per_dest)), dest
        assert {d.headers["x-dest"] for d in got} == {str(n).encode()}
        assert {d.destination for d in got} == {dest}


# -- 4: ordering -----------------------------------------------------------------------


@pytest.mark.capability("consumer_groups", "ordering")
async def test_order_is_kept_per_key_across_partitioned_consumers(
    profile: ActiveProfile,
    binder: Binder,
    binder_factory: BinderFactory,
    names: Names,
) -> None:
    dest, group = names.destination(), names.group()
    total, keys, partitions = profile.sized(1000, 5000), 16, 4
    instances = profile.sized(2, 4)
    subs = [
        await (await binder_factory()).subscribe(
            profile.consumer_spec(
                dest,
                group=group,
                partitioned=True,
                partition_count=partitions,
                instance_index=index,
                instance_count=instances,
            )
        )
        for index in range(instances)
    ]
    received: dict[int, list[int]] = defaultdict(list)
    seen: set[int] = set()
    all_in = asyncio.Event()

    async def consume(sub: Subscription) -> None:
        async for batch in sub:
            for delivery in batch:
                received[int(delivery.key or b"-1")].append(id_of(delivery))
                seen.add(id_of(delivery))
                await delivery.ack()
            if len(seen) == total:
                all_in.set()

    def key(i: int) -> bytes:
        return str(i % keys).encode()

    def partition(i: int) -> int:
        # The runtime picks partitions like this; the broker only has to keep them.
        return zlib.crc32(key(i)) % partitions

    consumers = [asyncio.create_task(consume(sub)) for sub in subs]
    records = numbered(total, key=key, partition=partition)
    await publish_all(
        binder, profile.producer_spec(dest, partition_count=partitions), records
    )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_in.wait(), profile.timeout())
    for sub in subs:
        await sub.close()
    await asyncio.gather(*consumers)

    assert seen == set(range(total))
    for k in range(keys):
        # A redelivery (e.g. after a rebalance) may repeat ids; the first arrival of
        # each id must follow the publish order.
        first_seen = list(dict.fromkeys(received[k]))
        assert first_seen == list(range(k, total, keys)), f"key {k}"


# -- 5, 8: give back and redeliver -----------------------------------------------------


@pytest.mark.capability("consumer_groups")
async def test_released_deliveries_come_back(
    profile: ActiveProfile, binder: Binder, names: Names
) -> None:
    dest, group = names.destination(), names.group()
    total = profile.sized(50, 500)
    sub = await binder.subscribe(profile.consumer_spec(dest, group=group))
    await publish_all(binder, profile.producer_spec(dest), numbered(total))

    first = await collect(sub, 1, profile.timeout(), ack=False)
    for delivery in first:
        await delivery.release()
    got = await collect_ids(sub, range(total), profile.timeout(recovery=True))

    assert first, "nothing was delivered"
    assert ids(got) == set(range(total))
    # A give-back is not a failed attempt: it keeps the count.
    attempts = {id_of(d): d.attempt for d in got}
    assert all(attempts[id_of(d)] == d.attempt for d in first)


@pytest.mark.capability("consumer_groups", "native_delivery_count")
async def test_a_recorded_failure_raises_the_attempt_of_the_next_delivery(
    profile: ActiveProfile,
    binder: Binder,
    binder_factory: BinderFactory,
    names: Names,
) -> None:
    dest, group = names.destination(), names.group()
    sub = await binder.subscribe(profile.consumer_spec(dest, group=group))
    await binder.publish(profile.producer_spec(dest), numbered(2))
    first = await collect_ids(sub, range(2), profile.timeout(), ack=False)
    assert ids(first) == {0, 1}
    failed = next(d for d in first if id_of(d) == 0)

    await sub.record_attempt(failed)
    await sub.close()  # a restart between attempts must not reset the count
    other = await (await binder_factory()).subscribe(
        profile.consumer_spec(dest, group=group)
    )
    again = await collect_ids(other, range(2), profile.timeout(recovery=True))

    attempts = {id_of(d): d.attempt for d in again}
    assert attempts == {0: failed.attempt + 1, 1: 1}


@pytest.mark.capability("consumer_groups")
async def test_repeated_give_backs_never_skip_a_record(
    profile: ActiveProfile, binder: Binder, names: Names
) -> None:
    dest, group = names.destination(), names.group()
    total = profile.sized(30, 300)
    sub = await binder.subscribe(profile.consumer_spec(dest, group=group))
    await publish_all(binder, profile.producer_spec(dest), numbered(total))
    acked: set[int] = set()

    for _ in range(profile.sized(4, 10)):
        batch = await asyncio.wait_for(sub.next_batch(), profile.timeout(recovery=True))
        assert batch
        for delivery in batch:
            # Release the odd ids every round; ack the even ones.
            if id_of(delivery) % 2 == 0:
                acked.add(id_of(delivery))
                await delivery.ack()
            else:
                await delivery.release()
    rest = set(range(total)) - acked
    got = await collect_ids(sub, rest, profile.timeout(recovery=True))

    assert acked | ids(got) == set(range(total))


# -- 6, 7, 12, 13: subscribers coming and going ----------------------------------------


@pytest.mark.capability("consumer_groups")
async def test_restarting_subscribers_lose_nothing(
    profile: ActiveProfile,
    binder: Binder,
    binder_factory: BinderFactory,
    names: Names,
) -> None:
    dest, group = names.destination(), names.group()
    total = profile.sized(40, 400)
    await attach(binder, profile, dest, group)
    await publish_all(binder, profile.producer_spec(dest), numbered(total))
    acked: set[int] = set()
    spec = profile.consumer_spec(dest, group=group, batch_size=10, prefetch=10)
    # Alternate two binders: a new subscriber is sometimes a new process.
    owners = [binder, await binder_factory()]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + profile.timeout(recovery=True) * 2

    for round_ in range(10 * total):
        if acked == set(range(total)) or loop.time() > deadline:
            break
        sub = await owners[round_ % 2].subscribe(spec)
        with contextlib.suppress(TimeoutError):
            batch = await asyncio.wait_for(sub.next_batch(), deadline - loop.time())
            # Ack the first half; the rest stays unsettled for the next subscriber.
            for delivery in (batch or [])[: (len(batch or []) + 1) // 2]:
                acked.add(id_of(delivery))
                await delivery.ack()
        await sub.close()

    assert acked == set(range(total))


@pytest.mark.capability("consumer_groups")
async def test_concurrent_close_of_many_subscribers_then_all_new_records_arrive(
    profile: ActiveProfile, binder: Binder, names: Names
) -> None:
    dest, group = names.destination(), names.group()
    subs = [
        await binder.subscribe(profile.consumer_spec(dest, group=group))
        for _ in range(profile.sized(4, 32))
    ]
    waiting = [asyncio.create_task(sub.next_batch()) for sub in subs[::2]]

    await asyncio.wait_for(
        asyncio.gather(*(sub.close() for sub in subs)), profile.timeout()
    )
    ended = await asyncio.wait_for(asyncio.gather(*waiting), profile.timeout())
    total = profile.sized(50, 500)
    fresh = await binder.subscribe(profile.consumer_spec(dest, group=group))
    await publish_all(binder, profile.producer_spec(dest), numbered(total))
    got = await collect_ids(fresh, range(total), profile.timeout(recovery=True))

    assert ended == [None] * len(waiting)
    assert ids(got) == set(range(total))


@pytest.mark.capability("consumer_groups")
async def test_cancelling_a_read_loses_nothing(
    profile: ActiveProfile, binder: Binder, names: Names
) -> None:
    dest, group = names.destination(), names.group()
    total = profile.sized(40, 400)
    first = await binder.subscribe(profile.consumer_spec(dest, group=group))
    idle = asyncio.create_task(first.next_batch())
    await asyncio.sleep(0)  # let the read start waiting on an empty destination
    idle.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await idle

    await publish_all(binder, profile.producer_spec(dest), numbered(total))
    # Cancel reads while records are there, so one may be cancelled mid-fetch.
    for _ in range(3):
        reading = asyncio.create_task(first.next_batch())
        await asyncio.sleep(0)
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            held = await reading
            assert held is not None  # finished before the cancel: left unsettled
    await first.close()
    second = await binder.subscribe(profile.consumer_spec(dest, group=group))
    got = await collect_ids(second, range(total), profile.timeout(recovery=True))

    assert ids(got) == set(range(total))


@pytest.mark.capability("consumer_groups")
async def test_closing_one_subscription_leaves_the_others_running(
    profile: ActiveProfile, binder: Binder, names: Names
) -> None:
    one, two = names.destination("one"), names.destination("two")
    total = profile.sized(20, 200)
    closing = await binder.subscribe(profile.consumer_spec(one, group="a"))
    same_dest = await binder.subscribe(profile.consumer_spec(one, group="b"))
    other_dest = await binder.subscribe(profile.consumer_spec(two, group="a"))

    await closing.close()
    await publish_all(binder, profile.producer_spec(one), numbered(total))
    await publish_all(binder, profile.producer_spec(two), numbered(total))
    got_same, got_other = await asyncio.gather(
        collect_ids(same_dest, range(total), profile.timeout()),
        collect_ids(other_dest, range(total), profile.timeout()),
    )

    assert ids(got_same) == set(range(total))
    assert ids(got_other) == set(range(total))


# -- 9-11: producers and groups --------------------------------------------------------


@pytest.mark.capability("consumer_groups")
async def test_closing_the_producer_keeps_what_it_published(
    profile: ActiveProfile,
    binder: Binder,
    binder_factory: BinderFactory,
    names: Names,
) -> None:
    dest, group = names.destination(), names.group()
    total = profile.sized(100, 2000)
    sub = await binder.subscribe(profile.consumer_spec(dest, group=group))
    producer = await binder_factory()

    await publish_all(producer, profile.producer_spec(dest), numbered(total), batch=7)
    await producer.close()
    got = await collect_ids(sub, range(total), profile.timeout())

    assert ids(got) == set(range(total))


@pytest.mark.capability("consumer_groups")
async def test_every_group_receives_every_record(
    profile: ActiveProfile, binder: Binder, names: Names
) -> None:
    dest = names.destination()
    total = profile.sized(50, 500)
    first = await binder.subscribe(profile.consumer_spec(dest, group=names.group()))
    second = await binder.subscribe(profile.consumer_spec(dest, group=names.group()))

    await publish_all(binder, profile.producer_spec(dest), numbered(total))
    got_first, got_second = await asyncio.gather(
        collect_ids(first, range(total), profile.timeout()),
        collect_ids(second, range(total), profile.timeout()),
    )

    assert ids(got_first) == set(range(total))
    assert ids(got_second) == set(range(total))


@pytest.mark.capability("consumer_groups", "replay_for_new_group")
async def test_a_new_group_sees_history(
    profile: ActiveProfile, binder: Binder, names: Names
) -> None:
    dest = names.destination()
    total = profile.sized(30, 300)
    existing = await binder.subscribe(profile.consumer_spec(dest, group=names.group()))
    await publish_all(binder, profile.producer_spec(dest), numbered(total))
    assert ids(await collect_ids(existing, range(total), profile.timeout())) == set(
        range(total)
    )

    late = await binder.subscribe(
        profile.consumer_spec(dest, group=names.group(), start_from="earliest")
    )
    got = await collect_ids(late, range(total), profile.timeout())

    assert ids(got) == set(range(total))


# -- 14, 15: health and readiness ------------------------------------------------------


async def test_health_answers_promptly(profile: ActiveProfile, binder: Binder) -> None:
    health = await asyncio.wait_for(binder.health(), 10)

    assert health.ok or (
        health.status is HealthStatus.UNKNOWN and "not supported" in health.detail
    ), health


@pytest.mark.capability("consumer_groups")
@pytest.mark.parametrize("grouped", [True, False], ids=["group", "anonymous"])
async def test_a_record_published_right_after_subscribe_is_received(
    profile: ActiveProfile, binder: Binder, names: Names, grouped: bool
) -> None:
    if not grouped:
        profile.require("broadcast")
    for round_ in range(profile.sized(3, 20)):
        dest = names.destination()
        group = names.group() if grouped else None
        sub = await binder.subscribe(profile.consumer_spec(dest, group=group))
        await binder.publish(profile.producer_spec(dest), numbered(1, start=round_))

        got = await collect(sub, 1, profile.timeout())

        assert ids(got) == {round_}
        await sub.close()


@pytest.mark.capability("broadcast")
async def test_an_anonymous_subscriber_sees_only_what_follows_its_subscribe(
    profile: ActiveProfile, binder: Binder, names: Names
) -> None:
    dest = names.destination()
    group = await binder.subscribe(profile.consumer_spec(dest, group=names.group()))
    await binder.publish(profile.producer_spec(dest), numbered(5))
    await collect_ids(group, range(5), profile.timeout())  # the old ones are in

    sub = await binder.subscribe(profile.consumer_spec(dest))
    await binder.publish(profile.producer_spec(dest), numbered(5, start=5))
    got = await collect_ids(sub, range(5, 10), profile.timeout())

    assert ids(got) == set(range(5, 10))


@pytest.mark.capability("broadcast")
async def test_every_anonymous_subscriber_receives_every_record(
    profile: ActiveProfile, binder: Binder, names: Names
) -> None:
    dest = names.destination()
    total = profile.sized(20, 200)
    subs = [await binder.subscribe(profile.consumer_spec(dest)) for _ in range(3)]

    await publish_all(binder, profile.producer_spec(dest), numbered(total))
    results = await asyncio.gather(
        *(collect_ids(sub, range(total), profile.timeout()) for sub in subs)
    )

    for got in results:
        assert ids(got) == set(range(total))


# -- 16: payload and header edges ------------------------------------------------------


def _largest_body(profile: ActiveProfile, binder: Binder) -> int:
    """1 MiB, or what fits the declared limit with room for the id header."""
    limit = profile.profile.effective_capabilities(
        binder.capabilities
    ).max_message_bytes
    if limit is None or limit >= MiB + 1024:
        return MiB
    return limit - 1024


@pytest.mark.capability("consumer_groups")
async def test_payload_and_header_edges_round_trip_byte_exactly(
    profile: ActiveProfile, binder: Binder, names: Names
) -> None:
    dest, group = names.destination(), names.group()
    big = _largest_body(profile, binder)
    edges: list[tuple[bytes, dict[str, bytes]]] = [
        (b"", {}),
        (bytes(range(256)) * (big // 256) + bytes(big % 256), {}),
        (b"\x00\xff\xfe binary \x80", {"x-bin": bytes(range(256))}),
        ("unicode ✓ ü 中".encode(), {"ключ-ü": "värde ✓ 中".encode()}),
        (b"empty header", {"x-empty": b""}),
    ]
    sent = [
        Record(value, {ID_HEADER: str(i).encode(), **headers})
        for i, (value, headers) in enumerate(edges)
    ]
    sub = await binder.subscribe(profile.consumer_spec(dest, group=group))

    for record in sent:  # one per call: the large one may need a request of its own
        await binder.publish(profile.producer_spec(dest), [record])
    got = await collect_ids(sub, range(len(sent)), profile.timeout())

    by_id = {id_of(d): d for d in got}
    assert set(by_id) == set(range(len(sent)))
    for i, record in enumerate(sent):
        delivery = by_id[i]
        assert delivery.value == record.value, f"body of edge {i}"
        # Binders may add headers of their own; the sent ones must come back exactly.
        assert {k: delivery.headers.get(k) for k in record.headers} == record.headers


async def test_an_over_limit_record_raises_at_publish(
    profile: ActiveProfile, binder: Binder, names: Names
) -> None:
    limit = profile.profile.effective_capabilities(
        binder.capabilities
    ).max_message_bytes
    if limit is None:
        pytest.skip(f"profile {profile.name!r} declares no max_message_bytes")
    dest = names.destination()

    with pytest.raises(MessageTooLarge):
        await binder.publish(profile.producer_spec(dest), [Record(b"x" * (limit + 1))])


# -- 30: clean close -------------------------------------------------------------------


@pytest.mark.capability("consumer_groups")
async def test_close_is_idempotent_and_leaves_no_task_behind(
    profile: ActiveProfile, binder_factory: BinderFactory, names: Names
) -> None:
    before = asyncio.all_tasks()
    binder = await binder_factory()
    dest = names.destination()
    sub = await binder.subscribe(profile.consumer_spec(dest, group=names.group()))
    idle = await binder.subscribe(profile.consumer_spec(names.destination(), group="g"))
    await binder.publish(profile.producer_spec(dest), numbered(5))
    await read_until(sub, lambda got: len(got) >= 1, profile.timeout(), ack=False)
    waiting = asyncio.create_task(idle.next_batch())

    await asyncio.wait_for(binder.close(), profile.timeout())
    await asyncio.wait_for(binder.close(), profile.timeout())
    await asyncio.wait_for(sub.close(), profile.timeout())

    assert await asyncio.wait_for(waiting, profile.timeout()) is None
    left = asyncio.all_tasks() - before - {asyncio.current_task()}
    if left:
        # A driver may need a loop turn to retire a task it already finished.
        _, left = await asyncio.wait(left, timeout=1.0)
    assert not left, f"tasks left after close: {left}"
