"""Settings of the RabbitMQ binder and of its bindings."""

from __future__ import annotations

from typing import Any, Literal, Self
from urllib.parse import quote

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_serializer,
    field_validator,
    model_validator,
)
from yarl import URL

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_URL",
    "ExchangeType",
    "RabbitConsumerOptions",
    "RabbitProducerOptions",
    "RabbitSettings",
    "redact_url",
]

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"

#: RabbitMQ's own ``max_message_size`` default from 3.8 to 3.13 (4.0 lowered it to
#: 16 MiB). A body above the binder's limit is refused before it is sent.
DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024 * 1024

ExchangeType = Literal["topic", "direct", "fanout", "headers"]


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to print or log)."""
    try:
        parsed = URL(url)
    except ValueError:
        return "<unparsable url>"
    if parsed.password is None:
        return url
    return str(parsed.with_password("***"))


class RabbitSettings(BaseModel):
    """The ``binders.<name>`` section of a RabbitMQ binder.

    ``url`` may carry credentials (``amqp://user:secret@host:5672/vhost``); it is
    redacted in ``repr``, in ``model_dump`` and in every log line. ``username``,
    ``password`` and ``virtual_host``, when set, take precedence over the URL's.
    TLS is ``amqps://``; aiormq reads ``cafile``, ``certfile``, ``keyfile`` and
    ``no_verify_ssl`` from the URL's query string.
    """

    model_config = ConfigDict(extra="forbid")

    # Present when the whole ``binders.<name>`` section is validated as is.
    type: Literal["rabbit"] = "rabbit"
    url: str = Field(default=DEFAULT_URL, repr=False)
    username: str | None = None
    password: SecretStr | None = None
    virtual_host: str | None = None
    heartbeat: int = Field(default=30, ge=0, le=65535)
    connect_timeout: float = Field(default=10.0, gt=0)
    delivery_timeout: float = Field(default=30.0, gt=0)
    close_timeout: float = Field(default=10.0, gt=0)
    reconnect_delay: float = Field(default=0.5, gt=0)
    reconnect_max_delay: float = Field(default=10.0, gt=0)
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1)
    connection_name: str | None = None

    @field_validator("url")
    @classmethod
    def _check_scheme(cls, url: str) -> str:
        try:
            scheme = URL(url).scheme
        except ValueError as exc:
            raise ValueError(f"url is not a valid URL: {exc}") from None
        if scheme not in ("amqp", "amqps"):
            raise ValueError(
                "url must start with amqp:// or amqps:// (TLS), not "
                f"{scheme + '://' if scheme else 'no scheme'}"
            )
        return url

    @field_serializer("url")
    def _dump_url(self, url: str) -> str:
        return redact_url(url)

    def __repr_args__(self) -> Any:
        yield "url", self.display_url
        yield from super().__repr_args__()

    @property
    def display_url(self) -> str:
        """The broker address with the password masked, for logs and errors."""
        return redact_url(str(self._base_url()))

    def connection_url(self) -> URL:
        """The URL handed to aio-pika: credentials, vhost and tuning applied."""
        url = self._base_url()
        if self.password is not None:
            url = url.with_password(self.password.get_secret_value())
        query = {"heartbeat": str(self.heartbeat)}
        if self.connection_name:
            query["name"] = self.connection_name
        return url.update_query(query)

    def _base_url(self) -> URL:
        url = URL(self.url)
        if self.username is not None:
            url = url.with_user(self.username)
        if self.virtual_host is not None:
            # Quoted so that the default vhost "/" survives as %2F in the path.
            path = "/" + quote(self.virtual_host, safe="")
            url = url.with_path(path, encoded=True)
        return url


class _QueueOptions(BaseModel):
    """How group queues are declared (shared by consumers and required groups)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    exchange_type: ExchangeType = "topic"
    declare_exchange: bool = True
    # Quorum queues: replicated, and they count deliveries (x-delivery-count).
    quorum: bool = False
    # One consumer of the group queue receives at a time: order kept with several
    # instances, which stand by and take over when the active one goes.
    single_active_consumer: bool = False
    # Declare <destination>.<group>.dlq bound to the dead-letter exchange, and point
    # the group queue's x-dead-letter-exchange at it.
    auto_bind_dlq: bool = True
    dead_letter_exchange: str = Field(default="DLX", min_length=1)
    # Quorum queues only (x-delivery-limit): after this many returns (give-backs,
    # consumers that died holding it) the broker dead-letters a record to the DLQ,
    # so a record that crashes its consumer every time cannot loop forever.
    delivery_limit: int | None = Field(default=None, ge=1)
    # x-expires: the broker deletes a group queue (its DLQ) unused for this long.
    expires_ms: int | None = Field(default=None, ge=1)
    dlq_expires_ms: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _limit_needs_quorum(self) -> Self:
        if self.delivery_limit is not None and not self.quorum:
            raise ValueError("delivery_limit needs quorum: true (x-delivery-limit)")
        return self


class RabbitProducerOptions(_QueueOptions):
    """Extra keys of a binding's ``producer`` section."""

    # Default: the destination name, or ``<destination>-<n>`` for partition n.
    routing_key: str | None = None
    # Ask the broker to return a record no queue is bound for: publish raises
    # Unroutable instead of the broker dropping it silently.
    mandatory: bool = Field(
        default=False, validation_alias=AliasChoices("mandatory", "require_route")
    )
    persistent: bool = True
    # Spring's requiredGroups: group queues declared with the exchange, so records
    # published before the first consumer subscribes are kept for it.
    required_groups: tuple[str, ...] = ()


class RabbitConsumerOptions(_QueueOptions):
    """Extra keys of a binding's ``consumer`` section."""

    # Default: ``#`` on a topic exchange, the destination name on a direct one;
    # ``<key>-<n>`` for partition n.
    binding_routing_key: str | None = None
