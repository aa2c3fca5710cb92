"""The HTTP side of the error hierarchy: every `AppError` and the framework's own errors (404,
405, 422 from validation) rendered as RFC 9457 problem+json. The one module that maps errors to
responses; `shared/errors.py` knows nothing of FastAPI.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from shared.errors import (
    AppError,
    FieldError,
    MalformedBody,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Problem,
    Unauthorized,
    UnknownQueryParameter,
    Unprocessable,
    raises,
)

logger = logging.getLogger("abl.errors")

PROBLEM_MEDIA_TYPE = "application/problem+json"


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
