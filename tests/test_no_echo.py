"""No error repeats the caller's input, and the access log holds no secret from a query string."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import httpx
import pytest
import uvicorn

from services.app import create_app as create_all
from services.cli import server_config
from shared import addresses
from shared.logs import redact_path
from tests.conftest import Api, make_settings, running
from tests.support.smtp import free_port

CANARY = "Zq9canary"


def bad_requests(server_id: str) -> list[tuple[str, str, Any]]:
    """Invalid requests, each carrying the canary where a careless error would repeat it."""
    c = CANARY
    return [
        ("POST", "/v1/servers", {"host": f"{c}@127.0.0.1", "port": 587, "username": c}),
        ("POST", "/v1/servers", {"host": "h.example", "port": c, "security": c, "username": c}),
        ("POST", "/v1/servers", {"preset": c, "username": "u", "password": c, "from_email": c}),
        ("POST", "/v1/servers", {"from_email": f"{c}@", "label": "x" * 101 + c}),
        ("PATCH", f"/v1/servers/{server_id}", {"from_email": f"{c}<>@example.com"}),
        ("PATCH", f"/v1/servers/{server_id}", {"daily_cap": c, "security": c}),
        ("GET", f"/v1/servers/{c}", None),
        ("GET", f"/v1/servers/{c}-{c}", None),
        ("GET", f"/v1/servers?limit={c}&cursor={c}", None),
        ("GET", f"/v1/messages?status={c}&server_id={c}", None),
        ("GET", f"/v1/messages?cursor={c}", None),
        ("POST", "/v1/messages", {"to": f"{c}@", "subject": c, "text": "x"}),
        ("POST", "/v1/messages", {"to": f"{c}\u00e9@example.org", "subject": "s", "text": "x"}),
        ("POST", "/v1/messages", {"to": "a@example.org", "subject": "s", "headers": {c: "v"}}),
        (
            "POST",
            "/v1/messages",
            {"to": "a@example.org", "subject": "s", "text": "x", "headers": {f"{c}:": "v"}},
        ),
        (
            "POST",
            "/v1/messages",
            {"to": "a@example.org", "subject": "s", "text": "x", "headers": {c: 5}},
        ),
        (
            "POST",
            "/v1/messages",
            {"to": "a@example.org", "subject": "s", "text": "x", "headers": {"Bcc": c}},
        ),
        ("POST", "/v1/messages", {"messages": [{"to": c, "subject": f"{c}\r\n"}]}),
        ("PUT", "/v1/sending-profile", {"time_zone": c, "start_hour": c}),
        ("GET", f"/v1/capacity?monthly_emails={c}", None),
        ("POST", f"/v1/messages/{c}/cancel", None),
    ]


async def test_no_error_repeats_the_input(api_all: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_such_name(host: str, port: int) -> list[addresses.IPAddress]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(addresses, "resolve", no_such_name)
    tenant = await api_all.new_tenant()
    checked = 0
    # The host that does not resolve: dns_failed, without the host.
    body = {
        "host": f"{CANARY.lower()}.example.com",
        "port": 587,
        "security": "starttls",
        "username": "a@example.com",
        "password": "p",
        "from_email": "a@example.com",
    }
    response = await api_all.client.post("/v1/servers", json=body, headers=tenant)
    assert response.json()["code"] == "dns_failed", response.text
    assert CANARY.lower() not in response.text.lower()
    checked += 1
    for method, url, payload in bad_requests("01900000-0000-7000-8000-000000000000"):
        response = await api_all.client.request(method, url, json=payload, headers=tenant)
        assert 400 <= response.status_code < 500, (method, url, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert CANARY.lower() not in response.text.lower(), (method, url, response.text)
        checked += 1
    assert checked == 1 + len(bad_requests(""))


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/v1/servers?api_key=abl_SECRET&limit=5", "/v1/servers?api_key=[redacted]&limit=5"),
        ("/x?token=S1&access_token=S2&Password=S3", "/x?token=[redacted]&access_token=[redacted]"),
        ("/x?client_secret=S&ok=1", "/x?client_secret=[redacted]&ok=1"),
        ("/x?apikey=S", "/x?apikey=[redacted]"),
        ("/x?limit=5", "/x?limit=5"),
        ("/x", "/x"),
    ],
)
def test_secret_query_values_are_redacted(path: str, logged: str) -> None:
    assert redact_path(path).startswith(logged)
    assert "S1" not in redact_path(path)
    assert "SECRET" not in redact_path(path)


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_the_access_log_of_a_real_server_holds_no_query_secret(sqlite_url: str) -> None:
    port = free_port()
    settings = make_settings(sqlite_url, port=port)
    # The same configuration `abl serve` runs with: uvicorn's logging, then the redaction.
    config = server_config(create_all(settings, run_loops=False), settings)
    config.lifespan = "on"
    capture = Capture()
    logging.getLogger("uvicorn.access").addHandler(capture)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await client.get(
                "/v1/servers",
                params={
                    "api_key": "abl_LEAK1",
                    "token": "LEAK2",
                    "password": "LEAK3",
                    "secret": "LEAK4",
                    "limit": "5",
                },
            )
            # Probes and service-to-service calls stay out of the log at INFO.
            await client.get("/healthz")
            await client.post("/internal/v1/jobs/sendable", json={"jobs": []})
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        logging.getLogger("uvicorn.access").removeHandler(capture)
    [line] = [line for line in capture.lines if "/v1/servers" in line]
    assert "LEAK" not in line
    assert [line for line in capture.lines if "/internal/" in line or "/healthz" in line] == []
    assert "api_key=[redacted]" in line
    assert "limit=5" in line


@pytest.fixture
async def api_all(settings: Any) -> Any:
    async with running(settings, combined=True) as api:
        yield api
