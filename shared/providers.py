"""What the big mailbox providers allow one account to send, and how to tell them apart.

Data only, no I/O: the registry uses it for a server's default `daily_cap`, the scheduler's
domain for the effective cap and the per-minute pacing. The figures are the providers' own
published limits for one mailbox submitting over authenticated SMTP (not their relay
services); where a provider publishes a range, the lowest figure of a paid plan is used, since
a cap set too high ends in a quota reply and a parked server, one set too low only in slower
sending. MX-based detection (a custom domain hosted by Google or Microsoft) is not done: the
SMTP host already names the provider for every account that submits through it.
"""

from __future__ import annotations

from dataclasses import dataclass

CONSUMER_GOOGLE_DOMAINS = frozenset({"gmail.com", "googlemail.com"})


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


def detect(host: str, username: str = "") -> Provider | None:
    """The provider behind an SMTP host, or None for a server it does not know (an own MTA)."""
    name = host.lower().removesuffix(".")
    key = _HOSTS.get(name)
    if key is None:
        parent = ".".join(name.split(".")[-2:])
        key = _PARENTS.get(parent) if name.startswith("smtp") else None
    if key == "gmail":
        domain = username.lower().rpartition("@")[2]
        if domain and domain not in CONSUMER_GOOGLE_DOMAINS:
            key = "google_workspace"
    return PROVIDERS[key] if key else None
