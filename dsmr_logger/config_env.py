"""Configuration from the remote datalogger's environment (``DSMRREADER_REMOTE_DATALOGGER_*``).

A user replacing the remote-datalogger script can keep its environment variables (or its ``.env``
file) unchanged. They are translated into the same document a TOML file would give and validated by
:func:`dsmr_logger.config.from_mapping`, so both paths share every rule; the problems it reports
are then renamed from TOML keys (``meter.baudrate``) back to the variables the user actually wrote
(``DSMRREADER_REMOTE_DATALOGGER_SERIAL_BAUDRATE``).

Mapping (script defaults in brackets)::

    INPUT_METHOD serial | ipv4 [serial]      which of the two groups below is used
    SERIAL_PORT [/dev/ttyUSB0]               meter.port
    SERIAL_BAUDRATE/_BYTESIZE/_PARITY        meter.baudrate / bytesize / parity [115200, 8, N]
    NETWORK_HOST + NETWORK_PORT              meter.port = "socket://host:port"
    API_HOSTS, API_KEYS (comma-separated,    one [[sink]] per host: type dsmr-reader, api v1,
      paired by position)                      url = the host, name = its host name (unique)
    TIMEOUT [20]                             every sink's timeout
    SLEEP [0.5]                              every sink's min_interval (the script slept this long
                                               after each telegram; we keep reading and drop
                                               instead, see DESIGN.md section 3)
    DEBUG_LOGGING [false]                    log.level = "debug" when true
    MIN_SLEEP_FOR_RECONNECT                  checked, then ignored (see ``_RECONNECT_NOTE``)

Sink names are derived from the host list, so they stay stable (and keep their spooled backlog) as
long as that list does.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from dsmr_logger.config import Config, ConfigError, from_mapping, mask, read_text
from dsmr_logger.net.http import redact_url

T = TypeVar("T")

PREFIX = "DSMRREADER_REMOTE_DATALOGGER_"

INPUT_METHOD = PREFIX + "INPUT_METHOD"
SERIAL_PORT = PREFIX + "SERIAL_PORT"
SERIAL_BAUDRATE = PREFIX + "SERIAL_BAUDRATE"
SERIAL_BYTESIZE = PREFIX + "SERIAL_BYTESIZE"
SERIAL_PARITY = PREFIX + "SERIAL_PARITY"
NETWORK_HOST = PREFIX + "NETWORK_HOST"
NETWORK_PORT = PREFIX + "NETWORK_PORT"
API_HOSTS = PREFIX + "API_HOSTS"
API_KEYS = PREFIX + "API_KEYS"
TIMEOUT = PREFIX + "TIMEOUT"
SLEEP = PREFIX + "SLEEP"
DEBUG_LOGGING = PREFIX + "DEBUG_LOGGING"
MIN_SLEEP_FOR_RECONNECT = PREFIX + "MIN_SLEEP_FOR_RECONNECT"
SPOOL = "DSMR_LOGGER_SPOOL"
"""Our own variable: where the spool goes (the script had none)."""

KNOWN = frozenset(
    {
        INPUT_METHOD,
        SERIAL_PORT,
        SERIAL_BAUDRATE,
        SERIAL_BYTESIZE,
        SERIAL_PARITY,
        NETWORK_HOST,
        NETWORK_PORT,
        API_HOSTS,
        API_KEYS,
        TIMEOUT,
        SLEEP,
        DEBUG_LOGGING,
        MIN_SLEEP_FOR_RECONNECT,
    }
)
_SERIAL_ONLY = (SERIAL_PORT, SERIAL_BAUDRATE, SERIAL_BYTESIZE, SERIAL_PARITY)
_NETWORK_ONLY = (NETWORK_HOST, NETWORK_PORT)

SCRIPT_DEFAULT_PORT = "/dev/ttyUSB0"
SCRIPT_DEFAULT_TIMEOUT = 20.0
SCRIPT_DEFAULT_SLEEP = 0.5

# python-decouple's booleans, which the script used to read DEBUG_LOGGING.
_BOOLEANS = {
    "1": True,
    "yes": True,
    "y": True,
    "true": True,
    "t": True,
    "on": True,
    "0": False,
    "no": False,
    "n": False,
    "false": False,
    "f": False,
    "off": False,
}

_RECONNECT_NOTE = (
    f"{MIN_SLEEP_FOR_RECONNECT} is ignored: the script closed and reopened the port after every "
    f"telegram when {SLEEP} was at least this value; dsmr-logger keeps the port open and only "
    "reconnects a lost link, with backoff from meter.reconnect_initial"
)


# --- .env files -------------------------------------------------------------------------------

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"'}


def parse_dotenv(text: str, source: str = ".env") -> dict[str, str]:
    """Parse ``.env`` text; the last assignment of a name wins.

    The dialect is the common core of python-dotenv, python-decouple and Docker Compose:
    ``KEY=value`` (spaces around ``=`` allowed), an optional ``export`` prefix, ``#`` comment lines,
    blank lines, ``'single quoted'`` values taken literally, ``"double quoted"`` values with the
    escapes ``\\n \\r \\t \\\\ \\"``, and a trailing `` # comment`` after a value (for an unquoted
    value the ``#`` must follow a space). No multi-line values and no ``${VAR}`` expansion.
    Raises ConfigError naming ``source`` and the line for every malformed line.
    """
    values: dict[str, str] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key, value = _parse_line(line)
        except ValueError as exc:
            problems.append(f"{source}:{number}: {exc}")
            continue
        values[key] = value
    if problems:
        raise ConfigError(problems)
    return values


def _parse_line(line: str) -> tuple[str, str]:
    if line.startswith("export") and line[6:7].isspace():
        line = line[6:].lstrip()
    key, equals, rest = line.partition("=")
    key = key.strip()
    if not equals:
        raise ValueError(f"expected KEY=value, not {_shorten(line)!r}")
    if not _KEY.fullmatch(key):
        raise ValueError(f"invalid variable name {_shorten(key)!r} (letters, digits and _ only)")
    rest = rest.strip()
    if not rest or rest[0] not in "'\"":
        value = re.split(r"\s#", rest, maxsplit=1)[0].rstrip()
        return key, value
    quote = rest[0]
    chars: list[str] = []
    i = 1
    while i < len(rest):
        char = rest[i]
        if char == quote:
            break
        if quote == '"' and char == "\\" and i + 1 < len(rest):
            following = rest[i + 1]
            if following in _ESCAPES:
                chars.append(_ESCAPES[following])
                i += 2
                continue
        chars.append(char)
        i += 1
    else:
        raise ValueError(f"{key}: missing closing {quote} (values cannot span lines)")
    after = rest[i + 1 :].strip()
    if after and not after.startswith("#"):
        raise ValueError(f"{key}: unexpected text after the closing {quote}: {_shorten(after)!r}")
    return key, "".join(chars)


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_dotenv(path: Path) -> dict[str, str]:
    """Read a ``.env`` file; errors name the file (and the line)."""
    return parse_dotenv(read_text(path), str(path))


# --- environment → TOML-like document ---------------------------------------------------------


class _Translation:
    """The document being built, its problems, its notes, and where each TOML key came from."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = values
        self.problems: list[tuple[tuple[str, ...], str]] = []
        self.notes: list[str] = []
        self.origin: dict[str, tuple[str, ...]] = {}
        """TOML key as from_mapping names it (``meter.baudrate``) → the variables behind it."""

    def get(self, name: str) -> str | None:
        value = self.values.get(name)
        return value.strip() if value is not None and value.strip() else None

    def bad(self, message: str, *names: str) -> None:
        self.problems.append((names, message))

    def number(self, name: str, default: float) -> float | None:
        return self._converted(name, default, float, "a number")

    def integer(self, name: str, default: int) -> int | None:
        return self._converted(name, default, int, "an integer")

    def _converted(self, name: str, default: T, convert: Callable[[str], T], what: str) -> T | None:
        text = self.get(name)
        if text is None:
            return default
        try:
            return convert(text)
        except ValueError:
            self.bad(f"must be {what}, not {text!r}", name)
            return None


def _csv(text: str | None) -> list[str]:
    """Comma-separated items, stripped, empty ones dropped (as python-decouple's Csv did)."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def _plain_host(host: str) -> bool:
    """A host name, an IPv4 address or an IPv6 address (bare or in brackets): what the script
    put between ``socket://`` and the port."""
    try:
        ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?", host) is not None
    return True


def _sink_names(hosts: list[str]) -> list[str]:
    names: list[str] = []
    for index, host in enumerate(hosts, start=1):
        try:
            hostname = urllib.parse.urlsplit(host).hostname or ""
        except ValueError:  # "http://[::1": the URL's own check names the mistake
            hostname = ""
        # A sink name is a plain word (config.SINK_NAME): an IPv6 host's colons become dashes.
        base = re.sub(r"[^A-Za-z0-9_.-]", "-", hostname).strip("-_.")[:60] or f"host-{index}"
        name, suffix = base, 2
        while name in names:
            name, suffix = f"{base}-{suffix}", suffix + 1
        names.append(name)
    return names


def _translate(t: _Translation, spool_path: Path | None) -> dict[str, Any]:
    document: dict[str, Any] = {}
    method = (t.get(INPUT_METHOD) or "serial").lower()
    if t.get(INPUT_METHOD) is None:
        t.notes.append(f"{INPUT_METHOD} not set: reading a serial port, as with 'serial'")
    if method not in ("serial", "ipv4"):
        t.bad(f"must be 'serial' or 'ipv4', not {t.get(INPUT_METHOD)!r}", INPUT_METHOD)

    meter: dict[str, Any] = {}
    if method == "ipv4":
        host, port = t.get(NETWORK_HOST), t.integer(NETWORK_PORT, 0)
        if host is None:
            t.bad("is required when the input method is ipv4", NETWORK_HOST)
        elif not _plain_host(host):  # not repeated: "user:password@host" holds a password
            t.bad("must be a host name or IP address, e.g. 192.168.1.20", NETWORK_HOST)
            host = None
        if t.get(NETWORK_PORT) is None:
            t.bad("is required when the input method is ipv4", NETWORK_PORT)
        elif port is not None and not 1 <= port <= 65535:
            t.bad(f"must be between 1 and 65535, not {port}", NETWORK_PORT)
            port = None
        if host is not None and port:
            shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
            meter["port"] = f"socket://{shown}:{port}"
        t.origin["meter.port"] = (NETWORK_HOST, NETWORK_PORT)
        ignored = [name for name in _SERIAL_ONLY if t.get(name) is not None]
    else:
        port_path = t.get(SERIAL_PORT)
        if port_path is None:
            port_path = SCRIPT_DEFAULT_PORT
            t.notes.append(f"{SERIAL_PORT} not set: using {SCRIPT_DEFAULT_PORT}")
        meter["port"] = port_path
        for key, name, default in (
            ("baudrate", SERIAL_BAUDRATE, 115200),
            ("bytesize", SERIAL_BYTESIZE, 8),
        ):
            value = t.integer(name, default)
            if value is not None:
                meter[key] = value
        meter["parity"] = (t.get(SERIAL_PARITY) or "N").upper()
        t.origin.update(
            {
                "meter.port": (SERIAL_PORT,),
                "meter.baudrate": (SERIAL_BAUDRATE,),
                "meter.bytesize": (SERIAL_BYTESIZE,),
                "meter.parity": (SERIAL_PARITY,),
            }
        )
        ignored = [name for name in _NETWORK_ONLY if t.get(name) is not None]
    if ignored and method in ("serial", "ipv4"):
        t.notes.append(f"ignored because the input method is {method}: {', '.join(ignored)}")
    document["meter"] = meter

    reconnect = t.number(MIN_SLEEP_FOR_RECONNECT, 1.0)
    if t.get(MIN_SLEEP_FOR_RECONNECT) is not None and reconnect is not None:
        t.notes.append(_RECONNECT_NOTE)

    timeout = t.number(TIMEOUT, SCRIPT_DEFAULT_TIMEOUT)
    sleep = t.number(SLEEP, SCRIPT_DEFAULT_SLEEP)
    hosts, keys = _csv(t.get(API_HOSTS)), _csv(t.get(API_KEYS))
    if not hosts:
        t.bad("is required: the DSMR-reader URL(s), e.g. http://192.168.1.10", API_HOSTS)
    if not keys:
        t.bad("is required: the DSMR-reader API key(s), one per host", API_KEYS)
    sinks: list[dict[str, Any]] = []
    if hosts and keys and len(hosts) != len(keys):
        t.bad(
            f"{len(hosts)} host(s) but {len(keys)} key(s); they are paired by position",
            API_HOSTS,
            API_KEYS,
        )
    elif hosts and keys:
        names = _sink_names(hosts)
        for index, (name, host, key) in enumerate(zip(names, hosts, keys, strict=True)):
            sink: dict[str, Any] = {
                "name": name,
                "type": "dsmr-reader",
                "url": host,
                "api_key": key,
                "api": "v1",
                "auth_header": "token",
            }
            if timeout is not None:
                sink["timeout"] = timeout
            if sleep is not None:
                sink["min_interval"] = sleep
            sinks.append(sink)
            for prefix in (f"sink[{index}]", f"sink[{index}] ({name})"):
                t.origin[f"{prefix}.url"] = (API_HOSTS,)
                t.origin[f"{prefix}.name"] = (API_HOSTS,)
                t.origin[f"{prefix}.api_key"] = (API_KEYS,)
                t.origin[f"{prefix}.timeout"] = (TIMEOUT,)
                t.origin[f"{prefix}.min_interval"] = (SLEEP,)
            t.notes.append(
                f"sink {name!r}: {redact_url(host)} (API v1, key {mask(key)}), "
                f"timeout {timeout} s, at most one telegram per {sleep} s"
            )
    document["sink"] = sinks

    debug_text = t.get(DEBUG_LOGGING)
    if debug_text is not None:
        debug = _BOOLEANS.get(debug_text.lower())
        if debug is None:
            t.bad(f"must be true or false, not {debug_text!r}", DEBUG_LOGGING)
        elif debug:
            document["log"] = {"level": "debug"}
            t.origin["log.level"] = (DEBUG_LOGGING,)

    if spool_path is not None:
        document["spool"] = {"path": str(spool_path)}
        t.origin["spool.path"] = (SPOOL,)
    return document


def _rename(problem: str, origin: Mapping[str, tuple[str, ...]]) -> tuple[tuple[str, ...], str]:
    """``meter.baudrate: must be ...`` → ((SERIAL_BAUDRATE,), ``must be ...``)."""
    key, sep, message = problem.partition(": ")
    if sep and key in origin:
        return origin[key], message
    return (), problem


def _format(names: tuple[str, ...], message: str) -> str:
    return f"{' and '.join(names)}: {message}" if names else message


def from_environment(
    environ: Mapping[str, str],
    *,
    dotenv: Path | None = None,
    spool_path: Path | None = None,
) -> tuple[Config, list[str]] | None:
    """The remote datalogger's settings as a Config, or None if none of its variables is set.

    ``environ`` wins over the ``dotenv`` file (as python-decouple did); only names starting with
    ``DSMRREADER_REMOTE_DATALOGGER_`` are looked at. ``spool_path`` sets spool.path (the script had
    no spool). Returns ``(config, notes)``: the notes say, for the log, what was assumed, mapped or
    ignored (API keys masked). Raises ConfigError whose every line names the variable(s) at fault,
    or the ``.env`` file and line.
    """
    file_values = read_dotenv(dotenv) if dotenv is not None else {}
    values = {k: v for k, v in file_values.items() if k.startswith(PREFIX)}
    overridden = sorted(k for k in environ if k.startswith(PREFIX) and k in values)
    values.update({k: v for k, v in environ.items() if k.startswith(PREFIX)})
    if not values:
        return None

    t = _Translation(values)
    sources = "the environment"
    if dotenv is not None and file_values:
        sources += f" and {dotenv}"
    t.notes.append(f"settings from DSMRREADER_REMOTE_DATALOGGER_* variables in {sources}")
    if overridden:
        t.notes.append(f"the environment overrides {dotenv} for: {', '.join(overridden)}")
    unknown = sorted(k for k in values if k not in KNOWN)
    if unknown:
        t.notes.append(f"ignored unknown variable(s): {', '.join(unknown)}")
    empty = sorted(k for k in values if k in KNOWN and not values[k].strip())
    if empty:
        t.notes.append(f"empty, so treated as not set: {', '.join(empty)}")

    document = _translate(t, spool_path)
    config: Config | None = None
    try:
        config = from_mapping(document)
    except ConfigError as exc:
        blamed = {name for names, _ in t.problems for name in names}
        for problem in exc.problems:
            names, message = _rename(problem, t.origin)
            if not blamed.intersection(names):  # already reported from the raw value
                t.problems.append((names, message))
    if t.problems or config is None:
        lines = [_format(names, message) for names, message in t.problems]
        raise ConfigError(list(dict.fromkeys(lines)))
    t.notes.append(f"undelivered telegrams are kept in {config.spool.path} until delivered")
    return config, t.notes
