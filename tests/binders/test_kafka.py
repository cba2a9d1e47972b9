"""The Kafka binder against a broker: offsets, rebalances, tombstones, dead letters.

The broker is ``$STREAMKIT_KAFKA_BOOTSTRAP`` or a Tansu started for this module
(see :mod:`streamkit_kafka.testing`). Each test uses fresh topic and group names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pydantic import BaseModel

pytest.importorskip("streamkit_kafka")

from streamkit_kafka import KafkaBinder, KafkaSettings
from streamkit_kafka.conformance import TANSU_SETTINGS
from streamkit_kafka.testing import TansuBroker, TansuNotFound, free_port
from streamkit_kafka.testing import kafka_bootstrap as start_kafka

from streamkit import StreamApp
from streamkit.binder import ConsumerSpec, Delivery, ProducerSpec, Record, Subscription
from streamkit.conformance.helpers import (
    Names,
    broker_unreachable,
    collect,
    collect_ids,
    id_of,
    numbered,
)
from streamkit.errors import BrokerUnavailable, PublishError
from streamkit.testing import Recorder, TestStream

TIMEOUT = 20.0


@dataclass(frozen=True)
class Kafka:
    bootstrap: str
    tansu: bool

    def settings(self, **overrides: Any) -> KafkaSettings:
        # The conformance profile's Tansu tuning: quick joins, leave by expiry.
        tansu = TANSU_SETTINGS if self.tansu else {"session_timeout_ms": 6_000}
        values: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            **tansu,
            "commit_interval_ms": 100,
            "fetch_max_wait_ms": 100,
            "revocation_timeout_ms": 2_000,
            **overrides,
        }
        return KafkaSettings(**values)


@pytest.fixture(scope="module")
def kafka() -> Iterator[Kafka]:
    with contextlib.ExitStack() as stack:
        try:
            bootstrap, tansu = stack.enter_context(start_kafka())
        except (TansuNotFound, RuntimeError) as exc:
            broker_unreachable(f"no Kafka to test against: {exc}")
        yield Kafka(bootstrap, tansu)


@pytest_asyncio.fixture
async def binders(kafka: Kafka) -> AsyncIterator[list[KafkaBinder]]:
    made: list[KafkaBinder] = []
    yield made
    for binder in made:
        await binder.close()


async def started(made: list[KafkaBinder], settings: KafkaSettings) -> KafkaBinder:
    binder = KafkaBinder(settings)
    made.append(binder)
    await binder.start()
    return binder


@pytest.fixture
def names() -> Names:
    return Names("skk")


def ids(deliveries: list[Delivery]) -> list[int]:
    return [id_of(d) for d in deliveries]


# -- offsets and restarts (CASES.md C1, C2) --------------------------------------------


async def test_c1_a_record_left_unacked_comes_back_after_restart(
    kafka: Kafka, binders: list[KafkaBinder], names: Names
) -> None:
    binder = await started(binders, kafka.settings())
    dest, group = names.destination(), names.group()
    sub = await binder.subscribe(ConsumerSpec(dest, group=group))
    await binder.publish(ProducerSpec(dest), numbered(4))

    first = await collect(sub, 4, TIMEOUT, ack=False)
    for delivery in first:
        if id_of(delivery) in (1, 3):  # m2 and m4 succeed, m1 and m3 fail
            await delivery.ack()
    await sub.close()
    again = await binder.subscribe(ConsumerSpec(dest, group=group))
    redelivered = await collect_ids(again, {0, 2}, TIMEOUT)

    assert sorted(ids(first)) == [0, 1, 2, 3]
    assert ids(redelivered)[0] == 0  # the commit stopped at m1
    assert {0, 2} <= set(ids(redelivered))


CHILD = """
import asyncio, json, sys
from streamkit_kafka import KafkaBinder, KafkaSettings
from streamkit_kafka.conformance import TANSU_SETTINGS
from streamkit.binder import ConsumerSpec

async def main():
    settings, dest, group, slow = json.loads(sys.argv[1])
    binder = KafkaBinder(KafkaSettings(**settings))
    await binder.start()
    sub = await binder.subscribe(
        ConsumerSpec(dest, group=group, partition_count=2, prefetch=32)
    )
    print("ready", flush=True)

    async def handle(delivery):
        n = int(delivery.headers["sk-id"])
        # The slow ones never finish: the kill comes first.
        await asyncio.sleep(600 if n in slow else (n * 7919 % 13) / 1000)
        await delivery.ack()
        print("acked", n, flush=True)

    tasks = set()
    async for batch in sub:
        for delivery in batch:
            task = asyncio.create_task(handle(delivery))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

asyncio.run(main())
"""


async def _read_acked(
    stdout: asyncio.StreamReader, acked: list[int], enough: int
) -> None:
    while len(acked) < enough:
        line = (await stdout.readline()).decode()
        if not line:
            raise AssertionError("the consumer process ended early")
        if line.startswith("acked"):
            acked.append(int(line.split()[1]))


@pytest.mark.slow
async def test_kill_9_with_out_of_order_completion_loses_nothing(
    kafka: Kafka, binders: list[KafkaBinder], names: Names
) -> None:
    binder = await started(binders, kafka.settings())
    dest, group, total = names.destination(), names.group(), 100
    slow = [24, 49, 74, 99]  # finish never; everything around them finishes
    settings = kafka.settings().model_dump(mode="json")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        json.dumps([settings, dest, group, slow]),
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    try:
        ready = await asyncio.wait_for(child.stdout.readline(), TIMEOUT)
        assert ready.strip() == b"ready"
        records = numbered(total, partition=lambda i: i % 2)
        await binder.publish(ProducerSpec(dest, partition_count=2), records)
        acked: list[int] = []
        await asyncio.wait_for(
            _read_acked(child.stdout, acked, total - len(slow)), TIMEOUT
        )
        await asyncio.sleep(0.5)  # several commit intervals: the commits are in
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGKILL)
        await child.wait()

    survivor = await binder.subscribe(
        ConsumerSpec(dest, group=group, partition_count=2)
    )
    missing = set(range(total)) - set(acked)
    got = await collect_ids(survivor, missing, TIMEOUT * 2)

    assert set(slow) == missing
    assert set(ids(got)) | set(acked) == set(range(total))
    first_slow = {0: 24, 1: 49}
    first_per_partition = {}
    for delivery in got:
        first_per_partition.setdefault(delivery.partition, id_of(delivery))
    # Each partition's commit stopped at its first unfinished record, and at no
    # earlier one: out-of-order completions around it were committed past.
    assert first_per_partition == first_slow
    # Records finished after the first unfinished one of their partition were not
    # committed: they come again, and only they.
    duplicates = set(ids(got)) & set(acked)
    assert duplicates == {
        n for n in range(total) if n not in slow and n > first_slow[n % 2]
    }


# -- rebalances ------------------------------------------------------------------------


async def _consume(
    sub: Subscription, seen: Counter[int], done: asyncio.Event, total: int
) -> None:
    async for batch in sub:
        for delivery in batch:
            await asyncio.sleep(0.001)
            seen[id_of(delivery)] += 1
            await delivery.ack()
        if len(seen) >= total:
            done.set()


async def test_a_second_consumer_joining_loses_nothing_and_duplicates_little(
    kafka: Kafka, binders: list[KafkaBinder], names: Names
) -> None:
    dest, group, total, partitions = names.destination(), names.group(), 400, 4
    spec = ConsumerSpec(dest, group=group, partition_count=partitions)
    producer = await started(binders, kafka.settings())
    first = await (await started(binders, kafka.settings())).subscribe(spec)
    seen: Counter[int] = Counter()
    done = asyncio.Event()
    records = numbered(total, partition=lambda i: i % partitions)
    out = ProducerSpec(dest, partition_count=partitions)

    consumers = [asyncio.create_task(_consume(first, seen, done, total))]
    await binder_publish(producer, out, records[: total // 2])
    second = await (await started(binders, kafka.settings())).subscribe(spec)
    consumers.append(asyncio.create_task(_consume(second, seen, done, total)))
    await binder_publish(producer, out, records[total // 2 :])
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), TIMEOUT)
    for sub in (first, second):
        await sub.close()
    await asyncio.gather(*consumers)

    duplicates = sum(seen.values()) - len(seen)
    logging.getLogger(__name__).info("rebalance duplicates: %d", duplicates)
    assert set(seen) == set(range(total))
    # Revocation waits for in-flight work and commits it: a handful at most.
    assert duplicates <= 64


async def binder_publish(
    binder: KafkaBinder, spec: ProducerSpec, records: list[Record]
) -> None:
    for start in range(0, len(records), 50):
        await binder.publish(spec, records[start : start + 50])


async def test_settles_of_a_revoked_generation_are_ignored_and_records_return(
    kafka: Kafka, binders: list[KafkaBinder], names: Names
) -> None:
    dest, group, total = names.destination(), names.group(), 20
    settings = kafka.settings(revocation_timeout_ms=200)
    first = await (await started(binders, settings)).subscribe(
        ConsumerSpec(dest, group=group)
    )
    await binders[0].publish(ProducerSpec(dest), numbered(total))
    held = await collect(first, total, TIMEOUT, ack=False)

    second = await (await started(binders, settings)).subscribe(
        ConsumerSpec(dest, group=group)
    )
    for delivery in held:  # the partition was revoked under these: no effect
        await delivery.ack()
    seen: Counter[int] = Counter()
    done = asyncio.Event()
    readers = [
        asyncio.create_task(_consume(sub, seen, done, total)) for sub in (first, second)
    ]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), TIMEOUT)
    for sub in (first, second):
        await sub.close()
    await asyncio.gather(*readers)

    assert sorted(ids(held)) == list(range(total))
    assert set(seen) == set(range(total))


# -- tombstones (CASES.md C4) ----------------------------------------------------------


async def test_a_tombstone_arrives_as_a_none_value_with_its_key(
    kafka: Kafka, binders: list[KafkaBinder], names: Names
) -> None:
    binder = await started(binders, kafka.settings())
    dest = names.destination()
    sub = await binder.subscribe(ConsumerSpec(dest, group=names.group()))

    await binder.publish(
        ProducerSpec(dest), [Record(None, {"sk-id": b"0"}, key=b"customer-7")]
    )
    (delivery,) = await collect(sub, 1, TIMEOUT)

    assert delivery.value is None
    assert delivery.key == b"customer-7"
    assert delivery.headers == {"sk-id": b"0"}


class Item(BaseModel):
    id: int


async def test_a_tombstone_is_dead_lettered_once_and_its_neighbours_flow(
    kafka: Kafka, names: Names
) -> None:
    app = StreamApp()
    seen = Recorder()

    @app.consumer
    async def handle(item: Item) -> None:
        seen.add(item.id)

    dest, group = names.destination(), names.group()
    settings = {
        "default_binder": "bus",
        "binders": {
            "bus": {"type": "kafka", **kafka.settings().model_dump(mode="json")}
        },
        "bindings": {"handle-in-0": {"destination": dest, "group": group}},
    }
    async with TestStream(app, settings, use_configured_binders=True) as s:
        await s.send(dest, {"id": 1})
        await s.send(dest, None, raw=True, key="gone")
        await s.send(dest, {"id": 2})
        dead = await s.receive_dead_letter("handle-in-0", timeout=TIMEOUT)
        await seen.wait_count(2, TIMEOUT)
        await s.assert_no_dead_letter("handle-in-0")

    assert seen.items == [1, 2]
    assert dead.payload is None
    assert dead.key == "gone"
    assert dead.headers["x-dlq-reason"] == "decode"


# -- dead letters and provisioning -----------------------------------------------------


async def test_a_dead_letter_keeps_the_partition_of_its_source(
    kafka: Kafka, binders: list[KafkaBinder], names: Names
) -> None:
    binder = await started(binders, kafka.settings())
    dest, group = names.destination(), names.group()
    spec = ConsumerSpec(dest, group=group, partition_count=3)
    await binder.provision_producer(ProducerSpec(dest, partition_count=3))
    sub = await binder.subscribe_dead_letters(spec)  # the reader may come first

    await binder.publish_dead_letter(spec, Record(b"bad", {"sk-id": b"0"}, None, 2))
    (dead,) = await collect(sub, 1, TIMEOUT)

    assert binder.dead_letter_destination(spec) == f"error.{dest}.{group}"
    assert dead.destination == f"error.{dest}.{group}"
    assert dead.partition == 2
    assert dead.value == b"bad"


async def test_asking_for_more_partitions_never_fails(
    kafka: Kafka,
    binders: list[KafkaBinder],
    names: Names,
    caplog: pytest.LogCaptureFixture,
) -> None:
    binder = await started(binders, kafka.settings())
    dest = names.destination()
    await binder.provision_producer(ProducerSpec(dest, partition_count=2))

    with caplog.at_level(logging.WARNING, logger="streamkit_kafka"):
        await binder.publish(ProducerSpec(dest, partition_count=4), numbered(1))

    if kafka.tansu:  # Tansu cannot add partitions: a warning, and 2 stay
        (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert dest in warning.getMessage()
        assert "2 partitions, 4 were asked for" in warning.getMessage()
    sub = await binder.subscribe(ConsumerSpec(dest, group=names.group()))
    assert await collect(sub, 1, TIMEOUT)


# -- connections and settings (CASES.md C11) -------------------------------------------


async def test_with_the_broker_gone_publish_fails_in_time_and_close_returns(
    kafka: Kafka, names: Names, tmp_path: Path
) -> None:
    if not kafka.tansu:
        pytest.skip("stops a broker of its own: needs Tansu")
    broker = TansuBroker(log_dir=tmp_path)
    broker.start()
    settings = kafka.settings(
        bootstrap_servers=broker.bootstrap,
        delivery_timeout_ms=1_500,
        close_timeout_ms=1_500,
    )
    binder = KafkaBinder(settings)
    try:
        await binder.start()
        dest = names.destination()
        sub = await binder.subscribe(ConsumerSpec(dest, group=names.group()))
        await binder.publish(ProducerSpec(dest), numbered(1))
        await collect(sub, 1, TIMEOUT)  # acked: a commit is due at close
        broker.stop()

        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(PublishError):
            await binder.publish(ProducerSpec(dest), numbered(1, start=1))
        took = loop.time() - began
        health = await asyncio.wait_for(binder.health(), 10)
        began = loop.time()
        await asyncio.wait_for(binder.close(), 10)
        closing = loop.time() - began
    finally:
        broker.stop()
        await asyncio.wait_for(binder.close(), 10)

    assert took < 5
    assert not health.ok
    assert closing < 5


async def test_an_unreachable_broker_is_reported_with_its_address() -> None:
    address = f"127.0.0.1:{free_port()}"
    binder = KafkaBinder(KafkaSettings(bootstrap_servers=address))

    with pytest.raises(BrokerUnavailable, match=address):
        await binder.start()
    await binder.close()


def test_printed_settings_never_show_credentials() -> None:
    settings = KafkaSettings(
        bootstrap_servers="broker:9093",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username="svc",
        sasl_plain_password="s3cret-pw",
    )
    binder = KafkaBinder(settings)

    printed = [repr(settings), str(settings), settings.model_dump_json(), repr(binder)]

    assert not [text for text in printed if "s3cret-pw" in text]
    assert settings.client_kwargs()["sasl_plain_password"] == "s3cret-pw"


def test_unknown_settings_are_reported_by_name() -> None:
    with pytest.raises(ValueError, match="bootstrap_server"):
        KafkaSettings(bootstrap_server="localhost:9092")  # type: ignore[call-arg]


async def test_partitioned_output_to_a_topic_with_fewer_partitions_never_jams(
    kafka: Kafka,
    binders: list[KafkaBinder],
    names: Names,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The consumer binding creates the topic with 1 partition first; the producer
    # binding picks among 3. The topic cannot grow (as on Tansu), so records for
    # partitions 1 and 2 must land on partition 0, not be refused forever.
    binder = await started(binders, kafka.settings(auto_add_partitions=False))
    dest = names.destination()
    sub = await binder.subscribe(ConsumerSpec(dest, group=names.group()))
    records = numbered(6, partition=lambda n: n % 3)

    with caplog.at_level(logging.WARNING, logger="streamkit_kafka"):
        spec = ProducerSpec(dest, partition_count=3)
        await asyncio.wait_for(binder.publish(spec, records[:3]), TIMEOUT)
        await asyncio.wait_for(binder.publish(spec, records[3:]), TIMEOUT)

    got = await collect_ids(sub, range(6), TIMEOUT)
    assert sorted(set(ids(got))) == list(range(6))
    folded = [r.getMessage() for r in caplog.records if "modulo" in r.getMessage()]
    assert len(folded) == 1  # one warning per topic, naming both counts
    assert dest in folded[0]
    assert "1 partition(s), 3 were asked for" in folded[0]


async def test_health_answers_within_two_seconds_when_the_broker_hangs(
    kafka: Kafka, tmp_path: Path
) -> None:
    if not kafka.tansu:
        pytest.skip("freezes a broker of its own: needs Tansu")
    broker = TansuBroker(log_dir=tmp_path)
    broker.start()
    binder = KafkaBinder(kafka.settings(bootstrap_servers=broker.bootstrap))
    try:
        await binder.start()
        assert (await binder.health()).ok
        broker.pause()

        loop = asyncio.get_running_loop()
        began = loop.time()
        health = await asyncio.wait_for(binder.health(), 10)
        took = loop.time() - began
        broker.resume()
        recovered = await binder.health()
    finally:
        broker.stop()
        await asyncio.wait_for(binder.close(), 20)

    assert not health.ok
    assert took < 2.5
    assert recovered.ok  # the abandoned probe leaves the admin client usable
