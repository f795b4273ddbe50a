"""One client for every energy cloud an import reads: tokens, budgets, retries and caching.

Why one module: each cloud's document sets rules a client must keep, and breaking them costs the
user the import. Climkit allows 1 request a second; Copper 100 an hour and 1000 a day (a year of
daily windows is 365 requests: four hours at 100/hour, and a restart must not start the day's
count afresh); Neurio 144 an hour, announced in ``RateLimit-*`` headers. So the budget is enforced
here, before a request leaves, by a limiter with one bucket per rule on an injected clock (a test
runs an hour's budget in no real time), persisted to a file where a budget outlives a run. Tokens
are renewed before they expire and once on a 401, never in a loop. ``Retry-After`` (seconds or an
HTTP date) is obeyed on 429 and 503, other 5xx answers and connection failures are retried with
capped, jittered backoff, and after ``attempts`` tries the error names the endpoint. A response
marked fresh by ``Cache-Control: max-age`` is kept on disk and not fetched again while fresh,
also by the next run.

It sends through the project's one HTTP client (``net.http``): a JSON request and its answer
are all an import needs, and its failure kinds (not sent / maybe sent) are the ones retried here.
Secrets never reach a log line or an error: each client knows the secrets it holds and
``redact`` removes them from any text it passes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import math
import random
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import structlog

from dsmr_logger import __version__
from dsmr_logger.net.http import (
    HttpClient,
    HttpError,
    Response,
    field_value_problem,
    parse_json,
    tls_context,
)

MAX_RETRY_AFTER = 86400.0
"""A server asking to wait longer than a day is not waited for: the import stops and says so."""
SHOWN_BODY = 2000
"""Characters of an error answer's body shown to the user (its whitespace runs made one space)."""


class Clock(Protocol):
    """Wall-clock seconds and sleeping: the real ones, or a test's that sleeps in no real time."""

    def time(self) -> float: ...
    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class CloudError(Exception):
    """The import cannot go on; the message names the endpoint and what went wrong."""


class CloudConfigError(CloudError):
    """The cloud refused what the configuration says (credentials, site, meter): fix a key."""


class RejectedError(CloudError):
    """The cloud answered 4xx to a request: its body is part of the message, as sent."""

    def __init__(self, endpoint: str, status: int, body: str) -> None:
        super().__init__(
            f"{endpoint}: HTTP {status}: {body}" if body else f"{endpoint}: HTTP {status}"
        )
        self.status = status
        self.body = body


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``****`` (longest first: one may contain another),
    also as a URL or a JSON string writes it: an error answer may echo the request it refused
    (a 422 that repeats the password it found wanting, escaped as ``p\u00e4ss\"word``)."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        forms = {
            secret,
            urllib.parse.quote(secret, safe=""),
            urllib.parse.quote_plus(secret, safe=""),
            json.dumps(secret)[1:-1],
            json.dumps(secret, ensure_ascii=False)[1:-1],
        }
        for form in sorted(forms, key=len, reverse=True):
            text = text.replace(form, "****")
    return text


# --- the budget ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bucket:
    """At most ``limit`` requests in any ``period`` seconds."""

    limit: int
    period: float

    def describe(self) -> str:
        names = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day"}
        return f"{self.limit}/{names.get(self.period, f'{self.period:g} s')}"


class RateLimiter:
    """Grants requests so that no ``period`` of any bucket ever holds more than its ``limit``,
    counting the requests of earlier runs when it has a ``state`` file.

    Invariant: every granted request's time is in ``_granted`` (those older than the longest
    period are forgotten); a request is granted only when, for each bucket, fewer than ``limit``
    granted times lie within ``period + margin`` before now, and not before ``_paused_until``.
    The windows slide, so whatever way a server counts (fixed or sliding windows) the client stays
    inside. ``margin`` covers the network: two requests sent 1 s apart can arrive closer. A clock
    set back during a run (NTP stepping it) moves every remembered time back with it: a request
    keeps its age and a pause its length, instead of the import waiting for the hour to come round
    again.
    """

    def __init__(
        self,
        buckets: Sequence[Bucket],
        clock: Clock,
        *,
        margin: float = 0.0,
        state: Path | None = None,
    ) -> None:
        if not buckets:
            raise ValueError("a limiter needs at least one bucket")
        self.buckets = tuple(sorted(buckets, key=lambda b: b.period))
        self.clock = clock
        self.margin = margin
        self.state = state
        self._horizon = max(b.period for b in buckets) + margin
        self._granted: list[float] = []
        self._paused_until = 0.0
        self._seen = clock.time()
        if state is not None:
            self._load(state)

    def delay(self) -> float:
        """Seconds until a request may go (0: now)."""
        return max(0.0, self.free_at() - self._now())

    def _now(self) -> float:
        """The clock's time, the remembered times moved back by as much as it was set back."""
        now = self.clock.time()
        if now < self._seen:
            jump = self._seen - now
            self._granted = [t - jump for t in self._granted]
            self._paused_until -= jump
        self._seen = now
        return now

    def free_at(self) -> float:
        """When the next request may go (a wall-clock time)."""
        now = self._now()
        at = max(now, self._paused_until)
        for bucket in self.buckets:
            recent = [t for t in self._granted if t > now - bucket.period - self.margin]
            if len(recent) >= bucket.limit:
                at = max(at, recent[-bucket.limit] + bucket.period + self.margin)
        return at

    def take(self) -> None:
        """Record a request going out now (after ``delay()`` said 0)."""
        now = self._now()
        self._granted = [t for t in self._granted if t > now - self._horizon]
        self._granted.append(now)
        self._save()

    def pause_until(self, moment: float) -> None:
        """No request before ``moment`` (a server's ``Retry-After`` or budget reset)."""
        if moment > self._paused_until:
            self._paused_until = moment
            self._save()

    def left(self) -> list[tuple[Bucket, int]]:
        """Each bucket and the requests it allows now."""
        now = self._now()
        return [
            (b, max(0, b.limit - sum(1 for t in self._granted if t > now - b.period - self.margin)))
            for b in self.buckets
        ]

    def describe(self) -> str:
        """``budget left: 93 of 100/hour, 985 of 1000/day`` for progress lines."""
        parts = [f"{left} of {bucket.describe()}" for bucket, left in self.left()]
        return "budget left: " + ", ".join(parts)

    def _load(self, path: Path) -> None:
        try:
            saved = json.loads(path.read_text())
            granted = [float(t) for t in saved.get("granted", [])]
            paused = float(saved.get("paused_until", 0.0))
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise CloudError(
                f"{path}: unreadable request budget ({exc}); delete it to start afresh"
            ) from exc
        now = self.clock.time()
        # A time in the future (the clock was set back) still counts, as if made now: never
        # forget a request, but never let a clock error lock the import for months either.
        self._granted = sorted(min(t, now) for t in granted if t > now - self._horizon)
        self._paused_until = min(paused, now + MAX_RETRY_AFTER)

    def _save(self) -> None:
        if self.state is None:
            return
        write_atomically(
            self.state,
            json.dumps({"granted": self._granted, "paused_until": self._paused_until}),
        )


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path``'s content in one step: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


# --- tokens -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    """An ``Authorization`` header value and when it stops working (wall-clock seconds)."""

    authorization: str
    expires_at: float

    def __repr__(self) -> str:  # never the token itself, whatever prints it
        return f"Token(expires_at={self.expires_at})"

    @property
    def secret(self) -> str:
        """The token after the scheme, whole: one with a space in it is masked entirely."""
        return self.authorization.partition(" ")[2]


class TokenHolder:
    """Hands out a token with time to live, renewing it ahead of its expiry.

    Invariant: ``fetch`` runs only when there is no token, the token would expire within
    ``ahead(lifetime)`` seconds, or a request was refused with the current token
    (``invalidate``); the caller renews at most once per refused request, so a server that
    refuses every token ends the import instead of looping.
    """

    def __init__(self, fetch: Callable[[], Awaitable[Token]], clock: Clock) -> None:
        self._fetch = fetch
        self._clock = clock
        self._token: Token | None = None
        self._issued_at = 0.0
        self.renewals = 0
        self.secrets: set[str] = set()
        """Every token handed out (for ``redact``)."""

    def stale(self) -> bool:
        if self._token is None:
            return True
        lifetime = self._token.expires_at - self._issued_at
        ahead = min(60.0, lifetime / 4)  # a 15-minute token is renewed a minute early
        return self._clock.time() >= self._token.expires_at - ahead

    async def renew(self) -> None:
        issued = self._clock.time()
        token = await self._fetch()
        self._token, self._issued_at = token, issued
        self.secrets.add(token.secret)
        self.renewals += 1
        structlog.get_logger("dsmr_logger.imports").debug(
            "token renewed", valid_for=round(token.expires_at - issued)
        )

    def invalidate(self) -> None:
        self._token = None

    @property
    def authorization(self) -> str:
        assert self._token is not None, "renew() first"
        return self._token.authorization


# --- caching ------------------------------------------------------------------------------------


DELTA_SECONDS_MAX = 2**31
"""The largest ``max-age`` taken as it is (RFC 9111 1.2.2: a bigger one means this)."""


def max_age(headers: Mapping[str, str]) -> float | None:
    """Seconds a response stays fresh per ``Cache-Control`` (less its ``Age``), or None."""
    directives = {}
    for part in headers.get("cache-control", "").split(","):
        name, _, value = part.strip().partition("=")
        directives[name.lower()] = value.strip('"')
    if "no-store" in directives or "no-cache" in directives or "max-age" not in directives:
        return None
    age, fresh = headers.get("age", "0").strip() or "0", directives["max-age"]
    if not (fresh.isascii() and fresh.isdigit() and age.isascii() and age.isdigit()):
        return None  # delta-seconds are digits (RFC 9111 1.2.2): not "inf", "1e400" or "-5"
    seconds = min(int(fresh), DELTA_SECONDS_MAX) - int(age)
    return seconds if seconds > 0 else None


class ResponseCache:
    """Answers still fresh per their ``Cache-Control``, one file each, kept across runs.

    Invariant: a stored answer is returned only while ``now < fresh_until``; expired files are
    removed when seen and when the cache opens, and the oldest go while the folder holds more
    than ``max_bytes`` (its size is counted once at opening, then kept up to date). Keys are
    method and path with query, never a credential.
    """

    def __init__(self, directory: Path, clock: Clock, *, max_bytes: int = 64 * 1024 * 1024):
        self.directory = directory
        self.clock = clock
        self.max_bytes = max_bytes
        self.hits = 0
        self._bytes = 0
        for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
            self.get_file(path)  # drops the expired and damaged ones
            with contextlib.suppress(FileNotFoundError):
                self._bytes += path.stat().st_size
        self._trim()

    def _file(self, key: str) -> Path:
        return self.directory / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")

    def get(self, key: str) -> bytes | None:
        found = self.get_file(self._file(key), key)
        if found is not None:
            self.hits += 1
        return found

    def get_file(self, path: Path, key: str | None = None) -> bytes | None:
        """The body stored in ``path`` while fresh (and for ``key``, when given)."""
        try:
            entry = json.loads(path.read_text())
            fresh_until = float(entry["fresh_until"])
            body = str(entry["body"]).encode()
            stored_key = entry["key"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            self._remove(path)  # a damaged entry is only a missed saving
            return None
        if self.clock.time() >= fresh_until:
            self._remove(path)
            return None
        return body if key is None or stored_key == key else None

    def put(self, key: str, body: bytes, seconds: float) -> None:
        try:
            text = body.decode()
        except UnicodeDecodeError:
            return
        path = self._file(key)
        self._remove(path)
        entry = json.dumps({"key": key, "fresh_until": self.clock.time() + seconds, "body": text})
        write_atomically(path, entry)
        self._bytes += len(entry.encode())
        if self._bytes > self.max_bytes:
            self._trim()

    def _remove(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            path.unlink()
            self._bytes -= size

    def _trim(self) -> None:
        if self._bytes <= self.max_bytes:
            return
        files = sorted(self.directory.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for path in files:
            if self._bytes <= self.max_bytes:
                return
            self._remove(path)


# --- the client ---------------------------------------------------------------------------------


def retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` in seconds from now: delta-seconds or an HTTP date; None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - now)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Pauses between attempts: ``initial`` doubling to ``cap``, each jittered to 50-100 %."""

    initial: float = 1.0
    cap: float = 60.0
    attempts: int = 6

    def pause(self, attempt: int, draw: Callable[[], float]) -> float:
        return min(self.cap, self.initial * 2.0 ** (attempt - 1)) * (0.5 + draw() / 2)


class CloudClient:
    """JSON requests to one cloud host, within its budget, with its token.

    Invariant: a request is sent only after ``limiter`` granted it (every attempt counts); a 401
    with a token leads to one renewal and one repeat, a second 401 ends the import; no request is
    attempted more than ``backoff.attempts`` times.
    """

    def __init__(
        self,
        name: str,
        http: HttpClient,
        limiter: RateLimiter,
        *,
        clock: Clock,
        tokens: TokenHolder | None = None,
        cache: ResponseCache | None = None,
        backoff: Backoff = Backoff(),
        draw: Callable[[], float] = random.random,
        secrets: Iterable[str] = (),
        notify: Callable[[str], None] = lambda text: None,
        observe: Callable[[Response], None] | None = None,
    ) -> None:
        self.name = name
        self.http = http
        self.limiter = limiter
        self.clock = clock
        self.tokens = tokens
        self.cache = cache
        self.backoff = backoff
        self.draw = draw
        self._secrets = set(secrets)
        self.notify = notify
        self.observe = observe
        self.requests = 0
        self._log = structlog.get_logger("dsmr_logger.imports").bind(cloud=name)

    def redact(self, text: str) -> str:
        tokens = self.tokens.secrets if self.tokens is not None else set()
        return redact(text, self._secrets | tokens)

    async def json(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str | int] | None = None,
        body: Any = None,
        form: Mapping[str, str] | None = None,
        auth: bool = True,
    ) -> Any:
        """The decoded JSON answer of a 2xx; raises ``CloudError`` (``RejectedError`` on 4xx)."""
        target = path + ("?" + urllib.parse.urlencode(query) if query else "")
        endpoint = f"{method} {target}"
        cache = self.cache if method == "GET" else None
        if cache is not None and (cached := cache.get(endpoint)) is not None:
            return _decode(cached, endpoint, self.redact)
        payload: bytes | None = None
        content_type: str | None = None
        if body is not None:
            payload, content_type = json.dumps(body).encode(), "application/json"
        elif form is not None:
            payload = urllib.parse.urlencode(form).encode()
            content_type = "application/x-www-form-urlencoded"
        response = await self._send(method, target, payload, content_type, auth, endpoint)
        answer = _decode(response.body, endpoint, self.redact)  # garbage is never cached
        if cache is not None and (seconds := max_age(response.headers)) is not None:
            cache.put(endpoint, response.body, seconds)
        return answer

    async def _send(
        self,
        method: str,
        target: str,
        payload: bytes | None,
        content_type: str | None,
        auth: bool,
        endpoint: str,
    ) -> Response:
        renewed = False
        attempt = 0
        last = ""
        while attempt < self.backoff.attempts:
            await self._wait_for_turn(auth)
            attempt += 1
            headers = {"Accept": "application/json", "User-Agent": f"dsmr-logger/{__version__}"}
            if auth and self.tokens is not None:
                headers["Authorization"] = self.tokens.authorization
                if (problem := field_value_problem(headers["Authorization"])) is not None:
                    raise CloudError(f"{self.name}: the token it gave {problem}; not usable")
            self.limiter.take()
            self.requests += 1
            try:
                response = await self.http.request(
                    method, target, payload, content_type=content_type, headers=headers
                )
            except (HttpError, TimeoutError) as exc:
                last = self.redact(str(exc) or type(exc).__name__)
                self._pause(attempt, endpoint, last)
                continue
            if self.observe is not None:
                self.observe(response)
            status = response.status
            if 200 <= status < 300:
                return response
            # One line: a proxy's HTML page spreads over many, and the error is one (redacted
            # first: a secret may hold a run of spaces).
            body = self.redact(response.body.decode("utf-8", "replace"))
            text = " ".join(body.split())[:SHOWN_BODY]
            if status == 401 and auth and self.tokens is not None:
                if renewed:
                    raise CloudError(
                        f"{self.name}: {endpoint}: HTTP 401 again with a new token: {text}"
                    )
                renewed = True
                attempt -= 1  # the renewal is not a failed attempt
                self._log.info("token refused; renewing it once", endpoint=endpoint)
                self.tokens.invalidate()
                continue
            if status in (429, 503):
                now = self.clock.time()
                wait = retry_after(response.headers.get("retry-after"), now)
                if wait is not None and wait > MAX_RETRY_AFTER:
                    raise CloudError(
                        f"{self.name}: {endpoint}: HTTP {status}, asked to wait {wait / 3600:.0f} h"
                    )
                if wait is None:
                    wait = self.backoff.pause(attempt, self.draw)
                last = f"HTTP {status}" + (f": {text}" if text else "")
                self.limiter.pause_until(now + wait)
                self._log.warning(
                    "server asks to wait", endpoint=endpoint, status=status, seconds=wait
                )
                self.notify(f"{self.name}: HTTP {status} on {endpoint}: waiting {_duration(wait)}")
                continue
            if status >= 500:
                last = f"HTTP {status}" + (f": {text}" if text else "")
                self._pause(attempt, endpoint, last)
                continue
            raise RejectedError(f"{self.name}: {endpoint}", status, text)
        raise CloudError(
            f"{self.name}: {endpoint}: no usable answer after {self.backoff.attempts} attempts; "
            f"last: {last}"
        )

    async def _wait_for_turn(self, auth: bool) -> None:
        """Sleep until the budget allows a request and the token is fresh for it.

        A renewal may itself spend the budget (same host), so the wait starts over after one;
        one renewal per request at most, so a token that looks stale on arrival is still used.
        """
        renewed = False
        while True:
            if (delay := self.limiter.delay()) > 0:
                if delay >= 10:
                    at = datetime.fromtimestamp(self.limiter.free_at()).strftime("%H:%M:%S")
                    self.notify(
                        f"{self.name}: {self.limiter.describe()}; next request at {at} "
                        f"(in {_duration(delay)})"
                    )
                await self.clock.sleep(delay)
                continue
            if auth and self.tokens is not None and self.tokens.stale() and not renewed:
                await self.tokens.renew()
                renewed = True
                continue
            return

    def _pause(self, attempt: int, endpoint: str, why: str) -> None:
        """Hold the next attempt back by the backoff (the limiter sleeps it off)."""
        if attempt >= self.backoff.attempts:
            return
        pause = self.backoff.pause(attempt, self.draw)
        self._log.warning("request failed; retrying", endpoint=endpoint, error=why, seconds=pause)
        self.limiter.pause_until(self.clock.time() + pause)

    async def close(self) -> None:
        await self.http.close()


def _decode(body: bytes, endpoint: str, clean: Callable[[str], str]) -> Any:
    try:
        return parse_json(body, parse_float=Decimal)
    except ValueError as exc:
        shown = clean(body[:200].decode("utf-8", "replace"))
        raise CloudError(f"{endpoint}: answer is not JSON ({exc}): {shown!r}") from None


def _duration(seconds: float) -> str:
    seconds = math.ceil(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def expiry(now: float, seconds: Any, default: float) -> float:
    """When a token given ``seconds`` to live (``expires_in``; missing or odd: ``default``) ends."""
    with contextlib.suppress(TypeError, ValueError):
        value = float(seconds)
        if value > 0 and math.isfinite(value):
            return now + value
    return now + default


def oauth_token(answer: Any, now: float, *, default_lifetime: float, endpoint: str) -> Token:
    """The token an OAuth2 token endpoint answered (RFC 6749 5.1: ``access_token``, ``token_type``,
    ``expires_in``), got at ``now``; ``endpoint`` ("copper: POST /oauth/token") names the answer
    in the error when it holds none."""
    if not isinstance(answer, Mapping) or not isinstance(answer.get("access_token"), str):
        raise CloudError(f"{endpoint}: the answer holds no access_token")
    kind = str(answer.get("token_type") or "Bearer")
    lifetime = expiry(now, answer.get("expires_in"), default_lifetime)
    return Token(f"{kind} {answer['access_token']}", lifetime)


MAX_BODY = 32 * 1024 * 1024
"""A week of minute readings is about 1 MB of JSON; an answer larger than this is cut."""


def open_http(url: str, *, timeout: float, ca_file: Path | None, section: str) -> HttpClient:
    """The HTTP client for ``url``'s host (its path is the prefix of every request).

    A ``ca_file`` that cannot be read is a ``CloudConfigError`` naming ``section.ca_file``.
    """
    context = None
    if url.startswith("https://"):
        try:
            context = tls_context(ca_file=str(ca_file) if ca_file is not None else None)
        except (OSError, ssl.SSLError) as exc:
            raise CloudConfigError(f"{section}.ca_file: cannot use {ca_file}: {exc}") from exc
    return HttpClient(url, timeout=timeout, ssl_context=context, max_body=MAX_BODY)
