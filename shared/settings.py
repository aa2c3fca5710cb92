"""Settings of every service, read from `ABL_` environment variables.

Secrets have no usable default: a missing, placeholder or short secret stops the process at
start-up rather than letting it run with a guessable key. In development, `make run` generates
random ones into a git-ignored file first.
"""

from __future__ import annotations

import base64
import binascii
from enum import StrEnum
from functools import lru_cache
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "change_me", "secret", "password", "admin", "token", "dev"}
)
MIN_TOKEN_LENGTH = 24
DEFAULT_SMTP_PORTS = (25, 465, 587, 2525)


class Environment(StrEnum):
    development = "development"
    test = "test"
    production = "production"


class SettingsError(ValueError):
    """A setting is missing or unsafe; raised before any service starts."""


def decode_key(text: str) -> bytes:
    """Decode one `ABL_ENCRYPTION_KEYS` entry: 32 bytes in URL-safe base64."""
    try:
        raw = base64.urlsafe_b64decode(text.strip() + "=" * (-len(text.strip()) % 4))
    except (binascii.Error, ValueError) as exc:
        raise SettingsError("ABL_ENCRYPTION_KEYS entries must be URL-safe base64") from exc
    if len(raw) != 32:
        raise SettingsError("ABL_ENCRYPTION_KEYS entries must each decode to 32 bytes (AES-256)")
    return raw


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ABL_", extra="ignore", case_sensitive=False)

    env: Environment = Environment.production
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: str = "INFO"

    database_url: str = "sqlite:///./abl.db"
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    queue_prefix: str = Field(default="abl", pattern=r"^[a-z0-9][a-z0-9.-]{0,40}$")

    admin_token: SecretStr = SecretStr("")
    internal_token: SecretStr = SecretStr("")
    encryption_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)

    allow_private_hosts: bool = False
    allowed_smtp_ports: Annotated[tuple[int, ...], NoDecode] = DEFAULT_SMTP_PORTS
    verify_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    verify_rate_per_minute: int = Field(default=10, ge=1)
    verify_burst: int = Field(default=5, ge=1)

    # How long a publish waits for an absent broker before the caller keeps the message itself.
    broker_wait_seconds: float = Field(default=30.0, gt=0, le=600)
    # How long a sender waits, with backoff, for the registry or the scheduler before it gives
    # a job back to the queue: someone else's outage must not burn the job's delivery limit.
    dependency_wait_seconds: float = Field(default=300.0, ge=0)

    registry_url: str = "http://127.0.0.1:8000"
    scheduler_url: str = "http://127.0.0.1:8000"

    # Scheduler
    pacing: bool = True
    tick_seconds: float = Field(default=1.0, gt=0, le=60)
    publish_lease_seconds: float = Field(default=60.0, gt=0)
    warmup_first: int = Field(default=20, ge=1, le=500)
    warmup_factor: float = Field(default=1.3, gt=1, le=5)
    warmup_cap: int = Field(default=500, ge=1, le=500)
    warmup_advance_ratio: float = Field(default=0.5, gt=0, le=1)
    warmup_idle_reset_days: int = Field(default=3, ge=1)
    max_attempts: int = Field(default=5, ge=1, le=50)
    retry_base_seconds: float = Field(default=60.0, ge=0)
    retry_cap_seconds: float = Field(default=3600.0, ge=0)
    # A job waiting in the queue longer than this is dead-lettered (and its email settled);
    # a `scheduled` email with no result this long after its publish is swept.
    job_ttl_seconds: float = Field(default=1800.0, gt=0)
    sweep_after_seconds: float = Field(default=3600.0, gt=0)
    capacity_headroom: float = Field(default=0.25, ge=0, le=5)
    # The registry marks the server auth_failed; this short park only covers the time until
    # that status is seen (or the case where the sender could not tell the registry).
    auth_park_seconds: float = Field(default=300.0, ge=0)

    # Sender
    sender_prefetch: int = Field(default=64, ge=1, le=10_000)
    sender_connections_per_server: int = Field(default=2, ge=1, le=20)
    sender_drain_seconds: float = Field(default=30.0, ge=0)
    sender_command_timeout_seconds: float = Field(default=60.0, gt=0)
    sender_data_timeout_seconds: float = Field(default=600.0, gt=0)
    sender_idle_seconds: float = Field(default=60.0, gt=0)
    credentials_ttl_seconds: float = Field(default=60.0, ge=0)

    @field_validator("encryption_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("allowed_smtp_ports", mode="before")
    @classmethod
    def _split_ports(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(int(part) for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _refuse_unsafe_secrets(self) -> Settings:
        for name in ("admin_token", "internal_token"):
            secret: SecretStr = getattr(self, name)
            value = secret.get_secret_value()
            if value.lower() in PLACEHOLDER_SECRETS or len(value) < MIN_TOKEN_LENGTH:
                raise SettingsError(
                    f"ABL_{name.upper()} must be set to a random value of at least "
                    f"{MIN_TOKEN_LENGTH} characters (make run writes one for development)"
                )
        if not self.encryption_keys:
            raise SettingsError(
                "ABL_ENCRYPTION_KEYS must hold at least one key: "
                "python -m services.cli generate-key prints one"
            )
        for key in self.encryption_keys:
            decode_key(key.get_secret_value())
        return self

    @property
    def send_jobs_queue(self) -> str:
        return f"{self.queue_prefix}.send-jobs"

    @property
    def results_queue(self) -> str:
        return f"{self.queue_prefix}.results"

    @property
    def keys(self) -> list[bytes]:
        return [decode_key(key.get_secret_value()) for key in self.encryption_keys]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
