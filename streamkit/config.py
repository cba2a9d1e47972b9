"""Configuration: one settings model and its sources.

Precedence, highest first: ``--set key=value`` overrides, environment variables
(``STREAMKIT_`` prefix, ``__`` between nested keys, e.g.
``STREAMKIT_BINDERS__LOCAL__TYPE=redis``), the config file (YAML or TOML), defaults.

Every binding works with no configuration at all: it uses the default binder (the
in-memory one unless another is configured) and its destination is its own name.
Invalid settings raise :class:`~streamkit.errors.ConfigError` naming the dotted key.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .errors import ConfigError

__all__ = [
    "BinderConfig",
    "BindingSettings",
    "ConsumerSettings",
    "ProducerSettings",
    "Settings",
    "load_settings",
    "parse_overrides",
    "redact",
]

logger = logging.getLogger(__name__)

ENV_PREFIX = "STREAMKIT_"
DEFAULT_CONFIG_FILES = ("streamkit.yaml", "streamkit.yml", "streamkit.toml")


class ConsumerSettings(BaseModel):
    """Settings of an input binding. Unknown keys go to the binder's options model."""

    model_config = ConfigDict(extra="allow")

    concurrency: int = Field(1, ge=1, description="handlers running at once")
    max_attempts: int = Field(3, ge=1, description="handler calls before the DLQ")
    backoff_initial: float = Field(1.0, ge=0, description="seconds before retry 1")
    backoff_multiplier: float = Field(2.0, ge=1)
    backoff_max: float = Field(10.0, ge=0)
    retryable_exceptions: list[str] = Field(
        default_factory=list, description="dotted names; empty means every exception"
    )
    non_retryable_exceptions: list[str] = Field(default_factory=list)
    dlq: bool = True
    prefetch: int | None = Field(
        None, ge=1, description="default: max(batch_size, 16 x concurrency)"
    )
    batch_size: int = Field(64, ge=1)
    ordering: Literal["key", "partition", "none"] = "key"
    partitioned: bool = False
    instance_index: int = Field(0, ge=0)
    instance_count: int = Field(1, ge=1)
    partition_count: int | None = Field(
        None, ge=1, description="partitions of the destination (default instance_count)"
    )
    start_from: Literal["earliest", "latest"] = "earliest"

    @model_validator(mode="after")
    def _instance_in_range(self) -> ConsumerSettings:
        if self.instance_index >= self.instance_count:
            raise ValueError(
                f"instance_index {self.instance_index} must be below instance_count "
                f"{self.instance_count}"
            )
        return self


class ProducerSettings(BaseModel):
    """Settings of an output binding. Unknown keys go to the binder's options model."""

    model_config = ConfigDict(extra="allow")

    partition_key: str | None = Field(
        None,
        description="'key', 'headers.<name>' or a dotted path into the payload",
    )
    partition_count: int = Field(1, ge=1)
    poll_interval: float | None = Field(
        None, gt=0, description="seconds between calls of a polled producer"
    )


class BindingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    destination: str | None = None
    group: str | None = None
    binder: str | None = None
    content_type: str = "application/json"
    consumer: ConsumerSettings = Field(default_factory=ConsumerSettings)
    producer: ProducerSettings = Field(default_factory=ProducerSettings)


class BinderConfig(BaseModel):
    """A named binder: its ``type`` and the type's own settings (extra keys)."""

    model_config = ConfigDict(extra="allow")

    type: str

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def __repr_args__(self) -> Any:
        # The extras are the binder's raw settings, passwords included; the binder's
        # own model redacts them once validated, this repr must not leak them first.
        for name, value in super().__repr_args__():
            yield name, redact(value, name or "")


class Settings(BaseSettings):
    """The whole configuration of a streamkit app."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        nested_model_default_partial_update=True,
    )

    default_binder: str | None = None
    binders: dict[str, BinderConfig] = Field(default_factory=dict)
    bindings: dict[str, BindingSettings] = Field(default_factory=dict)
    functions: str | None = Field(
        None,
        description="functions to bind, ';'-separated; 'a|b' composes a and b",
    )
    poll_interval: float = Field(
        1.0, gt=0, description="default producer poll interval"
    )
    shutdown_timeout: float = Field(30.0, ge=0, description="seconds to drain on stop")
    tracing: bool = Field(False, description="OpenTelemetry spans (otel extra)")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The documented precedence: overrides (init) > environment > config file.
        return init_settings, env_settings, _FileSource(settings_cls)

    def binding(self, name: str) -> BindingSettings:
        """Settings of binding ``name`` (defaults when it is not configured)."""
        found = self.bindings.get(name)
        return found if found is not None else BindingSettings()

    def binder_config(self, name: str) -> BinderConfig:
        if name in self.binders:
            return self.binders[name]
        if name == "memory":
            return BinderConfig(type="memory")
        known = ", ".join(sorted(self.binders)) or "none configured"
        raise ConfigError(
            f"binder {name!r} is not defined under 'binders' (defined: {known})",
            key="binders",
        )

    def default_binder_name(self) -> str:
        if self.default_binder:
            return self.default_binder
        if len(self.binders) == 1:
            return next(iter(self.binders))
        if not self.binders:
            return "memory"
        raise ConfigError(
            "several binders are configured; set 'default_binder' to one of "
            + ", ".join(sorted(self.binders)),
            key="default_binder",
        )


def _read_file(path: Path) -> dict[str, Any]:
    if path.suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(
            f"config file {path} must be YAML (.yaml, .yml) or TOML (.toml)",
            key="config",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8"
        ) from exc
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """Turn ``["bindings.x-in-0.group=g", ...]`` into a nested dict.

    Values are read as YAML scalars, so ``concurrency=4`` is an int and ``dlq=false``
    a bool. Keys are split on dots; a binding name with dots is not supported here.
    """
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r} must look like key=value", key=key)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r} conflicts with another", key=key)
        node[parts[-1]] = value
    return result


_config_file: ContextVar[Path | None] = ContextVar("_config_file", default=None)


class _FileSource(PydanticBaseSettingsSource):
    """The YAML or TOML config file chosen by :func:`load_settings`."""

    def get_field_value(
        self, field: FieldInfo, field_name: str
    ) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole file

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get()
        return _read_file(path) if path is not None else {}


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
) -> Settings:
    """Build the settings from a file, the environment and overrides.

    Without ``config_file``, ``$STREAMKIT_CONFIG`` or a ``streamkit.yaml``/
    ``streamkit.toml`` in the working directory is used when present.
    """
    path = config_file or os.environ.get("STREAMKIT_CONFIG")
    if path is None:
        path = next((p for p in DEFAULT_CONFIG_FILES if Path(p).is_file()), None)
    if overrides is not None and not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    _warn_unknown_environment(os.environ)
    token = _config_file.set(Path(path) if path is not None else None)
    try:
        return Settings(**(overrides or {}))
    except ValidationError as exc:
        raise config_error(exc) from None
    finally:
        _config_file.reset(token)


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``top``, merging nested mappings key by key."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


#: STREAMKIT_* variables that are not settings (the test suite's broker addresses...).
_OTHER_VARIABLES = {
    "STREAMKIT_CONFIG",
    "STREAMKIT_REDIS_URL",
    "STREAMKIT_RABBIT_URL",
    "STREAMKIT_KAFKA_BOOTSTRAP",
    "STREAMKIT_PROFILES",
    "STREAMKIT_CONFORMANCE_SIZE",
    "STREAMKIT_TANSU_LOG_DIR",
}


def _warn_unknown_environment(environ: Mapping[str, str]) -> None:
    """Warn about STREAMKIT_* variables that set nothing (a typo is otherwise
    silent: STREAMKIT_SHUTDOWN_TIMOUT, or single underscores between keys)."""
    fields = {name.upper() for name in Settings.model_fields}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in _OTHER_VARIABLES:
            continue
        top = name[len(ENV_PREFIX) :].split("__", 1)[0]
        if top not in fields:
            logger.warning(
                "environment variable %s sets no setting (settings: %s; nested keys "
                "are joined with __)",
                name,
                ", ".join(sorted(f"{ENV_PREFIX}{f}" for f in fields)),
            )


def validate_settings(data: Mapping[str, Any]) -> Settings:
    """Settings from a plain dict only (no file, no environment)."""
    try:
        return Settings.model_validate(dict(data))
    except ValidationError as exc:
        raise config_error(exc) from None


def config_error(exc: ValidationError, prefix: str = "") -> ConfigError:
    """A ConfigError for the first problem of a pydantic ValidationError."""
    lines = []
    first_key = None
    for err in exc.errors():
        key = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        first_key = first_key or key
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        lines.append(f"{key}: {msg}")
    return ConfigError("invalid configuration: " + "; ".join(lines), key=first_key)


_SECRET_KEY = re.compile(
    r"pass(word)?|secret|token|sasl_plain_|credential|api_key", re.I
)
_URL_CREDENTIALS = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<cred>[^@/\s]+)@", re.I
)


def redact(value: Any, key: str = "") -> Any:
    """A copy of ``value`` fit for logs: secrets and URL credentials masked."""
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if isinstance(value, SecretStr):
        return "***"
    if isinstance(value, str):
        if _SECRET_KEY.search(key) and value:
            return "***"
        return _URL_CREDENTIALS.sub(_mask_credentials, value)
    return value


def _mask_credentials(match: re.Match[str]) -> str:
    user = match["cred"].split(":", 1)[0]
    masked = f"{user}:***" if ":" in match["cred"] else "***"
    return f"{match['scheme']}{masked}@"
