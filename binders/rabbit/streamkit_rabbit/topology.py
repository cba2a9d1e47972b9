"""Names and shapes of exchanges, queues and bindings (Spring Cloud Stream's).

==========================  ========================================================
concept                     RabbitMQ
==========================  ========================================================
destination ``d``           durable exchange ``d`` (topic unless configured)
group ``g``                 durable queue ``d.g`` bound with ``#``
no group                    exclusive auto-delete queue ``d.anonymous.<random>``
partition ``n``             routing key ``d-n``; queue ``d.g-n`` bound with ``d-n``
dead letters of ``d.g``     durable queue ``d.g.dlq`` bound to the direct exchange
                            ``DLX`` with ``d.g`` (what the runtime publishes with)
                            and with each group queue's name (what the broker uses
                            when it dead-letters by itself: the group queue's
                            ``x-dead-letter-routing-key``)
a record in retries         a copy in ``d.g.retrying.<owner>``, one subscriber's
                            holding queue (see :func:`holding_queue`)
==========================  ========================================================

Holding queues aside, these are the names Spring Cloud Stream's Rabbit binder
gives, so a streamkit service and a Spring service can share destinations, groups
and DLQs.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from streamkit.binder import ConsumerSpec, ProducerSpec, Record
from streamkit.errors import ConfigError

from .settings import RabbitConsumerOptions, RabbitProducerOptions, _QueueOptions
from .wire import HOLDING_INFIX

__all__ = [
    "Exchange",
    "Plan",
    "Queue",
    "anonymous_name",
    "base_queue_name",
    "consumer_plan",
    "dead_letter_plan",
    "holding_queue",
    "producer_plan",
    "routing_key",
]

#: How long a holding queue outlives its owner (its copies leave it at once).
HOLDING_EXPIRES_MS = 60_000


@dataclass(frozen=True, slots=True)
class Exchange:
    name: str
    type: str


@dataclass(frozen=True, slots=True)
class Queue:
    name: str
    partition: int = 0
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    arguments: dict[str, Any] = field(default_factory=dict, hash=False)
    bindings: tuple[tuple[str, str], ...] = ()  # (exchange, binding key)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to declare, and which of the queues to consume."""

    exchanges: tuple[Exchange, ...] = ()
    queues: tuple[Queue, ...] = ()
    consume: tuple[Queue, ...] = ()

    def __add__(self, other: Plan) -> Plan:
        return Plan(
            _unique(self.exchanges + other.exchanges),
            _unique(self.queues + other.queues),
            self.consume + other.consume,
        )

    def keys(self) -> Iterator[str]:
        """Cache keys of what the plan declares (for declare-once per connection)."""
        for exchange in self.exchanges:
            yield f"exchange {exchange.name} {exchange.type}"
        for queue in self.queues:
            yield f"queue {queue.name} {sorted(queue.bindings)}"


def anonymous_name() -> str:
    """Spring's ``anonymous.<base64url uuid>`` suffix for a group-less queue."""
    raw = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
    return f"anonymous.{raw}"


def base_queue_name(destination: str, group: str | None) -> str:
    return f"{destination}.{group or 'anonymous'}"


def routing_key(
    spec: ProducerSpec, options: RabbitProducerOptions, record: Record
) -> str:
    key = options.routing_key or spec.destination
    return key if record.partition is None else f"{key}-{record.partition}"


def producer_plan(spec: ProducerSpec, options: RabbitProducerOptions) -> Plan:
    exchanges = (_exchange(spec.destination, options),)
    plan = Plan(exchanges if options.declare_exchange else ())
    partitions = list(range(spec.partition_count)) if spec.partition_count > 1 else []
    for group in options.required_groups:
        plan = plan + _group_plan(
            spec.destination, group, partitions, options, options.routing_key
        )
    return Plan(plan.exchanges, plan.queues)  # a producer consumes nothing


def consumer_plan(
    spec: ConsumerSpec, options: RabbitConsumerOptions, anonymous: str
) -> Plan:
    """The exchange and queue(s) of a subscription; ``anonymous`` names group-less
    queues (kept across reconnects, so the name stays stable in logs)."""
    partitions = spec.partitions() if spec.partitioned else []
    if spec.partitioned and not partitions:
        raise ConfigError(
            f"Consumer of {spec.destination!r} reads no partition: instance_index "
            f"{spec.instance_index} of {spec.instance_count} with partition_count "
            f"{spec.partition_count}.",
            key="instance_index",
        )
    if spec.group is None:
        return _anonymous_plan(spec.destination, anonymous, partitions, options)
    return _group_plan(
        spec.destination, spec.group, partitions, options, options.binding_routing_key
    )


def dead_letter_plan(
    spec: ConsumerSpec, options: RabbitConsumerOptions, *, consume: bool = False
) -> Plan:
    """The DLX and the DLQ of a consumer; ``consume`` reads the DLQ itself."""
    base = base_queue_name(spec.destination, spec.group)
    keys = [base]
    if spec.partitioned and spec.group is not None:
        keys += [f"{base}-{p}" for p in range(spec.partition_count)]
    dlq = _dlq(base, keys, options)
    dlx = Exchange(options.dead_letter_exchange, "direct")
    return Plan((dlx,), (dlq,), (dlq,) if consume else ())


def holding_queue(queue: Queue, owner: str) -> Queue:
    """Where one subscriber keeps copies of the records it is retrying.

    Messages expire at once (TTL 0) unless delivered to a consumer right away (its
    owner, consuming without a prefetch limit); when the owner goes, what it held
    is requeued, expires and is dead-lettered (default exchange, routing key: the
    queue's name) back to ``queue``. Durable, with persistent copies, so that a
    broker restart loses nothing; the broker drops it a minute after its owner.
    """
    return Queue(
        f"{queue.name}{HOLDING_INFIX}{owner}",
        queue.partition,
        arguments={
            "x-message-ttl": 0,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue.name,
            "x-expires": HOLDING_EXPIRES_MS,
        },
    )


def _group_plan(
    destination: str,
    group: str,
    partitions: list[int],
    options: _QueueOptions,
    binding_key: str | None,
) -> Plan:
    exchange = _exchange(destination, options)
    base = base_queue_name(destination, group)
    queues: list[Queue] = []
    for partition, suffix, key in _partition_keys(
        destination, partitions, options, binding_key
    ):
        name = base + suffix
        queues.append(
            Queue(
                name,
                partition,
                arguments=_group_arguments(name, options),
                bindings=((destination, key),),
            )
        )
    exchanges = (exchange,) if options.declare_exchange else ()
    plan = Plan(exchanges, tuple(queues), tuple(queues))
    if options.auto_bind_dlq:
        keys = [q.name for q in queues]
        if base not in keys:
            keys.insert(0, base)
        dlq = _dlq(base, keys, options)
        dlx = Exchange(options.dead_letter_exchange, "direct")
        plan = Plan((*plan.exchanges, dlx), (dlq, *plan.queues), plan.consume)
    return plan


def _anonymous_plan(
    destination: str,
    anonymous: str,
    partitions: list[int],
    options: RabbitConsumerOptions,
) -> Plan:
    # Exclusive queues live and die with this connection, so they are always
    # classic (quorum queues cannot be exclusive) and have no DLQ of their own.
    base = f"{destination}.{anonymous}"
    queues = tuple(
        Queue(
            base + suffix,
            partition,
            durable=False,
            exclusive=True,
            auto_delete=True,
            bindings=((destination, key),),
        )
        for partition, suffix, key in _partition_keys(
            destination, partitions, options, options.binding_routing_key
        )
    )
    exchanges = (_exchange(destination, options),) if options.declare_exchange else ()
    return Plan(exchanges, queues, queues)


def _partition_keys(
    destination: str,
    partitions: list[int],
    options: _QueueOptions,
    binding_key: str | None,
) -> list[tuple[int, str, str]]:
    """``(partition, queue suffix, binding key)`` for each queue to declare."""
    if not partitions:
        return [(0, "", _binding_key(destination, options, binding_key))]
    if options.exchange_type in ("fanout", "headers"):
        raise ConfigError(
            f"A {options.exchange_type} exchange cannot route partitions of "
            f"{destination!r}; use exchange_type topic or direct.",
            key="exchange_type",
        )
    root = binding_key or destination
    return [(p, f"-{p}", f"{root}-{p}") for p in partitions]


def _binding_key(
    destination: str, options: _QueueOptions, binding_key: str | None
) -> str:
    if binding_key is not None:
        return binding_key
    if options.exchange_type == "topic":
        return "#"
    if options.exchange_type == "direct":
        return destination
    return ""


def _exchange(destination: str, options: _QueueOptions) -> Exchange:
    return Exchange(destination, options.exchange_type)


def _group_arguments(name: str, options: _QueueOptions) -> dict[str, Any]:
    arguments: dict[str, Any] = {}
    if options.quorum:
        arguments["x-queue-type"] = "quorum"
    if options.delivery_limit is not None:
        arguments["x-delivery-limit"] = options.delivery_limit
    if options.single_active_consumer:
        arguments["x-single-active-consumer"] = True
    if options.auto_bind_dlq:
        arguments["x-dead-letter-exchange"] = options.dead_letter_exchange
        arguments["x-dead-letter-routing-key"] = name
    if options.expires_ms is not None:
        arguments["x-expires"] = options.expires_ms
    return arguments


def _dlq(base: str, keys: list[str], options: _QueueOptions) -> Queue:
    arguments: dict[str, Any] = {"x-queue-type": "quorum"} if options.quorum else {}
    if options.dlq_expires_ms is not None:
        arguments["x-expires"] = options.dlq_expires_ms
    dlx = options.dead_letter_exchange
    return Queue(
        f"{base}.dlq",
        arguments=arguments,
        bindings=tuple((dlx, key) for key in keys),
    )


def _unique(items: tuple[Any, ...]) -> tuple[Any, ...]:
    seen: list[Any] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return tuple(seen)
