"""A fake HomeWizard P1 Meter on 127.0.0.1, enforcing the local API's documented rules, for tests.

What it enforces (``../shared/reference/homewizard/README.md``):

- API v2 over HTTPS only, with a certificate issued by a test CA to ``appliance/p1dongle/<serial>``
  in its common name (no subjectAltName), and the CA an X.509 **version 1** certificate like
  HomeWizard's own (``Pki`` builds both with ``cryptography``; the v1 form by re-signing the TBS
  without its version field, which ``cryptography`` cannot build directly).
- Every v2 request carries ``X-Api-Version: 2`` (else 400) and ``Authorization: Bearer <token>``
  with a token it issued (else 401 ``user:unauthorized``); ``GET /api`` gives the device info,
  ``GET /api/telegram`` wants ``Accept: text/plain`` (else 406) and answers the current telegram,
  or 503 ``telegram:no-telegram-received`` while the meter is silent.
- ``POST /api/user`` with ``{"name": "local/<1-40 of a-zA-Z0-9-_\\/# and space>"}`` (else 400):
  403 ``user:creation-not-enabled`` until ``press_button()``, then for 30 s (on ``clock``) 200
  ``{"token": <32 upper-case hex>, "name"}``; asking again keeps the window open; a name asked
  again gets a new token and its old one stops working.
- API v1 on plain HTTP only: ``GET /api/v1/telegram``, no token (403 when ``v1_enabled`` is off).

The meter: ``telegrams`` are served in order, each ``repeat`` times (a device polled faster than
the meter sends serves the same telegram again), the cursor moving only on a telegram actually
served (401s and 503s do not move it: the test's meter waits for its reader); after the last,
the last is served on and on. ``silent`` (or the first ``silent_polls`` telegram requests) answer
503; ``hold`` keeps serving the current telegram without moving on.

Counters for the figures: ``polls`` (telegram requests), ``served`` (200s), ``unauthorized``
(401s, any v2 request), ``silent_answers`` (503s), ``token_requests`` (requests that carried a
token at all).
"""

from __future__ import annotations

import datetime
import json
import re
import secrets
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SERIAL = "5c2fafabcdef"
USER_NAME = re.compile(r"local/[a-zA-Z0-9\-_\\/# ]{1,40}")
WINDOW = 30.0


# --- certificates --------------------------------------------------------------------------------


def _der_element(data: bytes, at: int) -> tuple[int, int]:
    """(start of contents, end) of the DER element at ``at``."""
    length = data[at + 1]
    start = at + 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    return start, start + length


def _der(tag: int, contents: bytes) -> bytes:
    n = len(contents)
    if n < 0x80:
        return bytes([tag, n]) + contents
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + contents


def as_version_1(certificate: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey) -> bytes:
    """``certificate`` (built without extensions) re-signed as X.509 v1, DER."""
    tbs = certificate.tbs_certificate_bytes
    start, end = _der_element(tbs, 0)
    body = tbs[start:end]
    assert body[:5] == b"\xa0\x03\x02\x01\x02", "expected an explicit v3 version field"
    tbs_v1 = _der(0x30, body[5:])
    whole = certificate.public_bytes(serialization.Encoding.DER)
    outer, _ = _der_element(whole, 0)
    _, tbs_end = _der_element(whole, outer)
    _, algorithm_end = _der_element(whole, tbs_end)
    algorithm = whole[tbs_end:algorithm_end]
    signature = issuer_key.sign(tbs_v1, ec.ECDSA(hashes.SHA256()))
    return _der(0x30, tbs_v1 + algorithm + _der(0x03, b"\x00" + signature))


@dataclass
class Pki:
    """A test CA (X.509 v1, like HomeWizard's) and device certificates it issues."""

    ca_key: ec.EllipticCurvePrivateKey
    ca_name: x509.Name
    ca_pem: bytes

    @classmethod
    def create(cls, common_name: str = "Test Appliance Access CA") -> Pki:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "HomeWizard (test)"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        now = datetime.datetime.now(datetime.UTC)
        built = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(key, hashes.SHA256())
        )
        der = as_version_1(built, key)
        pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        return cls(key, name, pem)

    def write_ca(self, path: Path) -> Path:
        path.write_bytes(self.ca_pem)
        return path

    def device(self, common_name: str, directory: Path) -> tuple[Path, Path]:
        """(certificate, key) files of a device certificate issued to ``common_name`` (in its CN,
        no subjectAltName, X.509 v1 like the CA)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        built = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .sign(self.ca_key, hashes.SHA256())
        )
        der = as_version_1(built, self.ca_key)
        stem = re.sub(r"[^A-Za-z0-9]+", "-", common_name)
        cert_path = directory / f"{stem}.crt"
        key_path = directory / f"{stem}.key"
        cert_path.write_bytes(
            x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        )
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path


# --- the device ----------------------------------------------------------------------------------


class FakeP1Meter:
    """The device (see the module doc). ``async with`` starts it; ``https_port``/``http_port``."""

    def __init__(
        self,
        telegrams: list[bytes],
        *,
        pki: Pki,
        directory: Path,
        serial: str = SERIAL,
        certificate_name: str | None = None,
        tokens: dict[str, str] | None = None,
        repeat: int = 1,
        silent_polls: int = 0,
        product_type: str = "HWE-P1",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.telegrams = telegrams
        self.serial = serial
        self.product_type = product_type
        self.tokens: dict[str, str] = dict(tokens or {})
        """name → token; a token not in here (any more) gets 401."""
        self.repeat = repeat
        self.silent_polls = silent_polls
        self.silent = False
        self.hold = False
        self.v1_enabled = True
        self.clock = clock
        self.pressed_at: float | None = None
        self.position = 0
        self._times_served = 0
        self.polls = self.served = self.unauthorized = self.silent_answers = 0
        self.token_requests = 0
        self.user_requests: list[tuple[int, str]] = []
        """(status, name) of every POST /api/user."""
        name = certificate_name or f"appliance/p1dongle/{serial}"
        cert, key = pki.device(name, directory)
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(cert, key)
        self.https_port = self.http_port = 0
        self._runners: list[web.AppRunner] = []

    # --- control ---------------------------------------------------------------------------

    def press_button(self) -> None:
        self.pressed_at = self.clock()

    def token_for(self, name: str) -> str:
        """Issue (as after a button press) a token for ``name``, replacing its old one."""
        token = secrets.token_hex(16).upper()
        self.tokens[name] = token
        return token

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> FakeP1Meter:
        v2 = web.Application()
        v2.router.add_get("/api", self._info)
        v2.router.add_get("/api/telegram", self._telegram_v2)
        v2.router.add_post("/api/user", self._user)
        v1 = web.Application()
        v1.router.add_get("/api/v1/telegram", self._telegram_v1)
        self.https_port = await self._serve(v2, self._tls)
        self.http_port = await self._serve(v1, None)
        return self

    async def _serve(self, app: web.Application, tls: ssl.SSLContext | None) -> int:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        sock = socket.create_server(("127.0.0.1", 0))
        await web.SockSite(runner, sock, ssl_context=tls).start()
        self._runners.append(runner)
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

    async def __aenter__(self) -> FakeP1Meter:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- API v2 ----------------------------------------------------------------------------

    def _refusal(self, request: web.Request) -> web.Response | None:
        if request.headers.get("X-Api-Version") != "2":
            return _error(400, "request:api-version-not-supported")
        auth = request.headers.get("Authorization", "")
        if auth:
            self.token_requests += 1
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        if token is None or token not in self.tokens.values():
            self.unauthorized += 1
            return _error(401, "user:unauthorized")
        return None

    async def _info(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        return web.json_response(
            {
                "product_name": "P1 Meter",
                "product_type": self.product_type,
                "serial": self.serial,
                "firmware_version": "6.0200",
                "api_version": "2.0.0",
            }
        )

    async def _telegram_v2(self, request: web.Request) -> web.Response:
        self.polls += 1
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        if "text/plain" not in request.headers.get("Accept", ""):
            return _error(406, "request:unsupported-accept")
        return self._current()

    async def _user(self, request: web.Request) -> web.Response:
        if request.headers.get("X-Api-Version") != "2":
            return _error(400, "request:api-version-not-supported")
        try:
            name = (await request.json())["name"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "request:invalid-body")
        if not isinstance(name, str) or not USER_NAME.fullmatch(name):
            self.user_requests.append((400, str(name)))
            return _error(400, "request:invalid-value")
        now = self.clock()
        if self.pressed_at is None or now - self.pressed_at > WINDOW:
            self.user_requests.append((403, name))
            return _error(403, "user:creation-not-enabled")
        self.pressed_at = now  # asking again keeps the window open
        self.user_requests.append((200, name))
        return web.json_response({"token": self.token_for(name), "name": name})

    # --- API v1 ----------------------------------------------------------------------------

    async def _telegram_v1(self, request: web.Request) -> web.Response:
        self.polls += 1
        if not self.v1_enabled:
            return _error(403, "api:disabled")
        return self._current()

    # --- the meter -------------------------------------------------------------------------

    def _current(self) -> web.Response:
        if self.silent or self.polls <= self.silent_polls or not self.telegrams:
            self.silent_answers += 1
            return _error(503, "telegram:no-telegram-received")
        telegram = self.telegrams[min(self.position, len(self.telegrams) - 1)]
        self.served += 1
        if not self.hold:
            self._times_served += 1
            if self._times_served >= self.repeat and self.position < len(self.telegrams):
                self.position += 1
                self._times_served = 0
        return web.Response(body=telegram, content_type="text/plain")


def _error(status: int, code: str) -> web.Response:
    return web.Response(
        status=status, body=json.dumps({"error": code}), content_type="application/json"
    )


def device_config(meter: FakeP1Meter, ca_file: Path, **keys: Any) -> dict[str, Any]:
    """A ``[meter]`` table reaching ``meter`` over API v2 (``keys`` added or overriding)."""
    table: dict[str, Any] = {
        "type": "homewizard",
        "host": f"127.0.0.1:{meter.https_port}",
        "ca_file": str(ca_file),
    }
    table.update(keys)
    return table
