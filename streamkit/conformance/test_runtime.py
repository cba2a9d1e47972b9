"""Runtime conformance cases (CONFORMANCE.md 17-20, CASES.md C1, C3-C7), through
StreamApp on every profile.

The app runs on the profile's real binder through
:class:`~streamkit.testing.TestStream` with ``use_configured_binders=True``; the
cases assert which ids the handler saw, what came out, and what is in the DLQ.
Batch consumer functions (case 21) are not part of the programming model yet.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import pytest
from pydantic import BaseModel

from ..app import StreamApp
from ..message import Message
from ..testing import Recorder, TestStream
from .helpers import Names
from .plugin import ActiveProfile, BinderFactory

pytestmark = pytest.mark.asyncio

FAST_RETRY = {"backoff_initial": 0.01, "backoff_multiplier": 2.0, "backoff_max": 0.05}


class Item(BaseModel):
    id: int


def app_settings(
    profile: ActiveProfile, bindings: dict[str, dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    """Settings that run an app's bindings on the profile's binder."""
    merged: dict[str, Any] = {}
    for name, binding in bindings.items():
        binding = dict(binding)
        if name.endswith("-in-0"):
            binding["consumer"] = {
                **profile.profile.consumer_options,
                **FAST_RETRY,
                **binding.get("consumer", {}),
            }
        else:
            binding["producer"] = {
                **profile.profile.producer_options,
                **binding.get("producer", {}),
            }
        merged[name] = binding
    return {
        "default_binder": "bus",
        "binders": {"bus": {"type": profile.profile.binder_type, **profile.settings}},
        "bindings": merged,
        "shutdown_timeout": 5.0,
        **extra,
    }


def stream(
    app: StreamApp, settings: dict[str, Any], profile: ActiveProfile, **kwargs: Any
) -> TestStream:
    return TestStream(
        app,
        settings,
        use_configured_binders=True,
        reader_options=profile.profile.consumer_options,
        **kwargs,
    )


@pytest.fixture
async def reachable(binder_factory: BinderFactory) -> None:
    """Fail or skip (per the CI rule) before a case if the broker is unreachable."""


async def test_mixed_failures_are_retried_in_order_per_key(
    profile: ActiveProfile, names: Names, reachable: None
) -> None:
    """Case 17: the first two calls fail, then every fifth record once: all are
    processed, in order per key, with no dead letters."""
    profile.require("ordering")
    app = StreamApp()
    seen = Recorder()
    calls = 0

    # The failures follow the calls and the records, not the clock, so the case is
    # deterministic on every broker: the first two calls fail, and so does the
    # first attempt of every fifth record.
    @app.consumer
    async def handle(msg: Message[Item]) -> None:
        nonlocal calls
        calls += 1
        if calls <= 2 or (msg.payload.id % 5 == 4 and msg.attempt == 1):
            raise RuntimeError(f"call {calls} fails")
        seen.add((str(msg.key), msg.payload.id))

    count = profile.sized(60, 500)
    dest = names.destination()
    settings = app_settings(
        profile,
        {
            "handle-in-0": {
                "destination": dest,
                "group": names.group(),
                "consumer": {"concurrency": 4, "max_attempts": 4},
            }
        },
    )
    async with stream(app, settings, profile) as s:
        for i in range(count):
            await s.send(dest, {"id": i}, key=f"k{i % 8}")
        await seen.wait_count(count, profile.timeout() * 2)
        await s.assert_no_dead_letter("handle-in-0")

    by_key: dict[str, list[int]] = defaultdict(list)
    for key, item_id in seen.items:
        by_key[key].append(item_id)
    assert sorted(i for _, i in seen.items) == list(range(count))
    for key, ids in by_key.items():
        assert ids == sorted(ids), f"key {key} out of order: {ids}"


async def test_retry_then_dead_letter_with_exact_attempts_and_headers(
    profile: ActiveProfile, names: Names, reachable: None
) -> None:
    """Case 18 / C7-C8: exactly max_attempts calls, then the DLQ holds the original
    bytes and headers plus the exception and attempt headers."""
    app = StreamApp()
    seen = Recorder()

    @app.consumer
    async def handle(item: Item) -> None:
        seen.add(item.id)
        if item.id == 1:
            raise ValueError("item 1 is cursed")

    dest = names.destination()
    group = names.group()
    settings = app_settings(
        profile,
        {
            "handle-in-0": {
                "destination": dest,
                "group": group,
                "consumer": {"max_attempts": 3},
            }
        },
    )
    async with stream(app, settings, profile) as s:
        await s.send(dest, {"id": 0})
        await s.send(dest, {"id": 1}, key="k1", headers={"x-trace": "abc-é"})
        await s.send(dest, {"id": 2})

        dead = await s.receive_dead_letter("handle-in-0", timeout=profile.timeout())
        await seen.wait_for(lambda items: 2 in items, profile.timeout())

    assert seen.items.count(1) == 3
    assert seen.items.count(0) == seen.items.count(2) == 1
    assert dead.payload == b'{"id":1}'
    assert dead.key == "k1"
    assert dead.headers["x-trace"] == "abc-é"
    assert dead.headers["contentType"] == "application/json"
    assert dead.headers["x-attempts"] == "3"
    assert dead.headers["x-exception-fqcn"] == "builtins.ValueError"
    assert dead.headers["x-exception-message"] == "item 1 is cursed"
    assert dead.headers["x-original-destination"] == dest
    assert dead.headers["x-original-group"] == group


async def test_poison_inputs_are_dead_lettered_once_and_neighbours_flow(
    profile: ActiveProfile, names: Names, reachable: None
) -> None:
    """Case 19 / C4-C6: undecodable payloads go to the DLQ once with their bytes;
    a plain client's message and odd header bytes still reach the handler."""
    app = StreamApp()
    seen = Recorder()
    headers_seen: list[dict[str, Any]] = []

    @app.consumer
    async def handle(msg: Message[Item]) -> None:
        headers_seen.append(dict(msg.headers))
        seen.add(msg.payload.id)

    poison = [b"{not json", b'{"id": "seven"}', b"[1, 2]", b"", b"\xff\xfe\xfd"]
    dest = names.destination()
    settings = app_settings(
        profile, {"handle-in-0": {"destination": dest, "group": names.group()}}
    )
    async with stream(app, settings, profile) as s:
        for n, body in enumerate(poison):
            await s.send(dest, {"id": n})
            await s.send(
                dest, body, raw=True, headers={"contentType": "application/json"}
            )
        await s.send(dest, b'{"id": 100}', raw=True)  # a plain client: no headers
        await s.send(
            dest,
            {"id": 101},
            headers={"x-binary": b"\xff\x00\xfe", "x-unicode": "naïve ☃"},
        )

        dead = [
            await s.receive_dead_letter("handle-in-0", timeout=profile.timeout())
            for _ in poison
        ]
        await seen.wait_for(lambda items: 101 in items, profile.timeout())
        await s.assert_no_dead_letter("handle-in-0")

    assert sorted(seen.items) == [0, 1, 2, 3, 4, 100, 101]
    assert sorted(d.payload or b"" for d in dead) == sorted(poison)
    assert {d.headers["x-dlq-reason"] for d in dead} == {"decode"}
    last = headers_seen[seen.items.index(101)]
    assert last["x-unicode"] == "naïve ☃"
    assert last["x-binary"] == b"\xff\x00\xfe"


async def test_drain_finishes_in_flight_work_and_redelivers_the_rest(
    profile: ActiveProfile, names: Names, reachable: None
) -> None:
    """Case 20 / C3: at shutdown an in-flight handler finishes and its output is
    published; one outliving the drain timeout is redelivered to the next instance,
    never counted as a failure or dead-lettered."""
    app = StreamApp()
    both_started = asyncio.Event()
    calls: list[tuple[int, int]] = []

    @app.processor
    async def work(msg: Message[Item]) -> Item:
        calls.append((msg.payload.id, msg.attempt))
        if len(calls) == 2:
            both_started.set()
        await asyncio.sleep(0.3 if msg.payload.id == 0 else 30)
        return msg.payload

    dest, out, group = names.destination(), names.destination("out"), names.group()
    bindings: dict[str, dict[str, Any]] = {
        "work-in-0": {
            "destination": dest,
            "group": group,
            "consumer": {"max_attempts": 1, "concurrency": 2, "ordering": "none"},
        },
        "work-out-0": {"destination": out},
    }
    first = stream(app, app_settings(profile, bindings, shutdown_timeout=1.0), profile)
    async with first:
        await first.send(dest, {"id": 0})
        await first.send(dest, {"id": 1})
        await asyncio.wait_for(both_started.wait(), profile.timeout())

    finished = StreamApp()
    redelivered: list[tuple[int, int]] = []

    @finished.processor(name="work")
    async def work_again(msg: Message[Item]) -> Item:
        redelivered.append((msg.payload.id, msg.attempt))
        return msg.payload

    async with stream(
        finished, app_settings(profile, bindings), profile, broker=first.broker
    ) as s:
        outputs = await s.receive_many(
            "work-out-0", 2, timeout=profile.timeout(recovery=True)
        )
        await s.assert_no_dead_letter("work-in-0")

    assert sorted(m.payload["id"] for m in outputs) == [0, 1]
    assert redelivered == [(1, 1)]


async def test_retry_limit_holds_across_restarts(
    profile: ActiveProfile, names: Names, reachable: None
) -> None:
    """C7: a handler that always fails is called exactly max_attempts times in total,
    although the process stops between attempts."""
    profile.require("native_delivery_count")
    app = StreamApp()
    seen = Recorder()

    @app.consumer
    async def handle(item: Item) -> None:
        seen.add(item.id)
        raise RuntimeError("always")

    dest, group = names.destination(), names.group()
    slow = {"max_attempts": 3, "backoff_initial": 60}
    bindings: dict[str, dict[str, Any]] = {
        "handle-in-0": {"destination": dest, "group": group, "consumer": slow}
    }
    first = stream(app, app_settings(profile, bindings, shutdown_timeout=0.5), profile)
    async with first:
        await first.send(dest, {"id": 7})
        await seen.wait_count(1, profile.timeout())

    bindings["handle-in-0"]["consumer"] = {"max_attempts": 3}
    async with stream(
        app, app_settings(profile, bindings), profile, broker=first.broker
    ) as s:
        dead = await s.receive_dead_letter(
            "handle-in-0", timeout=profile.timeout(recovery=True)
        )

    assert seen.items == [7, 7, 7]
    assert dead.headers["x-attempts"] == "3"


async def test_failed_message_without_dlq_comes_back_after_restart(
    profile: ActiveProfile, names: Names, reachable: None
) -> None:
    """C1: with the DLQ off, a message that failed for good is not acked, so a
    restarted consumer gets it again, although later messages succeeded."""
    profile.require("persistence")
    app = StreamApp()
    seen = Recorder()

    @app.consumer
    async def handle(item: Item) -> None:
        seen.add(item.id)
        if item.id in (1, 3):
            raise RuntimeError("odd one out")

    dest, group = names.destination(), names.group()
    bindings: dict[str, dict[str, Any]] = {
        "handle-in-0": {
            "destination": dest,
            "group": group,
            "consumer": {"max_attempts": 1, "dlq": False},
        }
    }
    first = stream(app, app_settings(profile, bindings, shutdown_timeout=0.5), profile)
    async with first:
        for i in range(1, 5):
            await first.send(dest, {"id": i})
        await seen.wait_count(4, profile.timeout())

    seen.items.clear()
    async with stream(
        app, app_settings(profile, bindings), profile, broker=first.broker
    ):
        await seen.wait_for(
            lambda items: {1, 3} <= set(items), profile.timeout(recovery=True)
        )

    assert {1, 3} <= set(seen.items)
