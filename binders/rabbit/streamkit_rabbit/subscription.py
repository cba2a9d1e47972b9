"""A RabbitMQ subscription: consumers on its queue(s), on a channel of their own.

Channels
--------
The channel carries the subscription's QoS (the prefetch), its declarations and its
consumers, so a fault on it touches nobody else. A watcher task waits for the
channel to go (the connection dropped, the broker closed the channel, or cancelled
a consumer because its queue was deleted) and then attaches again: it waits for a
connection, declares the topology, re-applies the prefetch and consumes.

Deliveries carry the generation of the channel they came on. When a channel goes,
the broker requeues everything it held: the deliveries buffered from it are
dropped, and settling one already handed out is ignored, never sent on the new
channel, where its delivery tag would name another message.

Failed attempts
---------------
RabbitMQ cannot change a queued message, so a failure is counted by moving the
record: ``record_attempt`` publishes a copy carrying ``streamkit_failures: n`` to
this subscriber's *holding queue*, then acks what carried the record before. The
holding queue delivers the copy straight back to this subscriber, which keeps it
unsettled while the runtime retries; settling the delivery settles the copy. The
copy returns to the group queue (dead-lettered, with its count) when it is given
back, and by itself when this subscriber dies, since its messages expire the moment
they are requeued (see :func:`.topology.holding_queue`). So the next delivery
anywhere in the group reports the attempt the record is at, across restarts.
Group-less subscriptions, whose queue dies with them, count in the process only.
Between ``record_attempt`` and the final settle a record occupies no prefetch slot,
so a subscription in retries may hold its prefetch plus the records it retries.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import aiormq
import aiormq.abc
from aio_pika.abc import AbstractChannel
from pamqp.commands import Basic

from streamkit.binder import ConsumerSpec, Delivery, Subscription
from streamkit.errors import BrokerUnavailable, SubscriptionClosed

from . import topology, wire
from .amqp import close_quietly, declare, permanent

if TYPE_CHECKING:
    from .binder import RabbitBinder

__all__ = ["RabbitSubscription"]

logger = logging.getLogger(__name__)

_ACK = "ack"
_GIVE_BACK = "give back"


@dataclass(slots=True, eq=False)
class _Token:
    """A delivery's handle: what carries its record on the broker right now."""

    generation: int
    channel: aiormq.abc.AbstractChannel
    # ``None`` while the copy that carries the record is on its way back to us.
    delivery_tag: int | None
    queue: topology.Queue
    message_id: str | None
    properties: Basic.Properties
    body: bytes
    # Failed attempts counted on the broker (the copy's streamkit_failures).
    failures: int
    # The held copy carrying the record, once a failure was recorded.
    copy: str | None = None

    @property
    def record(self) -> tuple[str, str] | None:
        """The record's identity for the binder's in-process failure counts."""
        return (self.queue.name, self.message_id) if self.message_id else None


class RabbitSubscription(Subscription):
    """Consumers on the queue(s) of one subscription."""

    def __init__(
        self, binder: RabbitBinder, spec: ConsumerSpec, plan: topology.Plan
    ) -> None:
        self.spec = spec
        self._binder = binder
        self._plan = plan
        # QoS per consumer (quorum queues refuse a channel-wide one): the prefetch
        # is split over the queues so that the subscription never holds more.
        self._prefetch = max(1, spec.prefetch // max(1, len(plan.consume)))
        self._pending: deque[Delivery] = deque()
        self._wakeup = asyncio.Event()
        self._kick = asyncio.Event()
        self._closed = False
        self._channel: AbstractChannel | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._generation = 0
        self._unsettled: set[int] = set()
        self._attached = False
        self._trouble = "not attached yet"
        self._failure: BaseException | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._label = f"{spec.destination} (group {spec.group})"
        # Durable failure counts need a queue that outlives this subscriber.
        self._counts_durably = spec.group is not None
        self._owner = secrets.token_hex(4)
        self._holding: dict[str, topology.Queue] = {}
        self._holding_lock = asyncio.Lock()
        # Held copies by id: the token they carry, or how to settle one that was
        # settled (or replaced) before it arrived.
        self._holds: dict[str, _Token | str] = {}

    @property
    def attached(self) -> bool:
        """Consuming right now (not between a lost channel and its replacement)."""
        return self._attached

    def problem(self) -> str | None:
        """Why this subscription is not consuming, or ``None`` when it is."""
        if self._closed or self._attached:
            return None
        if self._failure is not None:
            return f"subscription to {self._label} failed: {self._failure}"
        return f"subscription to {self._label} re-attaching: {self._trouble}"

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Attach for the first time; the broker's refusal is raised, not retried."""
        binder = self._binder
        try:
            await binder._bounded(self._attach(), f"subscribe to {self._label}")
        except BrokerUnavailable:
            raise
        except Exception as exc:
            raise binder._declare_error(self._plan, exc) from exc
        self._watcher = asyncio.create_task(
            self._watch(), name=f"streamkit-rabbit-watch-{self.spec.destination}"
        )

    async def close(self) -> None:
        await self._close(close_channel=True)

    async def _close(self, *, close_channel: bool) -> None:
        """End the subscription; its channel too, unless its connection closes."""
        if self._closed:
            return
        self._closed = True
        self._attached = False
        self._forget_channel()
        self._wakeup.set()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        channel, self._channel = self._channel, None
        if close_channel and channel is not None and not channel.is_closed:
            # Closing the channel requeues whatever it still holds unsettled (and
            # the held copies go back to the group queue).
            await close_quietly(channel, self._binder.settings.close_timeout)
        self._binder._subscriptions.discard(self)
        logger.info("subscription to %s closed", self._label)

    async def _attach(self) -> None:
        connection = await self._binder._live_connection()
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.set_qos(prefetch_count=self._prefetch)
            await declare(channel, self._plan)
            underlay = await channel.get_underlay_channel()
            self._forget_channel()
            self._underlay = underlay
            self._kick.clear()
            underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
            for queue in self._plan.consume:
                await underlay.basic_consume(
                    queue.name,
                    partial(self._on_message, self._generation, queue),
                    no_ack=False,
                )
            if self._holding:
                await self._consume_holding(channel, list(self._holding.values()))
        except BaseException:
            # A consumer may have started before a later one failed: what it
            # delivered is requeued with the channel and must not be handed out.
            self._forget_channel()
            await close_quietly(channel, 1.0)
            raise
        self._channel = channel
        self._attached = True

    async def _consume_holding(
        self, channel: AbstractChannel, queues: list[topology.Queue]
    ) -> None:
        # No prefetch limit: a copy must reach us at once or it expires back to
        # the group queue. (QoS applies to the consumers started after it.)
        await channel.set_qos(prefetch_count=0)
        await declare(channel, topology.Plan(queues=tuple(queues)))
        underlay = await channel.get_underlay_channel()
        for queue in queues:
            await underlay.basic_consume(
                queue.name, partial(self._on_held, self._generation), no_ack=False
            )

    def _forget_channel(self) -> None:
        """Disown what the current channel delivered: the broker requeues it."""
        self._generation += 1
        self._unsettled.clear()
        self._pending.clear()
        self._holds.clear()

    async def _watch(self) -> None:
        while not self._closed:
            reason = await self._channel_gone()
            if self._closed:
                return
            self._attached = False
            self._trouble = reason
            self._forget_channel()
            logger.warning(
                "subscription to %s lost its channel (%s); re-attaching",
                self._label,
                reason,
            )
            channel = self._channel
            if channel is not None and not channel.is_closed:
                # The broker cancelled our consumers but kept the channel: close
                # it, so that it requeues what it holds, before consuming again.
                await close_quietly(channel, self._binder.settings.close_timeout)
            if not await self._reattach():
                return

    async def _channel_gone(self) -> str:
        """Wait until the channel closes or the broker cancels a consumer; why."""
        underlay = self._underlay
        assert underlay is not None
        closing = underlay.closing
        kicked = asyncio.ensure_future(self._kick.wait())
        try:
            await asyncio.wait({closing, kicked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            kicked.cancel()
        if not closing.done():
            closing.cancel()  # an observer: cancelling it leaves the channel alone
            return "the broker cancelled a consumer (queue deleted?)"
        if closing.cancelled():
            return "channel closed"
        return self._binder._describe(closing.exception())

    async def _reattach(self) -> bool:
        """Attach again with backoff; ``False`` when the broker refuses for good."""
        settings = self._binder.settings
        delay = settings.reconnect_delay
        while not self._closed:
            try:
                await self._attach()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if permanent(exc):
                    self._fail(exc)
                    return False
                self._trouble = self._binder._describe(exc)
                logger.warning(
                    "subscription to %s could not re-attach (%s); retrying in %g s",
                    self._label,
                    self._trouble,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, settings.reconnect_max_delay)
                continue
            logger.info("subscription to %s re-attached", self._label)
            return True
        return False

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        self._wakeup.set()
        logger.error(
            "subscription to %s stops: RabbitMQ refuses its topology (%s)",
            self._label,
            self._binder._describe(exc),
        )

    # -- consume ---------------------------------------------------------------------

    async def next_batch(self) -> list[Delivery] | None:
        # Handing out is synchronous, so a cancelled read has taken nothing.
        while True:
            if self._closed:
                return None
            if self._pending:
                size = min(self.spec.batch_size, len(self._pending))
                return [self._pending.popleft() for _ in range(size)]
            if self._failure is not None:
                raise SubscriptionClosed(
                    f"Subscription to {self._label} stopped: RabbitMQ refuses its "
                    f"topology ({self._binder._describe(self._failure)}). Align the "
                    "binding's options with the existing queue or delete it."
                ) from self._failure
            self._wakeup.clear()
            await self._wakeup.wait()

    def _on_message(
        self,
        generation: int,
        queue: topology.Queue,
        message: aiormq.abc.DeliveredMessage,
    ) -> Coroutine[Any, Any, None]:
        # A plain function: aiormq calls it (and schedules what it returns) in
        # delivery order, so the buffer keeps the queue's order.
        if self._closed or generation != self._generation:
            return _nothing()
        tag = _tag(message)
        properties = message.header.properties
        decoded = wire.decode_headers(properties)
        token = _Token(
            generation,
            message.channel,
            tag,
            queue,
            properties.message_id,
            properties,
            message.body,
            decoded.failures,
        )
        counted = max(decoded.failures, self._binder._failures.get(token.record))

        self._unsettled.add(tag)
        self._pending.append(
            Delivery(
                value=None if decoded.is_null else message.body,
                headers=decoded.headers,
                key=decoded.key,
                partition=queue.partition,
                id=properties.message_id or f"{queue.name}#{tag}",
                destination=self.spec.destination,
                subscription=self,
                attempt=1 + counted,
                token=token,
            )
        )
        self._wakeup.set()
        return _nothing()

    def _on_held(
        self, generation: int, message: aiormq.abc.DeliveredMessage
    ) -> Coroutine[Any, Any, None]:
        """A copy came back from the holding queue: attach it to its delivery."""
        if self._closed or generation != self._generation:
            return _nothing()
        tag = _tag(message)
        copy_id = wire.decode_headers(message.header.properties).copy
        entry = self._holds.pop(copy_id, None) if copy_id else None
        if isinstance(entry, _Token) and entry.copy == copy_id:
            entry.delivery_tag = tag
            entry.channel = message.channel
            self._unsettled.add(tag)
            return _nothing()
        if entry == _ACK:
            return _quietly(message.channel.basic_ack(tag))
        # Given back before it arrived, or a copy nobody here waits for (held by
        # an earlier channel, back after a broker restart): to the group queue.
        return _quietly(message.channel.basic_nack(tag, requeue=False))

    def _on_broker_cancel(self, frame: Any) -> None:
        self._kick.set()

    # -- settle ----------------------------------------------------------------------

    async def ack(self, delivery: Delivery) -> None:
        token = delivery.token
        if not isinstance(token, _Token):
            return
        self._binder._failures.forget(token.record)
        if self._settle_on_arrival(token, _ACK):
            return
        if self._claim(delivery):
            assert token.delivery_tag is not None
            await _quietly(token.channel.basic_ack(token.delivery_tag))

    async def release(self, delivery: Delivery) -> None:
        token = delivery.token
        if not isinstance(token, _Token) or self._settle_on_arrival(token, _GIVE_BACK):
            return
        if self._claim(delivery):
            assert token.delivery_tag is not None
            # A held copy goes back to the group queue through the holding
            # queue's dead-letter route, keeping its count.
            requeue = token.copy is None
            await _quietly(
                token.channel.basic_nack(token.delivery_tag, requeue=requeue)
            )

    async def record_attempt(self, delivery: Delivery) -> None:
        token = delivery.token
        if not isinstance(token, _Token) or self._closed:
            return
        self._binder._failures.add(token.record)
        if not self._counts_durably or token.generation != self._generation:
            return
        try:
            await self._move_to_holding(token)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning(
                "failed attempt of %s counted in this process only: %s",
                delivery.id,
                self._binder._describe(exc),
            )

    async def _move_to_holding(self, token: _Token) -> None:
        """Publish a copy counting one more failure, then ack the old carrier."""
        holding = await self._holding_queue(token.queue)
        copy_id = secrets.token_hex(8)
        properties = wire.copy_properties(
            token.properties, failures=token.failures + 1, copy_id=copy_id
        )
        old_tag, old_copy = token.delivery_tag, token.copy
        token.delivery_tag, token.copy = None, copy_id
        self._holds[copy_id] = token  # the copy may arrive before its confirm
        try:
            await self._binder._publish_copy(holding.name, token.body, properties)
        except BaseException as exc:
            self._holds.pop(copy_id, None)
            arrived = token.delivery_tag is not None
            if not arrived:  # nothing moved: the old carrier still carries it
                token.delivery_tag, token.copy = old_tag, old_copy
            if not arrived or not isinstance(exc, Exception):
                raise
        token.failures += 1

        if old_tag is not None:
            if old_tag in self._unsettled and token.generation == self._generation:
                self._unsettled.discard(old_tag)
                await _quietly(token.channel.basic_ack(old_tag))
        elif old_copy is not None and old_copy in self._holds:
            self._holds[old_copy] = _ACK  # replaced before it even arrived

    async def _holding_queue(self, queue: topology.Queue) -> topology.Queue:
        async with self._holding_lock:
            holding = self._holding.get(queue.name)
            if holding is None:
                holding = topology.holding_queue(queue, self._owner)
                channel = self._channel
                if channel is None or channel.is_closed:
                    raise SubscriptionClosed("the subscription has no channel now")
                await self._consume_holding(channel, [holding])
                self._holding[queue.name] = holding
            return holding

    def _settle_on_arrival(self, token: _Token, how: str) -> bool:
        """Settle a held copy that has not arrived yet, when it does."""
        if token.delivery_tag is not None or token.copy is None:
            return False
        if token.copy in self._holds and token.generation == self._generation:
            self._holds[token.copy] = how
        return True

    def _claim(self, delivery: Delivery) -> bool:
        """Whether the delivery may be settled now (else the settle is ignored)."""
        token = delivery.token
        if not isinstance(token, _Token) or self._closed:
            return False
        if token.generation != self._generation or token.channel.is_closed:
            logger.debug(
                "settling %s dropped: its channel is gone and the broker redelivers it",
                delivery.id,
            )
            return False
        if token.delivery_tag not in self._unsettled:
            return False  # settled already: a second settle would close the channel
        self._unsettled.discard(token.delivery_tag)
        return True


def _tag(message: aiormq.abc.DeliveredMessage) -> int:
    delivery = message.delivery
    assert isinstance(delivery, Basic.Deliver) and delivery.delivery_tag is not None
    return delivery.delivery_tag


async def _quietly(call: Awaitable[Any]) -> None:
    """Send a settle; if the channel closed meanwhile, the broker requeues anyway."""
    try:
        await call
    except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError) as exc:
        logger.debug("settle dropped: %s", exc)


async def _nothing() -> None:
    return None
