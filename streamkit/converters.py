"""Content types: payload bytes <-> Python values.

The ``contentType`` header of an incoming record picks the converter; a record without
one (a plain client's message) is read with the binding's ``content_type``, which
defaults to ``application/json``. As in Spring Cloud Stream, a function that takes or
returns ``str`` or ``bytes`` gets the raw body (UTF-8 text, or bytes) whatever the
content type says, so a plain-text client and a JSON service interoperate.

Register more content types with :func:`register_converter`.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from functools import lru_cache
from typing import Any, Protocol, cast

from pydantic import BaseModel, TypeAdapter, ValidationError

from .errors import ConversionError, UnsupportedContentType

__all__ = [
    "JSON",
    "OCTET_STREAM",
    "TEXT",
    "Converter",
    "decode",
    "encode",
    "register_converter",
]

JSON = "application/json"
TEXT = "text/plain"
OCTET_STREAM = "application/octet-stream"


class Converter(Protocol):
    """Turns one content type's bytes into values of a target type and back."""

    def decode(self, data: bytes, target: Any) -> Any: ...

    def encode(self, value: Any) -> bytes: ...


@lru_cache(maxsize=512)
def _adapter(target: Any) -> TypeAdapter[Any]:
    return TypeAdapter(target)


def _is_any(target: Any) -> bool:
    return target is Any or target is object


class JsonConverter:
    def decode(self, data: bytes, target: Any) -> Any:
        try:
            if _is_any(target):
                return json.loads(data)
            return _adapter(target).validate_json(data)
        except ValidationError as exc:
            if any(err["type"] == "json_invalid" for err in exc.errors()):
                problem = "is not valid JSON"
            else:
                problem = f"does not match {_name(target)}"
            raise ConversionError(f"payload {problem}: {exc}") from exc
        except ValueError as exc:
            raise ConversionError(f"payload is not valid JSON: {exc}") from exc

    def encode(self, value: Any) -> bytes:
        if isinstance(value, BaseModel):
            return value.model_dump_json().encode()
        try:
            return _adapter(cast(Hashable, type(value))).dump_json(value)
        except Exception as exc:
            raise ConversionError(
                f"cannot encode {type(value).__name__} as JSON: {exc}"
            ) from exc


class TextConverter:
    def decode(self, data: bytes, target: Any) -> Any:
        text = _utf8(data)
        if _is_any(target) or target is str:
            return text
        try:
            return _adapter(target).validate_strings(text)
        except ValidationError as exc:
            raise ConversionError(
                f"invalid text payload for {_name(target)}: {exc}"
            ) from exc

    def encode(self, value: Any) -> bytes:
        return str(value).encode()


class BytesConverter:
    def decode(self, data: bytes, target: Any) -> Any:
        return data

    def encode(self, value: Any) -> bytes:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        raise ConversionError(
            f"application/octet-stream needs bytes, got {type(value).__name__}"
        )


_converters: dict[str, Converter] = {
    JSON: JsonConverter(),
    TEXT: TextConverter(),
    OCTET_STREAM: BytesConverter(),
}


def register_converter(content_type: str, converter: Converter) -> None:
    """Make ``content_type`` (e.g. ``application/x-protobuf``) usable by bindings."""
    _converters[_base(content_type)] = converter


def _base(content_type: str) -> str:
    # "application/json; charset=utf-8" and Spring Kafka's JSON-quoted header value
    # '"application/json"' both mean application/json.
    return content_type.split(";", 1)[0].strip().strip('"').lower()


def _converter(content_type: str) -> Converter:
    base = _base(content_type)
    converter = _converters.get(base)
    if converter is None and base.endswith("+json"):
        converter = _converters[JSON]
    if converter is None:
        raise UnsupportedContentType(
            f"no converter for content type {content_type!r}; register one with "
            "streamkit.converters.register_converter()"
        )
    return converter


def _utf8(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise ConversionError(f"payload is not valid UTF-8 text: {exc}") from exc


def _name(target: Any) -> str:
    return getattr(target, "__name__", None) or repr(target)


def decode(data: bytes | None, content_type: str, target: Any) -> Any:
    """Decode ``data`` into ``target`` (a type; ``Any`` for plain JSON values)."""
    if data is None:
        if _accepts_none(target):
            return None
        raise ConversionError("empty record (null value, e.g. a Kafka tombstone)")
    if target is bytes:
        return data
    if target is str:
        return _utf8(data)
    return _converter(content_type).decode(data, target)


def encode(value: Any, content_type: str) -> tuple[bytes, str]:
    """Encode ``value``; returns the bytes and the content type they carry."""
    if isinstance(value, bytes | bytearray):
        return bytes(value), OCTET_STREAM if _base(
            content_type
        ) == JSON else content_type
    if isinstance(value, str) and _base(content_type) == JSON:
        return value.encode(), TEXT
    return _converter(content_type).encode(value), content_type


@lru_cache(maxsize=512)
def _accepts_none(target: Any) -> bool:
    if _is_any(target) or target is type(None):
        return True
    try:
        _adapter(target).validate_python(None)
    except ValidationError:
        return False
    return True


def converter_for(content_type: str) -> Converter:
    """The converter of ``content_type``; :class:`UnsupportedContentType` if none."""
    return _converter(content_type)
