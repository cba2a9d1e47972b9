"""The RabbitMQ binder: AMQP 0-9-1 through aio-pika.

Connections
-----------
One AMQP connection per binder, opened by ``start()``. When it drops, a supervisor
task reconnects with exponential backoff (``reconnect_delay`` doubling up to
``reconnect_max_delay``); health is DOWN meanwhile. aio-pika's robust connection is
not used: it restores channels, consumers and QoS behind the binder's back, so the
binder could not tell which deliveries belong to a dead channel, nor report a
consumer that cannot come back. Here every recovery is explicit: each subscription
watches its own channel and attaches again (see :mod:`.subscription`); a
subscription whose topology the broker refuses for good (an inequivalent queue, a
vhost without permission) fails loudly: ``next_batch`` raises
:class:`SubscriptionClosed` and health is DOWN.

Publishing
----------
One confirm channel: a batch is written in order, then all its confirms are awaited
together (pipelined: several times faster than one confirm at a time), within
``delivery_timeout``. Records that failed only because the connection dropped are
published again once it is back, within the same deadline. Declarations of
producers and DLQs go through a separate channel, so a refused declaration cannot
close the channel other publishes are in flight on.

Attempts
--------
``Delivery.attempt`` counts failed handler attempts (``record_attempt``), not
deliveries, and the count survives restarts: a failure moves the record to a copy
that carries it (see :mod:`.subscription`). The binder also counts in the process,
which is all a group-less subscription gets. Quorum queues can add a broker-side
bound on redeliveries of a record that kills its consumer (``delivery_limit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

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
    Health,
    HealthStatus,
    ProducerSpec,
    Record,
)
from streamkit.errors import (
    BinderError,
    BrokerUnavailable,
    MessageTooLarge,
    PublishError,
    PublishTimeout,
    StreamkitError,
    Unroutable,
)

from . import topology, wire
from .amqp import connection_failure, declare, permanent
from .settings import (
    DEFAULT_MAX_MESSAGE_BYTES,
    RabbitConsumerOptions,
    RabbitProducerOptions,
    RabbitSettings,
)
from .subscription import RabbitSubscription

__all__ = ["RabbitBinder"]

logger = logging.getLogger(__name__)

_Options = TypeVar("_Options", bound=BaseModel)

# RabbitMQ's default; the negotiated value replaces it once connected.
_DEFAULT_FRAME_MAX = 131_072

# Records in their retries whose failure count one binder keeps.
_MAX_COUNTED_RECORDS = 100_000

# Longest a health check waits for the broker to answer.
_PING_TIMEOUT = 3.0


@dataclass(slots=True)
class _Outgoing:
    """A record ready to be written: where to, and as what."""

    exchange: str
    routing_key: str
    body: bytes
    properties: Basic.Properties
    mandatory: bool


class _FailureCounts:
    """Failed handler attempts per record (queue, message id), in this process.

    Bounded: past the limit, the records counted longest ago are forgotten.
    """

    def __init__(self, limit: int = _MAX_COUNTED_RECORDS) -> None:
        self._counts: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._limit = limit

    def get(self, record: tuple[str, str] | None) -> int:
        return 0 if record is None else self._counts.get(record, 0)

    def add(self, record: tuple[str, str] | None) -> None:
        if record is None:
            return
        self._counts[record] = self._counts.get(record, 0) + 1
        self._counts.move_to_end(record)
        while len(self._counts) > self._limit:
            self._counts.popitem(last=False)

    def forget(self, record: tuple[str, str] | None) -> None:
        if record is not None:
            self._counts.pop(record, None)


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
        # For group subscriptions (a failure moves the record to a counting copy).
        native_delivery_count=True,
        # The broker requeues a dead consumer's deliveries as soon as its TCP
        # connection closes (a host that vanishes takes up to 3 heartbeats).
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
        # The size limit is a setting, so the declared capability follows it.
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
        self._channels: dict[str, AbstractChannel] = {}
        self._channel_locks = {"publish": asyncio.Lock(), "admin": asyncio.Lock()}
        self._declared: set[str] = set()
        self._subscriptions: set[RabbitSubscription] = set()
        self._failures = _FailureCounts()

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
            self._supervise(), name=f"streamkit-rabbit-reconnect-{self.name}"
        )
        logger.info("binder %s connected to %s", self.name, self.settings.display_url)

    async def close(self) -> None:
        if not self._started:
            return
        self._started = False
        self._closing = True
        self._connected.clear()
        self._outage = "binder closed"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.close_timeout

        # Closing the connection closes every channel on the broker's side, which
        # requeues what they hold: one round trip, and a broker that stopped
        # answering costs the close timeout once, not once per subscription.
        for sub in list(self._subscriptions):
            await sub._close(close_channel=False)
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None

        connection, self._connection = self._connection, None
        self._channels.clear()
        if connection is not None:
            await self._close_connection(connection, deadline)
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
        timeout = min(_PING_TIMEOUT, self.settings.connect_timeout)
        try:
            async with asyncio.timeout(timeout):
                await self._ping()
        except Exception as exc:
            return Health(
                HealthStatus.DOWN,
                f"RabbitMQ at {self.settings.display_url} did not answer within "
                f"{timeout:g} s ({self._describe(exc) or 'timeout'})",
            )
        return Health(HealthStatus.UP, f"connected to {self.settings.display_url}")

    async def _ping(self) -> None:
        """One round trip to the broker (basic.qos on the declaration channel)."""
        connection = await self._live_connection()
        channel = await self._channel(connection, "admin")
        underlay = await channel.get_underlay_channel()
        await underlay.basic_qos(prefetch_count=0)

    async def _open_connection(self) -> AbstractConnection:
        timeout = self.settings.connect_timeout
        async with asyncio.timeout(timeout):
            return await aio_pika.connect(
                self.settings.connection_url(), timeout=timeout
            )

    def _install(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self._declared.clear()
        self._channels.clear()
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
        """Reconnect whenever the connection is lost, with backoff."""
        while not self._closing:
            await self._lost.wait()
            delay = self.settings.reconnect_delay
            while not self._closing:
                try:
                    connection = await self._open_connection()
                except Exception as exc:
                    self._outage = (
                        f"RabbitMQ at {self.settings.display_url} unreachable "
                        f"({self._describe(exc)}); retrying in {delay:g} s"
                    )
                    logger.warning("binder %s: %s", self.name, self._outage)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.settings.reconnect_max_delay)
                    continue
                self._install(connection)
                logger.info(
                    "binder %s reconnected to %s", self.name, self.settings.display_url
                )
                break

    async def _close_connection(
        self, connection: AbstractConnection, deadline: float
    ) -> None:
        transport = connection.transport
        try:
            async with asyncio.timeout_at(deadline):
                await connection.close()
        except Exception as exc:
            # A broker that stopped answering never acknowledges Connection.Close:
            # drop the socket, so that no reader task outlives the binder.
            logger.warning(
                "binder %s: RabbitMQ did not acknowledge the close (%s); dropping "
                "the connection",
                self.name,
                self._describe(exc) or "timeout",
            )
            if transport is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await transport.connection.close(exc)

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
            await asyncio.sleep(0.01)  # closed, and its callback has not run yet

    def _require_started(self) -> None:
        if not self._started:
            raise BinderError(
                f"RabbitMQ binder {self.name!r} is not started (or was closed); "
                "await start() first."
            )

    # -- provisioning ----------------------------------------------------------------

    async def provision_producer(self, spec: ProducerSpec) -> None:
        self._require_started()
        plan = topology.producer_plan(spec, self._producer_options(spec))
        await self._bounded(
            self._ensure_declared(plan), f"provision {spec.destination}"
        )

    async def _ensure_declared(self, plan: topology.Plan) -> None:
        """Declare ``plan`` once per connection, on the declaration channel."""
        keys = set(plan.keys())
        while not keys <= self._declared:
            connection = await self._live_connection()
            try:
                channel = await self._channel(connection, "admin")
                await declare(channel, plan)
            except Exception as exc:
                if permanent(exc) or not connection_failure(exc):
                    raise self._declare_error(plan, exc) from exc
                await asyncio.sleep(0.05)  # the connection dropped: wait, redo
                continue
            self._declared |= keys

    async def _channel(
        self, connection: AbstractConnection, kind: str
    ) -> AbstractChannel:
        """The ``publish`` (confirming) or ``admin`` channel, reopened when closed."""
        async with self._channel_locks[kind]:
            channel = self._channels.get(kind)
            if channel is None or channel.is_closed:
                confirms = kind == "publish"
                channel = await connection.channel(
                    publisher_confirms=confirms, on_return_raises=confirms
                )
                self._channels[kind] = channel
            return channel

    async def _bounded(self, work: Awaitable[None], what: str) -> None:
        """Run ``work`` within connect_timeout; a broker still away is unavailable."""
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                await work
        except TimeoutError as exc:
            state = self._outage if not self._connected.is_set() else "no reply"
            raise BrokerUnavailable(
                f"Could not {what} on RabbitMQ at {self.settings.display_url} within "
                f"connect_timeout={self.settings.connect_timeout:g} s ({state})."
            ) from exc

    # -- publish ---------------------------------------------------------------------

    async def publish(self, spec: ProducerSpec, records: Sequence[Record]) -> None:
        self._require_started()
        if not records:
            return
        options = self._producer_options(spec)
        outgoing = [
            self._outgoing(
                spec.destination,
                topology.routing_key(spec, options, record),
                record,
                persistent=options.persistent,
                mandatory=options.mandatory,
            )
            for record in records
        ]
        plan = topology.producer_plan(spec, options)
        await self._publish_within_deadline(spec.destination, plan, outgoing)

    async def publish_dead_letter(self, spec: ConsumerSpec, record: Record) -> None:
        # To the DLX with the group queue's base name, as Spring's republishToDlq
        # does; mandatory, so that a missing DLQ is noticed and declared again.
        self._require_started()
        options = self._consumer_options(spec)
        plan = topology.dead_letter_plan(spec, options)
        base = topology.base_queue_name(spec.destination, spec.group)
        outgoing = self._outgoing(
            options.dead_letter_exchange, base, record, persistent=True, mandatory=True
        )
        dlq = self.dead_letter_destination(spec)
        try:
            await self._publish_within_deadline(dlq, plan, [outgoing])
        except Unroutable:
            self._declared.clear()
            await self._publish_within_deadline(dlq, plan, [outgoing])

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
                "limit is its max_message_size); nothing of it was published."
            )
        properties = wire.encode_properties(record, persistent=persistent)
        self._check_frame(properties, len(body), exchange)
        if len(routing_key.encode()) > 255:
            raise PublishError(
                f"Routing key {routing_key[:40]!r}... is longer than 255 bytes."
            )
        return _Outgoing(exchange, routing_key, body, properties, mandatory)

    def _check_frame(
        self, properties: Basic.Properties, body_size: int, exchange: str
    ) -> None:
        size = wire.header_frame_size(properties, body_size)
        if size > self._frame_max:
            # The broker would close the whole connection with FRAME_ERROR.
            raise MessageTooLarge(
                f"The headers of a record for exchange {exchange!r} take {size} bytes, "
                f"more than the AMQP frame_max of {self._frame_max} bytes that holds "
                "all properties and headers of one message (the body is not limited "
                "by it); shorten or drop headers."
            )

    async def _publish_copy(
        self, queue: str, body: bytes, properties: Basic.Properties
    ) -> None:
        """Publish a copy of a received message straight to ``queue``, confirmed."""
        self._check_frame(properties, len(body), "(default)")
        item = _Outgoing("", queue, body, properties, mandatory=True)
        await self._publish_within_deadline(queue, topology.Plan(), [item])

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
                channel = await self._channel(connection, "publish")
                underlay = await channel.get_underlay_channel()
            except StreamkitError:
                raise
            except Exception as exc:
                if not connection_failure(exc):
                    raise PublishError(
                        f"Publishing to RabbitMQ failed: {self._describe(exc)}."
                    ) from exc
                await asyncio.sleep(0.05)  # the connection dropped: wait, redo
                continue
            # Written in order (aiormq serialises writes on the channel), confirmed
            # in any order.
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
                redeclared |= self._raise_unless_retriable(errors, redeclared)
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

    # -- consume ---------------------------------------------------------------------

    async def subscribe(self, spec: ConsumerSpec) -> RabbitSubscription:
        self._require_started()
        options = self._consumer_options(spec)
        plan = topology.consumer_plan(spec, options, topology.anonymous_name())
        sub = await self._subscribe(spec, plan)
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
        plan = topology.dead_letter_plan(
            spec, self._consumer_options(spec), consume=True
        )
        dlq_spec = ConsumerSpec(
            self.dead_letter_destination(spec),
            group=group,
            binding=spec.binding,
            prefetch=spec.prefetch,
            batch_size=spec.batch_size,
        )
        return await self._subscribe(dlq_spec, plan)

    async def _subscribe(
        self, spec: ConsumerSpec, plan: topology.Plan
    ) -> RabbitSubscription:
        sub = RabbitSubscription(self, spec, plan)
        await sub.start()
        self._subscriptions.add(sub)
        return sub

    # -- settle ----------------------------------------------------------------------
    # Deliveries are settled on their subscription's channel: see .subscription.

    # -- error mapping ---------------------------------------------------------------

    def _raise_unless_retriable(
        self, errors: list[BaseException], redeclared: bool
    ) -> bool:
        """Raise the typed error of a failed publish, or return to publish again
        (``True``: after declaring the topology again)."""
        for exc in errors:
            if isinstance(exc, asyncio.CancelledError):
                raise exc
            if isinstance(exc, aiormq.exceptions.PublishError):
                returned = exc.frame
                where = (
                    f"exchange {returned.exchange!r} with routing key "
                    f"{returned.routing_key!r} ({returned.reply_text})"
                    if isinstance(returned, Basic.Return)
                    else "their exchange"
                )
                raise Unroutable(
                    f"RabbitMQ returned record(s) published to {where}: no queue is "
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
                self._declared.clear()  # deleted behind our back: declare again
                return True
            if not connection_failure(exc):
                raise PublishError(
                    f"Publishing to RabbitMQ failed: {self._describe(exc)}."
                ) from exc
        return False

    def _declare_error(self, plan: topology.Plan, exc: BaseException) -> StreamkitError:
        if isinstance(exc, StreamkitError):
            return exc
        names = ", ".join(
            [e.name for e in plan.exchanges] + [q.name for q in plan.queues]
        )
        if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
            return BinderError(
                f"RabbitMQ refused to declare {names}: {exc}. An exchange or queue "
                "of that name exists with other settings (exchange_type, quorum, "
                "single_active_consumer, auto_bind_dlq, expires_ms); align the "
                "binding's options or delete the old one."
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
        if password and len(password) >= 3:
            text = text.replace(password, "***")
        return text

    def _producer_options(self, spec: ProducerSpec) -> RabbitProducerOptions:
        return _options(spec.options, RabbitProducerOptions)

    def _consumer_options(self, spec: ConsumerSpec) -> RabbitConsumerOptions:
        return _options(spec.options, RabbitConsumerOptions)


def _options(options: BaseModel, model: type[_Options]) -> _Options:
    if isinstance(options, model):
        return options
    # NoOptions (the spec's default) or another model: validate what it holds.
    return model.model_validate(options.model_dump())
