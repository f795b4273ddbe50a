"""What a server's answer means for the telegram: delivered, retry, dead-letter, or fix the sink.

The table follows DSMR-reader's real behaviour (see the README's design notes): 201 (200 from old
servers) stores the reading; ``500 Failed to parse telegram`` and 400 will never succeed however
often they are resent; 401/403/405 mean the sink is misconfigured (key, or API disabled); a 500 with
an HTML page is ambiguous — a database outage looks exactly like a telegram the server chokes on —
so it is retried, and the worker decides whether the telegram is poison (``worker.py``).

A redirect (3xx) is a misconfigured URL, not a passing hiccup: following it would turn the POST
into a GET on most servers, and retrying it can never succeed, so the advice names the address the
server points at ("use https://dsmr.example as url").

Every answer also says whether the server **may have stored** the telegram although no success
came back (``maybe_stored``): a read timeout or a connection broken after sending (the HTTP
client's ``ReadTimeout``/``ReadError``/``ProtocolError``), or a gateway (502/504) that may have
passed the request on. A refused connection or a connect timeout (``ConnectError``) certainly
stored nothing. The worker counts resends after a maybe-stored failure as possible duplicates, so
the at-least-once figure is measured, not guessed.
"""

from __future__ import annotations

import enum
import urllib.parse
from dataclasses import dataclass


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    """Transient: the server or the network is down or busy; resend after a backoff."""
    SUSPECT = "suspect"
    """Ambiguous 500: retried; poison only if it keeps failing while the server answers."""
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
    maybe_stored: bool = False
    """Not a success, yet the server may have stored the telegram (sent, answer lost)."""
    location: str | None = None
    """Where a redirect points (absolute, without credentials or query)."""
    hint: str | None = None
    """Advice for this very answer, when the status table's is not specific enough."""

    def describe(self) -> str:
        if self.status is None:
            return self.error or "no answer"
        if self.location is not None:
            return f"HTTP {self.status} redirect to {self.location}"
        body = " ".join(self.body.split())[:120]
        return f"HTTP {self.status} {body}".rstrip()


PARSE_FAILURE_BODY = "Failed to parse telegram"
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAYBE_STORED_STATUSES = frozenset({502, 504})
"""A gateway's failures: it may have passed the request on before the upstream failed."""

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
    **{
        status: (Verdict.MISCONFIGURED, "the server redirects: set the url to where it points")
        for status in REDIRECTS
    },
}


def classify(
    status: int,
    body: str,
    retry_after: str | None = None,
    *,
    location: str | None = None,
    api_path: str = "",
) -> Answer:
    """Map one HTTP answer to its verdict (the body matters only for 500).

    ``location``: a redirect's ``Location`` made absolute against the request's URL; ``api_path``:
    the path the sink appends to its ``url``, to tell which base URL the redirect suggests.
    """
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
    target = hint = None
    if status in REDIRECTS:
        target = _without_secrets(location) if location else None
        hint = redirect_advice(target, api_path) if target or not location else BAD_LOCATION
    return Answer(
        verdict,
        status,
        body[:2000],
        retry_after=parse_retry_after(retry_after),
        maybe_stored=status in MAYBE_STORED_STATUSES,
        location=target,
        hint=hint,
    )


def no_answer(error: BaseException) -> Answer:
    """Connection refused, reset, DNS failure, TLS failure or timeout: always worth a retry.

    Whether it may have been stored comes from the HTTP client's error (``maybe_sent``); an error
    that does not say is taken as "maybe" (the honest side for a duplicate counter).
    """
    text = str(error) or type(error).__name__
    return Answer(
        Verdict.RETRY,
        error=f"{type(error).__name__}: {text}"[:300],
        maybe_stored=bool(getattr(error, "maybe_sent", True)),
    )


def advice(answer: Answer) -> str:
    if answer.hint is not None:
        return answer.hint
    if answer.status in STATUS_TABLE:
        return STATUS_TABLE[answer.status][1]
    return ""


BAD_LOCATION = (
    "the server redirects to an address that is not a valid URL: set the sink's url to "
    "DSMR-reader itself"
)


def absolute_location(base: str, location: str | None) -> str | None:
    """A ``Location`` made absolute against ``base``; as sent when it is no URL at all (the
    server's input: ``http://[::1`` must not raise)."""
    if location is None:
        return None
    try:
        return urllib.parse.urljoin(base, location)
    except ValueError:
        return location


def redirect_advice(location: str | None, api_path: str) -> str:
    """Advice "use https://host as url" when the redirect keeps the API path, else where to."""
    if not location:
        return "the server redirects without saying where: set the sink's url to DSMR-reader itself"
    if api_path and location.endswith(api_path):
        return f"the server redirects to {location}: use {location[: -len(api_path)]} as url"
    return (
        f"the server redirects to {location}: set the sink's url to DSMR-reader's own address "
        "(redirects are not followed)"
    )


def _without_secrets(url: str) -> str | None:
    """The URL without user:password, query or fragment (a redirect may carry a token); None
    when it is not a URL."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # "http://[::1": an IPv6 bracket never closed, a bad address in it
        return None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port is None else f"{host}:{port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (the delta form; an HTTP date is not honoured)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
