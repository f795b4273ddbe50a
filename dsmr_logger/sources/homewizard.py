"""The HomeWizard P1 Meter: a Wi-Fi dongle in the meter's P1 port whose local API serves the raw
telegram, so a home without a cable to a Pi still gets every telegram into the spool.

API v2 (firmware 6.00+, 2025): ``GET https://<host>/api/telegram`` with a token from pairing
(``tools/pair.py``). The device's certificate is issued by HomeWizard's own CA (shipped in
``data/homewizard-ca.pem``, valid to 2031) to the name ``appliance/p1dongle/<serial>``, not to its
address, so the connection is verified against that CA and that name: never ``verify = false``,
which would hand the token, which grants full control of the device, to whoever answers. The
serial is ``meter.serial`` when set (pairing writes it); otherwise it is read from the certificate
presented (the chain checked) and must agree with what ``GET /api`` says, and that name is then
required of every later connection.

API v1 (older firmware, or v2 not used): ``GET http://<host>/api/v1/telegram``, no token, no TLS.

Two traps (``../shared/reference/homewizard/``): the CA is an X.509 version 1 certificate, which
Python 3.13+ refuses by default (``VERIFY_X509_STRICT``), so that flag is cleared in this one
context; and the name is in the certificate's common name (no subjectAltName), which Python only
checks with ``hostname_checks_common_name``.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from dsmr_logger.config import HomeWizardConfig
from dsmr_logger.net.http import ConnectError, HttpClient, HttpError, Response
from dsmr_logger.sources.http_poll import (
    MAX_BODY,
    MeterSilent,
    Misconfigured,
    PollFailed,
    PollingSource,
)
from dsmr_logger.sources.link import describe_failure
from dsmr_logger.sources.p1.framing import Frame

DEVICE_NAME = re.compile(r"appliance/p1dongle/([0-9a-fA-F]{12})")
"""What a P1 Meter's certificate is issued to ("p1dongle": HomeWizard's legacy name for it)."""
PRODUCT_TYPE = "HWE-P1"
NO_TELEGRAM = "telegram:no-telegram-received"
_HOSTNAME_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH


def shipped_ca() -> str:
    """HomeWizard's "Appliance Access CA" certificate (PEM), as the package ships it."""
    return resources.files("dsmr_logger.sources").joinpath("data/homewizard-ca.pem").read_text()


def device_tls(ca_file: Path | None = None, *, check_name: bool = True) -> ssl.SSLContext:
    """A context that trusts only HomeWizard's CA (or ``ca_file``) and checks the device's name.

    ``check_name=False`` only for the first contact of pairing, when the name is not known yet:
    the chain is still verified, and the name is read from the certificate presented.
    """
    if ca_file is None:
        context = ssl.create_default_context(cadata=shipped_ca())
    else:
        context = ssl.create_default_context(cafile=str(ca_file))
    # The CA is X.509 v1, which strict verification (Python 3.13's default) refuses outright.
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    context.hostname_checks_common_name = True  # the name is in the CN; there is no SAN
    if not check_name:
        context.check_hostname = False
    return context


def device_name(serial: str) -> str:
    return f"appliance/p1dongle/{serial.lower()}"


def split_host(host: str) -> tuple[str, int | None]:
    """(address, port or None) of ``meter.host`` (``192.168.1.20``, ``[fe80::1]:443``)."""
    parts = urlsplit(f"//{host}")
    return parts.hostname or host, parts.port


async def presented_name(host: str, port: int, context: ssl.SSLContext, timeout: float) -> str:
    """The common name of the certificate ``host`` presents, its chain verified by ``context``.

    Raises ``Misconfigured`` when the certificate does not chain to the CA, ``PollFailed`` when
    the device cannot be reached.
    """
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port, ssl=context)
    except ssl.SSLCertVerificationError as exc:
        raise Misconfigured(_not_homewizard(host, exc)) from exc
    except (OSError, TimeoutError) as exc:
        raise PollFailed(
            f"cannot reach https://{host_port(host, port)}: {describe_failure(exc)}"
        ) from exc
    try:
        certificate: Any = writer.get_extra_info("peercert") or {}
        names = [
            value
            for rdn in certificate.get("subject", ())
            for name, value in rdn
            if name == "commonName"
        ]
    finally:
        writer.close()
    return names[0] if names else ""


def _not_homewizard(host: str, exc: ssl.SSLCertVerificationError) -> str:
    return (
        f"{host}: its certificate is not issued by the HomeWizard CA ({exc.verify_message}): "
        "not a HomeWizard device, or set meter.ca_file to the CA that issued it"
    )


def host_port(host: str, port: int) -> str:
    """``host:port`` as a URL writes it (an IPv6 address in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}"


def error_code(response: Response) -> str:
    """The device's error code (``{"error": "user:unauthorized"}``), or the body's first bytes."""
    try:
        document = response.json()
    except ValueError:
        return response.body[:100].decode("utf-8", "replace").strip()
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        return str(document["error"])
    return response.body[:100].decode("utf-8", "replace").strip()


def pair_hint(host: str) -> str:
    return f"pair again: dsmr-logger pair homewizard --host {host} --config <this file>"


class HomeWizardV2:
    """Fetches ``/api/telegram`` over TLS checked against the device's certificate name.

    Invariant: a request carrying the token only ever goes out on a connection whose certificate
    chains to the CA and names ``appliance/p1dongle/<serial>``: ``meter.serial``, or the serial
    the first certificate named, kept from then on.
    """

    def __init__(
        self,
        config: HomeWizardConfig,
        *,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        if config.token is None:
            raise ValueError("API v2 needs meter.token")
        self.config = config
        self._token = config.token
        self._address, port = split_host(config.host)
        self._port = port or 443
        self._context = device_tls(config.ca_file)
        self._serial = config.serial
        self._client: HttpClient | None = None
        self._log = log or structlog.get_logger("dsmr_logger.meter")

    async def fetch(self) -> bytes:
        client = self._client or await self._open()
        try:
            response = await client.get("/api/telegram", headers={"Accept": "text/plain"})
        except ConnectError as exc:
            await self._drop()
            raise self._refused(exc) from exc
        except HttpError as exc:
            raise PollFailed(f"{self.config.where}: {exc}") from exc
        if response.status == 200:
            return response.body
        raise self._failure(response)

    async def close(self) -> None:
        await self._drop()

    async def _open(self) -> HttpClient:
        """A client for the device, after checking who it is (``GET /api``)."""
        serial = self._serial
        if serial is None:  # not pinned: the chain-verified certificate says which device
            name = await presented_name(
                self._address,
                self._port,
                device_tls(self.config.ca_file, check_name=False),
                self.config.timeout,
            )
            match = DEVICE_NAME.fullmatch(name)
            if match is None:
                raise Misconfigured(
                    f"{self.config.host}: its certificate is issued to {name!r}, not to a P1 "
                    "Meter (appliance/p1dongle/<serial>): another HomeWizard device at this "
                    "address? check meter.host"
                )
            serial = match.group(1).lower()
        client = HttpClient(
            f"https://{host_port(self._address, self._port)}",
            timeout=self.config.timeout,
            headers={"Authorization": f"Bearer {self._token}", "X-Api-Version": "2"},
            ssl_context=self._context,
            server_hostname=device_name(serial),
            max_body=MAX_BODY,
            idle_timeout=max(5.0, 2 * self.config.interval),
        )
        try:
            response = await client.get("/api", headers={"Accept": "application/json"})
        except ConnectError as exc:
            await client.close()
            raise self._refused(exc, serial) from exc
        except HttpError as exc:
            await client.close()
            raise PollFailed(f"https://{self.config.host}/api: {exc}") from exc
        try:
            info = self._identify(response, serial)
        except PollFailed:
            await client.close()
            raise
        self._log.info(
            "HomeWizard P1 Meter",
            port=self.config.where,
            serial=serial,
            firmware=info.get("firmware_version"),
            api=info.get("api_version"),
        )
        self._serial, self._client = serial, client
        return client

    def _identify(self, response: Response, serial: str) -> dict[str, Any]:
        if response.status != 200:
            raise self._failure(response)
        try:
            info = response.json()
        except ValueError:
            info = None
        if not isinstance(info, dict):
            raise PollFailed(f"https://{self.config.host}/api: an answer that is not JSON")
        said = str(info.get("serial", "")).lower()
        if said != serial:
            raise Misconfigured(
                f"{self.config.host}: the device says it is {said!r}, its certificate names "
                f"{serial!r}; refusing it"
            )
        if info.get("product_type") != PRODUCT_TYPE:
            raise Misconfigured(
                f"{self.config.host}: a {info.get('product_type')!r}, not a P1 Meter "
                f"({PRODUCT_TYPE}); check meter.host"
            )
        return info

    def _failure(self, response: Response) -> PollFailed:
        code = error_code(response)
        where = f"https://{self.config.host}"
        if response.status == 401:
            return Misconfigured(
                f"{where}: the device refuses the token (401 {code}); {pair_hint(self.config.host)}"
            )
        if response.status == 503 and NO_TELEGRAM in code:
            return MeterSilent(f"{where}: the device has no telegram from the meter (503 {code})")
        if response.status == 403:
            return Misconfigured(f"{where}: 403 {code}; {pair_hint(self.config.host)}")
        return PollFailed(f"{where}: HTTP {response.status} {code}")

    def _refused(self, exc: ConnectError, serial: str | None = None) -> PollFailed:
        """A connection that failed: a certificate refused is the user's to fix, not a retry's."""
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            if cause.verify_code == _HOSTNAME_MISMATCH:
                expected = device_name(serial or self._serial or "?")
                return Misconfigured(
                    f"{self.config.host}: its certificate is not issued to {expected} "
                    "(refused): another device at this address? check meter.host and "
                    "meter.serial, or pair again"
                )
            return Misconfigured(_not_homewizard(self.config.host, cause))
        return PollFailed(f"{self.config.where}: {exc}")

    async def _drop(self) -> None:
        """Close the connection. A serial learned stays required: another device now at this
        address could not use the token (it is one device's), but would receive it."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()


class HomeWizardV1:
    """Fetches ``http://<host>/api/v1/telegram``: no token, no TLS (older firmware)."""

    def __init__(self, config: HomeWizardConfig) -> None:
        self.config = config
        address, port = split_host(config.host)
        self._client = HttpClient(
            f"http://{host_port(address, port or 80)}",
            timeout=config.timeout,
            max_body=MAX_BODY,
            idle_timeout=max(5.0, 2 * config.interval),
        )

    async def fetch(self) -> bytes:
        try:
            response = await self._client.get("/api/v1/telegram")
        except HttpError as exc:
            raise PollFailed(f"{self.config.where}: {exc}") from exc
        if response.status == 200:
            return response.body
        code = error_code(response)
        if response.status == 403:
            raise Misconfigured(
                f"{self.config.where}: 403 {code}: the local API is switched off; switch it on "
                "in the HomeWizard Energy app, or pair for API v2: dsmr-logger pair homewizard "
                f"--host {self.config.host}"
            )
        if response.status == 404:
            raise Misconfigured(
                f"{self.config.where}: 404: no telegram here; is meter.host a P1 Meter?"
            )
        if response.status == 503:
            raise MeterSilent(f"{self.config.where}: the device has no telegram (503 {code})")
        raise PollFailed(f"{self.config.where}: HTTP {response.status} {code}")

    async def close(self) -> None:
        await self._client.close()


def homewizard_source(
    config: HomeWizardConfig,
    on_frame: Callable[[Frame], None],
    *,
    wall_clock: Callable[[], float] = time.time,
    state_path: Path | None = None,
) -> PollingSource:
    fetcher: HomeWizardV1 | HomeWizardV2
    fetcher = HomeWizardV2(config) if config.version == "v2" else HomeWizardV1(config)
    return PollingSource(config, fetcher, on_frame, wall_clock=wall_clock, state_path=state_path)
