"""RabbitMQ binder under faults (CASES.md C11-C13, conformance 28-30).

Most outages are made with a TCP proxy between the binder and the broker, so the
shared broker keeps running: ``cut`` closes every connection and refuses new ones
(a broker gone), ``blackhole`` keeps the sockets open and drops the traffic (a
broker or network that stopped answering). One test restarts the real broker
application with ``rabbitmqctl stop_app`` / ``start_app``, and always starts it
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio
from yarl import URL

from streamkit.binder import ConsumerSpec, Delivery, HealthStatus, ProducerSpec, Record
from streamkit.errors import BrokerUnavailable, PublishTimeout, SubscriptionClosed

aio_pika = pytest.importorskip("aio_pika")
pytest.importorskip("streamkit_rabbit")

from streamkit_rabbit import (  # noqa: E402
    RabbitBinder,
    RabbitConsumerOptions,
    RabbitProducerOptions,
    RabbitSettings,
    RabbitSubscription,
)

URL_ENV = "STREAMKIT_RABBIT_URL"
RABBIT_URL = URL(os.environ.get(URL_ENV, "amqp://guest:guest@127.0.0.1:5672/"))
EXPIRING = {"expires_ms": 60_000, "dlq_expires_ms": 60_000}
# Short enough for fast tests, long enough for a loaded 2-core machine.
FAST = {
    "connect_timeout": 3.0,
    "delivery_timeout": 3.0,
    "close_timeout": 3.0,
    "reconnect_delay": 0.1,
    "reconnect_max_delay": 0.5,
}


def fresh(label: str = "t") -> str:
    return f"skr-{label}-{secrets.token_hex(4)}"


def consumer(destination: str, group: str | None = "g", **spec: Any) -> ConsumerSpec:
    return ConsumerSpec(
        destination, group=group, options=RabbitConsumerOptions(**EXPIRING), **spec
    )


def producer(destination: str) -> ProducerSpec:
    return ProducerSpec(destination, options=RabbitProducerOptions(**EXPIRING))


def numbered(start: int, count: int) -> list[Record]:
    return [
        Record(str(i).encode(), {"n": str(i).encode()}) for i in range(start, count)
    ]


async def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll ``condition`` (sync or async) until true; fail with ``what`` after."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


async def health_is(binder: RabbitBinder, status: HealthStatus) -> bool:
    return (await binder.health()).status is status


class Consumer:
    """Reads a subscription in a task, acking, and remembers every value."""

    def __init__(self, sub: RabbitSubscription) -> None:
        self.sub = sub
        self.seen: list[bytes] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for batch in self.sub:
            for delivery in batch:
                self.seen.append(delivery.value or b"")
                await delivery.ack()

    def has(self, count: int) -> Callable[[], bool]:
        return lambda: len(set(self.seen)) >= count

    async def stop(self) -> None:
        await self.sub.close()
        await asyncio.wait_for(self.task, 5)


# -- the proxy ---------------------------------------------------------------------


class Proxy:
    """A TCP forwarder to the broker that can fail like a broker or a network."""

    def __init__(self, target: URL) -> None:
        self.target = (target.host or "127.0.0.1", target.port or 5672)
        self.port = 0
        self.dropping = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def url(self) -> URL:
        return RABBIT_URL.with_host("127.0.0.1").with_port(self.port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.dropping = False

    async def cut(self) -> None:
        """Close every connection and stop listening: connections are refused."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def blackhole(self) -> None:
        """Keep the sockets open but let nothing through."""
        self.dropping = True

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        for task in (
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if not self.dropping:
                    writer.write(data)
                    await writer.drain()
        if not self.dropping:  # a black hole never closes: the peer must find out
            self._writers.discard(writer)
            writer.transport.abort()


@pytest_asyncio.fixture
async def proxy(needs_rabbit: None) -> AsyncIterator[Proxy]:
    made = Proxy(RABBIT_URL)
    await made.start()
    yield made
    await made.cut()


def through(proxy: Proxy, **settings: Any) -> RabbitBinder:
    return RabbitBinder(RabbitSettings(url=str(proxy.url()), **{**FAST, **settings}))


# -- C11: broker down ------------------------------------------------------------------


async def test_c11_start_against_a_closed_port_is_unavailable_promptly() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens once the socket closes
    binder = RabbitBinder(RabbitSettings(url=f"amqp://guest:pw@127.0.0.1:{port}/"))
    started = time.monotonic()

    with pytest.raises(BrokerUnavailable, match="Cannot connect") as raised:
        await binder.start()

    assert time.monotonic() - started < binder.settings.connect_timeout + 1
    assert "pw" not in str(raised.value)


@pytest.mark.parametrize("outage", ["refused", "blackholed"])
async def test_c11_publish_to_a_broker_gone_times_out_and_close_is_prompt(
    proxy: Proxy, outage: str
) -> None:
    before = asyncio.all_tasks()
    binder = through(proxy)
    await binder.start()
    dest = fresh()
    waiting = asyncio.create_task((await binder.subscribe(consumer(dest))).next_batch())
    await binder.publish(producer(dest), [Record(b"while up")])
    assert await asyncio.wait_for(waiting, 10)

    if outage == "refused":
        await proxy.cut()
    else:
        proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(PublishTimeout, match="delivery_timeout=3 s"):
        await binder.publish(producer(dest), [Record(b"while down")])
    took = time.monotonic() - started
    await wait_for(lambda: health_is(binder, HealthStatus.DOWN), 10, "health DOWN")
    started = time.monotonic()
    await binder.close()
    closing = time.monotonic() - started

    assert took < binder.settings.delivery_timeout + 1
    assert closing < binder.settings.close_timeout + 1
    left = asyncio.all_tasks() - before - {asyncio.current_task()}
    if left:
        _, left = await asyncio.wait(left, timeout=1.0)
    assert not {t for t in left if "_pipe" not in repr(t)}, left


# -- C12 through the proxy: the connection drops under a consumer ---------------------


async def test_c12_a_dropped_connection_is_reopened_and_nothing_is_lost(
    proxy: Proxy,
) -> None:
    binder = through(proxy)
    await binder.start()
    dest = fresh()
    reader = Consumer(await binder.subscribe(consumer(dest, prefetch=10)))
    held_sub = await binder.subscribe(consumer(dest, "held", prefetch=10))
    await binder.publish(producer(dest), numbered(0, 50))
    await wait_for(reader.has(50), 10, "50 records before the outage")
    held = await asyncio.wait_for(held_sub.next_batch(), 10)
    assert held

    await proxy.cut()
    await wait_for(lambda: health_is(binder, HealthStatus.DOWN), 10, "health DOWN")
    await proxy.start()
    await wait_for(lambda: health_is(binder, HealthStatus.UP), 10, "health UP again")
    for delivery in held:  # from the dead channel: dropped, not sent on the new one
        await delivery.ack()
    await binder.publish(producer(dest), numbered(50, 100))
    await wait_for(reader.has(100), 10, "every record after the outage")
    again = await take_values(held_sub, 100)
    await reader.stop()
    await binder.close()

    assert set(reader.seen) == {str(i).encode() for i in range(100)}
    assert again == {str(i).encode() for i in range(100)}


async def take_values(sub: RabbitSubscription, count: int) -> set[bytes]:
    seen: set[bytes] = set()
    async with asyncio.timeout(10):
        while len(seen) < count:
            batch = await sub.next_batch()
            assert batch is not None
            for delivery in batch:
                seen.add(delivery.value or b"")
                await delivery.ack()
    return seen


# -- C13: a channel closed or a queue deleted under a consumer -------------------------


async def test_c13_a_channel_closed_by_the_broker_is_replaced_with_its_prefetch(
    needs_rabbit: None,
) -> None:
    binder = RabbitBinder(RabbitSettings(url=str(RABBIT_URL), **FAST))
    await binder.start()
    dest = fresh()
    sub = await binder.subscribe(consumer(dest, prefetch=5, batch_size=100))
    await binder.publish(producer(dest), numbered(0, 20))
    first = await asyncio.wait_for(sub.next_batch(), 10)
    assert first

    # Ack an unknown delivery tag: the broker closes the channel (PRECONDITION).
    underlay = first[0].token.channel
    await underlay.basic_ack(delivery_tag=10_000)
    await wait_for(lambda: underlay.is_closed, 10, "the broker to close the channel")
    for delivery in first:
        await delivery.ack()  # dropped: their channel is gone
    redelivered = await held_after_reattach(sub, 5)
    for delivery in redelivered:
        await delivery.ack()
    rest = await take_values(sub, 20 - 5)
    health = await binder.health()
    await binder.close()

    assert len(redelivered) == 5  # prefetch re-applied on the new channel
    everything = rest | {d.value for d in redelivered if d.value}
    assert everything == {str(i).encode() for i in range(20)}
    assert health.ok


async def held_after_reattach(sub: RabbitSubscription, count: int) -> list[Delivery]:
    """What the re-attached subscription hands out before any settle."""
    got: list[Delivery] = []
    async with asyncio.timeout(10):
        while len(got) < count:
            got += await sub.next_batch() or []
    with contextlib.suppress(TimeoutError):  # and nothing beyond the prefetch
        got += await asyncio.wait_for(sub.next_batch(), 0.3) or []
    return got


async def test_c13_a_consumer_that_cannot_come_back_fails_loudly(
    needs_rabbit: None,
) -> None:
    binder = RabbitBinder(RabbitSettings(url=str(RABBIT_URL), **FAST))
    await binder.start()
    dest = fresh()
    sub = await binder.subscribe(consumer(dest))
    waiting = asyncio.create_task(sub.next_batch())

    # Someone re-creates the queue with other arguments: ours no longer fits.
    connection = await aio_pika.connect(str(RABBIT_URL))
    channel = await connection.channel()
    await channel.queue_delete(f"{dest}.g")
    await channel.declare_queue(
        f"{dest}.g", durable=True, arguments={"x-max-length": 10, "x-expires": 60_000}
    )
    await connection.close()

    with pytest.raises(SubscriptionClosed, match="PRECONDITION_FAILED"):
        await asyncio.wait_for(waiting, 10)
    health = await binder.health()
    await binder.close()

    assert health.status is HealthStatus.DOWN
    assert "failed" in health.detail


async def test_c13_a_queue_deleted_under_a_consumer_is_declared_again(
    needs_rabbit: None,
) -> None:
    binder = RabbitBinder(RabbitSettings(url=str(RABBIT_URL), **FAST))
    await binder.start()
    dest = fresh()
    reader = Consumer(await binder.subscribe(consumer(dest)))
    await binder.publish(producer(dest), numbered(0, 10))
    await wait_for(reader.has(10), 10, "records before the deletion")

    connection = await aio_pika.connect(str(RABBIT_URL))
    channel = await connection.channel()
    await channel.queue_delete(f"{dest}.g")
    await connection.close()
    await wait_for(
        lambda: health_is(binder, HealthStatus.UP), 10, "the consumer to come back"
    )
    await wait_for(lambda: reader.sub.attached, 10, "re-attachment")
    await binder.publish(producer(dest), numbered(10, 20))
    await wait_for(reader.has(20), 10, "records after the re-declaration")
    await reader.stop()
    await binder.close()

    assert set(reader.seen) == {str(i).encode() for i in range(20)}


# -- C12 for real: the broker application restarts ----------------------------------


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


@pytest.fixture
def restartable_broker(needs_rabbit: None) -> Iterator[None]:
    if shutil.which("rabbitmqctl") is None or RABBIT_URL.host not in (
        "127.0.0.1",
        "localhost",
    ):
        pytest.skip("needs rabbitmqctl for the local broker")
    try:
        rabbitmqctl("status")
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"rabbitmqctl cannot control the broker: {exc}")
    try:
        yield
    finally:
        rabbitmqctl("start_app")  # never leave the shared broker stopped


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_c12_broker_restart_while_consuming_loses_nothing(
    restartable_broker: None,
) -> None:
    binder = RabbitBinder(RabbitSettings(url=str(RABBIT_URL), **FAST))
    await binder.start()
    dest = fresh()
    reader = Consumer(await binder.subscribe(consumer(dest, prefetch=20)))
    backlog = await binder.subscribe(consumer(dest, "backlog"))
    await backlog.close()  # a durable queue with nobody reading it
    await binder.publish(producer(dest), numbered(0, 300))
    await wait_for(reader.has(1), 10, "the first record")
    retried = fresh("retried")  # a record in its retries, held as a counting copy
    retrying = await binder.subscribe(consumer(retried))
    await binder.publish(producer(retried), [Record(b"failed once")])
    (failed,) = await asyncio.wait_for(retrying.next_batch(), 10) or []
    await retrying.record_attempt(failed)

    await asyncio.to_thread(rabbitmqctl, "stop_app")
    await wait_for(lambda: health_is(binder, HealthStatus.DOWN), 30, "health DOWN")
    with pytest.raises(PublishTimeout):
        await binder.publish(producer(dest), [Record(b"during the outage")])
    await asyncio.to_thread(rabbitmqctl, "start_app")
    await wait_for(lambda: health_is(binder, HealthStatus.UP), 60, "health UP again")
    await binder.publish(producer(dest), numbered(300, 400))
    await wait_for(reader.has(400), 30, "every record")
    kept = await take_values(await binder.subscribe(consumer(dest, "backlog")), 400)
    (again,) = await asyncio.wait_for(retrying.next_batch(), 10) or []
    await again.ack()
    await reader.stop()
    await binder.close()

    assert set(reader.seen) >= {str(i).encode() for i in range(400)}
    assert kept == {str(i).encode() for i in range(400)}  # 300 survived the restart
    assert (again.value, again.attempt) == (b"failed once", 2)
