"""One Kafka subscription: an aiokafka consumer and the bookkeeping of its offsets.

A subscription with a group is a member of that consumer group: Kafka assigns it
partitions, and a rebalance listener (this class) finishes and commits the work of
revoked partitions. Without a group it reads every partition from the log end and
commits nothing.

Settling never talks to the broker directly: acks move the partition's committable
offset (:mod:`streamkit_kafka.offsets`), and a committer task writes it every
``commit_interval_ms`` or ``commit_batch_size`` acks, and on revocation and close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from aiokafka import (  # type: ignore[import-untyped]
    AIOKafkaConsumer,
    ConsumerRebalanceListener,
    TopicPartition,
)
from aiokafka import errors as kafka_errors
from aiokafka.structs import (  # type: ignore[import-untyped]
    ConsumerRecord,
    OffsetAndMetadata,
)

from streamkit.binder import ConsumerSpec, Delivery, Subscription

from .offsets import PartitionTracker, decode_failures
from .settings import KafkaConsumerOptions

if TYPE_CHECKING:
    from .binder import KafkaBinder

__all__ = ["KafkaSubscription", "quietly"]

logger = logging.getLogger(__name__)

Fetched = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


class KafkaSubscription(Subscription, ConsumerRebalanceListener):  # type: ignore[misc]
    """One aiokafka consumer: a group member, or an anonymous reader of it all."""

    def __init__(
        self, binder: KafkaBinder, spec: ConsumerSpec, partitions: int
    ) -> None:
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
        session = options.session_timeout_ms or s.session_timeout_ms
        return {
            **s.client_kwargs(),
            "group_id": spec.group,
            "enable_auto_commit": False,
            "auto_offset_reset": "latest" if anonymous else spec.start_from,
            "session_timeout_ms": session,
            "rebalance_timeout_ms": s.rebalance_timeout_ms(session),
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
                self._consumer.subscribe([topic], listener=self)
                await self._join(topic)
                if self.spec.start_from == "latest":
                    await self._pin_to_log_end(await self._uncommitted_partitions())
        except BaseException:
            # The binder translates the error; the half-started consumer goes.
            await self._stop_consumer()
            raise
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

    async def _join(self, topic: str) -> None:
        """Start the consumer; aiokafka returns after the first assignment.

        aiokafka retries a join for as long as it takes; a broker that never
        completes one (gone, or a wedged group) ends in an error instead.
        """
        s = self._settings
        limit = (s.rebalance_timeout_ms() + s.request_timeout_ms) / 1000
        try:
            async with asyncio.timeout(limit):
                await self._consumer.start()
        except TimeoutError as exc:
            raise kafka_errors.KafkaTimeoutError(
                f"group {self.spec.group!r} did not assign partitions of {topic!r} "
                f"within {limit:.0f} s"
            ) from exc

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
        deadline = (
            asyncio.get_running_loop().time() + self._settings.request_timeout_ms / 1000
        )
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
                # A broker that is gone gets close_timeout_ms, then the commit is
                # dropped: those records are delivered again.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._settings.close_timeout_ms / 1000):
                        await self._commit_quietly(list(self._trackers.values()))
                if not self._settings.leave_group_on_close:
                    self._skip_leave_group()
            await self._stop_consumer()
            self._binder._forget(self)
            logger.info(
                "Closed subscription to Kafka topic %r (group %r)",
                self.spec.destination,
                self.spec.group,
                extra=self._log_extra,
            )
        finally:
            self._close_done.set_result(None)

    async def _stop_consumer(self) -> None:
        try:
            await self._consumer.stop()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # aiokafka 0.14's Fetcher.close() awaits a fetch it has just cancelled
            # (one retrying a broker that is gone), so a CancelledError escapes
            # stop() before the connections are closed: close them here.
            await quietly(self._consumer._client.close())
        except Exception as exc:
            logger.debug("Ignored while stopping a consumer: %r", exc)

    def _skip_leave_group(self) -> None:
        """Close without a LeaveGroup: the broker drops the member at session expiry.

        Tansu can keep a member that left as the leader of the group's next
        generation, after which no member can ever sync again; expiring a silent
        member works. aiokafka has no switch for this, so the leave step of this
        one consumer's coordinator is replaced.
        """
        coordinator = self._consumer._coordinator
        if coordinator is None:
            return

        async def forget_membership() -> None:
            coordinator.reset_generation()

        coordinator._maybe_leave_group = forget_membership

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
            fetched: Fetched = await fetch
            return fetched
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
            "Released %s of %r",
            delivery.id,
            self.spec.destination,
            extra=self._log_extra,
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

    # -- commits ---------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        interval = self._settings.commit_interval_ms / 1000
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._commit_due.wait()
            self._commit_due.clear()
            try:
                await self._commit_quietly(list(self._trackers.values()))
            except Exception:
                # Never let the committer die silently: the next round tries again.
                logger.exception(
                    "Committing offsets of %r failed", self.spec.destination,
                    extra=self._log_extra,
                )  # fmt: skip

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
                self._tp(t): OffsetAndMetadata(offset, t.metadata())
                for t, offset in due
            }
            for tracker, _ in due:
                tracker.metadata_dirty = False
            try:
                # aiokafka retries a commit while the coordinator is away; a bound
                # keeps close() and revocation from waiting for a dead broker.
                async with asyncio.timeout(self._settings.request_timeout_ms / 1000):
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
            except (kafka_errors.KafkaError, TimeoutError) as exc:
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


async def quietly(awaitable: Awaitable[Any]) -> None:
    try:
        await awaitable
    except Exception as exc:
        logger.debug("Ignored while closing: %r", exc)
