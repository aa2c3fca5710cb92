"""The request body limit: 413 problem+json, enforced while the body streams in."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from services.app import create_app as create_all
from shared.settings import Settings
from tests.conftest import Api, make_settings, running
from tests.support.smtp import free_port

CHUNK = 16 * 1024


class Stream:
    """A request body of `chunks` chunks, pulled only as the server reads it."""

    def __init__(self, chunks: int, prefix: bytes = b'{"name": "') -> None:
        self.chunks = chunks
        self.prefix = prefix
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.prefix
        for _ in range(self.chunks):
            self.pulled += 1
            yield b"a" * CHUNK


def assert_413(response: Any, limit: int) -> None:
    assert response.status_code == 413, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "body_too_large"
    assert problem["hint"]
    assert str(limit) in problem["detail"]


def test_the_default_limits() -> None:
    defaults = Settings.model_fields
    assert defaults["max_body_bytes"].default == 64 * 1024
    assert defaults["max_messages_body_bytes"].default == 25 * 1024 * 1024


async def test_a_streamed_body_is_cut_off_at_the_limit(api: Api) -> None:
    # 100 MiB offered; reading stops at the first chunk past 64 KiB.
    body = Stream(chunks=6400)
    response = await api.client.post("/v1/tenants", content=body, headers=api.admin())
    assert_413(response, 64 * 1024)
    assert body.pulled <= 64 * 1024 // CHUNK + 1


async def test_a_declared_length_over_the_limit_is_refused_unread(api: Api) -> None:
    body = Stream(chunks=10)
    response = await api.client.post(
        "/v1/tenants",
        content=body,
        headers=api.admin() | {"content-length": str(10 * CHUNK + 10)},
    )
    assert_413(response, 64 * 1024)
    assert body.pulled == 0


async def test_a_body_under_the_limit_is_read(api: Api) -> None:
    # Just under 64 KiB: too long a name, so a 422, not a 413.
    response = await api.client.post(
        "/v1/tenants", json={"name": "a" * (60 * 1024)}, headers=api.admin()
    )
    assert response.status_code == 422, response.text


async def test_batches_of_emails_have_their_own_limit(sqlite_url: str) -> None:
    limit = 1024 * 1024
    settings = make_settings(sqlite_url, max_messages_body_bytes=limit)
    batch = {
        "messages": [
            {"to": f"lead{i}@example.org", "subject": "Hello", "text": "x" * 4000}
            for i in range(150)
        ]
    }
    payload = json.dumps(batch).encode()
    assert 64 * 1024 < len(payload) < limit
    async with running(settings, combined=True) as api:
        tenant = await api.new_tenant()
        # 600 KB: far over the 64 KiB of other routes, within the limit for batches.
        accepted = await api.client.post(
            "/v1/messages",
            content=payload,
            headers=tenant | {"content-type": "application/json"},
        )
        assert accepted.status_code == 202, accepted.text
        # The same bytes anywhere else are too large.
        elsewhere = await api.client.post(
            "/v1/tenants",
            content=payload,
            headers=api.admin() | {"content-type": "application/json"},
        )
        assert_413(elsewhere, 64 * 1024)
        streamed = Stream(chunks=1000, prefix=b'{"messages": [')
        refused = await api.client.post(
            "/v1/messages", content=streamed, headers=tenant | {"content-type": "application/json"}
        )
        assert_413(refused, limit)
        assert streamed.pulled <= limit // CHUNK + 1
        listing = await api.client.get("/v1/messages", params={"limit": 500}, headers=tenant)
        assert len(listing.json()["items"]) == 150


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[int]:
    """The one-process app behind a real uvicorn on a free port."""
    port = free_port()
    app = create_all(settings, run_loops=False)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.05)
        assert server.started
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


async def test_a_chunked_upload_over_a_real_socket_gets_413_before_it_ends(
    sqlite_url: str,
) -> None:
    settings = make_settings(sqlite_url)
    async with served(settings) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        token = settings.admin_token.get_secret_value()
        writer.write(
            b"POST /v1/tenants HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {token}\r\n".encode()
            + b"Transfer-Encoding: chunked\r\n\r\n"
        )
        sent = 0
        response = b""
        # Up to 10 MiB offered, one 16 KiB chunk at a time; the answer must come long before.
        while sent < 10 * 1024 * 1024:
            chunk = b"a" * CHUNK
            try:
                writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                await writer.drain()
            except ConnectionError:
                break
            sent += len(chunk)
            with contextlib.suppress(TimeoutError):
                response += await asyncio.wait_for(reader.read(65536), 0.01)
            if b"\r\n\r\n" in response:
                break
        with contextlib.suppress(TimeoutError):
            response += await asyncio.wait_for(reader.read(65536), 2)
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"application/problem+json" in head
    assert b"body_too_large" in body
    assert sent < 1024 * 1024, sent


@pytest.mark.parametrize("path", ["/v1/servers", "/v1/sending-profile"])
async def test_every_route_is_bounded(sqlite_url: str, path: str) -> None:
    async with running(make_settings(sqlite_url), combined=True) as api:
        tenant = await api.new_tenant()
        body = Stream(chunks=1000)
        response = await api.client.request(
            "PUT" if path.endswith("profile") else "POST", path, content=body, headers=tenant
        )
        assert_413(response, 64 * 1024)
