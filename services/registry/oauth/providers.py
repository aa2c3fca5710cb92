"""The OAuth providers a tenant can connect a mailbox with: one table, free of I/O.

Each row names the provider's endpoints, the scopes that allow SMTP submission and reading the
mailbox over IMAP (and an address), and the SMTP and IMAP servers that accept its tokens with
SASL XOAUTH2. A provider is offered only when the operator configured its client; every
endpoint, SMTP and IMAP setting and the scopes can be overridden by `ABL_OAUTH_<PROVIDER>_*`
settings (tests, national clouds).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from services.registry.domain import Security
from shared.settings import OAuthSettings

CALLBACK_PATH = "/v1/oauth/callback"


@dataclass(frozen=True)
class Provider:
    name: str
    title: str
    authorize_url: str
    token_url: str
    userinfo_url: str
    # Where the provider publishes the keys that sign its ID tokens, and the issuer they name
    # (`{tenantid}` stands for the token's `tid` claim: Microsoft's multi-tenant issuer).
    jwks_url: str
    issuer: str
    scopes: tuple[str, ...]
    smtp_host: str
    smtp_port: int
    security: Security
    # The IMAP server (implicit TLS) that takes the same access token: the mailbox reader's.
    imap_host: str
    imap_port: int
    # Other spellings of the issuer the provider uses.
    issuer_aliases: tuple[str, ...] = ()
    # Extra query parameters of the authorization request.
    authorize_params: dict[str, str] = field(default_factory=dict)
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    redirect_uri: str = ""

    @property
    def scope(self) -> str:
        return " ".join(self.scopes)


PROVIDERS: dict[str, Provider] = {
    "google": Provider(
        name="google",
        title="Google",
        authorize_url="https://accounts.google.com/o/oauth2/v2/auth",
        token_url="https://oauth2.googleapis.com/token",  # noqa: S106  # a URL
        userinfo_url="https://openidconnect.googleapis.com/v1/userinfo",
        jwks_url="https://www.googleapis.com/oauth2/v3/certs",
        issuer="https://accounts.google.com",
        issuer_aliases=("accounts.google.com",),  # Google documents both
        # https://mail.google.com/ is the only Google scope that allows SMTP, and it covers IMAP
        # (https://developers.google.com/gmail/imap/xoauth2-protocol).
        scopes=("openid", "email", "https://mail.google.com/"),
        smtp_host="smtp.gmail.com",
        smtp_port=587,
        security=Security.starttls,
        imap_host="imap.gmail.com",
        imap_port=993,
        # offline: a refresh token; consent: Google gives one again on a reconnect.
        authorize_params={"access_type": "offline", "prompt": "consent"},
    ),
    "microsoft": Provider(
        name="microsoft",
        title="Microsoft",
        authorize_url="https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize",
        token_url="https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",  # noqa: S106
        # Used only when the ID token names no address: an access token for Outlook's SMTP
        # cannot call Graph, so the address normally comes from the ID token.
        userinfo_url="https://graph.microsoft.com/oidc/userinfo",
        jwks_url="https://login.microsoftonline.com/{tenant}/discovery/v2.0/keys",
        issuer="https://login.microsoftonline.com/{tenantid}/v2.0",
        # One token for both: SMTP.Send and IMAP.AccessAsUser.All share the audience
        # outlook.office.com (https://learn.microsoft.com/exchange/client-developer/
        # legacy-protocols/how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth).
        scopes=(
            "openid",
            "email",
            "offline_access",
            "https://outlook.office.com/SMTP.Send",
            "https://outlook.office.com/IMAP.AccessAsUser.All",
        ),
        smtp_host="smtp.office365.com",
        smtp_port=587,
        security=Security.starttls,
        imap_host="outlook.office365.com",
        imap_port=993,
        authorize_params={"prompt": "select_account"},
    ),
}


def configured(settings: OAuthSettings) -> dict[str, Provider]:
    """The providers the operator registered a client for, with their overrides applied."""
    found: dict[str, Provider] = {}
    base = settings.oauth_redirect_base_url.rstrip("/")
    for name, default in PROVIDERS.items():
        client_id: str = getattr(settings, f"oauth_{name}_client_id")
        if not client_id:
            continue
        secret = getattr(settings, f"oauth_{name}_client_secret").get_secret_value()
        tenant = settings.oauth_microsoft_tenant
        provider = replace(
            default,
            authorize_url=default.authorize_url.format(tenant=tenant),
            token_url=default.token_url.format(tenant=tenant),
            jwks_url=default.jwks_url.format(tenant=tenant),
            client_id=client_id,
            client_secret=secret,
            redirect_uri=f"{base}{CALLBACK_PATH}",
        )
        overrides = {
            key: getattr(settings, f"oauth_{name}_{key}")
            for key in (
                "authorize_url",
                "token_url",
                "userinfo_url",
                "jwks_url",
                "issuer",
                "smtp_host",
                "smtp_port",
                "imap_host",
                "imap_port",
            )
            if getattr(settings, f"oauth_{name}_{key}") is not None
        }
        scopes: str | None = getattr(settings, f"oauth_{name}_scopes")
        if scopes:
            overrides["scopes"] = tuple(scopes.split())
        if "issuer" in overrides:
            overrides["issuer_aliases"] = ()
        found[name] = replace(provider, **overrides)
    return found


def provider_for_host(host: str) -> str | None:
    """The provider whose SMTP server this is (for hints on password servers)."""
    for name, provider in PROVIDERS.items():
        if provider.smtp_host == host.lower():
            return name
    return None
