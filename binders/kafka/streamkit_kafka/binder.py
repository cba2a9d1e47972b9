"""The Kafka binder: topics, consumer groups and offset commits through aiokafka.

Mapping (see README.md for the whole story):

* destination -> topic; group -> consumer group; partitions -> native partitions.
* An anonymous subscriber (no group) joins no group at all: it is assigned every
  partition of the topic, starts at the log end and commits nothing.
* ack -> the partition's committed offset moves to the first unsettled record
  (:mod:`streamkit_kafka.offsets`); commits are batched by time and count, and
  flushed on revocation and close.
* release -> the partition is sought back to the released record.
* dead letters -> topic ``error.<destination>.<group>``, same partition as the
  source record where the dead-letter topic has it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]
from aiokafka import errors as kafka_errors
from aiokafka.admin import (  # type: ignore[import-untyped]
    AIOKafkaAdminClient,
    NewPartitions,
    NewTopic,
)
from pydantic import BaseModel

from streamkit.binder import (
    Binder,
    Capabilities,
    ConsumerSpec,
    Health,
    HealthStatus,
    ProducerSpec,
    Record,
    Subscription,
)
from streamkit.errors import (
    BinderError,
    BrokerUnavailable,
    MessageTooLarge,
    PublishError,
    PublishTimeout,
    StreamkitError,
)

from .settings import KafkaConsumerOptions, KafkaProducerOptions, KafkaSettings
from .subscription import KafkaSubscription, quietly

__all__ = ["KafkaBinder"]

logger = logging.getLogger(__name__)

# Kafka error codes of a CreateTopics reply that this module acts on.
_TOPIC_ALREADY_EXISTS = kafka_errors.TopicAlreadyExistsError.errno
# A health probe answers within this even when the broker hangs (as Redis's ping).
_HEALTH_TIMEOUT = 1.5


class KafkaBinder(Binder):
    """Binds streamkit destinations to Kafka topics."""

    type_name = "kafka"
    capabilities = Capabilities(
        consumer_groups=True,
        broadcast=True,
        persistence=True,
        replay_for_new_group=True,
        ordering=True,
        # Failure counts ride in the offset commit metadata, which Apache Kafka
        # keeps (Tansu does not; see README.md).
        native_delivery_count=True,
        # Session timeout (10 s by default) plus a rebalance; see README.md.
        crash_recovery_seconds=30.0,
        lease_extension=False,
        broker_restart=False,
        batch=True,
        native_dlq=False,
        delayed_delivery=False,
        max_message_bytes=1_000_000,
    )
    settings_model = KafkaSettings
    consumer_options_model = KafkaConsumerOptions
    producer_options_model = KafkaProducerOptions

    settings: KafkaSettings

    def __init__(self, settings: BaseModel | None = None, *, name: str = "") -> None:
        super().__init__(settings, name=name)
        self._producer: AIOKafkaProducer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._topics: dict[str, int] = {}
        # The most partitions asked for per topic, so that a topic that cannot grow
        # is not asked again on every publish; and the topics already warned about
        # records folded onto fewer partitions.
        self._asked: dict[str, int] = {}
        self._folded: set[str] = set()
        self._provision_lock = asyncio.Lock()
        self._subscriptions: set[KafkaSubscription] = set()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"KafkaBinder(name={self.name!r}, "
            f"bootstrap_servers={self.settings.servers()!r})"
        )

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._producer is not None:
            return
        self._closed = False
        producer = AIOKafkaProducer(**self._producer_kwargs())
        admin = AIOKafkaAdminClient(**self.settings.client_kwargs())
        try:
            await producer.start()
            await admin.start()
        except (kafka_errors.KafkaError, OSError) as exc:
            await quietly(producer.stop())
            await quietly(admin.close())
            raise BrokerUnavailable(
                f"Cannot reach Kafka at {self.settings.servers()} "
                f"(binder {self.name!r}): {exc}. Check binders.{self.name}."
                "bootstrap_servers and that the broker is running."
            ) from exc
        self._producer, self._admin = producer, admin
        logger.info(
            "Kafka binder %r connected to %s", self.name, self.settings.servers()
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(s.close() for s in list(self._subscriptions)))
        producer, admin = self._producer, self._admin
        self._producer = self._admin = None
        if producer is not None:
            # stop() flushes what send() accepted before closing the connection.
            await quietly(producer.stop())
        if admin is not None:
            await quietly(admin.close())
        logger.info("Kafka binder %r closed", self.name)

    async def health(self) -> Health:
        admin = self._admin
        if admin is None:
            return Health(HealthStatus.DOWN, "binder not started")
        try:
            async with asyncio.timeout(_HEALTH_TIMEOUT):
                cluster = await admin.describe_cluster()
        except (TimeoutError, kafka_errors.KafkaError, OSError) as exc:
            return Health(
                HealthStatus.DOWN,
                f"Kafka at {self.settings.servers()} does not answer: {exc!r}",
            )
        brokers = len(cluster.get("brokers", []))
        return Health(HealthStatus.UP, f"{brokers} broker(s) answering")

    def _producer_kwargs(self) -> dict[str, Any]:
        s = self.settings
        return {
            **s.client_kwargs(),
            # aiokafka expires a batch that waited this long for the broker, which
            # makes it the delivery timeout, and the longest a close() flushes.
            "request_timeout_ms": s.delivery_timeout_ms,
            "acks": s.acks_value(),
            "linger_ms": s.linger_ms,
            "max_batch_size": s.max_batch_size,
            "max_request_size": s.max_request_size(),
            "compression_type": s.compression_type,
            "enable_idempotence": s.enable_idempotence,
        }

    def _require_started(self) -> tuple[AIOKafkaProducer, AIOKafkaAdminClient]:
        if self._producer is None or self._admin is None:
            raise BinderError(
                f"Kafka binder {self.name!r} is not started; call start() first."
            )
        return self._producer, self._admin

    # -- provisioning ----------------------------------------------------------------

    async def provision_producer(self, spec: ProducerSpec) -> None:
        await self._provision_topic(
            spec.destination, spec.partition_count, spec.options
        )

    async def _provision_topic(
        self, topic: str, partitions: int, options: BaseModel | None = None
    ) -> int:
        """Make sure ``topic`` has at least ``partitions``; its partition count."""
        wanted = max(partitions, self.settings.min_partition_count)
        known = self._topics.get(topic)
        if known is not None and wanted <= max(known, self._asked.get(topic, 0)):
            return known
        async with self._provision_lock:
            known = self._topics.get(topic)
            if known is None or wanted > max(known, self._asked.get(topic, 0)):
                known = await self._create_or_grow(topic, wanted, options)
                self._topics[topic] = known
                self._asked[topic] = max(wanted, self._asked.get(topic, 0))
        return known

    def dead_letter_destination(self, spec: ConsumerSpec) -> str:
        options = spec.options
        if isinstance(options, KafkaConsumerOptions) and options.dead_letter_topic:
            return options.dead_letter_topic
        return f"error.{spec.destination}.{spec.group or 'anonymous'}"

    async def _create_or_grow(
        self, topic: str, wanted: int, options: BaseModel | None
    ) -> int:
        _, admin = self._require_started()
        try:
            existing = await self._existing_partitions(admin, topic)
            if existing is None:
                existing = await self._create_topic(admin, topic, wanted, options)
            if existing < wanted:
                existing = await self._add_partitions(admin, topic, existing, wanted)
        except kafka_errors.KafkaError as exc:
            raise _translate(exc, f"provisioning topic {topic!r}") from exc
        return existing

    async def _existing_partitions(
        self, admin: AIOKafkaAdminClient, topic: str
    ) -> int | None:
        # A metadata request for a missing topic makes brokers with
        # auto.create.topics.enable create it with their default partition count,
        # so ask for the topic list first and describe only what exists.
        if topic not in await admin.list_topics():
            return None
        return await self._describe_partitions(admin, topic)

    async def _describe_partitions(self, admin: AIOKafkaAdminClient, topic: str) -> int:
        (description,) = await admin.describe_topics([topic])
        code = description["error_code"]
        if code:
            raise kafka_errors.for_code(code)(f"describing topic {topic!r}")
        return len(description["partitions"])

    async def _create_topic(
        self,
        admin: AIOKafkaAdminClient,
        topic: str,
        partitions: int,
        options: BaseModel | None,
    ) -> int:
        if not self.settings.auto_create_topics:
            raise BinderError(
                f"Kafka topic {topic!r} does not exist and binders.{self.name}."
                "auto_create_topics is off; create the topic or turn the setting on."
            )
        replication, config = (
            self.settings.replication_factor,
            self.settings.topic_config,
        )
        if isinstance(options, KafkaProducerOptions):
            replication = options.replication_factor or replication
            config = {**config, **options.topic_config}
        new_topic = NewTopic(topic, partitions, replication, topic_configs=config)
        response = await admin.create_topics([new_topic])
        for name, code, message in response.topic_errors:
            if code == _TOPIC_ALREADY_EXISTS:
                return await self._describe_partitions(admin, name)
            if code:
                raise kafka_errors.for_code(code)(message or f"creating {name!r}")
        logger.info(
            "Created Kafka topic %r (%d partitions, replication factor %d)",
            topic,
            partitions,
            replication,
            extra={"destination": topic},
        )
        return partitions

    async def _add_partitions(
        self, admin: AIOKafkaAdminClient, topic: str, existing: int, wanted: int
    ) -> int:
        if not self.settings.auto_add_partitions:
            logger.warning(
                "Kafka topic %r has %d partitions, %d were asked for; "
                "auto_add_partitions is off, keeping %d",
                topic, existing, wanted, existing,
                extra={"destination": topic},
            )  # fmt: skip
            return existing
        try:
            await admin.create_partitions({topic: NewPartitions(wanted)})
        except kafka_errors.IncompatibleBrokerVersion:
            # Tansu (and very old brokers) do not implement CreatePartitions. Going on
            # with fewer partitions keeps every record flowing; only the spread is lost.
            logger.warning(
                "Kafka topic %r has %d partitions, %d were asked for, and the "
                "broker cannot add partitions; keeping %d",
                topic, existing, wanted, existing,
                extra={"destination": topic},
            )  # fmt: skip
            return existing
        logger.info(
            "Added partitions to Kafka topic %r: %d -> %d",
            topic, existing, wanted,
            extra={"destination": topic},
        )  # fmt: skip
        return wanted

    # -- publish ---------------------------------------------------------------------

    async def publish(self, spec: ProducerSpec, records: Sequence[Record]) -> None:
        producer, _ = self._require_started()
        if not records:
            return
        timeout = self.settings.delivery_timeout_ms / 1000
        futures: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout(timeout):
                actual = await self._provision_topic(
                    spec.destination, spec.partition_count, spec.options
                )
                for record in records:
                    record = self._fold(spec.destination, record, actual)
                    futures.append(await self._send(producer, spec.destination, record))
                await asyncio.gather(*futures)
        except TimeoutError as exc:
            raise PublishTimeout(
                f"Kafka did not acknowledge {len(records)} record(s) for topic "
                f"{spec.destination!r} within delivery_timeout_ms="
                f"{self.settings.delivery_timeout_ms}; is {self.settings.servers()} "
                "up?"
            ) from exc
        except BrokerUnavailable as exc:
            # Provisioning found no broker: to the caller, a publish that failed.
            raise PublishError(str(exc)) from exc
        except (kafka_errors.KafkaError, AssertionError) as exc:
            action = f"publishing to topic {spec.destination!r}"
            raise _translate(exc, action, publishing=True) from exc
        finally:
            _retrieve_exceptions(futures)
        logger.debug(
            "Published %d record(s) to %r",
            len(records),
            spec.destination,
            extra={"destination": spec.destination, "binding": spec.binding},
        )

    def _fold(self, topic: str, record: Record, actual: int) -> Record:
        """``record`` with a partition that exists on ``topic``.

        A topic that could not grow (Tansu, ``auto_add_partitions`` off) has fewer
        partitions than the binding picks from; the broker refuses a record for a
        missing partition, and a retry would be refused forever. Such a record goes
        to ``partition % actual`` instead: ordering per key still holds, only the
        spread is lost.
        """
        partition = record.partition
        if partition is None or partition < actual:
            return record
        if topic not in self._folded:
            self._folded.add(topic)
            logger.warning(
                "Kafka topic %r has %d partition(s), %d were asked for; a record "
                "for a missing partition goes to its partition modulo %d",
                topic, actual, self._asked.get(topic, partition + 1), actual,
                extra={"destination": topic},
            )  # fmt: skip
        return Record(record.value, record.headers, record.key, partition % actual)

    async def _send(
        self, producer: AIOKafkaProducer, topic: str, record: Record
    ) -> asyncio.Future[Any]:
        size = len(record.value or b"") + len(record.key or b"")
        size += sum(len(k) + len(v) for k, v in record.headers.items())
        limit = self.settings.max_message_bytes
        if size > limit:
            raise MessageTooLarge(
                f"A record of {size} bytes for topic {topic!r} exceeds "
                f"binders.{self.name}.max_message_bytes={limit}; nothing was sent. "
                "Raise the setting (and the broker's message.max.bytes) or send "
                "smaller records."
            )
        future: asyncio.Future[Any] = await producer.send(
            topic,
            record.value,
            key=record.key,
            partition=record.partition,
            headers=list(record.headers.items()),
        )
        return future

    async def publish_dead_letter(self, spec: ConsumerSpec, record: Record) -> None:
        source_partitions = self._topics.get(spec.destination, spec.partition_count)
        topic = self.dead_letter_destination(spec)
        partitions = await self._provision_topic(topic, source_partitions)
        partition = _source_partition(record)
        if partition is not None and partition >= partitions:
            partition = None
        dead_letter = Record(record.value, dict(record.headers), record.key, partition)
        await self.publish(ProducerSpec(topic, partitions), [dead_letter])

    # -- consume ---------------------------------------------------------------------

    async def subscribe(self, spec: ConsumerSpec) -> Subscription:
        self._require_started()
        partitions = await self._provision_topic(spec.destination, spec.partition_count)
        subscription = KafkaSubscription(self, spec, partitions)
        try:
            await subscription.start()
        except (kafka_errors.KafkaError, OSError) as exc:
            raise _translate(exc, f"subscribing to topic {spec.destination!r}") from exc
        self._subscriptions.add(subscription)
        return subscription

    async def subscribe_dead_letters(
        self, spec: ConsumerSpec, *, group: str = "dlq-reader"
    ) -> Subscription:
        # Created like publish_dead_letter creates it, with the source's partition
        # count, when the reader comes first.
        partitions = await self._provision_topic(spec.destination, spec.partition_count)
        return await self.subscribe(
            ConsumerSpec(
                self.dead_letter_destination(spec),
                group=group,
                partition_count=partitions,
            )
        )

    def _forget(self, subscription: KafkaSubscription) -> None:
        self._subscriptions.discard(subscription)

    # -- settle ----------------------------------------------------------------------
    # Deliveries are settled on their subscription: see .subscription.


# -- error mapping --------------------------------------------------------------------


def _translate(
    exc: BaseException, action: str, *, publishing: bool = False
) -> StreamkitError:
    """The streamkit error for an aiokafka failure while doing ``action``.

    Publish failures are always a :class:`PublishError`, so that the caller can
    retry the batch; elsewhere an unreachable broker is :class:`BrokerUnavailable`.
    """
    if isinstance(exc, StreamkitError):
        return exc
    if isinstance(
        exc, kafka_errors.MessageSizeTooLargeError | kafka_errors.RecordTooLargeError
    ):
        return MessageTooLarge(
            f"Kafka refused a record {action} as too large ({exc}); raise "
            "max_message_bytes and the broker's message.max.bytes, or send less."
        )
    if isinstance(exc, AssertionError):
        # aiokafka asserts that an explicit partition exists on the topic.
        return PublishError(f"Kafka refused {action}: {exc or 'unknown partition'}")
    unreachable = (
        kafka_errors.KafkaTimeoutError,
        kafka_errors.RequestTimedOutError,
        kafka_errors.KafkaConnectionError,
        kafka_errors.NodeNotReadyError,
        OSError,
    )
    if isinstance(exc, unreachable):
        if publishing:
            timed_out = not isinstance(exc, kafka_errors.KafkaConnectionError | OSError)
            cls = PublishTimeout if timed_out else PublishError
            return cls(f"Kafka did not answer {action}: {exc!r}")
        return BrokerUnavailable(f"Kafka did not answer {action}: {exc!r}")
    if publishing:
        return PublishError(f"Kafka failed {action}: {exc!r}")
    return BinderError(f"Kafka failed {action}: {exc!r}")


# -- helpers --------------------------------------------------------------------------


def _source_partition(record: Record) -> int | None:
    if record.partition is not None:
        return record.partition
    raw = record.headers.get("x-original-partition")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _retrieve_exceptions(futures: Iterable[asyncio.Future[Any]]) -> None:
    # After a failed or timed-out publish the remaining futures may still fail;
    # fetching their exceptions keeps asyncio from reporting them as lost.
    for future in futures:
        if future.done():
            if not future.cancelled():
                future.exception()
        else:
            future.add_done_callback(lambda f: None if f.cancelled() else f.exception())
