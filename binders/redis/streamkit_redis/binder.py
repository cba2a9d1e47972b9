"""The Redis Streams binder.

Mapping
-------
* A destination is a stream key. Partition ``n`` of a destination with
  ``partition_count > 1`` is the stream ``<destination>-<n>``; with one partition it
  is the plain key.
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
``Delivery.attempt`` is the entry's delivery count (``times_delivered`` of its
pending entry), so the retry limit holds across processes. ``ack`` is ``XACK``
(concurrent acks share one round trip); ``release`` hands the entry to this
subscription again at once, counting one more delivery. Every
``claim_interval_ms`` each member takes over entries that other members left idle
for ``claim_idle_ms`` (``XAUTOCLAIM``, following the cursor through the whole
pending list); a heartbeat keeps the entries this subscription holds fresh, so a
long handler is not taken over while its process lives. A closing subscription
marks what it still holds as idle, so any member takes it over at its next scan.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
import zlib
from collections.abc import Coroutine, Sequence
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
    ConfigError,
    MessageTooLarge,
    PublishError,
    PublishTimeout,
)

from . import scripts, wire
from .settings import (
    DEFAULT_MAX_MESSAGE_BYTES,
    RedisConsumerOptions,
    RedisProducerOptions,
    RedisSettings,
    default_consumer_name,
    redact_url,
)

__all__ = ["RedisBinder", "RedisSubscription"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Redis replies are parsed in wire.py: these commands bypass redis-py's callbacks.
_RAW_COMMANDS = ("XAUTOCLAIM", "XPENDING", "XREADGROUP", "XREAD", "XCLAIM", "EVALSHA")

# Connection failures: the broker is away (or restarting); retry with backoff.
_CONNECTION_ERRORS = (rx.ConnectionError, rx.TimeoutError, OSError)

_MIN_SERVER = (6, 2)  # XAUTOCLAIM, exclusive ranges in XPENDING


def _raw_reply(response: Any, **options: Any) -> Any:
    return response


def _is_nogroup(exc: BaseException) -> bool:
    return isinstance(exc, rx.ResponseError) and "NOGROUP" in str(exc)


_SAFE_CLASSES: dict[type[Any], type[Any]] = {}


def _cancel_safe(connection_class: type[Any]) -> type[Any]:
    """``connection_class`` with sends bounded by ``asyncio.timeout``.

    redis-py bounds a send with ``asyncio.wait_for``, which on Python 3.11 swallows
    a cancellation that arrives as the send completes: the cancelled command then
    runs on (a blocking read blocks on) and the caller never sees the cancel.
    """
    found = _SAFE_CLASSES.get(connection_class)
    if found is None:
        found = type(
            f"CancelSafe{connection_class.__name__}",
            (_CancelSafeSend, connection_class),
            {},
        )
        _SAFE_CLASSES[connection_class] = found
    return found


class _CancelSafeSend:
    socket_timeout: float | None

    async def send_packed_command(
        self, command: Any, check_health: bool = True
    ) -> None:
        timeout = self.socket_timeout
        send = super().send_packed_command  # type: ignore[misc]
        if not timeout:
            await send(command, check_health)
            return
        self.socket_timeout = None
        try:
            async with asyncio.timeout(timeout):
                await send(command, check_health)
        except TimeoutError as exc:
            # The cancelled send already dropped the connection.
            raise rx.TimeoutError("Timeout writing to socket") from exc
        finally:
            self.socket_timeout = timeout


class _Backoff:
    """Exponential delays with full jitter, so restarts do not stampede."""

    def __init__(self, first: float = 0.05, cap: float = 5.0) -> None:
        self._first = first
        self._cap = cap
        self._failures = 0

    @property
    def failing(self) -> bool:
        return self._failures > 0

    def next(self) -> float:
        ceiling = min(self._cap, self._first * 2**self._failures)
        self._failures += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._failures = 0


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
        except (*_CONNECTION_ERRORS, TimeoutError, rx.RedisError) as exc:
            await client.aclose()
            raise BrokerUnavailable(
                f"Cannot reach Redis at {self.url} ({type(exc).__name__}: {exc}). "
                "Check the binder's url setting (STREAMKIT_REDIS_URL in the tests) "
                "and that the server is running."
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
        except (*_CONNECTION_ERRORS, TimeoutError, rx.RedisError) as exc:
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
        pool.connection_class = _cancel_safe(pool.connection_class)
        for command in _RAW_COMMANDS:
            client.set_response_callback(command, _raw_reply)
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

    def streams_for(self, spec: ConsumerSpec) -> list[str]:
        if spec.partition_count <= 1:
            return [spec.destination] if 0 in spec.partitions() else []
        return [f"{spec.destination}-{p}" for p in spec.partitions()]

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
        backoff = _Backoff()
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
            except _CONNECTION_ERRORS as exc:
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
        streams = self.streams_for(spec)
        try:
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
        self, spec: ConsumerSpec, streams: list[str]
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
        if isinstance(exc, _CONNECTION_ERRORS):
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


# -- subscriptions --------------------------------------------------------------------


class _Acker:
    """Sends XACKs; acks that arrive while one round trip is out share the next."""

    def __init__(self, sub: RedisSubscription) -> None:
        self._sub = sub
        self._queued: dict[str, list[str]] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def holds(self, stream: str, entry_id: str) -> bool:
        return entry_id in self._queued.get(stream, ())

    async def ack(self, stream: str, entry_id: str, *, wait: bool = True) -> None:
        self._queued.setdefault(stream, []).append(entry_id)
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        if wait:
            # The XACK goes out even when the caller is cancelled meanwhile.
            await asyncio.shield(future)

    async def _run(self) -> None:
        backoff = _Backoff()
        while self._queued:
            batch, waiters = self._queued, self._waiters
            self._queued, self._waiters = {}, []
            try:
                await self._send(batch)
            except Exception as exc:
                if self._closing:
                    logger.warning(
                        "could not flush %d acks at close (%s); those entries will "
                        "be delivered again",
                        sum(map(len, batch.values())),
                        exc,
                    )
                    self._release(waiters)
                    return
                for stream, ids in batch.items():
                    self._queued.setdefault(stream, [])[:0] = ids
                self._waiters[:0] = waiters
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            self._release(waiters)

    async def _send(self, batch: dict[str, list[str]]) -> None:
        client = self._sub.client
        group = self._sub.spec.group
        async with client.pipeline(transaction=False) as pipe:
            for stream, ids in batch.items():
                pipe.xack(stream, group, *ids)
            await pipe.execute()

    @staticmethod
    def _release(waiters: list[asyncio.Future[None]]) -> None:
        for future in waiters:
            if not future.done():
                future.set_result(None)

    async def close(self, timeout: float) -> None:
        self._closing = True
        task = self._task
        if task is not None and not task.done():
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                task.cancel()
                await asyncio.wait({task})
        self._release(self._waiters)
        self._queued.clear()


class RedisSubscription(Subscription):
    """A consumer of a group (``consumer`` set) or an anonymous reader."""

    def __init__(
        self,
        binder: RedisBinder,
        spec: ConsumerSpec,
        streams: list[str],
        *,
        consumer: str | None = None,
        positions: dict[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.consumer = consumer
        self.failure = ""
        self._binder = binder
        self._client = binder.require_client()
        self._settings = binder.settings
        self._streams = streams
        self._partition_of = {
            s: (p if spec.partition_count > 1 else 0)
            for s, p in zip(streams, spec.partitions(), strict=False)
        }
        self._positions = positions or {}
        options = spec.options
        idle = getattr(options, "claim_idle_ms", None) or self._settings.claim_idle_ms
        self._claim_idle_ms = idle
        self._claim_interval = (
            self._settings.claim_interval_s
            if idle == self._settings.claim_idle_ms
            else max(0.05, min(idle / 2000, 5.0))
        )
        self._block_ms = self._settings.block_ms
        # The blocking read's socket timeout outlasts the block (CASES.md C14).
        self._reader = binder.new_client(
            name=consumer,
            read_timeout=self._settings.socket_timeout + self._block_ms / 1000,
        )
        self._in_flight: dict[tuple[str, str], Delivery] = {}
        self._released: list[Delivery] = []
        # Streams whose own pending list must be read again: at start (entries an
        # earlier incarnation held) and after a cut-off command.
        self._resync: set[str] = set(streams)
        self._resync_after: dict[str, str] = {}
        self._claim_cursor: dict[str, str] = dict.fromkeys(streams, "0-0")
        self._next_claim = 0.0
        self._rotation = itertools.count()
        # Settled: room for more. Interrupt: a blocking read must end (a give-back to
        # hand out, or close). Closing: backoff pauses end.
        self._settled = asyncio.Event()
        self._interrupt = asyncio.Event()
        self._closing = asyncio.Event()
        self._closed = False
        self._backoff = _Backoff()
        self._acker = _Acker(self)
        self._heartbeat: asyncio.Task[None] | None = None
        if consumer is not None and streams:
            self._heartbeat = asyncio.create_task(self._keep_leases())

    @property
    def client(self) -> Redis:
        return self._client

    @property
    def group(self) -> str:
        assert self.spec.group is not None
        return self.spec.group

    # -- consume ---------------------------------------------------------------------

    async def next_batch(self) -> list[Delivery] | None:
        while not self._closed:
            room = min(self.spec.batch_size, self.spec.prefetch - len(self._in_flight))
            if room <= 0 or not self._streams:
                await self._wait()
                continue
            try:
                batch = await self._fetch(room)
            except asyncio.CancelledError:
                await self._lost_step()
                raise
            except _CONNECTION_ERRORS as exc:
                await self._on_connection_error(exc)
                continue
            except rx.RedisError as exc:
                await self._on_server_error(exc)
                continue
            self._recovered()
            if batch:
                return batch
        return None

    async def _fetch(self, room: int) -> list[Delivery]:
        self._interrupt.clear()
        if self._released:
            return await self._redeliver(room)
        if self.consumer is None:
            return await self._read_new(room)
        if self._resync:
            batch = await self._read_own_pending(room)
            if batch:
                return batch
        if time.monotonic() >= self._next_claim:
            batch = await self._claim(room)
            if batch:
                return batch
        return await self._read_new(room)

    async def _read_new(self, room: int) -> list[Delivery]:
        streams = self._streams
        shift = next(self._rotation) % len(streams)
        streams = streams[shift:] + streams[:shift]
        # COUNT applies per stream: ask each for its share so the total stays in room.
        if len(streams) > room:
            streams = streams[:room]
        count = max(1, room // len(streams))
        block = self._block_ms
        if self.consumer is not None:
            until_claim = int((self._next_claim - time.monotonic()) * 1000)
            block = max(1, min(block, until_claim))
            command: list[Any] = ["XREADGROUP", "GROUP", self.group, self.consumer]
            ids = [">"] * len(streams)
        else:
            command = ["XREAD"]
            ids = [self._positions[s] for s in streams]
        command += ["COUNT", count, "BLOCK", block, "STREAMS", *streams, *ids]
        try:
            raw = await self._interruptible(self._reader.execute_command(*command))
        except rx.TimeoutError:
            # Should a block still outlive the socket timeout, it is an empty read
            # (C14): the connection was dropped, what it carried is in the PEL.
            logger.debug("blocking read on %s timed out; reading again", streams)
            await self._lost_step()
            return []
        batch: list[Delivery] = []
        for stream, entries in wire.parse_stream_reply(raw).items():
            if self.consumer is None and entries:
                self._positions[stream] = entries[-1].id
            batch += await self._deliver(stream, entries, None)
        return batch

    async def _interruptible(self, command: Coroutine[Any, Any, T]) -> T | None:
        """Run a blocking read; a release or close cuts it short (answer ``None``).

        Cutting it short cancels the command, so the connection is dropped (a reply
        may be on its way) and the own pending list is read again.
        """
        read = asyncio.ensure_future(command)
        woken = asyncio.ensure_future(self._interrupt.wait())
        try:
            await asyncio.wait({read, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            if not read.done():
                read.cancel()
                await self._lost_step()
                await asyncio.wait({read})
        if read.cancelled():
            return None
        return read.result()

    async def _lost_step(self) -> None:
        """A command was cut off: drop its connection, re-read what it may have got."""
        await self._reader.connection_pool.disconnect()
        if self.consumer is None:
            return
        self._resync.update(self._streams)
        self._resync_after.clear()

    async def _read_own_pending(self, room: int) -> list[Delivery]:
        for stream in sorted(self._resync):
            after = self._resync_after.get(stream)
            rows = wire.parse_pending(
                await self.client.execute_command(
                    "XPENDING",
                    stream,
                    self.group,
                    f"({after}" if after else "-",
                    "+",
                    room + len(self._in_flight),
                    self.consumer,
                )
            )
            if not rows:
                self._resync.discard(stream)
                self._resync_after.pop(stream, None)
                continue
            self._resync_after[stream] = rows[-1][0]
            ids = [
                row[0]
                for row in rows
                if (stream, row[0]) not in self._in_flight
                and not self._acker.holds(stream, row[0])
            ][:room]
            batch = await self._claim_own(stream, ids)
            if batch:
                return batch
        return []

    async def _claim(self, room: int) -> list[Delivery]:
        streams = [s for s in self._streams if self._claim_cursor[s] != "0-0"]
        streams = streams or self._streams
        batch: list[Delivery] = []
        for stream in streams:
            raw = await self.client.execute_command(
                "XAUTOCLAIM",
                stream,
                self.group,
                self.consumer,
                self._claim_idle_ms,
                self._claim_cursor[stream],
                "COUNT",
                room - len(batch),
                # JUSTID leaves the delivery count alone: it counts failed attempts.
                "JUSTID",
            )
            reply = wire.parse_autoclaim(raw)
            self._claim_cursor[stream] = reply.cursor
            for entry_id in reply.deleted:
                await self._acker.ack(stream, entry_id, wait=False)
            fresh = [i for i in reply.claimed if (stream, i) not in self._in_flight]
            if fresh:
                logger.info(
                    "claimed %d entries of %s idle for %d ms or more",
                    len(fresh),
                    stream,
                    self._claim_idle_ms,
                )
                batch += await self._claim_own(stream, fresh)
            if len(batch) >= room:
                break
        done = all(cursor == "0-0" for cursor in self._claim_cursor.values())
        # Page on at once while a cursor is open, else wait for the next interval.
        self._next_claim = time.monotonic() + (self._claim_interval if done else 0)
        return batch

    async def _claim_own(self, stream: str, ids: list[str]) -> list[Delivery]:
        """Hand out entries this consumer owns, with their counts."""
        if not ids:
            return []
        rows = await self._run_own(stream, "fetch", ids)
        entries = [wire.Entry(i, wire._pairs(fields)) for i, fields, _ in rows]
        return await self._deliver(stream, entries, {i: n for i, _, n in rows})

    async def _run_own(
        self, stream: str, mode: str, ids: Sequence[str]
    ) -> list[tuple[str, Any, int]]:
        raw = await self.client.eval(
            scripts.CLAIM_OWN, 1, stream, self.group, self.consumer or "", mode, *ids
        )
        return [(wire._text(row[0]), row[1], int(row[2])) for row in raw or ()]

    async def _deliver(
        self, stream: str, entries: list[wire.Entry], counts: dict[str, int] | None
    ) -> list[Delivery]:
        batch: list[Delivery] = []
        for entry in entries:
            if entry.fields is None:
                # Deleted (XDEL or trimming) while pending: nothing left to deliver.
                logger.warning(
                    "pending entry %s of %s was deleted; acking it", entry.id, stream
                )
                if self.consumer is not None:
                    await self._acker.ack(stream, entry.id, wait=False)
                continue
            value, headers, key = wire.decode_entry(entry.fields)
            delivery = Delivery(
                value=value,
                headers=headers,
                key=key,
                partition=self._partition_of.get(stream, 0),
                id=entry.id,
                destination=self.spec.destination,
                subscription=self,
                attempt=(counts or {}).get(entry.id, 1),
                token=stream,
            )
            self._in_flight[(stream, entry.id)] = delivery
            batch.append(delivery)
        if batch:
            logger.debug("delivering %d entries of %s", len(batch), stream)
        return batch

    async def _redeliver(self, room: int) -> list[Delivery]:
        taken, self._released = self._released[:room], self._released[room:]
        if self.consumer is None:
            for delivery in taken:
                self._in_flight[(delivery.token, delivery.id)] = delivery
            return taken
        batch: list[Delivery] = []
        by_stream: dict[str, list[str]] = {}
        for delivery in taken:
            by_stream.setdefault(delivery.token, []).append(delivery.id)
        try:
            for stream, ids in by_stream.items():
                batch += await self._claim_own(stream, ids)
        except BaseException:
            # Whatever was not handed out is still in the own pending list.
            self._resync.update(by_stream)
            raise
        return batch

    async def _wait(self) -> None:
        await self._settled.wait()
        self._settled.clear()

    # -- failures --------------------------------------------------------------------

    async def _on_connection_error(self, exc: BaseException) -> None:
        if self._closed:
            return
        if not self._backoff.failing:
            logger.warning(
                "lost Redis at %s while consuming %s (%s); reconnecting with backoff",
                self._binder.url,
                self.spec.destination,
                exc,
            )
        self.failure = f"consumer of {self.spec.destination} cannot reach Redis: {exc}"
        await self._lost_step()
        await self._pause()

    async def _on_server_error(self, exc: rx.RedisError) -> None:
        if _is_nogroup(exc) and self.spec.group is not None:
            self.failure = (
                f"consumer group {self.group} of {self.spec.destination} lost"
            )
            await self._pause()
            await self._recreate_groups()
            return
        # Anything else persists (a key of the wrong type, ACL): stay loud, keep trying.
        error = self._binder.translate_error(exc, f"consume {self.spec.destination!r}")
        self.failure = str(error)
        logger.error("%s Retrying with backoff.", error)
        await self._lost_step()
        await self._pause()

    async def _recreate_groups(self) -> None:
        # The stream or group vanished (FLUSHALL, a restart without persistence): a
        # group made again at 0 reads whatever was added since.
        logger.warning(
            "consumer group %s of %s is gone (FLUSHALL or a Redis restart without "
            "persistence?); creating it again at the start of the stream",
            self.group,
            self.spec.destination,
        )
        for stream in self._streams:
            await self._binder.ensure_group(stream, self.group, "0")
            self._claim_cursor[stream] = "0-0"
        self._resync = set(self._streams)
        self._resync_after.clear()

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._backoff.next()):
                await self._closing.wait()

    def _recovered(self) -> None:
        if self._backoff.failing:
            logger.info("consumer of %s reconnected to Redis", self.spec.destination)
        self._backoff.reset()
        self.failure = ""

    # -- settle ----------------------------------------------------------------------

    async def ack(self, delivery: Delivery) -> None:
        if (
            self._closed
            or self._in_flight.pop((delivery.token, delivery.id), None) is None
        ):
            return
        self._settled.set()
        if self.consumer is not None:
            await self._acker.ack(delivery.token, delivery.id)

    async def release(self, delivery: Delivery) -> None:
        if (
            self._closed
            or self._in_flight.pop((delivery.token, delivery.id), None) is None
        ):
            return
        self._released.append(delivery)
        self._settled.set()
        self._interrupt.set()

    async def record_attempt(self, delivery: Delivery) -> None:
        if (
            self.consumer is None
            or (delivery.token, delivery.id) not in self._in_flight
        ):
            return
        await self._own_best_effort(delivery.token, "bump", [delivery.id])

    async def extend(self, delivery: Delivery) -> None:
        if (
            self.consumer is None
            or (delivery.token, delivery.id) not in self._in_flight
        ):
            return
        await self._own_best_effort(delivery.token, "touch", [delivery.id])

    async def _keep_leases(self) -> None:
        # Touch everything held at a third of the idle time, so a slow handler keeps
        # its entries while its process lives; a dead process stops touching.
        interval = self._claim_idle_ms / 3000
        while not self._closed:
            await asyncio.sleep(interval)
            by_stream: dict[str, list[str]] = {}
            for stream, entry_id in list(self._in_flight):
                by_stream.setdefault(stream, []).append(entry_id)
            for stream, ids in by_stream.items():
                for start in range(0, len(ids), 256):
                    await self._own_best_effort(
                        stream, "touch", ids[start : start + 256]
                    )

    async def _own_best_effort(self, stream: str, mode: str, ids: list[str]) -> None:
        try:
            await self._run_own(stream, mode, ids)
        except (*_CONNECTION_ERRORS, rx.RedisError, BinderError) as exc:
            logger.debug(
                "could not %s %d entries of %s: %s", mode, len(ids), stream, exc
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for event in (self._settled, self._interrupt, self._closing):
            event.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.wait({self._heartbeat})
        timeout = self._settings.socket_timeout
        if self.consumer is not None:
            await self._acker.close(timeout)
        self._in_flight.clear()
        self._released.clear()
        if self.consumer is not None:
            try:
                async with asyncio.timeout(timeout):
                    await self._leave_group()
            except (*_CONNECTION_ERRORS, TimeoutError, rx.RedisError) as exc:
                logger.warning(
                    "could not hand back the pending entries of %s at close (%s); "
                    "members take them over after claim_idle_ms",
                    self.consumer,
                    exc,
                )
        await self._reader.aclose()
        self._binder.forget(self)
        logger.info(
            "subscription to %s (group %s) closed",
            self.spec.destination,
            self.spec.group,
        )

    async def _leave_group(self) -> None:
        """Expire what this consumer still holds; remove it when it holds nothing."""
        for stream in self._streams:
            after: str | None = None
            while True:
                rows = wire.parse_pending(
                    await self.client.execute_command(
                        "XPENDING",
                        stream,
                        self.group,
                        f"({after}" if after else "-",
                        "+",
                        256,
                        self.consumer,
                    )
                )
                if not rows:
                    break
                after = rows[-1][0]
                await self._run_own(stream, "expire", [row[0] for row in rows])
            await self.client.eval(
                scripts.DELETE_IDLE_CONSUMER, 1, stream, self.group, self.consumer or ""
            )
