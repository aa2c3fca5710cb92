"""The rules of webhook delivery, as pure functions: which URLs may be registered, when a failed
attempt is tried again, when a delivery is abandoned, when an endpoint is switched off."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import idna

from shared.errors import Unprocessable

# Problem codes shared with the registry's server checks: a frontend handles a refused URL the
# way it handles a refused SMTP host.
BLOCKED_HOST_DETAIL = (
    "This host resolves to an address that may not be used (private, loopback, link-local, "
    "shared or metadata)."
)


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int


class BlockedHost(Unprocessable):
    """The URL's host resolves to an address that may not be used."""

    code = "blocked_host"
    default_detail = BLOCKED_HOST_DETAIL
    hint = "Use the public host name of the endpoint."


class DnsFailed(Unprocessable):
    """The URL's host name does not resolve."""

    code = "dns_failed"
    # The host is not repeated: no error echoes the caller's input.
    default_detail = "The host name does not resolve."
    hint = "Check the spelling of the host name."


class InvalidUrl(Unprocessable):
    """Not an absolute http(s) URL to a host, without credentials."""

    code = "invalid_url"
    default_detail = "Only https:// URLs receive webhooks."
    hint = "Give an absolute https:// URL."


class InsecureUrl(Unprocessable):
    """Webhooks are sent over HTTPS only."""

    code = "insecure_url"
    default_detail = "Webhooks are sent over HTTPS only."
    hint = "Serve the endpoint over HTTPS (a certificate from a public CA)."


URL_ERRORS = (InvalidUrl, InsecureUrl, BlockedHost, DnsFailed)


def blocked_host() -> Unprocessable:
    return BlockedHost()


def dns_failed() -> Unprocessable:
    return DnsFailed()


def bad_url(detail: str, hint: str) -> Unprocessable:
    return InvalidUrl(detail, hint=hint)


def parse_target(url: str, *, allow_insecure: bool) -> Target:
    """Where `url` is posted to; refuses what is not an absolute http(s) URL to a host.

    Plain http is refused unless `allow_insecure` (ABL_ALLOW_PRIVATE_HOSTS: tests, local
    development): an event carries addresses and SMTP replies, and the signature does not hide
    them from the network.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise bad_url("The URL cannot be parsed.", "Give an absolute https:// URL.") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise bad_url("Only https:// URLs receive webhooks.", "Give an absolute https:// URL.")
    if scheme == "http" and not allow_insecure:
        raise InsecureUrl()
    if parts.username is not None or parts.password is not None:
        raise bad_url(
            "A webhook URL may not hold credentials.",
            "Verify the `webhook-signature` header instead of a password in the URL.",
        )
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise bad_url("The URL names no host.", "Give an absolute https:// URL.")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not host.isascii():
            try:
                host = idna.encode(host, uts46=True).decode("ascii")
            except idna.IDNAError as exc:
                raise bad_url(
                    "The host is not a valid internationalised name.", "Check the host name."
                ) from exc
    return Target(scheme, host, port or (443 if scheme == "https" else 80))


def next_attempt(
    attempts: int,
    now: datetime,
    *,
    base_seconds: float,
    cap_seconds: float,
    jitter: float | None = None,
) -> datetime:
    """When to try again after the `attempts`-th failure: base x 2^(attempts-1), capped, plus up
    to 20% jitter so that a recovered endpoint is not hit by every retry in the same second."""
    exponent = min(max(attempts - 1, 0), 30)
    delay = min(base_seconds * (2**exponent), cap_seconds)
    spread = random.random() if jitter is None else jitter  # noqa: S311 - spreading, not secrecy
    return now + timedelta(seconds=delay * (1 + 0.2 * spread))


def should_disable(failing_since: datetime | None, now: datetime, after: timedelta) -> bool:
    """An endpoint that has failed every attempt for `after` is switched off."""
    return failing_since is not None and now - failing_since >= after


def delivered(status_code: int) -> bool:
    # A redirect is a failure: following one could lead to an address the URL check refused.
    return 200 <= status_code < 300
