"""Reading a model from another service's internal route, for the clients of those routes
(the sender's registry client, the scheduler's mailbox source).

An answer that does not validate (the two services' versions disagree on a field) is reported
without its content: pydantic's error text quotes the input (`input_value=...`), and these
answers carry passwords and access tokens."""

from __future__ import annotations

from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


async def get_model(
    client: httpx.AsyncClient,
    path: str,
    model: type[M],
    *,
    headers: dict[str, str],
    unavailable: type[Exception],
    body: dict[str, Any] | None = None,
    service: str = "registry",
) -> M | None:
    """GET `path` (POST `body` when given) and read the answer as `model`; None on 404.
    Raises `unavailable` when the service cannot be reached, answers another status, or
    answers something that is not a `model`."""
    try:
        if body is None:
            response = await client.get(path, headers=headers)
        else:
            response = await client.post(path, json=body, headers=headers)
    except httpx.HTTPError as exc:
        raise unavailable(f"{service} unreachable: {type(exc).__name__}") from exc
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise unavailable(f"{service} answered {response.status_code}")
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        fields = sorted(
            {".".join(str(part) for part in error["loc"]) or "(body)" for error in exc.errors()}
        )
        raise unavailable(
            f"{service} answered no valid {model.__name__} (fields: {', '.join(fields)})"
        ) from None
