"""The connection check: resolve once, refuse forbidden addresses, connect to the address that
was checked, say EHLO, set up TLS with verified certificates, authenticate (with the password,
or with SASL XOAUTH2 and an access token for OAuth servers), and quit.

No email is sent. The whole check is bounded by `ABL_VERIFY_TIMEOUT_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiosmtplib

from services.registry import domain
from services.registry.domain import AuthMethod, CheckCode, CheckOutcome, Security
from services.registry.provider_dns import ProviderDns
from shared import addresses as addresses_module
from shared import imap
from shared.settings import RegistrySettings
from shared.smtp_tls import smtp_client

if TYPE_CHECKING:
    from services.registry.oauth.tokens import TokenKeeper

logger = logging.getLogger("abl.registry.verifier")


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    security: Security
    username: str
    password: str  # the access token when `auth` is xoauth2
    auth: AuthMethod = AuthMethod.password

    def __repr__(self) -> str:  # the password must never reach a log or a traceback
        return f"Target(host={self.host!r}, port={self.port}, security={self.security.value})"


class Verifier:
    def __init__(self, settings: RegistrySettings, tokens: TokenKeeper | None = None) -> None:
        # An OAuth server's mailbox is checked with its access token, kept by this keeper.
        self.tokens = tokens
        self.timeout = settings.verify_timeout_seconds
        self.allow_private = settings.allow_private_hosts
        self.allowed_ports = settings.allowed_smtp_ports
        self.allowed_imap_ports = settings.allowed_imap_ports
        # The provider behind the account, looked up beside each check (CNAME chain, MX).
        self.provider_dns = ProviderDns(settings)

    async def check_imap(self, endpoint: imap.ImapEndpoint) -> imap.ImapCheck:
        """LOGIN, SELECT INBOX (read-only), LOGOUT under the same address rules as SMTP."""
        return await imap.check(
            endpoint,
            allow_private=self.allow_private,
            allowed_ports=self.allowed_imap_ports,
            bound_seconds=self.timeout,
        )

    async def check(self, target: Target) -> CheckOutcome:
        stage = ["greeting"]
        try:
            async with asyncio.timeout(self.timeout):
                return await self._check(target, stage)
        except TimeoutError:
            return domain.timed_out(self.timeout, target.port, target.security, stage[0])

    async def _check(self, target: Target, stage: list[str]) -> CheckOutcome:
        if not domain.port_allowed(
            target.port, self.allowed_ports, allow_private=self.allow_private
        ):
            return domain.blocked_port(target.port, self.allowed_ports)
        try:
            allowed = await addresses_module.checked_addresses(
                target.host, target.port, allow_private=self.allow_private
            )
        except addresses_module.ForbiddenAddress:
            return domain.blocked_host()
        except (socket.gaierror, UnicodeError):
            return domain.dns_failed()

        outcome = domain.connect_failed()
        for address in allowed:
            stage[0] = "greeting"
            client = smtp_client(
                str(address),
                target.host,
                target.port,
                implicit_tls=target.security is Security.tls,
                # Below the overall bound, so a connect timeout is seen as such by aiosmtplib.
                timeout=self.timeout * 0.9,
            )
            try:
                outcome = await self._converse(client, target, stage)
            finally:
                client.close()
            if outcome.code is not CheckCode.connect_failed or stage[0] != "greeting":
                return outcome
        return outcome

    async def _converse(
        self, client: aiosmtplib.SMTP, target: Target, stage: list[str]
    ) -> CheckOutcome:
        try:
            await client.connect()
            stage[0] = "EHLO reply"
            await client.ehlo()
            if target.security is Security.starttls:
                if not client.supports_extension("starttls"):
                    return domain.starttls_missing()
                stage[0] = "TLS handshake"
                await client.starttls()
                await client.ehlo()
            if not client.supports_extension("auth"):
                return domain.auth_missing()
            stage[0] = "AUTH reply"
            if target.auth is AuthMethod.xoauth2:
                if "xoauth2" not in client.server_auth_methods:
                    return domain.xoauth2_missing()
                await client.auth_xoauth2(target.username, target.password)
            else:
                await client.login(target.username, target.password)
            stage[0] = "QUIT reply"
            # The check already passed; a rude goodbye changes nothing.
            with contextlib.suppress(aiosmtplib.SMTPException):
                await client.quit()
            return domain.PASSED
        except aiosmtplib.SMTPAuthenticationError as exc:
            return domain.auth_failure(target.host, exc.code, exc.message)
        except aiosmtplib.SMTPConnectTimeoutError as exc:
            if isinstance(exc.__cause__, aiosmtplib.SMTPTimeoutError):
                raise TimeoutError from exc  # connected, but no greeting came
            # No answer to the TCP handshake: filtered looks the same as refused.
            return domain.connect_failed()
        except aiosmtplib.SMTPTimeoutError as exc:
            raise TimeoutError from exc
        except ssl.SSLError as exc:
            return domain.tls_failure(target.port, target.security, _ssl_reason(exc))
        except aiosmtplib.SMTPConnectError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ssl.SSLError):
                return domain.tls_failure(target.port, target.security, _ssl_reason(cause))
            return domain.connect_failed()
        except aiosmtplib.SMTPServerDisconnected:
            tls_stage = stage[0] == "TLS handshake" or (
                stage[0] == "greeting" and target.security is Security.tls
            )
            if tls_stage:
                return domain.tls_failure(
                    target.port, target.security, "the server closed the connection"
                )
            return domain.connect_failed()
        except aiosmtplib.SMTPResponseException as exc:
            return domain.protocol_error(exc.code, exc.message)
        except aiosmtplib.SMTPException:
            return domain.connect_failed()
        except OSError:
            return domain.connect_failed()


def _ssl_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or "certificate verification failed"
    return exc.reason or type(exc).__name__
