"""Drive a StreamApp in tests, with no broker.

::

    async def test_uppercase():
        async with TestStream(app) as stream:
            await stream.send("uppercase-in-0", "hello")
            reply = await stream.receive("uppercase-out-0")
            assert reply.payload == "HELLO"

By default every binder of the app is replaced by a private in-memory broker, so tests
need no configuration and never see each other's messages; ``broker=`` shares one
broker between two streams (a restart, or a second instance of a service). With
``use_configured_binders=True`` the app runs on the binders its settings name (the
conformance suite runs the runtime cases on every broker that way).

``send`` and ``receive`` take a binding name of the app (``f-in-0``, ``f-out-0``) or
any destination name. Outputs and dead letters are read through a consumer group
created when the stream opens, so nothing published after ``__aenter__`` is missed.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from . import converters
from .app import StreamApp
from .binder import Binder, ConsumerSpec, Delivery, ProducerSpec, Record, Subscription
from .config import Settings, deep_merge, validate_settings
from .message import Headers, Message
from .runtime.bindings import ResolvedBinding, resolve
from .runtime.pipeline import decode_headers
from .runtime.runner import AppRunner, _default_binder

__all__ = ["Recorder", "TestStream"]


class Recorder:
    """Collects what handlers saw and lets a test wait for a condition on it.

    Safe to call :meth:`add` from sync handlers, which run in worker threads::

        seen = Recorder()

        @app.consumer
        def handle(order: Order) -> None:
            seen.add(order.id)

        await seen.wait_for(lambda items: len(items) == 10, timeout=5)
    """

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._waiters: list[tuple[Callable[[list[Any]], bool], asyncio.Event]] = []

    def add(self, item: Any) -> None:
        self.items.append(item)
        if threading.get_ident() == self._loop_thread:
            self._check()
        else:
            self._loop.call_soon_threadsafe(self._check)

    def _check(self) -> None:
        for condition, event in self._waiters:
            if condition(self.items):
                event.set()

    async def wait_for(
        self, condition: Callable[[list[Any]], bool], timeout: float = 5.0
    ) -> list[Any]:
        """Wait until ``condition(items)`` holds; TimeoutError after ``timeout``."""
        event = asyncio.Event()
        waiter = (condition, event)
        self._waiters.append(waiter)
        try:
            if condition(self.items):
                return self.items
            await asyncio.wait_for(event.wait(), timeout)
            return self.items
        finally:
            self._waiters.remove(waiter)

    async def wait_count(self, count: int, timeout: float = 5.0) -> list[Any]:
        """Wait until at least ``count`` items were added."""
        return await self.wait_for(lambda items: len(items) >= count, timeout)


class _Reader:
    """Reads one destination (or DLQ), buffering the rest of each batch."""

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.buffer: collections.deque[Delivery] = collections.deque()

    async def next(self, timeout: float) -> Delivery:
        if not self.buffer:
            async with asyncio.timeout(timeout):
                batch = await self.subscription.next_batch()
            if batch is None:
                raise RuntimeError("the subscription was closed")
            self.buffer.extend(batch)
        delivery = self.buffer.popleft()
        await delivery.ack()
        return delivery


class TestStream:
    """Run ``app`` for the duration of an ``async with`` block."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        app: StreamApp,
        settings: Settings | Mapping[str, Any] | None = None,
        *,
        overrides: Mapping[str, Any] | None = None,
        use_configured_binders: bool = False,
        shutdown_timeout: float = 5.0,
        broker: str | None = None,
        reader_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.app = app
        if isinstance(settings, Settings):
            self.settings = settings
        else:
            data = {"shutdown_timeout": shutdown_timeout, **(settings or {})}
            self.settings = validate_settings(deep_merge(data, overrides or {}))
        self._use_configured = use_configured_binders
        #: The private in-memory broker; pass it as ``broker=`` to a second
        #: TestStream to run a "restarted" or a second instance of an app on it.
        self.broker = broker or f"test-{uuid.uuid4().hex[:12]}"
        # Readers of outputs and dead letters are one group per broker, so a second
        # TestStream on the same broker continues where the first one stopped.
        self._group = f"streamkit-test-{self.broker}"
        # Binder-specific consumer options of the stream's own readers (e.g. a
        # RabbitMQ queue expiry, so test queues do not outlive the test run).
        self._reader_options = dict(reader_options or {})
        self.runner: AppRunner | None = None
        self._bindings: dict[str, ResolvedBinding] = {}
        self._readers: dict[tuple[str, str], _Reader] = {}
        self._binders: dict[str, Binder] = {}

    def _make_binder(self, name: str, settings: Settings) -> Binder:
        if self._use_configured:
            return _default_binder(name, settings)
        from .memory import MemoryBinder, MemorySettings

        return MemoryBinder(MemorySettings(broker=self.broker), name=name)

    async def __aenter__(self) -> TestStream:
        _, bindings = resolve(self.app, self.settings)
        self._bindings = {b.name: b for b in bindings}
        for binding in bindings:
            binder = await self._binder(binding.binder)
            if binding.direction == "out":
                await self._reader(binder, binding.destination)
            else:
                await self._dlq_reader(binding)
        self.runner = AppRunner(
            self.app, self.settings, binder_factory=self._make_binder
        )
        await self.runner.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.runner is not None:
            await self.runner.stop()
        for reader in self._readers.values():
            await reader.subscription.close()
        for binder in self._binders.values():
            await binder.close()

    async def _binder(self, name: str) -> Binder:
        binder = self._binders.get(name)
        if binder is None:
            binder = self._make_binder(name, self.settings)
            await binder.start()
            self._binders[name] = binder
        return binder

    async def _reader(self, binder: Binder, destination: str) -> _Reader:
        reader = self._readers.get(("out", destination))
        if reader is None:
            options = binder.consumer_options_model.model_validate(self._reader_options)
            spec = ConsumerSpec(
                destination, group=self._group, binding="test", options=options
            )
            reader = _Reader(await binder.subscribe(spec))
            self._readers[("out", destination)] = reader
        return reader

    async def _dlq_reader(self, binding: ResolvedBinding) -> _Reader:
        reader = self._readers.get(("dlq", binding.name))
        if reader is None:
            binder = await self._binder(binding.binder)
            spec = ConsumerSpec(
                binding.destination, group=binding.group, options=binding.options
            )
            sub = await binder.subscribe_dead_letters(spec, group=self._group)
            reader = _Reader(sub)
            self._readers[("dlq", binding.name)] = reader
        return reader

    def _target(self, name: str) -> tuple[str, str]:
        """(binder name, destination) of a binding name or a destination."""
        binding = self._bindings.get(name)
        if binding is not None:
            return binding.binder, binding.destination
        return self.settings.default_binder_name(), name

    async def send(
        self,
        to: str,
        payload: Any,
        *,
        key: str | bytes | None = None,
        headers: Headers | None = None,
        content_type: str | None = None,
        raw: bool = False,
    ) -> None:
        """Publish ``payload`` to a binding's destination.

        With ``raw=True`` the payload (bytes or None) is sent as it is, with only the
        given headers, like a plain client would.
        """
        binder_name, destination = self._target(to)
        binder = await self._binder(binder_name)
        wire_headers = {
            k: v.encode() if isinstance(v, str) else v
            for k, v in (headers or {}).items()
        }
        if raw:
            body = payload
        else:
            body, ct = converters.encode(payload, content_type or "application/json")
            wire_headers.setdefault("contentType", ct.encode())
        record = Record(
            body, wire_headers, key.encode() if isinstance(key, str) else key
        )
        await binder.publish(ProducerSpec(destination), [record])

    async def receive(
        self, frm: str, *, timeout: float = 5.0, type: Any = Any
    ) -> Message[Any]:
        """The next message on a binding's destination, decoded as ``type``."""
        binder_name, destination = self._target(frm)
        reader = await self._reader(await self._binder(binder_name), destination)
        return _message(await reader.next(timeout), type)

    async def receive_dead_letter(
        self, binding: str, *, timeout: float = 5.0
    ) -> Message[bytes | None]:
        """The next dead letter of an input binding; the payload is the raw bytes."""
        resolved = self._bindings[binding]
        reader = await self._dlq_reader(resolved)
        return _message(await reader.next(timeout), bytes)

    async def receive_many(
        self, frm: str, count: int, *, timeout: float = 10.0, type: Any = Any
    ) -> list[Message[Any]]:
        """``count`` messages, failing if they do not all arrive within ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        return [
            await self.receive(
                frm, timeout=max(deadline - loop.time(), 0.01), type=type
            )
            for _ in range(count)
        ]

    async def assert_no_dead_letter(self, binding: str, *, within: float = 0.3) -> None:
        """Fail if a dead letter of ``binding`` arrives within ``within`` seconds."""
        try:
            message = await self.receive_dead_letter(binding, timeout=within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected dead letter of {binding}: {message!r}")

    async def assert_nothing(self, frm: str, *, within: float = 0.3) -> None:
        """Fail if a message arrives on ``frm`` within ``within`` seconds."""
        try:
            message = await self.receive(frm, timeout=within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message on {frm}: {message!r}")


def _message(delivery: Delivery, target: Any) -> Message[Any]:
    raw_type = delivery.headers.get("contentType")
    content_type = (
        raw_type.decode("utf-8", "replace") if raw_type else "application/json"
    )
    if target is bytes:
        payload: Any = delivery.value
    else:
        payload = converters.decode(delivery.value, content_type, target)
    key: str | bytes | None = delivery.key
    if isinstance(key, bytes):
        try:
            key = key.decode()
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
