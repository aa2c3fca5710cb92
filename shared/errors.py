"""One error hierarchy for every service, free of any web framework.

Every error carries a stable machine `code` the frontend can switch on and a `hint` a person can
act on. Two branches share the root `AblError`: `AppError`, what a request can be answered with
(its class names the HTTP status; `shared/problems.py` renders it as RFC 9457 problem+json, the
one place that knows FastAPI), and `MessageError`, what a consumer tells the broker about a
message (retry or dead-letter), which no request ever answers with.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, Field


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the offending field, e.g. `body.port`.")
    message: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details, with the `code` and `hint` extensions."""

    type: str = Field(description="URI reference naming the kind of problem.")
    title: str
    status: int
    detail: str
    code: str = Field(description="Stable machine-readable error code.")
    hint: str | None = Field(default=None, description="What a person can do about it.")
    instance: str | None = None
    errors: list[FieldError] | None = None


class AblError(Exception):
    """The root of every error the services raise on purpose."""

    code: str = "internal_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class AppError(AblError):
    """The server failed to handle this request."""

    status: int = HTTPStatus.INTERNAL_SERVER_ERROR
    code: str = "internal_error"
    # Every code an instance may carry, for a class whose code is chosen when it is raised (a
    # connection check's outcome); empty means `code` alone. The spec's `code` enums are built
    # from these, so a code is spelled once, here or in the enum it comes from.
    codes: ClassVar[tuple[str, ...]] = ()
    default_detail: ClassVar[str] = "The server failed to handle this request."
    hint: str | None = None
    # For the spec: the headers this error's response carries, and the field errors its example
    # shows (a class's own only: a subclass of Unprocessable need not name fields).
    documented_headers: ClassVar[dict[str, str]] = {}
    example_errors: ClassVar[tuple[FieldError, ...]] = ()
    # A class with several `codes`: each code's example (detail, hint), where it has its own.
    code_examples: ClassVar[dict[str, tuple[str, str | None]]] = {}

    def __init__(
        self,
        detail: str | None = None,
        *,
        code: str | None = None,
        hint: str | None = None,
        status: int | None = None,
        errors: Sequence[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(self.default_detail if detail is None else detail)
        if code is not None:
            self.code = code
        if hint is not None:
            self.hint = hint
        if status is not None:
            self.status = status
        self.errors = list(errors) if errors is not None else None
        self.headers = headers

    @classmethod
    def documented_codes(cls) -> tuple[str, ...]:
        return cls.codes or (cls.code,)

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or cls.default_detail).strip().split("\n\n")[0].replace("\n", " ")

    def to_problem(self, instance: str | None = None) -> Problem:
        return Problem(
            type=f"/problems/{self.code}",
            title=HTTPStatus(self.status).phrase,
            status=self.status,
            detail=self.detail,
            code=self.code,
            hint=self.hint,
            instance=instance,
            errors=self.errors,
        )


Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])
_RAISES = "__abl_raises__"


def raises(*errors: type[AppError]) -> Callable[[Endpoint], Endpoint]:
    """Declare the errors a route (or a dependency) raises on purpose: the spec lists their
    codes in each response's `code` enum (shared/spec.py)."""

    def mark(function: Endpoint) -> Endpoint:
        setattr(function, _RAISES, (*declared_errors(function), *errors))
        return function

    return mark


def declared_errors(function: object) -> tuple[type[AppError], ...]:
    found: tuple[type[AppError], ...] = getattr(function, _RAISES, ())
    return found


class BadRequest(AppError):
    """The request cannot be read."""

    status = HTTPStatus.BAD_REQUEST
    code = "bad_request"


class MalformedBody(BadRequest):
    """The body is not UTF-8 JSON."""

    code = "malformed_body"
    default_detail = "There was an error parsing the body"
    hint = "Send a UTF-8 JSON body with `Content-Type: application/json`."


class Unauthorized(AppError):
    """Missing or invalid credentials."""

    status = HTTPStatus.UNAUTHORIZED
    code = "unauthorized"
    default_detail = "Missing or invalid credentials."
    hint = "Send `Authorization: Bearer <token>` with a valid key."
    documented_headers: ClassVar[dict[str, str]] = {
        "WWW-Authenticate": "`Bearer`: the scheme to authenticate with."
    }

    def __init__(self, detail: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(detail, **kwargs)


class NotFound(AppError):
    """No route has this path."""

    status = HTTPStatus.NOT_FOUND
    code = "not_found"
    default_detail = "Not Found"
    hint = "Check the URL and the id; ids are per tenant."


# The registry's servers, and the scheduler's view of their warmup, answer with it.
class ServerNotFound(NotFound):
    """No server with this id for this tenant."""

    code = "server_not_found"
    default_detail = "No server 01900000-0000-7000-8000-000000000000 for this tenant."
    hint = "List your servers with GET /v1/servers."


def server_not_found(server_id: uuid.UUID) -> ServerNotFound:
    return ServerNotFound(f"No server {server_id} for this tenant.")


class MethodNotAllowed(AppError):
    """The path does not take this method."""

    status = HTTPStatus.METHOD_NOT_ALLOWED
    code = "method_not_allowed"
    default_detail = "Method Not Allowed"
    hint = "See /docs for the allowed methods."


class Conflict(AppError):
    """The request conflicts with the current state."""

    status = HTTPStatus.CONFLICT
    code = "conflict"


class PayloadTooLarge(AppError):
    """The request body is larger than the limit."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "body_too_large"
    default_detail = "The request body is larger than 65536 bytes."
    hint = "Send fewer emails per request (a batch holds up to 1,000), or smaller ones."


class Unprocessable(AppError):
    """Invalid input: `errors` names each field."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "validation_failed"
    default_detail = "Invalid input: body.port."
    hint = "Correct the fields listed in `errors` and send the request again."
    example_errors = (
        FieldError(
            field="body.port",
            message="Input should be less than or equal to 65535",
            type="less_than_equal",
        ),
    )


class UnknownQueryParameter(Unprocessable):
    """A query parameter the operation does not take (a typo is reported, not dropped)."""

    code = "unknown_query_parameter"
    default_detail = "1 query parameter(s) this operation does not take."
    hint = "Send only the query parameters the operation's spec lists (see /docs)."


class RateLimited(AppError):
    """Too many requests: `Retry-After` says when to try again."""

    status = HTTPStatus.TOO_MANY_REQUESTS
    code = "rate_limited"
    default_detail = "Too many connection checks for this tenant."
    hint = "Wait 30 s before trying again."
    documented_headers: ClassVar[dict[str, str]] = {
        "Retry-After": "Seconds to wait before trying again."
    }

    def __init__(
        self, detail: str | None = None, *, retry_after_seconds: int, **kwargs: Any
    ) -> None:
        kwargs.setdefault("headers", {"Retry-After": str(max(1, retry_after_seconds))})
        kwargs.setdefault("hint", f"Wait {max(1, retry_after_seconds)} s before trying again.")
        super().__init__(detail, **kwargs)


class ServiceUnavailable(AppError):
    """A dependency of the service does not answer now."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "unavailable"
    hint = "Try again in a moment."


class UpstreamUnavailable(ServiceUnavailable):
    """The service behind the gateway did not answer (it restarts, or is scaled to zero)."""

    code = "upstream_unavailable"
    hint = "Try again in a moment; the request was not passed on."


class MessageError(AblError):
    """A consumed message could not be handled. Not a request's answer: it has no status, and
    the broker's policy (shared/broker.py) is all that reads it."""

    code = "message_failed"


class TransientMessageError(MessageError):
    """Try the message again later: it goes back to the queue (and, past the delivery limit,
    to the dead-letter queue)."""

    code = "transient_failure"


class PermanentMessageError(MessageError):
    """The message can never succeed (unparsable, unknown version): dead-letter it at once."""

    code = "permanent_failure"
