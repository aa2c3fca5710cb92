"""What one email costs in CPU outside its SMTP transaction, each way beside the one it replaced:

1. the send job: pydantic `SendJob(...).model_dump_json()` against orjson and msgspec on a dict
   (the dispatcher writes millions a day; msgspec is measured only when it is installed);
2. the email's bytes: the standard library's `EmailMessage` with the SMTP policy (its header
   registry) against `services.sender.message.build_wire`, for a plain and a rich email.

    .venv/bin/python -m bench.encoding
"""

from __future__ import annotations

import importlib
import timeit
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import orjson

from services.sender.message import build_message, build_wire, wire_bytes
from shared.messages import EmailContent, SendJob

NOW = datetime(2026, 11, 26, 9, 30, tzinfo=UTC)


def per_call_us(function: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(function, number=number, repeat=3)) / number * 1e6


def main() -> None:
    fields = {
        "job_id": uuid.uuid4(),
        "email_id": uuid.uuid4(),
        "tenant_id": uuid.uuid4(),
        "server_id": uuid.uuid4(),
        "attempt": 1,
        "reserved_day": "2026-11-26",
    }
    content = {
        "to": "lead@example.org",
        "subject": "Quick question about your Q4 plans, Jürgen",
        "text": "Hi Jürgen,\n\n" + "A line of the body of the email.\n" * 20,
        "html": None,
        "reply_to": None,
        "headers": {"X-Campaign": "november"},
        "message_id": "abl.0190",
        "date": NOW,
    }

    def pydantic() -> bytes:
        return SendJob(**fields, content=EmailContent(**content)).model_dump_json().encode()

    def with_orjson() -> bytes:
        return orjson.dumps({"version": 1, **fields, "content": content}, option=orjson.OPT_UTC_Z)

    baseline = per_call_us(pydantic, 20_000)
    print(f"send job, pydantic model_dump_json: {baseline:6.2f} us")
    fast = per_call_us(with_orjson, 20_000)
    print(
        f"send job, orjson (kept):            {fast:6.2f} us  ratio {baseline / fast:.1f}x faster"
    )
    try:
        msgspec = importlib.import_module("msgspec")
    except ImportError:
        print("send job, msgspec: not installed")
    else:
        encoder = msgspec.json.Encoder()
        other = per_call_us(
            lambda: encoder.encode({"version": 1, **fields, "content": content}), 20_000
        )
        print(
            f"send job, msgspec:                  {other:6.2f} us  {baseline / other:.1f}x faster"
        )
    assert SendJob.model_validate_json(with_orjson()) == SendJob.model_validate_json(pydantic())

    plain = EmailContent(to="lead@example.org", subject="Hello", text="Hi!", message_id="abl.1")
    rich = EmailContent(**{**content, "html": "<p>Hi Jürgen,</p>" + "<p>A paragraph.</p>" * 20})
    for name, email in (("plain", plain), ("rich (non-ASCII, text + html)", rich)):

        def stdlib_bytes(email: EmailContent = email) -> bytes:
            built = build_message(email, from_email="s@acme.com", from_name="Acme", now=NOW)
            return wire_bytes(built)

        def our_bytes(email: EmailContent = email) -> bytes:
            return build_wire(email, from_email="s@acme.com", from_name="Acme", now=NOW)

        stdlib, ours = per_call_us(stdlib_bytes, 2000), per_call_us(our_bytes, 2000)
        print(
            f"message bytes, {name}: standard library {stdlib:7.1f} us, build_wire {ours:6.1f} us"
            f"  {stdlib / ours:.0f}x faster"
        )


if __name__ == "__main__":
    main()
