"""Schemathesis with every check, positive and negative data, and stateful sequences, against the
one-process app on a real SQLite database whose server checks reach real aiosmtpd servers.

Any finding fails the test: a 5xx, a response that breaks its schema, an undocumented status or
media type, a schema-valid request refused (other than the statuses a valid request may get:
401, 404, 409, 429) or a schema-invalid request accepted. Examples are bounded so the whole run
stays under a minute on a shared machine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis.config import SchemathesisConfig

from services.app import create_app
from services.openapi import SPEC_DIR
from services.registry.domain import CheckOutcome, Security
from services.registry.verifier import Target, Verifier
from shared.migrate import upgrade_database
from shared.settings import Settings
from tests.conftest import make_settings
from tests.support.smtp import Certificates, SmtpTestServer, smtp_server

MAX_EXAMPLES = 25


class RedirectingVerifier(Verifier):
    """The product's check, dialling the test SMTP servers whatever host and port a request
    names: generated hosts are schema-valid names that resolve nowhere, and a schema-valid
    server must be stored (201), which needs a server that answers. Only the address changes;
    TLS, the certificate check against SSL_CERT_FILE and AUTH are the product's own."""

    def __init__(self, settings: Settings, servers: dict[Security, SmtpTestServer]) -> None:
        super().__init__(settings)
        self.servers = servers

    async def check(self, target: Target) -> CheckOutcome:
        server = self.servers[target.security]
        return await super().check(dataclasses.replace(target, host=server.host, port=server.port))


def fuzz_config() -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "seed": 15,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": True, "max-steps": 10},
            },
            "checks": {
                "enabled": True,
                # Refusing a body past its size limit (413) is refusing it.
                "negative_data_rejection": {
                    "expected-statuses": [
                        "400",
                        "401",
                        "403",
                        "404",
                        "405",
                        "406",
                        "409",
                        "413",
                        "415",
                        "422",
                        "428",
                        "429",
                        "5xx",
                    ]
                },
            },
            "operations": [
                {
                    # The coverage phase enumerates every one of the 598 time zones with each
                    # of the 25 orders of hours: 15,000 requests, minutes. Fuzzing, positive
                    # and negative, still draws zones and hours for it.
                    "include-path": "/v1/sending-profile",
                    "include-method": "PUT",
                    "phases": {"coverage": {"enabled": False}},
                },
                {
                    # The SMTP check reaches the test servers whatever host a request names;
                    # the IMAP check of an `imap` object does not (no mailbox server runs
                    # here), so a schema-valid `imap` gets 422 imap_* (documented on the
                    # operations). tests/test_mailbox_access.py checks IMAP on real Dovecot.
                    "include-path-regex": "^/v1/servers(/\\{server_id\\})?$",
                    "include-method-regex": "^(POST|PATCH)$",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", "401", "404", "409", "422", "429"]
                        }
                    },
                },
                {
                    # A webhook URL is stored only once its host resolves to an address the
                    # rules allow: generated host names resolve nowhere, so a schema-valid
                    # request gets 422 dns_failed here (documented on the operations).
                    "include-path-regex": "^/v1/webhooks",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", "401", "404", "409", "422", "429"]
                        }
                    },
                },
            ],
        }
    )


@pytest.fixture(scope="module")
def fuzzed_app(
    tmp_path_factory: pytest.TempPathFactory, certs: Certificates
) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    url = f"sqlite:///{tmp / 'abl.db'}"
    upgrade_database(url)
    # A budget of checks no run reaches: schemathesis waits out a 429's Retry-After.
    settings = make_settings(
        url, allow_private_hosts=True, verify_timeout_seconds=3.0, verify_burst=100_000
    )
    # Any login passes: generated usernames and passwords are schema-valid, so each is accepted.
    with (
        smtp_server(certs, {}, security="starttls", accept_any=True) as starttls,
        smtp_server(certs, {}, security="tls", accept_any=True) as tls,
    ):
        # Its transport sends each request from an event loop of its own: no background task
        # may hold the app's connections meanwhile.
        app = create_app(settings, run_loops=False, follow_registry=False)
        with TestClient(app) as client:
            app.state.verifier = RedirectingVerifier(
                settings, {Security.starttls: starttls, Security.tls: tls}
            )
            APP.app = app
            yield client
            APP.app = None


@pytest.fixture(scope="module")
def credentials(fuzzed_app: TestClient) -> dict[str, dict[str, str]]:
    settings = fuzzed_app.app.state.settings  # type: ignore[attr-defined]
    admin = {"Authorization": f"Bearer {settings.admin_token.get_secret_value()}"}
    response = fuzzed_app.post("/v1/tenants", json={"name": "fuzz"}, headers=admin)
    assert response.status_code == 201, response.text
    return {"admin": admin, "tenant": {"Authorization": f"Bearer {response.json()['api_key']}"}}


class AppUnderTest:
    """The app the module fixture started (database, verifier), for schemathesis's ASGI
    transport; the schema is loaded at import, before any fixture exists. The transport runs a
    lifespan around every request: answered here, or each request would open the database
    again and put the product's verifier back."""

    app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert self.app is not None, "the fuzzed_app fixture has not started the app"
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await self.app(scope, receive, send)


APP = AppUnderTest()
# The committed spec, which test_openapi keeps equal to the app's: what a client is given.
schema = schemathesis.openapi.from_path(SPEC_DIR / "api.json", config=fuzz_config())
schema.app = APP


@schema.parametrize()
def test_the_api_keeps_its_contract(
    case: schemathesis.Case[Any],
    fuzzed_app: TestClient,
    credentials: dict[str, dict[str, str]],
) -> None:
    role = "admin" if case.path == "/v1/tenants" else "tenant"
    case.call_and_validate(headers=credentials[role])


def test_stateful_sequences_keep_the_contract(
    fuzzed_app: TestClient, credentials: dict[str, dict[str, str]]
) -> None:
    """Sequences linked by the ids the responses return (a server added, then read, changed,
    paused, verified, deleted; an email queued, then read and canceled), every check on each
    step. The links are inferred from the spec by schemathesis."""
    machine = schema.as_state_machine()
    assert machine.bundles, "schemathesis inferred no links between operations"

    admin = credentials["admin"]

    class TenantSequences(machine):  # type: ignore[misc,valid-type]
        """Each sequence as a tenant of its own: what one sequence stored is invisible to the
        next, so a sequence's answers depend on its own steps only, as hypothesis needs."""

        def setup(self) -> None:
            created = fuzzed_app.post("/v1/tenants", json={"name": "sequence"}, headers=admin)
            assert created.status_code == 201, created.text
            self.tenant = {"Authorization": f"Bearer {created.json()['api_key']}"}

        def get_call_kwargs(self, case: schemathesis.Case[Any]) -> dict[str, Any]:
            return {"headers": admin if case.path == "/v1/tenants" else self.tenant}

    TenantSequences.run(
        settings=hypothesis.settings(
            max_examples=MAX_EXAMPLES,
            stateful_step_count=10,
            # No shrinking or replay: the database keeps what earlier steps did, so a replayed
            # sequence meets another state and hypothesis reports its own flakiness instead of
            # the finding.
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            deadline=None,
            database=None,
            # The same sequences on every run, so CI's verdict does not depend on the draw.
            derandomize=True,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
    )
