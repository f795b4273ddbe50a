"""Configuration: a TOML file (or the remote-datalogger's environment) → frozen dataclasses.

Everything is validated before any port is opened, and every mistake is reported with the key it
concerns (``meter.baudrate: must be one of ...``), so a user can fix a file without reading code.

Each key is written once: its dataclass field carries the default, the check that validates it
and a line of documentation (``key(...)``). The reader walks the fields, so a key added to a
dataclass is read, validated, printed by ``check-config`` and listed in the README's key table
(``key_table()``, compared by a test) without a second copy anywhere. Rules that relate two keys
are in ``_cross_rules``. A new kind of meter or sink is a dataclass added to ``METER_TYPES`` or
``SINK_TYPES``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import ssl
import tomllib
import types
import urllib.parse
import zoneinfo
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dsmr_logger.net.http import check_base_url, field_value_problem, wire_host

BAUDRATES = (300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
DEFAULT_SPOOL_PATH = Path("/var/lib/dsmr-logger/spool.sqlite3")
DEFAULT_SPOOL_MAX_BYTES = 256 * 1024 * 1024
SMARTY_AUTHENTICATION_KEY = "00112233445566778899AABBCCDDEEFF"
MASK = "****"
"""How ``check-config`` shows a secret: this, then the secret's last two characters."""
MASKED = "is the masked value check-config shows, not the secret itself: put the real one back"
PLACEHOLDER_PREFIX = "REPLACE-WITH-"
"""How the example configuration's placeholder keys start."""
SINK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""A sink's name is part of the spool's records and of metric labels: a plain word."""

Check = Callable[[Any], Any]


class ConfigError(Exception):
    """One or more configuration mistakes, each line naming its key (or file and line)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Bad(Exception):
    """A value a check refused; the message says why (the reader adds the key)."""


def key(
    default: Any = dataclasses.MISSING,
    *,
    check: Check,
    doc: str,
    secret: bool = False,
) -> Any:
    """A configuration key: its default (none = required), how it is checked, what it means.

    ``secret`` keys are masked wherever the configuration is shown and left out of ``repr``.
    """
    return dataclasses.field(
        default=default, repr=not secret, metadata={"check": check, "doc": doc, "secret": secret}
    )


# --- checks: each returns the converted value or raises _Bad(message) ----------------------------


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad(f"must be a string, not {type(value).__name__}")
    if not value.strip():
        raise _Bad("must not be empty")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"must be true or false, not {value!r}")
    return value


def number(minimum: float, maximum: float = math.inf) -> Check:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Bad(f"must be a number, not {value!r}")
        if not minimum <= value <= maximum:
            bound = f"between {minimum} and {maximum}" if maximum < math.inf else f">= {minimum}"
            raise _Bad(f"must be {bound}, not {value}")
        try:
            return float(value)
        except OverflowError:  # an integer of 309 digits or more (TOML's are read whole)
            digits = len(str(abs(value)))
            raise _Bad(f"must be a number a clock can count, not one of {digits} digits") from None

    return check


def integer(minimum: int, maximum: int | None = None) -> Check:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"must be an integer, not {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise _Bad(f"must be {bound}, not {value}")
        return value

    return check


def one_of(*choices: Any) -> Check:
    def check(value: Any) -> Any:
        if value not in choices or isinstance(value, bool):
            listed = ", ".join(repr(c) if isinstance(c, str) else str(c) for c in choices)
            raise _Bad(f"must be one of {listed}, not {value!r}")
        return value

    return check


def _aes_key(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad(f"must be a string of 32 hex digits, not {type(value).__name__}")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise _Bad("must be 32 hex digits (16 bytes), as your grid operator supplied it")
    return value.upper()


def _optional_aes_key(value: Any) -> str | None:
    return None if value == "" else _aes_key(value)


def _zone(value: Any) -> str:
    name = _str(value)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise _Bad(f"unknown time zone {name!r}; use a name like 'Europe/Amsterdam'") from None
    return name


def _path(value: Any) -> Path:
    path = Path(_str(value)).expanduser()
    if not path.is_absolute():
        # A service starts in /, a shell wherever it is: a relative path would mean two places.
        raise _Bad(f"must be an absolute path (starting with /), not {str(path)!r}")
    return path


def _split(url: str) -> urllib.parse.SplitResult:
    """``urlsplit``, its ValueError (an unclosed ``[``, a bad IPv6 address) a mistake of the
    key's; never echoed, as the URL may carry a password."""
    try:
        return urllib.parse.urlsplit(url)
    except ValueError:
        raise _Bad(
            "is not a valid URL (an unclosed [ or an invalid IPv6 address in [...])"
        ) from None


def _check_host(host: str) -> None:
    """The HTTP client's host rule (``wire_host``) for every address a key holds."""
    try:
        wire_host(host)
    except ValueError as exc:
        raise _Bad(str(exc)) from None


def _port(value: Any) -> str:
    port = _str(value)
    if "://" in port:
        parsed = _split(port)
        if "@" in parsed.netloc:  # before anything that repeats it: it may hold a password
            raise _Bad("socket:// and rfc2217:// take no user:password@; remove it")
        if parsed.scheme not in ("socket", "rfc2217"):
            raise _Bad(
                f"unknown scheme {parsed.scheme!r}; use a device path, socket://host:port "
                "or rfc2217://host:port"
            )
        try:
            if not parsed.hostname or parsed.port is None:
                raise _Bad(
                    f"{parsed.scheme}:// needs a host and a port, e.g. "
                    f"{parsed.scheme}://192.168.1.20:2001"
                )
        except ValueError as exc:
            raise _Bad(f"invalid socket:// address: {exc}") from None
        _check_host(parsed.hostname)
    return port


def http_url(value: Any) -> str:
    """A base URL the HTTP client accepts (its own rule, ``check_base_url``); never echoed, as it
    may carry a password."""
    url = _str(value).strip().rstrip("/")
    try:
        check_base_url(url)
    except ValueError as exc:
        raise _Bad(f"{exc}; write it like http://192.168.1.10 or https://host:8443") from None
    return url


API_PATH = re.compile(r"/api(/v[12](/.*)?)?$")
"""The end of a URL that already names DSMR-reader's API: the sink appends
/api/v1/datalogger/dsmrreading (or v2) itself, so the path would be there twice (a 404)."""


def _dsmr_reader_url(value: Any) -> str:
    """DSMR-reader's base URL, not its API endpoint (DSMR-reader's API page shows the full
    endpoint; the remote datalogger's API_HOSTS never held it)."""
    url = http_url(value)
    parsed = urllib.parse.urlsplit(url)
    found = API_PATH.search(parsed.path)
    if found:
        base = urllib.parse.urlunsplit(
            (parsed.scheme, parsed.netloc, parsed.path[: found.start()], "", "")
        )
        raise _Bad(
            "must be DSMR-reader's base URL, without the API path (the sink adds "
            f"/api/v1/datalogger/dsmrreading itself): use {base}"
        )
    return url


def _api_key(value: Any) -> str:
    """A key the HTTP client can send as a header (``field_value_problem``), never the example's
    placeholder. The message never shows the key."""
    if not isinstance(value, str):
        raise _Bad(f"must be a string, not {type(value).__name__}")
    if not value.strip():
        raise _Bad("must not be empty")
    problem = field_value_problem(value)
    if problem is not None:
        raise _Bad(f"{problem} (the key is not shown); copy it again from DSMR-reader")
    if value.startswith(PLACEHOLDER_PREFIX):
        raise _Bad(
            "is still the example's placeholder; copy the key from DSMR-reader "
            "(Configuration > API)"
        )
    return value


def mqtt_url(value: Any) -> str:
    url = _str(value).rstrip("/")
    parsed = _split(url)
    if "@" in parsed.netloc:  # before anything that repeats the URL: it holds a password
        raise _Bad("put the credentials in the username and password keys, not in the URL")
    try:
        port = parsed.port
    except ValueError as exc:
        raise _Bad(f"invalid port: {exc}") from None
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise _Bad(f"must be an mqtt:// or mqtts:// URL, e.g. mqtt://192.168.1.10, not {value!r}")
    if parsed.username is not None or parsed.password is not None:
        raise _Bad("put the credentials in the username and password keys, not in the URL")
    if parsed.path or parsed.query or parsed.fragment:
        raise _Bad(f"must be only mqtt[s]://host[:port], not {url!r}")
    _check_host(parsed.hostname)
    del port
    return f"{parsed.scheme}://{parsed.netloc}"  # the scheme lower-cased: MQTTS:// is TLS too


def _topic_prefix(value: Any) -> str:
    topic = _str(value)
    if any(c in topic for c in "+#\0") or topic.startswith(("$", "/")) or topic.endswith("/"):
        raise _Bad(
            f"{topic!r}: a topic prefix such as 'dsmr' or 'home/meter1' (no wildcards + or #, "
            "no leading $ or /, no trailing /)"
        )
    if "" in topic.split("/"):
        raise _Bad(f"{topic!r}: has an empty level ('//')")
    return topic


def _client_id(value: Any) -> str:
    text = _str(value)
    if len(text.encode()) > 128 or not text.isprintable():
        raise _Bad("must be 1-128 printable characters")
    return text


def cloud_url(value: Any) -> str:
    """An https:// URL; http:// only to this machine (a test server, a local proxy): the requests
    carry passwords and tokens."""
    url = http_url(value)
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "http" and parsed.hostname not in ("127.0.0.1", "::1", "localhost"):
        raise _Bad(f"must be an https:// URL (it carries your credentials), not {value!r}")
    return url


def _sink_name(value: Any) -> str:
    name = _str(value)
    if not SINK_NAME.fullmatch(name):
        raise _Bad(
            f"{name!r}: use 1-64 letters, digits, '-', '_' or '.', starting with a letter or "
            "digit (the name labels the sink's backlog and metrics)"
        )
    return name


def _listen(value: Any) -> str:
    text = _str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _Bad(f"must be host:port, e.g. 127.0.0.1:8484, not {value!r}")
    bracketed = host.startswith("[") and host.endswith("]")
    if ("[" in host or "]" in host or ":" in host) and not (
        bracketed and _is_ipv6(host[1:-1])
    ):  # status (and a browser) could not reach "[::1:8484" or "::1:8484"
        raise _Bad(f"an IPv6 address goes in brackets, e.g. [::1]:8484, not {value!r}")
    return text


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


# --- the schema ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SerialSettings:
    baudrate: int = 115200
    bytesize: int = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: int = 1


PROFILES: Mapping[str, SerialSettings] = types.MappingProxyType(
    {"dsmr4": SerialSettings(115200, 8, "N", 1), "dsmr22": SerialSettings(9600, 7, "E", 1)}
)


# Keys that several kinds of meter share, written once so that their defaults, checks and docs
# cannot drift apart. Factories, not values: every dataclass needs its own field object.


def _require_crc_key() -> Any:
    return key(False, check=_bool, doc="also reject telegrams that carry no CRC")


def _meter_timezone_key() -> Any:
    return key(
        "Europe/Amsterdam", check=_zone, doc="the meter's time zone: how its timestamps are read"
    )


def _reconnect_initial_key(pause: str) -> Any:
    """``reconnect_initial``; ``pause`` completes "first pause ..." for this kind of link."""
    return key(1.0, check=number(0.01), doc=f"first pause {pause}")


def _reconnect_max_key(between: str) -> Any:
    """``reconnect_max``; ``between`` completes "longest pause between ..."."""
    return key(60.0, check=number(0.01), doc=f"longest pause between {between}")


def _telegram_idle_key() -> Any:
    """``idle_timeout`` of a source that gets whole telegrams (polled, or from a broker)."""
    return key(
        30.0, check=number(0.05), doc="seconds without a new telegram before the state says so"
    )


def _poll_interval_key() -> Any:
    return key(1.0, check=number(0.01, 3600.0), doc="seconds between polls (fractions allowed)")


def _request_timeout_key() -> Any:
    return key(5.0, check=number(0.05, 600.0), doc="seconds for one request")


@dataclass(frozen=True, slots=True)
class MeterConfig:
    """A P1 port: a serial device, or a ser2net socket (``socket://``, ``rfc2217://``)."""

    port: str = key(check=_port, doc="device path, socket://host:port or rfc2217://host:port")
    type: Literal["p1"] = key("p1", check=one_of("p1"), doc="where readings come from")
    profile: Literal["dsmr4", "dsmr22"] = key(
        "dsmr4",
        check=one_of(*PROFILES),
        doc="serial preset: dsmr4 = 115200 8N1, dsmr22 = 9600 7E1",
    )
    baudrate: int | None = key(
        None, check=one_of(*BAUDRATES), doc="overrides the profile's baud rate"
    )
    bytesize: int | None = key(None, check=one_of(7, 8), doc="overrides the profile's data bits")
    parity: Literal["N", "E", "O"] | None = key(
        None, check=one_of("N", "E", "O"), doc="overrides the profile's parity"
    )
    stopbits: int | None = key(None, check=one_of(1, 2), doc="overrides the profile's stop bits")
    require_crc: bool = _require_crc_key()
    max_frame_bytes: int = key(
        16 * 1024, check=integer(1024), doc="a longer frame is discarded as line noise"
    )
    idle_timeout: float = key(
        30.0, check=number(0.05), doc="seconds without a byte before the link is reopened"
    )
    reconnect_initial: float = _reconnect_initial_key("before reopening a failed port")
    reconnect_max: float = _reconnect_max_key("reopenings")
    decryption_key: str | None = key(
        None,
        check=_aes_key,
        doc="32 hex digits: the meter encrypts its P1 output (Luxembourg Smarty and similar)",
        secret=True,
    )
    authentication_key: str | None = key(
        SMARTY_AUTHENTICATION_KEY,
        check=_optional_aes_key,
        doc='the GCM additional-data key; "" when the meter uses none',
        secret=True,
    )
    timezone: str = _meter_timezone_key()

    @property
    def serial(self) -> SerialSettings:
        """The profile's serial settings with this meter's overrides applied."""
        base = PROFILES[self.profile]
        return SerialSettings(
            baudrate=self.baudrate if self.baudrate is not None else base.baudrate,
            bytesize=self.bytesize if self.bytesize is not None else base.bytesize,
            parity=self.parity if self.parity is not None else base.parity,
            stopbits=self.stopbits if self.stopbits is not None else base.stopbits,
        )

    @property
    def where(self) -> str:
        """What the logs and the status call the source."""
        return self.port

    @property
    def is_network(self) -> bool:
        return "://" in self.port


# --- meters without a cable: a Wi-Fi P1 dongle or any endpoint serving the raw telegram --------


def _host(value: Any) -> str:
    host = _str(value).strip()
    if "://" in host or "/" in host or "@" in host:
        raise _Bad(
            f"just the device's address, e.g. 192.168.1.20 (a port may follow), not {value!r}"
        )
    try:
        parts = urllib.parse.urlsplit(f"//{host}")
        if not parts.hostname:
            raise ValueError("no host")
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError as exc:
        raise _Bad(f"invalid address {value!r}: {exc}") from None
    _check_host(parts.hostname)
    return host


def _token(value: Any) -> str:
    token = _str(value)
    if not re.fullmatch(r"[A-Za-z0-9_-]{16,128}", token):
        raise _Bad("must be the token `dsmr-logger pair` wrote (16-128 letters and digits)")
    return token


def _serial(value: Any) -> str:
    serial = _str(value).lower()
    if not re.fullmatch(r"[0-9a-f]{12}", serial):
        raise _Bad(f"must be the device's 12 hex digits (its MAC address), not {value!r}")
    return serial


def _file(value: Any) -> Path:
    path = _path(value)
    if not path.is_file():
        raise _Bad(f"{path}: no such file")
    return path


def _ca_file(value: Any) -> Path:
    """CA certificates to trust: loaded here as every client loads them, so a file that is not
    PEM certificates is a mistake named now, not a TLS error when the first connection opens."""
    path = _file(value)
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise _Bad(f"{path}: holds no usable CA certificate ({reason})") from None
    return path


def _plain_url(value: Any) -> str:
    """An endpoint: the client's base-URL rule, plus a query the request carries as written."""
    base, mark, query = _str(value).strip().partition("?")
    if "@" in base.partition("://")[2].partition("/")[0]:  # checked first: never echoed
        raise _Bad("put credentials in username and password, not in the URL")
    if "#" in base + query:
        raise _Bad("a URL with a #fragment cannot be polled")
    if not (query.isascii() and query.isprintable() and " " not in query):
        raise _Bad("the query must be printable ASCII without spaces (percent-encode others)")
    for name, _, text in (item.partition("=") for item in query.split("&")):
        if _SECRET_PARAMETER.search(name) and _masked(text):  # check-config's ?token=****ab
            raise _Bad(f"the query's {name}: {MASKED}")
    return http_url(base) + mark + query


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise _Bad('must be a table, e.g. { "Accept" = "text/plain" }')
    pairs = []
    for name, text in value.items():
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise _Bad(f"{name!r} is not a valid header name")
        if name.lower() in ("host", "content-length", "transfer-encoding", "content-type"):
            raise _Bad(f"{name!r} is set by the client itself")
        if not isinstance(text, str) or any(c in text for c in "\r\n\0"):
            raise _Bad(f"{name}: the value must be a one-line string")
        if _SECRET_PARAMETER.search(name) and _masked(text):
            raise _Bad(f"{name}: {MASKED}")
        pairs.append((name, text))
    return tuple(pairs)


@dataclass(frozen=True, slots=True)
class HomeWizardConfig:
    """A HomeWizard P1 Meter on the LAN: its local API serves the raw telegram."""

    host: str = key(check=_host, doc="the P1 Meter's IP address or name; a :port may follow")
    type: Literal["homewizard"] = key(
        "homewizard", check=one_of("homewizard"), doc="where readings come from"
    )
    token: str | None = key(
        None,
        check=_token,
        doc="API v2 token written by `dsmr-logger pair homewizard`",
        secret=True,
    )
    api: Literal["auto", "v1", "v2"] = key(
        "auto",
        check=one_of("auto", "v1", "v2"),
        doc="auto: v2 (https, token) when a token is set, else v1 (http, no token)",
    )
    serial: str | None = key(
        None,
        check=_serial,
        doc="the device's serial, which its certificate must name; not set: read at connect",
    )
    ca_file: Path | None = key(
        None, check=_ca_file, doc="CA certificate(s) the device's must chain to; default: shipped"
    )
    interval: float = _poll_interval_key()
    timeout: float = _request_timeout_key()
    idle_timeout: float = _telegram_idle_key()
    reconnect_initial: float = _reconnect_initial_key("after a failed poll")
    reconnect_max: float = _reconnect_max_key("failed polls")
    require_crc: bool = _require_crc_key()
    timezone: str = _meter_timezone_key()

    @property
    def version(self) -> Literal["v1", "v2"]:
        """The local API spoken: ``api``, or v2 exactly when a token is configured."""
        if self.api != "auto":
            return self.api
        return "v2" if self.token else "v1"

    @property
    def where(self) -> str:
        """The URL polled (no token in it)."""
        if self.version == "v2":
            return f"https://{self.host}/api/telegram"
        return f"http://{self.host}/api/v1/telegram"


@dataclass(frozen=True, slots=True)
class HttpMeterConfig:
    """Any HTTP endpoint that answers GET with the raw telegram (ESP P1 loggers and the like)."""

    url: str = key(check=_plain_url, doc="the endpoint serving the raw telegram")
    type: Literal["http"] = key("http", check=one_of("http"), doc="where readings come from")
    username: str | None = key(None, check=_str, doc="HTTP Basic authentication user")
    password: str | None = key(
        None, check=_str, doc="HTTP Basic authentication password", secret=True
    )
    token: str | None = key(
        None, check=_str, doc="sent as Authorization: Bearer <token>", secret=True
    )
    headers: tuple[tuple[str, str], ...] | None = key(
        None,
        check=_headers,
        doc="extra request headers, a table of name = value",
    )
    ca_file: Path | None = key(
        None, check=_ca_file, doc="https: CA certificate(s) to trust instead of the system's"
    )
    interval: float = _poll_interval_key()
    timeout: float = _request_timeout_key()
    idle_timeout: float = _telegram_idle_key()
    reconnect_initial: float = _reconnect_initial_key("after a failed poll")
    reconnect_max: float = _reconnect_max_key("failed polls")
    require_crc: bool = _require_crc_key()
    timezone: str = _meter_timezone_key()

    @property
    def where(self) -> str:
        """The URL polled, as logs and the status show it (a credential in its query masked)."""
        return redact_query(self.url)


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    path: Path = key(
        DEFAULT_SPOOL_PATH,
        check=_path,
        doc="the SQLite file; telegrams go to <path>-telegrams/ beside it",
    )
    max_bytes: int = key(
        DEFAULT_SPOOL_MAX_BYTES,
        check=integer(64 * 1024),
        doc="bound of spooled telegrams; past it the oldest are dropped and counted",
    )
    flush_interval: float = key(
        5.0, check=number(0.0, 3600.0), doc="undelivered this long => written to the spool"
    )
    durability: Literal["batched", "strict"] = key(
        "batched",
        check=one_of("batched", "strict"),
        doc="strict: every telegram committed (fsync) before it is sent",
    )


# Keys every kind of sink has (the last two: the sinks that retry), written once like the meters'.


def _sink_name_key() -> Any:
    return key(check=_sink_name, doc="unique; the spooled backlog is kept under it")


def _min_interval_key() -> Any:
    return key(0.0, check=number(0.0, 86400.0), doc="at most one telegram per this many seconds")


def _retry_initial_key() -> Any:
    return key(1.0, check=number(0.01, 3600.0), doc="first pause after a failed delivery")


def _retry_max_key() -> Any:
    return key(300.0, check=number(0.01, 86400.0), doc="longest pause between retries")


@dataclass(frozen=True, slots=True)
class DsmrReaderSinkConfig:
    name: str = _sink_name_key()
    url: str = key(check=_dsmr_reader_url, doc="DSMR-reader's base URL")
    api_key: str = key(check=_api_key, doc="DSMR-reader's API key", secret=True)
    type: Literal["dsmr-reader"] = key(
        "dsmr-reader", check=one_of("dsmr-reader"), doc="what kind of sink"
    )
    api: Literal["v1", "v2"] = key(
        "v1", check=one_of("v1", "v2"), doc="v1: the raw telegram; v2: parsed fields"
    )
    auth_header: Literal["token", "x-authkey"] = key(
        "token", check=one_of("token", "x-authkey"), doc="how the key is sent"
    )
    timeout: float = key(20.0, check=number(0.05, 600.0), doc="seconds for one request")
    verify_tls: bool = key(True, check=_bool, doc="check the server's https certificate")
    min_interval: float = _min_interval_key()
    retry_initial: float = _retry_initial_key()
    retry_max: float = _retry_max_key()
    gas_channel: int | None = key(
        None, check=one_of(1, 2, 3, 4), doc="v2: M-Bus channel of the gas meter"
    )
    max_in_flight: int = key(
        1, check=integer(1, 8), doc="requests at once while a backlog drains; 1 keeps order"
    )


@dataclass(frozen=True, slots=True)
class ArchiveSinkConfig:
    name: str = _sink_name_key()
    directory: Path = key(check=_path, doc="one YYYY-MM-DD.log file a day in it")
    type: Literal["archive"] = key("archive", check=one_of("archive"), doc="what kind of sink")
    compress_after_days: int | None = key(
        None, check=integer(1), doc="gzip day files at least this many days old"
    )
    min_interval: float = _min_interval_key()


@dataclass(frozen=True, slots=True)
class MqttSinkConfig:
    name: str = _sink_name_key()
    url: str = key(check=mqtt_url, doc="the broker: mqtt://host[:1883] or mqtts://host[:8883]")
    type: Literal["mqtt"] = key("mqtt", check=one_of("mqtt"), doc="what kind of sink")
    username: str | None = key(None, check=_str, doc="the broker account's name")
    password: str | None = key(None, check=_str, doc="the broker account's password", secret=True)
    client_id: str | None = key(
        None, check=_client_id, doc="default: dsmr-logger-<host name>-<sink name>"
    )
    topic: str = key(
        "dsmr", check=_topic_prefix, doc="prefix of <topic>/reading, /telegram, /status"
    )
    qos: int = key(1, check=one_of(0, 1), doc="1: delivered when the broker acknowledged it")
    discovery: bool = key(False, check=_bool, doc="announce the meter to Home Assistant")
    discovery_prefix: str = key(
        "homeassistant", check=_topic_prefix, doc="Home Assistant's discovery topic prefix"
    )
    gas_channel: int | None = key(
        None, check=one_of(1, 2, 3, 4), doc="M-Bus channel of the gas meter"
    )
    ca_file: Path | None = key(None, check=_ca_file, doc="mqtts: the CA certificate(s) to trust")
    verify_tls: bool = key(True, check=_bool, doc="mqtts: check the broker's certificate")
    timeout: float = key(
        10.0, check=number(0.05, 600.0), doc="seconds to connect, or for an acknowledgement"
    )
    min_interval: float = _min_interval_key()
    retry_initial: float = _retry_initial_key()
    retry_max: float = _retry_max_key()
    max_in_flight: int = key(
        1, check=integer(1, 8), doc="telegrams at once while a backlog drains; 1 keeps order"
    )


def _sensor_url(value: Any) -> str:
    """The sensor's base URL; a pasted ``/current-sample`` is dropped, credentials are refused
    without being repeated (they belong in ``username``/``password``, which are masked)."""
    text = _str(value).strip()
    parsed = _split(text)
    if "@" in parsed.netloc:
        raise _Bad("put the login in meter.username and meter.password, not in the URL")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise _Bad(f"must be the sensor's http:// address, e.g. http://192.168.1.50, not {text!r}")
    if parsed.query or parsed.fragment:
        raise _Bad(f"must be the sensor's address without ?query or #fragment, not {text!r}")
    try:
        _ = parsed.port  # raises on a port that is not a number
    except ValueError:
        raise _Bad(f"has an invalid port: {text!r}") from None
    url = text.rstrip("/")
    if url.endswith("/current-sample"):
        url = url.removesuffix("/current-sample")
    try:
        check_base_url(url)  # the client's own rule, so what passes here cannot fail at start
    except ValueError as exc:
        raise _Bad(str(exc)) from None
    return url


def _basic_user(value: Any) -> str:
    user = _str(value)
    if ":" in user:
        raise _Bad("must not contain ':' (HTTP Basic auth cannot carry it)")
    return user


@dataclass(frozen=True, slots=True)
class NeurioMeterConfig:
    """A Neurio / Generac PWRview sensor on the LAN, polled at ``<url>/current-sample``."""

    url: str = key(
        check=_sensor_url, doc="the sensor's address, e.g. http://192.168.1.50 (no /current-sample)"
    )
    type: Literal["neurio"] = key("neurio", check=one_of("neurio"), doc="where readings come from")
    interval: float = key(10.0, check=number(1.0, 3600.0), doc="seconds between polls")
    timeout: float = key(5.0, check=number(0.1, 60.0), doc="seconds one poll may take")
    username: str | None = key(None, check=_basic_user, doc="HTTP Basic auth user (newer firmware)")
    password: str | None = key(
        None, check=_str, doc="HTTP Basic auth password (with username)", secret=True
    )
    grid_channel: Literal["auto", "NET", "CONSUMPTION"] = key(
        "auto",
        check=one_of("auto", "NET", "CONSUMPTION"),
        doc="the channel written as the grid meter; auto: NET when the sensor has one",
    )
    timezone: str = key(
        "Europe/Amsterdam",
        check=_zone,
        doc="the zone telegrams are dated in: the one DSMR-reader runs in",
    )

    @property
    def where(self) -> str:
        """What the logs and the status call the source (never with the login)."""
        return f"{self.url}/current-sample"


def _topic_name(value: Any) -> str:
    """One topic name (the meter's telegrams), not a filter: one meter, in its own order."""
    topic = _str(value)
    if any(c in topic for c in "+#\0"):
        raise _Bad(
            f"{topic!r}: the one topic the dongle publishes its telegrams to, e.g. "
            "'p1meter/sensor/telegram/state' (no wildcards + or #: one meter per [meter])"
        )
    if topic.startswith("$"):
        raise _Bad(f"{topic!r}: topics starting with $ are the broker's own")
    if len(topic.encode()) > 0xFFFF:
        raise _Bad("longer than 65,535 bytes")
    return topic


@dataclass(frozen=True, slots=True)
class MqttMeterConfig:
    """Raw telegrams published on an MQTT broker, one per message (ESPHome and other dongles)."""

    url: str = key(check=mqtt_url, doc="the broker: mqtt://host[:1883] or mqtts://host[:8883]")
    topic: str = key(check=_topic_name, doc="the topic the dongle publishes each telegram to")
    type: Literal["mqtt"] = key("mqtt", check=one_of("mqtt"), doc="where readings come from")
    username: str | None = key(None, check=_str, doc="the broker account's name")
    password: str | None = key(None, check=_str, doc="the broker account's password", secret=True)
    client_id: str | None = key(
        None, check=_client_id, doc="default: dsmr-logger-<host name>; the broker's session key"
    )
    session_expiry: int = key(
        86400,
        check=integer(0, 0xFFFFFFFF),
        doc="seconds the broker keeps telegrams for this client while it is away",
    )
    ca_file: Path | None = key(None, check=_ca_file, doc="mqtts: the CA certificate(s) to trust")
    timeout: float = key(
        10.0, check=number(0.05, 600.0), doc="seconds to connect, or for the broker's answer"
    )
    idle_timeout: float = _telegram_idle_key()
    reconnect_initial: float = _reconnect_initial_key("after a failed connection")
    reconnect_max: float = _reconnect_max_key("failed connections")
    require_crc: bool = _require_crc_key()
    timezone: str = _meter_timezone_key()

    @property
    def endpoint(self) -> str:
        """scheme://host:port of the broker (the default port filled in; never credentials)."""
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.port is not None:
            return self.url
        return f"{self.url}:{8883 if parsed.scheme == 'mqtts' else 1883}"

    @property
    def where(self) -> str:
        """What the logs and the status call the source: the broker and the topic."""
        return f"{self.endpoint}/{self.topic}"


SinkConfig = DsmrReaderSinkConfig | ArchiveSinkConfig | MqttSinkConfig
MeterTypeConfig = (
    MeterConfig | NeurioMeterConfig | HomeWizardConfig | HttpMeterConfig | MqttMeterConfig
)

METER_TYPES: Mapping[str, type[MeterTypeConfig]] = types.MappingProxyType(
    {
        "p1": MeterConfig,
        "neurio": NeurioMeterConfig,
        "homewizard": HomeWizardConfig,
        "http": HttpMeterConfig,
        "mqtt": MqttMeterConfig,
    }
)
"""``[meter] type`` → its configuration; each has ``type``, ``timezone`` and ``where``."""
SINK_TYPES: Mapping[str, type[SinkConfig]] = types.MappingProxyType(
    {"dsmr-reader": DsmrReaderSinkConfig, "archive": ArchiveSinkConfig, "mqtt": MqttSinkConfig}
)
"""``[[sink]] type`` → its configuration; each has ``name``, ``type`` and ``min_interval``."""


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = key(
        "info", check=one_of("debug", "info", "warning", "error"), doc="least severe level logged"
    )
    format: Literal["auto", "console", "json", "keyvalue"] = key(
        "auto",
        check=one_of("auto", "console", "json", "keyvalue"),
        doc="auto: console on a terminal, else keyvalue",
    )
    summary_interval: float = key(300.0, check=number(1.0), doc="seconds between summary lines")


@dataclass(frozen=True, slots=True)
class HttpConfig:
    listen: str | None = key(
        None, check=_listen, doc="host:port of /healthz, /status and /metrics; off unless set"
    )
    frame_window: float = key(
        60.0, check=number(1.0), doc="unhealthy when no valid telegram came for this long"
    )
    sink_failing: float = key(
        900.0, check=number(1.0), doc="unhealthy when a sink has been failing for this long"
    )

    @property
    def address(self) -> tuple[str, int] | None:
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


# Keys every [import.<cloud>] section has (the last two), and the OAuth2 clouds' credentials.


def _cloud_ca_file_key() -> Any:
    return key(None, check=_ca_file, doc="PEM file of CAs to trust instead of the system's")


def _cloud_timeout_key() -> Any:
    return key(30.0, check=number(1.0, 600.0), doc="seconds for one request")


def _oauth_client_id_key() -> Any:
    return key(check=_str, doc="OAuth2 client id")


def _oauth_client_secret_key() -> Any:
    return key(check=_str, doc="OAuth2 client secret", secret=True)


@dataclass(frozen=True, slots=True)
class ClimkitImportConfig:
    """``dsmr-logger import climkit``: a meter of a Climkit site (Swiss ZEV/RCP communities)."""

    username: str = key(check=_str, doc="Climkit API username (not the portal login)")
    password: str = key(check=_str, doc="Climkit API password", secret=True)
    site: str = key(check=_str, doc="the site's id (installation)")
    meter: str = key(check=_str, doc="the electricity meter's id on that site")
    base_url: str = key(
        "https://api.climkit.io/api/v1", check=cloud_url, doc="Climkit API endpoint"
    )
    ca_file: Path | None = _cloud_ca_file_key()
    timeout: float = _cloud_timeout_key()


@dataclass(frozen=True, slots=True)
class CopperImportConfig:
    """``dsmr-logger import copper``: an enterprise account of Copper Labs."""

    client_id: str = _oauth_client_id_key()
    client_secret: str = _oauth_client_secret_key()
    enterprise_id: str = key(check=_str, doc="the enterprise (partner) id")
    meter: str = key(check=_str, doc="the electric meter's id")
    gas_meter: str | None = key(None, check=_str, doc="the gas meter's id, if any")
    base_url: str = key(
        "https://api.copperlabs.com/api/v2", check=cloud_url, doc="Copper API endpoint"
    )
    auth_url: str = key(
        "https://auth.copperlabs.com/oauth/token", check=cloud_url, doc="OAuth2 token endpoint"
    )
    ca_file: Path | None = _cloud_ca_file_key()
    timeout: float = _cloud_timeout_key()


@dataclass(frozen=True, slots=True)
class NeurioImportConfig:
    """``dsmr-logger import neurio``: a Neurio sensor's history in the Neurio cloud."""

    client_id: str = _oauth_client_id_key()
    client_secret: str = _oauth_client_secret_key()
    sensor_id: str = key(check=_str, doc="the sensor's id, e.g. 0x0000C47F510179CF")
    base_url: str = key("https://api.neur.io/v1", check=cloud_url, doc="Neurio API endpoint")
    ca_file: Path | None = _cloud_ca_file_key()
    timeout: float = _cloud_timeout_key()


ImportSectionConfig = ClimkitImportConfig | CopperImportConfig | NeurioImportConfig
IMPORT_TYPES: Mapping[str, type[ImportSectionConfig]] = types.MappingProxyType(
    {"climkit": ClimkitImportConfig, "copper": CopperImportConfig, "neurio": NeurioImportConfig}
)
"""``[import.<cloud>]`` → its configuration (``dsmr-logger import <cloud>``)."""


@dataclass(frozen=True, slots=True)
class ImportsConfig:
    """The ``[import.*]`` sections present; None where a cloud is not configured."""

    climkit: ClimkitImportConfig | None = None
    copper: CopperImportConfig | None = None
    neurio: NeurioImportConfig | None = None


@dataclass(frozen=True, slots=True)
class Config:
    meter: MeterTypeConfig
    spool: SpoolConfig = SpoolConfig()
    sinks: tuple[SinkConfig, ...] = ()
    log: LogConfig = LogConfig()
    http: HttpConfig = HttpConfig()
    imports: ImportsConfig = ImportsConfig()


SECTIONS: Mapping[str, type[Any]] = types.MappingProxyType(
    {"spool": SpoolConfig, "log": LogConfig, "http": HttpConfig}
)
"""Sections with one fixed shape (``meter`` and ``sink`` depend on their ``type``)."""


# --- reading ------------------------------------------------------------------------------------


class _Section:
    """Reads one TOML table, recording a problem per bad key instead of stopping at the first."""

    def __init__(self, prefix: str, table: Any, problems: list[str]) -> None:
        self.prefix = prefix
        self.problems = problems
        if not isinstance(table, Mapping):
            problems.append(f"{prefix}: must be a table, not {type(table).__name__}")
            table = {}
        self.table: Mapping[str, Any] = table
        self.used: set[str] = set()

    def get(self, name: str, check: Check, default: Any = dataclasses.MISSING) -> Any:
        self.used.add(name)
        if name not in self.table:
            if default is dataclasses.MISSING:
                self.problems.append(f"{self.prefix}.{name}: is required")
                return None
            return default
        try:
            return check(self.table[name])
        except _Bad as exc:
            self.problems.append(f"{self.prefix}.{name}: {exc}")
            return None if default is dataclasses.MISSING else default

    def read(self, cls: type[Any], **given: Any) -> Any:
        """An instance of ``cls`` from this table: every key its fields declare, then finish."""
        values = dict(given)
        for f in dataclasses.fields(cls):
            if f.name in values or "check" not in f.metadata:
                continue
            check = f.metadata["check"]
            values[f.name] = self.get(
                f.name, _unmasked(check) if f.metadata["secret"] else check, f.default
            )
        for name in self.table:
            if name not in self.used and name not in values:
                self.problems.append(f"{self.prefix}.{name}: unknown key")
        return cls(**values)


def _unmasked(check: Check) -> Check:
    """A secret's check that first refuses the masked form ``check-config`` prints
    (``****ab``): a file saved from that output holds no secret, and would fail at run time."""

    def checked(value: Any) -> Any:
        if _masked(value):
            raise _Bad(MASKED)
        return check(value)

    return checked


def _masked(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(MASK)


def _meter(table: Any, problems: list[str]) -> MeterTypeConfig:
    s = _Section("meter", table, problems)
    kind = s.get("type", one_of(*METER_TYPES), "p1")
    meter: MeterTypeConfig = s.read(METER_TYPES[kind], type=kind)
    if isinstance(meter, MeterConfig) and meter.profile in PROFILES:
        # The profile's values, each overridden by a key given: what the port is opened with.
        meter = dataclasses.replace(meter, **dataclasses.asdict(meter.serial))
    return meter


def _sink(index: int, table: Any, problems: list[str]) -> SinkConfig:
    s = _Section(f"sink[{index}]", table, problems)
    name = s.get("name", _sink_name)
    if name:
        s.prefix = f"sink[{index}] ({name})"
    kind = s.get("type", one_of(*SINK_TYPES), "dsmr-reader")
    return s.read(SINK_TYPES[kind], name=name or "", type=kind)  # type: ignore[no-any-return]


def _imports(table: Any, problems: list[str]) -> ImportsConfig:
    s = _Section("import", table, problems)
    found = {}
    for name, value in s.table.items():
        if name not in IMPORT_TYPES:
            problems.append(f"import.{name}: unknown cloud (expected {', '.join(IMPORT_TYPES)})")
            continue
        found[name] = _Section(f"import.{name}", value, problems).read(IMPORT_TYPES[name])
    return ImportsConfig(**found)


def _cross_rules(config: Config) -> Iterator[str]:
    """Rules that relate keys to each other (each key alone was checked as it was read)."""
    meter = config.meter
    if isinstance(meter, MeterConfig) and meter.reconnect_initial > meter.reconnect_max:
        yield (
            f"meter.reconnect_initial: {meter.reconnect_initial:g} is above "
            f"meter.reconnect_max ({meter.reconnect_max:g})"
        )
    if isinstance(meter, NeurioMeterConfig) and (meter.username is None) != (
        meter.password is None
    ):
        given, missing = (
            ("username", "password") if meter.password is None else ("password", "username")
        )
        yield f"meter.{missing}: is required with meter.{given} (the sensor's Basic auth login)"
    if isinstance(meter, HttpMeterConfig):
        yield from _http_meter_rules(meter)
    if isinstance(meter, HomeWizardConfig) and meter.api == "v2" and meter.token is None:
        yield (
            'meter.token: api = "v2" needs a token; get one with: '
            f"dsmr-logger pair homewizard --host {meter.host} --config <this file>"
        )
    for sink in config.sinks:
        if isinstance(sink, MqttSinkConfig) and sink.ca_file and sink.url.startswith("mqtt:"):
            yield f"sink ({sink.name}).ca_file: only for mqtts:// URLs (TLS)"
    if isinstance(meter, MqttMeterConfig):
        yield from _mqtt_meter_rules(meter, config.sinks)
    names = [sink.name for sink in config.sinks]
    for duplicate in sorted({n for n in names if names.count(n) > 1}):
        yield f"sink.name: {duplicate!r} is used by more than one sink"
    directories: dict[Path, str] = {}
    for index, sink in enumerate(config.sinks):
        where = f"sink[{index}] ({sink.name})"
        if isinstance(sink, ArchiveSinkConfig):
            directory = Path(os.path.normpath(sink.directory))
            if directory in directories:
                yield (
                    f"{where}.directory: {directory} is also {directories[directory]}'s; two "
                    "archives in one directory would write into each other's day files"
                )
            directories.setdefault(directory, where)
            if directory == Path(os.path.normpath(f"{config.spool.path}-telegrams")):
                yield f"{where}.directory: {directory} is where the spool keeps its telegrams"


def _http_meter_rules(meter: HttpMeterConfig) -> Iterator[str]:
    if (meter.username is None) != (meter.password is None):
        yield "meter.username: Basic authentication needs both username and password"
    if meter.token is not None and meter.username is not None:
        yield "meter.token: either a token or username and password, not both"
    extra = {name.lower() for name, _ in meter.headers or ()}
    if "authorization" in extra and (meter.token is not None or meter.username is not None):
        yield "meter.headers: Authorization is already set by token or username/password"


def _mqtt_meter_rules(meter: MqttMeterConfig, sinks: tuple[SinkConfig, ...]) -> Iterator[str]:
    if meter.ca_file and meter.url.startswith("mqtt:"):
        yield "meter.ca_file: only for mqtts:// URLs (TLS)"
    if meter.password is not None and meter.username is None:
        yield "meter.password: is used only with meter.username"
    for sink in sinks:
        if (
            isinstance(sink, MqttSinkConfig)
            and meter.client_id
            and sink.client_id == meter.client_id
        ):
            yield (
                f"meter.client_id: {meter.client_id!r} is also sink ({sink.name}).client_id; "
                "a broker keeps one connection per client id"
            )
        if (
            isinstance(sink, MqttSinkConfig)
            and meter.topic in (f"{sink.topic}/telegram", f"{sink.topic}/reading")
            and _broker(sink.url) == _broker(meter.url)
        ):
            yield (
                f"meter.topic: {meter.topic!r} is where sink ({sink.name}) publishes: the logger "
                "would read back its own telegrams (a backlog over and over); give the sink "
                "another topic"
            )


def _broker(url: str) -> tuple[str, int]:
    """(host, port) of an mqtt:// or mqtts:// URL, the default port filled in."""
    parsed = urllib.parse.urlsplit(url)
    return (parsed.hostname or "", parsed.port or (8883 if parsed.scheme == "mqtts" else 1883))


def from_mapping(data: Mapping[str, Any]) -> Config:
    """Validate a parsed document; raises ConfigError listing every problem found."""
    problems: list[str] = []
    known = ("meter", "sink", *SECTIONS, "import")
    for name in data:
        if name not in known:
            problems.append(f"{name}: unknown section (expected {', '.join(known)})")
    if "meter" not in data:
        kinds = ", ".join(repr(k) for k in METER_TYPES if k != "p1")
        problems.append(
            "meter: section is required: [meter] with port = the P1 cable's device (e.g. "
            f'"/dev/ttyUSB0"), or a type ({kinds}) and its keys; see deploy/config.example.toml'
        )
    # Without the section its keys' own "is required" would say the same thing again.
    meter = _meter(data.get("meter", {}), problems if "meter" in data else [])
    raw_sinks = data.get("sink", [])
    if not isinstance(raw_sinks, list):
        problems.append("sink: must be an array of tables, written [[sink]]")
        raw_sinks = []
    sinks = tuple(_sink(i, t, problems) for i, t in enumerate(raw_sinks))
    sections = {
        name: _Section(name, data.get(name, {}), problems).read(cls)
        for name, cls in SECTIONS.items()
    }
    imports = _imports(data.get("import", {}), problems)
    if problems:
        raise ConfigError(problems)
    config = Config(meter=meter, sinks=sinks, imports=imports, **sections)
    problems.extend(_cross_rules(config))
    if problems:
        raise ConfigError(problems)
    return config


def read_text(path: Path) -> str:
    """A configuration file's text; a missing or undecodable file is a ConfigError naming it."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None


TWICE = re.compile(r"Cannot declare \(((?:'[^']*',? ?)+)\) twice \(at line (\d+), column \d+\)")
"""tomllib's words for a section written twice, naming it as a Python tuple: ('meter',)."""


def _toml_problem(message: str) -> str:
    """tomllib's message, with a section written twice said in the file's own words: the
    example's other [meter] sections uncommented beside the first is the likely mistake."""
    found = TWICE.fullmatch(message)
    if found is None:
        return message
    name = ".".join(re.findall(r"'([^']*)'", found[1]))
    line = found[2]
    if name == "sink":
        return f"line {line}: [sink] after [[sink]]: every sink is written [[sink]]"
    return (
        f"line {line}: a second [{name}] section; a configuration has one: delete or comment "
        "out the other"
    )


def load(path: Path) -> Config:
    """Read and validate a TOML file; errors name the file, and the line for syntax errors."""
    text = read_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: {_toml_problem(str(exc))}"]) from None
    except ValueError as exc:  # an integer of over 4300 digits: Python's own limit, no line
        raise ConfigError([f"{path}: not a configuration TOML can hold: {exc}"]) from None
    try:
        return from_mapping(data)
    except ConfigError as exc:
        raise ConfigError([f"{path}: {p}" for p in exc.problems]) from None


# --- showing ------------------------------------------------------------------------------------


def effective_toml(config: Config) -> str:
    """The configuration as TOML with every default filled in and secrets masked."""
    lines: list[str] = []

    def table(header: str, obj: Any) -> None:
        lines.append(header)
        for name, value in _shown(obj):
            if value is not None:
                lines.append(f"{name} = {_toml_value(value)}")
            elif name == "authentication_key":
                lines.append(f'{name} = ""')
        lines.append("")

    table("[meter]", config.meter)
    for name in SECTIONS:
        if name == "spool":
            table("[spool]", config.spool)
            for sink in config.sinks:
                table("[[sink]]", sink)
        else:
            table(f"[{name}]", getattr(config, name))
    for name in IMPORT_TYPES:
        if (section := getattr(config.imports, name)) is not None:
            table(f"[import.{name}]", section)
    return "\n".join(lines)


def _shown(obj: Any) -> Iterator[tuple[str, Any]]:
    """A section's keys and values as ``check-config`` shows them: resolved, secrets masked."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(obj, MeterConfig) and f.name in (
            "baudrate",
            "bytesize",
            "parity",
            "stopbits",
        ):
            value = getattr(obj.serial, f.name)
        if f.metadata.get("secret") and value and value != SMARTY_AUTHENTICATION_KEY:
            value = mask(value)  # the Smarty spec's published key is no secret
        elif f.name == "url" and isinstance(value, str):
            value = redact_query(value)
        elif f.name == "headers" and value:  # an API key may travel in a header of its own
            value = tuple((k, mask(v) if _SECRET_PARAMETER.search(k) else v) for k, v in value)
        yield f.name, value


_SECRET_PARAMETER = re.compile(r"token|key|pass|secret|auth|sig|session|code|cookie", re.IGNORECASE)
"""A query parameter or header whose name says its value may be a credential."""


def redact_query(url: str) -> str:
    """``url`` with the value of each query parameter that may be a credential masked
    (``?token=…``, ``?api_key=…``): what logs, ``/status`` and ``check-config`` show."""
    base, mark, query = url.partition("?")
    if not mark:
        return url
    parts = []
    for item in query.split("&"):
        name, eq, value = item.partition("=")
        parts.append(f"{name}={mask(value)}" if eq and _SECRET_PARAMETER.search(name) else item)
    return f"{base}?{'&'.join(parts)}"


def mask(secret: str) -> str:
    """Enough to tell two keys apart, never enough to use one."""
    return MASK if len(secret) < 12 else f"{MASK}{secret[-2:]}"


def _toml_value(value: Any) -> str:
    if isinstance(value, tuple):  # meter.headers: (name, value) pairs, shown as an inline table
        return "{ " + ", ".join(f"{_toml_value(k)} = {_toml_value(v)}" for k, v in value) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return _toml_string(str(value))


_TOML_ESCAPES: Mapping[str, str] = types.MappingProxyType(
    {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
)


def _toml_string(text: str) -> str:
    """``text`` as a TOML basic string: control characters escaped, which TOML requires (a key's
    value may hold a line break, written "\\n" in the file), so the output reads back as TOML."""
    escaped = "".join(
        _TOML_ESCAPES.get(char)
        or (f"\\u{ord(char):04X}" if ord(char) < 0x20 or ord(char) == 0x7F else char)
        for char in text
    )
    return f'"{escaped}"'


def key_table() -> str:
    """The README's table of every key: section, key, default, meaning (a test compares them)."""
    rows = ["| section | key | default | meaning |", "| --- | --- | --- | --- |"]

    def add(section: str, cls: type[Any]) -> None:
        for f in dataclasses.fields(cls):
            if "check" not in f.metadata:
                continue
            if f.default is dataclasses.MISSING:
                default = "required"
            elif f.default is None:
                default = "not set"
            else:
                default = f"`{_toml_value(f.default)}`"
            rows.append(f"| {section} | `{f.name}` | {default} | {f.metadata['doc']} |")

    for kind, meter in METER_TYPES.items():
        add(f"`[meter]` {kind}", meter)
    add("`[spool]`", SpoolConfig)
    for kind, sink in SINK_TYPES.items():
        add(f"`[[sink]]` {kind}", sink)
    for name, section in SECTIONS.items():
        if name != "spool":
            add(f"`[{name}]`", section)
    for name, section in IMPORT_TYPES.items():
        add(f"`[import.{name}]`", section)
    return "\n".join(rows)


if __name__ == "__main__":
    print(key_table())
