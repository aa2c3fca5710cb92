"""Which service answers a public path: the same table as the Kubernetes Ingress."""

from __future__ import annotations

import re

SCHEDULER_PATHS = (
    re.compile(r"^/v1/messages(/.*)?$"),
    re.compile(r"^/v1/capacity$"),
    re.compile(r"^/v1/sending-profile$"),
    re.compile(r"^/v1/suppressions(/.*)?$"),
    re.compile(r"^/v1/unsubscribe/[^/]+$"),
    re.compile(r"^/v1/servers/[^/]+/warmup$"),
)
REGISTRY_PATHS = (re.compile(r"^/v1/(tenants|servers|oauth)(/.*)?$"),)
WEBHOOK_PATHS = (re.compile(r"^/v1/webhooks(/.*)?$"),)


def route(path: str) -> str | None:
    """`scheduler`, `registry`, `webhooks`, or None for a path the public API does not have
    (internal endpoints included: they are never routed from outside)."""
    if any(p.match(path) for p in SCHEDULER_PATHS):
        return "scheduler"
    if any(p.match(path) for p in REGISTRY_PATHS):
        return "registry"
    if any(p.match(path) for p in WEBHOOK_PATHS):
        return "webhooks"
    return None
