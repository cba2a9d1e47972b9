"""Settings of the Redis Streams binder and of its bindings."""

from __future__ import annotations

import os
import secrets
import socket
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_serializer,
    field_validator,
    model_validator,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "RedisConsumerOptions",
    "RedisProducerOptions",
    "RedisSettings",
    "redact_url",
]

#: Redis itself accepts bulk strings up to 512 MB (``proto-max-bulk-len``), but every
#: entry lives in the server's memory until it is trimmed, so the default is far lower.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
REDIS_MAX_BULK_BYTES = 512 * 1024 * 1024


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to print or log)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def default_consumer_name() -> str:
    """``<hostname>-<pid>-<random>``: unique per process, readable in XINFO."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class RedisSettings(BaseModel):
    """The ``binders.<name>`` section of a Redis binder.

    ``url`` may carry a password (``redis://:secret@host:6379/0``); it is redacted in
    ``repr``, in ``model_dump`` and in every log line. ``password`` and ``db``, when
    set, take precedence over the URL's.
    """

    model_config = ConfigDict(extra="forbid")

    url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)
    username: str | None = None
    password: SecretStr | None = None
    db: int | None = Field(default=None, ge=0)
    tls_ca_file: str | None = None
    socket_timeout: float = Field(default=5.0, gt=0)
    connect_timeout: float = Field(default=5.0, gt=0)
    publish_timeout: float = Field(default=30.0, gt=0)
    block_ms: int = Field(default=2_000, ge=1)
    claim_idle_ms: int = Field(default=30_000, ge=1)
    claim_interval_ms: int | None = Field(default=None, ge=1)
    consumer_name: str | None = Field(default=None, min_length=1)
    max_message_bytes: int = Field(
        default=DEFAULT_MAX_MESSAGE_BYTES, ge=1, le=REDIS_MAX_BULK_BYTES
    )
    publish_chunk: int = Field(default=1_000, ge=1)

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        # Checked here so that a bad URL is a ConfigError naming the key, not a
        # ValueError from redis-py at start. Messages never quote the URL: it may
        # carry a password.
        parts = urlsplit(url)
        scheme = parts.scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"url must start with redis://, rediss:// (TLS) or unix://, not "
                f"{scheme + '://' if scheme else 'no scheme'}"
            )
        if scheme == "unix":
            if not parts.path:
                raise ValueError("a unix:// url needs the socket path")
            return url
        try:
            port = parts.port
        except ValueError:
            raise ValueError(
                "the port of url must be a number from 1 to 65535"
            ) from None
        if port == 0:
            raise ValueError("the port of url must be a number from 1 to 65535")
        if not parts.hostname:
            raise ValueError("url has no host")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError("the path of url must be a database number, e.g. /0")
        return url

    @field_serializer("url")
    def _dump_url(self, url: str) -> str:
        return redact_url(url)

    def __repr_args__(self) -> Any:
        yield "url", redact_url(self.url)
        yield from super().__repr_args__()

    @property
    def claim_interval_s(self) -> float:
        """How often a group member looks for idle entries of dead consumers."""
        interval = self.claim_interval_ms
        if interval is None:
            interval = max(50, min(self.claim_idle_ms // 2, 5_000))
        return interval / 1000

    @property
    def crash_recovery_seconds(self) -> float:
        """Worst case until a live member claims a dead member's entries."""
        return self.claim_idle_ms / 1000 + self.claim_interval_s + self.block_ms / 1000


class RedisProducerOptions(BaseModel):
    """Extra keys of a binding's ``producer`` section.

    Trimming is approximate (``MAXLEN ~`` / ``MINID ~``) and off by default: it drops
    entries whether or not every group has read and acknowledged them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_len: int | None = Field(default=None, ge=1)
    max_age_ms: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_trim(self) -> RedisProducerOptions:
        if self.max_len is not None and self.max_age_ms is not None:
            raise ValueError("set either max_len or max_age_ms, not both")
        return self

    @property
    def trims(self) -> bool:
        return self.max_len is not None or self.max_age_ms is not None


class RedisConsumerOptions(BaseModel):
    """Extra keys of a binding's ``consumer`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Overrides the binder's claim_idle_ms for this binding (a slow handler's group
    # can wait longer before its entries are taken over).
    claim_idle_ms: int | None = Field(default=None, ge=1)
