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
from shared.errors import PROBLEM_RESPONSES, problem_doc
from shared.settings import SchedulerSettings
from shared.timeutil import utcnow

router = APIRouter(prefix="/v1/unsubscribe", tags=["unsubscribe"], responses=PROBLEM_RESPONSES)
TokenPath = Annotated[str, Path(pattern=unsubscribe.TOKEN_PATTERN)]


class Unsubscribed(SQLModel):
    unsubscribed: bool = True


def keys_of(request: Request) -> unsubscribe.Keys:
    settings: SchedulerSettings = request.app.state.settings
    return unsubscribe.keys_from(settings.unsubscribe_secrets)


@router.post(
    "/{token}",
    responses={
        404: problem_doc("Not a valid link (malformed, unknown or tampered)"),
        409: problem_doc("The link was already used"),
    },
    summary="One-click unsubscribe (RFC 8058 POST, body List-Unsubscribe=One-Click)",
)
async def one_click(token: TokenPath, request: Request, session: SessionDep) -> Unsubscribed:
    # The body (`List-Unsubscribe=One-Click`, form-encoded) carries nothing the link does not.
    await unsubscribe.use(session, keys_of(request), token, utcnow(), via="one-click")
    return Unsubscribed()


@router.get(
    "/{token}",
    response_class=HTMLResponse,
    summary="A page with an Unsubscribe button; fetching it changes nothing",
)
async def page(token: TokenPath) -> HTMLResponse:
    action = html.escape(f"/v1/unsubscribe/{token}", quote=True)
    return HTMLResponse(
        "<!doctype html><title>Unsubscribe</title>"
        f'<form method="post" action="{action}">'
        '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
        "<button>Unsubscribe</button></form>"
    )
