"""A bound on the size of a whole request body, enforced while it is read.

The per-item limits of a batch (1,000 emails of up to 1.5 MiB each) would let one request hold
about 1.5 GB; this middleware refuses the body first. A declared `Content-Length` over the limit
is answered 413 before a byte of the body is read; a chunked body is counted as it streams in,
and the request fails with 413 at the first chunk past the limit, whatever reads it.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.problems import problem_response, status_problem

# The routes whose bodies are batches of emails; every other route takes a small JSON object.
LARGE_BODY_PATHS = frozenset({"/v1/messages"})


def too_large_detail(limit: int) -> str:
    return f"The request body is larger than {limit} bytes."


class BodyTooLarge(HTTPException):
    """Raised from `receive`: an HTTPException so that FastAPI's body parsing lets it through
    (it turns other exceptions into a 400) and the problem+json handler renders it."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=too_large_detail(limit))


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, default_limit: int, large_limit: int) -> None:
        self.app = app
        self.default_limit = default_limit
        self.large_limit = large_limit

    def limit_for(self, path: str) -> int:
        return self.large_limit if path.rstrip("/") in LARGE_BODY_PATHS else self.default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            problem = status_problem(413, too_large_detail(limit))
            # Answered without reading the body; the server closes the connection after it.
            response = problem_response(problem, {"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counting_receive, send)
