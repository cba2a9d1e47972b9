"""Settings of the Kafka binder and the per-binding options it accepts.

``KafkaSettings`` is the ``binders.<name>`` section of the configuration (with
``type: kafka``); ``KafkaConsumerOptions`` and ``KafkaProducerOptions`` are the extra
keys of a binding's ``consumer`` and ``producer`` sections. Every model forbids
unknown keys, so a typo is reported by its name.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

__all__ = ["KafkaConsumerOptions", "KafkaProducerOptions", "KafkaSettings"]

logger = logging.getLogger(__name__)

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal[
    "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER"
]


class KafkaSettings(BaseModel):
    """Connection, producer, consumer-group and provisioning settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- connection ---------------------------------------------------------------
    bootstrap_servers: str | list[str] = "localhost:9092"
    client_id: str = "streamkit"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    sasl_kerberos_service_name: str = "kafka"
    sasl_kerberos_domain_name: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: SecretStr | None = None
    ssl_check_hostname: bool = True
    request_timeout_ms: int = Field(30_000, gt=0)
    metadata_max_age_ms: int = Field(300_000, gt=0)

    # -- producer -----------------------------------------------------------------
    acks: Literal["all", "1", "0"] = "all"
    linger_ms: int = Field(5, ge=0)
    max_batch_size: int = Field(65_536, gt=0)
    max_message_bytes: int = Field(1_000_000, gt=0)
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    enable_idempotence: bool = False
    delivery_timeout_ms: int = Field(30_000, gt=0)

    # -- consumer groups ----------------------------------------------------------
    session_timeout_ms: int = Field(10_000, gt=0)
    heartbeat_interval_ms: int = Field(3_000, gt=0)
    max_poll_interval_ms: int = Field(300_000, gt=0)
    fetch_max_wait_ms: int = Field(500, ge=0)
    max_partition_fetch_bytes: int = Field(1_048_576, gt=0)
    commit_interval_ms: int = Field(1_000, gt=0)
    commit_batch_size: int = Field(500, gt=0)
    revocation_timeout_ms: int = Field(10_000, ge=0)
    max_uncommitted_per_partition: int = Field(10_000, gt=0)
    leave_group_on_close: bool = True
    close_timeout_ms: int = Field(10_000, gt=0)

    # -- provisioning -------------------------------------------------------------
    auto_create_topics: bool = True
    auto_add_partitions: bool = True
    min_partition_count: int = Field(1, gt=0)
    replication_factor: int = Field(1, gt=0)
    topic_config: dict[str, str] = Field(default_factory=dict)

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers_not_empty(cls, value: str | list[str]) -> str | list[str]:
        if not value:
            raise ValueError("give at least one host:port")
        return value

    @field_validator("acks", mode="before")
    @classmethod
    def _acks_as_text(cls, value: object) -> object:
        # YAML gives `acks: 1` as a number, the environment as text: accept both.
        return str(value) if isinstance(value, int) else value

    @model_validator(mode="after")
    def _group_timeouts_fit(self) -> KafkaSettings:
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError(
                "heartbeat_interval_ms must be below session_timeout_ms (a third of "
                "it is usual)"
            )
        if self.request_timeout_ms <= self.rebalance_timeout_ms():
            # aiokafka waits for a JoinGroup answer no longer than one request, and
            # the broker may hold it for a whole rebalance: the join would never end.
            raise ValueError(
                f"request_timeout_ms ({self.request_timeout_ms}) must be longer than "
                f"a rebalance ({self.rebalance_timeout_ms()} ms: "
                "revocation_timeout_ms + 5000, at least session_timeout_ms)"
            )
        return self

    def rebalance_timeout_ms(self, session_timeout_ms: int | None = None) -> int:
        """How long the broker waits for members to rejoin in a rebalance.

        The revocation wait has to fit in it, or the member is dropped from the new
        generation.
        """
        session = session_timeout_ms or self.session_timeout_ms
        return max(session, self.revocation_timeout_ms + 5_000)

    def acks_value(self) -> str | int:
        """``acks`` as aiokafka takes it."""
        return "all" if self.acks == "all" else int(self.acks)

    def max_request_size(self) -> int:
        """aiokafka's request limit: one record of ``max_message_bytes`` must fit.

        Kafka's own default (1 MiB) leaves room for record and batch overhead above
        the default ``max_message_bytes``; a larger limit grows with it.
        """
        return max(1_048_576, self.max_message_bytes + 65_536)

    def servers(self) -> str:
        """The bootstrap servers as one comma-separated string (no credentials)."""
        if isinstance(self.bootstrap_servers, str):
            return self.bootstrap_servers
        return ",".join(self.bootstrap_servers)

    def client_kwargs(self) -> dict[str, Any]:
        """Connection keyword arguments shared by every aiokafka client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.servers(),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
            "metadata_max_age_ms": self.metadata_max_age_ms,
        }
        if self.security_protocol.startswith("SASL"):
            kwargs.update(
                sasl_mechanism=self.sasl_mechanism or "PLAIN",
                sasl_plain_username=self.sasl_plain_username,
                sasl_plain_password=(
                    self.sasl_plain_password.get_secret_value()
                    if self.sasl_plain_password is not None
                    else None
                ),
                sasl_kerberos_service_name=self.sasl_kerberos_service_name,
                sasl_kerberos_domain_name=self.sasl_kerberos_domain_name,
            )
        if self.security_protocol.endswith("SSL"):
            kwargs["ssl_context"] = self.ssl_context()
        return kwargs

    def ssl_context(self) -> ssl.SSLContext:
        """A TLS context built from the ``ssl_*`` settings."""
        context = ssl.create_default_context(
            purpose=ssl.Purpose.SERVER_AUTH, cafile=self.ssl_cafile
        )
        if self.ssl_certfile:
            password = (
                self.ssl_password.get_secret_value() if self.ssl_password else None
            )
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, password)
        context.check_hostname = self.ssl_check_hostname
        if not self.ssl_check_hostname:
            # Hostname checks off usually means a self-signed dev broker; peer
            # certificates are still verified against ssl_cafile.
            logger.warning("Kafka TLS hostname verification is disabled")
        return context


class KafkaConsumerOptions(BaseModel):
    """Per-binding consumer options (the extra keys of ``consumer:``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    session_timeout_ms: int | None = Field(None, gt=0)
    heartbeat_interval_ms: int | None = Field(None, gt=0)
    max_poll_interval_ms: int | None = Field(None, gt=0)
    isolation_level: Literal["read_uncommitted", "read_committed"] = "read_uncommitted"
    dead_letter_topic: str | None = None


class KafkaProducerOptions(BaseModel):
    """Per-binding producer options (the extra keys of ``producer:``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replication_factor: int | None = Field(None, gt=0)
    topic_config: dict[str, str] = Field(default_factory=dict)
