"""Copper Labs (enterprise API): an electric meter's readings, and a gas meter's, as readings.

From Copper's document (``copper-labs-api.md``): OAuth2 client credentials at
``auth.copperlabs.com`` (JSON ``grant_type``, ``client_id``, ``client_secret``, ``audience``),
then ``Authorization: <token_type> <access_token>``; **100 requests an hour and 1000 a day**;
``Cache-Control`` says how long an answer stays valid (a minute to a year). Its enterprise client
reads ``GET /partner/<eid>/meter`` (the meters: ``id``, ``type``, ``uom``, ``created_at``) and
``GET /partner/<eid>/meter/<mid>/readings?start=&end=`` (``results[{time, actual, value}]``,
``value`` in kWh, ``actual`` in the meter's unit). ``value`` becomes ``1.8.1``; tariff 2 and the
returned registers stay 0, except for a net meter (its type says ``net``), whose net index is
split into delivered (rises) and returned (falls) counters. A gas meter's ``actual`` in CCF
(hundreds of cubic feet, x 2.8316846592) becomes the M-Bus gas register with its own timestamp.

The budget is the point: a year of daily windows is 365 requests (730 with gas), four hours at
100 an hour, so windows widen up to a week when an import would not fit an hour's budget (a
year is then 73 requests, or 53 a meter with gas), the budget is kept on disk (a restart must
not spend the day's 1000 again), and a fresh answer is read from the disk cache instead of
being fetched again.
"""

from __future__ import annotations

import math
import random
import types
import urllib.parse
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from dsmr_logger.config import CopperImportConfig
from dsmr_logger.imports.cloud import (
    Bucket,
    Clock,
    CloudClient,
    CloudConfigError,
    CloudError,
    RateLimiter,
    RejectedError,
    ResponseCache,
    Token,
    TokenHolder,
    oauth_token,
    open_http,
)
from dsmr_logger.imports.run import Carry, Origin
from dsmr_logger.imports.series import (
    Index,
    SeriesError,
    Window,
    day_windows,
    number,
    parse_time,
    power,
    stated_time,
    zulu,
)
from dsmr_logger.telegram.build import GasReading, MeterReading

AUDIENCE = "https://api.copperlabs.com"
HOURLY = Bucket(100, 3600.0)
DAILY = Bucket(1000, 86400.0)
HOURLY_SHARE = 90
"""Requests an import plans per hour of budget (the rest: token, meter list, a retry or two)."""
LONGEST_WINDOW_DAYS = 7
TOKEN_LIFETIME = 86400.0
"""Assumed when the token answer states no ``expires_in``."""
PAGE = 1000
SECTION = "import.copper"
CUBIC_METRES_PER: Mapping[str, Decimal] = types.MappingProxyType(
    {
        "ccf": Decimal("2.8316846592"),  # 100 cubic feet
        "cf": Decimal("0.028316846592"),
        "ft3": Decimal("0.028316846592"),
        "m3": Decimal(1),
    }
)


def window_days(total_days: float, meters: int) -> int:
    """Days per request so that the whole import fits an hour's budget, 1 to 7."""
    needed = math.ceil(max(total_days, 1) * meters / HOURLY_SHARE)
    return max(1, min(LONGEST_WINDOW_DAYS, needed))


class CopperCloud:
    """One electric meter (and optionally a gas meter) of a Copper enterprise, read in windows
    sized to the budget; the limiter and the cache live in the state folder."""

    name = "copper"
    header = "CPR5\\Copper"
    lead = timedelta(hours=1)

    def __init__(
        self,
        config: CopperImportConfig,
        *,
        zone: ZoneInfo,
        clock: Clock,
        draw: Callable[[], float] = random.random,
        notify: Callable[[str], None] = lambda text: None,
        state_directory: Path,
    ) -> None:
        self.config = config
        self.zone = zone
        self.clock = clock
        auth = urllib.parse.urlsplit(config.auth_url)
        self._auth_path = auth.path or "/"
        self.auth = CloudClient(
            "copper (auth)",
            open_http(
                f"{auth.scheme}://{auth.netloc}",
                timeout=config.timeout,
                ca_file=config.ca_file,
                section=SECTION,
            ),
            RateLimiter([Bucket(1, 1.0), Bucket(60, 3600.0)], clock),
            clock=clock,
            draw=draw,
            secrets=[config.client_secret],
            notify=notify,
        )
        self.limiter = RateLimiter(
            [HOURLY, DAILY], clock, margin=1.0, state=state_directory / "copper-budget.json"
        )
        self.client = CloudClient(
            self.name,
            open_http(
                config.base_url, timeout=config.timeout, ca_file=config.ca_file, section=SECTION
            ),
            self.limiter,
            clock=clock,
            tokens=TokenHolder(self._login, clock),
            cache=ResponseCache(state_directory / "copper-cache", clock),
            draw=draw,
            secrets=[config.client_secret],
            notify=notify,
        )
        self._partner = f"/partner/{urllib.parse.quote(config.enterprise_id, safe='')}"
        self._net = False
        self._gas_factor = CUBIC_METRES_PER["ccf"]

    async def _login(self) -> Token:
        now = self.clock.time()
        body = {
            "grant_type": "client_credentials",
            "client_id": self.config.client_id,
            "client_secret": self.config.client_secret,
            "audience": AUDIENCE,
        }
        try:
            answer = await self.auth.json("POST", self._auth_path, body=body, auth=False)
        except RejectedError as exc:
            if exc.status in (400, 401, 403):
                raise CloudConfigError(
                    f"{SECTION}.client_id/client_secret: Copper refused them (HTTP {exc.status})"
                ) from exc
            raise
        return oauth_token(
            answer, now, default_lifetime=TOKEN_LIFETIME, endpoint=f"copper: POST {self._auth_path}"
        )

    async def start(self, *, first_needed: bool = True) -> Origin:
        meters = await self._meters()
        found = {str(m.get("id")): m for m in meters}
        listing = "; ".join(f"{i} ({m.get('type')})" for i, m in list(found.items())[:20])
        electric = found.get(self.config.meter)
        if electric is None:
            raise CloudConfigError(
                f"{SECTION}.meter: enterprise {self.config.enterprise_id} has no meter "
                f"{self.config.meter!r}; its meters: {listing or 'none'}"
            )
        kind = str(electric.get("type") or "")
        if not (kind.startswith("power") or "elec" in kind):
            raise CloudConfigError(
                f"{SECTION}.meter: {self.config.meter} is a {kind!r} meter, not electric; "
                f"the meters: {listing}"
            )
        self._net = "net" in kind.lower()
        description = f"{kind} meter {self.config.meter}"
        if self.config.gas_meter is not None:
            gas = found.get(self.config.gas_meter)
            if gas is None or gas.get("type") != "gas":
                what = "no such meter" if gas is None else f"a {gas.get('type')!r} meter"
                raise CloudConfigError(
                    f"{SECTION}.gas_meter: {self.config.gas_meter!r} is {what}, not gas; "
                    f"the meters: {listing}"
                )
            unit = str(gas.get("uom") or "ccf").lower()
            if unit not in CUBIC_METRES_PER:
                raise CloudConfigError(
                    f"{SECTION}.gas_meter: its unit {unit!r} is not one of "
                    f"{', '.join(CUBIC_METRES_PER)}"
                )
            self._gas_factor = CUBIC_METRES_PER[unit]
            description += f" and gas meter {self.config.gas_meter} ({unit})"
        return Origin(
            key=f"{self.config.enterprise_id}/{self.config.meter}/{self.config.gas_meter or ''}",
            first=stated_time(electric.get("created_at"), "created_at"),
            description=description,
        )

    async def _meters(self) -> list[Mapping[str, Any]]:
        meters: list[Mapping[str, Any]] = []
        offset = 0
        while True:
            try:
                page = await self.client.json(
                    "GET", f"{self._partner}/meter", query={"limit": PAGE, "offset": offset}
                )
            except RejectedError as exc:
                if exc.status in (403, 404):
                    raise CloudConfigError(
                        f"{SECTION}.enterprise_id: {self.config.enterprise_id!r} is not an "
                        f"enterprise these credentials may read (HTTP {exc.status})"
                    ) from exc
                raise
            if not isinstance(page, list):
                raise CloudError(f"copper: GET {self._partner}/meter: expected a list")
            meters.extend(m for m in page if isinstance(m, Mapping))
            if len(page) < PAGE:
                return meters
            offset += PAGE

    def windows(self, start: datetime, end: datetime) -> list[Window]:
        meters = 2 if self.config.gas_meter else 1
        days = window_days((end - start).total_seconds() / 86400, meters)
        windows = day_windows(start, end, self.zone, days=days)
        if len(windows) > 1 and windows[0].end - windows[0].start <= self.lead:
            # The hour before --since rides with the first window: no request of its own.
            windows[:2] = [Window(windows[0].start, windows[1].end)]
        return windows

    async def _series(self, meter: str, window: Window) -> list[tuple[datetime, Mapping[str, Any]]]:
        path = f"{self._partner}/meter/{urllib.parse.quote(meter, safe='')}/readings"
        answer = await self.client.json(
            "GET", path, query={"start": zulu(window.start), "end": zulu(window.end)}
        )
        results = answer.get("results") if isinstance(answer, Mapping) else answer
        if results is None:
            results = []
        if not isinstance(results, list):
            raise CloudError(f"copper: GET {path}: expected results as a list")
        try:
            rows = {parse_time(r.get("time"), "time"): r for r in results if isinstance(r, Mapping)}
        except SeriesError as exc:
            raise CloudError(f"copper: GET {path}: {exc}") from exc
        return sorted((t, r) for t, r in rows.items() if window.holds(t))

    async def readings(self, window: Window, carry: Carry) -> tuple[list[MeterReading], Carry]:
        electric = await self._series(self.config.meter, window)
        gas_series = (
            await self._series(self.config.gas_meter, window) if self.config.gas_meter else []
        )
        previous = Index.from_json(carry.get("last"))
        net = carry.get("net")
        gas = _gas_from_json(carry.get("gas"))
        gas_points = iter(gas_series)
        pending = next(gas_points, None)
        readings = []
        try:
            for stamp, row in electric:
                value = number(row.get("value"), f"{stamp.isoformat()} value", negative=self._net)
                if self._net:
                    net = _split_net(net, value)
                    index = Index(stamp, Decimal(net["delivered"]), Decimal(net["returned"]))
                else:
                    index = Index(stamp, value, Decimal(0))
                while pending is not None and pending[0] <= stamp:
                    actual = number(pending[1].get("actual"), f"gas {pending[0].isoformat()}")
                    gas = GasReading(pending[0], actual * self._gas_factor)
                    pending = next(gas_points, None)
                delivered, returned = power(previous, index)
                readings.append(
                    MeterReading(
                        timestamp=stamp,
                        delivered_1=index.delivered,
                        returned_1=index.returned,
                        power_delivered=delivered,
                        power_returned=returned,
                        gas=gas,
                        equipment_id=self.config.meter,
                    )
                )
                previous = index
        except SeriesError as exc:
            raise CloudError(f"copper: readings from {zulu(window.start)}: {exc}") from exc
        next_carry: Carry = {}
        if previous is not None:
            next_carry["last"] = previous.to_json()
        if net is not None:
            next_carry["net"] = net
        if gas is not None:
            next_carry["gas"] = {"at": gas.taken_at.isoformat(), "m3": str(gas.cubic_metres)}
        return readings, next_carry

    def budget(self) -> str:
        free = self.limiter.free_at()
        when = (
            "now"
            if free <= self.clock.time()
            else datetime.fromtimestamp(free).strftime("%H:%M:%S")
        )
        return f"{self.limiter.describe()}; next request {when}"

    def requests(self) -> int:
        return self.client.requests + self.auth.requests

    async def close(self) -> None:
        await self.client.close()
        await self.auth.close()


def _split_net(state: Any, value: Decimal) -> dict[str, str]:
    """A net meter's index into rising counters: a rise of the net index was delivered energy,
    a fall was returned energy. The counters start at the first net value seen (its positive
    part delivered, its negative part returned)."""
    if not isinstance(state, Mapping):
        return {
            "value": str(value),
            "delivered": str(max(value, Decimal(0))),
            "returned": str(max(-value, Decimal(0))),
        }
    change = value - Decimal(state["value"])
    delivered = Decimal(state["delivered"]) + max(change, Decimal(0))
    returned = Decimal(state["returned"]) + max(-change, Decimal(0))
    return {"value": str(value), "delivered": str(delivered), "returned": str(returned)}


def _gas_from_json(data: Any) -> GasReading | None:
    if not isinstance(data, Mapping):
        return None
    try:
        return GasReading(datetime.fromisoformat(data["at"]), Decimal(data["m3"]))
    except (KeyError, TypeError, ValueError, ArithmeticError):
        return None
