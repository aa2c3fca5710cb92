"""The OpenAPI shape every app shares, so that a generated client reads well: operation ids from
the route names (`add_server` → `addServer`), one described tag per resource, and every error
response as problem+json whose `code` enum lists what that operation can answer.

The codes come from the error classes (shared/errors.py's hierarchy) that a route, or one of its
dependencies, declares with `raises`, plus what the framework answers for any route of its shape
(a body: 400, 413, 422; a path parameter: 404, 422). A code is spelled once, on its class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts

from shared.errors import (
    AppError,
    Endpoint,
    MalformedBody,
    NotFound,
    PayloadTooLarge,
    Problem,
    Unprocessable,
    UpstreamUnavailable,
    declared_errors,
)
from shared.problems import PROBLEM_MEDIA_TYPE

REF_TEMPLATE = "#/components/schemas/{model}"
# The public API's paths: the gateway (and the Ingress) pass these on, and answer 503
# `upstream_unavailable` themselves when the service behind does not answer.
GATEWAY_PREFIX = "/v1/"
PROBLEM_REF = REF_TEMPLATE.format(model="Problem")

# One tag per resource; the internal ones appear in openapi/internal.json only.
TAGS = {
    "tenants": "Tenants and their API keys, created by an operator with the admin token.",
    "servers": "A tenant's SMTP servers: checked (connect, TLS, authenticate) before they are "
    "stored, then paused, resumed or checked again.",
    "oauth": "Connecting a Google or Microsoft mailbox with OAuth 2.0 instead of a password.",
    "warmup": "Where a server stands in its warmup: today's allowance and 30 days ahead.",
    "capacity": "How many servers a monthly volume needs, warmup counted.",
    "messages": "Emails: queued one at a time or in batches, dispatched through the tenant's "
    "servers, then read back with their status.",
    "sending-profile": "The tenant's time zone and the hours its servers may send in.",
    "suppressions": "Addresses and domains that are never sent to.",
    "unsubscribe": "The public one-click unsubscribe links (RFC 8058) written into emails.",
    "webhooks": "Endpoints that receive signed events (Standard Webhooks) instead of polling.",
    "health": "Probes for the orchestrator.",
    "credentials": "Internal: a server's credentials for the senders.",
    "server-health": "Internal: a sender reports a server that refused its credentials.",
    "jobs": "Internal: which send jobs are still their email's attempt.",
    "results": "Internal: send results a sender could not publish through the broker.",
    "mailbox": "Internal: the mailbox reader's access to a server's INBOX, its reads and the "
    "bounce-rate pauses it decides.",
    "copies": "Internal: the registry's tenants and servers, as the scheduler's and the webhooks "
    "service's own copies hold them.",
}


_EXAMPLES = "__abl_response_examples__"


def example_response(status: int, value: dict[str, Any]) -> Callable[[Endpoint], Endpoint]:
    """A success response's example, written into the spec as it is: FastAPI drops the nulls
    of the examples it is given, and a required nullable field must stay."""

    def mark(function: Endpoint) -> Endpoint:
        setattr(function, _EXAMPLES, {**getattr(function, _EXAMPLES, {}), status: value})
        return function

    return mark


def operation_id(route: APIRoute) -> str:
    """`generate_unique_id_function`: the route's function name in camelCase. Unique because
    the function names are (tests/test_openapi.py checks it across the public and internal
    specs)."""
    first, *rest = route.name.split("_")
    return first + "".join(word.capitalize() for word in rest)


def _dependants(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _dependants(sub)


def route_errors(dependant: Dependant) -> list[type[AppError]]:
    """The errors the route of `dependant` can answer with, each once, in a stable order."""
    every = list(_dependants(dependant))
    has_body = any(d.body_params for d in every)
    has_path = any(d.path_params for d in every)
    implied: list[type[AppError]] = []
    if has_body:
        implied += [MalformedBody, PayloadTooLarge]
    if has_path:
        # A path whose id does not fit the route's converter (`{id:uuid}`) matches no route.
        implied.append(NotFound)
    if has_body or has_path or any(d.query_params or d.header_params for d in every):
        implied.append(Unprocessable)
    # The endpoint's own after its dependencies': `route.dependant` is the endpoint's.
    declared = [error for d in reversed(every) for error in declared_errors(d.call)]
    return list(dict.fromkeys([*implied, *declared]))


def _example(error: type[AppError], code: str, instance: str) -> dict[str, Any]:
    status = HTTPStatus(error.status)
    detail, hint = error.code_examples.get(code, (error.default_detail, error.hint))
    problem = Problem(
        type=f"/problems/{code}",
        title=status.phrase,
        status=status,
        detail=detail,
        code=code,
        hint=hint,
        instance=instance,
        errors=list(error.__dict__.get("example_errors", ())) or None,
    )
    return problem.model_dump(mode="json", exclude_none=True)


def problem_responses(errors: list[type[AppError]], instance: str) -> dict[str, Any]:
    """One response per status; its schema is the Problem with `code` narrowed to an enum."""
    by_status: dict[int, dict[str, type[AppError]]] = {}
    for error in errors:
        for code in error.documented_codes():
            by_status.setdefault(int(error.status), {}).setdefault(code, error)
    responses: dict[str, Any] = {}
    for status, codes in sorted(by_status.items()):
        narrowed = {
            "type": "object",
            "properties": {"code": {"type": "string", "enum": list(codes)}},
            "required": ["code"],
        }
        headers = {
            name: {"description": description, "schema": {"type": "string"}}
            for error in codes.values()
            for name, description in error.documented_headers.items()
        }
        responses[str(status)] = {
            "description": "; ".join(
                f"`{code}`: {error.summary()}" for code, error in codes.items()
            ),
            **({"headers": headers} if headers else {}),
            "content": {
                PROBLEM_MEDIA_TYPE: {
                    "schema": {"allOf": [{"$ref": PROBLEM_REF}, narrowed]},
                    "examples": {
                        code: {"summary": error.summary(), "value": _example(error, code, instance)}
                        for code, error in codes.items()
                    },
                }
            },
        }
    return responses


def _cross_field_rules_as_all_of(schema: dict[str, Any]) -> None:
    """A cross-field rule beside the properties (`text` or `html`; a preset or host, port and
    security) as `allOf: [{anyOf}]`, which means the same in JSON Schema. Generators read an
    `anyOf` beside properties as "this object, or one of these" (openapi-typescript typed
    `{"text": "x"}` as an email); inside `allOf` it is "this object, and one of these"."""
    if "anyOf" in schema and "properties" in schema:
        schema["allOf"] = [*schema.get("allOf", []), {"anyOf": schema.pop("anyOf")}]


def add_component(spec: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    """Add a model's JSON schema (from `REF_TEMPLATE`) and the schemas it refers to."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for added in (defs := schema.pop("$defs", {})).values():
        _cross_field_rules_as_all_of(added)
    _cross_field_rules_as_all_of(schema)
    schemas.update(defs)
    schemas[name] = schema


def shape(app: FastAPI, spec: dict[str, Any]) -> None:
    """Rewrite FastAPI's spec of `app` in place: problem responses, tags."""
    # Included routers stay nested in FastAPI's route table: their contexts are the routes as
    # mounted (prefix, dependencies, include_in_schema).
    for route in iter_route_contexts(app.routes):
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        path = str(route.path_format)
        for method in route.methods or ():
            responses = spec["paths"][path][method.lower()]["responses"]
            errors = route_errors(route.dependant)
            if path.startswith(GATEWAY_PREFIX):
                errors.append(UpstreamUnavailable)
            responses.update(problem_responses(errors, path))
            for status, value in getattr(route.endpoint, _EXAMPLES, {}).items():
                responses[str(status)]["content"]["application/json"]["example"] = value
    add_component(spec, "Problem", Problem.model_json_schema(ref_template=REF_TEMPLATE))
    schemas = spec["components"]["schemas"]
    for schema in schemas.values():
        _cross_field_rules_as_all_of(schema)
    # FastAPI's own 422 body, replaced above by the Problem everywhere.
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    used = sorted(
        {
            tag
            for operations in spec["paths"].values()
            for op in operations.values()
            for tag in op.get("tags", ())
        }
    )
    spec["tags"] = [{"name": tag, "description": TAGS.get(tag, "")} for tag in used]


def install_spec(app: FastAPI) -> None:
    """Serve (and let `make openapi` write) the shaped spec."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            shape(app, generate())
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
