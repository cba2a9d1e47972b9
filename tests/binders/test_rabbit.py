"""RabbitMQ binder: settings, wire format, naming, and broker behaviour beyond the
shared conformance cases (which run on the ``rabbit`` and ``rabbit-quorum``
profiles). Fault cases (restarts, closed channels, a broker gone) are in
test_rabbit_faults.py.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from pydantic import ValidationError

from streamkit.binder import ConsumerSpec, Delivery, ProducerSpec, Record, Subscription
from streamkit.errors import (
    BinderError,
    ConfigError,
    MessageTooLarge,
    PublishError,
    Unroutable,
)

aio_pika = pytest.importorskip("aio_pika")
streamkit_rabbit = pytest.importorskip("streamkit_rabbit")

from streamkit_rabbit import (  # noqa: E402  # noqa: E402
    RabbitBinder,
    RabbitConsumerOptions,
    RabbitProducerOptions,
    RabbitSettings,
    topology,
    wire,
)

URL_ENV = "STREAMKIT_RABBIT_URL"
RABBIT_URL = os.environ.get(URL_ENV, "amqp://guest:guest@127.0.0.1:5672/")
# Queues made here vanish from the shared broker a minute after their last use.
EXPIRING = {"expires_ms": 60_000, "dlq_expires_ms": 60_000}


def fresh(label: str = "t") -> str:
    return f"skr-{label}-{secrets.token_hex(4)}"


def consumer(destination: str, group: str | None = "g", **options: Any) -> ConsumerSpec:
    spec_keys = {"partitioned", "partition_count", "instance_index", "instance_count"}
    spec_keys |= {"prefetch", "batch_size"}
    spec = {k: options.pop(k) for k in list(options) if k in spec_keys}
    return ConsumerSpec(
        destination,
        group=group,
        options=RabbitConsumerOptions(**{**EXPIRING, **options}),
        **spec,
    )


def producer(destination: str, **options: Any) -> ProducerSpec:
    count = options.pop("partition_count", 1)
    return ProducerSpec(
        destination,
        partition_count=count,
        options=RabbitProducerOptions(**{**EXPIRING, **options}),
    )


@pytest_asyncio.fixture
async def binder(needs_rabbit: None) -> AsyncIterator[RabbitBinder]:
    made = RabbitBinder(RabbitSettings(url=RABBIT_URL, delivery_timeout=10))
    await made.start()
    yield made
    await made.close()


@pytest_asyncio.fixture
async def raw(needs_rabbit: None) -> AsyncIterator[Any]:
    """A plain aio-pika channel, for what another client would do."""
    connection = await aio_pika.connect(RABBIT_URL)
    yield await connection.channel()
    await connection.close()


async def take(sub: Subscription, count: int, *, ack: bool = True) -> list[Delivery]:
    got: list[Delivery] = []
    async with asyncio.timeout(10):
        while len(got) < count:
            batch = await sub.next_batch()
            assert batch is not None
            for delivery in batch:
                got.append(delivery)
                if ack:
                    await delivery.ack()
    return got


# -- settings --------------------------------------------------------------------------


def test_the_password_never_shows_in_repr_or_dump() -> None:
    settings = RabbitSettings(url="amqp://app:s3cret@mq:5672/prod")

    printed = [repr(settings), str(settings), str(settings.model_dump())]

    assert not any("s3cret" in text for text in printed)
    assert "amqp://app:***@mq:5672/prod" in repr(settings)
    assert settings.connection_url().password == "s3cret"


def test_credentials_and_vhost_settings_override_the_url() -> None:
    settings = RabbitSettings(
        url="amqp://guest:guest@mq/", username="app", password="pw", virtual_host="/"
    )

    url = settings.connection_url()

    assert (url.user, url.password) == ("app", "pw")
    assert url.raw_path == "/%2F"
    assert url.query["heartbeat"] == "30"
    assert "pw" not in repr(settings)


def test_a_typo_and_a_wrong_scheme_are_reported_by_key() -> None:
    with pytest.raises(ValidationError, match="heartbaet"):
        RabbitSettings.model_validate({"heartbaet": 10})
    with pytest.raises(ValidationError, match="amqps://"):
        RabbitSettings(url="redis://localhost:6379/0")
    with pytest.raises(ValidationError, match="needs quorum"):
        RabbitConsumerOptions(delivery_limit=3)


def test_require_route_is_an_alias_of_mandatory() -> None:
    assert RabbitProducerOptions.model_validate({"require_route": True}).mandatory


# -- wire format -----------------------------------------------------------------------


def test_headers_key_and_null_value_survive_the_amqp_encoding() -> None:
    record = Record(
        None,
        headers={
            "contentType": b"application/json",
            "bin": b"\xff\x00\x80",
            "ключ-ü": "värde ✓".encode(),
            "empty": b"",
        },
        key=b"\xfe-key",
    )
    properties = wire.encode_properties(record, persistent=True)

    decoded = wire.decode_headers(properties)

    assert decoded.headers == record.headers
    assert (decoded.key, decoded.is_null) == (b"\xfe-key", True)
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2


def test_a_header_name_too_long_for_amqp_is_refused_not_truncated() -> None:
    with pytest.raises(PublishError, match="longer than 128 bytes"):
        wire.encode_properties(Record(b"", headers={"n" * 129: b""}), persistent=True)


# -- naming ----------------------------------------------------------------------------


def test_group_queue_and_dlq_follow_spring_cloud_stream_names() -> None:
    plan = topology.consumer_plan(
        consumer("orders", "billing"), RabbitConsumerOptions(), "anonymous.x"
    )

    (queue,) = plan.consume
    dlq = next(q for q in plan.queues if q.name.endswith(".dlq"))
    assert queue.name == "orders.billing"
    assert queue.bindings == (("orders", "#"),)
    assert queue.arguments["x-dead-letter-exchange"] == "DLX"
    assert queue.arguments["x-dead-letter-routing-key"] == "orders.billing"
    assert dlq.name == "orders.billing.dlq"
    assert ("DLX", "orders.billing") in dlq.bindings
    assert {(e.name, e.type) for e in plan.exchanges} == {
        ("orders", "topic"),
        ("DLX", "direct"),
    }


def test_partitions_get_a_routing_key_and_a_queue_each() -> None:
    spec = consumer(
        "orders", "billing", partitioned=True, partition_count=4,
        instance_index=1, instance_count=2,
    )  # fmt: skip
    plan = topology.consumer_plan(spec, RabbitConsumerOptions(), "anonymous.x")
    record = Record(b"", partition=3)

    assert [(q.name, q.partition, q.bindings) for q in plan.consume] == [
        ("orders.billing-1", 1, (("orders", "orders-1"),)),
        ("orders.billing-3", 3, (("orders", "orders-3"),)),
    ]
    assert topology.routing_key(
        producer("orders"), RabbitProducerOptions(), record
    ) == ("orders-3")


def test_a_fanout_exchange_cannot_carry_partitions() -> None:
    spec = consumer("t", partitioned=True, partition_count=2)

    with pytest.raises(ConfigError, match="fanout"):
        topology.consumer_plan(
            spec, RabbitConsumerOptions(exchange_type="fanout"), "anonymous.x"
        )


# -- round trips on the broker ---------------------------------------------------------


async def test_headers_key_and_null_round_trip_through_the_broker(
    binder: RabbitBinder,
) -> None:
    dest = fresh()
    sub = await binder.subscribe(consumer(dest))
    sent = Record(
        None,
        headers={"contentType": b"text/plain", "ünï-cödé": b"\xff\xfe", "x": b"1"},
        key=b"customer-7",
    )

    await binder.publish(producer(dest), [sent])
    (got,) = await take(sub, 1)

    assert (got.value, got.headers, got.key) == (None, sent.headers, sent.key)
    assert got.attempt == 1


async def test_a_message_from_a_plain_client_gets_readable_headers(
    binder: RabbitBinder, raw: Any
) -> None:
    dest = fresh()
    sub = await binder.subscribe(consumer(dest))
    exchange = await raw.get_exchange(dest)

    await exchange.publish(
        aio_pika.Message(
            b'{"a": 1}',
            content_type="application/json",
            headers={"n": 5, "flag": True, "nested": {"k": "v"}},
        ),
        routing_key=dest,
    )
    (got,) = await take(sub, 1)

    assert got.headers["contentType"] == b"application/json"
    assert got.headers["n"] == b"5"
    assert got.headers["flag"] == b"true"
    assert got.headers["nested"] == b'{"k": "v"}'
    assert got.key is None


# -- limits: C10 -----------------------------------------------------------------------


async def test_c10_headers_beyond_frame_max_raise_and_keep_the_connection(
    binder: RabbitBinder,
) -> None:
    dest = fresh()
    sub = await binder.subscribe(consumer(dest))
    trace = b"Traceback (most recent call last):\n" * 5000  # ~175 KB > 128 KiB frame

    with pytest.raises(MessageTooLarge, match="frame_max"):
        await binder.publish(producer(dest), [Record(b"x", {"x-trace": trace})])
    await binder.publish(producer(dest), [Record(b"after", {"x-trace": trace[:9000]})])
    (got,) = await take(sub, 1)

    assert got.value == b"after"
    assert (await binder.health()).ok


async def test_a_body_over_max_message_bytes_is_refused_before_sending(
    needs_rabbit: None,
) -> None:
    binder = RabbitBinder(RabbitSettings(url=RABBIT_URL, max_message_bytes=1000))
    await binder.start()
    dest = fresh()

    with pytest.raises(MessageTooLarge, match="max_message_bytes=1000"):
        await binder.publish(producer(dest), [Record(b"x" * 1001)])
    await binder.publish(producer(dest), [Record(b"x" * 1000)])
    await binder.close()

    assert binder.capabilities.max_message_bytes == 1000


# -- routing ---------------------------------------------------------------------------


async def test_mandatory_publish_to_a_destination_without_queues_raises(
    binder: RabbitBinder,
) -> None:
    dest = fresh()

    with pytest.raises(Unroutable, match=dest):
        await binder.publish(producer(dest, mandatory=True), [Record(b"lost")])
    await binder.publish(producer(dest), [Record(b"dropped silently, as asked")])


async def test_required_groups_keep_records_published_before_any_consumer(
    binder: RabbitBinder,
) -> None:
    dest = fresh()
    spec = producer(dest, required_groups=("g",))

    await binder.provision_producer(spec)
    await binder.publish(spec, [Record(b"early")])
    sub = await binder.subscribe(consumer(dest, "g"))
    (got,) = await take(sub, 1)

    assert got.value == b"early"


async def test_an_exchange_of_another_type_is_a_clear_error_at_subscribe(
    binder: RabbitBinder, raw: Any
) -> None:
    dest = fresh()
    await raw.declare_exchange(dest, "fanout", durable=True, auto_delete=True)

    with pytest.raises(BinderError, match="exchange_type"):
        await binder.subscribe(consumer(dest))
    assert (await binder.health()).ok


async def test_a_partitioned_record_reaches_only_its_partition_queue(
    binder: RabbitBinder, raw: Any
) -> None:
    dest = fresh()
    spec = consumer(dest, "g", partitioned=True, partition_count=3, instance_count=1)
    sub = await binder.subscribe(spec)

    await binder.publish(
        producer(dest, partition_count=3), [Record(b"p2", partition=2)]
    )
    (got,) = await take(sub, 1)

    assert (got.value, got.partition) == (b"p2", 2)
    for p in (0, 1):
        queue = await raw.declare_queue(f"{dest}.g-{p}", passive=True)
        assert queue.declaration_result.message_count == 0


async def test_single_active_consumer_keeps_order_across_instances(
    binder: RabbitBinder,
) -> None:
    dest = fresh()
    first = await binder.subscribe(consumer(dest, single_active_consumer=True))
    second = await binder.subscribe(consumer(dest, single_active_consumer=True))
    records = [Record(str(i).encode()) for i in range(200)]

    await binder.publish(producer(dest), records)
    got = await take(first, 200)
    await first.close()
    await binder.publish(producer(dest), [Record(b"after failover")])
    (late,) = await take(second, 1)

    assert [d.value for d in got] == [r.value for r in records]
    assert late.value == b"after failover"


# -- attempts and dead letters ---------------------------------------------------------


async def test_recorded_failures_raise_the_attempt_and_give_backs_do_not(
    binder: RabbitBinder,
) -> None:
    dest = fresh()
    sub = await binder.subscribe(consumer(dest))
    await binder.publish(producer(dest), [Record(b"m")])

    (first,) = await take(sub, 1, ack=False)
    await sub.record_attempt(first)
    await first.release()
    (second,) = await take(sub, 1, ack=False)
    await second.release()
    (third,) = await take(sub, 1)

    assert [first.attempt, second.attempt, third.attempt] == [1, 2, 2]
    assert first.id == second.id == third.id


async def test_a_record_in_retries_keeps_its_count_and_content_across_subscribers(
    binder: RabbitBinder, raw: Any
) -> None:
    dest = fresh()
    sub = await binder.subscribe(consumer(dest))
    sent = Record(b"body", {"h": b"\xff\x00", "contentType": b"text/plain"}, b"k")
    await binder.publish(producer(dest), [sent])

    (first,) = await take(sub, 1, ack=False)
    await sub.record_attempt(first)  # the record moves to a copy counting 1
    await sub.record_attempt(first)  # ... then 2
    await first.release()  # a give-back keeps the count
    (second,) = await take(sub, 1, ack=False)
    await sub.record_attempt(second)
    await sub.close()  # the subscriber goes while holding the copy
    other = RabbitBinder(RabbitSettings(url=RABBIT_URL))
    await other.start()
    later = await other.subscribe(consumer(dest))
    (third,) = await take(later, 1)
    with pytest.raises(TimeoutError):  # the acked record does not come back
        await asyncio.wait_for(later.next_batch(), 0.5)
    await other.close()

    assert [first.attempt, second.attempt, third.attempt] == [1, 3, 4]
    assert {first.id, second.id, third.id} == {first.id}
    assert (third.value, third.headers, third.key) == (b"body", sent.headers, b"k")
    queue = await raw.declare_queue(f"{dest}.g", passive=True)
    assert queue.declaration_result.message_count == 0


async def test_dead_letters_land_in_the_spring_dlq_with_their_headers(
    binder: RabbitBinder, raw: Any
) -> None:
    dest = fresh()
    spec = consumer(dest, "g")
    await binder.subscribe(spec)
    dead = Record(b"poison", {"x-exception-message": "boom ✗".encode()}, key=b"k")

    await binder.publish_dead_letter(spec, dead)
    reader = await binder.subscribe_dead_letters(spec)
    (got,) = await take(reader, 1)

    assert binder.dead_letter_destination(spec) == f"{dest}.g.dlq"
    assert (got.value, got.headers, got.key) == (b"poison", dead.headers, b"k")
    queue = await raw.declare_queue(f"{dest}.g.dlq", passive=True)
    assert queue.declaration_result.message_count == 0


async def test_a_record_the_broker_dead_letters_lands_in_the_same_dlq(
    binder: RabbitBinder, raw: Any
) -> None:
    dest = fresh()
    spec = consumer(dest, "g")
    await binder.subscribe(spec)
    await binder.close()  # leave the queue to a plain client
    await raw.set_qos(prefetch_count=1)
    queue = await raw.declare_queue(f"{dest}.g", passive=True)
    exchange = await raw.get_exchange(dest)
    await exchange.publish(aio_pika.Message(b"rejected"), routing_key=dest)

    message = await queue.get(timeout=5)
    await message.reject(requeue=False)
    dlq = await raw.declare_queue(f"{dest}.g.dlq", passive=True)
    dead = await dlq.get(timeout=5)

    assert dead.body == b"rejected"
    assert dead.headers["x-death"][0]["queue"] == f"{dest}.g"
    await dead.ack()
