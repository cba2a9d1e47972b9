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
import contextlib
import logging
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    TopicPartition,
)
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata
from pydantic import BaseModel

from streamkit.binder import (
    Binder,
    Capabilities,
    ConsumerSpec,
    Delivery,
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

from .offsets import PartitionTracker, decode_failures
from .settings import KafkaConsumerOptions, KafkaProducerOptions, KafkaSettings

__all__ = ["KafkaBinder", "KafkaSubscription"]

logger = logging.getLogger(__name__)

# Kafka error codes of a CreateTopics reply that this module acts on.
_TOPIC_ALREADY_EXISTS = kafka_errors.TopicAlreadyExistsError.errno
_HEALTH_TIMEOUT = 5.0

Fetched = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


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
            await _quietly(producer.stop())
            await _quietly(admin.close())
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
            await _quietly(producer.stop())
        if admin is not None:
            await _quietly(admin.close())
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
            "acks": s.acks,
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
        await self._provision_topic(spec.destination, spec.partition_count, spec.options)

    async def _provision_topic(
        self, topic: str, partitions: int, options: BaseModel | None = None
    ) -> int:
        """Make sure ``topic`` exists with at least ``partitions``; its partition count."""
        wanted = max(partitions, self.settings.min_partition_count)
        known = self._topics.get(topic)
        if known is not None and known >= wanted:
            return known
        async with self._provision_lock:
            known = self._topics.get(topic)
            if known is None or known < wanted:
                known = await self._create_or_grow(topic, wanted, options)
                self._topics[topic] = known
        return known

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
        replication, config = self.settings.replication_factor, self.settings.topic_config
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
        await self._provision_topic(spec.destination, spec.partition_count, spec.options)
        timeout = self.settings.delivery_timeout_ms / 1000
        futures: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout(timeout):
                for record in records:
                    futures.append(await self._send(producer, spec.destination, record))
                await asyncio.gather(*futures)
        except TimeoutError as exc:
            raise PublishTimeout(
                f"Kafka did not acknowledge {len(records)} record(s) for topic "
                f"{spec.destination!r} within delivery_timeout_ms="
                f"{self.settings.delivery_timeout_ms}; is {self.settings.servers()} "
                "up?"
            ) from exc
        except (kafka_errors.KafkaError, AssertionError) as exc:
            raise _translate(exc, f"publishing to topic {spec.destination!r}") from exc
        finally:
            _retrieve_exceptions(futures)
        logger.debug(
            "Published %d record(s) to %r",
            len(records),
            spec.destination,
            extra={"destination": spec.destination, "binding": spec.binding},
        )

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

    # -- consume ---------------------------------------------------------------------

    async def subscribe(self, spec: ConsumerSpec) -> Subscription:
        self._require_started()
        partitions = await self._provision_topic(spec.destination, spec.partition_count)
        subscription = KafkaSubscription(self, spec, partitions)
        await subscription.start()
        self._subscriptions.add(subscription)
        return subscription

    def _forget(self, subscription: KafkaSubscription) -> None:
        self._subscriptions.discard(subscription)

    # -- dead letters ----------------------------------------------------------------

    def dead_letter_destination(self, spec: ConsumerSpec) -> str:
        options = spec.options
        if isinstance(options, KafkaConsumerOptions) and options.dead_letter_topic:
            return options.dead_letter_topic
        return f"error.{spec.destination}.{spec.group or 'anonymous'}"

    async def publish_dead_letter(self, spec: ConsumerSpec, record: Record) -> None:
        source_partitions = self._topics.get(spec.destination, spec.partition_count)
        topic = self.dead_letter_destination(spec)
        partitions = await self._provision_topic(topic, source_partitions)
        partition = _source_partition(record)
        if partition is not None and partition >= partitions:
            partition = None
        dead_letter = Record(record.value, dict(record.headers), record.key, partition)
        await self.publish(ProducerSpec(topic, partitions), [dead_letter])


class KafkaSubscription(Subscription, ConsumerRebalanceListener):  # type: ignore[misc]
    """One aiokafka consumer: a group member, or an anonymous reader of all partitions."""

    def __init__(self, binder: KafkaBinder, spec: ConsumerSpec, partitions: int) -> None:
        self.spec = spec
        self._binder = binder
        self._settings = binder.settings
        self._partitions = partitions
        self._consumer = AIOKafkaConsumer(**self._consumer_kwargs())
        self._trackers: dict[TopicPartition, PartitionTracker] = {}
        self._paused: set[TopicPartition] = set()
        self._settled = asyncio.Event()
        self._commit_due = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._uncommitted = 0
        self._committer: asyncio.Task[None] | None = None
        self._fetch: asyncio.Task[Fetched] | None = None
        self._closed = False
        self._close_done: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return (
            f"KafkaSubscription(topic={self.spec.destination!r}, "
            f"group={self.spec.group!r})"
        )

    @property
    def _log_extra(self) -> dict[str, Any]:
        return {"destination": self.spec.destination, "binding": self.spec.binding}

    # -- lifecycle -------------------------------------------------------------------

    def _consumer_kwargs(self) -> dict[str, Any]:
        s, spec = self._settings, self.spec
        options = spec.options
        if not isinstance(options, KafkaConsumerOptions):
            options = KafkaConsumerOptions()
        anonymous = spec.group is None
        return {
            **s.client_kwargs(),
            "group_id": spec.group,
            "enable_auto_commit": False,
            "auto_offset_reset": "latest" if anonymous else spec.start_from,
            "session_timeout_ms": options.session_timeout_ms or s.session_timeout_ms,
            "heartbeat_interval_ms": (
                options.heartbeat_interval_ms or s.heartbeat_interval_ms
            ),
            "max_poll_interval_ms": (
                options.max_poll_interval_ms or s.max_poll_interval_ms
            ),
            "fetch_max_wait_ms": s.fetch_max_wait_ms,
            "max_partition_fetch_bytes": s.max_partition_fetch_bytes,
            "isolation_level": options.isolation_level,
        }

    async def start(self) -> None:
        topic = self.spec.destination
        try:
            if self.spec.group is None:
                await self._start_anonymous(topic)
            else:
                # start() returns after the first assignment (the listener ran).
                self._consumer.subscribe([topic], listener=self)
                await self._consumer.start()
                if self.spec.start_from == "latest":
                    await self._pin_to_log_end(await self._uncommitted_partitions())
        except (kafka_errors.KafkaError, OSError) as exc:
            await _quietly(self._consumer.stop())
            raise _translate(exc, f"subscribing to topic {topic!r}") from exc
        if self.spec.group is not None:
            self._committer = asyncio.create_task(
                self._commit_loop(), name=f"streamkit-kafka-commit-{topic}"
            )
        logger.info(
            "Subscribed to Kafka topic %r (group %r, partitions %s)",
            topic,
            self.spec.group,
            sorted(tp.partition for tp in self._trackers),
            extra=self._log_extra,
        )

    async def _start_anonymous(self, topic: str) -> None:
        partitions = [TopicPartition(topic, p) for p in range(self._partitions)]
        await self._consumer.start()
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        await self._pin_to_log_end(partitions)
        for tp in partitions:
            self._trackers[tp] = PartitionTracker(tp.partition)

    async def _uncommitted_partitions(self) -> list[TopicPartition]:
        partitions = []
        for tp in self._consumer.assignment():
            if await self._consumer.committed(tp) is None:
                partitions.append(tp)
        return partitions

    async def _pin_to_log_end(self, partitions: list[TopicPartition]) -> None:
        """Fix the start of ``partitions`` at the log end as of now.

        aiokafka resets offsets lazily; resolving them here makes "latest" mean the
        end at subscribe(), so a record published right after is seen. Tansu
        answers ListOffsets(latest) with the last batch's base offset + 1, which can
        lie inside that batch; a fetch's high watermark is right, so one fetch
        (at most ``fetch_max_wait_ms``) moves the start past the old batch.
        """
        if not partitions:
            return
        for tp in partitions:
            await self._consumer.position(tp)
        deadline = asyncio.get_running_loop().time() + self._settings.request_timeout_ms / 1000
        while asyncio.get_running_loop().time() < deadline and any(
            self._consumer.highwater(tp) is None for tp in partitions
        ):
            # Records returned here were published before subscribe() returned.
            await self._consumer.getmany(*partitions, timeout_ms=100)
        for tp in partitions:
            end = self._consumer.highwater(tp)
            if end is not None and end > await self._consumer.position(tp):
                self._consumer.seek(tp, end)

    async def close(self) -> None:
        if self._close_done is not None:
            await asyncio.shield(self._close_done)
            return
        self._close_done = asyncio.get_running_loop().create_future()
        self._closed = True
        self._settled.set()
        try:
            if self._fetch is not None:
                self._fetch.cancel()
            if self._committer is not None:
                self._committer.cancel()
                await asyncio.wait([self._committer])
            if self.spec.group is not None:
                await self._commit_quietly(list(self._trackers.values()))
            await _quietly(self._consumer.stop())
            self._binder._forget(self)
            logger.info(
                "Closed subscription to Kafka topic %r (group %r)",
                self.spec.destination,
                self.spec.group,
                extra=self._log_extra,
            )
        finally:
            self._close_done.set_result(None)

    # -- consume ---------------------------------------------------------------------

    async def next_batch(self) -> list[Delivery] | None:
        while not self._closed:
            await self._wait_for_room()
            room = min(self.spec.batch_size, self.spec.prefetch - self._in_flight())
            if self._closed or room <= 0:
                continue
            fetched = await self._fetch_records(room)
            if self._closed:
                break
            batch = self._accept(fetched)
            if batch:
                return batch
        return None

    async def _fetch_records(self, room: int) -> Fetched:
        # The fetch runs as its own task so that close() can cancel it: aiokafka
        # hands records over only when getmany() returns, so a cancelled fetch
        # takes nothing from its buffer and loses nothing.
        fetch = asyncio.create_task(
            self._consumer.getmany(timeout_ms=1000, max_records=room)
        )
        self._fetch = fetch
        try:
            return await fetch
        except asyncio.CancelledError:
            if not self._rewind(fetch) and self._closed:
                return {}
            raise
        except kafka_errors.ConsumerStoppedError:
            return {}
        except kafka_errors.KafkaError as exc:
            # aiokafka reconnects by itself; report and keep polling.
            logger.warning(
                "Fetching from Kafka topic %r failed: %r",
                self.spec.destination,
                exc,
                extra=self._log_extra,
            )
            await asyncio.sleep(0.5)
            return {}
        finally:
            self._fetch = None

    def _rewind(self, fetch: asyncio.Task[Fetched]) -> bool:
        """Undo a fetch whose reader was cancelled; ``True`` if records were taken.

        When the fetch finished in the same loop turn as the cancellation, aiokafka
        already advanced the positions past records nobody will see; seeking back to
        the first of them hands them out again.
        """
        if not fetch.done():
            fetch.cancel()
            return False
        if fetch.cancelled() or fetch.exception() is not None:
            return False
        fetched = fetch.result()
        for tp, records in fetched.items():
            if records and tp in self._trackers:
                with contextlib.suppress(kafka_errors.IllegalStateError):
                    self._consumer.seek(tp, records[0].offset)
        return bool(fetched)

    def _accept(self, fetched: Fetched) -> list[Delivery]:
        batch: list[Delivery] = []
        for tp, records in fetched.items():
            tracker = self._trackers.get(tp)
            if tracker is None or tracker.revoked:
                continue
            for record in records:
                attempt = tracker.accept(record.offset)
                if attempt is not None:
                    batch.append(self._delivery(tp, tracker, record, attempt))
            if tracker.window >= self._settings.max_uncommitted_per_partition:
                self._pause(tp)
        if batch:
            logger.debug(
                "Fetched %d record(s) from %r",
                len(batch),
                self.spec.destination,
                extra=self._log_extra,
            )
        return batch

    def _delivery(
        self,
        tp: TopicPartition,
        tracker: PartitionTracker,
        record: ConsumerRecord,
        attempt: int,
    ) -> Delivery:
        headers = {name: value or b"" for name, value in record.headers}
        return Delivery(
            value=record.value,
            headers=headers,
            key=record.key,
            partition=tp.partition,
            id=f"{tp.partition}@{record.offset}",
            destination=tp.topic,
            subscription=self,
            attempt=attempt,
            token=(tracker, record.offset),
        )

    def _in_flight(self) -> int:
        return sum(t.in_flight for t in self._trackers.values())

    async def _wait_for_room(self) -> None:
        while not self._closed and self._in_flight() >= self.spec.prefetch:
            self._settled.clear()
            await self._settled.wait()

    def _pause(self, tp: TopicPartition) -> None:
        # A record stuck at the head of a partition holds its commit back; past
        # this many tracked records the partition waits instead of growing memory.
        if tp not in self._paused:
            self._paused.add(tp)
            self._consumer.pause(tp)
            logger.info(
                "Pausing %s: %d records wait behind an unsettled one",
                tp,
                self._trackers[tp].window,
                extra=self._log_extra,
            )

    def _maybe_resume(self, tracker: PartitionTracker) -> None:
        limit = self._settings.max_uncommitted_per_partition
        tp = self._tp(tracker)
        if tp in self._paused and tracker.window < limit // 2:
            self._paused.discard(tp)
            with contextlib.suppress(kafka_errors.IllegalStateError):
                self._consumer.resume(tp)

    # -- settle ----------------------------------------------------------------------

    async def ack(self, delivery: Delivery) -> None:
        tracker = self._live_tracker(delivery)
        if tracker is None:
            return
        _, offset = delivery.token
        if tracker.ack(offset):
            self._maybe_resume(tracker)
        self._uncommitted += 1
        if self._uncommitted >= self._settings.commit_batch_size:
            self._commit_due.set()
        self._settled.set()

    async def release(self, delivery: Delivery) -> None:
        tracker = self._live_tracker(delivery)
        if tracker is None:
            return
        _, offset = delivery.token
        seek_to = tracker.release(offset)
        if seek_to is not None:
            with contextlib.suppress(kafka_errors.IllegalStateError):
                self._consumer.seek(self._tp(tracker), seek_to)
        logger.debug(
            "Released %s of %r", delivery.id, self.spec.destination, extra=self._log_extra
        )
        self._settled.set()

    async def record_attempt(self, delivery: Delivery) -> None:
        tracker = self._live_tracker(delivery)
        if tracker is None:
            return
        _, offset = delivery.token
        if tracker.record_failure(offset) and self.spec.group is not None:
            # Written now, before the backoff: a crash during it must not reset the
            # count. The count rides in the commit metadata of the partition.
            await self._commit_quietly([tracker])

    def _live_tracker(self, delivery: Delivery) -> PartitionTracker | None:
        if self._closed:
            return None
        tracker: PartitionTracker = delivery.token[0]
        if tracker.revoked:
            # The partition moved to another member; it re-reads from the last
            # commit, so this settle has nothing left to do here.
            logger.debug(
                "Ignoring settle of %s: partition revoked", delivery.id,
                extra=self._log_extra,
            )  # fmt: skip
            return None
        return tracker

    async def _commit_loop(self) -> None:
        interval = self._settings.commit_interval_ms / 1000
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._commit_due.wait()
            self._commit_due.clear()
            await self._commit_quietly(list(self._trackers.values()))

    async def _commit_quietly(self, trackers: list[PartitionTracker]) -> None:
        """Commit the settled prefix of ``trackers``; failures are logged, not raised.

        A commit that fails is not lost work: the offsets stay uncommitted and the
        records are delivered again, which at-least-once allows.
        """
        async with self._commit_lock:
            due = self._committable(trackers)
            if not due:
                return
            self._uncommitted = 0
            offsets = {
                self._tp(t): OffsetAndMetadata(offset, t.metadata()) for t, offset in due
            }
            for tracker, _ in due:
                tracker.metadata_dirty = False
            try:
                await self._consumer.commit(offsets)
            except (
                kafka_errors.CommitFailedError,
                kafka_errors.IllegalStateError,
                kafka_errors.RebalanceInProgressError,
            ) as exc:
                logger.info(
                    "Dropped a commit for partitions %s of %r: the group rebalanced "
                    "(%r); their next owner re-reads from the last commit",
                    sorted(t.partition for t, _ in due),
                    self.spec.destination,
                    exc,
                    extra=self._log_extra,
                )
                return
            except kafka_errors.KafkaError as exc:
                logger.warning(
                    "Committing offsets of %r failed (%r); retrying later",
                    self.spec.destination,
                    exc,
                    extra=self._log_extra,
                )
                for tracker, _ in due:
                    tracker.metadata_dirty = True
                return
            for tracker, offset in due:
                tracker.committed = offset
        logger.debug(
            "Committed %s", {t.partition: offset for t, offset in due},
            extra=self._log_extra,
        )  # fmt: skip

    def _committable(
        self, trackers: list[PartitionTracker]
    ) -> list[tuple[PartitionTracker, int]]:
        owned = self._consumer.assignment()
        due: list[tuple[PartitionTracker, int]] = []
        for tracker in trackers:
            offset = tracker.pending_commit()
            if offset is None or tracker.revoked:
                continue
            if self._tp(tracker) not in owned:
                logger.info(
                    "Dropped the commit of %s at offset %d: partition no longer owned",
                    self._tp(tracker), offset,
                    extra=self._log_extra,
                )  # fmt: skip
                continue
            due.append((tracker, offset))
        return due

    def _tp(self, tracker: PartitionTracker) -> TopicPartition:
        return TopicPartition(self.spec.destination, tracker.partition)

    async def _committed_metadata(
        self, partitions: set[TopicPartition]
    ) -> dict[TopicPartition, str]:
        """The metadata strings of the group's commits (failure counts).

        aiokafka's public ``committed()`` returns the offset only, so this asks the
        group coordinator the same way it does. Brokers that do not keep commit
        metadata (Tansu) answer empty strings: counts then restart at 1.
        """
        timeout = self._settings.request_timeout_ms / 1000
        try:
            async with asyncio.timeout(timeout):
                found = await self._consumer._coordinator.fetch_committed_offsets(
                    list(partitions)
                )
        except (TimeoutError, kafka_errors.KafkaError) as exc:
            logger.warning(
                "Reading committed offsets of %r failed (%r); attempt counts restart",
                self.spec.destination,
                exc,
                extra=self._log_extra,
            )
            return {}
        return {tp: meta.metadata for tp, meta in found.items() if meta.metadata}

    # -- rebalance (ConsumerRebalanceListener) -----------------------------------------

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        trackers = [self._trackers[tp] for tp in revoked if tp in self._trackers]
        if not trackers:
            return
        timeout = self._settings.revocation_timeout_ms / 1000
        try:
            async with asyncio.timeout(timeout):
                while sum(t.in_flight for t in trackers) and not self._closed:
                    self._settled.clear()
                    await self._settled.wait()
        except TimeoutError:
            logger.warning(
                "%d record(s) of revoked partitions %s still in flight after %.1f s; "
                "their new owner will deliver them again",
                sum(t.in_flight for t in trackers),
                sorted(t.partition for t in trackers),
                timeout,
                extra=self._log_extra,
            )
        if not self._closed:
            await self._commit_quietly(trackers)
        for tracker in trackers:
            tracker.revoked = True
        for tp in revoked:
            self._trackers.pop(tp, None)
            self._paused.discard(tp)
        self._settled.set()
        logger.info(
            "Partitions %s of %r revoked",
            sorted(t.partition for t in trackers),
            self.spec.destination,
            extra=self._log_extra,
        )

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        committed = await self._committed_metadata(assigned)
        for tp in assigned:
            self._trackers[tp] = PartitionTracker(
                tp.partition, decode_failures(committed.get(tp))
            )
        logger.info(
            "Partitions %s of %r assigned (group %r)",
            sorted(tp.partition for tp in assigned),
            self.spec.destination,
            self.spec.group,
            extra=self._log_extra,
        )


# -- error mapping -----------------------------------------------------------------------


def _translate(exc: BaseException, action: str) -> StreamkitError:
    """The streamkit error for an aiokafka failure while doing ``action``."""
    if isinstance(exc, StreamkitError):
        return exc
    if isinstance(
        exc, kafka_errors.MessageSizeTooLargeError | kafka_errors.RecordTooLargeError
    ):
        return MessageTooLarge(
            f"Kafka refused a record {action} as too large ({exc}); raise "
            "max_message_bytes and the broker's message.max.bytes, or send less."
        )
    if isinstance(exc, kafka_errors.KafkaTimeoutError | kafka_errors.RequestTimedOutError):
        return PublishTimeout(f"Kafka timed out {action}: {exc}")
    if isinstance(exc, AssertionError):
        # aiokafka asserts that an explicit partition exists on the topic.
        return PublishError(f"Kafka refused {action}: {exc or 'unknown partition'}")
    if isinstance(
        exc, kafka_errors.KafkaConnectionError | kafka_errors.NodeNotReadyError | OSError
    ):
        if action.startswith("publishing"):
            return PublishError(f"Kafka connection lost {action}: {exc}")
        return BrokerUnavailable(f"Kafka connection failed {action}: {exc}")
    if action.startswith("publishing"):
        return PublishError(f"Kafka failed {action}: {exc!r}")
    return BinderError(f"Kafka failed {action}: {exc!r}")


# -- helpers ------------------------------------------------------------------------------


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
            future.add_done_callback(
                lambda f: None if f.cancelled() else f.exception()
            )


async def _quietly(awaitable: Awaitable[Any]) -> None:
    try:
        await awaitable
    except Exception as exc:
        logger.debug("Ignored while closing: %r", exc)
