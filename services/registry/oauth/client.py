"""The OAuth 2.0 client side, with authlib's httpx client: the authorization URL (code flow with
PKCE S256), the code exchange, the refresh, and the account's address. An ID token is trusted
only once its signature checks against the provider's published keys (JWKS, with joserfc) and
its issuer, audience and lifetime hold.

Every failure becomes an `OAuthFailure` with a short code; no token, code or verifier is ever
put in its message.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import authlib.deprecate  # noqa: F401  # imported first: see the comment below
import httpx
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

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
# Google and Microsoft sign ID tokens with RS256; `none` and the HMAC family are never accepted
# (an HMAC "signature" keyed with a public key is the classic forgery).
ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "PS256"]
# Clock skew allowed on `exp`, `iat` and `nbf`.
ID_TOKEN_LEEWAY_SECONDS = 120
# A provider's signing keys are fetched again after this, or at once for an unknown key id
# (the provider rotated its keys), at most once a minute.
JWKS_MAX_AGE_SECONDS = 3600.0
JWKS_MIN_REFETCH_SECONDS = 60.0
_TENANT_ID = re.compile(r"^[0-9a-fA-F-]{36}$")


class OAuthFailure(Exception):
    """The provider refused or could not answer. `code` is what the callback or the registry
    reports: `invalid_grant` (consent revoked, code used or expired), `access_denied`,
    `provider_unavailable`, `provider_error`, `no_refresh_token`, `no_email`,
    `invalid_id_token` (an ID token whose signature, issuer, audience or lifetime is wrong)."""

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


def address_from_claims(claims: dict[str, Any]) -> str | None:
    """The mailbox address: `email`, else Microsoft's `preferred_username` when it is one."""
    for name in ("email", "preferred_username", "upn"):
        value = claims.get(name)
        if isinstance(value, str) and "@" in value and len(value) <= 320:
            return value.strip().lower()
    return None


def expected_issuers(provider: Provider, claims: dict[str, Any]) -> list[str]:
    """The issuers the provider's ID tokens may name; for Microsoft's multi-tenant endpoint,
    the one of the token's own directory (`tid`), as Microsoft's validation guidance says."""
    issuers = [provider.issuer, *provider.issuer_aliases]
    if "{tenantid}" not in provider.issuer:
        return issuers
    tenant = claims.get("tid")
    if not isinstance(tenant, str) or not _TENANT_ID.match(tenant):
        return []
    return [issuer.replace("{tenantid}", tenant) for issuer in issuers]


@dataclass
class _Keys:
    keys: KeySet
    fetched: float


class OAuthClient:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.jwks: dict[str, _Keys] = {}  # by JWKS URL

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
        tokens = self._token_set(token, refresh_token=None)
        id_token = token.get("id_token")
        if not id_token:
            return tokens  # the address then comes from the user-info endpoint
        if not isinstance(id_token, str):
            raise OAuthFailure("invalid_id_token", "the ID token is not a string")
        return replace(tokens, claims=await self.id_token_claims(provider, id_token))

    async def id_token_claims(self, provider: Provider, id_token: str) -> dict[str, Any]:
        """The claims of an ID token whose signature (by one of the provider's published keys),
        issuer, audience and lifetime hold; OAuthFailure(`invalid_id_token`) otherwise."""
        try:
            keys = await self._signing_keys(provider, id_token)
            decoded = jwt.decode(id_token, keys, algorithms=ID_TOKEN_ALGORITHMS)
            claims = dict(decoded.claims)
            issuers = expected_issuers(provider, claims)
            if not issuers:
                raise OAuthFailure("invalid_id_token", "the ID token names no directory")
            jwt.JWTClaimsRegistry(
                leeway=ID_TOKEN_LEEWAY_SECONDS,
                iss={"essential": True, "values": issuers},
                aud={"essential": True, "value": provider.client_id},
                exp={"essential": True},
                iat={"essential": True},
            ).validate(claims)
        except JoseError as exc:
            # The error's name says which check failed; the token itself is never logged.
            raise OAuthFailure("invalid_id_token", type(exc).__name__) from None
        except ValueError:
            raise OAuthFailure("invalid_id_token", "the ID token cannot be read") from None
        return claims

    async def _signing_keys(self, provider: Provider, id_token: str) -> KeySet:
        cached = self.jwks.get(provider.jwks_url)
        age = time.monotonic() - cached.fetched if cached is not None else None
        if cached is not None and age is not None and age < JWKS_MAX_AGE_SECONDS:
            kid = jws.extract_compact(id_token.encode()).protected.get("kid")
            known = kid is None or any(key.kid == kid for key in cached.keys.keys)
            if known or age < JWKS_MIN_REFETCH_SECONDS:
                return cached.keys
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.get(provider.jwks_url)
            response.raise_for_status()
            keys = KeySet.import_key_set(response.json())
        except httpx.HTTPError as exc:
            raise OAuthFailure("provider_unavailable", f"JWKS: {type(exc).__name__}") from None
        except (ValueError, TypeError, KeyError, JoseError):
            raise OAuthFailure("provider_error", "the provider's JWKS cannot be read") from None
        self.jwks[provider.jwks_url] = _Keys(keys, time.monotonic())
        return keys

    async def refresh(self, provider: Provider, refresh_token: str) -> TokenSet:
        async with self._client(provider) as client:
            token = await self._call(
                client.refresh_token(provider.token_url, refresh_token=refresh_token)
            )
        # Google keeps the refresh token; Microsoft may rotate it and answers the new one.
        return self._token_set(token, refresh_token=refresh_token)

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

    def _token_set(self, token: dict[str, Any], *, refresh_token: str | None) -> TokenSet:
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
        )
