"""The message envelope a function sees when it asks for more than the payload."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["Headers", "Message"]

T = TypeVar("T")

#: Header values are strings when the wire bytes are valid UTF-8, raw bytes otherwise.
Headers = dict[str, str | bytes]


@dataclass(slots=True)
class Message(Generic[T]):
    """A payload with its headers, key and delivery metadata.

    Annotate a parameter as ``Message[Order]`` to receive the envelope; return a
    ``Message[Invoice]`` to set outgoing headers and key::

        @app.processor
        def enrich(msg: Message[Order]) -> Message[Invoice]:
            return Message(invoice_for(msg.payload), key=msg.payload.customer_id)

    On input, ``id`` is the broker's identity of the record, ``partition`` and
    ``destination`` say where it came from and ``attempt`` counts deliveries and
    retries, starting at 1. On output only ``payload``, ``headers``, ``key`` and
    ``partition`` are used.
    """

    payload: T
    headers: Headers = field(default_factory=dict)
    key: str | bytes | None = None
    partition: int | None = None
    id: str | None = None
    destination: str | None = None
    attempt: int = 1

    @property
    def content_type(self) -> str | None:
        """The ``contentType`` header, if any."""
        value = self.headers.get("contentType")
        return value if isinstance(value, str) else None
