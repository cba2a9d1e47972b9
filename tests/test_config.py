"""Configuration: sources, precedence, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamkit import ConfigError, StreamApp
from streamkit.config import load_settings, parse_overrides, redact
from streamkit.runtime.bindings import binder_settings, resolve


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "streamkit.yaml"
    path.write_text(
        "binders:\n"
        "  bus: {type: memory}\n"
        "bindings:\n"
        "  enrich-in-0: {destination: orders, group: billing,\n"
        "                consumer: {concurrency: 8, max_attempts: 3}}\n"
    )
    return path


def test_precedence_is_overrides_then_environment_then_file(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMKIT_BINDINGS__ENRICH-IN-0__CONSUMER__CONCURRENCY", "4")
    monkeypatch.setenv("STREAMKIT_BINDINGS__ENRICH-IN-0__CONSUMER__MAX_ATTEMPTS", "5")

    settings = load_settings(
        config_file, ["bindings.enrich-in-0.consumer.concurrency=2"]
    )

    consumer = settings.bindings["enrich-in-0"].consumer
    assert consumer.concurrency == 2  # override beats environment
    assert consumer.max_attempts == 5  # environment beats file
    assert settings.bindings["enrich-in-0"].group == "billing"  # file kept


def test_toml_files_are_read(tmp_path: Path) -> None:
    path = tmp_path / "streamkit.toml"
    path.write_text('default_binder = "bus"\n[binders.bus]\ntype = "memory"\n')

    settings = load_settings(path)

    assert settings.default_binder_name() == "bus"


def test_no_file_gives_working_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    app = StreamApp()

    @app.processor
    def f(x: int) -> int:
        return x

    _, bindings = resolve(app, load_settings())

    assert [(b.name, b.destination, b.binder_type) for b in bindings] == [
        ("f-in-0", "f-in-0", "memory"),
        ("f-out-0", "f-out-0", "memory"),
    ]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (
            "bindings.enrich-in-0.consumer.concurrency=0",
            "bindings.enrich-in-0.consumer.concurrency",
        ),
        ("bindings.enrich-in-0.grup=x", "bindings.enrich-in-0.grup"),
        ("shutdown_timeout=soon", "shutdown_timeout"),
        ("defualt_binder=bus", "defualt_binder"),
    ],
)
def test_bad_values_and_unknown_keys_name_the_key(
    config_file: Path, override: str, key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(config_file, [override])

    assert info.value.key == key
    assert key in str(info.value)


def test_binder_specific_typo_is_reported_with_its_path(config_file: Path) -> None:
    app = StreamApp()

    @app.consumer
    def enrich(x: int) -> None: ...

    settings = load_settings(
        config_file, ["bindings.enrich-in-0.consumer.concurency=4"]
    )

    with pytest.raises(ConfigError) as info:
        resolve(app, settings)
    assert info.value.key == "bindings.enrich-in-0.consumer.concurency"


def test_binding_that_matches_no_function_is_an_error(config_file: Path) -> None:
    app = StreamApp()

    @app.consumer
    def other(x: int) -> None: ...

    with pytest.raises(ConfigError, match="enrich-in-0 does not match"):
        resolve(app, load_settings(config_file))


def test_unknown_binder_type_names_the_key_and_the_fix(tmp_path: Path) -> None:
    settings = load_settings(None, ["binders.bus.type=kafak"])

    with pytest.raises(ConfigError) as info:
        binder_settings(settings, "bus")

    assert info.value.key == "binders.bus.type"
    assert "pip install" in str(info.value)


def test_unknown_binder_name_in_a_binding(config_file: Path) -> None:
    app = StreamApp()

    @app.consumer
    def enrich(x: int) -> None: ...

    settings = load_settings(config_file, ["bindings.enrich-in-0.binder=nope"])
    with pytest.raises(ConfigError) as info:
        resolve(app, settings)
    assert info.value.key == "bindings.enrich-in-0.binder"


def test_missing_and_broken_files_are_config_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("bindings: [unclosed\n")

    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid"):
        load_settings(broken)


def test_overrides_parse_yaml_scalars() -> None:
    assert parse_overrides(["a.b=4", "a.c=false", "d=text", "e=[1, 2]"]) == {
        "a": {"b": 4, "c": False},
        "d": "text",
        "e": [1, 2],
    }
    with pytest.raises(ConfigError):
        parse_overrides(["no-equals-sign"])


def test_redact_masks_passwords_and_url_credentials() -> None:
    data = {
        "url": "amqp://guest:s3cret@rabbit:5672/",
        "sasl_plain_password": "hunter2",
        "nested": [{"password": "x", "host": "h"}],
    }

    shown = repr(redact(data))

    assert "s3cret" not in shown and "hunter2" not in shown
    assert "amqp://guest:***@rabbit:5672/" in shown
    assert "'host': 'h'" in shown


def test_config_file_that_is_not_utf8_or_not_yaml_is_a_config_error(
    tmp_path: Path,
) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    ini = tmp_path / "cfg.ini"
    ini.write_text("shutdown_timeout = 5\n")

    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(binary)
    with pytest.raises(ConfigError, match=r"YAML \(.yaml, .yml\) or TOML"):
        load_settings(ini)


def test_unknown_output_content_type_stops_before_any_message() -> None:
    app = StreamApp()

    @app.processor
    def f(x: int) -> int:
        return x

    settings = load_settings(None, ["bindings.f-out-0.content_type=text/nonsense"])

    with pytest.raises(ConfigError) as info:
        resolve(app, settings)
    assert info.value.key == "bindings.f-out-0.content_type"


def test_instance_index_must_be_below_instance_count() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, ["bindings.f-in-0.consumer.instance_index=5"])

    assert info.value.key == "bindings.f-in-0.consumer"
    assert "instance_index 5 must be below instance_count 1" in str(info.value)


def test_an_empty_stage_in_functions_is_an_error() -> None:
    app = StreamApp()

    @app.processor
    def invoice(x: int) -> int:
        return x

    with pytest.raises(ConfigError, match="''"):
        resolve(app, load_settings(None, ["functions=invoice|"]))


def test_settings_repr_never_shows_binder_secrets() -> None:
    settings = load_settings(
        None,
        [
            "binders.bus.type=redis",
            "binders.bus.url=redis://user:S3cretRedis@cache:6379/0",
            "binders.bus.sasl_plain_password=S3cretKafka",
        ],
    )

    shown = repr(settings)

    assert "S3cret" not in shown
    assert "redis://user:***@cache:6379/0" in shown


def test_environment_variable_that_sets_nothing_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("STREAMKIT_SHUTDOWN_TIMOUT", "5")
    monkeypatch.setenv("STREAMKIT_REDIS_URL", "redis://127.0.0.1:6379/0")

    load_settings(None)

    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("STREAMKIT_SHUTDOWN_TIMOUT sets no setting" in m for m in warned)
    assert not any("STREAMKIT_REDIS_URL" in m.split(" sets")[0] for m in warned)
