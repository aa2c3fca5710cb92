"""A webhook receiver on loopback for the tests: it verifies every request's signature twice,
with the `standardwebhooks` library and with the specification's algorithm written out here
(HMAC-SHA256 over `id.timestamp.body`, base64, `v1,` prefix), and records what it accepted."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook


def spec_signature(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


@dataclass
class Received:
    id: str
    type: str
    data: dict[str, Any]
    # When the change happened: deliveries are concurrent, so arrival order is not that order.
    timestamp: datetime = datetime.min
    # How many signatures `webhook-signature` held (two during a secret rotation's overlap).
    signatures: int = 1


@dataclass
class Receiver:
    secret: str = ""
    # The status the receiver answers with; a test changes it while events flow.
    answer: Callable[[], int] = lambda: 200
    accepted: list[Received] = field(default_factory=list)
    answered: Counter[int] = field(default_factory=Counter)
    bad_signatures: int = 0
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def ids(self) -> list[str]:
        with self.lock:
            return [r.id for r in self.accepted]

    def of_type(self, kind: str) -> list[Received]:
        with self.lock:
            return [r for r in self.accepted if r.type == kind]

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        msg_id = headers.get("webhook-id", "")
        timestamp = headers.get("webhook-timestamp", "")
        signatures = headers.get("webhook-signature", "").split(" ")
        try:
            Webhook(self.secret).verify(body, headers)
            ok = spec_signature(self.secret, msg_id, timestamp, body) in signatures
        except Exception:
            ok = False
        with self.lock:
            if not ok:
                self.bad_signatures += 1
                self.answered[401] += 1
                return 401
            status = self.answer()
            self.answered[status] += 1
            if 200 <= status < 300:
                payload = json.loads(body)
                self.accepted.append(
                    Received(
                        msg_id,
                        payload["type"],
                        payload["data"],
                        datetime.fromisoformat(payload["timestamp"]),
                        len(signatures),
                    )
                )
            return status


@contextmanager
def receiver(secret: str = "") -> Iterator[Receiver]:
    state = Receiver(secret=secret)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            status = state.handle(headers, body)
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
