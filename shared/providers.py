"""What the big mailbox providers allow one account to send, and how to tell them apart.

Data and rules only, no I/O: the registry uses them for a server's default `daily_cap` and the
provider it stores with the server; the scheduler's domain for the effective cap and the
per-minute pacing. The figures are the providers' own published limits for one mailbox
submitting over authenticated SMTP (not their relay services); where a provider publishes a
range, the lowest figure of a paid plan is used, since a cap set too high ends in a quota reply
and a parked server, one set too low only in slower sending.

`detect` tells the provider from, in this order: the SMTP host (the table below); the names of
the host's CNAME chain (mail.acme.com pointing at smtp.office365.com); the MX hosts of the
account's domain (a custom domain hosted by Google or Microsoft 365). The registry resolves the
DNS answers at the server check (`services/registry/provider_dns.py`) and passes them in; the
rules here only read them. Gmail and Google Workspace are told apart by the account's domain,
and so are Microsoft 365 and Outlook.com (a consumer address on smtp.office365.com).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

CONSUMER_GOOGLE_DOMAINS = frozenset({"gmail.com", "googlemail.com"})
# Outlook.com's own address domains: outlook.com, hotmail.com, live.com and msn.com, and the
# country forms of the first three (hotmail.co.uk, live.fr, outlook.de, ...), as listed in
# https://support.microsoft.com/office/pop-imap-and-smtp-settings-for-outlook-com-
# d088b986-291d-42b8-9564-9c414e2aa040 ("Outlook.com, Hotmail.com, Live.com, MSN.com").
# Such an account may submit through smtp.office365.com, but its limits are Outlook.com's.
_CONSUMER_MICROSOFT = re.compile(
    r"(?:hotmail|live|outlook)\.(?:com|[a-z]{2}|co\.[a-z]{2}|com\.[a-z]{2})|msn\.com"
)


@dataclass(frozen=True)
class Provider:
    key: str
    name: str
    # Messages (recipients, for Microsoft) a day; `rolling` when the provider counts them
    # over any 24 hours rather than per calendar day.
    daily: int
    rolling: bool = False
    per_minute: int | None = None
    connections: int | None = None
    imap_host: str | None = None


# Sources (read November 2026):
# - Gmail: https://support.google.com/mail/answer/22839 ("500 recipients ... in a 24-hour
#   period"; limits apply over a rolling 24 hours).
# - Google Workspace: https://support.google.com/a/answer/166852 (2,000 messages a day per
#   user, rolling 24 hours; trial accounts 500).
# - Microsoft 365 / Exchange Online: https://learn.microsoft.com/office365/servicedescriptions/
#   exchange-online-service-description/exchange-online-limits#sending-limits (10,000
#   recipients a day, 30 messages a minute, 3 concurrent SMTP connections per mailbox).
# - Outlook.com: https://support.microsoft.com/office/
#   sending-limits-in-outlook-com-279ee200-594c-40f0-9ec8-bb6af7735c2e (300 a day for a
#   standard account).
# - Zoho Mail: https://www.zoho.com/mail/help/adminconsole/email-sending-limits.html (500 a
#   day per user on paid plans).
# - Yahoo Mail: https://help.yahoo.com/kb/SLN3353.html (500 a day, 100 recipients a message).
# - iCloud Mail: https://support.apple.com/en-us/102198 (1,000 messages a day).
# - Fastmail: https://www.fastmail.help/hc/en-us/articles/1500000277382 (1,000 a day for
#   accounts under 30 days; 4,000 after).
PROVIDERS: dict[str, Provider] = {
    p.key: p
    for p in (
        Provider("gmail", "Gmail", 500, rolling=True, imap_host="imap.gmail.com"),
        Provider(
            "google_workspace", "Google Workspace", 2000, rolling=True, imap_host="imap.gmail.com"
        ),
        Provider(
            "office365",
            "Microsoft 365",
            10_000,
            per_minute=30,
            connections=3,
            imap_host="outlook.office365.com",
        ),
        Provider("outlook", "Outlook.com", 300, per_minute=30, imap_host="outlook.office365.com"),
        Provider("zoho", "Zoho Mail", 500, imap_host="imap.zoho.com"),
        Provider("yahoo", "Yahoo Mail", 500, imap_host="imap.mail.yahoo.com"),
        Provider("icloud", "iCloud Mail", 1000, imap_host="imap.mail.me.com"),
        Provider("fastmail", "Fastmail", 1000, imap_host="imap.fastmail.com"),
    )
}

# SMTP host (or its parent domain) → provider key. Gmail and Workspace share smtp.gmail.com
# and are told apart by the account's domain.
_HOSTS = {
    "smtp.gmail.com": "gmail",
    "smtp.googlemail.com": "gmail",
    "smtp.office365.com": "office365",
    "smtp-mail.outlook.com": "outlook",
    "smtp.live.com": "outlook",
    "smtp.mail.yahoo.com": "yahoo",
    "smtp.mail.me.com": "icloud",
    "smtp.fastmail.com": "fastmail",
}
_PARENTS = {"zoho.com": "zoho", "zoho.eu": "zoho", "zoho.in": "zoho", "zohomail.com": "zoho"}


# MX host suffix → provider key: where a domain's mail is hosted says whose mailbox the
# account is. Matched on whole labels (a suffix of `google.com.attacker.net` is not Google's).
# Sources (read November 2026):
# - Google Workspace: https://support.google.com/a/answer/174125 (ASPMX.L.GOOGLE.COM and its
#   ALTn forms; older set-ups name ASPMXn.GOOGLEMAIL.COM, newer ones SMTP.GOOGLE.COM); gmail.com
#   itself is served by gmail-smtp-in.l.google.com. Told apart by the account's domain.
# - Microsoft 365: https://learn.microsoft.com/microsoft-365/enterprise/
#   external-domain-name-system-records (MX "<domain-key>.mail.protection.outlook.com").
#   Outlook.com's own domains are served by *.olc.protection.outlook.com (as published in DNS:
#   outlook-com.olc.protection.outlook.com, hotmail-com.olc.protection.outlook.com).
# - Zoho Mail: https://www.zoho.com/mail/help/adminconsole/configure-email-delivery.html
#   (mx.zoho.com, mx2.zoho.com, mx3.zoho.com; .eu and .in for those data centres).
# - Yahoo Mail: yahoo.com's own MX records, as published in DNS (mta5.am0.yahoodns.net, ...).
# - iCloud Mail (custom domains with iCloud+): Apple's "Custom email domain" set-up at
#   support.apple.com (mx01.mail.icloud.com, mx02.mail.icloud.com).
# - Fastmail: https://www.fastmail.help/hc/en-us/articles/360058753394 (in1-smtp and
#   in2-smtp.messagingengine.com).
_MX_SUFFIXES = (
    ("google.com", "gmail"),
    ("googlemail.com", "gmail"),
    ("olc.protection.outlook.com", "outlook"),
    ("mail.protection.outlook.com", "office365"),
    ("zoho.com", "zoho"),
    ("zoho.eu", "zoho"),
    ("zoho.in", "zoho"),
    ("yahoodns.net", "yahoo"),
    ("mail.icloud.com", "icloud"),
    ("messagingengine.com", "fastmail"),
)


def _name(host: str) -> str:
    return host.strip().lower().removesuffix(".")


def account_domain(username: str, from_email: str = "") -> str:
    """The domain whose mailbox the account is: the username's when it is an address, else the
    sender address's (a plain login such as `sales` says nothing)."""
    for value in (username, from_email):
        local, at, domain = _name(value).rpartition("@")
        if at and local and domain:
            return domain
    return ""


def is_consumer_microsoft(domain: str) -> bool:
    return _CONSUMER_MICROSOFT.fullmatch(_name(domain)) is not None


def _host_key(host: str) -> str | None:
    name = _name(host)
    key = _HOSTS.get(name)
    if key is None:
        parent = ".".join(name.split(".")[-2:])
        key = _PARENTS.get(parent) if name.startswith("smtp") else None
    return key


def _mx_key(host: str) -> str | None:
    name = _name(host)
    for suffix, key in _MX_SUFFIXES:
        if name == suffix or name.endswith("." + suffix):
            return key
    return None


def detect(
    host: str,
    username: str = "",
    *,
    from_email: str = "",
    cnames: Iterable[str] = (),
    mx: Iterable[str] = (),
) -> Provider | None:
    """The provider behind an SMTP account, or None for a server it does not know (an own MTA).

    `cnames`: the SMTP host's CNAME chain, in order; `mx`: the MX hosts of the account's domain
    (`account_domain`), most preferred first. The SMTP host decides when the table knows it;
    else the first name of its CNAME chain that the table knows; else the first MX host that
    names a provider. The MX says where the domain's mail is hosted, which is where a hosted
    account submits too; an own MTA relaying for a hosted domain would be taken for the host,
    a risk taken for the tenant's convenience: `daily_cap` still bounds it.
    """
    key = _host_key(host)
    for name in cnames:
        if key is not None:
            break
        key = _host_key(name)
    for name in mx:
        if key is not None:
            break
        key = _mx_key(name)
    domain = account_domain(username, from_email)
    if key in ("gmail", "google_workspace"):
        key = "google_workspace" if domain and domain not in CONSUMER_GOOGLE_DOMAINS else "gmail"
    elif key == "office365" and is_consumer_microsoft(domain):
        key = "outlook"
    return PROVIDERS[key] if key else None


def provider_of(stored: str | None, host: str, username: str = "") -> Provider | None:
    """The provider the registry stored with a server at its check (`smtp_servers.provider`),
    else, for a row stored before the column was filled, the one its host names."""
    if stored is not None and stored in PROVIDERS:
        return PROVIDERS[stored]
    return detect(host, username)
