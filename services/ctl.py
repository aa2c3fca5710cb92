"""`ablctl`: the HTTP API from a terminal, for operators and tenants.

export ABL_API_URL=http://127.0.0.1:8000 ABL_API_KEY=abl_...
ablctl servers add --preset gmail --username me@gmail.com --from-email me@gmail.com
ablctl servers connect google       # or microsoft: OAuth, no password
ablctl send leads.csv --campaign november
ablctl watch
ablctl listen --register             # print the webhooks this tenant receives, for development
"""

from __future__ import annotations

import csv
import json
import queue
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import httpx
import typer
from rich.console import Console
from rich.live import Live
from rich.progress import Progress
from rich.table import Table
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
servers = typer.Typer(help="A tenant's SMTP servers.", no_args_is_help=True)
tenants = typer.Typer(help="Tenants (admin token).", no_args_is_help=True)
suppressions = typer.Typer(help="The tenant's suppression list.", no_args_is_help=True)
webhooks = typer.Typer(help="The tenant's webhook endpoints.", no_args_is_help=True)
app.add_typer(servers, name="servers")
app.add_typer(webhooks, name="webhooks")
app.add_typer(tenants, name="tenants")
app.add_typer(suppressions, name="suppressions")
console = Console()
errors = Console(stderr=True)

BATCH = 500
UrlOption = Annotated[str, typer.Option(envvar="ABL_API_URL", help="Base URL of the API.")]
KeyOption = Annotated[str, typer.Option(envvar="ABL_API_KEY", help="The tenant's API key.")]
DEFAULT_URL = "http://127.0.0.1:8000"


def fail(response: httpx.Response) -> NoReturn:
    """Show a problem+json answer the way a person reads it, then exit 1."""
    try:
        problem: dict[str, Any] = response.json()
    except ValueError:
        problem = {"detail": response.text or response.reason_phrase}
    errors.print(
        f"[bold red]Error[/] ({problem.get('code', response.status_code)}): "
        f"{problem.get('detail', '')}"
    )
    for item in problem.get("errors") or []:
        errors.print(f"  [yellow]{item['field']}[/]: {item['message']}")
    if problem.get("hint"):
        errors.print(f"  [cyan]hint[/]: {problem['hint']}")
    raise typer.Exit(1)


def call(url: str, token: str, method: str, path: str, **kwargs: Any) -> Any:
    try:
        response = httpx.request(
            method,
            f"{url.rstrip('/')}{path}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
            **kwargs,
        )
    except httpx.HTTPError as exc:
        errors.print(f"[bold red]Error[/]: cannot reach {url} ({type(exc).__name__})")
        raise typer.Exit(2) from exc
    if response.status_code >= 400:
        fail(response)
    return response.json() if response.content else None


def _pages(url: str, key: str, path: str, **params: Any) -> Iterator[Any]:
    """Every item of a paginated list, page after page."""
    cursor = None
    while True:
        page = call(
            url,
            key,
            "GET",
            path,
            params={"limit": 200, **params} | ({"cursor": cursor} if cursor else {}),
        )
        yield from page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return


@tenants.command("create")
def tenant_create(
    name: str,
    url: UrlOption = DEFAULT_URL,
    admin_token: Annotated[str, typer.Option(envvar="ABL_ADMIN_TOKEN")] = "",
) -> None:
    """Create a tenant and print its API key (shown only this once)."""
    tenant = call(url, admin_token, "POST", "/v1/tenants", json={"name": name})
    console.print(f"tenant [bold]{tenant['name']}[/] {tenant['id']}")
    console.print(f"API key: [bold green]{tenant['api_key']}[/]")


@servers.command("add")
def server_add(
    username: Annotated[str, typer.Option()],
    from_email: Annotated[str, typer.Option()],
    password: Annotated[
        str, typer.Option(prompt=True, hide_input=True, envvar="ABL_SMTP_PASSWORD")
    ],
    preset: Annotated[str | None, typer.Option(help="gmail, outlook, zoho, ...")] = None,
    host: str | None = None,
    port: int | None = None,
    security: Annotated[str | None, typer.Option(help="starttls or tls")] = None,
    from_name: str = "",
    label: str = "",
    daily_cap: int | None = None,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = "",
) -> None:
    """Add a server: the API connects and authenticates before it is stored."""
    body = {
        "preset": preset,
        "host": host,
        "port": port,
        "security": security,
        "username": username,
        "password": password,
        "from_email": from_email,
        "from_name": from_name,
        "label": label,
        "daily_cap": daily_cap,
    }
    server = call(
        url, key, "POST", "/v1/servers", json={k: v for k, v in body.items() if v not in (None, "")}
    )
    console.print(f"[green]added[/] {server['label']} {server['id']} ({server['status']})")


def _outcome_of(pasted: str, url: str) -> dict[str, str]:
    """What a URL pasted back from the browser says: the frontend's `?server_id=`/`?error=`,
    or the provider's redirect to the callback (`?code=&state=`), which is forwarded to the
    API's callback here, for a browser that could not reach the API itself."""
    query = {k: v[0] for k, v in parse_qs(urlsplit(pasted.strip()).query).items()}
    if "server_id" in query or ("error" in query and "state" not in query):
        return query
    if "state" not in query:
        return {"error": "not_a_callback_url"}
    try:
        response = httpx.get(
            f"{url.rstrip('/')}/v1/oauth/callback",
            params={k: v for k, v in query.items() if k in ("code", "state", "error")},
            timeout=60,
        )
    except httpx.HTTPError as exc:
        errors.print(f"[bold red]Error[/]: cannot reach {url} ({type(exc).__name__})")
        raise typer.Exit(2) from exc
    landed = urlsplit(response.headers.get("location", ""))
    return {k: v[0] for k, v in parse_qs(landed.query).items()} or {"error": "no_answer"}


def _stdin_lines() -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in sys.stdin:
            if line.strip():
                lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


@servers.command("connect")
def server_connect(
    provider: Annotated[str, typer.Argument(help="google or microsoft")],
    label: str = "",
    from_name: str = "",
    daily_cap: int | None = None,
    server_id: Annotated[
        str | None, typer.Option(help="Reconnect this server (after auth_failed).")
    ] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the browser.")] = 600.0,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = "",
) -> None:
    """Connect a Google or Microsoft mailbox with OAuth: open the printed URL in a browser and
    allow access. The command waits for the connection to complete, or takes the URL the
    browser ended on, pasted here."""
    body = {"label": label, "from_name": from_name, "daily_cap": daily_cap, "server_id": server_id}
    started = call(
        url,
        key,
        "POST",
        f"/v1/servers/oauth/{provider}/start",
        json={k: v for k, v in body.items() if v not in (None, "")},
    )
    console.print("Open this URL in a browser, sign in and allow access:")
    typer.echo(started["authorize_url"])  # unwrapped, so it can be copied whole
    console.print(
        "Waiting for the connection... If the browser cannot reach the API, paste the URL it "
        "ended on here."
    )
    state = started["state"]
    pasted = _stdin_lines()
    deadline = time.monotonic() + wait
    outcome: dict[str, str] = {}
    while not outcome:
        flow = call(url, key, "GET", f"/v1/servers/oauth/flows/{state}")
        if flow["status"] == "connected":
            outcome = {"server_id": flow["server_id"]}
        elif flow["status"] in ("failed", "expired"):
            outcome = {"error": flow["error"]}
        elif time.monotonic() > deadline:
            outcome = {"error": "timed_out"}
        else:
            try:
                outcome = _outcome_of(pasted.get(timeout=1.0), url)
            except queue.Empty:
                continue
    if "server_id" in outcome:
        server = call(url, key, "GET", f"/v1/servers/{outcome['server_id']}")
        console.print(f"[green]connected[/] {server['label']} {server['id']} ({server['status']})")
        return
    errors.print(f"[bold red]Error[/] ({outcome.get('error')}): the mailbox was not connected.")
    raise typer.Exit(1)


@servers.command("list")
def server_list(url: UrlOption = DEFAULT_URL, key: KeyOption = "") -> None:
    """The tenant's servers with their warmup progress."""
    table = Table("id", "label", "host", "status", "step", "today", "allowance")
    for item in _pages(url, key, "/v1/servers"):
        warmup = call(url, key, "GET", f"/v1/servers/{item['id']}/warmup")
        table.add_row(
            item["id"],
            item["label"],
            f"{item['host']}:{item['port']}",
            item["status"],
            str(warmup["step"]),
            str(warmup["reserved_today"]),
            str(warmup["allowance_today"]),
        )
    console.print(table)


def _server_action(action: str, server_id: str, url: str, key: str) -> None:
    server = call(url, key, "POST", f"/v1/servers/{server_id}/{action}")
    reply = server["last_check"]["reply"] if action == "verify" else ""
    console.print(f"{server['label']}: [bold]{server['status']}[/] {reply or ''}".rstrip())


@servers.command("verify")
def server_verify(server_id: str, url: UrlOption = DEFAULT_URL, key: KeyOption = "") -> None:
    """Check the server again."""
    _server_action("verify", server_id, url, key)


@servers.command("pause")
def server_pause(server_id: str, url: UrlOption = DEFAULT_URL, key: KeyOption = "") -> None:
    """Stop sending through the server."""
    _server_action("pause", server_id, url, key)


@servers.command("resume")
def server_resume(server_id: str, url: UrlOption = DEFAULT_URL, key: KeyOption = "") -> None:
    """Send through the server again."""
    _server_action("resume", server_id, url, key)


@app.command("send")
def send(
    csv_file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    campaign: str | None = None,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = "",
) -> None:
    """Queue the emails of a CSV (columns: to, subject, text, html, reply_to,
    idempotency_key, campaign) in batches, with a progress bar."""
    with csv_file.open(newline="") as handle:
        rows = [
            {k: v for k, v in row.items() if k and v not in (None, "")}
            for row in csv.DictReader(handle)
        ]
    if campaign:
        for row in rows:
            row.setdefault("campaign", campaign)
    queued = duplicates = suppressed = 0
    warning = None
    with Progress(console=console) as progress:
        task = progress.add_task("queueing", total=len(rows))
        for start in range(0, len(rows), BATCH):
            batch = rows[start : start + BATCH]
            answer = call(url, key, "POST", "/v1/messages", json={"messages": batch})
            queued += answer["queued"]
            duplicates += answer["duplicates"]
            suppressed += answer.get("suppressed", 0)
            progress.advance(task, len(batch))
            warning = answer.get("warning")
    console.print(f"queued {queued}, already known {duplicates}, suppressed {suppressed}")
    if rows and warning:
        console.print(f"[yellow]{warning}[/]")


def _counts(url: str, key: str, campaign: str | None) -> dict[str, int]:
    counts: dict[str, int] = {}
    filters = {"campaign": campaign} if campaign else {}
    for item in _pages(url, key, "/v1/messages", limit=500, **filters):
        counts[item["status"]] = counts.get(item["status"], 0) + 1
    return counts


def _table(counts: dict[str, int]) -> Table:
    table = Table("status", "emails")
    for status in (
        "queued",
        "scheduled",
        "sent",
        "failed",
        "unknown",
        "canceled",
        "bounced",
        "replied",
        "suppressed",
    ):
        table.add_row(status, str(counts.get(status, 0)))
    return table


@suppressions.command("import")
def suppressions_import(
    csv_file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    source: Annotated[str, typer.Option(help="bounce, complaint, unsubscribe or manual")] = (
        "manual"
    ),
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = "",
) -> None:
    """Suppress the addresses or domains of a CSV (columns: address or domain, reason,
    source; a file with one unnamed column is read as addresses), in batches."""
    with csv_file.open(newline="") as handle:
        lines = [line for line in csv.reader(handle) if any(cell.strip() for cell in line)]
    if not lines:
        console.print("nothing to import")
        return
    header = [cell.strip().lower() for cell in lines[0]]
    if {"address", "domain"} & set(header):
        rows = [dict(zip(header, line, strict=False)) for line in lines[1:]]
    else:  # a bare list of addresses, one a line
        rows = [{"address": line[0]} for line in lines]
    items = []
    for row in rows:
        item = {k: v.strip() for k, v in row.items() if k and v and v.strip()}
        item.setdefault("source", source)
        items.append(item)
    added = known = 0
    for start in range(0, len(items), BATCH):
        answer = call(
            url,
            key,
            "POST",
            "/v1/suppressions/import",
            json={"items": items[start : start + BATCH]},
        )
        added += answer["added"]
        known += answer["already_known"]
    console.print(f"suppressed {added} new, already on the list {known}")


@suppressions.command("add")
def suppressions_add(
    address: Annotated[str | None, typer.Option()] = None,
    domain: Annotated[str | None, typer.Option()] = None,
    reason: str = "",
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = "",
) -> None:
    """Suppress one address or one domain."""
    body = {"address": address, "domain": domain, "reason": reason, "source": "manual"}
    entry = call(
        url, key, "POST", "/v1/suppressions", json={k: v for k, v in body.items() if v is not None}
    )
    console.print(f"suppressed {entry['address'] or entry['domain']} ({entry['id']})")


@suppressions.command("list")
def suppressions_list(url: UrlOption = DEFAULT_URL, key: KeyOption = "") -> None:
    """Every entry of the list."""
    table = Table("id", "address or domain", "source", "reason", "since")
    count = 0
    for item in _pages(url, key, "/v1/suppressions", limit=500):
        table.add_row(
            item["id"],
            item["address"] or f"@{item['domain']}",
            item["source"],
            item["reason"],
            item["created_at"],
        )
        count += 1
    console.print(table)
    console.print(f"{count} entries")


@suppressions.command("remove")
def suppressions_remove(
    suppression_id: str, url: UrlOption = DEFAULT_URL, key: KeyOption = ""
) -> None:
    """Take an entry off the list."""
    call(url, key, "DELETE", f"/v1/suppressions/{suppression_id}")
    console.print(f"removed {suppression_id}")


EventOption = Annotated[
    list[str] | None,
    typer.Option("--event", help="An event type to receive (repeat); every type when omitted."),
]


def _add_webhook(url: str, key: str, endpoint_url: str, events: list[str] | None) -> Any:
    body: dict[str, Any] = {"url": endpoint_url}
    if events:
        body["event_types"] = events
    return call(url, key, "POST", "/v1/webhooks", json=body)


@webhooks.command("add")
def webhooks_add(
    endpoint_url: Annotated[str, typer.Argument(help="The HTTPS URL that receives the events.")],
    event: EventOption = None,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = "",
) -> None:
    """Register an endpoint and print its signing secret (shown only this once)."""
    endpoint = _add_webhook(url, key, endpoint_url, event)
    console.print(f"[green]added[/] {endpoint['id']} ({', '.join(endpoint['event_types'])})")
    console.print(f"signing secret: [bold green]{endpoint['secret']}[/]")


@webhooks.command("rotate-secret")
def webhooks_rotate(endpoint_id: str, url: UrlOption = DEFAULT_URL, key: KeyOption = "") -> None:
    """Replace an endpoint's signing secret; the old one keeps signing beside it for 24 h."""
    endpoint = call(url, key, "POST", f"/v1/webhooks/{endpoint_id}/rotate-secret")
    console.print(f"new signing secret: [bold green]{endpoint['secret']}[/]")
    console.print(f"the previous secret signs too until {endpoint['previous_secret_until']}")


@webhooks.command("list")
def webhooks_list(url: UrlOption = DEFAULT_URL, key: KeyOption = "") -> None:
    """The tenant's endpoints."""
    table = Table("id", "url", "enabled", "events", "failing since")
    for item in _pages(url, key, "/v1/webhooks"):
        table.add_row(
            item["id"],
            item["url"],
            "yes" if item["enabled"] else f"no ({item['disabled_reason'] or 'by hand'})",
            ", ".join(item["event_types"]),
            item["failing_since"] or "",
        )
    console.print(table)


@webhooks.command("deliveries")
def webhooks_deliveries(
    endpoint_id: str,
    status: Annotated[str | None, typer.Option(help="pending, delivered or failed")] = None,
    limit: Annotated[int, typer.Option(help="The newest this many.")] = 50,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = "",
) -> None:
    """An endpoint's delivery log, newest first."""
    params: dict[str, Any] = {"limit": limit} | ({"status": status} if status else {})
    page = call(url, key, "GET", f"/v1/webhooks/{endpoint_id}/deliveries", params=params)
    table = Table("webhook-id", "event", "status", "attempts", "last answer", "last attempt")
    for item in page["items"]:
        table.add_row(
            item["message_id"],
            item["event_type"],
            item["status"],
            str(item["attempts"]),
            str(item["last_status_code"] or item["last_error"] or ""),
            item["last_attempt_at"] or "",
        )
    console.print(table)
    console.print(f"{len(page['items'])} deliveries")


def _receiver(
    verifier: Webhook, count: int | None, done: threading.Event
) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()
    seen = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                payload = verifier.verify(body, headers)
            except WebhookVerificationError as exc:
                # Never the body: a request that is not ours may carry anything.
                errors.print(f"[red]refused[/] a request with a bad signature ({exc})")
                status = 401
            else:
                line = {"webhook-id": headers.get("webhook-id"), **payload}
                with lock:
                    sys.stdout.write(
                        json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"
                    )
                    sys.stdout.flush()
                    seen[0] += 1
                    if count is not None and seen[0] >= count:
                        done.set()
                status = 204
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    return Handler


@app.command("listen")
def listen(
    secret: Annotated[
        str | None,
        typer.Option(envvar="ABL_WEBHOOK_SECRET", help="The endpoint's whsec_ signing secret."),
    ] = None,
    register: Annotated[
        bool, typer.Option(help="Register this listener as an endpoint and use its secret.")
    ] = False,
    event: EventOption = None,
    host: str = "127.0.0.1",
    port: int = 8787,
    count: Annotated[int | None, typer.Option(help="Exit after this many events.")] = None,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = "",
) -> None:
    """Receive webhooks on a local port for development: each request's signature is verified
    (Standard Webhooks) and each event printed as one line of JSON; a bad signature is
    answered 401 and reported on stderr. `--register` adds the endpoint (the API must allow
    private hosts, as `make run` does) and removes it on exit."""
    done = threading.Event()
    # Bound first (the port is part of the URL to register); its handler is set once the
    # secret is known, before it serves anything.
    server = ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)
    address = f"http://{host}:{server.server_address[1]}/"
    endpoint_id = None
    if register:
        endpoint = _add_webhook(url, key, address, event)
        endpoint_id, secret = endpoint["id"], endpoint["secret"]
    if not secret:
        errors.print("[bold red]Error[/]: give --secret (or ABL_WEBHOOK_SECRET), or --register")
        server.server_close()
        raise typer.Exit(2)
    server.RequestHandlerClass = _receiver(Webhook(secret), count, done)
    errors.print(f"listening on {address}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
        if endpoint_id is not None:
            call(url, key, "DELETE", f"/v1/webhooks/{endpoint_id}")


@app.command("watch")
def watch(
    campaign: str | None = None,
    once: bool = False,
    interval: float = 2.0,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = "",
) -> None:
    """Email counts by status, refreshed until nothing is queued or scheduled."""
    counts = _counts(url, key, campaign)
    if once:
        console.print(_table(counts))
        return
    with Live(_table(counts), console=console) as live:
        while counts.get("queued", 0) + counts.get("scheduled", 0):
            time.sleep(interval)
            counts = _counts(url, key, campaign)
            live.update(_table(counts))


if __name__ == "__main__":
    app()
