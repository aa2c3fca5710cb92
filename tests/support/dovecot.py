"""A real IMAP server for the tests: Dovecot from Debian (`dovecot-imapd`), started with a
throw-away configuration: its own ports (IMAPS and IMAP with STARTTLS), TLS with the test CA's
certificate, a passwd-file of users, mail in a temporary directory.

Messages are placed with APPEND, as a delivering MTA would leave them.
"""

from __future__ import annotations

import contextlib
import getpass
import imaplib
import os
import pwd
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.smtp import Certificates, free_port

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"


@dataclass
class DovecotServer:
    host: str
    tls_port: int
    starttls_port: int
    users: dict[str, str]
    root: Path
    process: subprocess.Popen[bytes]
    ca_file: str

    def client(self, user: str) -> imaplib.IMAP4_SSL:
        context = ssl.create_default_context(cafile=self.ca_file)
        client = imaplib.IMAP4_SSL(self.host, self.tls_port, ssl_context=context, timeout=10)
        client.login(user, self.users[user])
        return client

    def append(self, user: str, message: bytes, mailbox: str = "INBOX") -> None:
        client = self.client(user)
        try:
            status, _ = client.append(mailbox, "", imaplib.Time2Internaldate(time.time()), message)
            assert status == "OK"
        finally:
            client.logout()

    def recreate_inbox(self, user: str) -> None:
        """Delete and re-create INBOX's storage: a new UIDVALIDITY, as after a server
        migration or restore."""
        maildir = self.root / "mail" / user / "Maildir"
        shutil.rmtree(maildir, ignore_errors=True)

    def flags(self, user: str) -> list[bytes]:
        client = self.client(user)
        try:
            client.select("INBOX", readonly=True)
            _, data = client.fetch("1:*", "(FLAGS)")
            return [item for item in data if isinstance(item, bytes)]
        finally:
            client.logout()


def _mail_user() -> tuple[str, int, int]:
    """Dovecot refuses to run mail processes as root: as root, use its own `dovecot` user."""
    name = "dovecot" if os.geteuid() == 0 else getpass.getuser()
    entry = pwd.getpwnam(name)
    return name, entry.pw_uid, entry.pw_gid


def _oauth2_passdb(root: Path, certs: Certificates, tokeninfo_url: str | None) -> str:
    """A second passdb taking SASL XOAUTH2/OAUTHBEARER, each token checked by GET at
    `tokeninfo_url` + token (the test authorization server), as Dovecot does for Gmail."""
    if tokeninfo_url is None:
        return ""
    conf = root / "dovecot-oauth2.conf.ext"
    # Dovecot's auth process runs unprivileged: the CA goes where it can read it.
    ca_file = root / "oauth-ca.pem"
    shutil.copyfile(certs.ca_file, ca_file)
    os.chmod(ca_file, 0o644)
    conf.write_text(
        f"""tokeninfo_url = {tokeninfo_url}
introspection_mode = auth
username_attribute = email
active_attribute = active
active_value = true
tls_ca_cert_file = {ca_file}
"""
    )
    os.chmod(conf, 0o644)
    return f"""
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {conf}
}}
"""


def _config(
    root: Path,
    certs: Certificates,
    tls_port: int,
    starttls_port: int,
    tokeninfo_url: str | None = None,
) -> Path:
    cert = certs.ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = root / "cert.pem", root / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    user, uid, gid = _mail_user()
    config = root / "dovecot.conf"
    config.write_text(
        f"""
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <{cert_file}
ssl_key = <{key_file}
disable_plaintext_auth = yes
auth_mechanisms = plain login{" xoauth2 oauthbearer" if tokeninfo_url else ""}
# A refused login answers at once (Dovecot waits 2 s by default, and more for repeats from
# one address), so a test of refusals is not a test of timeouts.
auth_failure_delay = 0

default_internal_user = {user}
default_internal_group = {user}
default_login_user = {user}
first_valid_uid = {uid}
first_valid_gid = {gid}
mail_location = maildir:{root}/mail/%u/Maildir
passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
{_oauth2_passdb(root, certs, tokeninfo_url)}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    port = {starttls_port}
  }}
  inet_listener imaps {{
    port = {tls_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
"""
    )
    return config


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    for path in [root, *root.rglob("*")]:
        with contextlib.suppress(PermissionError):
            os.chown(path, uid, gid)


@contextlib.contextmanager
def dovecot_server(
    certs: Certificates, users: dict[str, str], *, oauth2_tokeninfo_url: str | None = None
) -> Iterator[DovecotServer]:
    """`oauth2_tokeninfo_url`: also take OAuth access tokens (XOAUTH2), checked there."""
    # Its own directory, reachable by Dovecot's unprivileged processes (pytest's temporary
    # directories are private to the user running the tests).
    root = Path(tempfile.mkdtemp(prefix="abl-dovecot-"))
    os.chmod(root, 0o711)  # noqa: S103 - traversable, not listable, by the mail user
    tls_port, starttls_port = free_port(), free_port()
    for sub in ("run", "state", "mail"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "passwd").write_text(
        "".join(f"{user}:{{PLAIN}}{password}\n" for user, password in users.items())
    )
    config = _config(root, certs, tls_port, starttls_port, oauth2_tokeninfo_url)
    _, uid, gid = _mail_user()
    _chown_tree(root / "mail", uid, gid)
    os.chmod(root / "passwd", 0o644)
    process = subprocess.Popen([DOVECOT, "-F", "-c", str(config)])  # noqa: S603
    server = DovecotServer(
        "localhost", tls_port, starttls_port, dict(users), root, process, certs.ca_file
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            server.client(next(iter(users))).logout()
            break
        except (OSError, imaplib.IMAP4.error):
            if process.poll() is not None or time.monotonic() > deadline:
                log = root / "dovecot.log"
                raise RuntimeError(
                    "Dovecot did not start: "
                    + (log.read_text()[-2000:] if log.exists() else "no log")
                ) from None
            time.sleep(0.1)
    try:
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(root, ignore_errors=True)
