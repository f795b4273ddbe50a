"""The Neurio cloud: a sensor's 5-minute history as readings.

From Neurio's API document (``neurio-api.txt``): ``POST /oauth2/token`` (form,
``grant_type=client_credentials``) gives a bearer token with ``expires_in``; authorised requests
may number **144 an hour** (unauthorised ones, the token request, 120), and every answer says
where the budget stands in ``RateLimit-Limit``, ``RateLimit-Remaining`` and ``RateLimit-Reset``
(milliseconds); ``GET /samples`` with ``granularity=minutes`` covers at most one day per request,
``perPage`` at most 500, paged by ``page``. A day at 5-minute frequency is 288 samples: one
request a day, so a year is 365 requests, two and a half hours of budget; the client pauses when
the headers say the budget is spent rather than running into a 429.

``consumptionEnergy`` and ``generationEnergy`` are cumulative watt-seconds: they become ``1.8.1``
and ``2.8.1`` in kWh (exactly: 159,687,481,246 Ws is 44,357.634 kWh); ``consumptionPower`` and
``generationPower`` (W) become ``1.7.0`` and ``2.7.0`` in kW. Net power and energy, submeters and
appliances have no DSMR register and are left out.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from dsmr_logger.config import NeurioImportConfig
from dsmr_logger.imports.cloud import (
    MAX_RETRY_AFTER,
    Bucket,
    Clock,
    CloudClient,
    CloudConfigError,
    CloudError,
    RateLimiter,
    RejectedError,
    Token,
    TokenHolder,
    oauth_token,
    open_http,
)
from dsmr_logger.imports.run import Carry, Origin
from dsmr_logger.imports.series import (
    EPOCH_MS_ABOVE,
    SeriesError,
    Window,
    day_windows,
    number,
    parse_time,
    stated_time,
    zulu,
)
from dsmr_logger.net.http import HttpClient, Response
from dsmr_logger.telegram.build import MeterReading, kwh_from_ws

AUTHORISED = Bucket(144, 3600.0)
UNAUTHORISED = Bucket(120, 3600.0)
PER_PAGE = 500
SAMPLES_A_DAY = 24 * 60 // 5 + 12
"""At 5-minute frequency, with the autumn DST day's extra hour."""
TOKEN_LIFETIME = 3600.0
SECTION = "import.neurio"


class NeurioCloud:
    """One Neurio sensor's samples, a day (at most 24 hours) per request, paged, within the
    hourly budget the server announces."""

    name = "neurio"
    header = "NEU5\\NeurioCloud"
    lead = timedelta(0)  # power comes with each sample

    def __init__(
        self,
        config: NeurioImportConfig,
        *,
        zone: ZoneInfo,
        clock: Clock,
        draw: Callable[[], float] = random.random,
        notify: Callable[[str], None] = lambda text: None,
        state_directory: Path,
        per_page: int = PER_PAGE,
    ) -> None:
        self.config = config
        self.zone = zone
        self.clock = clock
        self.per_page = per_page
        self.limiter = RateLimiter(
            [AUTHORISED], clock, margin=1.0, state=state_directory / "neurio-budget.json"
        )
        auth_limiter = RateLimiter(
            [UNAUTHORISED], clock, margin=1.0, state=state_directory / "neurio-auth-budget.json"
        )
        self.auth = CloudClient(
            "neurio (auth)",
            self._http(),
            auth_limiter,
            clock=clock,
            draw=draw,
            secrets=[config.client_secret],
            notify=notify,
            observe=lambda response: _observe(response, auth_limiter, clock),
        )
        self.client = CloudClient(
            self.name,
            self._http(),
            self.limiter,
            clock=clock,
            tokens=TokenHolder(self._login, clock),
            draw=draw,
            secrets=[config.client_secret],
            notify=notify,
            observe=lambda response: _observe(response, self.limiter, clock),
        )

    def _http(self) -> HttpClient:
        return open_http(
            self.config.base_url,
            timeout=self.config.timeout,
            ca_file=self.config.ca_file,
            section=SECTION,
        )

    async def _login(self) -> Token:
        now = self.clock.time()
        form = {
            "grant_type": "client_credentials",
            "client_id": self.config.client_id,
            "client_secret": self.config.client_secret,
        }
        try:
            answer = await self.auth.json("POST", "/oauth2/token", form=form, auth=False)
        except RejectedError as exc:
            if exc.status in (400, 401, 403):
                raise CloudConfigError(
                    f"{SECTION}.client_id/client_secret: Neurio refused them (HTTP {exc.status})"
                ) from exc
            raise
        return oauth_token(
            answer, now, default_lifetime=TOKEN_LIFETIME, endpoint="neurio: POST /oauth2/token"
        )

    async def start(self, *, first_needed: bool = True) -> Origin:
        user = await self.client.json("GET", "/users/current")
        sensors: list[str] = []
        first: datetime | None = None
        found = False
        for location in _objects(user, "locations", "the user"):
            for sensor in _objects(location, "sensors", "a location"):
                ids = {str(sensor.get("sensorId")), str(sensor.get("id"))}
                sensors.append(str(sensor.get("sensorId") or sensor.get("id")))
                if self.config.sensor_id in ids:
                    found = True
                    stamp = location.get("createdAt") or user.get("createdAt")
                    if stamp:
                        first = stated_time(stamp, "createdAt")
        if not found:
            raise CloudConfigError(
                f"{SECTION}.sensor_id: {self.config.sensor_id!r} is not a sensor of this "
                f"account; its sensors: {', '.join(sensors) or 'none'}"
            )
        return Origin(
            key=self.config.sensor_id, first=first, description=f"sensor {self.config.sensor_id}"
        )

    def windows(self, start: datetime, end: datetime) -> list[Window]:
        # Local days, but never over 24 hours: the autumn DST day has 25.
        return day_windows(start, end, self.zone, longest=timedelta(days=1))

    async def readings(self, window: Window, carry: Carry) -> tuple[list[MeterReading], Carry]:
        samples: dict[datetime, Mapping[str, Any]] = {}
        page = 1
        while True:
            query: dict[str, str | int] = {
                "sensorId": self.config.sensor_id,
                # The window excludes its start (the previous one had that sample), and so
                # does the request: 288 samples a day are 288, not 289.
                "start": zulu(window.start + timedelta(seconds=1)),
                "end": zulu(window.end),
                "granularity": "minutes",
                "frequency": 5,
                "perPage": self.per_page,
                "page": page,
            }
            answer = await self.client.json("GET", "/samples", query=query)
            if not isinstance(answer, list):
                raise CloudError(f"neurio: GET /samples page {page}: expected a list")
            try:
                for sample in answer:
                    if isinstance(sample, Mapping):
                        samples[parse_time(sample.get("timestamp"), "timestamp")] = sample
            except SeriesError as exc:
                raise CloudError(f"neurio: GET /samples: {exc}") from exc
            if len(answer) < self.per_page:
                break
            if page * self.per_page > 2 * SAMPLES_A_DAY:  # a server paging in circles
                raise CloudError(f"neurio: GET /samples: still full pages at page {page}")
            page += 1
        readings = []
        for stamp in sorted(t for t in samples if window.holds(t)):
            try:
                readings.append(_reading(stamp, samples[stamp], self.config.sensor_id))
            except SeriesError as exc:
                raise CloudError(f"neurio: sample {stamp.isoformat()}: {exc}") from exc
        return readings, carry

    def budget(self) -> str:
        return self.limiter.describe()

    def requests(self) -> int:
        return self.client.requests + self.auth.requests

    async def close(self) -> None:
        await self.client.close()
        await self.auth.close()


def _objects(parent: Any, key: str, what: str) -> list[Mapping[str, Any]]:
    """``parent[key]``: the list of objects ``GET /users/current`` nests (none when absent);
    CloudError when the answer is not shaped as the document describes."""
    if not isinstance(parent, Mapping):
        raise CloudError(f"neurio: GET /users/current: {what} is not an object: {parent!r:.80}")
    children = parent.get(key) or []
    if not isinstance(children, list) or not all(isinstance(c, Mapping) for c in children):
        raise CloudError(
            f"neurio: GET /users/current: {key} of {what} is not a list of objects: "
            f"{children!r:.80}"
        )
    return children


def _reading(stamp: datetime, sample: Mapping[str, Any], sensor: str) -> MeterReading:
    def watts(name: str) -> Decimal:
        value = sample.get(name)
        # A CT clamp put on backwards reports negative power: a meter never does.
        return (
            max(number(value, name, negative=True), Decimal(0)) / 1000
            if value is not None
            else Decimal(0)
        )

    generated = sample.get("generationEnergy")
    return MeterReading(
        timestamp=stamp,
        delivered_1=kwh_from_ws(number(sample.get("consumptionEnergy"), "consumptionEnergy")),
        returned_1=kwh_from_ws(number(generated, "generationEnergy"))
        if generated is not None
        else Decimal(0),
        power_delivered=watts("consumptionPower"),
        power_returned=watts("generationPower"),
        equipment_id=sensor,
    )


def _observe(response: Response, limiter: RateLimiter, clock: Clock) -> None:
    """Pause before the budget is gone: when ``RateLimit-Remaining`` reaches 0, no request
    until ``RateLimit-Reset`` (milliseconds from now, or an epoch in ms when that large); when
    it is missing, unreadable or an epoch already past, for the document's hour."""
    remaining = response.headers.get("ratelimit-remaining", "").strip()
    reset = response.headers.get("ratelimit-reset", "").strip()
    if not _digits(remaining) or int(remaining) > 0:
        return
    now = clock.time()
    until = now + AUTHORISED.period
    if _digits(reset):
        milliseconds = Decimal(reset)  # any length: a wait past a day is refused below
        if milliseconds <= EPOCH_MS_ABOVE:
            until = float(Decimal(now) + milliseconds / 1000)
        elif milliseconds / 1000 > Decimal(now):
            until = float(milliseconds / 1000)
    if until - now > MAX_RETRY_AFTER:
        raise CloudError(
            f"neurio: the hour's budget is spent, and RateLimit-Reset ({reset[:24]}) says it "
            "comes back more than a day from now: not waited for"
        )
    limiter.pause_until(until)


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()
