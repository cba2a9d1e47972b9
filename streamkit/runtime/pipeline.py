"""The consume -> decode -> handle -> publish -> ack pipeline of one input binding,
and the output side shared by processors, producers and the bridge."""

from __future__ import annotations

import asyncio
import itertools
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import converters
from ..binder import Binder, ConsumerSpec, Delivery, ProducerSpec, Record, Subscription
from ..errors import (
    BinderError,
    ConversionError,
    MessageTooLarge,
    PublishError,
    StreamkitError,
    Unroutable,
)
from ..message import Headers, Message
from .bindings import BoundFunction, ResolvedBinding, call_each
from .dead_letters import dead_letter_record

if TYPE_CHECKING:
    from ..tracing import Tracing

__all__ = ["InputPipeline", "OutputPort", "Stopping"]

logger = logging.getLogger(__name__)

#: Publish errors that retrying cannot fix: the input is dead-lettered instead.
_PERMANENT = (MessageTooLarge, Unroutable, ConversionError)
_RECONNECT_BACKOFF = (0.1, 0.5, 1.0, 2.0, 5.0)


class Stopping(Exception):
    """Raised inside the pipeline when shutdown interrupts a wait."""


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``; raise :class:`Stopping` as soon as ``stop`` is set."""
    if stop.is_set():
        raise Stopping
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return
    raise Stopping


def decode_headers(raw: dict[str, bytes]) -> Headers:
    headers: Headers = {}
    for name, value in raw.items():
        try:
            headers[name] = value.decode()
        except UnicodeDecodeError:
            headers[name] = value
    return headers


def _as_bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _lookup(payload: Any, path: str) -> Any:
    value = payload
    for part in path.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part, None)
        if value is None:
            return None
    return value


def stable_partition(value: Any, count: int) -> int:
    """The partition of a partition-key value: the same in every process."""
    data = value if isinstance(value, bytes) else str(value).encode()
    return zlib.crc32(data) % count


class OutputPort:
    """Encodes a function's results and publishes them to one destination."""

    def __init__(
        self,
        binder: Binder,
        spec: ProducerSpec,
        content_type: str,
        partition_key: str | None,
        stop: asyncio.Event,
        tracing: Tracing | None = None,
    ) -> None:
        self.binder = binder
        self.tracing = tracing
        self.spec = spec
        self.content_type = content_type
        self.partition_key = partition_key
        self._stop = stop
        self._provisioned = False

    def _partition(self, message: Message[Any], key: bytes | None) -> int | None:
        if message.partition is not None:
            return message.partition
        path = self.partition_key
        if path is None or self.spec.partition_count <= 1:
            return None
        if path == "key":
            value: Any = key
        elif path.startswith("headers."):
            value = message.headers.get(path[len("headers.") :])
        else:
            value = _lookup(message.payload, path)
        return (
            0 if value is None else stable_partition(value, self.spec.partition_count)
        )

    def encode(self, results: Sequence[Any], key: bytes | None = None) -> list[Record]:
        """Records for ``results``; plain values inherit ``key`` (the input's key)."""
        records = []
        for result in results:
            message = result if isinstance(result, Message) else Message(result)
            body, content_type = converters.encode(message.payload, self.content_type)
            headers = {k: _as_bytes(v) or b"" for k, v in message.headers.items()}
            headers["contentType"] = content_type.encode()
            if self.tracing is not None:
                self.tracing.inject(headers)
            out_key = _as_bytes(message.key) if message.key is not None else key
            records.append(
                Record(body, headers, out_key, self._partition(message, out_key))
            )
        return records

    async def publish(self, records: list[Record], *, retry: bool = True) -> None:
        """Publish, retrying transient broker errors with backoff until it works or
        the app stops (:class:`Stopping`). Permanent errors, and every error when
        ``retry`` is false, are raised."""
        if not self._provisioned:
            await self.binder.provision_producer(self.spec)
            self._provisioned = True
        for attempt in itertools.count():
            try:
                await self.binder.publish(self.spec, records)
                return
            except _PERMANENT:
                raise
            except (PublishError, BinderError) as exc:
                if not retry:
                    raise
                delay = _RECONNECT_BACKOFF[min(attempt, len(_RECONNECT_BACKOFF) - 1)]
                logger.warning(
                    "publish to %s failed (%s); retrying in %.1fs",
                    self.spec.destination,
                    exc,
                    delay,
                    extra={"destination": self.spec.destination},
                )
                await wait_or_stop(self._stop, delay)


@dataclass(slots=True)
class BindingStats:
    """Counters of one input binding (read by the metrics endpoint)."""

    received: int = 0
    processed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    held: int = 0  # failed for good with the DLQ off: left unacknowledged


class InputPipeline:
    """Runs one input binding: fetch, dispatch to lanes, handle, settle.

    Concurrency comes from lanes: ``concurrency`` workers, each handling its
    deliveries one at a time. A delivery's lane is chosen by its key (``ordering:
    key``), its partition (``partition``) or round-robin (``none``), so order per key
    or partition holds with any concurrency.
    """

    def __init__(
        self,
        fn: BoundFunction,
        binding: ResolvedBinding,
        binder: Binder,
        spec: ConsumerSpec,
        output: OutputPort | None,
        tracing: Tracing | None = None,
    ) -> None:
        self.fn = fn
        self.tracing = tracing
        self.binding = binding
        self.binder = binder
        self.spec = spec
        self.output = output
        consumer = binding.settings.consumer
        self.consumer = consumer
        self.content_type = binding.settings.content_type
        self._retryable = set(consumer.retryable_exceptions)
        self._non_retryable = set(consumer.non_retryable_exceptions)
        self._stop = asyncio.Event()
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._lanes: list[asyncio.Queue[Delivery | None]] = []
        self._worker_lanes: list[asyncio.Queue[Delivery | None]] = []
        self._round_robin = itertools.cycle(range(consumer.concurrency))
        self._workers: list[asyncio.Task[None]] = []
        self._fetcher: asyncio.Task[None] | None = None
        self.subscription: Subscription | None = None
        self.healthy = False
        self.state = "stopped"
        self.stats = BindingStats()
        self._log_extra = {
            "binding": binding.name,
            "destination": binding.destination,
        }

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Attach the subscription and start the lanes (also after :meth:`stop`)."""
        if self.state != "stopped":
            return
        self._stop = asyncio.Event()
        workers = self.consumer.concurrency
        if self.consumer.ordering == "none" and workers > 1:
            # No order to keep: every worker takes the next message from one queue,
            # one at a time, so a slow message never holds up an idle worker.
            size = max(self.spec.prefetch, workers)  # room for the end marks
            shared: asyncio.Queue[Delivery | None] = asyncio.Queue(size)
            self._lanes = [shared]
            self._worker_lanes = [shared] * workers
            take = 1
        else:
            self._lanes = [asyncio.Queue(self.spec.prefetch) for _ in range(workers)]
            self._worker_lanes = list(self._lanes)
            take = self.spec.batch_size
        self.subscription = await self.binder.subscribe(self.spec)
        self.healthy = True
        self.state = "running"
        self._workers = [
            asyncio.create_task(
                self._work(lane, take), name=f"{self.binding.name}-worker-{i}"
            )
            for i, lane in enumerate(self._worker_lanes)
        ]
        self._fetcher = asyncio.create_task(self._fetch(), name=f"{self.binding.name}")
        logger.info(
            "binding %s consuming %s (group %s, concurrency %d)",
            self.binding.name,
            self.spec.destination,
            self.spec.group or "anonymous",
            self.consumer.concurrency,
            extra=self._log_extra,
        )

    async def stop(self, timeout: float) -> None:
        """Stop fetching, release queued work, let in-flight handlers finish within
        ``timeout`` seconds, then cancel the rest (their inputs are redelivered)."""
        if self.state == "stopped":
            return
        self.state = "stopping"
        self._stop.set()
        self._unpaused.set()
        if self._fetcher is not None:
            self._fetcher.cancel()
            await asyncio.gather(self._fetcher, return_exceptions=True)
        for lane in self._lanes:
            while not lane.empty():
                delivery = lane.get_nowait()
                if delivery is not None:
                    await self._release(delivery)
        for lane in self._worker_lanes:
            lane.put_nowait(None)  # one end mark per worker
        if self._workers:
            _, pending = await asyncio.wait(self._workers, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
            if pending:
                logger.warning(
                    "binding %s: %d handler(s) outlived the %.1fs drain timeout; "
                    "their inputs will be redelivered",
                    self.binding.name,
                    len(pending),
                    timeout,
                    extra=self._log_extra,
                )
        if self.subscription is not None:
            await self.subscription.close()
        self.healthy = False
        self.state = "stopped"

    def pause(self) -> None:
        """Stop taking new messages; in-flight ones finish and are acked."""
        if self.state == "running":
            self._unpaused.clear()
            self.state = "paused"

    def resume(self) -> None:
        if self.state == "paused":
            self._unpaused.set()
            self.state = "running"

    # -- fetch and dispatch ----------------------------------------------------

    def _lane(self, delivery: Delivery) -> asyncio.Queue[Delivery | None]:
        lanes = self._lanes
        if len(lanes) == 1:
            return lanes[0]
        ordering = self.consumer.ordering
        if ordering == "key" and delivery.key is not None:
            return lanes[hash(delivery.key) % len(lanes)]
        if ordering == "partition" and delivery.partition is not None:
            return lanes[delivery.partition % len(lanes)]
        return lanes[next(self._round_robin)]

    async def _fetch(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                assert self.subscription is not None
                async for batch in self.subscription:
                    failures = 0
                    self.healthy = True
                    self.stats.received += len(batch)
                    await self._unpaused.wait()  # a paused binding holds its batch
                    for delivery in batch:
                        await self._lane(delivery).put(delivery)
                if self._stop.is_set():
                    return
                raise BinderError("the subscription ended unexpectedly")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.healthy = False
                delay = _RECONNECT_BACKOFF[min(failures, len(_RECONNECT_BACKOFF) - 1)]
                failures += 1
                logger.error(
                    "binding %s lost its subscription (%s); resubscribing in %.1fs",
                    self.binding.name,
                    exc,
                    delay,
                    extra=self._log_extra,
                )
                await self._resubscribe(delay)

    async def _resubscribe(self, delay: float) -> None:
        try:
            await wait_or_stop(self._stop, delay)
        except Stopping:
            return
        if self.subscription is not None:
            try:
                await self.subscription.close()
            except Exception:
                logger.debug("closing the old subscription failed", exc_info=True)
        try:
            self.subscription = await self.binder.subscribe(self.spec)
        except StreamkitError as exc:
            logger.warning("resubscribe of %s failed: %s", self.binding.name, exc)

    # -- handle ----------------------------------------------------------------

    async def _work(self, lane: asyncio.Queue[Delivery | None], limit: int) -> None:
        # A lane takes whatever is queued (up to batch_size) in one go: a sync handler
        # then runs the whole run in one worker-thread hop, and the outputs go to the
        # broker in one publish. Order within the lane is kept throughout.
        while True:
            batch = [await lane.get()]
            while len(batch) < limit and not lane.empty():
                batch.append(lane.get_nowait())
            last = batch[-1] is None
            deliveries = [d for d in batch if d is not None]
            if self._stop.is_set():
                for delivery in deliveries:
                    await self._release(delivery)
            elif deliveries:
                await self._handle(deliveries)
            if last:
                return

    def _decode(self, delivery: Delivery) -> Any:
        raw_type = delivery.headers.get("contentType")
        content_type = raw_type.decode("utf-8", "replace") if raw_type else None
        payload = converters.decode(
            delivery.value, content_type or self.content_type, self.fn.input_type
        )
        if not self.fn.input_envelope:
            return payload
        key = delivery.key
        if key is not None:
            try:
                key = key.decode()  # type: ignore[assignment]
            except UnicodeDecodeError:
                pass
        return Message(
            payload,
            headers=decode_headers(delivery.headers),
            key=key,
            partition=delivery.partition,
            id=delivery.id,
            destination=delivery.destination,
            attempt=delivery.attempt,
        )

    def _is_retryable(self, exc: BaseException) -> bool:
        names = set()
        for cls in type(exc).__mro__:
            names.add(cls.__name__)
            names.add(f"{cls.__module__}.{cls.__qualname__}")
        if names & self._non_retryable:
            return False
        return not self._retryable or bool(names & self._retryable)

    def _backoff(self, attempt: int) -> float:
        c = self.consumer
        return min(
            c.backoff_initial * c.backoff_multiplier ** (attempt - 1), c.backoff_max
        )

    async def _handle(self, batch: list[Delivery]) -> None:
        if self.tracing is None:
            await self._handle_run(batch)
            return
        for delivery in batch:  # one span per message
            with self.tracing.consuming(delivery, self.spec):
                await self._handle_run([delivery])

    async def _handle_run(self, batch: list[Delivery]) -> None:
        # Shutdown is not a failure: no attempt is counted and unsettled inputs are
        # given back for redelivery, whether waiting for a retry or running.
        pending = list(batch)  # _handle_batch removes each delivery it settles
        try:
            await self._handle_batch(pending)
        except Stopping:
            for delivery in pending:
                await self._release(delivery)
        except asyncio.CancelledError:
            for delivery in pending:
                await self._release(delivery)
            raise
        except Exception:
            # A broker error while settling: the lane must keep going; whatever is
            # unsettled is given back (or redelivered by the broker anyway).
            logger.exception(
                "binding %s: settling failed; giving back %d message(s)",
                self.binding.name,
                len(pending),
                extra=self._log_extra,
            )
            for delivery in pending:
                await self._release(delivery)

    async def _handle_batch(self, pending: list[Delivery]) -> None:
        ready: list[tuple[Delivery, Any]] = []
        for delivery in list(pending):
            try:
                ready.append((delivery, self._decode(delivery)))
                continue
            except ConversionError as exc:
                await self._dead_letter(delivery, exc, attempts=0, reason="decode")
            pending.remove(delivery)
        ready = [item for item in ready if await self._within_limit(item[0], pending)]
        while ready:
            if ready[0][0].attempt > 1:
                # A message that failed in an earlier process waits out its backoff
                # again, so a crash loop does not turn the retries into a tight loop.
                await wait_or_stop(self._stop, self._backoff(ready[0][0].attempt - 1))
            end = next(
                (i for i in range(1, len(ready)) if ready[i][0].attempt > 1), len(ready)
            )
            run = ready[:end]
            values = [value for _, value in run]
            results, failure = await call_each(self.fn, values, self._stop.is_set)
            done = len(results)
            await self._complete(run[:done], results, pending)
            if failure is None:
                if done < len(run):
                    raise Stopping  # the rest never started: give it back
                ready = ready[end:]
                continue
            delivery, value = run[done]
            await self._retry(delivery, value, failure, pending)
            ready = ready[done + 1 :]

    async def _within_limit(self, delivery: Delivery, pending: list[Delivery]) -> bool:
        """False (and dead-lettered) if earlier processes used up every attempt."""
        max_attempts = self.consumer.max_attempts
        if delivery.attempt <= max_attempts:
            return True
        exhausted = RuntimeError(
            f"{delivery.attempt - 1} failed attempts were recorded before this "
            f"delivery; max_attempts is {max_attempts}"
        )
        await self._dead_letter(
            delivery, exhausted, delivery.attempt - 1, reason="retries-exhausted"
        )
        pending.remove(delivery)
        return False

    async def _retry(
        self, delivery: Delivery, value: Any, exc: Exception, pending: list[Delivery]
    ) -> None:
        """Retry one failed input with backoff until it succeeds or is dead-lettered."""
        max_attempts = self.consumer.max_attempts
        attempt = delivery.attempt
        while True:
            if isinstance(exc, ConversionError):
                reason = "encode"
            elif not self._is_retryable(exc):
                reason = "non-retryable"
            elif attempt >= max_attempts:
                reason = "retries-exhausted"
            else:
                delay = self._backoff(attempt)
                logger.warning(
                    "%s failed on %s (attempt %d of %d): %r; retrying in %.2fs",
                    self.fn.name,
                    delivery.id,
                    attempt,
                    max_attempts,
                    exc,
                    delay,
                    extra={**self._log_extra, "message_id": delivery.id},
                )
                self.stats.retried += 1
                assert self.subscription is not None
                await self.subscription.record_attempt(delivery)
                await wait_or_stop(self._stop, delay)
                attempt += 1
                if isinstance(value, Message):
                    value.attempt = attempt
                try:
                    results = await self.fn.call(value)
                except Exception as err:
                    exc = err
                    continue
                await self._complete([(delivery, value)], [results], pending, attempt)
                return
            await self._dead_letter(delivery, exc, attempt, reason=reason)
            pending.remove(delivery)
            return

    async def _complete(
        self,
        done: list[tuple[Delivery, Any]],
        results: list[list[Any]],
        pending: list[Delivery],
        attempt: int | None = None,
    ) -> None:
        """Publish the outputs of handled inputs in one call, then ack the inputs."""
        outputs: list[tuple[Delivery, list[Record]]] = []
        for (delivery, _), result in zip(done, results, strict=True):
            try:
                records = (
                    self.output.encode(result, delivery.key) if self.output else []
                )
            except ConversionError as exc:
                await self._dead_letter(
                    delivery, exc, attempt or delivery.attempt, reason="encode"
                )
                pending.remove(delivery)
                continue
            outputs.append((delivery, records))
        if self.output is not None and any(records for _, records in outputs):
            outputs = await self._publish(outputs, pending, attempt)
        for delivery, _ in outputs:
            await delivery.ack()
            pending.remove(delivery)
        self.stats.processed += len(outputs)

    async def _publish(
        self,
        outputs: list[tuple[Delivery, list[Record]]],
        pending: list[Delivery],
        attempt: int | None,
    ) -> list[tuple[Delivery, list[Record]]]:
        assert self.output is not None
        try:
            await self.output.publish([r for _, records in outputs for r in records])
            return outputs
        except _PERMANENT as exc:
            if len(outputs) == 1:
                delivery = outputs[0][0]
                await self._dead_letter(
                    delivery, exc, attempt or delivery.attempt, reason="encode"
                )
                pending.remove(delivery)
                return []
        # One record of the batch cannot be published (too large, unroutable):
        # publish input by input to dead-letter only the input that produced it.
        published = []
        for delivery, records in outputs:
            try:
                await self.output.publish(records)
                published.append((delivery, records))
            except _PERMANENT as exc:
                await self._dead_letter(
                    delivery, exc, attempt or delivery.attempt, reason="encode"
                )
                pending.remove(delivery)
        return published

    # -- settle ----------------------------------------------------------------

    async def _release(self, delivery: Delivery) -> None:
        try:
            await delivery.release()
        except StreamkitError as exc:
            # The broker redelivers unsettled records anyway (closed channel, claim).
            logger.debug("release of %s failed: %s", delivery.id, exc)

    async def _dead_letter(
        self, delivery: Delivery, exc: BaseException, attempts: int, *, reason: str
    ) -> None:
        extra = {**self._log_extra, "message_id": delivery.id}
        if self.tracing is not None:
            self.tracing.record_failure(exc)
        if not self.consumer.dlq:
            self.stats.held += 1
            logger.error(
                "%s failed for good on %s (%s); dlq is off, so it stays unacknowledged "
                "and is redelivered after a restart",
                self.fn.name,
                delivery.id,
                reason,
                exc_info=exc,
                extra=extra,
            )
            return
        record = dead_letter_record(
            delivery, exc, group=self.spec.group, attempts=attempts, reason=reason
        )
        for attempt in itertools.count():
            try:
                await self.binder.publish_dead_letter(self.spec, record)
                break
            except BinderError as err:
                delay = _RECONNECT_BACKOFF[min(attempt, len(_RECONNECT_BACKOFF) - 1)]
                logger.warning("dead-letter publish failed (%s); retrying", err)
                await wait_or_stop(self._stop, delay)
        logger.error(
            "%s failed for good on %s (%s after %d attempt(s)): %s; sent to the DLQ",
            self.fn.name,
            delivery.id,
            reason,
            attempts,
            exc,
            exc_info=exc if reason != "decode" else None,
            extra=extra,
        )
        self.stats.dead_lettered += 1
        await delivery.ack()
