"""Write the committed OpenAPI spec of each service: `make openapi`.

A test compares the running app's spec with the committed file, so an API change is always a
reviewed change of `openapi/*.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from services.app import create_app as create_all
from services.registry.api import internal as registry_internal
from services.registry.main import create_app as create_registry
from services.scheduler.api import internal as scheduler_internal
from services.scheduler.main import create_app as create_scheduler
from services.webhooks.main import create_app as create_webhooks
from shared.crypto import generate_key
from shared.settings import Settings
from shared.spec import install_spec, operation_id

SPEC_DIR = Path(__file__).resolve().parent.parent / "openapi"


def placeholder_settings() -> Settings:
    # The spec does not depend on secrets; random ones satisfy the settings' checks.
    return Settings(
        admin_token="x" * 32,
        internal_token="y" * 32,
        unsubscribe_key="u" * 32,
        encryption_keys=generate_key(),
    )


def internal_api() -> FastAPI:
    """Only the service-to-service routes (`/internal/v1`), which the public specs leave out."""
    app = FastAPI(
        title="ABillionLeads internal API",
        version="0.1.0",
        description="Between services only, with `ABL_INTERNAL_TOKEN`; never routed publicly.",
        generate_unique_id_function=operation_id,
    )
    install_spec(app)
    app.include_router(registry_internal.router)
    app.include_router(scheduler_internal.router)
    return app


def specs() -> dict[str, FastAPI]:
    settings = placeholder_settings()
    return {
        "api": create_all(settings),
        "registry": create_registry(settings),
        "scheduler": create_scheduler(settings),
        "webhooks": create_webhooks(settings),
        "internal": internal_api(),
    }


def render(app: FastAPI) -> str:
    spec: dict[str, Any] = app.openapi()
    return json.dumps(spec, indent=2, sort_keys=True) + "\n"


def main() -> None:
    SPEC_DIR.mkdir(exist_ok=True)
    for name, app in specs().items():
        path = SPEC_DIR / f"{name}.json"
        path.write_text(render(app))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
