"""`ablctl`: the HTTP API from a terminal, for operators and tenants.

export ABL_API_URL=http://127.0.0.1:8000 ABL_API_KEY=abl_...
ablctl servers add --preset gmail --username me@gmail.com --from-email me@gmail.com
ablctl servers connect google       # or microsoft: OAuth, no password
ablctl send leads.csv --campaign november
ablctl watch
"""

from __future__ import annotations

import csv
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import httpx
import typer
from rich.console import Console
from rich.live import Live
from rich.progress import Progress
from rich.table import Table

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
servers = typer.Typer(help="A tenant's SMTP servers.", no_args_is_help=True)
tenants = typer.Typer(help="Tenants (admin token).", no_args_is_help=True)
suppressions = typer.Typer(help="The tenant's suppression list.", no_args_is_help=True)
app.add_typer(servers, name="servers")
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
    cursor = None
    while True:
        page = call(
            url,
            key,
            "GET",
            "/v1/servers",
            params={"limit": 200} | ({"cursor": cursor} if cursor else {}),
        )
        for item in page["items"]:
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
        cursor = page["next_cursor"]
        if cursor is None:
            break
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
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 500}
        if cursor:
            params["cursor"] = cursor
        if campaign:
            params["campaign"] = campaign
        page = call(url, key, "GET", "/v1/messages", params=params)
        for item in page["items"]:
            counts[item["status"]] = counts.get(item["status"], 0) + 1
        cursor = page["next_cursor"]
        if cursor is None:
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
    cursor = None
    count = 0
    while True:
        params: dict[str, Any] = {"limit": 500} | ({"cursor": cursor} if cursor else {})
        page = call(url, key, "GET", "/v1/suppressions", params=params)
        for item in page["items"]:
            table.add_row(
                item["id"],
                item["address"] or f"@{item['domain']}",
                item["source"],
                item["reason"],
                item["created_at"],
            )
            count += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    console.print(table)
    console.print(f"{count} entries")


@suppressions.command("remove")
def suppressions_remove(
    suppression_id: str, url: UrlOption = DEFAULT_URL, key: KeyOption = ""
) -> None:
    """Take an entry off the list."""
    call(url, key, "DELETE", f"/v1/suppressions/{suppression_id}")
    console.print(f"removed {suppression_id}")


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
