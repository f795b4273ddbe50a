"""``dsmr-logger pair homewizard --host IP [--config FILE]``: get a HomeWizard P1 Meter's token.

API v2 hands out a token only within 30 s of a press on the device's button: ``POST /api/user``
answers 403 ``user:creation-not-enabled`` until then. So the command asks once a second, tells the
user to press the button, and on success writes the token (and the device's serial, which its
certificate must then name) into the configuration's ``[meter]`` section, or prints it once when
no configuration is given. The token grants full control of the device: it goes into the file
(as the DSMR-reader API key does) and nowhere else, never into a log.

Before pairing, the device's name cannot be checked (the serial comes from ``GET /api``, which
needs the token), so the first contact verifies the chain against HomeWizard's CA and reads the
name ``appliance/p1dongle/<serial>`` from the certificate presented; every request after it,
the pairing request included, is checked against that name.

The user name is ``local/dsmr-logger-<this machine's host name>``: the device takes at most 40 of
``a-zA-Z0-9-_\\/#`` and space after ``local/`` (400 otherwise), so the host name's first label is
kept, every other character becomes ``-``, and it is cut to 28 characters. Pairing again from
the same machine reuses the name, which makes the device revoke the old token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import stat
import sys
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from dsmr_logger.config import ConfigError, from_mapping, read_text
from dsmr_logger.net.http import HttpClient, HttpError
from dsmr_logger.sources.homewizard import (
    DEVICE_NAME,
    PRODUCT_TYPE,
    device_name,
    device_tls,
    error_code,
    host_port,
    presented_name,
    split_host,
)
from dsmr_logger.sources.http_poll import PollFailed
from dsmr_logger.tools import printable

NAME_PREFIX = "local/dsmr-logger-"
NAME_ROOM = 40 - len("dsmr-logger-")
"""Characters of the host name that fit: the device takes 40 after ``local/``."""
NOT_ENABLED = "user:creation-not-enabled"
TIMEOUT = 10.0


class PairError(Exception):
    """Pairing failed; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Paired:
    token: str
    serial: str
    name: str


def user_name(hostname: str) -> str:
    """``local/dsmr-logger-<host>``, the host part fitted to the device's rule."""
    label = hostname.split(".", 1)[0]
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", label).strip("-")[:NAME_ROOM].rstrip("-")
    return NAME_PREFIX + cleaned if cleaned else NAME_PREFIX.rstrip("-")


async def pair(
    host: str,
    *,
    ca_file: Path | None,
    say: Callable[[str], None],
    hostname: str | None = None,
    wait: float = 120.0,
    every: float = 1.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Paired:
    """Ask ``host`` for a token until the button is pressed (at most ``wait`` seconds)."""
    address, port = split_host(host)
    port = port or 443
    try:
        presented = await presented_name(
            address, port, device_tls(ca_file, check_name=False), TIMEOUT
        )
    except PollFailed as exc:
        raise PairError(
            f"{exc}\nIs it a P1 Meter with firmware 6.00 or later (API v2)? Older firmware has "
            'only API v1: set [meter] api = "v1" and switch on the local API in the HomeWizard '
            "Energy app; no pairing needed."
        ) from None
    match = DEVICE_NAME.fullmatch(presented)
    if match is None:
        raise PairError(
            f"{host}: its certificate is issued to {presented!r}, not to a HomeWizard P1 Meter "
            "(appliance/p1dongle/<serial>)"
        )
    serial = match.group(1).lower()
    name = user_name(hostname if hostname is not None else socket.gethostname())
    client = HttpClient(
        f"https://{host_port(address, port)}",
        timeout=TIMEOUT,
        headers={"X-Api-Version": "2"},
        ssl_context=device_tls(ca_file),
        server_hostname=device_name(serial),
    )
    try:
        say(
            f"Found HomeWizard P1 Meter {serial} at {host}.\n"
            f"Press the button on the P1 Meter now (waiting up to {wait:.0f} s) ..."
        )
        token = await _ask(client, name, wait=wait, every=every, sleep=sleep)
        _holdable(token, host)
        await _check(client, token, serial, host)
    finally:
        await client.close()
    return Paired(token, serial, name)


async def _ask(
    client: HttpClient,
    name: str,
    *,
    wait: float,
    every: float,
    sleep: Callable[[float], Awaitable[None]],
) -> str:
    body = json.dumps({"name": name}).encode()
    waited = 0.0
    while True:
        try:
            response = await client.request(
                "POST", "/api/user", body, content_type="application/json"
            )
        except HttpError as exc:
            raise PairError(f"the device stopped answering: {exc}") from None
        code = error_code(response)
        if response.status == 200:
            try:
                token = response.json()["token"]
            except (ValueError, KeyError, TypeError):
                token = None
            if not isinstance(token, str) or not token:
                raise PairError("the device answered 200 without a token")
            return token
        if response.status != 403 or code != NOT_ENABLED:
            raise PairError(f"the device refused pairing: HTTP {response.status} {code}")
        if waited >= wait:
            raise PairError(f"no button press within {wait:.0f} s; run the command again")
        await sleep(every)
        waited += every


def _holdable(token: str, host: str) -> None:
    """The token passes the rule ``meter.token`` is read with; one that does not (a line break,
    a character a header cannot carry) is refused here, before it goes into a header or a file,
    and is not shown: it is a secret, and of no use."""
    try:
        from_mapping({"meter": {"type": "homewizard", "host": host, "token": token}})
    except ConfigError as exc:
        problems = "; ".join(exc.problems)
        raise PairError(
            f"the device answered with a token the configuration cannot hold ({problems})"
        ) from None


async def _check(client: HttpClient, token: str, serial: str, host: str) -> None:
    """The token works, and the device is the P1 Meter its certificate names."""
    try:
        response = await client.get(
            "/api", headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}
        )
    except HttpError as exc:
        raise PairError(f"the device stopped answering: {exc}") from None
    if response.status != 200:
        raise PairError(
            f"the new token does not work: HTTP {response.status} {error_code(response)}"
        )
    try:
        info = response.json()
    except ValueError:
        info = {}
    if not isinstance(info, dict) or str(info.get("serial", "")).lower() != serial:
        raise PairError(f"{host}: GET /api does not confirm serial {serial}")
    if info.get("product_type") != PRODUCT_TYPE:
        raise PairError(f"{host}: a {info.get('product_type')!r}, not a P1 Meter")


# --- writing the configuration ------------------------------------------------------------------

_HEADER = re.compile(r"\s*\[\s*meter\s*\]\s*(#.*)?")
_ANY_HEADER = re.compile(r"\s*\[")
_KEY_LINE = re.compile(r"\s*([A-Za-z0-9_-]+)\s*=")


def updated_config(text: str, values: dict[str, str]) -> str:
    """``text`` with ``[meter]`` set to ``values`` (TOML strings); other sections untouched.

    A ``[meter]`` of another type (a P1 port) is kept commented out below the new keys, so
    the previous setup stays readable and can be switched back by hand.
    """
    lines = text.split("\n")  # TOML's line ends (a CR before one stays with its line)
    current = tomllib.loads(text).get("meter", {}) if text.strip() else {}
    new = [f"{key} = {_quoted(value)}" for key, value in values.items()]
    start = next((i for i, line in enumerate(lines) if _HEADER.fullmatch(line)), None)
    if start is None:
        return "\n".join(["[meter]", *new, "", *lines]).rstrip("\n") + "\n"
    end = next((i for i in range(start + 1, len(lines)) if _ANY_HEADER.match(lines[i])), len(lines))
    section = lines[start + 1 : end]
    if current.get("type") == values.get("type"):
        kept, pending = [], dict(zip(values, new, strict=True))
        for line in section:
            key = _KEY_LINE.match(line)
            if key and key.group(1) in pending:
                kept.append(pending.pop(key.group(1)))
            elif key and key.group(1) == "api":
                kept.append('api = "v2"')
            else:
                kept.append(line)
        section = list(pending.values()) + kept
    else:
        note = f"# Before pairing (type {current.get('type', 'p1')!r}), kept for reference:"
        old = [f"# {line}" if _KEY_LINE.match(line) else line for line in section]
        section = [*new, "", note, *old]
    return "\n".join([*lines[: start + 1], *section, *lines[end:]]).rstrip("\n") + "\n"


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, values: dict[str, str]) -> None:
    """Set ``[meter]`` in ``path`` (created 0600 if missing), only if the result is valid."""
    try:
        text = read_text(path) if path.exists() else ""
    except ConfigError as exc:  # not UTF-8, or unreadable: named as the daemon names it
        raise PairError(f"{'; '.join(exc.problems)}; not changed") from None
    try:
        updated = updated_config(text, values)
        from_mapping(tomllib.loads(updated))
    except tomllib.TOMLDecodeError as exc:
        raise PairError(f"{path}: not valid TOML ({exc}); not changed") from None
    except ConfigError as exc:
        problems = "; ".join(exc.problems)
        raise PairError(
            f"{path}: would not be a valid configuration ({problems}); not changed"
        ) from None
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o600
    temporary = path.with_name(f".{path.name}.pairing")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(updated)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        if path.exists():
            info = path.stat()
            with contextlib.suppress(OSError):  # keep root:dsmr-logger when run as root
                os.chown(temporary, info.st_uid, info.st_gid)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def paired_ca_file(config: Path | None, host: str, given: Path | None) -> Path | None:
    """The CA file to pair with: ``--ca-file``, else ``meter.ca_file`` of the configuration.

    Raises ConfigError for a bad ``host`` or ``ca_file`` (each named), so usage errors exit 2.
    """
    meter: dict[str, object] = {"type": "homewizard", "host": host}
    if given is not None:
        meter["ca_file"] = str(given)
    elif config is not None and config.exists():
        try:
            section = tomllib.loads(config.read_text(encoding="utf-8")).get("meter", {})
        except (OSError, ValueError) as exc:  # TOML's and UTF-8's errors, an int too long
            raise ConfigError([f"{config}: {exc}"]) from None
        if isinstance(section, dict) and "ca_file" in section:
            meter["ca_file"] = section["ca_file"]
    checked = from_mapping({"meter": meter}).meter
    return getattr(checked, "ca_file", None)


def pair_command(
    host: str,
    config: Path | None,
    ca_file: Path | None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    wait: float = 120.0,
    every: float = 1.0,
) -> int:
    """The CLI's ``pair homewizard``: 0 paired, 1 failed, 2 usage (a file it cannot use)."""
    out = out or sys.stdout
    err = err or sys.stderr
    if config is not None and config.exists() and not os.access(config, os.W_OK):
        print(f"dsmr-logger: {config}: cannot write it (run as its owner, e.g. sudo)", file=err)
        return 2

    def say(text: str) -> None:
        print(text, file=err, flush=True)

    try:
        paired = asyncio.run(pair(host, ca_file=ca_file, say=say, wait=wait, every=every))
    except PairError as exc:
        print(f"dsmr-logger: pairing failed: {printable(str(exc))}", file=err)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; nothing written", file=err)
        return 130
    values = {"type": "homewizard", "host": host, "token": paired.token, "serial": paired.serial}
    if ca_file is not None:
        values["ca_file"] = str(ca_file)
    if config is not None:
        try:
            write_config(config, values)
        except (PairError, OSError) as exc:
            print(f"dsmr-logger: {exc}", file=err)
            config = None  # the token must not be lost: show it once instead
        else:
            say(
                f"Paired as {paired.name}: token and serial written to [meter] in {config}.\n"
                "Restart dsmr-logger to use it (sudo systemctl restart dsmr-logger)."
            )
            return 0
    say(f"Paired as {paired.name}. Put this in your configuration (shown only this once):")
    print("[meter]", file=out)
    for key, value in values.items():
        print(f"{key} = {_quoted(value)}", file=out)
    return 0
