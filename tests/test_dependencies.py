"""The lock file holds what the code imports at run time.

A module missing from the lock does not always fail loudly: httpcore looks `sniffio` up inside
every request and carries on when it is absent, paying a search of the whole import path each
time (about 12 % of a sender's CPU before it was pinned).
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from importlib.machinery import ModuleSpec
from types import ModuleType

import httpx
import pytest

import services
import shared


class FailedImports:
    """A last finder on sys.meta_path: it is asked only when every real finder said no."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(
        self, name: str, path: object = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        self.names.append(name)
        return None


@pytest.fixture
def failed_imports() -> Iterator[FailedImports]:
    recorder = FailedImports()
    sys.meta_path.append(recorder)
    try:
        yield recorder
    finally:
        sys.meta_path.remove(recorder)


def test_installed_packages_satisfy_each_others_requirements() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_module_of_the_services_imports() -> None:
    for package in (shared, services):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if "migrations" in module.name:
                continue  # alembic scripts, run by alembic with its context
            importlib.import_module(module.name)


async def test_an_http_request_attempts_no_import_that_fails(
    failed_imports: FailedImports,
) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/")).text == "ok"  # first use: optional imports settle
        failed_imports.names.clear()
        for _ in range(3):
            assert (await client.get("/")).text == "ok"
    assert failed_imports.names == [], "looked up on every request and not installed"
