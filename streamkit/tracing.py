"""OpenTelemetry spans whose context travels in message headers.

Enabled with the ``tracing: true`` setting (needs the ``otel`` extra). Every handled
message gets a CONSUMER span whose parent is the context found in its headers (the
W3C ``traceparent``/``tracestate`` of whoever published it); every published record
carries the current context, so a trace follows a message through every function
and every binder. With tracing on, a lane handles its messages one at a time so each
gets its own span. Configure exporters the usual OpenTelemetry way (an SDK
``TracerProvider``); without one, the API's no-op tracer is used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .binder import ConsumerSpec, Delivery
from .errors import ConfigError

__all__ = ["Tracing"]


class Tracing:
    def __init__(self, system: str) -> None:
        try:
            from opentelemetry import propagate, trace
        except ImportError as exc:
            raise ConfigError(
                "tracing needs OpenTelemetry: pip install 'streamkit[otel]'",
                key="tracing",
            ) from exc
        self._trace = trace
        self._propagate = propagate
        self._tracer = trace.get_tracer("streamkit")
        self._system = system

    @contextmanager
    def consuming(self, delivery: Delivery, spec: ConsumerSpec) -> Iterator[Any]:
        carrier = {
            k: v.decode("latin-1") for k, v in delivery.headers.items() if k.islower()
        }
        parent = self._propagate.extract(carrier)
        attributes = {
            "messaging.system": self._system,
            "messaging.operation.type": "process",
            "messaging.destination.name": delivery.destination,
            "messaging.message.id": delivery.id,
            "messaging.consumer.group.name": spec.group or "",
        }
        with self._tracer.start_as_current_span(
            f"process {spec.destination}",
            context=parent,
            kind=self._trace.SpanKind.CONSUMER,
            attributes=attributes,
        ) as span:
            yield span

    @contextmanager
    def publishing(self, destination: str) -> Iterator[Any]:
        with self._tracer.start_as_current_span(
            f"send {destination}",
            kind=self._trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": self._system,
                "messaging.operation.type": "send",
                "messaging.destination.name": destination,
            },
        ) as span:
            yield span

    def inject(self, headers: dict[str, bytes]) -> None:
        """Write the current trace context into outgoing headers."""
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier)
        for name, value in carrier.items():
            headers[name] = value.encode()

    def record_failure(self, exc: BaseException) -> None:
        span = self._trace.get_current_span()
        span.record_exception(exc)
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, str(exc)))
