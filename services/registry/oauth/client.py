"""The OAuth 2.0 client side, with authlib's httpx client: the authorization URL (code flow with
PKCE S256), the code exchange, the refresh, and the account's address.

Every failure becomes an `OAuthFailure` with a short code; no token, code or verifier is ever
put in its message.
"""

from __future__ import annotations

import base64
import binascii
import json
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import authlib.deprecate  # noqa: F401  # imported first: see the comment below
import httpx

from services.registry.oauth.providers import Provider
from shared.timeutil import utcnow

# authlib 1.9 announces on import that it will prefer the `httpx2` package; the project is on
# httpx, which authlib still supports, and the warning says nothing an operator can act on.
# authlib.deprecate installs an "always" filter when imported, so it was imported above and the
# "ignore" below goes in front of it.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError

# Providers answer `expires_in` (Google and Microsoft: 3599 s); without it, assume little.
DEFAULT_EXPIRES_IN = 600


class OAuthFailure(Exception):
    """The provider refused or could not answer. `code` is what the callback or the registry
    reports: `invalid_grant` (consent revoked, code used or expired), `access_denied`,
    `provider_unavailable`, `provider_error`, `no_refresh_token`, `no_email`."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class TokenSet:
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_at: datetime
    claims: dict[str, Any] = field(default_factory=dict)


def id_token_claims(id_token: str | None, client_id: str) -> dict[str, Any]:
    """The claims of an ID token received straight from the token endpoint.

    The token came over a TLS connection the client opened to the provider's token endpoint,
    so, as OpenID Connect Core 3.1.3.7 allows, TLS stands for the signature; the audience is
    still checked, so a token issued to another client is ignored.
    """
    if not id_token:
        return {}
    try:
        payload = id_token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return {}
    if not isinstance(claims, dict):
        return {}
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    return claims if client_id in audiences else {}


def address_from_claims(claims: dict[str, Any]) -> str | None:
    """The mailbox address: `email`, else Microsoft's `preferred_username` when it is one."""
    for name in ("email", "preferred_username", "upn"):
        value = claims.get(name)
        if isinstance(value, str) and "@" in value and len(value) <= 320:
            return value.strip().lower()
    return None


class OAuthClient:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def _client(self, provider: Provider) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=provider.client_id,
            client_secret=provider.client_secret,
            # Both Google and Microsoft accept the secret in the form body.
            token_endpoint_auth_method="client_secret_post",  # noqa: S106  # a method name
            scope=provider.scope,
            redirect_uri=provider.redirect_uri,
            code_challenge_method="S256",
            timeout=self.timeout,
        )

    def authorization_url(self, provider: Provider, state: str, code_verifier: str) -> str:
        client = self._client(provider)
        url, _ = client.create_authorization_url(
            provider.authorize_url,
            state=state,
            code_verifier=code_verifier,
            **provider.authorize_params,
        )
        return str(url)

    async def exchange(self, provider: Provider, code: str, code_verifier: str) -> TokenSet:
        async with self._client(provider) as client:
            token = await self._call(
                client.fetch_token(
                    provider.token_url,
                    grant_type="authorization_code",
                    code=code,
                    code_verifier=code_verifier,
                )
            )
        return self._token_set(provider, token, refresh_token=None)

    async def refresh(self, provider: Provider, refresh_token: str) -> TokenSet:
        async with self._client(provider) as client:
            token = await self._call(
                client.refresh_token(provider.token_url, refresh_token=refresh_token)
            )
        # Google keeps the refresh token; Microsoft may rotate it and answers the new one.
        return self._token_set(provider, token, refresh_token=refresh_token)

    async def userinfo_address(self, provider: Provider, access_token: str) -> str | None:
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.get(
                    provider.userinfo_url, headers={"Authorization": f"Bearer {access_token}"}
                )
        except httpx.HTTPError as exc:
            raise OAuthFailure("provider_unavailable", type(exc).__name__) from None
        if response.status_code != 200:
            return None
        try:
            body = response.json()
        except ValueError:
            return None
        return address_from_claims(body) if isinstance(body, dict) else None

    async def _call(self, pending: Any) -> dict[str, Any]:
        try:
            token: dict[str, Any] = await pending
        except OAuthError as exc:
            # `from None`: the exception chain would carry the request, which holds secrets.
            raise OAuthFailure(str(exc.error or "provider_error"), "the provider refused") from None
        except httpx.HTTPStatusError as exc:
            raise OAuthFailure(
                "provider_unavailable", f"the provider answered {exc.response.status_code}"
            ) from None
        except httpx.HTTPError as exc:
            raise OAuthFailure("provider_unavailable", type(exc).__name__) from None
        return token

    def _token_set(
        self, provider: Provider, token: dict[str, Any], *, refresh_token: str | None
    ) -> TokenSet:
        access = token.get("access_token")
        if not isinstance(access, str) or not access:
            raise OAuthFailure("provider_error", "no access token in the answer")
        try:
            expires_in = int(token.get("expires_in") or DEFAULT_EXPIRES_IN)
        except (TypeError, ValueError):
            expires_in = DEFAULT_EXPIRES_IN
        new_refresh = token.get("refresh_token")
        return TokenSet(
            access_token=access,
            refresh_token=new_refresh if isinstance(new_refresh, str) else refresh_token,
            expires_at=utcnow() + timedelta(seconds=max(expires_in, 0)),
            claims=id_token_claims(token.get("id_token"), provider.client_id),
        )
