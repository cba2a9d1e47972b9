"""The binder SPI: the small contract between the runtime and one broker.

A binder moves raw records. The runtime owns everything above that (conversion,
retries, dead-letter routing, partition selection, concurrency, shutdown), so every
broker gets the same semantics from one place. A binder plug-in is a subclass of
:class:`Binder` registered under the ``streamkit.binders`` entry-point group::

    [project.entry-points."streamkit.binders"]
    redis = "streamkit_redis:RedisBinder"

The contract, which the conformance suite (:mod:`streamkit.conformance`) checks:

* ``start()`` connects; ``close()`` ends every subscription (their iterators stop),
  waits for nothing but in-progress broker calls, and is idempotent.
* ``publish()`` returns only once the broker has taken every record (Kafka acks,
  AMQP publisher confirms, the XADD reply). A failure raises a :class:`PublishError`
  and the caller may retry the whole batch.
* ``subscribe()`` returns once the subscription is attached (a record published after
  it returns is received). Iterating the subscription yields non-empty batches of
  :class:`Delivery`; iteration ends after ``close()``. The binder never holds more
  than ``spec.prefetch`` unsettled deliveries for one subscription.
* Each delivery is settled exactly once: ``ack()`` (done, never redelivered to the
  group) or ``release()`` (give back; redelivered, to this or another member).
  Deliveries left unsettled when a subscription closes or its process dies are
  redelivered. Settling after close is ignored, never sent on a new connection.
* ``Delivery.attempt`` is 1 + the number of failed handler attempts recorded for the
  record with :meth:`Subscription.record_attempt`. It counts failures, not
  deliveries: a record given back at shutdown, or redelivered after a crash in the
  middle of an attempt, keeps its count, so a cancellation never uses up a retry.
  Binders that keep the count across processes (so the retry limit holds across
  restarts) set :attr:`Capabilities.native_delivery_count`.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from .errors import BinderNotFound

__all__ = [
    "Binder",
    "Capabilities",
    "ConsumerSpec",
    "Delivery",
    "Health",
    "HealthStatus",
    "NoOptions",
    "ProducerSpec",
    "Record",
    "Subscription",
    "binder_class",
]

ENTRY_POINT_GROUP = "streamkit.binders"


class NoOptions(BaseModel):
    """Options model for binders that take no settings of their own."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(slots=True)
class Record:
    """One message as it travels on the wire.

    ``headers`` values are raw bytes and round-trip byte-exactly. ``value`` is
    ``None`` only for a Kafka tombstone. ``partition`` is chosen by the runtime when
    the producer binding is partitioned; ``None`` lets the broker decide.
    """

    value: bytes | None
    headers: dict[str, bytes] = field(default_factory=dict)
    key: bytes | None = None
    partition: int | None = None


@dataclass(slots=True, eq=False)
class Delivery:
    """A received record and its settle handle.

    ``id`` is the broker's identity of the record (offset, stream id, delivery tag),
    printable in logs. ``attempt`` counts deliveries of this record to the group,
    starting at 1.
    """

    value: bytes | None
    headers: dict[str, bytes]
    key: bytes | None
    partition: int | None
    id: str
    destination: str
    subscription: Subscription
    attempt: int = 1
    token: Any = None

    async def ack(self) -> None:
        """Mark the record done for the group."""
        await self.subscription.ack(self)

    async def release(self) -> None:
        """Give the record back for redelivery."""
        await self.subscription.release(self)


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """What a subscription reads.

    ``group`` ``None`` is an anonymous subscriber: it sees records published after it
    subscribed, and nothing is kept for it once it closes. With ``partitioned`` the
    subscriber reads only the partitions ``p`` with
    ``p % instance_count == instance_index`` (binders with native group assignment,
    like Kafka, may ignore this and let the broker assign).
    """

    destination: str
    group: str | None = None
    binding: str = ""
    partitioned: bool = False
    partition_count: int = 1
    instance_index: int = 0
    instance_count: int = 1
    prefetch: int = 64
    batch_size: int = 64
    start_from: str = "earliest"
    options: BaseModel = field(default_factory=NoOptions)

    def partitions(self) -> list[int]:
        """The partitions this subscriber reads."""
        if not self.partitioned:
            return list(range(self.partition_count))
        return [
            p
            for p in range(self.partition_count)
            if p % self.instance_count == self.instance_index
        ]


@dataclass(frozen=True, slots=True)
class ProducerSpec:
    """Where records are published. ``partition_count`` is provisioned when missing."""

    destination: str
    partition_count: int = 1
    binding: str = ""
    options: BaseModel = field(default_factory=NoOptions)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a binder's broker can do; the conformance suite skips what is missing."""

    consumer_groups: bool = True
    broadcast: bool = True
    persistence: bool = False
    replay_for_new_group: bool = False
    ordering: bool = True
    native_delivery_count: bool = False
    crash_recovery_seconds: float | None = None
    lease_extension: bool = False
    broker_restart: bool = False
    batch: bool = True
    native_dlq: bool = False
    delayed_delivery: bool = False
    max_message_bytes: int | None = None


class HealthStatus(enum.Enum):
    UP = "up"
    DOWN = "down"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Health:
    status: HealthStatus
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status is HealthStatus.UP


class Subscription(abc.ABC):
    """An attached consumer; iterate it for batches of deliveries."""

    spec: ConsumerSpec

    def __aiter__(self) -> AsyncIterator[list[Delivery]]:
        return self

    async def __anext__(self) -> list[Delivery]:
        batch = await self.next_batch()
        if batch is None:
            raise StopAsyncIteration
        return batch

    @abc.abstractmethod
    async def next_batch(self) -> list[Delivery] | None:
        """Wait for the next non-empty batch; ``None`` once the subscription closed.

        Cancelling the caller must lose nothing: a record the broker handed out to a
        cancelled read is delivered again later.
        """

    @abc.abstractmethod
    async def ack(self, delivery: Delivery) -> None:
        """Settle a delivery as done. Ignored after close."""

    @abc.abstractmethod
    async def release(self, delivery: Delivery) -> None:
        """Give a delivery back for redelivery. Ignored after close."""

    async def record_attempt(self, delivery: Delivery) -> None:  # noqa: B027
        """Record that one handler attempt on ``delivery`` failed.

        The runtime calls this right after a failed attempt that will be retried,
        before the backoff. A later delivery of the same record (to any member of
        the group, after a restart) must then report ``attempt`` one higher, so the
        retry limit holds across restarts. Ideally durable; the default does nothing
        (the count then restarts at 1 in a new process). Forget the count when the
        record is acked.
        """

    async def extend(self, delivery: Delivery) -> None:  # noqa: B027
        """Keep a long-running delivery from being redelivered; default: nothing."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop fetching and end the iteration; unsettled deliveries are redelivered.

        Idempotent; safe to call while another task awaits :meth:`next_batch`.
        """


class Binder(abc.ABC):
    """The adapter to one broker.

    Subclasses declare ``type_name``, ``capabilities`` and pydantic models for their
    settings (``settings_model``, the ``binders.<name>`` section of the
    configuration) and for per-binding options (``consumer_options_model``,
    ``producer_options_model``: the extra keys of a binding's ``consumer`` and
    ``producer`` sections). Models should forbid unknown keys so that a typo is
    reported with its name.
    """

    type_name: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()
    settings_model: ClassVar[type[BaseModel]] = NoOptions
    consumer_options_model: ClassVar[type[BaseModel]] = NoOptions
    producer_options_model: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, settings: BaseModel | None = None, *, name: str = "") -> None:
        self.settings = settings if settings is not None else self.settings_model()
        self.name = name or self.type_name

    # -- lifecycle -------------------------------------------------------------

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect to the broker. Raises :class:`BrokerUnavailable` on failure."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every subscription and connection. Idempotent."""

    async def health(self) -> Health:
        """Report whether the broker answers. Must not hang."""
        return Health(HealthStatus.UNKNOWN, "not supported")

    # -- provisioning, publish, consume ----------------------------------------

    async def provision_producer(self, spec: ProducerSpec) -> None:  # noqa: B027
        """Create the destination when it is missing (and allowed). Idempotent."""

    @abc.abstractmethod
    async def publish(self, spec: ProducerSpec, records: Sequence[Record]) -> None:
        """Publish ``records`` in order; return once the broker has taken them all."""

    @abc.abstractmethod
    async def subscribe(self, spec: ConsumerSpec) -> Subscription:
        """Provision and attach a consumer; return once it receives new records."""

    # -- dead letters ----------------------------------------------------------

    def dead_letter_destination(self, spec: ConsumerSpec) -> str:
        """The dead-letter destination of a consumer: ``<destination>.<group>.dlq``."""
        return f"{spec.destination}.{spec.group or 'anonymous'}.dlq"

    async def publish_dead_letter(self, spec: ConsumerSpec, record: Record) -> None:
        """Publish a dead letter of the consumer ``spec``."""
        await self.publish(ProducerSpec(self.dead_letter_destination(spec)), [record])

    async def subscribe_dead_letters(
        self, spec: ConsumerSpec, *, group: str = "dlq-reader"
    ) -> Subscription:
        """Read the dead letters of the consumer ``spec`` (for tools and tests)."""
        return await self.subscribe(
            ConsumerSpec(self.dead_letter_destination(spec), group=group)
        )


def binder_class(type_name: str) -> type[Binder]:
    """The binder class registered for ``type_name`` in the entry-point group."""
    if type_name == "memory":
        from .memory import MemoryBinder

        return MemoryBinder
    found = entry_points(group=ENTRY_POINT_GROUP, name=type_name)
    for ep in found:
        loaded = ep.load()
        if not (isinstance(loaded, type) and issubclass(loaded, Binder)):
            raise BinderNotFound(
                f"Entry point {ep.value!r} for binder type {type_name!r} is not a "
                "streamkit Binder subclass."
            )
        return loaded
    installed = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
    raise BinderNotFound(
        f"No binder of type {type_name!r} is installed (installed: "
        f"{', '.join(installed) or 'none'}). Install its plug-in: "
        f"`pip install -e binders/{type_name}` in a streamkit clone, or "
        f"`pip install 'streamkit[{type_name}]'`."
    )
