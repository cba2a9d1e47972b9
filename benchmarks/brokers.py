"""The processor job's workload, and one fixture per broker for the benchmark.

A fixture knows, for one broker and one run: how to fill the input destination, how
the same job is written directly on the broker's client (the raw baseline), how
streamkit is configured for it, how many outputs the broker holds, whether the
inputs are settled there, and how to delete what the run created.

Every input is written through the streamkit binder itself (untimed), so the raw
loop and streamkit read byte-identical records in the binder's wire format; the raw
loop writes its outputs in the same format (body, key, ``contentType``).
"""

from __future__ import annotations

import abc
import asyncio
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from streamkit.binder import Binder, ProducerSpec, Record

__all__ = [
    "FIXTURES",
    "Fixture",
    "Order",
    "RunNames",
    "enrich_order",
    "make_record",
]

JSON = b"application/json"
PREFILL_CHUNK = 1_000


# -- the workload -------------------------------------------------------------------


class Order(BaseModel):
    id: int
    customer: str
    sku: str
    quantity: int
    unit_price: float
    currency: str
    status: str
    created_at: str
    tags: list[str]


def make_record(index: int) -> Record:
    """Input ``index``: a JSON order of about 200 bytes, keyed by its customer."""
    customer = f"customer-{index % 100:04d}"
    order = Order(
        id=index,
        customer=customer,
        sku=f"SKU-{index % 9973:06d}-BLUE-XL",
        quantity=1 + index % 7,
        unit_price=round(1.5 + (index % 500) * 0.37, 2),
        currency="EUR",
        status="new",
        created_at="2026-12-03T16:46:19.123456+00:00",
        tags=["web", "priority"],
    )
    return Record(
        order.model_dump_json().encode(),
        {"contentType": JSON},
        customer.encode(),
    )


def enrich_order(order: Order) -> Order:
    """The job's work on one order (the same in the raw loops and in streamkit)."""
    return order.model_copy(update={"status": "enriched"})


def transform(value: bytes) -> bytes:
    """What a raw loop does to one payload: decode, enrich, encode."""
    return enrich_order(Order.model_validate_json(value)).model_dump_json().encode()


@dataclass(frozen=True)
class RunNames:
    """Fresh names of one run: input and output destinations, and the group."""

    run: str

    @property
    def input(self) -> str:
        return f"bench-{self.run}-in"

    @property
    def output(self) -> str:
        return f"bench-{self.run}-out"

    @property
    def group(self) -> str:
        return f"bench-{self.run}"


#: Called by a raw loop when its first batch arrives (the timed window starts).
MarkFirst = Callable[[], None]


class Fixture(abc.ABC):
    """One broker, for one run of one mode."""

    name: str
    #: The inputs must be written by the measuring process itself (the broker
    #: lives in it); otherwise a separate process writes them, so they take no
    #: room in the measured process.
    prefill_in_process = False

    def __init__(self, names: RunNames, count: int, batch: int, prefetch: int) -> None:
        self.names = names
        self.count = count
        self.batch = batch
        self.prefetch = prefetch

    # -- streamkit configuration -------------------------------------------------

    @abc.abstractmethod
    def binder_settings(self) -> dict[str, Any]:
        """The ``binders.bus`` section for streamkit."""

    def producer_options(self) -> dict[str, Any]:
        """Extra keys of the output binding's ``producer`` section."""
        return {}

    @abc.abstractmethod
    def new_binder(self) -> Binder:
        """A binder with the same settings, for prefilling and provisioning."""

    # -- setup (untimed) ---------------------------------------------------------

    async def prefill(self, raw: bool) -> None:
        """Write the ``count`` inputs and provision the output."""
        binder = self.new_binder()
        await binder.start()
        try:
            await self.provision(binder)
            spec = self.input_spec()
            for start in range(0, self.count, PREFILL_CHUNK):
                stop = min(start + PREFILL_CHUNK, self.count)
                await binder.publish(spec, [make_record(i) for i in range(start, stop)])
        finally:
            await binder.close()

    def input_spec(self) -> ProducerSpec:
        return ProducerSpec(self.names.input)

    async def provision(self, binder: Binder) -> None:  # noqa: B027 (optional hook)
        """Declare what must exist before the inputs are written."""

    @abc.abstractmethod
    async def open_observer(self) -> None:
        """Connect the client that counts outputs (before the timed window)."""

    # -- the raw baseline (timed) ------------------------------------------------

    @abc.abstractmethod
    async def run_raw(self, mark_first: MarkFirst) -> None:
        """The job written directly on the client: returns once all ``count``
        outputs are confirmed by the broker and all inputs acknowledged."""

    # -- observation -------------------------------------------------------------

    @abc.abstractmethod
    async def outputs(self) -> int:
        """How many records the broker holds on the output destination."""

    @abc.abstractmethod
    async def settled(self) -> bool:
        """Whether the broker shows every input as acknowledged (where it can)."""

    @abc.abstractmethod
    async def last_output(self) -> bytes | None:
        """The body of one output, to check that the work was done."""

    # -- cleanup -----------------------------------------------------------------

    @abc.abstractmethod
    async def cleanup(self) -> None:
        """Delete what the run created and close the observer."""


# -- memory -------------------------------------------------------------------------


class MemoryFixture(Fixture):
    """The in-memory binder; the raw baseline is a plain asyncio.Queue loop."""

    name = "memory"
    prefill_in_process = True

    def __init__(self, names: RunNames, count: int, batch: int, prefetch: int) -> None:
        super().__init__(names, count, batch, prefetch)
        self.broker = f"bench-{names.run}"
        # The prefill needs room for every input (a publisher waits at buffer_size);
        # the app runs with the binder's defaults (its outputs are trimmed at
        # buffer_size, as a publisher makes room).
        self.buffer_size = max(10_000, count)
        self._inbox: asyncio.Queue[tuple[bytes | None, bytes]] = asyncio.Queue()
        self._outbox: asyncio.Queue[tuple[bytes | None, bytes]] = asyncio.Queue()

    def binder_settings(self) -> dict[str, Any]:
        return {"type": "memory", "broker": self.broker}

    def new_binder(self) -> Binder:
        from streamkit.memory import MemoryBinder, MemorySettings

        settings = MemorySettings(broker=self.broker, buffer_size=self.buffer_size)
        return MemoryBinder(settings, name="prefill")

    async def prefill(self, raw: bool) -> None:
        if not raw:
            await super().prefill(raw)
            return
        for index in range(self.count):
            record = make_record(index)
            assert record.value is not None
            self._inbox.put_nowait((record.key, record.value))

    async def open_observer(self) -> None:
        return None

    async def run_raw(self, mark_first: MarkFirst) -> None:
        inbox, outbox, limit = self._inbox, self._outbox, self.batch
        done = 0
        while done < self.count:
            batch = [await inbox.get()]
            if done == 0:
                mark_first()
            while len(batch) < limit and not inbox.empty():
                batch.append(inbox.get_nowait())
            for key, value in batch:
                outbox.put_nowait((key, transform(value)))
            done += len(batch)

    def _destination(self, name: str) -> Any:
        from streamkit.memory import get_broker

        return get_broker(self.broker).destination(name)

    async def outputs(self) -> int:
        if self._outbox.qsize():
            return self._outbox.qsize()
        end: int = self._destination(self.names.output).partitions[0].end
        return end

    async def settled(self) -> bool:
        if self._outbox.qsize():
            return self._inbox.empty()
        group = self._destination(self.names.input).groups.get(self.names.group)
        return group is not None and group.cursors[0].committed >= self.count

    async def last_output(self) -> bytes | None:
        if self._outbox.qsize():
            newest: bytes = self._outbox._queue[-1][1]  # type: ignore[attr-defined]
            return newest
        part = self._destination(self.names.output).partitions[0]
        if not len(part):
            return None
        value: bytes | None = part.entry(part.end - 1).record.value
        return value

    async def cleanup(self) -> None:
        from streamkit.memory import drop_broker

        drop_broker(self.broker)


# -- Redis --------------------------------------------------------------------------


class RedisFixture(Fixture):
    """Redis Streams: XREADGROUP COUNT, pipelined XADD, XACK after the replies."""

    name = "redis"

    def __init__(self, names: RunNames, count: int, batch: int, prefetch: int) -> None:
        super().__init__(names, count, batch, prefetch)
        self.url = os.environ.get("STREAMKIT_REDIS_URL", "redis://127.0.0.1:6379/0")
        self._observer: Any = None

    def binder_settings(self) -> dict[str, Any]:
        return {"type": "redis", "url": self.url}

    def new_binder(self) -> Binder:
        from streamkit_redis import RedisBinder, RedisSettings

        return RedisBinder(RedisSettings(url=self.url), name="prefill")

    async def open_observer(self) -> None:
        from redis.asyncio import Redis

        self._observer = Redis.from_url(self.url)
        await self._observer.ping()

    async def run_raw(self, mark_first: MarkFirst) -> None:
        from redis.asyncio import Redis

        names = self.names
        client = Redis.from_url(self.url)
        await client.xgroup_create(names.input, names.group, "0", mkstream=True)
        done = 0
        to_ack: list[bytes] = []
        try:
            while done < self.count:
                # redis-py types the reply loosely: [[stream, [(id, fields)]]].
                reply: Any = await client.xreadgroup(
                    names.group, "raw", {names.input: ">"}, count=self.batch, block=1000
                )
                if not reply:
                    continue
                entries = reply[0][1]
                if done == 0:
                    mark_first()
                # The XACKs of the previous batch ride with this batch's XADDs: an
                # input is acknowledged only after its output's XADD was answered.
                async with client.pipeline(transaction=False) as pipe:
                    for _, fields in entries:
                        pipe.xadd(
                            names.output,
                            {
                                b"body": transform(fields[b"body"]),
                                b"key": fields[b"key"],
                                b"h:contentType": JSON,
                            },
                        )
                    if to_ack:
                        pipe.xack(names.input, names.group, *to_ack)
                    await pipe.execute()
                to_ack = [entry_id for entry_id, _ in entries]
                done += len(entries)
            if to_ack:
                await client.xack(names.input, names.group, *to_ack)
        finally:
            await client.aclose()

    async def outputs(self) -> int:
        count: int = await self._observer.xlen(self.names.output)
        return count

    async def settled(self) -> bool:
        groups = await self._observer.xinfo_groups(self.names.input)
        for group in groups:
            name = group["name"]
            if (name.decode() if isinstance(name, bytes) else name) == self.names.group:
                return bool(group["pending"] == 0)
        return False

    async def last_output(self) -> bytes | None:
        entries = await self._observer.xrevrange(self.names.output, count=1)
        return entries[0][1].get(b"body") if entries else None

    async def cleanup(self) -> None:
        names = self.names
        dlq = f"{names.input}.{names.group}.dlq"
        await self._observer.delete(names.input, names.output, dlq)
        await self._observer.aclose()


# -- RabbitMQ -----------------------------------------------------------------------


class RabbitFixture(Fixture):
    """RabbitMQ: consume with prefetch, publish with confirms pipelined, ack after.

    The output exchange gets a queue (``<output>.check``, declared through the
    binder's ``required_groups``) so the broker keeps and counts the outputs.
    """

    name = "rabbit"
    check_group = "check"

    def __init__(self, names: RunNames, count: int, batch: int, prefetch: int) -> None:
        super().__init__(names, count, batch, prefetch)
        self.url = os.environ.get(
            "STREAMKIT_RABBIT_URL", "amqp://guest:guest@127.0.0.1:5672/"
        )
        self._connection: Any = None
        self._channel: Any = None

    def binder_settings(self) -> dict[str, Any]:
        return {"type": "rabbit", "url": self.url}

    def producer_options(self) -> dict[str, Any]:
        return {"required_groups": [self.check_group]}

    def new_binder(self) -> Binder:
        from streamkit_rabbit import RabbitBinder, RabbitSettings

        return RabbitBinder(RabbitSettings(url=self.url), name="prefill")

    def input_spec(self) -> ProducerSpec:
        from streamkit_rabbit import RabbitProducerOptions

        options = RabbitProducerOptions(required_groups=(self.names.group,))
        return ProducerSpec(self.names.input, options=options)

    async def provision(self, binder: Binder) -> None:
        from streamkit_rabbit import RabbitProducerOptions

        options = RabbitProducerOptions(required_groups=(self.check_group,))
        await binder.provision_producer(
            ProducerSpec(self.names.output, options=options)
        )

    @property
    def input_queue(self) -> str:
        return f"{self.names.input}.{self.names.group}"

    @property
    def output_queue(self) -> str:
        return f"{self.names.output}.{self.check_group}"

    async def open_observer(self) -> None:
        import aio_pika

        self._connection = await aio_pika.connect(self.url)
        self._channel = await self._connection.channel()

    async def run_raw(self, mark_first: MarkFirst) -> None:
        import aio_pika
        from aio_pika.abc import AbstractIncomingMessage

        connection = await aio_pika.connect(self.url)
        try:
            consume = await connection.channel()
            await consume.set_qos(prefetch_count=self.prefetch)
            publish = await connection.channel(publisher_confirms=True)
            exchange = await publish.get_exchange(self.names.output, ensure=False)
            queue = await consume.get_queue(self.input_queue, ensure=False)
            inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

            async def on_message(message: AbstractIncomingMessage) -> None:
                inbox.put_nowait(message)

            await queue.consume(on_message)
            await self._raw_loop(inbox, exchange, mark_first)
        finally:
            await connection.close()

    async def _raw_loop(
        self, inbox: asyncio.Queue[Any], exchange: Any, mark_first: MarkFirst
    ) -> None:
        import aio_pika

        routing_key, done = self.names.output, 0
        while done < self.count:
            batch = [await inbox.get()]
            if done == 0:
                mark_first()
            while len(batch) < self.batch and not inbox.empty():
                batch.append(inbox.get_nowait())
            outgoing = [
                aio_pika.Message(
                    transform(message.body),
                    headers={
                        "contentType": "application/json",
                        "streamkit_key": message.headers.get("streamkit_key"),
                    },
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                for message in batch
            ]
            await asyncio.gather(
                *(exchange.publish(m, routing_key=routing_key) for m in outgoing)
            )
            await batch[-1].ack(multiple=True)
            done += len(batch)

    async def _queue_count(self, name: str) -> int:
        queue = await self._channel.declare_queue(name, passive=True)
        count: int = queue.declaration_result.message_count
        return count

    async def outputs(self) -> int:
        return await self._queue_count(self.output_queue)

    async def settled(self) -> bool:
        # Unacknowledged messages are not visible without the management plugin;
        # an empty input queue (nothing ready) is what AMQP itself can tell.
        return await self._queue_count(self.input_queue) == 0

    async def last_output(self) -> bytes | None:
        queue = await self._channel.declare_queue(self.output_queue, passive=True)
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            return None
        await message.reject(requeue=True)
        body: bytes = message.body
        return body

    async def cleanup(self) -> None:
        names = self.names
        queues = (
            self.input_queue,
            f"{self.input_queue}.dlq",
            self.output_queue,
            f"{self.output_queue}.dlq",
        )
        # A channel per deletion: a refused one closes its channel, not the rest.
        for queue in queues:
            await self._on_new_channel(lambda ch, q=queue: ch.queue_delete(q))
        for exchange in (names.input, names.output):
            await self._on_new_channel(lambda ch, e=exchange: ch.exchange_delete(e))
        await self._connection.close()

    async def _on_new_channel(self, action: Callable[[Any], Any]) -> None:
        import aio_pika.exceptions

        channel = await self._connection.channel()
        try:
            await action(channel)
        except aio_pika.exceptions.AMQPError as exc:
            print(f"cleanup: {exc}", file=sys.stderr)
        finally:
            if not channel.is_closed:
                await channel.close()


# -- Kafka --------------------------------------------------------------------------


class KafkaFixture(Fixture):
    """Kafka (Tansu): getmany, a send per record awaited as a batch, commit after."""

    name = "kafka"

    def __init__(self, names: RunNames, count: int, batch: int, prefetch: int) -> None:
        super().__init__(names, count, batch, prefetch)
        self.bootstrap = os.environ["STREAMKIT_KAFKA_BOOTSTRAP"]
        self._ends: Any = None
        self._commits: Any = None
        self._raw_group = ""

    def binder_settings(self) -> dict[str, Any]:
        return {"type": "kafka", "bootstrap_servers": self.bootstrap}

    def new_binder(self) -> Binder:
        from streamkit_kafka import KafkaBinder, KafkaSettings

        return KafkaBinder(KafkaSettings(bootstrap_servers=self.bootstrap), name="pre")

    async def provision(self, binder: Binder) -> None:
        await binder.provision_producer(ProducerSpec(self.names.output))

    async def open_observer(self) -> None:
        from aiokafka import AIOKafkaConsumer

        self._ends = AIOKafkaConsumer(bootstrap_servers=self.bootstrap)
        await self._ends.start()
        self._commits = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.names.group,
            enable_auto_commit=False,
        )
        await self._commits.start()

    async def run_raw(self, mark_first: MarkFirst) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        names = self.names
        consumer = AIOKafkaConsumer(
            names.input,
            bootstrap_servers=self.bootstrap,
            group_id=names.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        # The binder's producer defaults: acks=all, linger 5 ms, no idempotence.
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", linger_ms=5
        )
        await producer.start()
        await consumer.start()
        try:
            await self._raw_loop(consumer, producer, mark_first)
        finally:
            await consumer.stop()
            await producer.stop()

    async def _raw_loop(
        self, consumer: Any, producer: Any, mark_first: MarkFirst
    ) -> None:
        topic, done = self.names.output, 0
        headers = [("contentType", JSON)]
        while done < self.count:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=self.batch)
            if not fetched:
                continue
            if done == 0:
                mark_first()
            futures = []
            for records in fetched.values():
                for record in records:
                    futures.append(
                        await producer.send(
                            topic,
                            transform(record.value),
                            key=record.key,
                            headers=headers,
                        )
                    )
            await asyncio.gather(*futures)
            await consumer.commit()
            done += len(futures)

    def _tp(self, topic: str) -> Any:
        from aiokafka import TopicPartition

        return TopicPartition(topic, 0)

    async def outputs(self) -> int:
        # Tansu 0.6 answers ListOffsets(latest) with the base offset of the last
        # record batch plus one, not the log end; reading from there finds the
        # offset of the last record, whose successor is the record count.
        tp = self._tp(self.names.output)
        listed = (await self._ends.end_offsets([tp]))[tp]
        if not listed:
            return 0
        records = await self._read_from(tp, listed - 1)
        count: int = records[-1].offset + 1 if records else listed
        return count

    async def _read_from(self, tp: Any, offset: int) -> list[Any]:
        if self._ends.assignment() != {tp}:
            self._ends.assign([tp])
        self._ends.seek(tp, offset)
        fetched = await self._ends.getmany(tp, timeout_ms=1000)
        records: list[Any] = fetched.get(tp, [])
        return records

    async def settled(self) -> bool:
        committed = await self._commits.committed(self._tp(self.names.input))
        return committed is not None and committed >= self.count

    async def last_output(self) -> bytes | None:
        tp = self._tp(self.names.output)
        end = await self.outputs()
        records = await self._read_from(tp, end - 1) if end else []
        value: bytes | None = records[-1].value if records else None
        return value

    async def cleanup(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        await self._ends.stop()
        await self._commits.stop()
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([self.names.input, self.names.output])
        finally:
            await admin.close()


FIXTURES: dict[str, type[Fixture]] = {
    f.name: f for f in (MemoryFixture, RedisFixture, RabbitFixture, KafkaFixture)
}
