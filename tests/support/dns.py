"""A real DNS server on loopback for the tests: dnslib's UDP server answering from a zone the
test sets (and may change while it runs), or not answering at all."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from dnslib import QTYPE, DNSError, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer
from dnslib.zoneresolver import ZoneResolver


@dataclass
class Zone(BaseResolver):  # type: ignore[misc]
    """Answers from `text` (zone-file lines); with `text` None it drops every query, as a
    server that is down or filtered does. `asked` records each (name, type) it received."""

    text: str | None = ""
    asked: list[tuple[str, str]] = field(default_factory=list)

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        question = request.q
        self.asked.append((str(question.qname).rstrip("."), QTYPE[question.qtype]))
        if self.text is None:
            raise DNSError("dropped")  # dnslib logs it and sends nothing
        return ZoneResolver(self.text).resolve(request, handler)


@dataclass
class DnsTestServer:
    zone: Zone
    port: int

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextmanager
def dns_server(zone: Zone) -> Iterator[DnsTestServer]:
    # Port 0: the system picks a free one, read back from the bound socket.
    server = DNSServer(zone, address="127.0.0.1", port=0, logger=DNSLogger(logf=lambda _: None))
    server.start_thread()
    try:
        yield DnsTestServer(zone, server.server.server_address[1])
    finally:
        server.stop()
        server.server.server_close()
