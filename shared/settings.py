"""Settings of every service, read from `ABL_` environment variables.

Each service reads only what it needs (least privilege): the sender has no database URL, no
admin token and no encryption keys; the scheduler no encryption keys; the gateway no secret at
all. `Settings` is all of them together, for the one-process shape (`make run`), and code that
takes one service's class accepts it. A service started with a secret it does not use says so at
start-up (`unused_secrets`).

Secrets have no usable default: a missing, placeholder or short secret stops the process at
start-up rather than letting it run with a guessable key. In development, `make run` generates
random ones into a git-ignored file first.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
from collections.abc import Mapping
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "change_me", "secret", "password", "admin", "token", "dev"}
)
MIN_TOKEN_LENGTH = 24
DEFAULT_SMTP_PORTS = (25, 465, 587, 2525)
DEFAULT_IMAP_PORTS = (143, 993)


def nameserver_address(value: str) -> tuple[str, int]:
    """`ip`, `ip:port` or `[ipv6]:port` as (address, port); ValueError for anything else."""
    text = value.strip()
    address, port = text, 53
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"not an ip, ip:port or [ipv6]:port: {value!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        address, _, port_text = text.partition(":")
        port = int(port_text)
    ipaddress.ip_address(address)  # a name would need a resolver to find the resolver
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range: {value!r}")
    return address, port


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


def _refuse_weak_token(name: str, secret: SecretStr) -> None:
    value = secret.get_secret_value()
    if value.lower() in PLACEHOLDER_SECRETS or len(value) < MIN_TOKEN_LENGTH:
        raise SettingsError(
            f"ABL_{name.upper()} must be set to a random value of at least "
            f"{MIN_TOKEN_LENGTH} characters (make run writes one for development)"
        )


class CommonSettings(BaseSettings):
    """What every service reads: where it listens, and how it behaves as a process."""

    model_config = SettingsConfigDict(env_prefix="ABL_", extra="ignore", case_sensitive=False)

    env: Environment = Environment.production
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: str = "INFO"
    # Bounds on a whole request body, enforced while it is read (413 past them): a batch of
    # emails may be large, every other request is a small JSON object.
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    max_messages_body_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    # How long a sender waits, with backoff, for the registry or the scheduler before it gives
    # a job back to the queue: someone else's outage must not burn the job's delivery limit.
    dependency_wait_seconds: float = Field(default=300.0, ge=0)
    # Every service drains on SIGTERM (the sender its SMTP transactions, the scheduler its
    # results) for up to this long.
    sender_drain_seconds: float = Field(default=30.0, ge=0)


class DatabaseSettings(CommonSettings):
    database_url: str = "sqlite:///./abl.db"


# The services that keep a copy of the registry's tenants and servers, each on its own queue.
REGISTRY_COPY_KEEPERS = ("scheduler", "webhooks")


class BrokerSettings(CommonSettings):
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    queue_prefix: str = Field(default="abl", pattern=r"^[a-z0-9][a-z0-9.-]{0,40}$")
    # How long a publish waits for an absent broker before the caller keeps the message itself.
    broker_wait_seconds: float = Field(default=30.0, gt=0, le=600)

    @property
    def send_jobs_queue(self) -> str:
        return f"{self.queue_prefix}.send-jobs"

    @property
    def results_queue(self) -> str:
        return f"{self.queue_prefix}.results"

    @property
    def cancels_topic(self) -> str:
        """Where the scheduler tells every sender that a scheduled email was canceled."""
        return f"{self.queue_prefix}.cancels"

    @property
    def events_queue(self) -> str:
        """Where the registry's and the scheduler's outboxes publish, for the webhooks service."""
        return f"{self.queue_prefix}.events"

    def registry_changes_queue(self, service: str) -> str:
        """Where the registry's changes reach `service`'s copy of its tenants and servers
        (`shared/registry_changes.py`): one queue for each service that keeps a copy."""
        return f"{self.queue_prefix}.registry-changes.{service}"

    @property
    def durable_queues(self) -> tuple[str, ...]:
        """Every durable queue the services declare under this prefix (each with a `.dead`
        dead-letter queue beside it): what an operator, a test or a benchmark removes with it."""
        return (
            self.send_jobs_queue,
            self.results_queue,
            self.events_queue,
            *(self.registry_changes_queue(service) for service in REGISTRY_COPY_KEEPERS),
        )


class OutboxSettings(DatabaseSettings, BrokerSettings):
    # The relay publishes right after each commit that wrote events; this pass also catches
    # rows left by a failed publish or written by another replica.
    outbox_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    # Published rows are kept this long (the window `make run` publishes again at start-up,
    # its in-process bus having lost what it held), then purged.
    outbox_keep_seconds: float = Field(default=3600.0, ge=0)


class EncryptionSettings(CommonSettings):
    """The keyring (`shared/crypto.py`): the first key encrypts, every one decrypts."""

    encryption_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)

    @field_validator("encryption_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _refuse_missing_keys(self) -> Self:
        if not self.encryption_keys:
            raise SettingsError(
                "ABL_ENCRYPTION_KEYS must hold at least one key: "
                "python -m services.cli generate-key prints one"
            )
        for key in self.encryption_keys:
            decode_key(key.get_secret_value())
        return self

    @property
    def keys(self) -> list[bytes]:
        return [decode_key(key.get_secret_value()) for key in self.encryption_keys]


class InternalTokenSettings(CommonSettings):
    internal_token: SecretStr = SecretStr("")

    @model_validator(mode="after")
    def _refuse_weak_internal_token(self) -> Self:
        _refuse_weak_token("internal_token", self.internal_token)
        return self


# Signs unsubscribe links where no key is configured (development and tests only): public, so
# refused in production.
DEVELOPMENT_UNSUBSCRIBE_KEY = "abl-development-unsubscribe-key-not-a-secret"


class UnsubscribeSettings(CommonSettings):
    """The key of one-click unsubscribe links (HMAC, `services.scheduler.unsubscribe`): the
    first signs, it and every old key verify, so a rotation does not break links already sent
    (move the current key to `ABL_UNSUBSCRIBE_OLD_KEYS`, comma-separated, for as long as sent
    emails may still be clicked). Its own secret: rotating `ABL_INTERNAL_TOKEN` leaves it."""

    unsubscribe_key: SecretStr = SecretStr(DEVELOPMENT_UNSUBSCRIBE_KEY)
    unsubscribe_old_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)

    @field_validator("unsubscribe_old_keys", mode="before")
    @classmethod
    def _split_old_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _refuse_weak_unsubscribe_keys(self) -> Self:
        key = self.unsubscribe_key.get_secret_value()
        if key == DEVELOPMENT_UNSUBSCRIBE_KEY:
            if self.env is Environment.production:
                raise SettingsError(
                    "ABL_UNSUBSCRIBE_KEY must be set in production: a random value of at least "
                    f"{MIN_TOKEN_LENGTH} characters (it signs unsubscribe links)"
                )
        else:
            _refuse_weak_token("unsubscribe_key", self.unsubscribe_key)
        for old in self.unsubscribe_old_keys:
            _refuse_weak_token("unsubscribe_old_keys", old)
        return self

    @property
    def unsubscribe_secrets(self) -> list[str]:
        """The signing key first, then the old ones still accepted."""
        return [k.get_secret_value() for k in [self.unsubscribe_key, *self.unsubscribe_old_keys]]


class AddressSettings(CommonSettings):
    """Where a tenant's server may be dialled: the registry's check and the senders agree."""

    allow_private_hosts: bool = False
    allowed_smtp_ports: Annotated[tuple[int, ...], NoDecode] = DEFAULT_SMTP_PORTS
    allowed_imap_ports: Annotated[tuple[int, ...], NoDecode] = DEFAULT_IMAP_PORTS

    @field_validator("allowed_smtp_ports", "allowed_imap_ports", mode="before")
    @classmethod
    def _split_ports(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(int(part) for part in value.split(",") if part.strip())
        return value


class UpstreamSettings(CommonSettings):
    registry_url: str = "http://127.0.0.1:8000"
    scheduler_url: str = "http://127.0.0.1:8000"
    webhooks_url: str = "http://127.0.0.1:8000"


class RegistryCopySettings(CommonSettings):
    """A service that keeps its own copy of the registry's tenants (and servers): it asks the
    registry's snapshot routes (`ABL_REGISTRY_URL`, `ABL_INTERNAL_TOKEN`) when its copy is empty,
    for a record a request needs before its change has arrived, and every
    `copy_resync_seconds` to heal what a lost change would have left behind."""

    copy_resync_seconds: float = Field(default=600.0, gt=0)


class OAuthSettings(CommonSettings):
    """The platform's OAuth clients ("Sign in with Google or Microsoft"), read by the registry.

    A provider is configured when its client id and secret are set; every endpoint, SMTP and
    IMAP setting and the scopes of the provider table (`services.registry.oauth.providers`) can
    be overridden, for tests and for national clouds.
    """

    oauth_google_client_id: str = ""
    oauth_google_client_secret: SecretStr = SecretStr("")
    oauth_google_authorize_url: str | None = None
    oauth_google_token_url: str | None = None
    oauth_google_userinfo_url: str | None = None
    oauth_google_jwks_url: str | None = None
    oauth_google_issuer: str | None = None
    oauth_google_smtp_host: str | None = None
    oauth_google_smtp_port: int | None = Field(default=None, ge=1, le=65535)
    oauth_google_imap_host: str | None = None
    oauth_google_imap_port: int | None = Field(default=None, ge=1, le=65535)
    # Space-separated; replaces the table's scopes (they must still allow SMTP and IMAP).
    oauth_google_scopes: str | None = None

    oauth_microsoft_client_id: str = ""
    oauth_microsoft_client_secret: SecretStr = SecretStr("")
    # `common` lets work and personal accounts of any organisation sign in; an organisation
    # that runs its own platform can name its Entra tenant id instead.
    oauth_microsoft_tenant: str = Field(default="common", pattern=r"^[A-Za-z0-9.-]{1,100}$")
    oauth_microsoft_authorize_url: str | None = None
    oauth_microsoft_token_url: str | None = None
    oauth_microsoft_userinfo_url: str | None = None
    oauth_microsoft_jwks_url: str | None = None
    oauth_microsoft_issuer: str | None = None
    oauth_microsoft_smtp_host: str | None = None
    oauth_microsoft_smtp_port: int | None = Field(default=None, ge=1, le=65535)
    oauth_microsoft_imap_host: str | None = None
    oauth_microsoft_imap_port: int | None = Field(default=None, ge=1, le=65535)
    # Space-separated; replaces the table's scopes (they must still allow SMTP and IMAP).
    oauth_microsoft_scopes: str | None = None

    # The public base URL of the API: the redirect URI is `{this}/v1/oauth/callback`, exactly as
    # registered with each provider.
    oauth_redirect_base_url: str = ""
    # Where the callback sends the browser: `?server_id=...` or `?error=code`. Unset, the
    # callback answers a short plain-text page instead.
    oauth_frontend_redirect_url: str = ""
    # How long a started connection may take to come back through the callback.
    oauth_state_ttl_seconds: float = Field(default=600.0, gt=0, le=3600)
    # An access token is refreshed when it has less than this left, so that a sender never
    # holds one that expires during its credentials cache (`ABL_CREDENTIALS_TTL_SECONDS`).
    oauth_refresh_margin_seconds: float = Field(default=300.0, ge=0, le=1800)
    oauth_http_timeout_seconds: float = Field(default=10.0, gt=0, le=60)

    @model_validator(mode="after")
    def _complete_oauth_clients(self) -> Self:
        for provider in ("google", "microsoft"):
            client_id = getattr(self, f"oauth_{provider}_client_id")
            secret: SecretStr = getattr(self, f"oauth_{provider}_client_secret")
            if bool(client_id) != bool(secret.get_secret_value()):
                name = f"ABL_OAUTH_{provider.upper()}"
                raise SettingsError(f"{name}_CLIENT_ID and {name}_CLIENT_SECRET go together")
            if client_id and not self.oauth_redirect_base_url:
                raise SettingsError(
                    "ABL_OAUTH_REDIRECT_BASE_URL must name the API's public base URL when an "
                    "OAuth provider is configured (the redirect URI is "
                    "{base}/v1/oauth/callback)"
                )
        return self


class RegistrySettings(
    OutboxSettings, EncryptionSettings, InternalTokenSettings, AddressSettings, OAuthSettings
):
    admin_token: SecretStr = SecretStr("")

    verify_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    verify_rate_per_minute: int = Field(default=10, ge=1)
    verify_burst: int = Field(default=5, ge=1)
    # Provider detection at the server check (the SMTP host's CNAME chain, the account domain's
    # MX): the resolvers to ask, `ip` or `ip:port` (`[ipv6]:port`), comma-separated; none means
    # the system's (/etc/resolv.conf). The lookups run beside the check, bounded by the timeout.
    dns_nameservers: Annotated[tuple[str, ...], NoDecode] = ()
    dns_timeout_seconds: float = Field(default=2.0, gt=0, le=30)

    @field_validator("dns_nameservers", mode="before")
    @classmethod
    def _split_nameservers(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, list | tuple):
            for item in value:
                nameserver_address(str(item))  # refused at start-up, not at the first check
        return value

    @model_validator(mode="after")
    def _refuse_unsafe_secrets(self) -> Self:
        _refuse_weak_token("admin_token", self.admin_token)
        return self


class SchedulerSettings(
    OutboxSettings,
    InternalTokenSettings,
    UnsubscribeSettings,
    AddressSettings,
    UpstreamSettings,
    RegistryCopySettings,
):
    """The scheduler; it also reads the sending mailboxes (`services.scheduler.inbox`), so it
    dials tenants' IMAP servers under the same address rules as the senders, and asks the
    registry (`ABL_REGISTRY_URL`) for their access."""

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
    # The mailbox reader: how often each server's INBOX is read, how long one read may take
    # (a mailbox that hangs is given up on for this round; the others go on), how many at once.
    inbox_poll_seconds: float = Field(default=60.0, gt=0)
    inbox_timeout_seconds: float = Field(default=30.0, gt=0)
    inbox_concurrency: int = Field(default=32, ge=1, le=1000)
    # IMAP IDLE where a server advertises it: after a read, a replica keeps one connection per
    # mailbox (at most `inbox_idle_max`) in IDLE, renewed every `inbox_idle_seconds` (under
    # the 29 minutes of RFC 2177), and reads the mailbox as soon as a message arrives. Polling
    # every `inbox_poll_seconds` stays, as the fallback. 0 turns IDLE off.
    inbox_idle_max: int = Field(default=100, ge=0, le=10_000)
    inbox_idle_seconds: float = Field(default=1500.0, gt=0, le=1740)
    # The bounce-rate guard: a server whose hard bounces over its last `bounce_window` sent
    # emails pass `bounce_pause_ratio` (or complaints `complaint_pause_ratio`) is paused; not
    # judged before `bounce_min_sent` sends, where one bounce would be a large ratio.
    bounce_window: int = Field(default=200, ge=1)
    bounce_pause_ratio: float = Field(default=0.05, gt=0, le=1)
    complaint_pause_ratio: float = Field(default=0.001, gt=0, le=1)
    bounce_min_sent: int = Field(default=20, ge=1)
    # Where recipients reach the public API: one-click unsubscribe links start with it
    # (RFC 8058 wants HTTPS; plain http is accepted for development).
    public_url: str = Field(default="http://127.0.0.1:8000", pattern=r"^https?://[^\s/]+(/\S*)?$")


class SenderSettings(BrokerSettings, InternalTokenSettings, AddressSettings, UpstreamSettings):
    sender_prefetch: int = Field(default=64, ge=1, le=10_000)
    sender_connections_per_server: int = Field(default=2, ge=1, le=20)
    sender_command_timeout_seconds: float = Field(default=60.0, gt=0)
    sender_data_timeout_seconds: float = Field(default=600.0, gt=0)
    sender_idle_seconds: float = Field(default=60.0, gt=0)
    credentials_ttl_seconds: float = Field(default=60.0, ge=0)


class WebhookSettings(
    DatabaseSettings,
    BrokerSettings,
    EncryptionSettings,
    InternalTokenSettings,
    AddressSettings,
    UpstreamSettings,
    RegistryCopySettings,
):
    """The webhooks service: tenants' endpoints, their signing secrets (encrypted with the
    keyring), and delivery to URLs the tenants chose (the SSRF rules of server checks apply;
    `ABL_ALLOW_PRIVATE_HOSTS` also allows plain http, for tests and local development)."""

    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    # Attempts in flight at once, over all endpoints, per process.
    webhook_concurrency: int = Field(default=32, ge=1, le=1000)
    webhook_tick_seconds: float = Field(default=1.0, gt=0, le=60)
    # A claimed delivery whose attempt did not finish (crash) is tried again after this.
    webhook_lease_seconds: float = Field(default=60.0, gt=0)
    # Retries wait base, 2 x base, 4 x base, ... up to the cap, with jitter; a delivery is
    # abandoned once it has failed for the whole window (3 days: at least the promised 24 h).
    webhook_retry_base_seconds: float = Field(default=5.0, ge=0)
    webhook_retry_cap_seconds: float = Field(default=3600.0, ge=0)
    webhook_retry_window_seconds: float = Field(default=3 * 86400.0, ge=0)
    # An endpoint whose every attempt has failed for this long is disabled (and the tenant told).
    webhook_disable_after_seconds: float = Field(default=3 * 86400.0, ge=0)
    # After a secret rotation, the previous secret signs beside the new one for this long, so
    # that receivers can switch without losing an event.
    webhook_secret_overlap_seconds: float = Field(default=86400.0, ge=0)


class GatewaySettings(UpstreamSettings):
    """The gateway of `make stack` routes requests; it holds no secret."""


# The ignore: pydantic's mypy plugin gives each base a `model_construct` of its own fields and
# finds two bases' signatures "incompatible" wherever both hold fields the other lacks; the
# runtime class is consistent (its MRO is checked at import).
class Settings(  # type: ignore[misc]
    RegistrySettings, SchedulerSettings, SenderSettings, WebhookSettings, GatewaySettings
):
    """Every service's settings together: the one-process shape (`make run`)."""


SERVICE_SETTINGS: dict[str, type[CommonSettings]] = {
    "all": Settings,
    "registry": RegistrySettings,
    "scheduler": SchedulerSettings,
    "sender": SenderSettings,
    "webhooks": WebhookSettings,
    "gateway": GatewaySettings,
}
# Settings that are secrets (a database or broker URL may hold a password).
SECRET_SETTINGS = (
    "database_url",
    "amqp_url",
    "admin_token",
    "internal_token",
    "encryption_keys",
    "unsubscribe_key",
    "unsubscribe_old_keys",
    "oauth_google_client_secret",
    "oauth_microsoft_client_secret",
)


def unused_secrets(settings_class: type[CommonSettings], environ: Mapping[str, str]) -> list[str]:
    """The `ABL_` secret variables set in `environ` that `settings_class` does not read."""
    present = {name.upper() for name in environ}
    return [
        f"ABL_{name.upper()}"
        for name in SECRET_SETTINGS
        if name not in settings_class.model_fields and f"ABL_{name.upper()}" in present
    ]


def warn_unused_secrets(
    service: str, settings_class: type[CommonSettings], environ: Mapping[str, str]
) -> list[str]:
    """Say at start-up which secrets this service was given but does not use: each is one
    more thing a compromised process would leak."""
    unused = unused_secrets(settings_class, environ)
    for variable in unused:
        logging.getLogger("abl.settings").warning(
            "%s is set, but the %s service does not use it: remove it from this service's "
            "environment (least privilege)",
            variable,
            service,
        )
    return unused


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
