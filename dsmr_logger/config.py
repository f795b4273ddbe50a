"""Configuration: a TOML file (or the remote-datalogger's environment) → frozen dataclasses.

Everything is validated before any port is opened, and every mistake is reported with the key it
concerns (``meter.baudrate: must be one of ...``), so a user can fix a file without reading code.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import urllib.parse
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

BAUDRATES = (300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
DEFAULT_SPOOL_PATH = Path("/var/lib/dsmr-logger/spool.sqlite3")
DEFAULT_SPOOL_MAX_BYTES = 256 * 1024 * 1024
SMARTY_AUTHENTICATION_KEY = "00112233445566778899AABBCCDDEEFF"
SECRET_KEYS = frozenset({"api_key", "decryption_key", "authentication_key"})


class ConfigError(Exception):
    """One or more configuration mistakes, each line naming its key (or file and line)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class SerialSettings:
    baudrate: int = 115200
    bytesize: int = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: int = 1


@dataclass(frozen=True, slots=True)
class MeterConfig:
    port: str
    serial: SerialSettings = SerialSettings()
    require_crc: bool = False
    max_frame_bytes: int = 16 * 1024
    idle_timeout: float = 30.0
    """Seconds without a byte before the link is reopened (catches half-open ser2net links)."""
    reconnect_initial: float = 1.0
    reconnect_max: float = 60.0
    decryption_key: str | None = field(default=None, repr=False)
    """32 hex digits: the meter encrypts its P1 output (Luxembourg Smarty and similar)."""
    authentication_key: str | None = field(default=SMARTY_AUTHENTICATION_KEY, repr=False)
    """The GCM additional-data key; "" when the meter uses none."""
    timezone: str = "Europe/Amsterdam"
    """The meter's local time zone: how its timestamps are read (for API v2)."""

    @property
    def is_network(self) -> bool:
        return "://" in self.port


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    path: Path = DEFAULT_SPOOL_PATH
    max_bytes: int = DEFAULT_SPOOL_MAX_BYTES
    flush_interval: float = 5.0
    durability: Literal["batched", "strict"] = "batched"


@dataclass(frozen=True, slots=True)
class DsmrReaderSinkConfig:
    name: str
    url: str
    api_key: str = field(repr=False)
    api: Literal["v1", "v2"] = "v1"
    auth_header: Literal["token", "x-authkey"] = "token"
    timeout: float = 20.0
    verify_tls: bool = True
    min_interval: float = 0.0
    retry_initial: float = 1.0
    retry_max: float = 300.0
    gas_channel: int | None = None
    """v2: the M-Bus channel of the gas meter (default: the first device of type gas)."""
    max_in_flight: int = 1
    """Requests at once while a backlog drains (confirmed in order); 1 keeps arrival in order."""
    type: Literal["dsmr-reader"] = "dsmr-reader"


@dataclass(frozen=True, slots=True)
class ArchiveSinkConfig:
    name: str
    directory: Path
    compress_after_days: int | None = None
    min_interval: float = 0.0
    type: Literal["archive"] = "archive"


SinkConfig = DsmrReaderSinkConfig | ArchiveSinkConfig


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "console", "json", "keyvalue"] = "auto"
    summary_interval: float = 300.0


@dataclass(frozen=True, slots=True)
class HttpConfig:
    listen: str | None = None
    """``host:port`` of the status endpoint (/healthz, /status, /metrics); None: off."""
    frame_window: float = 60.0
    """Unhealthy when no valid frame arrived for this many seconds."""
    sink_failing: float = 900.0
    """Unhealthy when a sink has been failing for this many seconds."""

    @property
    def address(self) -> tuple[str, int] | None:
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class Config:
    meter: MeterConfig
    spool: SpoolConfig = SpoolConfig()
    sinks: tuple[SinkConfig, ...] = ()
    log: LogConfig = LogConfig()
    http: HttpConfig = HttpConfig()


# --- validation helpers: each returns the converted value or raises _Bad(message) ----------------


class _Bad(Exception):
    pass


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


def _number(minimum: float, maximum: float = math.inf) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Bad(f"must be a number, not {value!r}")
        if not minimum <= value <= maximum:
            bound = f"between {minimum} and {maximum}" if maximum < math.inf else f">= {minimum}"
            raise _Bad(f"must be {bound}, not {value}")
        return float(value)

    return check


def _integer(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"must be an integer, not {value!r}")
        if value < minimum:
            raise _Bad(f"must be >= {minimum}, not {value}")
        return value

    return check


def _one_of(*choices: Any) -> Callable[[Any], Any]:
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
        key = bytes.fromhex(value)
    except ValueError:
        key = b""
    if len(key) != 16:
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
    return Path(_str(value)).expanduser()


def _port(value: Any) -> str:
    port = _str(value)
    if "://" in port:
        parsed = urllib.parse.urlsplit(port)
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
    return port


def _url(value: Any) -> str:
    url = _str(value).rstrip("/")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise _Bad(f"must be an http:// or https:// URL, e.g. http://192.168.1.10, not {value!r}")
    return url


_PROFILES = {
    "dsmr4": SerialSettings(115200, 8, "N", 1),
    "dsmr22": SerialSettings(9600, 7, "E", 1),
}


class _Section:
    """Reads one TOML table, recording a problem per bad key instead of stopping at the first."""

    def __init__(self, prefix: str, table: Any, problems: list[str]) -> None:
        self.prefix = prefix
        self.problems = problems
        if not isinstance(table, Mapping):
            problems.append(f"{prefix}: must be a table, not {type(table).__name__}")
            table = {}
        self.table = table
        self.used: set[str] = set()

    def get(self, key: str, check: Callable[[Any], Any], default: Any = dataclasses.MISSING) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is dataclasses.MISSING:
                self.problems.append(f"{self.prefix}.{key}: is required")
            return None if default is dataclasses.MISSING else default
        try:
            return check(self.table[key])
        except _Bad as exc:
            self.problems.append(f"{self.prefix}.{key}: {exc}")
            return None if default is dataclasses.MISSING else default

    def finish(self) -> None:
        for key in self.table:
            if key not in self.used:
                self.problems.append(f"{self.prefix}.{key}: unknown key")


def _meter(table: Any, problems: list[str]) -> MeterConfig:
    s = _Section("meter", table, problems)
    profile = s.get("profile", _one_of(*_PROFILES), "dsmr4")
    base = _PROFILES[profile]
    serial = SerialSettings(
        baudrate=int(s.get("baudrate", _one_of(*BAUDRATES), base.baudrate)),
        bytesize=s.get("bytesize", _one_of(7, 8), base.bytesize),
        parity=s.get("parity", _one_of("N", "E", "O"), base.parity),
        stopbits=s.get("stopbits", _one_of(1, 2), base.stopbits),
    )
    meter = MeterConfig(
        port=s.get("port", _port) or "",
        serial=serial,
        require_crc=s.get("require_crc", _bool, False),
        max_frame_bytes=s.get("max_frame_bytes", _integer(1024), 16 * 1024),
        idle_timeout=s.get("idle_timeout", _number(0.05), 30.0),
        reconnect_initial=s.get("reconnect_initial", _number(0.01), 1.0),
        reconnect_max=s.get("reconnect_max", _number(0.01), 60.0),
        decryption_key=s.get("decryption_key", _aes_key, None),
        timezone=s.get("timezone", _zone, "Europe/Amsterdam"),
        authentication_key=s.get(
            "authentication_key", _optional_aes_key, SMARTY_AUTHENTICATION_KEY
        ),
    )
    s.finish()
    return meter


def _spool(table: Any, problems: list[str]) -> SpoolConfig:
    s = _Section("spool", table, problems)
    spool = SpoolConfig(
        path=s.get("path", _path, DEFAULT_SPOOL_PATH),
        max_bytes=s.get("max_bytes", _integer(64 * 1024), DEFAULT_SPOOL_MAX_BYTES),
        flush_interval=s.get("flush_interval", _number(0.0, 3600.0), 5.0),
        durability=s.get("durability", _one_of("batched", "strict"), "batched"),
    )
    s.finish()
    return spool


def _sink(index: int, table: Any, problems: list[str]) -> SinkConfig | None:
    s = _Section(f"sink[{index}]", table, problems)
    name = s.get("name", _str)
    if name:
        s.prefix = f"sink[{index}] ({name})"
    kind = s.get("type", _one_of("dsmr-reader", "archive"), "dsmr-reader")
    min_interval = s.get("min_interval", _number(0.0, 86400.0), 0.0)
    sink: SinkConfig | None
    if kind == "archive":
        sink = ArchiveSinkConfig(
            name=name or "",
            directory=s.get("directory", _path),
            compress_after_days=s.get("compress_after_days", _integer(1), None),
            min_interval=min_interval,
        )
    else:
        sink = DsmrReaderSinkConfig(
            name=name or "",
            url=s.get("url", _url),
            api_key=s.get("api_key", _str),
            api=s.get("api", _one_of("v1", "v2"), "v1"),
            auth_header=s.get("auth_header", _one_of("token", "x-authkey"), "token"),
            timeout=s.get("timeout", _number(0.05, 600.0), 20.0),
            verify_tls=s.get("verify_tls", _bool, True),
            min_interval=min_interval,
            retry_initial=s.get("retry_initial", _number(0.01, 3600.0), 1.0),
            retry_max=s.get("retry_max", _number(0.01, 86400.0), 300.0),
            gas_channel=s.get("gas_channel", _one_of(1, 2, 3, 4), None),
            max_in_flight=s.get("max_in_flight", _one_of(1, 2, 3, 4, 5, 6, 7, 8), 1),
        )
    s.finish()
    return sink


def _log(table: Any, problems: list[str]) -> LogConfig:
    s = _Section("log", table, problems)
    log = LogConfig(
        level=s.get("level", _one_of("debug", "info", "warning", "error"), "info"),
        format=s.get("format", _one_of("auto", "console", "json", "keyvalue"), "auto"),
        summary_interval=s.get("summary_interval", _number(1.0), 300.0),
    )
    s.finish()
    return log


def _listen(value: Any) -> str:
    text = _str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _Bad(f"must be host:port, e.g. 127.0.0.1:8484, not {value!r}")
    return text


def _http(table: Any, problems: list[str]) -> HttpConfig:
    s = _Section("http", table, problems)
    http = HttpConfig(
        listen=s.get("listen", _listen, None),
        frame_window=s.get("frame_window", _number(1.0), 60.0),
        sink_failing=s.get("sink_failing", _number(1.0), 900.0),
    )
    s.finish()
    return http


def from_mapping(data: Mapping[str, Any]) -> Config:
    """Validate a parsed document; raises ConfigError listing every problem found."""
    problems: list[str] = []
    for key in data:
        if key not in ("meter", "spool", "sink", "log", "http"):
            problems.append(f"{key}: unknown section (expected meter, spool, sink, log, http)")
    if "meter" not in data:
        problems.append("meter: section is required (at least meter.port)")
    meter = _meter(data.get("meter", {}), problems)
    spool = _spool(data.get("spool", {}), problems)
    raw_sinks = data.get("sink", [])
    if not isinstance(raw_sinks, list):
        problems.append("sink: must be an array of tables, written [[sink]]")
        raw_sinks = []
    sinks = [_sink(i, t, problems) for i, t in enumerate(raw_sinks)]
    names = [s.name for s in sinks if s is not None and s.name]
    for duplicate in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"sink.name: {duplicate!r} is used by more than one sink")
    log = _log(data.get("log", {}), problems)
    http = _http(data.get("http", {}), problems)
    if problems:
        raise ConfigError(problems)
    return Config(meter=meter, spool=spool, sinks=tuple(s for s in sinks if s), log=log, http=http)


def read_text(path: Path) -> str:
    """A configuration file's text; a missing or undecodable file is a ConfigError naming it."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None


def load(path: Path) -> Config:
    """Read and validate a TOML file; errors name the file, and the line for syntax errors."""
    text = read_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    try:
        return from_mapping(data)
    except ConfigError as exc:
        raise ConfigError([f"{path}: {p}" for p in exc.problems]) from None


def effective_toml(config: Config) -> str:
    """The configuration as TOML with every default filled in and secrets masked."""
    lines: list[str] = []

    def table(header: str, obj: Any, skip: tuple[str, ...] = ()) -> None:
        lines.append(header)
        for f in dataclasses.fields(obj):
            if f.name in skip:
                continue
            value = getattr(obj, f.name)
            if f.name in SECRET_KEYS and value and value != SMARTY_AUTHENTICATION_KEY:
                value = mask(value)  # the Smarty spec's published key is no secret
            if dataclasses.is_dataclass(value):
                for sub in dataclasses.fields(value):
                    lines.append(f"{sub.name} = {_toml_value(getattr(value, sub.name))}")
                continue
            if value is not None:
                lines.append(f"{f.name} = {_toml_value(value)}")
            elif f.name == "authentication_key":
                lines.append(f'{f.name} = ""')
        lines.append("")

    table("[meter]", config.meter)
    table("[spool]", config.spool)
    for sink in config.sinks:
        table("[[sink]]", sink)
    table("[log]", config.log)
    table("[http]", config.http)
    return "\n".join(lines)


def mask(secret: str) -> str:
    """Enough to tell two keys apart, never enough to use one."""
    return "****" if len(secret) < 12 else f"****{secret[-2:]}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
