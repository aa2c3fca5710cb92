"""Every Prometheus metric of every service, declared here and only here.

Names follow Prometheus conventions: base units (seconds, bytes), `_total` on counters, and
labels of low cardinality: never an address, a tenant or a server id.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HTTP_REQUESTS = Counter(
    "abl_http_requests_total",
    "HTTP requests handled, by route template and status code.",
    ["service", "method", "route", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "abl_http_request_duration_seconds",
    "Time to handle an HTTP request, by route template.",
    ["service", "method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15),
)
SERVER_VERIFICATIONS = Counter(
    "abl_server_verifications_total",
    "SMTP server connection checks, by result (`ok` or a failure code).",
    ["result"],
)
SERVER_VERIFICATION_DURATION = Histogram(
    "abl_server_verification_duration_seconds",
    "Time an SMTP server connection check took.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 6, 8, 10, 15),
)

OAUTH_CONNECTS = Counter(
    "abl_oauth_connects_total",
    "OAuth connections that came back through the callback, by provider (`unknown` when the "
    "state named no flow) and outcome (`connected`, or the error code the frontend receives; "
    "codes outside the documented list count as `other`).",
    ["provider", "outcome"],
)
OAUTH_TOKEN_REFRESHES = Counter(
    "abl_oauth_token_refreshes_total",
    "Access-token refreshes asked of an OAuth provider, by provider and outcome (`ok`; "
    "`grant_gone`: consent revoked, the server is auth_failed until reconnected; "
    "`unavailable`: the provider could not answer, the sender waits and asks again).",
    ["provider", "outcome"],
)


class MetricsMiddleware:
    """Counts and times every request under its route template, not its raw path."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_code[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            HTTP_REQUESTS.labels(self.service, method, template, str(status_code[0])).inc()
            HTTP_REQUEST_DURATION.labels(self.service, method, template).observe(
                time.perf_counter() - started
            )


def install_metrics(app: FastAPI, service: str) -> None:
    app.add_middleware(MetricsMiddleware, service=service)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


# --- scheduler ---------------------------------------------------------------------------

EMAILS_ACCEPTED = Counter("abl_emails_accepted_total", "Emails accepted by POST /v1/messages.")
EMAILS_FINISHED = Counter(
    "abl_emails_finished_total",
    "Emails by final or intermediate outcome reported by the senders.",
    ["outcome"],
)
SUPPRESSED = Counter(
    "abl_suppressed_total",
    "Emails stopped because their recipient is on the tenant's suppression list, by where "
    "(`intake`: refused by POST /v1/messages; `dispatch`: caught when claimed; `queued`: "
    "stopped in the queue when the address was suppressed).",
    ["stage"],
)
BOUNCES = Counter(
    "abl_bounces_total",
    "Bounces and complaints read from the sending mailboxes, by kind (`hard`, `soft`, "
    "`complaint`).",
    ["kind"],
)
REPLIES = Counter("abl_replies_total", "Replies from recipients read from the sending mailboxes.")
MAILBOX_MESSAGES = Counter(
    "abl_mailbox_messages_total",
    "Messages read (fetched and classified) from the sending mailboxes, by all replicas.",
)
MAILBOX_UNAPPLIED = Counter(
    "abl_mailbox_messages_unapplied_total",
    "Messages read from the sending mailboxes that the database refused; skipped (logged).",
)
MAILBOX_POLLS = Counter(
    "abl_mailbox_polls_total",
    "Reads of a sending mailbox, by result (`ok`, `failed`, `timeout`).",
    ["result"],
)
JOBS_PUBLISHED = Counter("abl_send_jobs_published_total", "Send jobs confirmed by the broker.")
PUBLISH_CONFIRM_DURATION = Histogram(
    "abl_publish_confirm_duration_seconds",
    "Time from publish to broker confirm for one send job.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
RESERVATIONS_REFUSED = Counter(
    "abl_reservations_refused_total",
    "Sends the allowance guard refused (another dispatcher got there first, or the cap).",
)
SCHEDULER_TICK_DURATION = Histogram(
    "abl_scheduler_tick_duration_seconds",
    "Time one dispatch tick took.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RESULTS_APPLIED = Counter(
    "abl_results_applied_total",
    "Result events applied to emails, by outcome; duplicates are counted as `duplicate`.",
    ["outcome"],
)

# --- sender ------------------------------------------------------------------------------

SENDER_OUTCOMES = Counter(
    "abl_sender_outcomes_total",
    "Send attempts by outcome (`sent`, `failed`, `retry`, `unknown`).",
    ["outcome"],
)
SMTP_REPLIES = Counter(
    "abl_smtp_replies_total", "Final SMTP replies of send attempts, by class.", ["reply_class"]
)
DELIVERY_DURATION = Histogram(
    "abl_delivery_duration_seconds",
    "Time one SMTP transaction took, connection set-up included.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 600),
)
JOBS_IN_FLIGHT = Gauge("abl_sender_jobs_in_flight", "Send jobs a worker is handling now.")
JOBS_SKIPPED = Counter(
    "abl_sender_jobs_skipped_total",
    "Jobs acked without sending: the email was already sent, unknown or canceled.",
)

# --- state, refreshed by the scheduler ---------------------------------------------------

EMAILS_BY_STATUS = Gauge(
    "abl_emails",
    "Emails by status, as the scheduler sees them (queued is the backlog).",
    ["status"],
)
SERVERS_BY_STATUS = Gauge(
    "abl_servers",
    "SMTP servers by status (`parked` counts active servers parked for now).",
    ["status"],
)
SERVERS_BY_STEP = Gauge(
    "abl_servers_warmup_step", "Servers at each warmup step (1 to 14).", ["step"]
)
BROKER_QUEUE_MESSAGES = Gauge(
    "abl_broker_queue_messages", "Messages waiting in a broker queue.", ["queue"]
)
DEAD_LETTERED = Counter(
    "abl_dead_lettered_total", "Messages sent to a dead-letter queue.", ["queue"]
)
DEAD_LETTERS_SETTLED = Counter(
    "abl_dead_letters_settled_total",
    "Dead-lettered messages the scheduler consumed, by queue and what it did with them "
    "(requeued: the email is queued again; failed: its attempts were spent; stale: the email "
    "had moved on; parked: unparsable, kept for an operator).",
    ["queue", "action"],
)
EMAILS_SWEPT = Counter(
    "abl_emails_swept_total",
    "Emails found `scheduled` with no result long after their publish, and settled.",
)
RESULTS_REPORTED_DIRECTLY = Counter(
    "abl_sender_results_reported_directly_total",
    "Results a sender gave the scheduler over HTTP because the broker was away.",
)
RESULT_BATCH_SIZE = Histogram(
    "abl_sender_results_per_message",
    "Results carried by each results message a sender published (those that finished while "
    "the previous message waited for its confirm travel together).",
    buckets=(1, 2, 5, 10, 20, 50, 100),
)
DEPENDENCY_WAITS = Counter(
    "abl_sender_dependency_waits_total",
    "Times a sender waited for a service that did not answer (registry, scheduler, broker).",
    ["dependency"],
)
OUTBOX_PUBLISHED = Counter(
    "abl_outbox_published_total",
    "Events published from a service's outbox and confirmed by the broker.",
    ["service"],
)
REGISTRY_CHANGES_APPLIED = Counter(
    "abl_registry_changes_applied_total",
    "Registry changes a service's copy took: `applied` changed it, `stale` was older than "
    "what it held (a replay or a late arrival).",
    ["service", "outcome"],
)
COPY_READS = Counter(
    "abl_copy_reads_total",
    "Reads of the registry's snapshot routes by a service's copy: `rebuild` and `resync` "
    "(whole), `key` and `servers` (for a request that needed a record before its change).",
    ["service", "kind", "outcome"],
)
WEBHOOK_EVENTS = Counter(
    "abl_webhook_events_total",
    "Events the webhooks service received, by event type.",
    ["type"],
)
WEBHOOK_ATTEMPTS = Counter(
    "abl_webhook_attempts_total",
    "Delivery attempts to tenants' endpoints, by outcome: delivered, http_error (a non-2xx "
    "answer), timeout, connect_failed, blocked_host.",
    ["outcome"],
)
WEBHOOK_ATTEMPT_DURATION = Histogram(
    "abl_webhook_attempt_duration_seconds",
    "Time one delivery attempt took, up to the endpoint's answer or the timeout.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15),
)
WEBHOOK_GIVEN_UP = Counter(
    "abl_webhook_given_up_total",
    "Deliveries abandoned after the retry window, and endpoints disabled after failing for days.",
    ["what"],
)
WEBHOOK_BACKLOG = Gauge(
    "abl_webhook_backlog",
    "Deliveries waiting (due now or later) on enabled endpoints.",
)
