"""A subscription of the Redis binder: a group consumer or an anonymous reader."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from redis import exceptions as rx
from redis.asyncio import Redis

from streamkit.binder import ConsumerSpec, Delivery, Subscription
from streamkit.errors import BinderError

from . import scripts, wire
from .connection import CONNECTION_ERRORS, Backoff, execute, is_nogroup

if TYPE_CHECKING:
    from .binder import RedisBinder

__all__ = ["RedisSubscription"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _Acker:
    """Sends XACKs in the background; acks arriving meanwhile share the next trip.

    ``ack`` returns once the XACK is queued, so a loop that acks one delivery at a
    time does not pay a round trip for each. It waits for the XACK only while the
    backlog is long or Redis is away (backpressure); ``close`` flushes the queue.
    An ack lost with its process leaves the entry pending: it is delivered again.
    """

    MAX_BACKLOG = 1024

    def __init__(self, sub: RedisSubscription) -> None:
        self._sub = sub
        self._queued: dict[str, list[str]] = {}
        self._sending: dict[str, list[str]] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failing = False

    def holds(self, stream: str, entry_id: str) -> bool:
        return entry_id in self._queued.get(
            stream, ()
        ) or entry_id in self._sending.get(stream, ())

    async def ack(self, stream: str, entry_id: str, *, wait: bool = False) -> None:
        self._queued.setdefault(stream, []).append(entry_id)
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        backlog = sum(len(ids) for ids in self._queued.values())
        if wait or self._failing or backlog > self.MAX_BACKLOG:
            # The XACK goes out even when the caller is cancelled meanwhile.
            await asyncio.shield(future)

    async def _run(self) -> None:
        backoff = Backoff()
        while self._queued:
            batch, waiters = self._queued, self._waiters
            self._queued, self._waiters, self._sending = {}, [], batch
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
                self._failing = True
                for stream, ids in batch.items():
                    self._queued.setdefault(stream, [])[:0] = ids
                self._waiters[:0] = waiters
                await asyncio.sleep(backoff.next())
                continue
            finally:
                self._sending = {}
            backoff.reset()
            self._failing = False
            self._release(waiters)

    async def _send(self, batch: dict[str, list[str]]) -> None:
        client = self._sub.client
        async with client.pipeline(transaction=False) as pipe:
            for stream, ids in batch.items():
                pipe.xack(stream, self._sub.group, *ids)
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
        streams: dict[str, int],
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
        # Stream key -> the partition its deliveries report.
        self._partition_of = dict(streams)
        self._streams = list(streams)
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
        self._backoff = Backoff()
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
            except CONNECTION_ERRORS as exc:
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
            raw = await self._interruptible(execute(self._reader, *command))
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
                await execute(
                    self.client,
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
            candidates = [
                row[0]
                for row in rows
                if (stream, row[0]) not in self._in_flight
                and not self._acker.holds(stream, row[0])
            ]
            ids = candidates[:room]
            # Page on after the last id handed out, so none past the room is skipped.
            self._resync_after[stream] = (
                ids[-1] if len(candidates) > room else rows[-1][0]
            )
            batch = await self._claim_own(stream, ids)
            if batch:
                return batch
        return []

    async def _claim(self, room: int) -> list[Delivery]:
        streams = [s for s in self._streams if self._claim_cursor[s] != "0-0"]
        streams = streams or self._streams
        batch: list[Delivery] = []
        for stream in streams:
            raw = await execute(
                self.client,
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
                await self._acker.ack(stream, entry_id)
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
        entries = [wire.Entry(i, wire.pairs(fields)) for i, fields, _ in rows]
        return await self._deliver(stream, entries, {i: n for i, _, n in rows})

    async def _run_own(
        self, stream: str, mode: str, ids: Sequence[str]
    ) -> list[tuple[str, Any, int]]:
        raw = await self.client.eval(
            scripts.CLAIM_OWN, 1, stream, self.group, self.consumer or "", mode, *ids
        )
        return [(wire.text(row[0]), row[1], int(row[2])) for row in raw or ()]

    async def _deliver(
        self, stream: str, entries: list[wire.Entry], counts: dict[str, int] | None
    ) -> list[Delivery]:
        batch: list[Delivery] = []
        for entry in entries:
            if (stream, entry.id) in self._in_flight:
                # Already handed out (a give-back raced a re-read): never twice.
                continue
            if entry.fields is None:
                # Deleted (XDEL or trimming) while pending: nothing left to deliver.
                logger.warning(
                    "pending entry %s of %s was deleted; acking it", entry.id, stream
                )
                if self.consumer is not None:
                    await self._acker.ack(stream, entry.id)
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
        if is_nogroup(exc) and self.spec.group is not None:
            self.failure = (
                f"consumer group {self.group} of {self.spec.destination} lost"
            )
            await self._pause()
            try:
                await self._recreate_groups()
            except (*CONNECTION_ERRORS, rx.RedisError) as again:
                # The next read meets the same error and waits a longer backoff.
                logger.warning("could not create group %s again: %s", self.group, again)
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
        except (*CONNECTION_ERRORS, rx.RedisError, BinderError) as exc:
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
            except (*CONNECTION_ERRORS, TimeoutError, rx.RedisError) as exc:
                # Without its group (deleted, or a restart lost it) nothing is held.
                log = logger.debug if is_nogroup(exc) else logger.warning
                log(
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
                    await execute(
                        self.client,
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
