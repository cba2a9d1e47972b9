"""The runtime pipeline on the in-memory binder: outcomes, not mechanics."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel

from streamkit import ConsumerSpec, Message, PublishTimeout, StreamApp
from streamkit.testing import Recorder, TestStream

FAST_RETRY = {"backoff_initial": 0.01, "backoff_max": 0.05}


class Order(BaseModel):
    id: int
    qty: int


def consumer_settings(binding: str, **consumer: Any) -> dict[str, Any]:
    return {
        "bindings": {binding: {"group": "g", "consumer": {**FAST_RETRY, **consumer}}}
    }


async def test_processor_converts_pydantic_models_both_ways() -> None:
    app = StreamApp()

    @app.processor
    def double(order: Order) -> Order:
        return Order(id=order.id, qty=order.qty * 2)

    async with TestStream(app) as stream:
        await stream.send("double-in-0", {"id": 1, "qty": 21})

        reply = await stream.receive("double-out-0", type=Order)

    assert reply.payload == Order(id=1, qty=42)
    assert reply.headers["contentType"] == "application/json"


async def test_returning_none_filters_the_input_out() -> None:
    app = StreamApp()

    @app.processor
    async def evens(n: int) -> int | None:
        return n if n % 2 == 0 else None

    async with TestStream(app) as stream:
        for n in range(6):
            await stream.send("evens-in-0", n)

        received = await stream.receive_many("evens-out-0", 3)
        await stream.assert_nothing("evens-out-0")

    assert [m.payload for m in received] == [0, 2, 4]


async def test_async_generator_fans_out_each_input() -> None:
    app = StreamApp()

    @app.processor
    async def split(line: str) -> AsyncIterator[str]:
        for word in line.split():
            yield word

    async with TestStream(app) as stream:
        await stream.send("split-in-0", "to be or not")

        words = await stream.receive_many("split-out-0", 4)

    assert [m.payload for m in words] == ["to", "be", "or", "not"]


async def test_message_envelope_carries_headers_and_key_both_ways() -> None:
    app = StreamApp()
    seen: list[Message[str]] = []

    @app.processor
    def tag(msg: Message[str]) -> Message[str]:
        seen.append(msg)
        return Message(msg.payload, headers={"x-tag": "éte"}, key="out-key")

    async with TestStream(app) as stream:
        await stream.send("tag-in-0", "hi", key="in-key", headers={"x-in": "ü"})

        reply = await stream.receive("tag-out-0")

    assert seen[0].key == "in-key"
    assert seen[0].headers["x-in"] == "ü"
    assert seen[0].attempt == 1
    assert reply.key == "out-key"
    assert reply.headers["x-tag"] == "éte"


async def test_plain_outputs_inherit_the_input_key() -> None:
    app = StreamApp()

    @app.processor
    def same(text: str) -> str:
        return text

    async with TestStream(app) as stream:
        await stream.send("same-in-0", "x", key="customer-7")

        reply = await stream.receive("same-out-0")

    assert reply.key == "customer-7"


async def test_failing_handler_is_retried_then_dead_lettered_with_headers() -> None:
    app = StreamApp()
    calls: list[int] = []

    @app.consumer
    def always_fails(order: Order) -> None:
        calls.append(order.id)
        raise RuntimeError(f"boom {order.id}")

    settings = consumer_settings("always_fails-in-0", max_attempts=3)
    async with TestStream(app, settings) as stream:
        await stream.send("always_fails-in-0", {"id": 9, "qty": 1}, key="k9")

        dead = await stream.receive_dead_letter("always_fails-in-0")

    assert calls == [9, 9, 9]
    assert dead.payload == b'{"id":9,"qty":1}'
    assert dead.key == "k9"
    assert dead.headers["x-attempts"] == "3"
    assert dead.headers["x-dlq-reason"] == "retries-exhausted"
    assert dead.headers["x-exception-fqcn"] == "builtins.RuntimeError"
    assert dead.headers["x-exception-message"] == "boom 9"
    assert "RuntimeError: boom 9" in str(dead.headers["x-exception-stacktrace"])
    assert dead.headers["x-original-destination"] == "always_fails-in-0"
    assert dead.headers["x-original-group"] == "g"


async def test_retries_are_spaced_by_exponential_backoff() -> None:
    app = StreamApp()
    loop = asyncio.get_running_loop()
    times = Recorder()

    @app.consumer
    async def flaky(n: int) -> None:
        times.add(loop.time())
        if len(times.items) < 3:
            raise ValueError("not yet")

    settings = {
        "bindings": {
            "flaky-in-0": {
                "group": "g",
                "consumer": {"backoff_initial": 0.1, "backoff_multiplier": 3},
            }
        }
    }
    async with TestStream(app, settings) as stream:
        await stream.send("flaky-in-0", 1)
        await times.wait_count(3)
        await stream.assert_no_dead_letter("flaky-in-0")

    gaps = [b - a for a, b in itertools.pairwise(times.items)]
    assert len(times.items) == 3
    assert 0.1 <= gaps[0] < 0.3
    assert 0.3 <= gaps[1] < 0.6


async def test_failed_attempt_publishes_no_partial_output() -> None:
    app = StreamApp()
    attempts = 0

    @app.processor
    async def half(n: int) -> AsyncIterator[int]:
        nonlocal attempts
        attempts += 1
        yield n
        if attempts == 1:
            raise RuntimeError("fails after the first output")
        yield n + 1

    async with TestStream(app, consumer_settings("half-in-0")) as stream:
        await stream.send("half-in-0", 10)

        outputs = await stream.receive_many("half-out-0", 2)
        await stream.assert_nothing("half-out-0")

    assert [m.payload for m in outputs] == [10, 11]


async def test_undecodable_payloads_skip_retries_and_neighbours_flow() -> None:
    app = StreamApp()
    processed: list[int] = []

    @app.consumer
    def orders(order: Order) -> None:
        processed.append(order.id)

    poison = [b"{not json", b'{"id": "x"}', b"", b"\xff\xfe", None]
    async with TestStream(app, consumer_settings("orders-in-0")) as stream:
        for i, body in enumerate(poison):
            await stream.send("orders-in-0", {"id": i, "qty": 1})
            await stream.send("orders-in-0", body, raw=True)
        await stream.send("orders-in-0", {"id": 99, "qty": 1})

        dead = [await stream.receive_dead_letter("orders-in-0") for _ in poison]
        await stream.assert_nothing("orders-in-0.g.dlq")

    assert processed == [0, 1, 2, 3, 4, 99]
    assert [d.payload for d in dead] == poison
    assert {d.headers["x-dlq-reason"] for d in dead} == {"decode"}
    assert {d.headers["x-attempts"] for d in dead} == {"0"}


async def test_plain_client_message_without_headers_uses_binding_content_type() -> None:
    app = StreamApp()
    seen: list[Any] = []

    @app.consumer
    def anything(value: dict[str, int]) -> None:
        seen.append(value)

    settings = {"bindings": {"anything-in-0": {"group": "g"}}}
    async with TestStream(app, settings) as stream:
        await stream.send("anything-in-0", b'{"a": 1}', raw=True)
        await stream.send(
            "anything-in-0",
            b'{"b": 2}',
            raw=True,
            headers={"contentType": "text/x-odd"},
        )

        dead = await stream.receive_dead_letter("anything-in-0")

    assert seen == [{"a": 1}]
    assert "text/x-odd" in str(dead.headers["x-exception-message"])


async def test_non_retryable_exception_goes_straight_to_the_dlq() -> None:
    app = StreamApp()
    calls = 0

    class Invalid(ValueError):
        pass

    @app.consumer
    def check(n: int) -> None:
        nonlocal calls
        calls += 1
        raise Invalid("never valid")

    settings = consumer_settings("check-in-0", non_retryable_exceptions=["Invalid"])
    async with TestStream(app, settings) as stream:
        await stream.send("check-in-0", 1)

        dead = await stream.receive_dead_letter("check-in-0")

    assert calls == 1
    assert dead.headers["x-dlq-reason"] == "non-retryable"


async def test_dead_lettering_a_dead_letter_keeps_the_first_origin() -> None:
    app = StreamApp()

    @app.consumer
    def again(n: int) -> None:
        raise RuntimeError("second failure")

    settings = consumer_settings("again-in-0", max_attempts=1)
    first_failure = {
        "x-exception-message": "first failure",
        "x-exception-fqcn": "builtins.KeyError",
        "x-original-destination": "where-it-began",
        "x-original-id": "0-7",
        "x-original-group": "first",
    }
    async with TestStream(app, settings) as stream:
        await stream.send("again-in-0", 1, headers=first_failure)

        dead = await stream.receive_dead_letter("again-in-0")

    assert dead.headers["x-exception-message"] == "second failure"
    assert dead.headers["x-exception-fqcn"] == "builtins.RuntimeError"
    assert dead.headers["x-original-destination"] == "where-it-began"
    assert dead.headers["x-original-id"] == "0-7"


async def test_huge_exception_is_truncated_and_body_untouched() -> None:
    app = StreamApp()
    body = "b" * 100_000

    @app.consumer
    def explode(text: str) -> None:
        raise RuntimeError("x" * 1_000_000)

    async with TestStream(app, consumer_settings("explode-in-0", max_attempts=1)) as s:
        await s.send("explode-in-0", body)

        dead = await s.receive_dead_letter("explode-in-0")

    assert dead.payload == body.encode()
    assert len(dead.headers["x-exception-message"]) <= 1024
    assert len(dead.headers["x-exception-stacktrace"]) <= 8192


async def test_concurrency_keeps_order_per_key() -> None:
    app = StreamApp()
    seen = Recorder()

    @app.consumer
    async def record(msg: Message[int]) -> None:
        await asyncio.sleep(0.001 * (msg.payload % 3))  # jitter between lanes
        seen.add((msg.key, msg.payload))

    settings = consumer_settings("record-in-0", concurrency=4)
    async with TestStream(app, settings) as stream:
        for i in range(200):
            await stream.send("record-in-0", i, key=f"k{i % 8}")
        await seen.wait_count(200)

    by_key: dict[str, list[int]] = {}
    for key, value in seen.items:
        by_key.setdefault(key, []).append(value)
    assert len(by_key) == 8
    for key, values in by_key.items():
        assert values == sorted(values), key


async def test_concurrency_runs_handlers_in_parallel() -> None:
    app = StreamApp()
    running = Recorder()
    release = asyncio.Event()

    @app.consumer
    async def slow(n: int) -> None:
        running.add(n)
        await release.wait()

    settings = consumer_settings("slow-in-0", concurrency=4, ordering="none")
    async with TestStream(app, settings) as stream:
        for i in range(8):
            await stream.send("slow-in-0", i)
        await running.wait_count(4)
        await stream.assert_nothing("slow-in-0.g.dlq", within=0.1)
        started_before_release = len(running.items)
        release.set()

    assert started_before_release == 4


async def test_polled_producer_publishes_on_its_interval() -> None:
    app = StreamApp()
    counter = iter(range(1000))

    @app.producer
    def ticks() -> int:
        return next(counter)

    async with TestStream(app, {"poll_interval": 0.01}) as stream:
        received = await stream.receive_many("ticks-out-0", 5)

    assert [m.payload for m in received] == [0, 1, 2, 3, 4]


async def test_source_generator_runs_until_it_returns() -> None:
    app = StreamApp()

    @app.producer
    async def source() -> AsyncIterator[str]:
        for word in ["a", "b", "c"]:
            yield word

    async with TestStream(app) as stream:
        received = await stream.receive_many("source-out-0", 3)
        await stream.assert_nothing("source-out-0")

    assert [m.payload for m in received] == ["a", "b", "c"]


async def test_composition_runs_functions_in_process_as_one() -> None:
    app = StreamApp()

    @app.processor
    def parse(text: str) -> Order:
        n = int(text)
        return Order(id=n, qty=n)

    @app.processor
    def enrich(msg: Message[Order]) -> int:
        return msg.payload.qty * 10

    async with TestStream(app, {"functions": "parse|enrich"}) as stream:
        await stream.send("parseenrich-in-0", "4")

        reply = await stream.receive("parseenrich-out-0")

    assert reply.payload == 40


async def test_bridge_sends_to_any_destination() -> None:
    app = StreamApp()

    @app.consumer
    async def audit(text: str) -> None:
        await app.bridge.send("audit-log", {"seen": text}, key="a")

    async with TestStream(app) as stream:
        await stream.send("audit-in-0", "login")

        entry = await stream.receive("audit-log")

    assert entry.payload == {"seen": "login"}
    assert entry.key == "a"


async def test_partition_key_spreads_outputs_stably() -> None:
    app = StreamApp()

    @app.processor
    def route(order: Order) -> Order:
        return order

    settings = {
        "bindings": {
            "route-out-0": {"producer": {"partition_key": "id", "partition_count": 4}}
        }
    }
    async with TestStream(app, settings) as stream:
        for i in range(8):
            await stream.send("route-in-0", {"id": i % 4, "qty": i})

        received = await stream.receive_many("route-out-0", 8, type=Order)

    by_id: dict[int, set[int | None]] = {}
    for m in received:
        by_id.setdefault(m.payload.id, set()).add(m.partition)
    assert all(len(parts) == 1 for parts in by_id.values())
    assert len({p for parts in by_id.values() for p in parts}) > 1


async def test_shutdown_cancels_a_slow_handler_without_counting_a_failure() -> None:
    app = StreamApp()
    started = asyncio.Event()

    @app.consumer
    async def sleepy(n: int) -> None:
        started.set()
        await asyncio.sleep(10)

    settings = {
        **consumer_settings("sleepy-in-0", max_attempts=1),
        "shutdown_timeout": 0.2,
    }
    stream = TestStream(app, settings)
    async with stream:
        await stream.send("sleepy-in-0", 1)
        await asyncio.wait_for(started.wait(), 5)
    app2 = StreamApp()
    got = Recorder()

    @app2.consumer
    def sleepy(msg: Message[int]) -> None:  # noqa: F811 - same binding, new process
        got.add(msg)

    # A new consumer in the same group on the same broker gets the message back,
    # and it was never dead-lettered.
    stream2 = TestStream(app2, settings, broker=stream.broker)
    async with stream2:
        await got.wait_count(1)
        await stream2.assert_no_dead_letter("sleepy-in-0")

    assert [(m.payload, m.attempt) for m in got.items] == [(1, 1)]


@pytest.mark.parametrize("dlq", [True, False])
async def test_dlq_off_leaves_the_failed_message_for_redelivery(dlq: bool) -> None:
    app = StreamApp()
    calls = Recorder()

    @app.consumer
    def fails_on_odd(n: int) -> None:
        calls.add(n)
        if n % 2:
            raise RuntimeError("odd")

    settings = consumer_settings("fails_on_odd-in-0", max_attempts=1, dlq=dlq)
    stream = TestStream(app, settings)
    async with stream:
        for n in range(1, 5):
            await stream.send("fails_on_odd-in-0", n)
        await calls.wait_count(4)
        if dlq:
            dead = [await stream.receive_dead_letter("fails_on_odd-in-0") for _ in "ab"]
            assert [d.payload for d in dead] == [b"1", b"3"]
    restarted = TestStream(app, settings, broker=stream.broker)
    calls.items.clear()
    async with restarted:
        if dlq:
            await restarted.assert_no_dead_letter("fails_on_odd-in-0")
        else:
            await calls.wait_count(2)

    assert sorted(calls.items) == ([] if dlq else [1, 3])


async def test_retry_limit_holds_across_a_restart_between_attempts() -> None:
    app = StreamApp()
    calls: list[int] = []
    failed_once = asyncio.Event()

    @app.consumer
    def always_fails(n: int) -> None:
        calls.append(n)
        failed_once.set()
        raise RuntimeError("still broken")

    slow = {
        **consumer_settings("always_fails-in-0", max_attempts=3, backoff_initial=30),
        "shutdown_timeout": 0.2,
    }
    first = TestStream(app, slow)
    async with first:
        await first.send("always_fails-in-0", 5)
        await asyncio.wait_for(failed_once.wait(), 5)
    async with TestStream(
        app, consumer_settings("always_fails-in-0", max_attempts=3), broker=first.broker
    ) as restarted:
        dead = await restarted.receive_dead_letter("always_fails-in-0")

    assert calls == [5, 5, 5]
    assert dead.headers["x-attempts"] == "3"


async def test_shutdown_starts_no_new_call_of_a_queued_sync_run() -> None:
    app = StreamApp()
    calls = Recorder()
    gate = threading.Event()

    @app.consumer
    def slow(n: int) -> None:
        calls.add(n)
        gate.wait(5)  # the first call blocks until the app is stopping

    settings = {**consumer_settings("slow-in-0"), "shutdown_timeout": 5.0}
    first = TestStream(app, settings)
    async with first:
        for n in range(10):
            await first.send("slow-in-0", n)
        await calls.wait_count(1)
        assert first.runner is not None
        pipeline = first.runner.inputs["slow-in-0"]
        stopping = asyncio.create_task(first.runner.stop())
        for _ in range(100):  # a few loop turns until stop() reaches the binding
            if pipeline.state == "stopping":
                break
            await asyncio.sleep(0)
        assert pipeline.state == "stopping"
        gate.set()
        await stopping
    first_run = list(calls.items)
    calls.items.clear()
    async with TestStream(app, settings, broker=first.broker):
        await calls.wait_count(10 - len(first_run))

    assert first_run == [0]
    assert sorted(calls.items) == list(range(1, 10))


async def test_without_ordering_a_slow_message_does_not_hold_up_idle_workers() -> None:
    app = StreamApp()
    done = Recorder()
    release = asyncio.Event()

    @app.consumer
    async def work(n: int) -> None:
        if n == 0:
            await release.wait()
        done.add(n)

    settings = consumer_settings("work-in-0", concurrency=2, ordering="none")
    async with TestStream(app, settings) as stream:
        for n in range(6):
            await stream.send("work-in-0", n)
        await done.wait_count(5)
        finished_while_blocked = sorted(done.items)
        release.set()
        await done.wait_count(6)

    assert finished_while_blocked == [1, 2, 3, 4, 5]


async def test_startup_hooks_finish_before_the_first_message_is_handled() -> None:
    app = StreamApp()
    ready = False
    seen = Recorder()

    @app.on_startup
    async def prepare() -> None:
        nonlocal ready
        await app.bridge.send("handle-in-0", 1)  # a message waits before we are ready
        await asyncio.sleep(0.05)  # a slow hook: the handler must wait for it
        ready = True

    @app.consumer
    def handle(n: int) -> None:
        seen.add(ready)

    async with TestStream(app, {"bindings": {"handle-in-0": {"group": "g"}}}):
        await seen.wait_count(1)

    assert seen.items == [True]


async def test_bridge_send_raises_when_the_broker_does_not_take_the_record() -> None:
    app = StreamApp()

    @app.consumer
    async def idle(n: int) -> None: ...

    memory = {"type": "memory", "buffer_size": 1, "publish_timeout": 0.2}
    settings = {"binders": {"local": memory}}
    async with TestStream(app, settings, use_configured_binders=True) as stream:
        assert stream.runner is not None
        binder = stream.runner.binders["local"]
        lazy = await binder.subscribe(ConsumerSpec("full", group="never-reads"))
        await app.bridge.send("full", 1)  # takes the partition's only slot

        with pytest.raises(PublishTimeout):
            await app.bridge.send("full", 2)
        await lazy.close()


async def test_a_source_that_dies_makes_the_app_unhealthy() -> None:
    app = StreamApp()

    @app.producer
    async def source() -> AsyncIterator[int]:
        yield 1
        raise RuntimeError("the feed went away")

    async with TestStream(app) as stream:
        await stream.receive("source-out-0")
        assert stream.runner is not None
        for _ in range(100):  # the task ends right after the first yield is sent
            if stream.runner.describe_bindings()[0]["state"] == "failed":
                break
            await asyncio.sleep(0.01)
        report = await stream.runner.health()

    assert report["status"] == "down"
    assert report["bindings"] == {"source-out-0": "down"}


async def test_a_retry_after_a_restart_still_waits_its_backoff() -> None:
    app = StreamApp()
    loop = asyncio.get_running_loop()
    calls = Recorder()

    @app.consumer
    def fails_once(n: int) -> None:
        calls.add(loop.time())
        if len(calls.items) == 1:
            raise RuntimeError("first attempt fails")

    waiting = {
        **consumer_settings("fails_once-in-0", backoff_initial=0.3, backoff_max=1),
        "shutdown_timeout": 0.2,
    }
    first = TestStream(app, waiting)
    async with first:
        await first.send("fails_once-in-0", 1)
        await calls.wait_count(1)
    restarted_at = loop.time()
    async with TestStream(app, waiting, broker=first.broker):
        await calls.wait_count(2)

    assert calls.items[1] - restarted_at >= 0.3
