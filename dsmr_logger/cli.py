"""Command line: ``dsmr-logger run | check-config | simulate | simulate-neurio | demo | pair``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from dsmr_logger import __version__
from dsmr_logger.config import Config, ConfigError, LogConfig, effective_toml, load
from dsmr_logger.delivery.spool import SpoolError
from dsmr_logger.logsetup import configure

if TYPE_CHECKING:
    from dsmr_logger.daemon import Daemon

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    configure(LogConfig())  # stderr until the configuration says otherwise; stdout is for output
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_CONFIG
    status: int = args.handler(args)
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsmr-logger",
        description="Read a smart meter's P1 port and deliver every telegram to DSMR-reader.",
    )
    parser.add_argument("--version", action="version", version=f"dsmr-logger {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the datalogger")
    run.add_argument("--config", type=Path, help="TOML configuration file")
    run.set_defaults(handler=_run)

    check = commands.add_parser(
        "check-config", help="validate a configuration and print it, secrets masked"
    )
    check.add_argument("--config", type=Path, help="TOML configuration file")
    check.set_defaults(handler=_check_config)

    sim = commands.add_parser("simulate", help="play recorded telegrams on a virtual serial port")
    sim.add_argument("--capture", type=Path, help="capture, archive (.log/.log.gz) or telegram")
    sim.add_argument("--interval", type=float, default=1.0, help="seconds between telegrams")
    sim.add_argument("--link", type=Path, help="keep a symlink to the port at this path")
    sim.add_argument("--count", type=int, help="stop after this many telegrams")
    sim.add_argument(
        "--as-recorded", action="store_true", help="send the telegrams unchanged (no restamping)"
    )
    sim.set_defaults(handler=_simulate)

    neurio = commands.add_parser(
        "simulate-neurio", help="serve a fake Neurio sensor's /current-sample on 127.0.0.1"
    )
    neurio.add_argument("--shape", choices=("eu3", "split", "solar"), default="solar")
    neurio.add_argument("--port", type=int, default=0, help="TCP port (default: any free one)")
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

    parse = commands.add_parser("parse", help="show what telegrams say and their API v2 fields")
    parse.add_argument("file", help="capture, archive day file or telegram; - for stdin")
    parse.add_argument("--timezone", default="Europe/Amsterdam", help="the meter's time zone")
    parse.add_argument("--gas-channel", type=int, choices=(1, 2, 3, 4), help="M-Bus gas channel")
    parse.set_defaults(handler=_parse)

    fill = commands.add_parser("backfill", help="send recorded telegrams to a DSMR-reader sink")
    fill.add_argument("--config", type=Path, help="TOML configuration file")
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

    imp = commands.add_parser("import", help="bring history from an energy cloud into DSMR-reader")
    imp.add_argument("cloud", choices=("climkit", "copper", "neurio"))
    imp.add_argument("--config", type=Path, help="TOML configuration file")
    into = imp.add_mutually_exclusive_group(required=True)
    into.add_argument("--sink", help="name of a dsmr-reader sink (sent over API v2)")
    into.add_argument("--to-archive", type=Path, metavar="DIR", help="write archive day files")
    imp.add_argument("--since", help="ISO date or time (default: where the cloud's data starts)")
    imp.add_argument("--until", help="ISO date or time (default: now)")
    imp.set_defaults(handler=_import)

    status = commands.add_parser("status", help="is it reading and delivering? (exit 0 = healthy)")
    status.add_argument("--config", type=Path, help="TOML configuration file")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)

    spool = commands.add_parser("spool", help="look into and repair the spool (safe while running)")
    spool.add_argument("--config", type=Path, help="TOML configuration file (finds the spool)")
    actions = spool.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="backlog per sink and dead letters with their reasons")
    show = actions.add_parser("show", help="one dead letter in full")
    show.add_argument("id", type=int)
    requeue = actions.add_parser("requeue", help="send dead letters again")
    requeue.add_argument("ids", type=int, nargs="*", help="dead letter ids (default: all)")
    requeue.add_argument("--sink", help="only this sink's dead letters")
    purge = actions.add_parser("purge", help="delete backlog and/or dead letters")
    purge.add_argument("--sink", help="only this sink (default: every sink)")
    purge.add_argument("--backlog-only", action="store_true", help="keep the dead letters")
    purge.add_argument("--dead-letters-only", action="store_true", help="keep the backlog")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    export = actions.add_parser("export", help="write backlog and dead letters as raw telegrams")
    export.add_argument("file", type=Path)
    export.add_argument("--sink", help="only this sink")
    spool.set_defaults(handler=_spool)

    demo = commands.add_parser(
        "demo", help="simulated meter → daemon → archive, live in the terminal"
    )
    demo.add_argument("--dir", type=Path, default=Path("dsmr-logger-demo"), help="working folder")
    demo.add_argument("--interval", type=float, default=1.0, help="seconds between telegrams")
    demo.add_argument("--dsmr-reader", metavar="URL", help="also deliver to this DSMR-reader")
    demo.add_argument("--api-key", help="DSMR-reader API key (with --dsmr-reader)")
    demo.add_argument("--duration", type=float, help="stop after this many seconds")
    demo.add_argument("--neurio", action="store_true", help="a simulated Neurio sensor instead")
    demo.set_defaults(handler=_demo)

    pair = commands.add_parser("pair", help="get a token from a Wi-Fi P1 dongle (HomeWizard)")
    devices = pair.add_subparsers(dest="device", metavar="DEVICE", required=True)
    homewizard = devices.add_parser(
        "homewizard", help="HomeWizard P1 Meter (API v2): press its button when asked"
    )
    homewizard.add_argument(
        "--host", required=True, help="its IP address or name (:port may follow)"
    )
    homewizard.add_argument("--config", type=Path, help="write the token into this file's [meter]")
    homewizard.add_argument(
        "--ca-file", type=Path, help="CA to check it against (default: shipped)"
    )
    homewizard.add_argument(
        "--wait", type=float, default=120.0, help="seconds to wait for the press"
    )
    homewizard.set_defaults(handler=_pair)
    return parser


def _resolve_config(path: Path | None) -> Config:
    """The TOML file, or else the remote datalogger's environment variables (and ``.env``)."""
    if path is not None:
        return load(path)
    from dsmr_logger import config_env

    dotenv = Path(".env")
    spool = os.environ.get("DSMR_LOGGER_SPOOL")  # where the old script's users keep state
    migrated = config_env.from_environment(
        os.environ,
        dotenv=dotenv if dotenv.is_file() else None,
        spool_path=Path(spool) if spool else None,
    )
    if migrated is None:
        raise ConfigError(
            [
                "no --config given and no DSMRREADER_REMOTE_DATALOGGER_* variables set; "
                "see deploy/config.example.toml"
            ]
        )
    config, notes = migrated
    structlog.get_logger("dsmr_logger").info(
        "configured from the remote datalogger's environment variables", notes=notes
    )
    return config


def _config_or_exit(path: Path | None) -> Config | None:
    try:
        return _resolve_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"dsmr-logger: config error: {problem}", file=sys.stderr)
        return None


def _check_config(args: argparse.Namespace) -> int:
    config = _config_or_exit(args.config)
    if config is None:
        return EXIT_CONFIG
    print(effective_toml(config), end="")
    return 0


def _run(args: argparse.Namespace) -> int:
    config = _config_or_exit(args.config)
    if config is None:
        return EXIT_CONFIG
    configure(config.log)
    from dsmr_logger.daemon import Daemon, StartupError
    from dsmr_logger.runtime.notify import Notifier

    try:
        return asyncio.run(_run_until_signalled(Daemon(config, notifier=Notifier())))
    except (SpoolError, StartupError) as exc:
        print(f"dsmr-logger: cannot start: {exc}", file=sys.stderr)
        return 1


async def _run_until_signalled(daemon: Daemon) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP too: an SSH session closing on a foreground run must stop it cleanly (spool closed).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    return await daemon.run(stop)


def _parse(args: argparse.Namespace) -> int:
    import time
    import zoneinfo

    from dsmr_logger.telegram.capture import read_capture
    from dsmr_logger.tools.parse import parse_command

    try:
        zone = zoneinfo.ZoneInfo(args.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        print(f"dsmr-logger: --timezone: unknown time zone {args.timezone!r}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        data = sys.stdin.buffer.read() if args.file == "-" else read_capture(Path(args.file))
    except OSError as exc:
        print(f"dsmr-logger: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    return parse_command(data, sys.stdout, zone=zone, gas_channel=args.gas_channel, now=time.time())


def _backfill(args: argparse.Namespace) -> int:
    import zoneinfo

    from dsmr_logger.tools.backfill import BackfillError, backfill, parse_moment

    config = _config_or_exit(args.config)
    if config is None:
        return EXIT_CONFIG
    zone = zoneinfo.ZoneInfo(config.meter.timezone)
    try:
        since = parse_moment(args.since, zone) if args.since else None
        until = parse_moment(args.until, zone) if args.until else None
    except ValueError as exc:
        print(f"dsmr-logger: --since/--until: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
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
        print(f"dsmr-logger: backfill: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"dsmr-logger: backfill: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to continue", file=sys.stderr)
        return 130


def _import(args: argparse.Namespace) -> int:
    from dsmr_logger.imports.command import main as import_main

    config = _config_or_exit(args.config)
    if config is None:
        return EXIT_CONFIG
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
    from dsmr_logger.tools.status import status

    config = _config_or_exit(args.config)
    if config is None:
        return EXIT_CONFIG
    try:
        return status(config, as_json=args.json, out=sys.stdout)
    except SpoolError as exc:
        print(f"dsmr-logger: spool error: {exc}", file=sys.stderr)
        return 1


def _spool(args: argparse.Namespace) -> int:
    from dsmr_logger.delivery.spool import Spool
    from dsmr_logger.tools import spool as spool_tool

    config = _config_or_exit(args.config)
    if config is None:
        return EXIT_CONFIG
    path = config.spool.path
    if not path.is_file():
        print(f"dsmr-logger: no spool at {path} (spool.path)", file=sys.stderr)
        return 1
    spool = Spool(path, max_bytes=config.spool.max_bytes)
    try:
        # Only a purge changes the telegrams, which needs the daemon stopped (it owns them).
        spool.open(shared=args.action != "purge")
    except SpoolError as exc:
        print(f"dsmr-logger: spool error: {exc}", file=sys.stderr)
        return 1
    out = sys.stdout
    try:
        if args.action == "list":
            return spool_tool.list_spool(spool, out)
        if args.action == "show":
            return spool_tool.show(spool, args.id, out)
        if args.action == "requeue":
            return spool_tool.requeue(spool, args.ids, args.sink, out)
        if args.action == "export":
            return spool_tool.export(spool, args.file, args.sink, out)
        return spool_tool.purge(
            spool,
            args.sink,
            backlog=not args.dead_letters_only,
            dead_letters=not args.backlog_only,
            confirmed=args.yes,
            ask=input,
            out=out,
        )
    finally:
        spool.close()


def _simulate(args: argparse.Namespace) -> int:
    from dsmr_logger.telegram.capture import frames_in, read_capture
    from dsmr_logger.tools.simulate import simulate

    try:
        capture = read_capture(args.capture)
    except OSError as exc:
        print(f"dsmr-logger: cannot read {args.capture}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    if not frames_in(capture):
        print(f"dsmr-logger: {args.capture}: no valid telegram in it", file=sys.stderr)
        return EXIT_CONFIG

    def announce(path: str) -> None:
        print(path, flush=True)
        where = f" (link {args.link})" if args.link else ""
        print(f"simulated meter on {path}{where}; Ctrl-C stops", file=sys.stderr, flush=True)

    async def play() -> None:
        task = asyncio.ensure_future(
            simulate(
                capture,
                interval=args.interval,
                link=args.link,
                count=args.count,
                as_recorded=args.as_recorded,
                announce=announce,
            )
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(play())
    return 0


def _simulate_neurio(args: argparse.Namespace) -> int:
    from dsmr_logger.tools.simulate_neurio import simulate_command

    if (args.username is None) != (args.password is None):
        print("dsmr-logger: --username and --password go together", file=sys.stderr)
        return EXIT_CONFIG
    options = ("shape", "port", "username", "password", "unsynchronized", "tick", "control")
    return simulate_command(**{name: getattr(args, name) for name in options})


def _demo(args: argparse.Namespace) -> int:
    from dsmr_logger.tools.demo import run_demo

    if bool(args.dsmr_reader) != bool(args.api_key):
        print("dsmr-logger: --dsmr-reader and --api-key go together", file=sys.stderr)
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

    try:
        ca_file = paired_ca_file(args.config, args.host, args.ca_file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"dsmr-logger: config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    return pair_command(args.host, args.config, ca_file, wait=args.wait)
