"""The Redis binder's entry layout, reply parsing and settings (no server needed)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

pytest.importorskip("streamkit_redis")

from streamkit_redis import RedisBinder, RedisProducerOptions, RedisSettings
from streamkit_redis.wire import (
    decode_entry,
    encode_record,
    parse_autoclaim,
    parse_pending,
    parse_stream_reply,
)

from streamkit.binder import Record
from streamkit.config import validate_settings
from streamkit.errors import ConfigError
from streamkit.runtime.bindings import binder_settings


def round_trip(record: Record) -> tuple[bytes | None, dict[str, bytes], bytes | None]:
    return decode_entry(list(encode_record(record).items()))


def test_binary_values_and_unicode_header_names_round_trip_exactly() -> None:
    headers = {"contentType": b"application/json", "ключ-ü": bytes(range(256))}
    record = Record(b"\x00\xff body", headers, key=b"\x80key")

    assert round_trip(record) == (b"\x00\xff body", headers, b"\x80key")


def test_empty_body_and_empty_header_survive() -> None:
    assert round_trip(Record(b"", {"x-empty": b""})) == (b"", {"x-empty": b""}, None)


def test_a_none_value_is_marked_so_it_comes_back_as_none() -> None:
    assert round_trip(Record(None, key=b"k")) == (None, {}, b"k")


def test_header_names_cannot_collide_with_the_entry_fields() -> None:
    record = Record(b"v", {"body": b"h1", "key": b"h2", "null": b"h3"})

    assert round_trip(record) == (b"v", record.headers, None)


def test_an_entry_from_a_plain_client_reads_as_a_json_object() -> None:
    value, headers, key = decode_entry([(b"order", b"42"), (b"bad", b"\xff")])

    assert json.loads(value or b"") == {"order": "42", "bad": "\ufffd"}
    assert headers == {"contentType": b"application/json"}
    assert key is None


def test_autoclaim_reply_of_redis_7_lists_deleted_ids_apart() -> None:
    reply = parse_autoclaim([b"0-0", [b"1-0", b"2-0"], [b"3-0"]])

    assert (reply.cursor, reply.claimed, reply.deleted) == (
        "0-0",
        ["1-0", "2-0"],
        ["3-0"],
    )


def test_autoclaim_reply_of_redis_6_2_shows_deleted_entries_inline() -> None:
    full = [
        [b"1-0", [b"body", b"x"]],
        [b"2-0", None],  # deleted, id known
        None,  # deleted, id unknown: found again through the pending list
    ]

    reply = parse_autoclaim([b"5-0", full])

    assert (reply.cursor, reply.claimed, reply.deleted) == ("5-0", ["1-0"], ["2-0"])


def test_autoclaim_justid_reply_of_redis_6_2_has_two_elements() -> None:
    reply = parse_autoclaim([b"0-0", [b"1-0"]])

    assert (reply.claimed, reply.deleted) == (["1-0"], [])


def test_stream_replies_parse_in_resp2_and_resp3_shapes() -> None:
    entries = [[b"1-0", [b"body", b"a"]], [b"2-0", None]]
    resp2 = [[b"s", entries]]
    resp3 = {b"s": entries}

    for raw in (resp2, resp3):
        parsed = parse_stream_reply(raw)
        assert [(e.id, e.fields) for e in parsed["s"]] == [
            ("1-0", [(b"body", b"a")]),
            ("2-0", None),
        ]
    assert parse_stream_reply(None) == {}


def test_pending_rows_parse() -> None:
    assert parse_pending([[b"1-0", b"c", 10, 2]]) == [("1-0", "c", 10, 2)]


def test_passwords_never_show_in_repr_dump_or_binder_repr() -> None:
    settings = RedisSettings(url="redis://user:s3cret@host:6380/2", password="pw")

    printed = [repr(settings), str(settings), str(settings.model_dump())]
    printed += [settings.model_dump_json(), repr(RedisBinder(settings))]

    assert all("s3cret" not in text and "'pw'" not in text for text in printed)
    assert "redis://user:***@host:6380/2" in repr(settings)


def test_unknown_setting_is_reported_by_name() -> None:
    with pytest.raises(ValidationError, match="blok_ms"):
        RedisSettings(blok_ms=10)  # type: ignore[call-arg]


def test_url_scheme_is_checked() -> None:
    with pytest.raises(ValidationError, match="rediss://"):
        RedisSettings(url="http://localhost:6379")


def test_one_trim_policy_at_a_time() -> None:
    with pytest.raises(ValidationError, match="max_len or max_age_ms"):
        RedisProducerOptions(max_len=10, max_age_ms=1000)


def test_declared_capabilities_follow_the_settings() -> None:
    binder = RedisBinder(
        RedisSettings(claim_idle_ms=1000, block_ms=500, max_message_bytes=1024)
    )

    assert binder.capabilities.max_message_bytes == 1024
    assert binder.capabilities.crash_recovery_seconds == pytest.approx(2.0)


@pytest.mark.parametrize(
    "url",
    [
        "redis://u:pw-s3cret@127.0.0.1:notaport/0",
        "redis://u:pw-s3cret@127.0.0.1:99999/0",
        "redis://u:pw-s3cret@127.0.0.1:0/0",
        "redis://u:pw-s3cret@127.0.0.1:6379/zero",
        "redis://u:pw-s3cret@:6379/0",
    ],
)
def test_a_bad_url_port_is_a_config_error_naming_the_key_not_a_crash_at_run(
    url: str,
) -> None:
    settings = validate_settings({"binders": {"bus": {"type": "redis", "url": url}}})
    with pytest.raises(ConfigError) as failure:
        binder_settings(settings, "bus")

    assert failure.value.key == "binders.bus.url"
    assert "binders.bus.url" in str(failure.value)
    assert "s3cret" not in str(failure.value)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1", "rediss://:pw@cache:6380/3", "unix:///tmp/r.sock"]
)
def test_good_urls_pass(url: str) -> None:
    assert RedisSettings(url=url).url == url
