"""The public one-click unsubscribe route (RFC 8058): no API key, the signed link is the proof.

POST unsubscribes (what a mailbox provider sends when the recipient clicks "Unsubscribe");
GET only shows a page with a button, because link scanners and previews fetch every URL in an
email and must not unsubscribe anyone.
"""

from __future__ import annotations

import html
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse
from sqlmodel import SQLModel

from services.scheduler import unsubscribe
from shared.db import SessionDep
from shared.errors import raises
from shared.settings import SchedulerSettings
from shared.timeutil import utcnow

router = APIRouter(prefix="/v1/unsubscribe", tags=["unsubscribe"])
TokenPath = Annotated[str, Path(pattern=unsubscribe.TOKEN_PATTERN)]


class Unsubscribed(SQLModel):
    unsubscribed: bool = True


def keys_of(request: Request) -> unsubscribe.Keys:
    settings: SchedulerSettings = request.app.state.settings
    return unsubscribe.keys_from(settings.unsubscribe_secrets)


@router.post(
    "/{token}",
    summary="One-click unsubscribe (RFC 8058 POST, body List-Unsubscribe=One-Click)",
)
@raises(unsubscribe.UnsubscribeInvalid, unsubscribe.UnsubscribeUsed)
async def unsubscribe_one_click(
    token: TokenPath, request: Request, session: SessionDep
) -> Unsubscribed:
    """Sent by the recipient's mailbox provider, not by the frontend: no API key, the signed
    link is the proof. The recipient goes on the sender's suppression list."""
    # The body (`List-Unsubscribe=One-Click`, form-encoded) carries nothing the link does not.
    await unsubscribe.use(session, keys_of(request), token, utcnow(), via="one-click")
    return Unsubscribed()


@router.get(
    "/{token}",
    response_class=HTMLResponse,
    summary="A page with an Unsubscribe button; fetching it changes nothing",
)
async def show_unsubscribe_page(token: TokenPath) -> HTMLResponse:
    """For a person who opens the link: link scanners and previews fetch every URL of an
    email, so only the page's POST unsubscribes."""
    action = html.escape(f"/v1/unsubscribe/{token}", quote=True)
    return HTMLResponse(
        "<!doctype html><title>Unsubscribe</title>"
        f'<form method="post" action="{action}">'
        '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
        "<button>Unsubscribe</button></form>"
    )
