"""The RabbitMQ binder: AMQP 0-9-1 through aio-pika.

Connections
-----------
One AMQP connection per binder, opened by ``start()``. When it drops, a supervisor
task reconnects with exponential backoff (``reconnect_delay`` doubling up to
``reconnect_max_delay``); health is DOWN meanwhile. aio-pika's robust connection is
not used: it restores channels, consumers and QoS behind the binder's back, so the
binder could not tell which deliveries belong to a dead channel, nor report a
consumer that cannot come back. Here every reconnection is explicit:

* Each subscription owns a channel (its QoS, its declarations, its consumers) and a
  task that watches it. When the channel closes (the connection dropped, the broker
  closed the channel, or cancelled a consumer because its queue went away) the task
  drops the deliveries it buffered, waits for a connection, declares the topology
  again, re-applies the prefetch and consumes again.
* Each delivery carries the generation of the channel it came on. Settling a
  delivery of an older generation is dropped, never sent on the new channel (the
  broker has already requeued it, and its delivery tag means something else there).
* A subscription whose topology the broker refuses for good (an inequivalent
  queue, a vhost without permission) fails loudly: ``next_batch`` raises
  :class:`SubscriptionClosed` and health is DOWN. Anything else is retried.

Publishing uses one confirm channel: a batch is written in order without waiting,
then every confirm is awaited together (pipelining, several times faster than one
confirm at a time) within ``delivery_timeout``. Records that failed because the
connection dropped are published again once it is back, still within the deadline.
Declarations of producers and DLQs go through a separate channel, so a refused
declaration cannot close the channel other publishes are in flight on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import aio_pika
import aiormq
import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractConnection
from pamqp.commands import Basic
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
    SubscriptionClosed,
    Unroutable,
)

from . import topology, wire
from .settings import (
    DEFAULT_MAX_MESSAGE_BYTES,
    RabbitConsumerOptions,
    RabbitProducerOptions,
    RabbitSettings,
)

__all__ = ["RabbitBinder", "RabbitSubscription"]

logger = logging.getLogger(__name__)

# RabbitMQ's default; the negotiated value replaces it once connected.
_DEFAULT_FRAME_MAX = 131_072



@dataclass(slots=True)
class _Outgoing:
    """A record ready to be written: where to, and as what."""

    exchange: str
    routing_key: str
    body: bytes
    properties: Basic.Properties
    mandatory: bool


@dataclass(frozen=True, slots=True)
class _Token:
    """What settling a delivery needs: the channel it came on, and its tag there."""

    generation: int
    channel: aiormq.abc.AbstractChannel
    delivery_tag: int


class RabbitBinder(Binder):
    """Binds destinations to RabbitMQ exchanges and groups to queues."""

    type_name = "rabbit"
    capabilities = Capabilities(
        consumer_groups=True,
        broadcast=True,
        persistence=True,
        # A group queue starts empty: it only sees records published after it was
        # declared (declare it early with the producer option required_groups).
        replay_for_new_group=False,
        # Per partition: a partition's queue has one consumer (its instance) and
        # keeps order. Several instances of an unpartitioned group compete and
        # interleave a key's records unless single_active_consumer is set.
        ordering=True,
        # Only quorum queues count deliveries (x-delivery-count).
        native_delivery_count=False,
        # The broker requeues a dead consumer's deliveries as soon as its TCP
        # connection closes; a host that vanishes takes up to 3 heartbeats.
        crash_recovery_seconds=2.0,
        broker_restart=True,
        batch=True,
        max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
    )
    settings_model = RabbitSettings
    consumer_options_model = RabbitConsumerOptions
    producer_options_model = RabbitProducerOptions

    settings: RabbitSettings

    def __init__(self, settings: BaseModel | None = None, *, name: str = "") -> None:
        super().__init__(settings, name=name)
        self.capabilities = replace(  # type: ignore[misc]
            type(self).capabilities, max_message_bytes=self.settings.max_message_bytes
        )
        self._connection: AbstractConnection | None = None
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._outage = "binder not started"
        self._started = False
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._frame_max = _DEFAULT_FRAME_MAX
        self._publish_channel: AbstractChannel | None = None
        self._admin_channel: AbstractChannel | None = None
        self._channel_lock = asyncio.Lock()
        self._declared: set[str] = set()
        self._subscriptions: set[RabbitSubscription] = set()

    def __repr__(self) -> str:
        return f"RabbitBinder(name={self.name!r}, url={self.settings.display_url!r})"

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._closing = False
        try:
            connection = await self._open_connection()
        except Exception as exc:
            raise BrokerUnavailable(
                f"Cannot connect to RabbitMQ at {self.settings.display_url} "
                f"({self._describe(exc)}). Check binders.{self.name}.url, the "
                "credentials and that the broker is running."
            ) from exc
        self._install(connection)
        self._started = True
        self._supervisor = asyncio.create_task(
            self._supervise(), name=f"streamkit-rabbit-{self.name}-reconnect"
        )
        logger.info(
            "binder %s connected to %s", self.name, self.settings.display_url
        )

    async def close(self) -> None:
        if not self._started:
            return
        self._started = False
        self._closing = True
        self._connected.clear()
        self._outage = "binder closed"
        subscriptions = list(self._subscriptions)
        await asyncio.gather(*(sub.close() for sub in subscriptions))

        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None

        connection, self._connection = self._connection, None
        self._publish_channel = self._admin_channel = None
        if connection is not None:
            await self._close_connection(connection)
        logger.info("binder %s closed", self.name)

    async def health(self) -> Health:
        if not self._started:
            return Health(HealthStatus.DOWN, self._outage)
        if not self._connected.is_set() or self._connection_closed():
            return Health(HealthStatus.DOWN, self._outage)
        for sub in self._subscriptions:
            problem = sub.problem()
            if problem is not None:
                return Health(HealthStatus.DOWN, problem)
        return Health(HealthStatus.UP, f"connected to {self.settings.display_url}")

    async def _open_connection(self) -> AbstractConnection:
        timeout = self.settings.connect_timeout
        async with asyncio.timeout(timeout):
            return await aio_pika.connect(
                self.settings.connection_url(), timeout=timeout
            )

    def _install(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self._declared.clear()
        self._publish_channel = self._admin_channel = None
        transport = connection.transport
        if transport is not None:
            self._frame_max = transport.connection.connection_tune.frame_max
        connection.close_callbacks.add(self._on_connection_closed)
        self._lost.clear()
        self._connected.set()

    def _on_connection_closed(self, sender: Any, exc: BaseException | None) -> None:
        if sender is not self._connection or self._closing:
            return
        self._outage = (
            f"connection to {self.settings.display_url} lost "
            f"({self._describe(exc)}); reconnecting"
        )
        logger.warning("binder %s: %s", self.name, self._outage)
        self._connected.clear()
        self._lost.set()

    async def _supervise(self) -> None:
        while not self._closing:
            await self._lost.wait()
            delay = self.settings.reconnect_delay
            while not self._closing:
                try:
                    connection = await self._open_connection()
                except Exception as exc:
                    self._outage = (
                        f"RabbitMQ at {self.settings.display_url} unreachable "
                        f"({self._describe(exc)}); retrying every {delay:g} s"
                    )
                    logger.warning("binder %s: %s", self.name, self._outage)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.settings.reconnect_max_delay)
                    continue
                self._install(connection)
                logger.info(
                    "binder %s reconnected to %s",
                    self.name,
                    self.settings.display_url,
                )
                break

    async def _close_connection(self, connection: AbstractConnection) -> None:
        try:
            async with asyncio.timeout(self.settings.close_timeout):
                await connection.close()
        except Exception as exc:
            # A broker that stopped answering cannot acknowledge Connection.Close;
            # drop the socket so that no reader task outlives the binder.
            logger.warning(
                "binder %s: closing the connection failed (%s); dropping it",
                self.name,
                self._describe(exc),
            )
            transport = connection.transport
            if transport is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(transport.connection.close(exc), 1.0)

    def _connection_closed(self) -> bool:
        connection = self._connection
        if connection is None or connection.transport is None:
            return True
        return bool(connection.transport.connection.is_closed)

    async def _live_connection(self) -> AbstractConnection:
        """The current connection, waiting (unbounded) for a reconnection."""
        while True:
            self._require_started()
            await self._connected.wait()
            if self._connection is not None and not self._connection_closed():
                return self._connection
            # Closed but the callback has not run yet: let it.
            await asyncio.sleep(0.01)

    def _require_started(self) -> None:
        if not self._started:
            raise BinderError(
                f"RabbitMQ binder {self.name!r} is not started (or was closed); "
                "await start() first."
            )

    # -- provisioning ----------------------------------------------------------------

    async def provision_producer(self, spec: ProducerSpec) -> None:
        plan = topology.producer_plan(spec, self._producer_options(spec))
        await self._bounded(self._ensure_declared(plan), f"provision {spec.destination!r}")

    async def _ensure_declared(self, plan: topology.Plan) -> None:
        """Declare ``plan`` once per connection, on the declaration channel."""
        keys = set(plan.keys())
        if keys <= self._declared:
            return
        while True:
            connection = await self._live_connection()
            channel = await self._channel(connection, admin=True)
            try:
                await _declare(channel, plan)
            except Exception as exc:
                if _connection_failure(exc) and not _permanent(exc):
                    # The connection dropped under us: wait for it and redo.
                    await asyncio.sleep(0.05)
                    continue
                raise self._declare_error(plan, exc) from exc
            self._declared |= keys
            return

    async def _channel(
        self, connection: AbstractConnection, *, admin: bool
    ) -> AbstractChannel:
        """The publish (confirming) or declaration channel, reopened when closed."""
        async with self._channel_lock:
            channel = self._admin_channel if admin else self._publish_channel
            if channel is None or channel.is_closed:
                channel = await connection.channel(
                    publisher_confirms=not admin, on_return_raises=not admin
                )
                if admin:
                    self._admin_channel = channel
                else:
                    self._publish_channel = channel
            return channel

    async def _bounded(self, work: Awaitable[None], what: str) -> None:
        """Run ``work`` within connect_timeout; a broker still away is unavailable."""
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                await work
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"Could not {what} on RabbitMQ at {self.settings.display_url} within "
                f"connect_timeout={self.settings.connect_timeout:g} s: "
                f"{self._outage if not self._connected.is_set() else 'no reply'}."
            ) from exc

    # -- publish ---------------------------------------------------------------------

    async def publish(self, spec: ProducerSpec, records: Sequence[Record]) -> None:
        self._require_started()
        if not records:
            return
        options = self._producer_options(spec)
        outgoing = [self._prepare(spec, options, record) for record in records]
        plan = topology.producer_plan(spec, options)
        await self._publish_within_deadline(spec.destination, plan, outgoing)

    async def publish_dead_letter(self, spec: ConsumerSpec, record: Record) -> None:
        self._require_started()
        options = self._consumer_options(spec)
        plan = topology.dead_letter_plan(spec, options)
        base = topology.base_queue_name(spec.destination, spec.group)
        outgoing = self._outgoing(
            options.dead_letter_exchange, base, record, persistent=True, mandatory=True
        )
        try:
            await self._publish_within_deadline(base + ".dlq", plan, [outgoing])
        except Unroutable:
            # The DLQ or its binding was deleted behind our back: declare it again.
            self._declared.clear()
            await self._publish_within_deadline(base + ".dlq", plan, [outgoing])

    def _prepare(
        self, spec: ProducerSpec, options: RabbitProducerOptions, record: Record
    ) -> _Outgoing:
        key = topology.routing_key(spec, options, record)
        return self._outgoing(
            spec.destination,
            key,
            record,
            persistent=options.persistent,
            mandatory=options.mandatory,
        )

    def _outgoing(
        self,
        exchange: str,
        routing_key: str,
        record: Record,
        *,
        persistent: bool,
        mandatory: bool,
    ) -> _Outgoing:
        body = record.value or b""
        limit = self.settings.max_message_bytes
        if len(body) > limit:
            raise MessageTooLarge(
                f"A record of {len(body)} bytes for exchange {exchange!r} exceeds "
                f"max_message_bytes={limit} of binder {self.name!r} (RabbitMQ's own "
                "limit is max_message_size); nothing of it was published."
            )
        properties = wire.encode_properties(record, persistent=persistent)
        size = wire.header_frame_size(properties, len(body))
        if size > self._frame_max:
            raise MessageTooLarge(
                f"The headers of a record for exchange {exchange!r} take {size} bytes, "
                f"more than the AMQP frame_max of {self._frame_max} bytes that "
                "RabbitMQ allows for all properties and headers of one message (the "
                "body is not limited by it); shorten or drop headers."
            )
        if len(routing_key.encode()) > 255:
            raise PublishError(
                f"Routing key {routing_key[:40]!r}... is longer than 255 bytes."
            )
        return _Outgoing(exchange, routing_key, body, properties, mandatory)

    async def _publish_within_deadline(
        self, destination: str, plan: topology.Plan, outgoing: list[_Outgoing]
    ) -> None:
        timeout = self.settings.delivery_timeout
        try:
            async with asyncio.timeout(timeout):
                await self._publish_until_confirmed(plan, outgoing)
        except TimeoutError as exc:
            state = "" if self._connected.is_set() else f" ({self._outage})"
            raise PublishTimeout(
                f"RabbitMQ at {self.settings.display_url} did not confirm "
                f"{len(outgoing)} record(s) for {destination!r} within "
                f"delivery_timeout={timeout:g} s{state}. The caller may publish the "
                "batch again; records confirmed before the timeout may be duplicated."
            ) from exc

    async def _publish_until_confirmed(
        self, plan: topology.Plan, outgoing: list[_Outgoing]
    ) -> None:
        pending = outgoing
        redeclared = False
        while pending:
            try:
                await self._ensure_declared(plan)
                connection = await self._live_connection()
                channel = await self._channel(connection, admin=False)
                underlay = await channel.get_underlay_channel()
            except StreamkitError:
                raise
            except Exception as exc:
                if not _connection_failure(exc):
                    raise PublishError(
                        f"Publishing to RabbitMQ failed: {self._describe(exc)}."
                    ) from exc
                await asyncio.sleep(0.05)  # the close callback has not run yet
                continue
            results = await asyncio.gather(
                *(self._publish_one(underlay, item) for item in pending),
                return_exceptions=True,
            )
            failed = [
                (item, result)
                for item, result in zip(pending, results, strict=True)
                if isinstance(result, BaseException)
            ]
            if failed:
                errors = [exc for _, exc in failed]
                redeclare = self._raise_unless_retriable(errors, redeclared)
                redeclared = redeclared or redeclare
                logger.debug(
                    "binder %s: %d record(s) not confirmed (%s); publishing again",
                    self.name,
                    len(failed),
                    self._describe(errors[0]),
                )
            pending = [item for item, _ in failed]

    async def _publish_one(
        self, channel: aiormq.abc.AbstractChannel, item: _Outgoing
    ) -> None:
        await channel.basic_publish(
            item.body,
            exchange=item.exchange,
            routing_key=item.routing_key,
            properties=item.properties,
            mandatory=item.mandatory,
        )

    def _raise_unless_retriable(
        self, errors: list[BaseException], redeclared: bool
    ) -> bool:
        """Raise the typed error of a failed publish, or return to publish again
        (``True``: after declaring the topology again)."""
        for exc in errors:
            if isinstance(exc, asyncio.CancelledError):
                raise exc
            if isinstance(exc, aiormq.exceptions.PublishError):
                delivery = exc.message.delivery
                raise Unroutable(
                    f"RabbitMQ returned record(s) published to exchange "
                    f"{delivery.exchange!r} with routing key "
                    f"{delivery.routing_key!r}: {delivery.reply_text}, no queue is "
                    "bound for them."
                ) from exc
            if isinstance(exc, aiormq.exceptions.DeliveryError):
                raise PublishError(
                    f"RabbitMQ refused (nacked) {len(errors)} record(s): it could not "
                    "store them (a full queue with overflow reject-publish, or an "
                    "internal error). The caller may publish them again."
                ) from exc
            if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
                text = str(exc)
                cls = MessageTooLarge if "max size" in text else PublishError
                raise cls(f"RabbitMQ refused a publish: {text}.") from exc
            if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
                raise PublishError(f"RabbitMQ refused a publish: {exc}.") from exc
            if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
                if redeclared:
                    raise PublishError(
                        f"RabbitMQ refused a publish: {exc}; the exchange is missing "
                        "even after declaring it again (declare_exchange false?)."
                    ) from exc
                # The exchange was deleted behind our back: declare it again.
                self._declared.clear()
                return True
            if not _connection_failure(exc):
                raise PublishError(
                    f"Publishing to RabbitMQ failed: {self._describe(exc)}."
                ) from exc
        return False

    # -- consume ---------------------------------------------------------------------

    async def subscribe(self, spec: ConsumerSpec) -> RabbitSubscription:
        self._require_started()
        options = self._consumer_options(spec)
        plan = topology.consumer_plan(spec, options, topology.anonymous_name())
        sub = RabbitSubscription(self, spec, plan)
        await sub._start()
        self._subscriptions.add(sub)
        logger.info(
            "binder %s subscribed to %s (group %s): queue(s) %s",
            self.name,
            spec.destination,
            spec.group,
            ", ".join(q.name for q in plan.consume),
        )
        return sub

    async def subscribe_dead_letters(
        self, spec: ConsumerSpec, *, group: str = "dlq-reader"
    ) -> RabbitSubscription:
        # The DLQ is a queue, not a destination: its readers compete, whatever
        # ``group`` they name.
        self._require_started()
        options = self._consumer_options(spec)
        plan = topology.dead_letter_plan(spec, options, consume=True)
        dlq_spec = ConsumerSpec(
            self.dead_letter_destination(spec),
            group=group,
            binding=spec.binding,
            prefetch=spec.prefetch,
            batch_size=spec.batch_size,
        )
        sub = RabbitSubscription(self, dlq_spec, plan)
        await sub._start()
        self._subscriptions.add(sub)
        return sub

    # -- settle ----------------------------------------------------------------------
    # (deliveries are settled by RabbitSubscription.ack / release, below)

    # -- error mapping ---------------------------------------------------------------

    def _producer_options(self, spec: ProducerSpec) -> RabbitProducerOptions:
        return _options(spec.options, RabbitProducerOptions)

    def _consumer_options(self, spec: ConsumerSpec) -> RabbitConsumerOptions:
        return _options(spec.options, RabbitConsumerOptions)

    def _declare_error(self, plan: topology.Plan, exc: BaseException) -> StreamkitError:
        names = ", ".join(
            [e.name for e in plan.exchanges] + [q.name for q in plan.queues]
        )
        if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
            return BinderError(
                f"RabbitMQ refused to declare {names}: {exc}. An exchange or queue "
                "of that name exists with other settings (exchange_type, quorum, "
                "single_active_consumer, auto_bind_dlq); align the binding's options "
                "or delete the old one."
            )
        if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
            return BinderError(
                f"RabbitMQ refused access to {names}: {exc}. Check the user's "
                "permissions on the virtual host."
            )
        if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
            return BinderError(
                f"RabbitMQ could not bind {names}: {exc}. With declare_exchange "
                "false the exchange must exist already."
            )
        if isinstance(exc, StreamkitError):
            return exc
        return BrokerUnavailable(
            f"Declaring {names} on RabbitMQ at {self.settings.display_url} failed: "
            f"{self._describe(exc)}."
        )

    def _describe(self, exc: BaseException | None) -> str:
        """An exception as text that never carries the password."""
        if exc is None:
            return "closed"
        text = str(exc) or type(exc).__name__
        secret = self.settings.password
        password = (
            secret.get_secret_value()
            if secret is not None
            else self.settings.connection_url().password
        )
        if password:
            text = text.replace(password, "***")
        return text


class RabbitSubscription(Subscription):
    """Consumers on the queue(s) of one subscription, on a channel of their own."""

    def __init__(
        self, binder: RabbitBinder, spec: ConsumerSpec, plan: topology.Plan
    ) -> None:
        self.spec = spec
        self._binder = binder
        self._plan = plan
        # Per-consumer QoS (quorum queues refuse a channel-wide one): split the
        # prefetch over the queues so that the subscription never holds more.
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
        self._trouble: str | None = None
        self._failure: BaseException | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._label = f"{spec.destination} (group {spec.group})"

    def problem(self) -> str | None:
        """Why this subscription is not consuming, or ``None`` when it is."""
        if self._closed:
            return None
        if self._failure is not None:
            return f"subscription to {self._label} failed: {self._failure}"
        if not self._attached:
            return f"subscription to {self._label} re-attaching: {self._trouble}"
        return None

    # -- lifecycle -------------------------------------------------------------------

    async def _start(self) -> None:
        binder = self._binder
        try:
            await binder._bounded(self._attach(), f"subscribe to {self._label}")
        except BrokerUnavailable:
            raise
        except Exception as exc:
            raise binder._declare_error(self._plan, exc) from exc
        self._watcher = asyncio.create_task(
            self._watch(), name=f"streamkit-rabbit-{self.spec.destination}-watch"
        )

    async def _attach(self) -> None:
        connection = await self._binder._live_connection()
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.set_qos(prefetch_count=self._prefetch)
            await _declare(channel, self._plan)
            underlay = await channel.get_underlay_channel()
            self._generation += 1
            self._unsettled.clear()
            self._underlay = underlay
            self._kick.clear()
            underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
            for queue in self._plan.consume:
                await underlay.basic_consume(
                    queue.name,
                    partial(self._on_message, self._generation, queue),
                    no_ack=False,
                )
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), 1.0)
            raise
        self._channel = channel
        self._attached = True
        self._trouble = None

    async def _watch(self) -> None:
        """Re-attach whenever the channel goes; fail loudly when that cannot work."""
        while not self._closed:
            reason = await self._channel_gone()
            if self._closed:
                return
            self._detach(reason)
            channel = self._channel
            if channel is not None and not channel.is_closed:
                # Consumers cancelled by the broker: close the channel so that it
                # requeues what it still holds before we consume again.
                await _close_quietly(channel)
            await self._reattach()

    async def _channel_gone(self) -> str:
        underlay = self._underlay
        assert underlay is not None
        closing = underlay.closing
        kicked = asyncio.ensure_future(self._kick.wait())
        try:
            await asyncio.wait({closing, kicked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            kicked.cancel()
        if not closing.done():
            closing.cancel()
            return "the broker cancelled the consumer (queue deleted?)"
        if closing.cancelled():
            return "channel closed"
        return self._binder._describe(closing.exception())

    def _detach(self, reason: str) -> None:
        self._attached = False
        self._trouble = reason
        # The broker requeues everything the old channel held; what we buffered
        # from it must not reach the runtime, and acks for it must not be sent.
        self._generation += 1
        self._unsettled.clear()
        self._pending.clear()
        logger.warning(
            "subscription to %s lost its channel (%s); re-attaching",
            self._label,
            reason,
        )

    async def _reattach(self) -> None:
        delay = self._binder.settings.reconnect_delay
        while not self._closed:
            try:
                await self._attach()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _permanent(exc):
                    self._fail(exc)
                    return
                self._trouble = self._binder._describe(exc)
                logger.warning(
                    "subscription to %s could not re-attach (%s); retrying in %g s",
                    self._label,
                    self._trouble,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._binder.settings.reconnect_max_delay)
                continue
            logger.info("subscription to %s re-attached", self._label)
            return

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        self._wakeup.set()
        logger.error(
            "subscription to %s cannot re-attach and stops: %s",
            self._label,
            self._binder._describe(exc),
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._attached = False
        self._pending.clear()
        self._unsettled.clear()
        self._wakeup.set()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            # Closing the channel requeues whatever it still holds unsettled.
            await _close_quietly(channel, self._binder.settings.close_timeout)
        self._binder._subscriptions.discard(self)
        logger.info("subscription to %s closed", self._label)

    # -- consume ---------------------------------------------------------------------

    async def next_batch(self) -> list[Delivery] | None:
        while True:
            if self._closed:
                return None
            if self._pending:
                size = min(self.spec.batch_size, len(self._pending))
                return [self._pending.popleft() for _ in range(size)]
            if self._failure is not None:
                raise SubscriptionClosed(
                    f"Subscription to {self._label} stopped: RabbitMQ refused its "
                    f"topology ({self._binder._describe(self._failure)})."
                ) from self._failure
            self._wakeup.clear()
            await self._wakeup.wait()

    def _on_message(
        self,
        generation: int,
        queue: topology.Queue,
        message: aiormq.abc.DeliveredMessage,
    ) -> Awaitable[None]:
        # Runs synchronously in the order aiormq schedules deliveries; the
        # coroutine it returns is only there because aiormq awaits consumers.
        if self._closed or generation != self._generation:
            return _done()
        delivery = message.delivery
        assert isinstance(delivery, Basic.Deliver)
        properties = message.header.properties
        headers, key, is_null, count = wire.decode_headers(properties)
        if count is not None:
            attempt = count + 1
        else:
            attempt = 2 if delivery.redelivered else 1
        tag = delivery.delivery_tag
        assert tag is not None
        self._unsettled.add(tag)
        self._pending.append(
            Delivery(
                value=None if is_null else message.body,
                headers=headers,
                key=key,
                partition=queue.partition,
                id=properties.message_id or f"{queue.name}#{tag}",
                destination=self.spec.destination,
                subscription=self,
                attempt=attempt,
                token=_Token(generation, message.channel, tag),
            )
        )
        self._wakeup.set()
        return _done()

    def _on_broker_cancel(self, frame: Any) -> None:
        self._kick.set()

    # -- settle ----------------------------------------------------------------------

    async def ack(self, delivery: Delivery) -> None:
        token = self._claim(delivery)
        if token is not None:
            await self._settle(token, token.channel.basic_ack(token.delivery_tag))

    async def release(self, delivery: Delivery) -> None:
        token = self._claim(delivery)
        if token is not None:
            await self._settle(
                token, token.channel.basic_nack(token.delivery_tag, requeue=True)
            )

    def _claim(self, delivery: Delivery) -> _Token | None:
        """The delivery's token if it may be settled now, else ``None`` (ignored)."""
        token = delivery.token
        if not isinstance(token, _Token) or self._closed:
            return None
        if token.generation != self._generation or token.channel.is_closed:
            logger.debug(
                "settling %s dropped: its channel is gone and the broker "
                "redelivers it",
                delivery.id,
            )
            return None
        if token.delivery_tag not in self._unsettled:
            return None  # settled already: a second settle would close the channel
        self._unsettled.discard(token.delivery_tag)
        return token

    async def _settle(self, token: _Token, call: Awaitable[Any]) -> None:
        try:
            await call
        except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError) as exc:
            # The channel closed between the check and the write; the broker
            # requeues the delivery, which is what settling late amounts to.
            logger.debug("settling delivery tag %s dropped: %s", token.delivery_tag, exc)


# -- helpers ------------------------------------------------------------------------


async def _declare(channel: AbstractChannel, plan: topology.Plan) -> None:
    for exchange in plan.exchanges:
        await channel.declare_exchange(exchange.name, exchange.type, durable=True)
    for queue in plan.queues:
        declared = await channel.declare_queue(
            queue.name,
            durable=queue.durable,
            exclusive=queue.exclusive,
            auto_delete=queue.auto_delete,
            arguments=queue.arguments or None,
        )
        for exchange_name, key in queue.bindings:
            await declared.bind(exchange_name, key)


async def _close_quietly(channel: AbstractChannel, timeout: float = 2.0) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            await channel.close()


async def _done_coro() -> None:
    return None


def _done() -> Awaitable[None]:
    return _done_coro()


def _permanent(exc: BaseException) -> bool:
    """Broker replies no retry can fix: the topology exists with other arguments,
    or the user may not use it."""
    return isinstance(
        exc,
        aiormq.exceptions.ChannelPreconditionFailed
        | aiormq.exceptions.ChannelAccessRefused,
    )


def _connection_failure(exc: BaseException) -> bool:
    """True when ``exc`` only says the connection or channel went away."""
    return isinstance(
        exc,
        aiormq.exceptions.ConnectionClosed
        | aiormq.exceptions.ChannelInvalidStateError
        | aiormq.exceptions.ChannelClosed
        | ConnectionError
        | asyncio.CancelledError,
    )


def _options(options: BaseModel, model: type[Any]) -> Any:
    if isinstance(options, model):
        return options
    # NoOptions (the spec's default) or a dict-like model: validate what it holds.
    return model.model_validate(options.model_dump())
