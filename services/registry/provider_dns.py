"""The DNS half of provider detection, at the server check: the SMTP host's CNAME chain and the
MX hosts of the account's domain, asked with dnspython and handed to `shared.providers.detect`,
which alone decides.

Only a host the provider table does not know is looked up, and never one given as an address
(a big provider's submission host is a name: its TLS certificate names it) or a local name.
The lookups are bounded by `ABL_DNS_TIMEOUT_SECONDS` and never fail the check: a lookup that
fails or times out is logged at INFO (the names asked, never the login) and the server keeps
whatever the other answers and its host say, possibly no provider at all.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.MX
import dns.resolver

from shared.providers import Provider, account_domain, detect
from shared.settings import RegistrySettings, nameserver_address

logger = logging.getLogger("abl.registry.provider_dns")

# More hops than any provider's set-up needs (mail.acme.com → smtp.office365.com → ...), few
# enough that a CNAME loop ends quickly.
MAX_CNAME_HOPS = 8


@dataclass(frozen=True)
class Detection:
    provider: Provider | None
    # Some lookup failed or timed out, so an answer may be missing: a re-check then keeps the
    # provider it had rather than dropping a Microsoft 365 server to the unknown's cap.
    failed: bool = False


def worth_asking(name: str) -> bool:
    """Whether DNS could say anything about `name`: a dotted name, not an address literal or a
    local name (the test and development servers are dialled by address)."""
    text = name.strip().lower().removesuffix(".")
    if not text or "." not in text or text.startswith("["):
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return not (text == "localhost" or text.endswith(".localhost"))
    return False


class ProviderDns:
    def __init__(self, settings: RegistrySettings) -> None:
        self.timeout = settings.dns_timeout_seconds
        self.nameservers = [nameserver_address(value) for value in settings.dns_nameservers]
        self._resolver: dns.asyncresolver.Resolver | None = None

    def resolver(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            if self.nameservers:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [
                    dns.nameserver.Do53Nameserver(address, port)
                    for address, port in self.nameservers
                ]
            else:
                # Reads /etc/resolv.conf; raises NoResolverConfiguration where there is none.
                resolver = dns.asyncresolver.Resolver()
            resolver.timeout = self.timeout
            resolver.lifetime = self.timeout
            self._resolver = resolver
        return self._resolver

    async def detect(self, host: str, username: str, from_email: str = "") -> Detection:
        known = detect(host, username, from_email=from_email)
        if known is not None or not worth_asking(host):
            return Detection(known)
        domain = account_domain(username, from_email)
        (cnames, cname_failed), (mx, mx_failed) = await asyncio.gather(
            self._cname_chain(host), self._mx_hosts(domain)
        )
        provider = detect(host, username, from_email=from_email, cnames=cnames, mx=mx)
        return Detection(provider, failed=cname_failed or mx_failed)

    async def _cname_chain(self, host: str) -> tuple[list[str], bool]:
        chain: list[str] = []
        name = host
        try:
            async with asyncio.timeout(self.timeout):
                for _ in range(MAX_CNAME_HOPS):
                    try:
                        answer = await self.resolver().resolve(name, "CNAME")
                    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                        break  # the end of the chain, an answer like any other
                    record = answer[0]
                    assert isinstance(record, dns.rdtypes.ANY.CNAME.CNAME)
                    name = record.target.to_text(omit_final_dot=True)
                    chain.append(name)
                    if detect(name) is not None:
                        break
        except (TimeoutError, dns.exception.DNSException, OSError) as exc:
            _log_failure("CNAME", host, exc)
            return chain, True
        return chain, False

    async def _mx_hosts(self, domain: str) -> tuple[list[str], bool]:
        if not worth_asking(domain):
            return [], False
        try:
            async with asyncio.timeout(self.timeout):
                answer = await self.resolver().resolve(domain, "MX")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [], False
        except (TimeoutError, dns.exception.DNSException, OSError) as exc:
            _log_failure("MX", domain, exc)
            return [], True
        records = [record for record in answer if isinstance(record, dns.rdtypes.ANY.MX.MX)]
        records.sort(key=lambda record: record.preference)
        # A null MX (RFC 7505: ".") says the domain takes no mail: it names no provider.
        hosts = [record.exchange.to_text(omit_final_dot=True) for record in records]
        return [host for host in hosts if host not in ("", ".")], False


def _log_failure(kind: str, name: str, exc: BaseException) -> None:
    # The name asked and the kind of failure only: dnspython's messages can be long, and the
    # login (an address) is never named.
    reason = "timed out" if isinstance(exc, TimeoutError | dns.exception.Timeout) else "failed"
    logger.info(
        "provider detection: the %s lookup of %s %s (%s); the server is stored with the "
        "provider its other answers give, if any",
        kind,
        name,
        reason,
        type(exc).__name__,
    )
