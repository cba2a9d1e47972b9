"""Content types: what decodes into what, and what is refused."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from pydantic import BaseModel

from streamkit import ConversionError, UnsupportedContentType, register_converter
from streamkit.converters import decode, encode


class Point(BaseModel):
    x: int
    y: int


@dataclasses.dataclass
class Pair:
    a: int
    b: str


@pytest.mark.parametrize(
    ("value", "target"),
    [
        (Point(x=1, y=2), Point),
        (Pair(1, "b"), Pair),
        ({"k": [1, 2]}, dict[str, list[int]]),
        ([1, 2, 3], list[int]),
        (3.5, float),
    ],
)
def test_json_round_trips_models_dataclasses_and_containers(
    value: Any, target: Any
) -> None:
    body, content_type = encode(value, "application/json")

    assert content_type == "application/json"
    assert decode(body, content_type, target) == value


def test_str_and_bytes_travel_raw_like_spring() -> None:
    assert encode("héllo", "application/json") == ("héllo".encode(), "text/plain")
    assert encode(b"\x00\x01", "application/json") == (
        b"\x00\x01",
        "application/octet-stream",
    )
    assert decode(b"plain words", "application/json", str) == "plain words"


@pytest.mark.parametrize(
    ("body", "content_type", "target"),
    [
        (b"{broken", "application/json", Point),
        (b'{"x": "one", "y": 2}', "application/json", Point),
        (b"\xff", "text/plain", str),
        (b"", "application/json", Point),
        (None, "application/json", Point),
    ],
)
def test_bad_payloads_raise_conversion_errors(
    body: bytes | None, content_type: str, target: Any
) -> None:
    with pytest.raises(ConversionError):
        decode(body, content_type, target)


def test_null_value_reaches_functions_that_accept_none() -> None:
    assert decode(None, "application/json", Point | None) is None


def test_content_type_parameters_and_spring_quoting_are_understood() -> None:
    assert decode(b'{"x":1,"y":2}', "application/json; charset=utf-8", Point) == Point(
        x=1, y=2
    )
    assert decode(b'{"x":1,"y":2}', '"application/json"', Point) == Point(x=1, y=2)
    assert decode(b'{"x":1,"y":2}', "application/vnd.point+json", Point) == Point(
        x=1, y=2
    )


def test_unknown_content_type_is_refused_until_registered() -> None:
    with pytest.raises(UnsupportedContentType, match="register"):
        decode(b"1,2", "text/csv", Point)

    class Csv:
        def decode(self, data: bytes, target: Any) -> Any:
            x, y = data.decode().split(",")
            return target(x=int(x), y=int(y))

        def encode(self, value: Any) -> bytes:
            return f"{value.x},{value.y}".encode()

    register_converter("text/csv", Csv())

    assert decode(b"1,2", "text/csv", Point) == Point(x=1, y=2)
    assert encode(Point(x=3, y=4), "text/csv") == (b"3,4", "text/csv")


def test_payloads_are_never_unpickled() -> None:
    import pickle

    with pytest.raises(UnsupportedContentType):
        decode(pickle.dumps({"a": 1}), "application/x-python-serialize", dict)
