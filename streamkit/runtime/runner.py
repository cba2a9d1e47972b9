"""AppRunner: binders, bindings and producers of one running StreamApp."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..app import StreamApp
from ..binder import Binder, ConsumerSpec, Health, HealthStatus, ProducerSpec
from ..config import Settings
from ..errors import ConfigError, StreamkitError
from ..message import Message
from .bindings import (
    BoundFunction,
    Composite,
    ResolvedBinding,
    binder_settings,
    resolve,
)
from .pipeline import InputPipeline, OutputPort, Stopping, wait_or_stop

if TYPE_CHECKING:
    from ..tracing import Tracing

__all__ = ["AppRunner", "Service", "run_app"]

logger = logging.getLogger(__name__)


class Service(Protocol):
    """Something that runs beside the bindings, like the ops HTTP endpoint."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class _Producer:
    """Calls a producer on its poll interval, or drains a source generator."""

    def __init__(
        self, fn: BoundFunction, port: OutputPort, interval: float, stop: asyncio.Event
    ) -> None:
        self.fn = fn
        self.port = port
        self.interval = interval
        self._stop = stop
        self._publishing = False
        self.task: asyncio.Task[None] | None = None
        self.state = "running"  # "finished" (a source returned) or "failed"

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"{self.fn.name}-producer")

    async def _emit(self, results: list[Any]) -> None:
        if not results:
            return
        self._publishing = True
        try:
            tracing = self.port.tracing
            if tracing is None:
                await self.port.publish(self.port.encode(results))
            else:
                with tracing.publishing(self.port.spec.destination):
                    await self.port.publish(self.port.encode(results))
        finally:
            self._publishing = False

    async def _run(self) -> None:
        try:
            if _is_source(self.fn):
                await self._run_source()
            else:
                await self._poll()
        except Stopping:
            return
        except Exception:
            self.state = "failed"
            logger.exception("producer %s stopped with an error", self.fn.name)

    async def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                await self._emit(await self.fn.call())
            except (Stopping, asyncio.CancelledError):
                raise
            except Exception:
                logger.exception("producer %s failed; calling it again", self.fn.name)
            await wait_or_stop(self._stop, self.interval)

    async def _run_source(self) -> None:
        first = self.fn.stages[0] if isinstance(self.fn, Composite) else self.fn
        async for item in first.func():
            if item is None:
                continue
            results = [item]
            if isinstance(self.fn, Composite):
                results = await self.fn.feed(item)
            await self._emit(results)
            if self._stop.is_set():
                return
        self.state = "finished"
        logger.info("source %s finished", self.fn.name)

    async def stop(self, timeout: float) -> None:
        if self.task is None:
            return
        if not self._publishing:
            self.task.cancel()
        await asyncio.wait({self.task}, timeout=timeout)
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def _is_source(fn: BoundFunction) -> bool:
    first = fn.stages[0] if isinstance(fn, Composite) else fn
    return first.is_async_gen


class AppRunner:
    """Starts and stops everything a StreamApp needs.

    ``binder_factory`` builds binders (tests use it to share one in-memory broker);
    by default binders come from their entry points and the ``binders`` settings.
    """

    def __init__(
        self,
        app: StreamApp,
        settings: Settings,
        *,
        binder_factory: Callable[[str, Settings], Binder] | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self._binder_factory = binder_factory or _default_binder
        self.binders: dict[str, Binder] = {}
        self.inputs: dict[str, InputPipeline] = {}
        self.outputs: dict[str, OutputPort] = {}
        self.bindings: list[ResolvedBinding] = []
        self._producers: list[_Producer] = []
        self._bridge_ports: dict[tuple[str, str, str], OutputPort] = {}
        self._stop = asyncio.Event()
        self._stopped = asyncio.Event()
        self._tracing: Tracing | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Connect binders and attach every binding; undo everything on failure."""
        functions, self.bindings = resolve(self.app, self.settings)
        if self.settings.tracing:
            from ..tracing import Tracing

            self._tracing = Tracing(system="streamkit")
        try:
            for binding in self.bindings:
                await self._binder(binding.binder)
            # Startup hooks run once the brokers answer and before any message is
            # taken, so a handler can rely on what a hook prepared; the bridge works.
            self.app.runner = self
            for hook in self.app._on_startup:
                await _call_hook(hook)
            await self._start(functions)
        except BaseException:
            await self._stop_started()
            raise
        logger.info("app %s started: %d binding(s)", self.app.name, len(self.bindings))

    async def _stop_started(self) -> None:
        for pipeline in self.inputs.values():
            await pipeline.stop(0)
        await self._close_binders()
        if self.app.runner is self:
            self.app.runner = None

    async def _start(self, functions: list[BoundFunction]) -> None:
        by_name = {(b.function, b.direction): b for b in self.bindings}
        for fn in functions:
            port = None
            if fn.has_output:
                port = self._port(by_name[(fn.name, "out")])
                self.outputs[f"{fn.name}-out-0"] = port
            if fn.has_input:
                binding = by_name[(fn.name, "in")]
                pipeline = InputPipeline(
                    fn,
                    binding,
                    self.binders[binding.binder],
                    _consumer_spec(binding),
                    port,
                    self._tracing,
                )
                await pipeline.start()
                self.inputs[binding.name] = pipeline
            elif port is not None:
                interval = (
                    by_name[(fn.name, "out")].settings.producer.poll_interval
                    or self.settings.poll_interval
                )
                self._producers.append(_Producer(fn, port, interval, self._stop))
        for producer in self._producers:
            producer.start()

    async def _binder(self, name: str) -> Binder:
        binder = self.binders.get(name)
        if binder is None:
            binder = self._binder_factory(name, self.settings)
            try:
                await binder.start()
            except StreamkitError as exc:
                raise type(exc)(f"binder {name!r} ({binder.type_name}): {exc}") from exc
            self.binders[name] = binder
        return binder

    def _port(self, binding: ResolvedBinding) -> OutputPort:
        producer = binding.settings.producer
        spec = ProducerSpec(
            destination=binding.destination,
            partition_count=producer.partition_count,
            binding=binding.name,
            options=binding.options,
        )
        return OutputPort(
            self.binders[binding.binder],
            spec,
            binding.settings.content_type,
            producer.partition_key,
            self._stop,
            self._tracing,
        )

    async def stop(self, timeout: float | None = None) -> None:
        """Drain and close: producers and handlers finish in-flight work within the
        shutdown timeout, finished inputs are acked, the rest is redelivered later."""
        if self._stopped.is_set():
            return
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        self._stop.set()
        logger.info("app %s stopping (drain timeout %.1fs)", self.app.name, timeout)
        await asyncio.gather(
            *(p.stop(timeout) for p in self._producers),
            *(i.stop(timeout) for i in self.inputs.values()),
        )
        for hook in self.app._on_shutdown:
            await _call_hook(hook)
        await self._close_binders()
        if self.app.runner is self:
            self.app.runner = None
        self._stopped.set()
        logger.info("app %s stopped", self.app.name)

    async def _close_binders(self) -> None:
        for name, binder in self.binders.items():
            try:
                await binder.close()
            except Exception:
                logger.exception("closing binder %s failed", name)

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop (signal handlers call this)."""
        self._stop.set()

    async def run(self, services: Sequence[Service] = ()) -> None:
        """Start, run until SIGINT/SIGTERM or :meth:`request_stop`, then stop.

        ``services`` (e.g. the ops HTTP endpoint) start after the bindings and close
        before them.
        """
        # Signals are handled from the start: a SIGTERM while a slow broker is still
        # joining stops the app cleanly once startup is done, instead of killing it.
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
                installed.append(sig)
        try:
            await self._run(services)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def _run(self, services: Sequence[Service]) -> None:
        await self.start()
        started: list[Service] = []
        try:
            for service in services:
                await service.start()
                started.append(service)
            await self._stop.wait()
        finally:
            for service in reversed(started):
                await service.close()
            await self.stop()

    # -- bridge and health -----------------------------------------------------

    async def send(
        self,
        destination: str,
        message: Message[Any],
        *,
        content_type: str | None = None,
        binder: str | None = None,
    ) -> None:
        name = binder or self.settings.default_binder_name()
        ct = content_type or "application/json"
        port = self._bridge_ports.get((name, destination, ct))
        if port is None:
            port = OutputPort(
                await self._binder(name),
                ProducerSpec(destination),
                ct,
                None,
                self._stop,
                self._tracing,
            )
            self._bridge_ports[(name, destination, ct)] = port
        # The caller is waiting: a broker that does not take the record within the
        # binder's delivery timeout raises (PublishTimeout), it is not retried here.
        await port.publish(port.encode([message]), retry=False)

    def describe_bindings(self) -> list[dict[str, Any]]:
        """Every binding: where it points and, for inputs, its state."""
        producers = {f"{p.fn.name}-out-0": p.state for p in self._producers}
        rows = []
        for b in self.bindings:
            pipeline = self.inputs.get(b.name)
            state = pipeline.state if pipeline else producers.get(b.name, "running")
            rows.append(
                {
                    "name": b.name,
                    "direction": b.direction,
                    "destination": b.destination,
                    "group": b.group,
                    "binder": b.binder,
                    "state": state,
                }
            )
        return rows

    async def health(self) -> dict[str, Any]:
        """Health of every binder and binding; ``status`` is ``up`` only if all are.

        A binding paused or stopped on purpose (ops endpoint) is reported as such and
        does not make the app unhealthy; a producer that died with an error does.
        """
        binders: dict[str, Health] = {}
        for name, binder in self.binders.items():
            try:
                binders[name] = await asyncio.wait_for(binder.health(), 5)
            except Exception as exc:
                binders[name] = Health(HealthStatus.DOWN, f"health check failed: {exc}")
        bindings: dict[str, str] = {}
        for name, pipeline in self.inputs.items():
            if pipeline.state in ("paused", "stopped"):
                bindings[name] = pipeline.state
            else:
                bindings[name] = "up" if pipeline.healthy else "down"
        for producer in self._producers:
            bindings[f"{producer.fn.name}-out-0"] = {
                "running": "up",
                "finished": "finished",
                "failed": "down",
            }[producer.state]
        up = all(h.status is not HealthStatus.DOWN for h in binders.values()) and all(
            v != "down" for v in bindings.values()
        )
        return {
            "status": "up" if up else "down",
            "binders": {
                n: {"status": h.status.value, "detail": h.detail}
                for n, h in binders.items()
            },
            "bindings": bindings,
        }


def _consumer_spec(binding: ResolvedBinding) -> ConsumerSpec:
    consumer = binding.settings.consumer
    return ConsumerSpec(
        destination=binding.destination,
        group=binding.group,
        binding=binding.name,
        partitioned=consumer.partitioned,
        partition_count=consumer.partition_count or consumer.instance_count,
        instance_index=consumer.instance_index,
        instance_count=consumer.instance_count,
        # A prefetch below the batch size caps every fetch and every publish batch
        # (on Kafka each then waits its linger): 0.30 of the raw client's rate.
        prefetch=consumer.prefetch
        or max(consumer.batch_size, 16 * consumer.concurrency),
        batch_size=consumer.batch_size,
        start_from=consumer.start_from,
        options=binding.options,
    )


def _default_binder(name: str, settings: Settings) -> Binder:
    cls, binder_config = binder_settings(settings, name)
    return cls(binder_config, name=name)


async def _call_hook(hook: Callable[[], Any]) -> None:
    result = hook()
    if inspect.isawaitable(result):
        await result


def run_app(app: StreamApp, settings: Settings) -> None:
    """Run ``app`` until SIGINT or SIGTERM (what ``streamkit run`` calls)."""
    if not app.functions:
        raise ConfigError(f"app {app.name!r} has no functions to bind")
    asyncio.run(AppRunner(app, settings).run())
