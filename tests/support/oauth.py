"""A real OAuth 2.0 authorization server for tests, and an SMTP server that accepts XOAUTH2 only.

The authorization server is a small FastAPI app served by uvicorn over HTTPS (a trustme
certificate) on loopback, with one set of endpoints per provider name (`/google/...`,
`/microsoft/...`): authorize (code flow, PKCE S256 required, registered redirect URI only),
token (authorization_code with the verifier, refresh_token), userinfo and the JWKS of the key
that signs its ID tokens. The "microsoft" flavour answers a signed ID token naming the address
and rotates refresh tokens; the "google" flavour has no ID token, so the address comes from
userinfo. A test can revoke a grant, expire access tokens, decline the next consent, slow the
token endpoint down, have the next ID token forged, and count refreshes. The SMTP side checks
each XOAUTH2 token against this server, answering a refused token as Gmail does: a 334
challenge with a JSON 401, then 535.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

import uvicorn
from aiosmtpd.smtp import SMTP as SMTPProtocol
from aiosmtpd.smtp import AuthResult
from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey

from tests.support.smtp import Certificates, Recorder, free_port

CLIENT_ID = "abl-test-client"
CLIENT_SECRET = "abl-test-client-secret"  # a test fixture, not a secret
ACCESS_TOKEN_SECONDS = 3600
# A Microsoft directory id: the "microsoft" flavour's issuer names it, as Entra's do.
DIRECTORY_ID = "9188040d-6c67-4c5b-b112-36a304b66dad"
# How the next ID token is spoiled (`AuthorizationServer.forge_next`).
FORGERIES = ("unsigned", "foreign_key", "wrong_issuer", "wrong_audience", "expired", "hmac")


def _signing_key(kid: str) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"})


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass
class PendingCode:
    user: str
    provider: str
    redirect_uri: str
    challenge: str
    scope: str
    expires: float
    used: bool = False


@dataclass
class Grant:
    user: str
    provider: str
    refresh_token: str
    revoked: bool = False


@dataclass
class IssuedToken:
    grant: Grant
    expires: float


@dataclass
class AuthorizationServer:
    redirect_uri: str  # the only redirect URI registered for the client
    base_url: str = ""
    next_user: str = "o1@example.com"
    decline_next: bool = False
    codes: dict[str, PendingCode] = field(default_factory=dict)
    grants: dict[str, Grant] = field(default_factory=dict)  # by refresh token
    tokens: dict[str, IssuedToken] = field(default_factory=dict)
    refreshes: Counter[str] = field(default_factory=Counter)  # by user
    issued_refresh_tokens: list[str] = field(default_factory=list)
    refresh_delay: float = 0.0  # seconds the token endpoint takes to answer a refresh
    forge_next: str | None = None  # one of FORGERIES: the next ID token is spoiled that way
    key: RSAKey = field(default_factory=lambda: _signing_key("abl-test-1"))
    jwks_fetches: int = 0
    tokeninfo_calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    # The test's controls.
    def revoke(self, user: str) -> None:
        with self.lock:
            for grant in self.grants.values():
                if grant.user == user:
                    grant.revoked = True

    def expire_tokens(self, user: str | None = None) -> None:
        with self.lock:
            for token in self.tokens.values():
                if user is None or token.grant.user == user:
                    token.expires = 0.0

    def token_valid(self, user: str, token: str) -> bool:
        with self.lock:
            issued = self.tokens.get(token)
            return (
                issued is not None
                and issued.grant.user == user
                and not issued.grant.revoked
                and issued.expires > time.time()
            )

    def provider_settings(self, provider: str, smtp_port: int) -> dict[str, Any]:
        """The ABL_OAUTH_<PROVIDER>_* settings that point the registry at this server."""
        return {
            f"oauth_{provider}_client_id": CLIENT_ID,
            f"oauth_{provider}_client_secret": CLIENT_SECRET,
            f"oauth_{provider}_authorize_url": f"{self.base_url}/{provider}/authorize",
            f"oauth_{provider}_token_url": f"{self.base_url}/{provider}/token",
            f"oauth_{provider}_userinfo_url": f"{self.base_url}/{provider}/userinfo",
            f"oauth_{provider}_jwks_url": f"{self.base_url}/{provider}/jwks",
            f"oauth_{provider}_issuer": self.issuer(provider),
            f"oauth_{provider}_smtp_host": "localhost",
            f"oauth_{provider}_smtp_port": smtp_port,
        }

    def rotate_key(self) -> None:
        """A new signing key under a new key id; only the new one is published."""
        with self.lock:
            self.key = _signing_key(f"abl-test-{secrets.token_hex(4)}")

    def issuer(self, provider: str) -> str:
        # Microsoft's issuer names the directory, which the client takes from the `tid` claim.
        tenant = "{tenantid}" if provider == "microsoft" else "common"
        return f"{self.base_url}/{provider}/{tenant}/v2.0"

    def id_token(self, user: str, provider: str) -> str:
        """An ID token for `user`, signed with the published key, unless `forge_next` says
        how to spoil this one."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer(provider).replace("{tenantid}", DIRECTORY_ID),
            "aud": CLIENT_ID,
            "sub": hashlib.sha256(user.encode()).hexdigest(),
            "tid": DIRECTORY_ID,
            "iat": now,
            "exp": now + 3600,
            "preferred_username": user,
        }
        header = {"alg": "RS256", "kid": self.key.kid, "typ": "JWT"}
        key = self.key
        forgery, self.forge_next = self.forge_next, None
        if forgery == "unsigned":
            return f"{_part({'alg': 'none', 'typ': 'JWT'})}.{_part(claims)}."
        if forgery == "hmac":
            # The public key's modulus as an HMAC secret: the classic algorithm confusion.
            secret = OctKey.import_key(str(self.key.as_dict(private=False)["n"]).encode())
            return jwt.encode({"alg": "HS256"}, claims, secret, algorithms=["HS256"])
        if forgery == "foreign_key":
            key = _signing_key(self.key.kid or "abl-test-1")  # same key id, another key
        elif forgery == "wrong_issuer":
            claims["iss"] = "https://login.evil.test/v2.0"
        elif forgery == "wrong_audience":
            claims["aud"] = "another-client"
        elif forgery == "expired":
            claims["iat"], claims["exp"] = now - 7200, now - 3600
        return jwt.encode(header, claims, key)

    def _issue(self, grant: Grant) -> str:
        access = "at-" + secrets.token_urlsafe(24)
        self.tokens[access] = IssuedToken(grant, time.time() + ACCESS_TOKEN_SECONDS)
        return access

    def _new_grant(self, user: str, provider: str) -> Grant:
        refresh = "rt-" + secrets.token_urlsafe(32)
        grant = Grant(user, provider, refresh)
        self.grants[refresh] = grant
        self.issued_refresh_tokens.append(refresh)
        return grant

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/{provider}/authorize")
        async def authorize(provider: str, request: Request) -> Response:
            query = request.query_params
            if query.get("client_id") != CLIENT_ID:
                return PlainTextResponse("unknown client", status_code=400)
            redirect_uri = query.get("redirect_uri", "")
            if redirect_uri != self.redirect_uri:
                # As the real providers do: an unregistered redirect URI gets an error page,
                # never a redirect (the code would go to whoever named that URI).
                return PlainTextResponse("redirect_uri_mismatch", status_code=400)
            state = query.get("state", "")

            def back(**params: str) -> Response:
                return RedirectResponse(
                    f"{redirect_uri}?{urlencode(params | {'state': state})}", status_code=302
                )

            if query.get("response_type") != "code":
                return back(error="unsupported_response_type")
            if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
                return back(error="invalid_request")  # PKCE is required
            with self.lock:
                if self.decline_next:
                    self.decline_next = False
                    return back(error="access_denied")
                code = "code-" + secrets.token_urlsafe(16)
                self.codes[code] = PendingCode(
                    user=query.get("login_hint") or self.next_user,
                    provider=provider,
                    redirect_uri=redirect_uri,
                    challenge=query["code_challenge"],
                    scope=query.get("scope", ""),
                    expires=time.time() + 60,
                )
            return back(code=code)

        @app.post("/{provider}/token")
        async def token(provider: str, request: Request) -> Response:
            # The form by hand: python-multipart is not a dependency of the project.
            form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
            grant_type = form.get("grant_type", "")
            client_id = form.get("client_id", "")
            client_secret = form.get("client_secret", "")
            code = form.get("code", "")
            code_verifier = form.get("code_verifier", "")
            redirect_uri = form.get("redirect_uri", "")
            refresh_token = form.get("refresh_token", "")
            authorization = request.headers.get("authorization", "")
            if authorization.startswith("Basic "):
                client_id, _, client_secret = (
                    base64.b64decode(authorization[6:]).decode().partition(":")
                )
            if (client_id, client_secret) != (CLIENT_ID, CLIENT_SECRET):
                return JSONResponse({"error": "invalid_client"}, status_code=401)
            if grant_type == "refresh_token" and self.refresh_delay:
                # A slow provider: the window in which concurrent refreshes would collide.
                await asyncio.sleep(self.refresh_delay)
            with self.lock:
                if grant_type == "authorization_code":
                    pending = self.codes.get(code)
                    if (
                        pending is None
                        or pending.used
                        or pending.expires < time.time()
                        or pending.provider != provider
                        or pending.redirect_uri != redirect_uri
                        or not code_verifier
                        or s256(code_verifier) != pending.challenge
                    ):
                        return JSONResponse({"error": "invalid_grant"}, status_code=400)
                    pending.used = True
                    grant = self._new_grant(pending.user, provider)
                    answer: dict[str, Any] = {"refresh_token": grant.refresh_token}
                    if provider == "microsoft":
                        answer["id_token"] = self.id_token(pending.user, provider)
                elif grant_type == "refresh_token":
                    found = self.grants.get(refresh_token)
                    if found is None or found.revoked or found.provider != provider:
                        return JSONResponse({"error": "invalid_grant"}, status_code=400)
                    grant = found
                    self.refreshes[grant.user] += 1
                    answer = {}
                    if provider == "microsoft":
                        # Microsoft rotates refresh tokens; the old one stays valid here.
                        rotated = "rt-" + secrets.token_urlsafe(32)
                        self.grants[rotated] = grant
                        self.issued_refresh_tokens.append(rotated)
                        answer["refresh_token"] = rotated
                else:
                    return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
                answer |= {
                    "access_token": self._issue(grant),
                    "token_type": "Bearer",
                    "expires_in": ACCESS_TOKEN_SECONDS,
                }
            return JSONResponse(answer, headers={"Cache-Control": "no-store"})

        @app.get("/{provider}/jwks")
        async def jwks(provider: str) -> Response:
            with self.lock:
                self.jwks_fetches += 1
                return JSONResponse({"keys": [self.key.as_dict(private=False)]})

        @app.get("/{provider}/tokeninfo")
        async def tokeninfo(provider: str, access_token: str = "") -> Response:
            # For an IMAP server's oauth2 passdb (Dovecot `tokeninfo_url`): who a token is
            # for, and whether it is still good. A refused token is a 401, as Google's is.
            with self.lock:
                issued = self.tokens.get(access_token)
                self.tokeninfo_calls += 1
            if issued is None or issued.expires < time.time() or issued.grant.revoked:
                return JSONResponse({"error": "invalid_token"}, status_code=401)
            return JSONResponse({"email": issued.grant.user, "active": "true"})

        @app.get("/{provider}/userinfo")
        async def userinfo(provider: str, authorization: Annotated[str, Header()] = "") -> Response:
            token = authorization.removeprefix("Bearer ")
            with self.lock:
                issued = self.tokens.get(token)
            if issued is None or issued.expires < time.time() or issued.grant.revoked:
                return JSONResponse({"error": "invalid_token"}, status_code=401)
            return JSONResponse({"sub": issued.grant.user, "email": issued.grant.user})

        return app


def _part(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@contextmanager
def authorization_server(
    certs: Certificates, tmp: Path, redirect_uri: str
) -> Iterator[AuthorizationServer]:
    """The server on https://localhost:<port>, until the block ends."""
    server = AuthorizationServer(redirect_uri=redirect_uri)
    cert = certs.ca.issue_cert("localhost", "127.0.0.1")
    key_file, cert_file = tmp / "as-key.pem", tmp / "as-cert.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    port = free_port()
    config = uvicorn.Config(
        server.app(),
        host="127.0.0.1",
        port=port,
        ssl_keyfile=str(key_file),
        ssl_certfile=str(cert_file),
        log_level="warning",
        lifespan="off",
    )
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not running.started:
        assert time.monotonic() < deadline, "the authorization server did not start"
        time.sleep(0.02)
    server.base_url = f"https://localhost:{port}"
    try:
        yield server
    finally:
        running.should_exit = True
        thread.join(timeout=10)


class XOAuth2Recorder(Recorder):
    """Accepts SASL XOAUTH2 only, checking each token with the authorization server."""

    def __init__(self, authority: AuthorizationServer, data_delay: float = 0.0) -> None:
        super().__init__(accounts={}, data_delay=data_delay)
        self.authority = authority
        self.refused_tokens = 0

    async def auth_XOAUTH2(self, server: SMTPProtocol, args: list[str]) -> AuthResult:
        if len(args) > 1:
            blob = base64.b64decode(args[1])
        else:
            answer = await server.challenge_auth("")
            if not isinstance(answer, bytes):
                return AuthResult(success=False, handled=True)
            blob = answer
        fields = dict(part.split("=", 1) for part in blob.decode().split("\x01") if "=" in part)
        user = fields.get("user", "")
        token = fields.get("auth", "").removeprefix("Bearer ")
        if self.authority.token_valid(user, token):
            with self.lock:
                self.logins[user] += 1
            return AuthResult(success=True, auth_data=user)
        with self.lock:
            self.refused_tokens += 1
        # Gmail's answer to an expired or revoked token: a JSON error in a 334 challenge, and
        # 535 once the client has answered it with an empty line.
        error = json.dumps({"status": "401", "schemes": "Bearer", "scope": "mail"}).encode()
        await server.challenge_auth(base64.b64encode(error), encode_to_b64=False)
        return AuthResult(
            success=False, handled=False, message="535 5.7.8 Username and Password not accepted"
        )
