"""How a record is laid out in a stream entry, and how Redis replies are read.

An entry is a flat list of field/value pairs, both binary-safe:

=================  ==================================================================
field              value
=================  ==================================================================
``body``           the record's value (absent when the value is ``None``)
``key``            the record's key (absent when ``None``)
``h:<name>``       one header: ``<name>`` is the header name in UTF-8, the value the
                   header's raw bytes (``contentType`` is an ordinary header)
``null``           ``b"1"`` marks a ``None`` value (Redis has no tombstones; an entry
                   needs at least one field)
=================  ==================================================================

An entry written by another client (no ``body`` and no ``null`` field) is read as a
JSON object of its fields, with ``contentType: application/json`` unless the entry
says otherwise; values that are not valid UTF-8 are decoded with U+FFFD replacement.

Replies are parsed here by hand, not by redis-py's callbacks, because their shapes
differ between server versions (``XAUTOCLAIM`` gained a third element in Redis 7)
and between protocol versions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from streamkit.binder import Record

__all__ = [
    "AutoclaimReply",
    "Entry",
    "decode_entry",
    "encode_record",
    "pairs",
    "parse_autoclaim",
    "parse_entries",
    "parse_pending",
    "parse_stream_reply",
    "record_size",
    "text",
]

BODY = b"body"
KEY = b"key"
NULL = b"null"
HEADER_PREFIX = b"h:"
CONTENT_TYPE = "contentType"


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry; ``fields`` is ``None`` when the entry was deleted."""

    id: str
    fields: list[tuple[bytes, bytes]] | None


@dataclass(frozen=True, slots=True)
class AutoclaimReply:
    """Ids now claimed, and ids of deleted entries still found pending."""

    cursor: str
    claimed: list[str]
    deleted: list[str]


def record_size(record: Record) -> int:
    """Payload bytes of a record as the size limit counts them."""
    size = len(record.value or b"") + len(record.key or b"")
    return size + sum(len(k.encode()) + len(v) for k, v in record.headers.items())


def encode_record(record: Record) -> dict[bytes, bytes]:
    fields: dict[bytes, bytes] = {}
    if record.value is None:
        fields[NULL] = b"1"
    else:
        fields[BODY] = record.value
    if record.key is not None:
        fields[KEY] = record.key
    for name, value in record.headers.items():
        fields[HEADER_PREFIX + name.encode("utf-8", "surrogateescape")] = value
    return fields


def decode_entry(
    fields: Sequence[tuple[bytes, bytes]],
) -> tuple[bytes | None, dict[str, bytes], bytes | None]:
    """``(value, headers, key)`` of an entry's fields."""
    value: bytes | None = None
    key: bytes | None = None
    headers: dict[str, bytes] = {}
    foreign: dict[str, str] = {}
    has_body = is_null = False
    for name, raw in fields:
        if name == BODY:
            value, has_body = raw, True
        elif name == KEY:
            key = raw
        elif name == NULL:
            is_null = True
        elif name.startswith(HEADER_PREFIX):
            header = name[len(HEADER_PREFIX) :].decode("utf-8", "surrogateescape")
            headers[header] = raw
        else:
            foreign[name.decode("utf-8", "replace")] = raw.decode("utf-8", "replace")
    if not has_body and not is_null:
        value = json.dumps(foreign, ensure_ascii=False).encode() if foreign else b""
        headers.setdefault(CONTENT_TYPE, b"application/json")
    return value, headers, key


# -- replies ------------------------------------------------------------------------


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def pairs(raw: Any) -> list[tuple[bytes, bytes]] | None:
    if raw is None:
        return None
    if isinstance(raw, Mapping):
        return list(raw.items())
    flat = list(raw)
    return list(zip(flat[0::2], flat[1::2], strict=True))


def parse_entries(raw: Iterable[Any] | None) -> list[Entry]:
    """A list of ``[id, fields]``; a deleted entry has ``None`` fields."""
    entries: list[Entry] = []
    for item in raw or ():
        if item is None:
            # Redis 6.2 answers a claimed-but-deleted entry with a bare nil: its id is
            # unknown here, and it is found again through the pending list.
            continue
        entry_id, fields = item[0], item[1] if len(item) > 1 else None
        entries.append(Entry(text(entry_id), pairs(fields)))
    return entries


def parse_stream_reply(raw: Any) -> dict[str, list[Entry]]:
    """XREAD / XREADGROUP: entries per stream key (empty on a timed-out block)."""
    if not raw:
        return {}
    items = raw.items() if isinstance(raw, Mapping) else ((s, e) for s, e in raw)
    return {text(stream): parse_entries(entries) for stream, entries in items}


def parse_autoclaim(raw: Sequence[Any]) -> AutoclaimReply:
    """XAUTOCLAIM, with or without JUSTID, in the Redis 6.2 and 7 shapes.

    Redis 6.2 answers ``[cursor, entries]`` and keeps deleted entries in the pending
    list (shown as nil, or as an id with nil fields; with JUSTID they look like any
    other id); Redis 7 answers ``[cursor, entries, deleted_ids]`` and drops the
    deleted ones from the pending list itself.
    """
    claimed: list[str] = []
    deleted = [text(i) for i in raw[2]] if len(raw) > 2 and raw[2] else []
    for item in raw[1] or ():
        if isinstance(item, bytes | str):
            claimed.append(text(item))
        elif item is not None:
            entry = parse_entries([item])[0]
            (claimed if entry.fields is not None else deleted).append(entry.id)
    return AutoclaimReply(text(raw[0]), claimed, deleted)


def parse_pending(raw: Iterable[Any] | None) -> list[tuple[str, str, int, int]]:
    """Extended XPENDING: ``(id, consumer, idle_ms, times_delivered)`` rows."""
    return [(text(row[0]), text(row[1]), int(row[2]), int(row[3])) for row in raw or ()]
