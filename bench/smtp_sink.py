"""A local SMTP sink for the benchmarks: STARTTLS and AUTH (any login), every reply delayed.

Runs in its own process so that its TLS work does not share a GIL with what is measured.

    python -m bench.smtp_sink --port 2525 --delay 0.05 --cert cert.pem --key key.pem
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import threading
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session


class Sink:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 OK"


def accept_any(*_: Any) -> AuthResult:
    return AuthResult(success=True, handled=False)


class SlowSMTP(SMTP):
    delay = 0.0

    async def push(self, status: Any) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        await super().push(status)


class SlowController(Controller):
    def factory(self) -> SMTP:
        return SlowSMTP(self.handler, **self.SMTP_kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    SlowSMTP.delay = args.delay
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    controller = SlowController(
        Sink(),
        hostname="127.0.0.1",
        port=args.port,
        tls_context=context,
        require_starttls=True,
        authenticator=accept_any,
        auth_required=True,
        server_hostname="sink.test",
        ready_timeout=30,
    )
    controller.start()
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    main()
