"""What a server's answer means for the telegram: delivered, retry, dead-letter, or fix the sink.

The table follows DSMR-reader's real behaviour (see the README's design notes): 201 (200 from old
servers) stores the reading; ``500 Failed to parse telegram`` and 400 will never succeed however
often they are resent; 401/403/405 mean the sink is misconfigured (key, or API disabled); a 500 with
an HTML page is ambiguous — a database outage looks exactly like a telegram the server chokes on —
so it is retried, and the queue decides with a probe whether the telegram is poison.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    """Transient: the server or the network is down or busy; resend after a backoff."""
    SUSPECT = "suspect"
    """Ambiguous 500: retried; if the telegram behind it gets through, this one is poison."""
    REJECTED = "rejected"
    """Permanent for this telegram: dead-letter it and go on with the next."""
    MISCONFIGURED = "misconfigured"
    """Permanent for the sink: keep everything queued, tell the user, probe slowly."""


@dataclass(frozen=True, slots=True)
class Answer:
    verdict: Verdict
    status: int | None = None
    body: str = ""
    error: str | None = None
    """Connection or timeout error, when there was no HTTP answer."""
    retry_after: float | None = None

    def describe(self) -> str:
        if self.status is None:
            return self.error or "no answer"
        body = " ".join(self.body.split())[:120]
        return f"HTTP {self.status} {body}".rstrip()


PARSE_FAILURE_BODY = "Failed to parse telegram"

# status → (verdict, advice for the log); anything not listed falls back by class below.
STATUS_TABLE: dict[int, tuple[Verdict, str]] = {
    200: (Verdict.DELIVERED, "stored (older DSMR-reader)"),
    201: (Verdict.DELIVERED, "stored"),
    400: (Verdict.REJECTED, "the server refused this telegram's fields"),
    401: (Verdict.MISCONFIGURED, "check the sink's api_key (DSMR-reader: Configuration → API)"),
    403: (Verdict.MISCONFIGURED, "check the sink's api_key (DSMR-reader: Configuration → API)"),
    404: (Verdict.MISCONFIGURED, "check the sink's url: no DSMR-reader API at that address"),
    405: (Verdict.MISCONFIGURED, "enable the API in DSMR-reader (Configuration → API)"),
    408: (Verdict.RETRY, "request timeout"),
    429: (Verdict.RETRY, "rate limited"),
    502: (Verdict.RETRY, "bad gateway"),
    503: (Verdict.RETRY, "service unavailable"),
    504: (Verdict.RETRY, "gateway timeout"),
}


def classify(status: int, body: str, retry_after: str | None = None) -> Answer:
    """Map one HTTP answer to its verdict (the body matters only for 500)."""
    if status in STATUS_TABLE:
        verdict = STATUS_TABLE[status][0]
    elif status == 500:
        # Equality, not "in": Django's debug traceback page quotes the view's source, which
        # contains this text, and a database outage must not dead-letter good telegrams.
        verdict = Verdict.REJECTED if body.strip() == PARSE_FAILURE_BODY else Verdict.SUSPECT
    elif 500 <= status < 600:
        verdict = Verdict.RETRY
    elif 400 <= status < 500:
        verdict = Verdict.REJECTED
    elif 200 <= status < 300:
        verdict = Verdict.DELIVERED
    else:
        verdict = Verdict.RETRY
    return Answer(verdict, status, body[:2000], retry_after=parse_retry_after(retry_after))


def no_answer(error: BaseException) -> Answer:
    """Connection refused, reset, DNS failure, TLS failure or timeout: always worth a retry."""
    text = str(error) or type(error).__name__
    return Answer(Verdict.RETRY, error=f"{type(error).__name__}: {text}"[:300])


def advice(answer: Answer) -> str:
    if answer.status in STATUS_TABLE:
        return STATUS_TABLE[answer.status][1]
    return ""


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (the delta form; an HTTP date is not honoured)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
