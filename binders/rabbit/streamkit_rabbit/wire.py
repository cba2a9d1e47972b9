"""How a record travels as an AMQP 0-9-1 message.

===================  ================================================================
record               AMQP message
===================  ================================================================
``value``            the body; ``None`` is an empty body plus ``streamkit_null: 1``
``key``              the ``streamkit_key`` header (RabbitMQ has no message key)
``headers``          the headers table: a value that is valid UTF-8 goes as a long
                     string (``S``, what Spring and most clients read as a string),
                     any other bytes as a byte array (``x``), so both round-trip
                     byte-exactly
``contentType``      an ordinary header, and also the ``content_type`` property, where
                     Spring's header mapper looks for it
===================  ================================================================

Every message carries a fresh ``message_id``: aiormq matches a returned (unroutable)
message to its publish by it, and it is the delivery's printable ``id``.

A record whose handler failed travels on as a copy with ``streamkit_failures: <n>``
(the failed attempts so far) and ``streamkit_copy: <id>`` (which copy it is); both
are read by the binder, not passed on as headers. See :mod:`.subscription`.

Reading is lenient with other clients: a header of another AMQP type (integer,
boolean, timestamp, nested table) becomes its text form; a ``content_type`` property
without a ``contentType`` header becomes that header. ``x-delivery-count`` (added by
quorum queues, counting returns rather than failures) is not passed on.
"""

from __future__ import annotations

import copy
import datetime
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pamqp.commands import Basic
from pamqp.header import ContentHeader

from streamkit.binder import Record
from streamkit.errors import PublishError

__all__ = [
    "CONTENT_TYPE",
    "COPY_HEADER",
    "FAILURES_HEADER",
    "FRAME_OVERHEAD",
    "KEY_HEADER",
    "NULL_HEADER",
    "Decoded",
    "copy_properties",
    "decode_headers",
    "encode_properties",
    "header_frame_size",
]

KEY_HEADER = "streamkit_key"
NULL_HEADER = "streamkit_null"
FAILURES_HEADER = "streamkit_failures"
COPY_HEADER = "streamkit_copy"
#: Part of every holding queue's name (see topology.holding_queue).
HOLDING_INFIX = ".retrying."
CONTENT_TYPE = "contentType"
DELIVERY_COUNT = "x-delivery-count"

#: Frame type, channel, size and frame-end bytes around every frame's payload.
FRAME_OVERHEAD = 8

# pamqp truncates longer field names with only a log warning; we refuse them instead.
_MAX_HEADER_NAME_BYTES = 128
_MAX_SHORTSTR_BYTES = 255
_PERSISTENT = 2
_TRANSIENT = 1


def encode_properties(record: Record, *, persistent: bool) -> Basic.Properties:
    """The AMQP properties (headers included) that carry ``record``."""
    table: dict[str, Any] = {}
    for name, value in record.headers.items():
        table[_check_name(name)] = _encode_value(value)
    if record.key is not None:
        table[KEY_HEADER] = _encode_value(record.key)
    if record.value is None:
        table[NULL_HEADER] = "1"

    return Basic.Properties(
        content_type=_content_type(record.headers.get(CONTENT_TYPE)),
        headers=table or None,
        delivery_mode=_PERSISTENT if persistent else _TRANSIENT,
        message_id=uuid.uuid4().hex,
    )


def header_frame_size(properties: Basic.Properties, body_size: int) -> int:
    """Bytes of the content-header frame, which AMQP never splits across frames."""
    try:
        payload = ContentHeader(0, body_size, properties).marshal()
    except (TypeError, ValueError) as exc:
        raise PublishError(f"A header cannot be encoded for AMQP: {exc}.") from exc
    return len(payload) + FRAME_OVERHEAD


@dataclass(frozen=True, slots=True)
class Decoded:
    """What the binder reads from a received message's properties."""

    headers: dict[str, bytes]
    key: bytes | None
    is_null: bool
    failures: int
    copy: str | None


def decode_headers(properties: Basic.Properties) -> Decoded:
    table: Mapping[str, Any] = properties.headers or {}
    if FAILURES_HEADER in table:
        table = _without_holding_deaths(table)
    headers: dict[str, bytes] = {}
    key: bytes | None = None
    is_null = False
    failures = 0
    copy_id: str | None = None
    for name, value in table.items():
        if name == KEY_HEADER:
            key = _decode_value(value)
        elif name == NULL_HEADER:
            is_null = True
        elif name == FAILURES_HEADER:
            failures = value if isinstance(value, int) else 0
        elif name == COPY_HEADER:
            copy_id = _decode_value(value).decode(errors="replace")
        elif name != DELIVERY_COUNT:
            headers[name] = _decode_value(value)
    if CONTENT_TYPE not in headers and properties.content_type:
        headers[CONTENT_TYPE] = properties.content_type.encode()
    return Decoded(headers, key, is_null, failures, copy_id)


def copy_properties(
    properties: Basic.Properties, *, failures: int, copy_id: str
) -> Basic.Properties:
    """The properties of a copy of a message that carries its failure count."""
    copied = copy.copy(properties)
    copied.headers = {
        **(properties.headers or {}),
        FAILURES_HEADER: failures,
        COPY_HEADER: copy_id,
    }
    copied.delivery_mode = _PERSISTENT
    return copied


def _without_holding_deaths(table: Mapping[str, Any]) -> dict[str, Any]:
    """The headers of a copy without what its trips through a holding queue added.

    The broker records every dead-lettering in ``x-death`` (and the first and last
    in ``x-first-death-*`` / ``x-last-death-*``); the entries naming a holding
    queue (``<queue>.retrying.<owner>``) are the binder's, not the record's.
    """
    cleaned = dict(table)
    deaths = cleaned.get("x-death")
    if isinstance(deaths, list):
        kept = [d for d in deaths if not _is_holding(d.get("queue"))]
        if kept:
            cleaned["x-death"] = kept
        else:
            del cleaned["x-death"]
    for which in ("first", "last"):
        if _is_holding(cleaned.get(f"x-{which}-death-queue")):
            for part in ("queue", "reason", "exchange"):
                cleaned.pop(f"x-{which}-death-{part}", None)
    return cleaned


def _is_holding(queue: Any) -> bool:
    return isinstance(queue, str) and HOLDING_INFIX in queue


def _check_name(name: str) -> str:
    if len(name.encode()) > _MAX_HEADER_NAME_BYTES:
        raise PublishError(
            f"Header name {name[:40]!r}... is longer than {_MAX_HEADER_NAME_BYTES} "
            "bytes in UTF-8, the most an AMQP field name can hold here; shorten it."
        )
    return name


def _encode_value(value: bytes) -> str | bytearray:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return bytearray(value)


def _decode_value(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, datetime.datetime):
        return value.isoformat().encode()
    if value is None:
        return b""
    if isinstance(value, dict | list):
        return json.dumps(value, default=str, ensure_ascii=False).encode()
    return str(value).encode()


def _content_type(value: bytes | None) -> str | None:
    """The ``content_type`` property, when the header fits a short string."""
    if value is None or len(value) > _MAX_SHORTSTR_BYTES:
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None
