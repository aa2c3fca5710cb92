"""Files the product creates that hold data or secrets are its owner's alone: the SQLite
database (and its WAL files) 0600, `.abl/dev.env` 0600 in a 0700 `.abl/`."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.cli import ensure_dev_env
from shared.migrate import private_sqlite_file, upgrade_database
from tests.conftest import make_settings, running
from tests.support.processes import ROOT
from tests.support.smtp import free_port


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    # The usual umask (022) would create files 0644: the code must not rely on a strict one.
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def test_dev_env_is_0600_in_a_0700_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ensure_dev_env loads the secrets it writes into the environment: a copy of it here, so
    # that no later test's settings read them.
    monkeypatch.setattr(
        os,
        "environ",
        {name: value for name, value in os.environ.items() if not name.startswith("ABL_")},
    )
    path = ensure_dev_env(tmp_path / ".abl" / "dev.env")
    assert mode(path.parent) == 0o700
    assert mode(path) == 0o600
    assert "ABL_ADMIN_TOKEN=" in path.read_text()


def test_an_existing_open_abl_folder_is_narrowed(tmp_path: Path) -> None:
    folder = tmp_path / ".abl"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    path = ensure_dev_env(folder / "dev.env", wanted=[])
    assert (mode(folder), mode(path)) == (0o700, 0o600)


@pytest.fixture
def fresh_database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'data' / 'abl.db'}"
    upgrade_database(url)
    return url


async def test_the_sqlite_database_and_its_wal_files_are_0600(
    tmp_path: Path, fresh_database: str
) -> None:
    url = fresh_database
    async with running(make_settings(url)) as api:
        await api.new_tenant()  # a write: the WAL and shared-memory files exist now
        files = sorted((tmp_path / "data").glob("abl.db*"))
        assert {f.name for f in files} >= {"abl.db", "abl.db-wal", "abl.db-shm"}
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}


def test_an_existing_world_readable_database_is_narrowed(tmp_path: Path) -> None:
    path = tmp_path / "abl.db"
    path.write_bytes(b"")
    path.chmod(0o644)
    assert private_sqlite_file(f"sqlite:///{path}") == path
    assert mode(path) == 0o600
    assert private_sqlite_file("postgresql://u@h/db") is None
    assert private_sqlite_file("sqlite://") is None


def test_make_run_creates_every_file_private(tmp_path: Path) -> None:
    """`abl serve` in development, in a fresh folder, as `make run` starts it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABL_")}
    env |= {"ABL_ENV": "development", "ABL_PORT": str(port), "PYTHONPATH": str(ROOT)}
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve"],
        cwd=tmp_path,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        ready = False
        while not ready and time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            time.sleep(0.2)
        assert ready, log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert mode(tmp_path / ".abl") == 0o700
    assert mode(tmp_path / ".abl" / "dev.env") == 0o600
    databases = sorted(tmp_path.glob("abl.db*"))
    assert databases, log.read_text()
    assert {f.name: mode(f) for f in databases} == {f.name: 0o600 for f in databases}
