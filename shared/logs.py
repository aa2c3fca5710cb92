"""Logging set-up: one line per event, levels from `ABL_LOG_LEVEL`, and no secret in the access
log even when a caller puts one in a query string."""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, quote, urlencode

# A query parameter whose name holds one of these words has its value replaced in the access
# log: api_key, token, access_token, password, client_secret, ..., and the OAuth callback's
# authorization `code` and `state`.
SECRET_PARAMETER = re.compile(
    r"api[-_]?key|token|passw|secret|auth|credential|\bcode\b|\bstate\b", re.IGNORECASE
)
REDACTED = "[redacted]"


def redact_path(path: str) -> str:
    """`path` with the value of every secret-looking query parameter replaced."""
    base, question, query = path.partition("?")
    if not question or not SECRET_PARAMETER.search(query):
        return path
    pairs = parse_qsl(query, keep_blank_values=True)
    redacted = [(k, REDACTED if SECRET_PARAMETER.search(k) else v) for k, v in pairs]
    return f"{base}?{urlencode(redacted, safe='[]', quote_via=quote)}"


# Service-to-service and probe traffic: one line per email or per probe would drown the log
# (and cost CPU per email); such requests are logged at DEBUG, failures by their callers.
QUIET_PREFIXES = ("/internal/", "/healthz", "/readyz", "/metrics")


class RedactQueryFilter(logging.Filter):
    """uvicorn's access log record is `%s - "%s %s HTTP/%s" %d` with the path third."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            path = args[2]
            quiet = not logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
            if quiet and path.startswith(QUIET_PREFIXES):
                return False
            record.args = (*args[:2], redact_path(path), *args[3:])
        return True


def redact_access_log() -> None:
    """Install the filter on uvicorn's access logger; call it after uvicorn configured logging
    (its dictConfig replaces handlers, but keeps a logger's filters)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQueryFilter) for f in logger.filters):
        logger.addFilter(RedactQueryFilter())


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # One line per proxied or internal request is noise; failures are logged by the caller.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
    redact_access_log()
