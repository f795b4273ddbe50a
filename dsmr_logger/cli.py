"""Command line: ``dsmr-logger run | check-config | status | spool | parse | simulate | ...``.

A person never sees a traceback here: every mistake ends in one line on stderr naming the key,
file or path, and an exit status from one short table — 0 fine, 1 cannot start or failed at run
time, 2 configuration or usage error; ``status``: 0 healthy, 1 unhealthy, 3 unknown (a
configuration or spool it cannot read included). A pipe closed early (``| head``) is not an
error, and Ctrl-C is not a traceback. Options such as ``--config`` may stand anywhere after the
program name (``spool --config F list`` and ``spool list --config F`` alike).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from dsmr_logger import __version__
from dsmr_logger.config import Config, ConfigError, LogConfig, effective_toml, load
from dsmr_logger.delivery.spool import SpoolError
from dsmr_logger.logsetup import configure
from dsmr_logger.net.http import redact_url
from dsmr_logger.tools import printable

if TYPE_CHECKING:
    from dsmr_logger.daemon import Daemon

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_UNKNOWN = 3  # status only
EXIT_INTERRUPTED = 130

DEFAULT_CONFIG = Path("/etc/dsmr-logger/config.toml")
CONFIG_VARIABLE = "DSMR_LOGGER_CONFIG"
"""Names the configuration file used when no --config is given (else DEFAULT_CONFIG)."""
USES_CONFIG = frozenset({"run", "check-config", "backfill", "import", "status", "spool", "pair"})
CONFIG_HELP = (
    "TOML configuration file (default: the remote datalogger's DSMRREADER_REMOTE_DATALOGGER_* "
    f"variables when set, else ${CONFIG_VARIABLE}, else {DEFAULT_CONFIG})"
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    configure(LogConfig())  # stderr until the configuration says otherwise; stdout is for output
    command = getattr(args, "command", None)
    if not command:
        parser.print_help()
        return EXIT_CONFIG
    if command not in USES_CONFIG and hasattr(args, "config"):
        parser.error(f"--config: not used by {command}")
    try:
        status: int = args.handler(args)
        sys.stdout.flush()
    except BrokenPipeError:  # `dsmr-logger parse ... | head -1`: the reader has had enough
        _silence_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        print("\ndsmr-logger: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return status


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush cannot fail on the closed pipe."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _error(message: str) -> None:
    """One line on stderr; what a server or file put in it cannot drive the terminal."""
    print(f"dsmr-logger: {printable(redact_url(message))}", file=sys.stderr)


# --- the parser ---------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every option that has a default shows it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        shown = not (default is None or isinstance(default, bool) or default == argparse.SUPPRESS)
        if action.option_strings and shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _positive(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def _not_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text}")
    return value


def _tcp_port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number, not {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535, not {text}")
    return value


def _with_config(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--config`` on this (sub)command too; SUPPRESS keeps a later parser from resetting it."""
    parser.add_argument(
        "--config", type=Path, metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP
    )
    return parser


def _command(commands: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=summary, description=description, formatter_class=_Formatter
    )
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsmr-logger",
        description="Read a smart meter's P1 port and deliver every telegram to DSMR-reader.",
        epilog="Exit status: 0 ok, 1 cannot start or failed, 2 configuration or usage error. "
        "'dsmr-logger COMMAND --help' explains each command.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"dsmr-logger {__version__}")
    _with_config(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = _command(
        commands,
        "run",
        "run the datalogger",
        "Run the datalogger: read the meter, deliver every telegram to every sink, keep what\n"
        "waits in the spool. Stops cleanly on SIGTERM, SIGINT or SIGHUP.\n\n"
        "Without --config it reads the remote datalogger's DSMRREADER_REMOTE_DATALOGGER_*\n"
        "variables, from the environment or a .env file in the working folder, when any is\n"
        f"set; else ${CONFIG_VARIABLE} or {DEFAULT_CONFIG}.\n\n"
        "Exit status: 0 stopped, 1 cannot start, 2 configuration error.",
    )
    _with_config(run)
    run.set_defaults(handler=_run)

    check = _command(
        commands,
        "check-config",
        "validate a configuration and print it, secrets masked",
        "Validate a configuration as 'run' would read it, and print it with every default\n"
        "filled in and secrets masked. Also checks, as the current user, what would fail at\n"
        "start: spool and archive directories that cannot be created or written; a missing\n"
        "meter device is a warning (it may be plugged in later).\n\n"
        "Exit status: 0 valid, 2 a mistake (each named by its key).",
    )
    _with_config(check)
    check.set_defaults(handler=_check_config)

    sim = _command(
        commands,
        "simulate",
        "play recorded telegrams on a virtual serial port",
        "Play recorded telegrams on a virtual serial port (a pty) and print its path, for a\n"
        "daemon to read as it reads /dev/ttyUSB0. Each telegram gets a fresh timestamp in the\n"
        "meter's time zone and a fresh CRC; the timestamps advance by the capture's own\n"
        "spacing (1 s when it has none), so every telegram carries a distinct, increasing time\n"
        "even with --interval 0. An encrypted capture (.frame.hex) is played as recorded, or\n"
        "restamped and encrypted again when --decryption-key is given.",
    )
    sim.add_argument(
        "--capture",
        type=Path,
        help="capture, archive (.log/.log.gz), telegram or encrypted frame (.hex) "
        "(default: a bundled DSMR 5 capture)",
    )
    sim.add_argument(
        "--interval",
        type=_not_negative,
        default=1.0,
        help="seconds between telegrams; 0 = as fast as the reader takes them",
    )
    sim.add_argument("--link", type=Path, help="keep a symlink to the port at this path")
    sim.add_argument("--count", type=_count, help="stop after this many telegrams")
    sim.add_argument(
        "--as-recorded", action="store_true", help="send the telegrams unchanged (no restamping)"
    )
    sim.add_argument("--timezone", default="Europe/Amsterdam", help="the meter's time zone")
    _key_options(sim)
    sim.set_defaults(handler=_simulate)

    neurio = _command(
        commands,
        "simulate-neurio",
        "serve a fake Neurio sensor's /current-sample on 127.0.0.1",
        "Serve a fake Neurio home energy sensor's GET /current-sample on 127.0.0.1 and print\n"
        'its URL, for a daemon with [meter] type = "neurio" to poll. Ctrl-C stops it.',
    )
    neurio.add_argument(
        "--shape", choices=("eu3", "split", "solar"), default="solar", help="which installation"
    )
    neurio.add_argument(
        "--port", type=_tcp_port, default=0, help="TCP port (default: any free one)"
    )
    neurio.add_argument("--username", help="ask for this HTTP Basic auth login (with --password)")
    neurio.add_argument("--password", help="the login's password")
    neurio.add_argument("--unsynchronized", action="store_true", help="no clock: NOT_SYNCHRONIZED")
    neurio.add_argument(
        "--tick",
        choices=("clock", "request"),
        default="clock",
        help="a new sample per second (clock) or per request (request, for tests)",
    )
    neurio.add_argument("--control", action="store_true", help="a control port for tests")
    neurio.set_defaults(handler=_simulate_neurio)

    parse = _command(
        commands,
        "parse",
        "show what telegrams say and their API v2 fields",
        "Show what each telegram says (its parsed reading) and the exact API v2 fields it maps\n"
        "to, as JSON, or why it is rejected (CRC) or cannot be mapped. One telegram: one JSON\n"
        "document; several: a JSON array, or one document per line with --jsonl.\n\n"
        "Exit status: 0 every telegram maps, 1 any does not, 2 usage error.",
    )
    parse.add_argument("file", help="capture, archive day file, telegram or .hex frame; - = stdin")
    parse.add_argument("--timezone", default="Europe/Amsterdam", help="the meter's time zone")
    parse.add_argument("--gas-channel", type=int, choices=(1, 2, 3, 4), help="M-Bus gas channel")
    parse.add_argument("--jsonl", action="store_true", help="one JSON object per line")
    _key_options(parse)
    parse.set_defaults(handler=_parse)

    fill = _command(
        commands,
        "backfill",
        "send recorded telegrams to a DSMR-reader sink",
        "Send recorded telegrams (an archive directory or a capture) to a DSMR-reader sink, in\n"
        'time order. With an api = "v2" sink it first asks DSMR-reader which readings it\n'
        "already has and sends only the gaps.\n\n"
        "Resumable: progress is saved next to the spool, so after Ctrl-C or a failure the\n"
        "same command continues where it stopped.",
    )
    _with_config(fill)
    fill.add_argument(
        "--from", dest="source", type=Path, required=True, help="archive directory or capture file"
    )
    fill.add_argument("--sink", required=True, help="name of a dsmr-reader sink")
    fill.add_argument("--since", help="ISO date or time (meter's zone unless an offset is given)")
    fill.add_argument("--until", help="ISO date or time (meter's zone unless an offset is given)")
    fill.add_argument(
        "--restart", action="store_true", help="forget this request's saved progress; start afresh"
    )
    fill.set_defaults(handler=_backfill)

    imp = _command(
        commands,
        "import",
        "bring history from an energy cloud into DSMR-reader",
        "Bring a meter's history from an energy cloud (Climkit, Copper Labs, Neurio) into\n"
        "DSMR-reader over API v2 (only the readings it lacks, oldest first), or into archive\n"
        "day files. Resumable: the same command continues where it stopped.",
    )
    imp.add_argument("cloud", choices=("climkit", "copper", "neurio"))
    _with_config(imp)
    into = imp.add_mutually_exclusive_group(required=True)
    into.add_argument("--sink", help="name of a dsmr-reader sink (sent over API v2)")
    into.add_argument("--to-archive", type=Path, metavar="DIR", help="write archive day files")
    imp.add_argument("--since", help="ISO date or time (default: where the cloud's data starts)")
    imp.add_argument("--until", help="ISO date or time (default: now)")
    imp.set_defaults(handler=_import)

    status = _command(
        commands,
        "status",
        "is it reading and delivering? (exit 0 = healthy)",
        "Is it reading and delivering? Asks the running daemon ([http] listen), else reads the\n"
        "spool file (backlog and dead letters; health then unknown).\n\n"
        "Exit status: 0 healthy, 1 unhealthy, 3 unknown (daemon not reachable, or the\n"
        "configuration or spool cannot be read: the reason is printed).",
    )
    _with_config(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)

    spool = _command(
        commands,
        "spool",
        "look into and repair the spool (safe while running)",
        "Look into and repair the spool: backlog per sink, dead letters with the server's\n"
        "answer, requeue, export, purge. Safe while the daemon runs, except purge.\n\n"
        "Exit status: 0 done, 1 the spool cannot be used (or a purge not confirmed: nothing\n"
        "deleted), 2 usage error (an unknown id or sink, a folder that does not exist).",
    )
    _with_config(spool)
    actions = spool.add_subparsers(dest="action", metavar="ACTION", required=True)
    _with_config(
        _command(
            actions,
            "list",
            "backlog per sink and dead letters with their reasons",
            "Backlog per sink and every dead letter with the server's answer.",
        )
    )
    show = _with_config(
        _command(
            actions,
            "show",
            "one dead letter in full",
            "One dead letter in full, telegram included.",
        )
    )
    show.add_argument("id", type=int)
    requeue = _with_config(
        _command(
            actions,
            "requeue",
            "send dead letters again",
            "Send dead letters again (after fixing what made the server refuse them). A running\n"
            "daemon picks them up within 2 x spool.flush_interval.",
        )
    )
    requeue.add_argument("ids", type=int, nargs="*", help="dead letter ids (default: all)")
    requeue.add_argument("--sink", help="only this sink's dead letters")
    purge = _with_config(
        _command(
            actions,
            "purge",
            "delete backlog and/or dead letters",
            "Delete backlog and/or dead letters for good. Needs the daemon stopped.",
        )
    )
    purge.add_argument("--sink", help="only this sink (default: every sink)")
    keep = purge.add_mutually_exclusive_group()  # both would delete nothing, saying "done"
    keep.add_argument("--backlog-only", action="store_true", help="keep the dead letters")
    keep.add_argument("--dead-letters-only", action="store_true", help="keep the backlog")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    export = _with_config(
        _command(
            actions,
            "export",
            "write backlog and dead letters as raw telegrams",
            "Write the backlog and dead letters as raw telegrams (the archive format, readable\n"
            "by parse, simulate and backfill) to FILE, in an existing folder.",
        )
    )
    export.add_argument("file", type=Path)
    export.add_argument("--sink", help="only this sink")
    spool.set_defaults(handler=_spool)

    demo = _command(
        commands,
        "demo",
        "simulated meter → daemon → archive, live in the terminal",
        "A simulated meter, the real daemon reading it and an archive (and DSMR-reader when\n"
        "given), with a live line of what flows. Ctrl-C stops it.",
    )
    demo.add_argument("--dir", type=Path, default=Path("dsmr-logger-demo"), help="working folder")
    demo.add_argument("--interval", type=_positive, default=1.0, help="seconds between telegrams")
    demo.add_argument("--dsmr-reader", metavar="URL", help="also deliver to this DSMR-reader")
    demo.add_argument("--api-key", help="DSMR-reader API key (with --dsmr-reader)")
    demo.add_argument("--duration", type=_positive, help="stop after this many seconds")
    demo.add_argument("--neurio", action="store_true", help="a simulated Neurio sensor instead")
    demo.set_defaults(handler=_demo)

    pair = _command(
        commands,
        "pair",
        "get a token from a Wi-Fi P1 dongle (HomeWizard)",
        "Get an API token from a Wi-Fi P1 dongle, and write it into a configuration's [meter].",
    )
    devices = pair.add_subparsers(dest="device", metavar="DEVICE", required=True)
    homewizard = _command(
        devices,
        "homewizard",
        "HomeWizard P1 Meter (API v2): press its button when asked",
        "Ask a HomeWizard P1 Meter (API v2) for a token: press the button on the meter when\n"
        "asked. With --config, the token is written into that file's [meter].",
    )
    homewizard.add_argument(
        "--host", required=True, help="its IP address or name (:port may follow)"
    )
    homewizard.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="write the token into this file's [meter]",
    )
    homewizard.add_argument(
        "--ca-file", type=Path, help="CA to check it against (default: shipped)"
    )
    homewizard.add_argument(
        "--wait", type=_positive, default=120.0, help="seconds to wait for the press"
    )
    homewizard.set_defaults(handler=_pair)
    return parser


def _key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--decryption-key",
        metavar="HEX",
        help="32 hex digits: decrypt an encrypted meter's frames (never printed)",
    )
    parser.add_argument(
        "--authentication-key",
        metavar="HEX",
        help='the GCM additional-data key; "" for none (default: the Smarty specification\'s)',
    )


# --- configuration ------------------------------------------------------------------------------


def _resolve_config(path: Path | None) -> tuple[Config, str | None]:
    """The configuration and, when not given by --config, where it came from.

    Without --config: the remote datalogger's variables (environment and ``.env``) when any is
    set, else ``$DSMR_LOGGER_CONFIG`` or ``/etc/dsmr-logger/config.toml``.
    """
    if path is not None:
        return load(path), None
    from dsmr_logger import config_env

    dotenv, unreadable = _dotenv()
    spool = os.environ.get("DSMR_LOGGER_SPOOL")  # where the old script's users keep state
    migrated = config_env.from_environment(
        os.environ, dotenv=dotenv, spool_path=Path(spool) if spool else None
    )
    if migrated is not None:
        config, notes = migrated
        if unreadable:
            notes.append(unreadable)
        structlog.get_logger("dsmr_logger").info(
            "configured from the remote datalogger's environment variables", notes=notes
        )
        return config, "the DSMRREADER_REMOTE_DATALOGGER_* variables"
    named = os.environ.get(CONFIG_VARIABLE)
    default = Path(named) if named else DEFAULT_CONFIG
    if _exists(default):
        return load(default), str(default)
    where = f"{default} (${CONFIG_VARIABLE})" if named else str(default)
    problem = (
        f"no --config FILE given, no {where}, and no DSMRREADER_REMOTE_DATALOGGER_* "
        "variables set (see deploy/config.example.toml)"
    )
    raise ConfigError([f"{problem}; {unreadable}" if unreadable else problem])


def _dotenv() -> tuple[Path | None, str | None]:
    """``./.env`` if there is one, and why it could not be looked for (an unreadable folder)."""
    dotenv = Path(".env")
    try:
        return (dotenv if dotenv.is_file() else None), None
    except OSError as exc:
        try:
            where = os.getcwd()
        except OSError:
            where = "the working folder"
        return None, f"could not look for .env in {where}: {exc.strerror or exc}"


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return True  # there, but not ours to see: load() says so with the path


def _config_or_exit(args: argparse.Namespace) -> tuple[Config, str | None] | None:
    try:
        return _resolve_config(getattr(args, "config", None))
    except ConfigError as exc:
        for problem in exc.problems:
            _error(f"config error: {problem}")
        return None


def _check_config(args: argparse.Namespace) -> int:
    from dsmr_logger import preflight

    resolved = _config_or_exit(args)
    if resolved is None:
        return EXIT_CONFIG
    config, source = resolved
    findings = preflight.check(config)
    for finding in findings:
        if not finding.fatal:
            _error(f"warning: {finding}")
    fatal = [finding for finding in findings if finding.fatal]
    for finding in fatal:
        _error(f"config error: {finding} (as user {preflight.current_user()})")
    if fatal:
        return EXIT_CONFIG
    if source is not None:
        print(f"# from {source}")
    print(effective_toml(config), end="")
    if not config.sinks:  # the one default a table cannot show: a sink that is not written
        from dsmr_logger.config import ArchiveSinkConfig
        from dsmr_logger.daemon import default_sinks

        (archive,) = default_sinks(config)
        assert isinstance(archive, ArchiveSinkConfig)
        print(
            f"\n# No [[sink]]: every telegram is archived in {archive.directory}/YYYY-MM-DD.log"
            "\n# (one file a day), beside the spool; add a [[sink]] to deliver it elsewhere."
        )
    return EXIT_OK


# --- run ------------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    from dsmr_logger import preflight

    resolved = _config_or_exit(args)
    if resolved is None:
        return EXIT_CONFIG
    config = resolved[0]
    findings = preflight.check(config)
    fatal = [finding for finding in findings if finding.fatal]
    for finding in fatal:
        _error(f"cannot start: {finding}")
    if fatal:
        return EXIT_FAILURE
    configure(config.log)
    log = structlog.get_logger("dsmr_logger")
    for finding in findings:
        log.warning(finding.message, key=finding.key)
    from dsmr_logger.daemon import Daemon, StartupError
    from dsmr_logger.runtime.notify import Notifier

    try:
        return asyncio.run(_run_until_signalled(Daemon(config, notifier=Notifier())))
    except (SpoolError, StartupError) as exc:
        _error(f"cannot start: {exc}")
        return EXIT_FAILURE


async def _run_until_signalled(daemon: Daemon) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP too: an SSH session closing on a foreground run must stop it cleanly (spool closed).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    return await daemon.run(stop)


# --- offline tools ----------------------------------------------------------------------------


def _keys(args: argparse.Namespace) -> tuple[bytes | None, bytes | None] | None:
    """(decryption key, authentication key) from the options; None after saying what is wrong."""
    from dsmr_logger.sources.p1.decrypt import DEFAULT_AUTH_KEY, parse_key

    try:
        key = parse_key(args.decryption_key, "--decryption-key") if args.decryption_key else None
        auth = args.authentication_key
        auth_key = (
            DEFAULT_AUTH_KEY
            if auth is None
            else None
            if auth == ""
            else parse_key(auth, "--authentication-key")
        )
    except ValueError as exc:
        _error(str(exc))
        return None
    if key is None and args.authentication_key is not None:
        _error("--authentication-key: only used with --decryption-key")
        return None
    return key, auth_key


def _zone(name: str) -> Any:
    import zoneinfo

    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        _error(f"--timezone: unknown time zone {name!r}; use a name like 'Europe/Amsterdam'")
        return None


def _read_input(name: str | Path | None) -> bytes | None:
    import zlib

    from dsmr_logger.telegram.capture import read_capture

    try:
        if name == "-":
            return sys.stdin.buffer.read()
        return read_capture(None if name is None else Path(name))
    except OSError as exc:
        _error(f"cannot read {name}: {exc.strerror or exc}")
    except ValueError as exc:  # gzip and hex files that are not what their name says
        _error(f"cannot read {name}: {exc}")
    except (EOFError, zlib.error):
        _error(f"cannot read {name}: the compressed file is damaged or cut short")
    return None


def _parse(args: argparse.Namespace) -> int:
    import time

    from dsmr_logger.tools.parse import parse_command

    zone = _zone(args.timezone)
    keys = _keys(args)
    if zone is None or keys is None:
        return EXIT_CONFIG
    data = _read_input(args.file)
    if data is None:
        return EXIT_CONFIG
    return parse_command(
        data,
        sys.stdout,
        zone=zone,
        gas_channel=args.gas_channel,
        now=time.time(),
        jsonl=args.jsonl,
        decryption_key=keys[0],
        authentication_key=keys[1],
    )


def _backfill(args: argparse.Namespace) -> int:
    import zoneinfo

    from dsmr_logger.tools.alone import alone
    from dsmr_logger.tools.backfill import BackfillError, backfill, parse_range

    resolved = _config_or_exit(args)
    if resolved is None:
        return EXIT_CONFIG
    config = resolved[0]
    zone = zoneinfo.ZoneInfo(config.meter.timezone)
    try:
        since, until = parse_range(args.since, args.until, zone)
    except ValueError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    try:
        with alone(config.spool.path.with_name("backfill.lock"), "backfill"):
            return asyncio.run(
                backfill(
                    config,
                    args.sink,
                    args.source,
                    since=since,
                    until=until,
                    restart=args.restart,
                    out=sys.stdout,
                )
            )
    except BackfillError as exc:
        _error(f"backfill: {exc}")
        return EXIT_CONFIG
    except BrokenPipeError:  # `backfill ... | head`: not a failure (main() says nothing)
        raise
    except (OSError, SpoolError) as exc:
        _error(f"backfill: {exc}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


def _import(args: argparse.Namespace) -> int:
    from dsmr_logger.imports.command import main as import_main

    resolved = _config_or_exit(args)
    if resolved is None:
        return EXIT_CONFIG
    config = resolved[0]
    configure(config.log)
    return import_main(
        args.cloud,
        config,
        sink=args.sink,
        archive=args.to_archive,
        since=args.since,
        until=args.until,
    )


def _status(args: argparse.Namespace) -> int:
    import sqlite3

    from dsmr_logger.tools.status import SpoolUnreadable, status

    resolved = _config_or_exit(args)
    if resolved is None:
        _error("state unknown: no usable configuration (exit status 3)")
        return _unknown(args, "no usable configuration")
    config = resolved[0]
    out = io.StringIO()
    try:
        code = status(config, as_json=args.json, out=out)
    except SpoolUnreadable as exc:
        why = f"{exc.daemon}; {_spool_trouble(config.spool.path, exc.cause, write=False)}"
        _error(f"state unknown: {why}")
        return _unknown(args, why)
    except (SpoolError, OSError, sqlite3.Error) as exc:
        why = _spool_trouble(config.spool.path, exc, write=False)
        _error(f"state unknown: {why}")
        return _unknown(args, why)
    _write(out.getvalue())
    return code


def _unknown(args: argparse.Namespace, why: str) -> int:
    if args.json:
        _write(json.dumps({"healthy": None, "error": why}, indent=2) + "\n")
    return EXIT_UNKNOWN


def _write(text: str) -> None:
    """Output that a closed pipe may cut short without changing the exit status."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()


def _spool_trouble(path: Path, exc: BaseException, *, write: bool) -> str:
    """What is wrong with the spool at ``path``, by path, rather than SQLite's words for it."""
    from dsmr_logger.preflight import path_problem

    problem = path_problem(path, "file", write=write)
    if problem is not None:
        return f"cannot use the spool (spool.path): {problem}"
    detail = str(exc) if isinstance(exc, SpoolError) else f"{path}: {exc}"
    return f"cannot use the spool (spool.path): {detail}"


def _spool(args: argparse.Namespace) -> int:
    import sqlite3

    from dsmr_logger.delivery.spool import Spool
    from dsmr_logger.tools import spool as spool_tool

    resolved = _config_or_exit(args)
    if resolved is None:
        return EXIT_CONFIG
    config = resolved[0]
    if args.action == "export":
        problem = spool_tool.export_problem(args.file)
        if problem is not None:
            _error(f"export: {problem}")
            return EXIT_CONFIG
    path = config.spool.path
    writes = args.action in ("requeue", "purge")
    try:
        missing = not path.exists()
    except OSError:
        missing = False
    if missing:
        _error(f"no spool at {path} (spool.path): the daemon has not run with this configuration")
        return EXIT_FAILURE
    spool = Spool(path, max_bytes=config.spool.max_bytes)
    try:
        # Only a purge changes the telegrams, which needs the daemon stopped (it owns them).
        spool.open(shared=args.action != "purge")
    except (SpoolError, OSError, sqlite3.Error) as exc:
        _error(_spool_trouble(path, exc, write=writes))
        return EXIT_FAILURE
    try:
        if (problem := _unknown_sink(getattr(args, "sink", None), spool, config)) is not None:
            _error(problem)
            return EXIT_CONFIG
        return _spool_action(args, spool, config, sys.stdout)
    except BrokenPipeError:
        raise
    except (SpoolError, OSError, sqlite3.Error) as exc:
        _error(_spool_trouble(path, exc, write=writes))
        return EXIT_FAILURE
    finally:
        spool.close()


def _unknown_sink(sink: str | None, spool: Any, config: Config) -> str | None:
    """Why ``--sink`` names no sink, or None. A sink is known when configured, or when the spool
    holds anything of it (a sink removed from the configuration keeps its backlog there)."""
    from dsmr_logger.daemon import default_sinks

    if sink is None:
        return None
    configured = {s.name for s in default_sinks(config)}
    held = set(spool.backlogs()) | {d.sink for d in spool.dead_letters()} | set(spool.counters())
    if sink in configured | held:
        return None
    listed = ", ".join(sorted(configured | held))
    return f"--sink {sink!r}: no such sink in the configuration or the spool (there: {listed})"


def _spool_action(args: argparse.Namespace, spool: Any, config: Config, out: Any) -> int:
    from dsmr_logger.tools import spool as spool_tool

    if args.action == "list":
        return spool_tool.list_spool(spool, out)
    if args.action == "show":
        return spool_tool.show(spool, args.id, out)
    if args.action == "requeue":
        return spool_tool.requeue(
            spool, args.ids, args.sink, out, flush_interval=config.spool.flush_interval
        )
    if args.action == "export":
        return spool_tool.export(spool, args.file, args.sink, out)
    return spool_tool.purge(
        spool,
        args.sink,
        backlog=not args.dead_letters_only,
        dead_letters=not args.backlog_only,
        confirmed=args.yes,
        ask=_ask,
        out=out,
    )


def _ask(question: str) -> str:
    """A yes/no question on the terminal; no terminal (or Ctrl-D) answers no."""
    try:
        return input(question)
    except EOFError:
        return ""


def _simulate(args: argparse.Namespace) -> int:
    from dsmr_logger.tools.simulate import NoTelegrams, link_problem, prepare, simulate

    zone = _zone(args.timezone)
    keys = _keys(args)
    if zone is None or keys is None:
        return EXIT_CONFIG
    capture = _read_input(args.capture)
    if capture is None:
        return EXIT_CONFIG
    try:
        playlist = prepare(capture, decryption_key=keys[0], authentication_key=keys[1])
    except NoTelegrams as exc:
        _error(f"{args.capture or 'the bundled capture'}: {exc}")
        return EXIT_CONFIG
    if args.link is not None and (problem := link_problem(args.link)) is not None:
        _error(f"--link: {problem}")
        return EXIT_CONFIG

    def announce(path: str) -> None:
        _write(path + "\n")  # `| head -0`: nobody reads the path; the port is still served
        where = f" (link {args.link})" if args.link else ""
        print(f"simulated meter on {path}{where}; Ctrl-C stops", file=sys.stderr, flush=True)
        if playlist.note:
            print(f"simulate: {playlist.note}", file=sys.stderr, flush=True)

    async def play() -> None:
        task = asyncio.ensure_future(
            simulate(
                playlist,
                interval=args.interval,
                link=args.link,
                count=args.count,
                as_recorded=args.as_recorded,
                zone=zone,
                announce=announce,
            )
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(play())
    except OSError as exc:
        _error(f"simulate: {exc.filename or args.link}: {exc.strerror or exc}")
        return EXIT_FAILURE
    return EXIT_OK


def _simulate_neurio(args: argparse.Namespace) -> int:
    from dsmr_logger.tools.simulate_neurio import simulate_command

    if (args.username is None) != (args.password is None):
        _error("--username and --password go together")
        return EXIT_CONFIG
    options = ("shape", "port", "username", "password", "unsynchronized", "tick", "control")
    return simulate_command(**{name: getattr(args, name) for name in options})


def _demo(args: argparse.Namespace) -> int:
    from dsmr_logger.tools.demo import run_demo

    if bool(args.dsmr_reader) != bool(args.api_key):
        _error("--dsmr-reader and --api-key go together")
        return EXIT_CONFIG
    return run_demo(
        args.dir,
        interval=args.interval,
        dsmr_reader=args.dsmr_reader,
        api_key=args.api_key,
        duration=args.duration,
        neurio=args.neurio,
    )


def _pair(args: argparse.Namespace) -> int:
    from dsmr_logger.tools.pair import pair_command, paired_ca_file

    config = getattr(args, "config", None)
    try:
        ca_file = paired_ca_file(config, args.host, args.ca_file)
    except ConfigError as exc:
        for problem in exc.problems:
            _error(f"config error: {problem}")
        return EXIT_CONFIG
    return pair_command(args.host, config, ca_file, wait=args.wait)
