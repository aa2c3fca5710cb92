"""Connection checks per second: the registry's verifier against a bare aiosmtplib loop.

Both run the same conversation (connect, EHLO, STARTTLS, EHLO, AUTH, QUIT) against one local
aiosmtpd server with STARTTLS and AUTH, at the same concurrency, in the same process and run.

    .venv/bin/python -m bench.registry_check [--checks 300] [--concurrency 20]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable

import aiosmtplib
import trustme

from services.registry.domain import Security
from services.registry.verifier import Target, Verifier
from shared.crypto import generate_key
from shared.settings import Settings
from tests.support.smtp import Certificates, smtp_server

ACCOUNT = ("bench@example.com", "bench-password")


async def timed(
    label: str, checks: int, concurrency: int, one: Callable[[], Awaitable[bool]]
) -> float:
    slots = asyncio.Semaphore(concurrency)

    async def run() -> bool:
        async with slots:
            return await one()

    started = time.perf_counter()
    results = await asyncio.gather(*(run() for _ in range(checks)))
    elapsed = time.perf_counter() - started
    assert all(results), f"{label}: {results.count(False)} checks failed"
    rate = checks / elapsed
    print(f"{label:<28} {checks} checks in {elapsed:6.2f} s  = {rate:7.1f} checks/s")
    return rate


async def main(checks: int, concurrency: int) -> None:
    logging.getLogger("mail.log").setLevel(logging.ERROR)  # the test server's chatter
    ca = trustme.CA()
    with tempfile.NamedTemporaryFile(suffix=".pem", delete=False) as handle:
        ca.cert_pem.write_to_path(handle.name)
    os.environ["SSL_CERT_FILE"] = handle.name
    certs = Certificates(ca=ca, ca_file=handle.name)
    settings = Settings(
        admin_token="x" * 32,
        internal_token="y" * 32,
        unsubscribe_key="u" * 32,
        encryption_keys=generate_key(),
        allow_private_hosts=True,
    )
    verifier = Verifier(settings)
    with smtp_server(certs, dict([ACCOUNT])) as server:
        target = Target("localhost", server.port, Security.starttls, *ACCOUNT)

        async def bare() -> bool:
            context = ssl.create_default_context()
            client = aiosmtplib.SMTP(
                hostname="localhost", port=server.port, start_tls=True, tls_context=context
            )
            await client.connect()
            await client.login(*ACCOUNT)
            await client.quit()
            return True

        async def verified() -> bool:
            return (await verifier.check(target)).ok

        await timed("warm-up (bare)", 20, concurrency, bare)
        baseline = await timed("bare aiosmtplib loop", checks, concurrency, bare)
        ours = await timed("registry verifier", checks, concurrency, verified)
    print(f"ratio verifier / bare: {ours / baseline:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checks", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.checks, args.concurrency))
