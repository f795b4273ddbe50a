"""Fake energy clouds on 127.0.0.1 that enforce their documents' rules, for the import tests.

Each fake is a real aiohttp server implementing the documented endpoints. A request that breaks
a rule is answered as the real service would (401, 429, 400) *and* written to ``violations``;
the tests assert that list empty, so a client that broke a rule fails its test even when it
recovered. Time is the test's ``VirtualClock``, shared with the client under test: the budgets
are real (a request 0.9 virtual seconds after the previous one is a violation), but an hour of
Copper's budget passes in no real time.

- ``ClimkitFake`` (``climkit-api.txt``): ``POST /auth`` → JWT with ``valid_until.$date`` (ms),
  401 on a missing, unknown or expired token; at most one request a second on every endpoint
  (429 closer, and every gap is kept in ``gaps``); ``GET /meter_info/<site>``,
  ``GET /installation_infos/<site>``, ``POST /meter_data_raw/<site>/<meter>`` with tz-naive UTC
  ``t_s``/``t_e`` (an offset, or a window longer than 25 hours, is a violation).
- ``CopperFake`` (``copper-labs-api.md``): OAuth2 client credentials on ``/oauth/token``; 100
  API requests an hour and 1000 a day, sliding (429 with ``Retry-After`` past them, counted
  with the ``history`` of earlier runs); every answer carries ``Cache-Control: max-age``, and a
  resource fetched again while still fresh is a violation.
- ``NeurioFake`` (``neurio-api.txt``): ``POST /oauth2/token`` (form, client credentials); 144
  authorised requests an hour with ``RateLimit-Limit/Remaining/Reset`` counting down (429 past
  them); ``GET /samples`` paginated, at most one day per request for ``minutes`` (400 with the
  document's error body past that).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time as _time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web


class VirtualClock:
    """Wall-clock seconds that move only when someone sleeps (the client's limiter does)."""

    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)

    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)


class RealClock(VirtualClock):
    """The wall clock, for a fake serving a client in another process."""

    def __init__(self) -> None:
        super().__init__(datetime.now(UTC))

    def time(self) -> float:
        return _time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def datetime(self) -> datetime:
        return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the fake saw it."""

    at: float
    method: str
    path: str
    status: int


class FakeCloud:
    """A token-issuing JSON server on 127.0.0.1 with a violations list."""

    def __init__(self, clock: VirtualClock, *, token_ttl: float) -> None:
        self.clock = clock
        self.token_ttl = token_ttl
        self.tokens: dict[str, float] = {}  # token → expiry
        self.revoked: set[str] = set()
        self.issued: list[str] = []
        self.violations: list[str] = []
        self.seen: list[Seen] = []
        self.unauthorised = 0
        self.fail_next: list[tuple[int, dict[str, str]]] = []
        """Answers (status, headers) forced on the next data requests, for retry tests."""
        self.app = web.Application(middlewares=[self._record])
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> Any:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        at = self.clock.time()
        response = await handler(request)
        self.seen.append(Seen(at, request.method, request.path_qs, response.status))
        return response

    def issue(self) -> str:
        token = secrets.token_urlsafe(24)
        self.tokens[token] = self.clock.time() + self.token_ttl
        self.issued.append(token)
        return token

    def revoke_all(self) -> None:
        """The server forgets every token (a restart): the next request gets a 401."""
        self.revoked.update(self.tokens)

    def refuse_token(self, request: web.Request, scheme: str = "Bearer") -> web.Response | None:
        """401 unless the request carries a live token; a token used after its stated expiry is
        also a violation (the client should have renewed it ahead)."""
        header = request.headers.get("Authorization", "")
        given_scheme, _, token = header.partition(" ")
        if given_scheme != scheme or token not in self.tokens:
            self.unauthorised += 1
            self.violations.append(
                f"{request.method} {request.path}: no valid token ({header[:12]!r})"
            )
            return web.json_response({"error": "unauthorized"}, status=401)
        if token in self.revoked:
            self.unauthorised += 1
            return web.json_response({"error": "token revoked"}, status=401)
        if self.clock.time() >= self.tokens[token]:
            self.unauthorised += 1
            self.violations.append(f"{request.method} {request.path}: expired token used")
            return web.json_response({"error": "token expired"}, status=401)
        return None

    def forced(self) -> web.Response | None:
        if not self.fail_next:
            return None
        status, headers = self.fail_next.pop(0)
        return web.json_response({"error": "forced"}, status=status, headers=headers)


# --- Climkit ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClimkitPoint:
    """A meter_data_raw point: indices (kWh) at the end of a 15-minute period."""

    at: datetime  # UTC
    en_im: Decimal
    en_ex: Decimal


def climkit_series(
    first_day: date, days: int, zone: ZoneInfo, *, missing: Callable[[datetime], bool]
) -> list[ClimkitPoint]:
    """Every 15-minute period end from ``first_day``'s local midnight for ``days`` local days
    (92 slots on the spring DST day, 100 in autumn), except the ``missing`` ones; indices rise by
    exact thousandths, and export only around midday."""
    start = datetime.combine(first_day, time(), zone).astimezone(UTC)
    end = datetime.combine(first_day + timedelta(days=days), time(), zone).astimezone(UTC)
    points = []
    imported, exported = Decimal("12345.678"), Decimal("321.000")
    moment, i = start, 0
    while moment < end:
        moment += timedelta(minutes=15)
        i += 1
        imported += Decimal((i * 37) % 250 + 20) / 1000
        if 10 <= moment.astimezone(zone).hour < 15:
            exported += Decimal((i * 11) % 60) / 1000
        if not missing(moment):
            points.append(ClimkitPoint(moment, imported, exported))
    return points


class ClimkitFake(FakeCloud):
    BASE = "/api/v1"

    def __init__(
        self,
        clock: VirtualClock,
        *,
        username: str,
        password: str,
        site: str,
        meters: list[dict[str, Any]],
        data: dict[str, list[ClimkitPoint]],
        zone: ZoneInfo,
        token_ttl: float = 900.0,
        state_valid_until: bool = True,
        creation_date: str = "2024-03-28T23:00:00",
    ) -> None:
        super().__init__(clock, token_ttl=token_ttl)
        self.username, self.password, self.site = username, password, site
        self.meters, self.data, self.zone = meters, data, zone
        self.state_valid_until = state_valid_until
        self.creation_date = creation_date
        self.last_request: float | None = None
        self.gaps: list[float] = []
        self.windows: list[tuple[str, str]] = []
        self.data_requests = 0
        self.revoke_at: int | None = None
        """The data request at which the server forgets its tokens (1 = the first)."""
        self.app.middlewares.append(self._one_per_second)
        base = self.BASE
        self.app.router.add_post(f"{base}/auth", self._auth)
        self.app.router.add_get(f"{base}/meter_info/{{site}}", self._meter_info)
        self.app.router.add_get(f"{base}/installation_infos/{{site}}", self._installation)
        self.app.router.add_post(f"{base}/meter_data_raw/{{site}}/{{meter}}", self._data)

    @property
    def api_url(self) -> str:
        return self.url + self.BASE

    @web.middleware
    async def _one_per_second(self, request: web.Request, handler: Any) -> web.StreamResponse:
        now = self.clock.time()
        if self.last_request is not None:
            gap = now - self.last_request
            self.gaps.append(gap)
            if gap < 1.0:
                self.violations.append(
                    f"{request.method} {request.path} {gap:.3f} s after the last"
                )
                self.last_request = now
                return web.json_response({"message": "Too many requests"}, status=429)
        self.last_request = now
        return await handler(request)

    async def _auth(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("username") != self.username or body.get("password") != self.password:
            return web.json_response({"message": "Bad credentials"}, status=401)
        token = self.issue()
        answer: dict[str, Any] = {"access_token": token}
        if self.state_valid_until:
            answer["valid_until"] = {"$date": int(self.tokens[token] * 1000)}
        return web.json_response(answer)

    async def _meter_info(self, request: web.Request) -> web.Response:
        if (refused := self.refuse_token(request)) is not None:
            return refused
        if request.match_info["site"] != self.site:
            return web.json_response({"message": "Site not found"}, status=404)
        return web.json_response(self.meters)

    async def _installation(self, request: web.Request) -> web.Response:
        if (refused := self.refuse_token(request)) is not None:
            return refused
        if request.match_info["site"] != self.site:
            return web.json_response({"message": "Site not found"}, status=404)
        return web.json_response(
            {
                "site_ref": "ZEV-1",
                "name": "Les Tilleuls",
                "creation_date": self.creation_date,
                "timezone": str(self.zone),
            }
        )

    async def _data(self, request: web.Request) -> web.Response:
        self.data_requests += 1
        if self.data_requests == self.revoke_at:
            self.revoke_all()  # the server restarted: every token it gave is gone
        if (refused := self.refuse_token(request)) is not None:
            return refused
        if (forced := self.forced()) is not None:
            return forced
        body = await request.json()
        try:
            start = datetime.fromisoformat(body["t_s"])
            end = datetime.fromisoformat(body["t_e"])
        except (KeyError, TypeError, ValueError):
            self.violations.append(f"meter_data_raw: unreadable window {body!r}")
            return web.json_response({"message": "bad t_s/t_e"}, status=400)
        if start.tzinfo is not None or end.tzinfo is not None:
            self.violations.append(f"meter_data_raw: t_s/t_e must be tz-naive UTC: {body!r}")
        if end - start > timedelta(hours=25) or end <= start:
            self.violations.append(f"meter_data_raw: window {body['t_s']}..{body['t_e']}")
        self.windows.append((body["t_s"], body["t_e"]))
        start, end = start.replace(tzinfo=UTC), end.replace(tzinfo=UTC)
        points = self.data.get(request.match_info["meter"], [])
        return web.json_response(
            [self._render(p) for p in points if start <= p.at <= end]  # both ends, as servers do
        )

    def _render(self, point: ClimkitPoint) -> dict[str, Any]:
        """What real servers vary on, by local day: numbers or strings; ISO with the local
        offset (+01:00, +02:00) or naive UTC, or ``{"$date": ms}``."""
        local = point.at.astimezone(self.zone)
        style = local.toordinal() % 3
        if style == 0:
            return {
                "timestamp": local.isoformat(),
                "en_im": float(point.en_im),
                "en_ex": float(point.en_ex),
            }
        if style == 1:
            return {
                "timestamp": local.isoformat(),
                "en_im": str(point.en_im),
                "en_ex": str(point.en_ex),
            }
        return {
            "timestamp": {"$date": int(point.at.timestamp() * 1000)},
            "en_im": str(point.en_im),
            "en_ex": str(point.en_ex),
        }


# --- Copper Labs --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CopperPoint:
    """A readings result: ``value`` in kWh (electric) and ``actual`` in the meter's unit."""

    at: datetime
    value: Decimal
    actual: Decimal


def copper_series(
    start: datetime,
    end: datetime,
    step: timedelta,
    *,
    first: Decimal,
    rise: Callable[[int], Decimal],
) -> list[CopperPoint]:
    """A reading every ``step`` in (start, end], the index rising by ``rise(i)`` each time
    (stepped in UTC: local arithmetic would skip or repeat an hour at DST changes)."""
    points, moment, value, i = [], start.astimezone(UTC), first, 0
    while moment + step <= end:
        moment += step
        i += 1
        value += rise(i)
        points.append(CopperPoint(moment, value, value))
    return points


class CopperFake(FakeCloud):
    """Copper's enterprise API. Budgets slide: no 3600 s ever holds more than 100 API requests
    and no 86400 s more than 1000, counting ``history`` (requests of an earlier run)."""

    API = "/api/v2"
    HOURLY, DAILY = 100, 1000

    def __init__(
        self,
        clock: VirtualClock,
        *,
        client_id: str,
        client_secret: str,
        enterprise: str,
        meters: list[dict[str, Any]],
        data: dict[str, list[CopperPoint]],
        token_ttl: float = 86400.0,
        settled_max_age: int = 31536000,
        recent_max_age: int = 60,
    ) -> None:
        super().__init__(clock, token_ttl=token_ttl)
        self.client_id, self.client_secret = client_id, client_secret
        self.enterprise, self.meters, self.data = enterprise, meters, data
        self.settled_max_age, self.recent_max_age = settled_max_age, recent_max_age
        self.history: list[float] = []
        """Times of API requests counted against the budgets (earlier runs' included)."""
        self.fresh_until: dict[str, float] = {}
        self.fetches: dict[str, int] = {}
        self.refetched_while_fresh: list[str] = []
        self.token_requests = 0
        self.app.router.add_post("/oauth/token", self._token)
        self.app.router.add_get(f"{self.API}/partner/{{eid}}/meter", self._meter_list)
        self.app.router.add_get(
            f"{self.API}/partner/{{eid}}/meter/{{mid}}/readings", self._readings
        )

    @property
    def api_url(self) -> str:
        return self.url + self.API

    @property
    def auth_url(self) -> str:
        return self.url + "/oauth/token"

    def used(self, period: float) -> int:
        now = self.clock.time()
        return sum(1 for t in self.history if now - period < t <= now)

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        if request.content_type != "application/json":
            self.violations.append(f"token request as {request.content_type}, not JSON")
        body = await request.json()
        expected = {
            "grant_type": "client_credentials",
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "audience": "https://api.copperlabs.com",
        }
        if body != expected:
            return web.json_response(
                {"error": "access_denied", "error_description": "Unauthorized"}, status=401
            )
        token = self.issue()
        return web.json_response(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": int(self.token_ttl),
                "scope": "partner",
            }
        )

    def _budget(self, request: web.Request) -> web.Response | None:
        """429 past either budget (a violation: the client must not get there)."""
        for period, limit in ((3600.0, self.HOURLY), (86400.0, self.DAILY)):
            if self.used(period) >= limit:
                self.violations.append(
                    f"{request.path_qs}: {limit} requests in {period:g} s already"
                )
                oldest = min(t for t in self.history if t > self.clock.time() - period)
                wait = int(oldest + period - self.clock.time()) + 1
                return web.json_response(
                    {"detail": "Too many requests"}, status=429, headers={"Retry-After": str(wait)}
                )
        self.history.append(self.clock.time())
        return None

    def _cached(self, request: web.Request, max_age: int, payload: Any) -> web.Response:
        key = request.path_qs
        now = self.clock.time()
        self.fetches[key] = self.fetches.get(key, 0) + 1
        if self.fresh_until.get(key, 0.0) > now:
            self.refetched_while_fresh.append(key)
            self.violations.append(f"{key} fetched again while fresh")
        self.fresh_until[key] = now + max_age
        return web.json_response(payload, headers={"Cache-Control": f"private, max-age={max_age}"})

    def _refused(self, request: web.Request) -> web.Response | None:
        if (refused := self.refuse_token(request)) is not None:
            return refused
        if (over := self._budget(request)) is not None:
            return over
        if request.match_info["eid"] != self.enterprise:
            return web.json_response({"detail": "Forbidden"}, status=403)
        return self.forced()

    async def _meter_list(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        limit = int(request.query.get("limit", "1000"))
        offset = int(request.query.get("offset", "0"))
        return self._cached(request, 3600, self.meters[offset : offset + limit])

    async def _readings(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        mid = request.match_info["mid"]
        meter = next((m for m in self.meters if m["id"] == mid), None)
        if meter is None:
            return web.json_response({"detail": "Not found"}, status=404)
        try:
            start = datetime.strptime(request.query["start"], "%Y-%m-%dT%H:%M:%SZ")
            end = datetime.strptime(request.query["end"], "%Y-%m-%dT%H:%M:%SZ")
        except (KeyError, ValueError):
            self.violations.append(f"{request.path_qs}: start/end not as %Y-%m-%dT%H:%M:%SZ")
            return web.json_response({"detail": "bad start/end"}, status=400)
        start, end = start.replace(tzinfo=UTC), end.replace(tzinfo=UTC)
        results = [
            {
                "time": p.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "actual": float(p.actual),
                "value": float(p.value),
            }
            for p in self.data.get(mid, [])
            if start <= p.at <= end
        ]
        settled = end.timestamp() < self.clock.time() - 86400
        payload = {"meter_id": mid, "meter_type": meter["type"], "sum_usage": 0, "results": results}
        return self._cached(
            request, self.settled_max_age if settled else self.recent_max_age, payload
        )


# --- Neurio -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NeurioSample:
    at: datetime
    consumption_ws: int
    generation_ws: int
    consumption_w: int
    generation_w: int


def neurio_series(start: datetime, end: datetime) -> list[NeurioSample]:
    """A sample every 5 minutes in (start, end]; energies in cumulative watt-seconds."""
    samples, moment, used, made, i = [], start.astimezone(UTC), 159_687_481_246, 2_345_678_901, 0
    while moment + timedelta(minutes=5) <= end:
        moment += timedelta(minutes=5)
        i += 1
        use_w, make_w = 300 + (i * 97) % 2500, (i * 53) % 1800 if 8 <= moment.hour < 17 else 0
        used += use_w * 300 + i % 7  # watt-seconds of the 5 minutes, plus odd ones
        made += make_w * 300
        samples.append(NeurioSample(moment, used, made, use_w, make_w))
    return samples


NEURIO_RANGE_ERROR = {
    "status": 400,
    "code": "invalid_request",
    "message": "Your request could not be processed. See 'errors' property for more details.",
    "errors": [
        {
            "code": "invalid_request",
            "field": "end",
            "resource": "",
            "message": "Maximum time range for 'minutes' granularity is 1 day.",
        }
    ],
}


class NeurioFake(FakeCloud):
    """Neurio's API: a fixed hourly window from its first authorised request, 144 in it."""

    BASE = "/v1"
    LIMIT = 144

    def __init__(
        self,
        clock: VirtualClock,
        *,
        client_id: str,
        client_secret: str,
        sensor: str,
        samples: list[NeurioSample],
        token_ttl: float = 3600.0,
        created_at: str = "2024-01-01T00:00:00Z",
    ) -> None:
        super().__init__(clock, token_ttl=token_ttl)
        self.client_id, self.client_secret, self.sensor = client_id, client_secret, sensor
        self.samples, self.created_at = samples, created_at
        self.window_start: float | None = None
        self.used = 0
        self.remaining_seen: list[int] = []
        self.pages: list[tuple[str, int]] = []
        base = self.BASE
        self.app.router.add_post(f"{base}/oauth2/token", self._token)
        self.app.router.add_get(f"{base}/users/current", self._user)
        self.app.router.add_get(f"{base}/samples", self._samples)

    @property
    def api_url(self) -> str:
        return self.url + self.BASE

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if request.content_type != "application/x-www-form-urlencoded":
            self.violations.append(f"token request as {request.content_type}")
        if (
            form.get("grant_type") != "client_credentials"
            or form.get("client_id") != self.client_id
            or form.get("client_secret") != self.client_secret
        ):
            return web.json_response(
                {"code": "invalid_client", "message": "Bad client"}, status=401
            )
        token = self.issue()
        return web.json_response(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": int(self.token_ttl),
                "created_at": self.clock.datetime().strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )

    def _budget(self) -> tuple[dict[str, str], bool]:
        """The RateLimit-* headers after counting this request, and whether it was over."""
        now = self.clock.time()
        if self.window_start is None or now >= self.window_start + 3600:
            self.window_start, self.used = now, 0
        self.used += 1
        remaining = max(0, self.LIMIT - self.used)
        reset_ms = int((self.window_start + 3600 - now) * 1000)
        headers = {
            "RateLimit-Limit": str(self.LIMIT),
            "RateLimit-Remaining": str(remaining),
            "RateLimit-Reset": str(reset_ms),
        }
        self.remaining_seen.append(remaining)
        return headers, self.used > self.LIMIT

    def _authorised(self, request: web.Request) -> tuple[web.Response | None, dict[str, str]]:
        if (refused := self.refuse_token(request)) is not None:
            return refused, {}
        headers, over = self._budget()
        if over:
            self.violations.append(f"{request.path_qs}: past {self.LIMIT} requests this hour")
            return web.json_response({"code": "rate_limited"}, status=429, headers=headers), headers
        if (forced := self.forced()) is not None:
            return forced, headers
        return None, headers

    async def _user(self, request: web.Request) -> web.Response:
        refused, headers = self._authorised(request)
        if refused is not None:
            return refused
        user = {
            "id": "sp94LQOykAMgkAyJye",
            "name": "Test User",
            "createdAt": self.created_at,
            "locations": [
                {
                    "id": "loc1",
                    "name": "home",
                    "timezone": "Europe/Amsterdam",
                    "sensors": [
                        {
                            "id": self.sensor,
                            "sensorId": self.sensor,
                            "name": "sensor 1",
                            "sensorType": "powerblaster",
                        }
                    ],
                }
            ],
        }
        return web.json_response(user, headers=headers)

    async def _samples(self, request: web.Request) -> web.Response:
        refused, headers = self._authorised(request)
        if refused is not None:
            return refused
        q = request.query

        def invalid(field: str, message: str) -> web.Response:
            body = dict(NEURIO_RANGE_ERROR)
            body["errors"] = [
                {"code": "invalid_request", "field": field, "resource": "", "message": message}
            ]
            return web.json_response(body, status=400, headers=headers)

        if q.get("sensorId") != self.sensor:
            return web.json_response({"code": "not_found"}, status=404, headers=headers)
        if q.get("granularity") != "minutes":
            self.violations.append(f"granularity {q.get('granularity')!r}")
            return invalid("granularity", "Valid granularity values are: minutes, ...")
        frequency, per_page, page = (
            int(q.get(k, d)) for k, d in (("frequency", "1"), ("perPage", "10"), ("page", "1"))
        )
        if frequency % 5 or not 1 <= per_page <= 500 or not 1 <= page <= 100000:
            self.violations.append(f"frequency/perPage/page {frequency}/{per_page}/{page}")
            return invalid("perPage", "out of range")
        start = datetime.fromisoformat(q["start"].replace("Z", "+00:00"))
        end = datetime.fromisoformat(q["end"].replace("Z", "+00:00"))
        if end - start > timedelta(days=1):
            self.violations.append(f"{q['start']}..{q['end']}: more than a day")
            return web.json_response(NEURIO_RANGE_ERROR, status=400, headers=headers)
        chosen = [s for s in self.samples if start <= s.at <= end]
        shown = chosen[(page - 1) * per_page : page * per_page]
        self.pages.append((q["start"], page))
        body = [
            {
                "consumptionPower": s.consumption_w,
                "consumptionEnergy": s.consumption_ws,
                "generationPower": s.generation_w,
                "generationEnergy": s.generation_ws,
                "netPower": s.consumption_w - s.generation_w,
                "netEnergy": s.consumption_ws - s.generation_ws,
                "submeters": [{"power": 10, "energy": 4, "name": "dryer", "channelNumber": 4}],
                "timestamp": s.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            }
            for s in shown
        ]
        return web.json_response(body, headers=headers)


def json_body(text: str) -> Any:
    return json.loads(text)


def query(path_qs: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path_qs).query))
