"""One error hierarchy for every service, rendered as RFC 9457 problem+json.

Every error carries a stable machine `code` the frontend can switch on and a `hint` a person can
act on. The framework's own errors (404, 405, 422 from validation) are rendered the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any, ClassVar, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

logger = logging.getLogger("abl.errors")

PROBLEM_MEDIA_TYPE = "application/problem+json"


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


class AppError(Exception):
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
        detail = self.default_detail if detail is None else detail
        super().__init__(detail)
        self.detail = detail
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


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        problem.model_dump(exclude_none=True),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


# Fields whose keys are the caller's own text (an email's `headers`): a path into one names the
# position of the key, never the key.
KEYED_FIELDS = frozenset({"headers"})
# pydantic messages of these types quote part of the input (a UUID's bad character, ...).
_QUOTING_TYPES = {"uuid_parsing": "must be a UUID", "uuid_type": "must be a UUID"}


def _field_path(loc: Sequence[Any]) -> str:
    parts: list[str] = []
    for index, part in enumerate(loc):
        if index and loc[index - 1] in KEYED_FIELDS and isinstance(part, str):
            parts.append("*")
        else:
            parts.append(str(part))
    return ".".join(parts)


def _message(error: Any) -> str:
    kind = str(error.get("type", "value_error"))
    message = str(error.get("msg", "invalid value"))
    given = error.get("input")
    if kind in _QUOTING_TYPES:
        return _QUOTING_TYPES[kind]
    if isinstance(given, str) and len(given) >= 3 and given in message:
        return "invalid value"
    return message


def _field_errors(exc: RequestValidationError) -> list[FieldError]:
    # Nothing of the offending input is echoed back, not in the message nor in the path: it may
    # be a password, and an echo is how reflected injection starts.
    return [
        FieldError(
            field=_field_path(error.get("loc", ())),
            message=_message(error),
            type=str(error.get("type", "value_error")),
        )
        for error in exc.errors()
    ]


# What the framework (or a middleware) raises by status, with its code and hint.
_STATUS_ERRORS: dict[int, type[AppError]] = {
    error.status: error
    for error in (MalformedBody, Unauthorized, NotFound, MethodNotAllowed, PayloadTooLarge)
}


def status_problem(status: int, detail: str, instance: str | None = None) -> Problem:
    """The problem for a status the framework (or a middleware) raises, with its code and hint."""
    error = _STATUS_ERRORS.get(status)
    if error is not None:
        return error(detail).to_problem(instance)
    http_status = HTTPStatus(status)
    return AppError(detail, code=http_status.name.lower(), status=http_status).to_problem(instance)


def allowed_methods(request: Request) -> list[str]:
    """The methods of every route (included routers flattened) whose path matches."""
    path = request.scope["path"]
    literal: set[str] = set()
    templated: set[str] = set()
    for context in iter_route_contexts(request.app.router.routes):
        if context.path is None:
            continue
        regex, _, _ = compile_path(context.path)
        if regex.match(path):
            (templated if "{" in context.path else literal).update(context.methods or ())
    # `/v1/suppressions/import` is its own resource, not `/v1/suppressions/{id}` with the id
    # "import": a path the spec lists as written answers with its own methods.
    return sorted(literal or templated)


def _declared_query(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _declared_query(sub)
    return names


def _query_names(route: APIRoute) -> frozenset[str]:
    # Kept on the route: computed once per route, not per request.
    names: frozenset[str] | None = getattr(route, "_abl_query_names", None)
    if names is None:
        names = frozenset(_declared_query(route.dependant))
        route._abl_query_names = names  # type: ignore[attr-defined]
    return names


@raises(UnknownQueryParameter)
def known_query_only(request: Request) -> None:
    """Refuse query parameters the operation does not declare, as its spec has none of them:
    `?staus=queued` is a typo to report, not a filter to drop silently."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    known = _query_names(route)
    unknown = [name for name in request.query_params if name not in known]
    if unknown:
        # The names are the caller's input: counted, never repeated.
        raise UnknownQueryParameter(
            f"{len(unknown)} query parameter(s) this operation does not take.",
            errors=[
                FieldError(field="query", message="not a parameter of this operation", type="extra")
            ],
        )


KnownQueryOnly = Depends(known_query_only)


def _instance(request: Request) -> str | None:
    """The route template (`/v1/servers/{server_id}`), not the path: a path is the caller's
    input, and no error repeats it. None when no route matched."""
    template = getattr(request.scope.get("route"), "path", None)
    return template if isinstance(template, str) else None


def install_problem_handlers(app: FastAPI) -> None:
    async def on_app_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AppError)
        return problem_response(exc.to_problem(_instance(request)), exc.headers)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = _field_errors(exc)
        fields = ", ".join(error.field for error in errors)
        error = Unprocessable(f"Invalid input: {fields}.", errors=errors)
        return problem_response(error.to_problem(_instance(request)))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = HTTPStatus(exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) else status.phrase
        headers = dict(exc.headers or {})
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            # Starlette names the methods of the first route on the path only; a path served
            # by several routes (GET and POST /v1/messages) allows the methods of all of them.
            headers["Allow"] = ", ".join(allowed_methods(request))
        problem = status_problem(status, detail, _instance(request))
        return problem_response(problem, headers)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error(
            "unhandled error on %s %s: %s", request.method, request.url.path, type(exc).__name__
        )
        error = AppError(
            "The server failed to handle this request.",
            hint="Try again; if it keeps failing, report the time and the path.",
        )
        return problem_response(error.to_problem(_instance(request)))

    app.add_exception_handler(AppError, on_app_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


class MessageError(AppError):
    """A consumed message could not be handled."""


class TransientMessageError(MessageError):
    """Try the message again later: it goes back to the queue (and, past the delivery limit,
    to the dead-letter queue)."""

    code = "transient_failure"


class PermanentMessageError(MessageError):
    """The message can never succeed (unparsable, unknown version): dead-letter it at once."""

    code = "permanent_failure"
