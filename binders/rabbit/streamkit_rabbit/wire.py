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

Reading is lenient with other clients: a header of another AMQP type (integer,
boolean, timestamp, nested table) becomes its text form; a ``content_type`` property
without a ``contentType`` header becomes that header. ``x-delivery-count`` (added by
quorum queues) is not passed on as a header; it is the delivery's ``attempt``.
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Mapping
from typing import Any

from pamqp.commands import Basic
from pamqp.header import ContentHeader

from streamkit.binder import Record
from streamkit.errors import PublishError

__all__ = [
    "CONTENT_TYPE",
    "FRAME_OVERHEAD",
    "KEY_HEADER",
    "NULL_HEADER",
    "decode_headers",
    "encode_properties",
    "header_frame_size",
]

KEY_HEADER = "streamkit_key"
NULL_HEADER = "streamkit_null"
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


def decode_headers(
    properties: Basic.Properties,
) -> tuple[dict[str, bytes], bytes | None, bool, int | None]:
    """``(headers, key, value_is_none, delivery_count)`` of a received message."""
    table: Mapping[str, Any] = properties.headers or {}
    headers: dict[str, bytes] = {}
    key: bytes | None = None
    is_null = False
    count: int | None = None
    for name, value in table.items():
        if name == KEY_HEADER:
            key = _decode_value(value)
        elif name == NULL_HEADER:
            is_null = True
        elif name == DELIVERY_COUNT and isinstance(value, int):
            count = value
        else:
            headers[name] = _decode_value(value)
    if CONTENT_TYPE not in headers and properties.content_type:
        headers[CONTENT_TYPE] = properties.content_type.encode()
    return headers, key, is_null, count


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
