"""Mailbox reader throughput: messages read and classified per second, against a bare IMAP
fetch loop on the same Dovecot and the same messages.

    python -m bench.inbox [--messages 2000]

Both read one INBOX over IMAPS from the first UID, in batches of 50 with BODY.PEEK[]; the
reader also classifies every message (flufl.bounce's detectors, the DSN parse, our Message-IDs)
as it does in production. Needs Dovecot (`make imap-deps`).
"""

from __future__ import annotations

import argparse
import imaplib
import os
import ssl
import tempfile
import time
import uuid
from pathlib import Path

import trustme

from services.scheduler import feedback
from services.scheduler.inbox import fetch_new
from shared.imap import ImapEndpoint, ImapSecurity
from tests.support import mailbox_messages as mail
from tests.support.dovecot import DovecotServer, dovecot_server
from tests.support.smtp import Certificates

USER, PASSWORD = "bench@example.com", "bench-password"
BATCH = 50


def fill(server: DovecotServer, count: int) -> None:
    """A realistic mix: a third bounces (standard and not), a third replies, a third other."""
    client = server.client(USER)
    try:
        for i in range(count):
            ours = mail.our_message_id(uuid.uuid4(), "example.com")
            kind = i % 6
            if kind == 0:
                raw = mail.dsn(f"lead{i}@example.org", ours)
            elif kind == 1:
                raw = mail.qmail_bounce(f"lead{i}@example.org")
            elif kind in (2, 3):
                raw = mail.reply(f"lead{i}@example.org", ours, auto=kind == 3)
            else:
                raw = f"From: news@x.org\r\nSubject: News {i}\r\n\r\n{'text ' * 200}\r\n".encode()
            client.append("INBOX", "", imaplib.Time2Internaldate(time.time()), raw)
    finally:
        client.logout()


def bare_loop(host: str, port: int, ca_file: str) -> int:
    context = ssl.create_default_context(cafile=ca_file)
    client = imaplib.IMAP4_SSL(host, port, ssl_context=context, timeout=30)
    client.login(USER, PASSWORD)
    client.select("INBOX", readonly=True)
    _, found = client.uid("SEARCH", None, "UID 1:*")  # type: ignore[arg-type]
    uids = found[0].split()
    read = 0
    for start in range(0, len(uids), BATCH):
        _, data = client.uid(
            "FETCH", b",".join(uids[start : start + BATCH]).decode(), "(BODY.PEEK[])"
        )
        read += sum(1 for item in data if isinstance(item, tuple))
    client.logout()
    return read


def reader_loop(endpoint: ImapEndpoint) -> tuple[int, dict[str, int]]:
    _, messages = fetch_new("127.0.0.1", endpoint, 0, 0, 30)
    kinds: dict[str, int] = {}
    for _, raw in messages:
        kind = feedback.classify(raw).kind.value
        kinds[kind] = kinds.get(kind, 0) + 1
    return len(messages), kinds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ca = trustme.CA()
    directory = Path(tempfile.mkdtemp(prefix="abl-bench-inbox-"))
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    os.environ["SSL_CERT_FILE"] = str(ca_file)  # the reader uses the system trust store
    certs = Certificates(ca=ca, ca_file=str(ca_file))
    with dovecot_server(certs, {USER: PASSWORD}) as server:
        fill(server, args.messages)
        endpoint = ImapEndpoint("localhost", server.tls_port, ImapSecurity.tls, USER, PASSWORD)
        bare_rates, reader_rates = [], []
        for _ in range(args.rounds):  # interleaved, so both see the same machine load
            started = time.perf_counter()
            read = bare_loop("localhost", server.tls_port, str(ca_file))
            bare_rates.append(read / (time.perf_counter() - started))
            started = time.perf_counter()
            classified, kinds = reader_loop(endpoint)
            reader_rates.append(classified / (time.perf_counter() - started))
        assert read == classified == args.messages
        bare, reader = max(bare_rates), max(reader_rates)
        print(f"messages in INBOX: {args.messages}; best of {args.rounds} rounds each")
        print(f"bare IMAP fetch loop (imaplib, BODY.PEEK, batches of {BATCH}): {bare:,.0f} msg/s")
        print(f"mailbox reader, fetched and classified: {reader:,.0f} msg/s  {kinds}")
        print(f"ratio reader / bare fetch: {reader / bare:.2f}")


if __name__ == "__main__":
    main()
