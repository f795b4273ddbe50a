"""Climkit (Swiss self-consumption communities, ZEV/RCP): a meter's raw indices as readings.

From Climkit's API document (``climkit-api.txt``): ``POST /auth`` with the API username and
password gives a JWT valid 15 minutes (``valid_until.$date``, epoch ms); every endpoint allows
at most 1 request a second; ``GET /meter_info/<site>`` lists the site's meters with their type;
``POST /meter_data_raw/<site>/<meter>`` with ``t_s``/``t_e`` (tz-naive UTC) gives the meter's
indices at the end of each 15-minute period: ``en_im`` (imported kWh) becomes ``1.8.1``, ``en_ex``
(exported kWh) ``2.8.1``; Climkit knows no tariffs, so tariff 2 stays 0. Power is derived from
consecutive indices. One request per local day (96 slots; 92 and 100 on DST days), spaced
1.25 s (the document's 1 s plus a margin for the network): a year of history is 365 requests,
about 8 minutes.
"""

from __future__ import annotations

import random
import urllib.parse
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from dsmr_logger.config import ClimkitImportConfig
from dsmr_logger.imports.cloud import (
    Bucket,
    Clock,
    CloudClient,
    CloudConfigError,
    CloudError,
    RateLimiter,
    RejectedError,
    Token,
    TokenHolder,
    open_http,
)
from dsmr_logger.imports.run import Carry, Origin
from dsmr_logger.imports.series import (
    Index,
    SeriesError,
    Window,
    day_windows,
    naive_utc,
    number,
    parse_time,
    power,
    stated_time,
)
from dsmr_logger.telegram.build import MeterReading

TOKEN_LIFETIME = 900.0
"""The document's 15 minutes: assumed when ``valid_until`` is missing or not believable."""
SPACING_MARGIN = 0.25
"""Seconds added to the document's 1 s between requests: arrival times jitter on the way."""
SLOT = timedelta(minutes=15)
SECTION = "import.climkit"


class ClimkitCloud:
    """One electricity meter of a Climkit site, a local day per request, 1.25 s apart."""

    name = "climkit"
    header = "CLK5\\Climkit"
    lead = SLOT

    def __init__(
        self,
        config: ClimkitImportConfig,
        *,
        zone: ZoneInfo,
        clock: Clock,
        draw: Callable[[], float] = random.random,
        notify: Callable[[str], None] = lambda text: None,
        state_directory: Path | None = None,
    ) -> None:
        self.config = config
        self.zone = zone
        self.clock = clock
        http = open_http(
            config.base_url, timeout=config.timeout, ca_file=config.ca_file, section=SECTION
        )
        # Kept on disk too: a rerun started within the second must not come too early.
        self.limiter = RateLimiter(
            [Bucket(1, 1.0)],
            clock,
            margin=SPACING_MARGIN,
            state=state_directory / "climkit-budget.json" if state_directory else None,
        )
        self.client = CloudClient(
            self.name,
            http,
            self.limiter,
            clock=clock,
            tokens=TokenHolder(self._login, clock),
            draw=draw,
            secrets=[config.password],
            notify=notify,
        )
        self._site = urllib.parse.quote(config.site, safe="")
        self._meter = urllib.parse.quote(config.meter, safe="")

    async def _login(self) -> Token:
        now = self.clock.time()
        credentials = {"username": self.config.username, "password": self.config.password}
        try:
            answer = await self.client.json("POST", "/auth", body=credentials, auth=False)
        except RejectedError as exc:
            if exc.status in (400, 401, 403):
                raise CloudConfigError(
                    f"{SECTION}.username/password: Climkit refused them (HTTP {exc.status}); "
                    "use the API credentials, not the portal login"
                ) from exc
            raise
        token = answer.get("access_token") if isinstance(answer, Mapping) else None
        if not isinstance(token, str) or not token:
            raise CloudError("climkit: POST /auth: the answer holds no access_token")
        expires = now + TOKEN_LIFETIME
        if isinstance(answer, Mapping) and answer.get("valid_until") is not None:
            try:
                stated = parse_time(answer["valid_until"], "valid_until").timestamp()
            except SeriesError:
                stated = expires
            # A clock set wrong on either side could make a token look dead on arrival or
            # longer-lived than it is (ours an hour behind: 75 minutes): a stated expiry is
            # believed only when it lies within the document's 15 minutes.
            if now < stated:
                expires = min(stated, expires)
        return Token(f"Bearer {token}", expires)

    async def start(self, *, first_needed: bool = True) -> Origin:
        meters = await self._get(f"/meter_info/{self._site}", "site")
        if not isinstance(meters, list):
            raise CloudError(f"climkit: GET /meter_info/{self._site}: expected a list of meters")
        listing = "; ".join(_describe(m) for m in meters if isinstance(m, Mapping)) or "none"
        found = next(
            (m for m in meters if isinstance(m, Mapping) and str(m.get("id")) == self.config.meter),
            None,
        )
        if found is None:
            raise CloudConfigError(
                f"{SECTION}.meter: site {self.config.site} has no meter {self.config.meter!r}; "
                f"its meters: {listing}"
            )
        if found.get("type") != "electricity":
            raise CloudConfigError(
                f"{SECTION}.meter: {self.config.meter} is a {found.get('type')} meter, not "
                f"electricity; the site's meters: {listing}"
            )
        if found.get("is_rule_meter") is True:
            raise CloudConfigError(
                f"{SECTION}.meter: {self.config.meter} is a rule (virtual) meter, and Climkit "
                f"keeps raw data only for physical ones; the site's meters: {listing}"
            )
        # The site's creation date is the default --since; with one given, a request saved.
        info = (
            await self._get(f"/installation_infos/{self._site}", "site") if first_needed else None
        )
        first: datetime | None = None
        site_name = self.config.site
        if isinstance(info, Mapping):
            site_name = str(info.get("name") or site_name)
            first = stated_time(info.get("creation_date"), "creation_date")
        return Origin(
            key=f"{self.config.site}/{self.config.meter}",
            first=first,
            description=f"meter {found.get('name') or self.config.meter!r} of site {site_name!r}",
        )

    async def _get(self, path: str, key: str) -> Any:
        try:
            return await self.client.json("GET", path)
        except RejectedError as exc:
            if exc.status in (403, 404):
                raise CloudConfigError(
                    f"{SECTION}.{key}: {self.config.site!r} is not a site these credentials may "
                    f"read (HTTP {exc.status})"
                ) from exc
            raise

    def windows(self, start: datetime, end: datetime) -> list[Window]:
        return day_windows(start, end, self.zone)

    async def readings(self, window: Window, carry: Carry) -> tuple[list[MeterReading], Carry]:
        path = f"/meter_data_raw/{self._site}/{self._meter}"
        rows = await self.client.json(
            "POST", path, body={"t_s": naive_utc(window.start), "t_e": naive_utc(window.end)}
        )
        if rows is None or rows == {}:
            rows = []  # an empty window, as some servers say it
        if not isinstance(rows, list):
            raise CloudError(f"climkit: POST {path}: expected a list, not {type(rows).__name__}")
        try:
            indices = sorted(
                {i.timestamp: i for i in map(_index, rows) if window.holds(i.timestamp)}.values(),
                key=lambda i: i.timestamp,
            )
        except SeriesError as exc:
            raise CloudError(f"climkit: POST {path} ({naive_utc(window.start)}..): {exc}") from exc
        previous = Index.from_json(carry.get("last"))
        readings = []
        for index in indices:
            delivered, returned = power(previous, index)
            readings.append(
                MeterReading(
                    timestamp=index.timestamp,
                    delivered_1=index.delivered,
                    returned_1=index.returned,
                    power_delivered=delivered,
                    power_returned=returned,
                    equipment_id=self.config.meter,
                )
            )
            previous = index
        return readings, ({"last": previous.to_json()} if previous is not None else {})

    def budget(self) -> str:
        return "1 request a second"

    def requests(self) -> int:
        return self.client.requests

    async def close(self) -> None:
        await self.client.close()


def _index(row: Any) -> Index:
    if not isinstance(row, Mapping):
        raise SeriesError(f"a data point is not an object: {row!r}")
    stamp = parse_time(row.get("timestamp"), "timestamp")
    if row.get("en_im") is None:
        raise SeriesError(f"{stamp.isoformat()}: no en_im (is this an electricity meter?)")
    exported = row.get("en_ex")
    return Index(
        stamp,
        number(row["en_im"], f"{stamp.isoformat()} en_im"),
        number(exported, f"{stamp.isoformat()} en_ex") if exported is not None else Decimal(0),
    )


def _describe(meter: Mapping[str, Any]) -> str:
    """``id (electricity, consumption, 'Général', prim_ad 12)``: prim_ad may be an int or str."""
    details = [str(meter.get(k)) for k in ("type", "mode") if meter.get(k) is not None]
    if meter.get("name"):
        details.append(repr(str(meter["name"])))
    if meter.get("prim_ad") is not None:
        details.append(f"prim_ad {meter['prim_ad']}")
    return f"{meter.get('id')} ({', '.join(details)})"
