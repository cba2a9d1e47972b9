"""OpenTelemetry: the trace context travels with a message through functions."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from streamkit import StreamApp
from streamkit.testing import TestStream

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


async def test_one_trace_follows_a_message_through_two_functions(
    spans: InMemorySpanExporter,
) -> None:
    app = StreamApp()

    @app.processor
    def first(text: str) -> str:
        return text + "!"

    @app.consumer
    def second(text: str) -> None:
        if text == "bad!":
            raise ValueError("bad input")

    settings = {
        "tracing": True,
        "bindings": {
            "first-in-0": {"group": "g"},
            "first-out-0": {"destination": "hop"},
            "second-in-0": {
                "destination": "hop",
                "group": "g",
                "consumer": {"max_attempts": 1},
            },
        },
    }
    async with TestStream(app, settings) as stream:
        await stream.send("first-in-0", "ok")
        await stream.send("first-in-0", "bad")
        await stream.receive_dead_letter("second-in-0")

    finished = [s for s in spans.get_finished_spans() if s.name.startswith("process")]
    by_trace: dict[int, list[str]] = {}
    for span in finished:
        by_trace.setdefault(span.context.trace_id, []).append(span.name)
    assert sorted(map(sorted, by_trace.values())) == [
        ["process first-in-0", "process hop"],
        ["process first-in-0", "process hop"],
    ]
    failed = [s for s in finished if s.status.status_code == trace.StatusCode.ERROR]
    assert [s.name for s in failed] == ["process hop"]
    assert failed[0].attributes["messaging.consumer.group.name"] == "g"
