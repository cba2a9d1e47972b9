"""The Redis Streams binder.

Mapping
-------
* A destination is a stream key. Partition ``n`` of a destination with
  ``partition_count > 1`` is the stream ``<destination>-<n>``; with one partition it
  is the plain key. A producer with ``partition_count > 1`` records the count in
  the hash ``streamkit:partitions``; an unpartitioned subscriber reads the plain key
  and every partition stream that hash names when it subscribes.
* A group is a consumer group of each stream, created with ``MKSTREAM``: at ``0``
  (the whole history) for a new group, at ``$`` with ``start_from="latest"``.
* A subscription without a group reads with ``XREAD`` from the stream's last id at
  the time it subscribed: each such subscriber sees every new entry, nothing is kept
  for it.
* Each group subscription is a consumer named ``<consumer_name>`` (the binder's
  name; ``#<n>`` is appended for the n-th concurrent subscription of one binder on
  the same destination and group), so a subscription opened again by the same
  binder finds its own pending entries and reads them first.

Delivery
--------
``XREADGROUP`` in batches on a dedicated connection, blocking ``block_ms`` at a time.
The delivery count of an entry's pending-list record (``times_delivered``) is the
attempt counter, 1 + failed attempts: ``record_attempt`` raises it, and every other
re-read keeps it (``XAUTOCLAIM ... JUSTID``, ``XCLAIM ... RETRYCOUNT``), so the
retry limit holds across processes and a crash or give-back uses up no attempt.
``ack`` is ``XACK`` (concurrent acks share one round trip); ``release`` hands the
entry to this subscription again at once. Every ``claim_interval_ms`` each member
takes over entries that other members left idle for ``claim_idle_ms``
(``XAUTOCLAIM``, following the cursor through the whole pending list); a heartbeat
keeps the entries this subscription holds fresh, so a long handler is not taken
over while its process lives. A closing subscription marks what it still holds as
idle, so any member takes it over at its next scan.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, TypeVar

from pydantic import BaseModel
from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

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
    ConfigError,
    MessageTooLarge,
    PublishError,
    PublishTimeout,
)

from . import wire
from .connection import CONNECTION_ERRORS, RAW_COMMANDS, Backoff, cancel_safe, raw_reply
from .settings import (
    DEFAULT_MAX_MESSAGE_BYTES,
    RedisConsumerOptions,
    RedisProducerOptions,
    RedisSettings,
    default_consumer_name,
    redact_url,
)
from .subscription import RedisSubscription

__all__ = ["RedisBinder"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_MIN_SERVER = (6, 2)  # XAUTOCLAIM, exclusive ranges in XPENDING
# Hash of destination -> partition count, written by partitioned producers so that
# an unpartitioned subscriber knows which ``<destination>-<n>`` streams to read.
PARTITIONS_KEY = "streamkit:partitions"


# -- the binder ---------------------------------------------------------------------


class RedisBinder(Binder):
    """Binds destinations to Redis streams (see the module docstring)."""

    type_name = "redis"
    capabilities = Capabilities(
        consumer_groups=True,
        broadcast=True,
        # Entries and group state outlive every client; whether they outlive a
        # server restart is the server's persistence configuration (RDB/AOF).
        persistence=True,
        replay_for_new_group=True,
        # Kept per partition (one stream, read by one partitioned consumer);
        # unpartitioned members of a group share one stream round-robin.
        ordering=True,
        native_delivery_count=True,
        crash_recovery_seconds=RedisSettings().crash_recovery_seconds,
        lease_extension=True,
        batch=True,
        max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
    )
    settings_model = RedisSettings
    consumer_options_model = RedisConsumerOptions
    producer_options_model = RedisProducerOptions

    settings: RedisSettings

    def __init__(self, settings: BaseModel | None = None, *, name: str = "") -> None:
        super().__init__(settings, name=name)
        # Limits and recovery time are settings, so the declared capabilities follow.
        self.capabilities = replace(  # type: ignore[misc]
            type(self).capabilities,
            max_message_bytes=self.settings.max_message_bytes,
            crash_recovery_seconds=self.settings.crash_recovery_seconds,
        )
        self.consumer_name = self.settings.consumer_name or default_consumer_name()
        self._client: Redis | None = None
        self._server_version = ""
        self._subscriptions: set[RedisSubscription] = set()
        self._slots: dict[tuple[str, str], set[int]] = {}
        self._trim_warned: set[str] = set()
        self._partition_rr = itertools.count()
        self._recorded: dict[str, int] = {}

    def __repr__(self) -> str:
        return (
            f"RedisBinder(name={self.name!r}, url={redact_url(self.settings.url)!r}, "
            f"consumer_name={self.consumer_name!r})"
        )

    @property
    def url(self) -> str:
        """The server address with any password redacted."""
        return redact_url(self.settings.url)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is not None:
            return
        client = self.new_client()
        try:
            async with asyncio.timeout(
                self.settings.connect_timeout + self.settings.socket_timeout
            ):
                info = await client.info("server")
        except (*CONNECTION_ERRORS, TimeoutError, rx.RedisError) as exc:
            await client.aclose()
            raise BrokerUnavailable(
                f"Cannot reach Redis at {self.url} ({type(exc).__name__}: {exc}). "
                f"Check binders.{self.name or '<name>'}.url and that the server is "
                "running."
            ) from exc
        version = str(info.get("redis_version", "0"))
        parsed = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if parsed < _MIN_SERVER:
            await client.aclose()
            raise BinderError(
                f"Redis at {self.url} is version {version}; the Redis binder needs "
                "6.2 or newer (XAUTOCLAIM)."
            )
        self._client = client
        self._server_version = version
        logger.info(
            "binder %s connected to Redis %s at %s as consumer %s",
            self.name,
            version,
            self.url,
            self.consumer_name,
        )

    async def close(self) -> None:
        if self._client is None:
            return
        # Subscriptions first: they flush acks and hand back entries on the client.
        await asyncio.gather(*(sub.close() for sub in list(self._subscriptions)))
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        logger.info("binder %s closed", self.name)

    async def health(self) -> Health:
        client = self._client
        if client is None:
            return Health(HealthStatus.DOWN, "binder not started")
        try:
            async with asyncio.timeout(min(1.0, self.settings.socket_timeout)):
                await client.ping()
        except (*CONNECTION_ERRORS, TimeoutError, rx.RedisError) as exc:
            return Health(
                HealthStatus.DOWN, f"Redis at {self.url} does not answer: {exc}"
            )
        failing = [sub.failure for sub in self._subscriptions if sub.failure]
        if failing:
            return Health(HealthStatus.DOWN, "; ".join(failing))
        return Health(HealthStatus.UP, f"Redis {self._server_version} at {self.url}")

    def new_client(self, *, name: str | None = None, read_timeout: float = 0) -> Redis:
        """A client on the configured server; nothing is sent until first use.

        redis-py's own retries are off: every caller here has its own loop, and a
        silent retry of a blocking read would double its wait.
        """
        settings = self.settings
        options: dict[str, Any] = {
            "socket_timeout": read_timeout or settings.socket_timeout,
            "socket_connect_timeout": settings.connect_timeout,
            "retry": Retry(NoBackoff(), 0),
            "client_name": name,
        }
        if settings.username is not None:
            options["username"] = settings.username
        if settings.password is not None:
            options["password"] = settings.password.get_secret_value()
        if settings.db is not None:
            options["db"] = settings.db
        if settings.tls_ca_file is not None:
            options["ssl_ca_certs"] = settings.tls_ca_file
        client = Redis.from_url(settings.url, **options)
        pool = client.connection_pool
        pool.connection_class = cancel_safe(pool.connection_class)
        for command in RAW_COMMANDS:
            client.set_response_callback(command, raw_reply)
        return client

    def require_client(self) -> Redis:
        if self._client is None:
            raise BinderError(
                f"Redis binder {self.name!r} is not started; await start() first."
            )
        return self._client

    # -- provisioning ----------------------------------------------------------------

    async def provision_producer(self, spec: ProducerSpec) -> None:
        # XADD creates a stream on first use; there is nothing to declare ahead.
        self.require_client()
        self._warn_trimming(spec)
        try:
            await self._record_partitions(spec)
        except rx.RedisError as exc:
            raise self.translate_error(exc, f"provision {spec.destination!r}") from exc

    async def _record_partitions(self, spec: ProducerSpec) -> None:
        """Note a partitioned destination's count for unpartitioned subscribers.

        Only ever raised: a producer asking for fewer partitions must not hide
        streams that still hold entries.
        """
        count, dest = spec.partition_count, spec.destination
        if count <= 1 or self._recorded.get(dest, 0) >= count:
            return
        client = self.require_client()
        known = await client.hget(PARTITIONS_KEY, dest)
        if known is None or int(known) < count:
            await client.hset(PARTITIONS_KEY, dest, count)
        self._recorded[dest] = max(count, int(known or 0))

    async def streams_for(self, spec: ConsumerSpec) -> dict[str, int]:
        """The streams ``spec`` reads, each with its partition number."""
        if spec.partition_count > 1:
            return {f"{spec.destination}-{p}": p for p in spec.partitions()}
        if spec.partitioned:
            return {spec.destination: 0} if 0 in spec.partitions() else {}
        # An unpartitioned subscriber gets every partition, as on the other
        # binders: the plain key plus each stream a partitioned producer announced.
        known = await self.require_client().hget(PARTITIONS_KEY, spec.destination)
        streams = {spec.destination: 0}
        streams.update({f"{spec.destination}-{p}": p for p in range(int(known or 0))})
        return streams

    def stream_for(self, spec: ProducerSpec, record: Record) -> str:
        count = spec.partition_count
        if count <= 1 and not record.partition:
            return spec.destination
        if record.partition is not None:
            partition = record.partition
        elif record.key is not None:
            partition = zlib.crc32(record.key) % count
        else:
            partition = 0
        return f"{spec.destination}-{partition}"

    async def ensure_group(self, stream: str, group: str, start: str) -> None:
        """Create ``group`` on ``stream`` (and the stream) unless it exists."""
        try:
            await self.require_client().xgroup_create(
                stream, group, start, mkstream=True
            )
        except rx.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        else:
            logger.info(
                "created consumer group %s on stream %s at %s", group, stream, start
            )

    def _warn_trimming(self, spec: ProducerSpec) -> None:
        options = spec.options
        if not isinstance(options, RedisProducerOptions) or not options.trims:
            return
        if spec.destination in self._trim_warned:
            return
        self._trim_warned.add(spec.destination)
        logger.warning(
            "stream %s is trimmed on publish (%s); trimming drops entries whether or "
            "not every group has read and acknowledged them",
            spec.destination,
            f"max_len={options.max_len}"
            if options.max_len is not None
            else f"max_age_ms={options.max_age_ms}",
        )

    # -- publish ---------------------------------------------------------------------

    async def publish(self, spec: ProducerSpec, records: Sequence[Record]) -> None:
        client = self.require_client()
        self._check_sizes(spec, records)
        self._warn_trimming(spec)
        if spec.partition_count > 1 and spec.destination not in self._recorded:
            try:
                await self._record_partitions(spec)
            except CONNECTION_ERRORS as exc:
                # The records matter more; the note is tried again next publish.
                logger.debug(
                    "could not record partitions of %s: %s", spec.destination, exc
                )
            except rx.RedisError as exc:
                raise self.translate_error(
                    exc, f"publish to {spec.destination!r}"
                ) from exc
        commands = [
            self._xadd_args(spec, record, self.stream_for(spec, record))
            for record in records
        ]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.publish_timeout
        chunk = self.settings.publish_chunk
        for start in range(0, len(commands), chunk):
            await self._publish_chunk(
                client, spec, commands[start : start + chunk], deadline
            )
        logger.debug("published %d records to %s", len(records), spec.destination)

    def _check_sizes(self, spec: ProducerSpec, records: Sequence[Record]) -> None:
        limit = self.settings.max_message_bytes
        for record in records:
            size = wire.record_size(record)
            if size > limit:
                raise MessageTooLarge(
                    f"A record of {size} bytes for stream {spec.destination!r} exceeds "
                    f"max_message_bytes={limit} of Redis binder {self.name!r}; nothing "
                    "of this batch was published. Raise max_message_bytes (Redis "
                    "accepts up to 512 MB) or send a reference to the payload."
                )

    def _xadd_args(self, spec: ProducerSpec, record: Record, stream: str) -> list[Any]:
        args: list[Any] = ["XADD", stream]
        options = spec.options
        if isinstance(options, RedisProducerOptions):
            if options.max_len is not None:
                args += ["MAXLEN", "~", options.max_len]
            elif options.max_age_ms is not None:
                oldest = int(time.time() * 1000) - options.max_age_ms
                args += ["MINID", "~", f"{oldest}-0"]
        args.append("*")
        for field, value in wire.encode_record(record).items():
            args += [field, value]
        return args

    async def _publish_chunk(
        self,
        client: Redis,
        spec: ProducerSpec,
        commands: list[list[Any]],
        deadline: float,
    ) -> None:
        # A chunk that failed on the connection is sent again whole: entries it had
        # already added are duplicated, never lost (at-least-once).
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    async with client.pipeline(transaction=False) as pipe:
                        for args in commands:
                            pipe.execute_command(*args)
                        await pipe.execute()
                return
            except TimeoutError as exc:
                raise self._publish_timeout(spec, exc) from exc
            except CONNECTION_ERRORS as exc:
                delay = backoff.next()
                if loop.time() + delay >= deadline:
                    raise self._publish_timeout(spec, exc) from exc
                logger.debug(
                    "publish to %s failed (%s); retrying", spec.destination, exc
                )
                await asyncio.sleep(delay)
            except rx.RedisError as exc:
                raise self.translate_error(
                    exc, f"publish to {spec.destination!r}"
                ) from exc

    def _publish_timeout(
        self, spec: ProducerSpec, exc: BaseException
    ) -> PublishTimeout:
        return PublishTimeout(
            f"Redis at {self.url} did not take the records for stream "
            f"{spec.destination!r} within publish_timeout="
            f"{self.settings.publish_timeout:g} s (last error: "
            f"{exc or type(exc).__name__})."
        )

    # -- consume ---------------------------------------------------------------------

    async def subscribe(self, spec: ConsumerSpec) -> RedisSubscription:
        self.require_client()
        if spec.start_from not in ("earliest", "latest"):
            raise ConfigError(
                f"start_from must be 'earliest' or 'latest', not {spec.start_from!r}.",
                key="start_from",
            )
        try:
            streams = await self.streams_for(spec)
            sub = await self._attach(spec, streams)
        except rx.RedisError as exc:
            raise self.translate_error(
                exc, f"subscribe to {spec.destination!r}"
            ) from exc
        self._subscriptions.add(sub)
        logger.info(
            "subscribed to %s (group %s) as %s",
            spec.destination,
            spec.group,
            sub.consumer or "anonymous reader",
        )
        return sub

    async def _attach(
        self, spec: ConsumerSpec, streams: dict[str, int]
    ) -> RedisSubscription:
        if spec.group is None:
            positions = {stream: await self._last_id(stream) for stream in streams}
            return RedisSubscription(self, spec, streams, positions=positions)
        start = "$" if spec.start_from == "latest" else "0"
        for stream in streams:
            await self.ensure_group(stream, spec.group, start)
        consumer = self._take_slot(spec)
        return RedisSubscription(self, spec, streams, consumer=consumer)

    async def _last_id(self, stream: str) -> str:
        # Reading from an explicit id, not "$", so that an entry added between
        # subscribe() returning and the first read is not missed.
        try:
            info = await self.require_client().xinfo_stream(stream)
        except rx.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return "0-0"
            raise
        last = info["last-generated-id"]
        return last.decode() if isinstance(last, bytes) else str(last)

    def _take_slot(self, spec: ConsumerSpec) -> str:
        taken = self._slots.setdefault((spec.destination, spec.group or ""), set())
        slot = next(n for n in itertools.count() if n not in taken)
        taken.add(slot)
        return self.consumer_name if slot == 0 else f"{self.consumer_name}#{slot + 1}"

    def forget(self, sub: RedisSubscription) -> None:
        self._subscriptions.discard(sub)
        if sub.consumer is not None:
            taken = self._slots.get((sub.spec.destination, sub.spec.group or ""), set())
            name = sub.consumer
            slot = 0 if name == self.consumer_name else int(name.rsplit("#", 1)[1]) - 1
            taken.discard(slot)

    # -- error mapping ---------------------------------------------------------------

    def translate_error(self, exc: rx.RedisError, action: str) -> BinderError:
        """The streamkit error for a redis-py error (the caller chains it)."""
        if isinstance(exc, CONNECTION_ERRORS):
            return BrokerUnavailable(
                f"Could not {action}: Redis at {self.url} is unreachable ({exc})."
            )
        if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError):
            return BrokerUnavailable(
                f"Could not {action}: Redis at {self.url} refused the credentials "
                f"({exc}); check the username and password settings."
            )
        text = str(exc)
        if text.startswith("WRONGTYPE"):
            return BinderError(
                f"Could not {action}: the key exists in Redis but is not a stream "
                f"({text}). Use another destination name or delete the key."
            )
        if text.startswith("OOM"):
            return PublishError(
                f"Could not {action}: Redis at {self.url} is out of memory ({text}); "
                "trim the streams (max_len / max_age_ms) or raise maxmemory."
            )
        if action.startswith("publish"):
            return PublishError(f"Could not {action}: Redis answered {text!r}.")
        return BinderError(f"Could not {action}: Redis answered {text!r}.")
