"""The in-memory binder: the embedded default and the binder tests run against.

It is held to the same contract as the broker binders (the conformance suite runs on
it), so an app that works here behaves the same on Kafka, RabbitMQ or Redis.

Model
-----
A :class:`MemoryBroker` holds destinations. Binders attach to a broker by name
(``MemorySettings.broker``); brokers live in a process-wide registry, so two apps in
one process share destinations, and a binder closed and started again (a "restart")
finds its groups where it left them. Nothing survives the process: ``persistence``
means "across binder restarts within one process". Tests take a private broker with
:func:`new_broker_name` and may :func:`drop_broker` it afterwards.

* A destination is a list of partition logs; each record gets the next offset of its
  partition. The partition count grows to the largest count a producer or consumer
  declares. ``Record.partition`` picks the partition when set; otherwise a keyed
  record goes to ``crc32(key) % partitions`` (stable across processes) and an
  unkeyed one to partition 0.
* A group keeps, per partition, the next offset to hand out, the offsets handed out
  and not yet settled, the offsets given back (served first, in offset order) and a
  count of failed attempts per offset (:meth:`MemorySubscription.record_attempt`
  adds one; ``Delivery.attempt`` is that count + 1, so a give-back at shutdown never
  uses up a retry). Its committed position is its lowest unsettled offset.
  Group state outlives its subscribers: subscribing again resumes, and a group
  created later starts at the earliest retained record (``start_from="latest"``:
  at the end).
* Members of a group compete for the partitions they read. To keep order per key
  with several members, a keyed record is handed to a member only while no other
  member holds an unsettled record with the same key in that partition.
* An anonymous subscription (``group=None``) has private state starting at the end
  of the log, dropped when it closes.

Memory is bounded: a partition keeps at most ``buffer_size`` records. Settled
records stay as history (for groups created later) until room is needed; then the
oldest records every group has settled make way. When a full partition holds no
such record, ``publish`` waits for consumers and raises
:class:`~streamkit.errors.PublishTimeout` after ``publish_timeout`` seconds. With no
group at all on a destination, nothing waits for consumers: the oldest records make
way, like a log's retention. A subscription holds at most ``prefetch`` unsettled
deliveries.

The broker is driven from asyncio on one thread; it is not thread-safe.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from .binder import (
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
from .errors import BinderError, ConfigError, MessageTooLarge, PublishTimeout

if TYPE_CHECKING:
    from .conformance import BinderProfile

__all__ = [
    "MemoryBinder",
    "MemoryBroker",
    "MemorySettings",
    "MemorySubscription",
    "conformance_profiles",
    "drop_broker",
    "get_broker",
    "new_broker_name",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024

# Records of a partition that one group skipped because another member holds their
# key. Past this many, the group stops reading ahead until the holders settle, so a
# hot key cannot make every fetch rescan the whole log.
_MAX_SKIPPED = 1024


class MemorySettings(BaseModel):
    """Settings of the memory binder (the ``binders.<name>`` section)."""

    model_config = ConfigDict(extra="forbid")

    broker: str = "default"
    buffer_size: int = Field(default=10_000, ge=1)
    publish_timeout: float = Field(default=30.0, gt=0)
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1)


class _Signal:
    """Wakes every current waiter.

    Futures are made per wait on the waiter's running loop, so one broker can serve
    the successive event loops of a test session.
    """

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    async def wait(self) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiters.add(future)
        try:
            await future
        finally:
            self._waiters.discard(future)

    def notify(self) -> None:
        for future in list(self._waiters):
            if not future.done() and not future.get_loop().is_closed():
                future.set_result(None)


# -- the broker ----------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    offset: int
    record: Record


class _Partition:
    """An append-only log; ``base`` is the offset of the oldest retained entry."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.base = 0
        self.space = _Signal()
        self._entries: list[_Entry] = []
        self._head = 0

    @property
    def end(self) -> int:
        return self.base + len(self)

    def __len__(self) -> int:
        return len(self._entries) - self._head

    def append(self, record: Record) -> int:
        offset = self.end
        self._entries.append(_Entry(offset, record))
        return offset

    def entry(self, offset: int) -> _Entry:
        return self._entries[self._head + offset - self.base]

    def trim(self, below: int) -> None:
        """Drop the entries with offsets lower than ``below``."""
        count = min(below, self.end) - self.base
        if count <= 0:
            return
        self._head += count
        self.base += count
        # Compact once the dropped prefix dominates, keeping trims amortised O(1).
        if self._head > 1024 and self._head * 2 > len(self._entries):
            del self._entries[: self._head]
            self._head = 0


class _Cursor:
    """One group's position in one partition."""

    def __init__(self, start: int) -> None:
        self.next = start
        self.committed = start
        self.in_flight: dict[int, MemorySubscription] = {}
        self.pending: list[int] = []  # sorted; given back or skipped, not in flight
        self.acked: set[int] = set()  # settled offsets above ``committed``
        self.attempts: dict[int, int] = {}
        self.holders: dict[bytes, tuple[MemorySubscription, int]] = {}

    def blocked(self, key: bytes | None, sub: MemorySubscription) -> bool:
        if key is None:
            return False
        holder = self.holders.get(key)
        return holder is not None and holder[0] is not sub

    def hold(self, key: bytes | None, sub: MemorySubscription) -> None:
        if key is not None:
            _, count = self.holders.get(key, (sub, 0))
            self.holders[key] = (sub, count + 1)

    def unhold(self, key: bytes | None) -> bool:
        """Drop one hold on ``key``; True when the key became free."""
        if key is None or key not in self.holders:
            return False
        sub, count = self.holders[key]
        if count > 1:
            self.holders[key] = (sub, count - 1)
            return False
        del self.holders[key]
        return True

    def settle(self, offset: int) -> None:
        self.acked.add(offset)
        self.attempts.pop(offset, None)
        # Everything below ``next`` is acked, in flight or pending, so walking the
        # acked run gives the lowest unsettled offset.
        while self.committed in self.acked:
            self.acked.discard(self.committed)
            self.committed += 1

    def give_back(self, offset: int) -> None:
        bisect.insort(self.pending, offset)


class _Group:
    """A consumer group's (or one anonymous subscriber's) state on a destination."""

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.cursors: dict[int, _Cursor] = {}
        self.members: set[MemorySubscription] = set()


class _Destination:
    def __init__(self, name: str) -> None:
        self.name = name
        self.partitions: list[_Partition] = [_Partition(0)]
        self.groups: dict[str, _Group] = {}
        self.anonymous: set[_Group] = set()
        self.changed = _Signal()

    def all_groups(self) -> Iterator[_Group]:
        yield from self.groups.values()
        yield from self.anonymous

    def ensure_partitions(self, count: int) -> None:
        if count <= len(self.partitions):
            return
        for index in range(len(self.partitions), count):
            self.partitions.append(_Partition(index))
            # A new partition's whole content is new to every existing group.
            for group in self.all_groups():
                group.cursors[index] = _Cursor(0)
        logger.debug("destination %s now has %d partitions", self.name, count)
        self.changed.notify()

    def new_group(self, name: str | None, start_from: str) -> _Group:
        group = _Group(name)
        for part in self.partitions:
            start = part.end if start_from == "latest" else part.base
            group.cursors[part.index] = _Cursor(start)
        if name is None:
            self.anonymous.add(group)
        else:
            self.groups[name] = group
        return group

    def drop_group(self, group: _Group) -> None:
        self.anonymous.discard(group)
        for part in self.partitions:
            part.space.notify()

    def settled_below(self, partition: int) -> int:
        """The offset below which every group has settled the partition."""
        part = self.partitions[partition]
        cursors = [group.cursors[partition] for group in self.all_groups()]
        return min((c.committed for c in cursors), default=part.end)

    def select_partition(self, record: Record) -> int:
        if record.partition is not None:
            self.ensure_partitions(record.partition + 1)
            return record.partition
        if record.key is None:
            return 0
        return zlib.crc32(record.key) % len(self.partitions)


class MemoryBroker:
    """The destinations and group state shared by the binders attached to it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.destinations: dict[str, _Destination] = {}

    def destination(self, name: str) -> _Destination:
        found = self.destinations.get(name)
        if found is None:
            found = self.destinations[name] = _Destination(name)
        return found

    def __repr__(self) -> str:
        return f"MemoryBroker({self.name!r}, destinations={len(self.destinations)})"


_brokers: dict[str, MemoryBroker] = {}


def get_broker(name: str = "default") -> MemoryBroker:
    """The broker called ``name`` in this process, created when missing."""
    broker = _brokers.get(name)
    if broker is None:
        broker = _brokers[name] = MemoryBroker(name)
    return broker


def new_broker_name(prefix: str = "test") -> str:
    """A broker name no one uses yet: a private broker for one test."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def drop_broker(name: str) -> None:
    """Forget the broker ``name`` and everything it holds."""
    _brokers.pop(name, None)


def _record_size(record: Record) -> int:
    size = len(record.value or b"") + len(record.key or b"")
    return size + sum(len(k.encode()) + len(v) for k, v in record.headers.items())


# -- the binder ----------------------------------------------------------------


class MemoryBinder(Binder):
    """The in-memory binder (see the module docstring for its model)."""

    type_name = "memory"
    capabilities = Capabilities(
        consumer_groups=True,
        broadcast=True,
        persistence=True,
        replay_for_new_group=True,
        ordering=True,
        native_delivery_count=True,
        crash_recovery_seconds=0.0,
        batch=True,
        max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
    )
    settings_model = MemorySettings

    settings: MemorySettings

    def __init__(self, settings: BaseModel | None = None, *, name: str = "") -> None:
        super().__init__(settings, name=name)
        # The size limit is a setting, so the declared capability follows it.
        self.capabilities = replace(  # type: ignore[misc]
            type(self).capabilities, max_message_bytes=self.settings.max_message_bytes
        )
        self._broker: MemoryBroker | None = None
        self._subscriptions: set[MemorySubscription] = set()

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        if self._broker is None:
            self._broker = get_broker(self.settings.broker)
            logger.info(
                "binder %s attached to memory broker %s", self.name, self._broker.name
            )

    async def close(self) -> None:
        if self._broker is None:
            return
        for sub in list(self._subscriptions):
            await sub.close()
        self._broker = None
        logger.info("binder %s closed", self.name)

    async def health(self) -> Health:
        if self._broker is None:
            return Health(HealthStatus.DOWN, "binder not started")
        return Health(HealthStatus.UP, f"memory broker {self._broker.name!r}")

    def _require_broker(self) -> MemoryBroker:
        if self._broker is None:
            raise BinderError(
                f"Memory binder {self.name!r} is not started; await start() first."
            )
        return self._broker

    # -- provisioning ----------------------------------------------------------

    async def provision_producer(self, spec: ProducerSpec) -> None:
        broker = self._require_broker()
        broker.destination(spec.destination).ensure_partitions(spec.partition_count)

    # -- publish ---------------------------------------------------------------

    async def publish(self, spec: ProducerSpec, records: Sequence[Record]) -> None:
        dest = self._require_broker().destination(spec.destination)
        dest.ensure_partitions(spec.partition_count)
        self._check_sizes(spec, records)
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                for record in records:
                    await self._append(dest, record)
        except TimeoutError as exc:
            raise PublishTimeout(
                f"Publishing to memory destination {spec.destination!r} waited "
                f"{self.settings.publish_timeout:g} s for consumers to settle records: "
                f"a partition holds buffer_size={self.settings.buffer_size} unsettled "
                "records. Consume faster or raise buffer_size / publish_timeout."
            ) from exc
        finally:
            dest.changed.notify()

    def _check_sizes(self, spec: ProducerSpec, records: Sequence[Record]) -> None:
        limit = self.settings.max_message_bytes
        for record in records:
            size = _record_size(record)
            if size > limit:
                raise MessageTooLarge(
                    f"A record of {size} bytes for destination {spec.destination!r} "
                    f"exceeds max_message_bytes={limit} of memory binder "
                    f"{self.name!r}; nothing of this batch was published."
                )

    async def _append(self, dest: _Destination, record: Record) -> None:
        part = dest.partitions[dest.select_partition(record)]
        while len(part) >= self.settings.buffer_size:
            if dest.settled_below(part.index) > part.base:
                part.trim(part.base + 1)  # the oldest settled record makes way
                break
            dest.changed.notify()  # let consumers see what is already there
            await part.space.wait()
        stored = Record(record.value, dict(record.headers), record.key, part.index)
        offset = part.append(stored)
        logger.debug("published %s/%d@%d", dest.name, part.index, offset)

    # -- consume ---------------------------------------------------------------

    async def subscribe(self, spec: ConsumerSpec) -> MemorySubscription:
        if spec.start_from not in ("earliest", "latest"):
            raise ConfigError(
                f"start_from must be 'earliest' or 'latest', not {spec.start_from!r}.",
                key="start_from",
            )
        dest = self._require_broker().destination(spec.destination)
        dest.ensure_partitions(spec.partition_count)
        if spec.group is None:
            group = dest.new_group(None, "latest")
        else:
            group = dest.groups.get(spec.group) or dest.new_group(
                spec.group, spec.start_from
            )
        sub = MemorySubscription(self, dest, group, spec)
        group.members.add(sub)
        self._subscriptions.add(sub)
        logger.info("subscribed to %s (group %s)", spec.destination, spec.group)
        return sub


class MemorySubscription(Subscription):
    """A member of a group (or an anonymous subscriber) on one destination."""

    def __init__(
        self,
        binder: MemoryBinder,
        dest: _Destination,
        group: _Group,
        spec: ConsumerSpec,
    ) -> None:
        self.spec = spec
        self._binder = binder
        self._dest = dest
        self._group = group
        self._in_flight: dict[tuple[int, int], Delivery] = {}
        self._closed = False
        self._rotation = itertools.count()

    def _partitions(self) -> list[int]:
        count = len(self._dest.partitions)
        spec = self.spec
        if not spec.partitioned:
            return list(range(count))
        return [
            p for p in range(count) if p % spec.instance_count == spec.instance_index
        ]

    async def next_batch(self) -> list[Delivery] | None:
        # Taking is synchronous, so a cancellation can only land in the wait, where
        # nothing has been handed out yet.
        while not self._closed:
            batch = self._take()
            if batch:
                return batch
            await self._dest.changed.wait()
        return None

    def _take(self) -> list[Delivery]:
        room = min(self.spec.batch_size, self.spec.prefetch - len(self._in_flight))
        batch: list[Delivery] = []
        partitions = self._partitions()
        if room <= 0 or not partitions:
            return batch
        # Start at a different partition each time so none starves the others.
        shift = next(self._rotation) % len(partitions)
        for p in partitions[shift:] + partitions[:shift]:
            self._take_from(p, room - len(batch), batch)
            if len(batch) >= room:
                break
        return batch

    def _take_from(self, p: int, limit: int, batch: list[Delivery]) -> None:
        cursor = self._group.cursors[p]
        part = self._dest.partitions[p]

        taken: set[int] = set()
        for offset in cursor.pending:
            if len(taken) >= limit:
                break
            entry = part.entry(offset)
            if not cursor.blocked(entry.record.key, self):
                taken.add(offset)
                batch.append(self._hand_out(cursor, entry))
        if taken:
            cursor.pending = [o for o in cursor.pending if o not in taken]

        limit -= len(taken)
        while limit > 0 and cursor.next < part.end:
            if len(cursor.pending) >= _MAX_SKIPPED:
                break
            entry = part.entry(cursor.next)
            cursor.next += 1
            if cursor.blocked(entry.record.key, self):
                cursor.pending.append(entry.offset)  # stays sorted: newest offset
            else:
                batch.append(self._hand_out(cursor, entry))
                limit -= 1

    def _hand_out(self, cursor: _Cursor, entry: _Entry) -> Delivery:
        attempt = cursor.attempts.get(entry.offset, 0) + 1
        cursor.in_flight[entry.offset] = self
        cursor.hold(entry.record.key, self)

        record = entry.record
        assert record.partition is not None
        delivery = Delivery(
            value=record.value,
            headers=dict(record.headers),
            key=record.key,
            partition=record.partition,
            id=f"{record.partition}-{entry.offset}",
            destination=self._dest.name,
            subscription=self,
            attempt=attempt,
            token=(record.partition, entry.offset),
        )
        self._in_flight[delivery.token] = delivery
        return delivery

    # -- settle ----------------------------------------------------------------

    async def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, done=True)

    async def release(self, delivery: Delivery) -> None:
        self._settle(delivery, done=False)

    def _settle(self, delivery: Delivery, *, done: bool) -> None:
        # After close (or a second settle) the record is no longer ours: ignore it.
        if self._in_flight.pop(delivery.token, None) is None:
            return
        was_full = len(self._in_flight) + 1 >= self.spec.prefetch
        partition, offset = delivery.token
        freed = self._drop_in_flight(partition, offset)
        cursor = self._group.cursors[partition]
        if done:
            cursor.settle(offset)
            self._dest.partitions[partition].space.notify()
        else:
            cursor.give_back(offset)
        if freed or was_full or not done:
            self._dest.changed.notify()

    def _drop_in_flight(self, partition: int, offset: int) -> bool:
        cursor = self._group.cursors[partition]
        del cursor.in_flight[offset]
        key = self._dest.partitions[partition].entry(offset).record.key
        return cursor.unhold(key)

    async def record_attempt(self, delivery: Delivery) -> None:
        if delivery.token not in self._in_flight:
            return
        partition, offset = delivery.token
        attempts = self._group.cursors[partition].attempts
        attempts[offset] = attempts.get(offset, 0) + 1

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for partition, offset in list(self._in_flight):
            self._drop_in_flight(partition, offset)
            self._group.cursors[partition].give_back(offset)
        self._in_flight.clear()
        self._group.members.discard(self)
        self._binder._subscriptions.discard(self)
        if self._group.name is None:
            self._dest.drop_group(self._group)
        self._dest.changed.notify()
        logger.info(
            "subscription to %s (group %s) closed",
            self.spec.destination,
            self.spec.group,
        )


# -- conformance ---------------------------------------------------------------


def conformance_profiles() -> list[BinderProfile]:
    """The memory binder's conformance profile: a private broker per test."""
    from .conformance import BinderProfile

    return [
        BinderProfile(
            name="memory",
            binder_type="memory",
            settings=lambda: {"broker": new_broker_name("conformance")},
        )
    ]
