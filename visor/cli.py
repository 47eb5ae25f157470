"""The command line: argparse, one function per subcommand. Turns any VisorError, and any OSError about a file,
into one line on stderr."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path

from visor import __version__
from visor.check import runtime_problem
from visor.config import LOG_LEVELS
from visor.errors import HomeError, VisorError
from visor.home import Home


def home_of(path: str | Path, runtime: bool = True) -> Home:
    """The home --home names, once it is a folder this user can use: every command but init says the
    same one line about a bad one, before anything can fail on a path inside it. runtime: the command
    uses H/.visor (sockets, lock, state, history), which must then be a usable folder if it exists
    (`run` creates it)."""
    home = Home(Path(path).absolute())
    try:
        mode = os.stat(home.root).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise HomeError(f"{home.root}: home folder not found (create it with `visor-init --home {home.root}`)") \
            from None
    except PermissionError:
        raise HomeError(f"{home.root}: not accessible (permission denied)") from None
    if not stat.S_ISDIR(mode):
        raise HomeError(f"{home.root}: not a folder; --home names a Visor home folder")
    if not os.access(home.root, os.R_OK | os.X_OK):
        raise HomeError(f"{home.root}: not accessible (permission denied)")
    if runtime and (problem := runtime_problem(home)):
        raise HomeError(problem)
    return home


def cmd_init(opts) -> int:
    from visor.home import init_home
    try:
        home = init_home(Path(opts.home), opts.with_data_node)
    except OSError as err:                   # under a file, in /proc, a read-only or full disk
        raise HomeError(f"{Path(opts.home).absolute()}: cannot create the home ({err.strerror}: {err.filename})") \
            from None
    print(f"created {home.root}: edit genesis/run-config.toml, then `visor run --home {home.root}`")
    return 0


def cmd_run(opts) -> int:
    from visor.broker import Broker
    from visor.linux import require_kernel
    require_kernel()
    return Broker(home_of(opts.home), opts.log_level).run()


def cmd_status(opts) -> int:
    from visor.control import ask_status, render_status
    home = home_of(opts.home)
    try:
        status = ask_status(home)
    except VisorError:
        from visor.daemonctl import unsupervised
        if (line := unsupervised(home)) is None:
            raise
        raise VisorError(line) from None
    print(json.dumps(status, indent=2) if opts.json else render_status(status))
    return 0


CRASHED = ("exit-code", "signal", "core-dump", "watchdog")     # systemd's SERVICE_RESULT after a crash


def cmd_stop(opts) -> int:
    import os
    if opts.unless_crashed and os.environ.get("SERVICE_RESULT") in CRASHED:
        print(f"visor ended ({os.environ['SERVICE_RESULT']}): its binaries keep running for the restarted "
              "daemon to adopt")
        return 0
    from visor.daemonctl import stop
    return stop(home_of(opts.home))


def cmd_restart(opts) -> int:
    from visor.daemonctl import restart
    return restart(home_of(opts.home))


def cmd_events(opts) -> int:
    from visor.control import print_events
    from visor.history import parse_duration
    since_s = parse_duration(opts.since) if opts.since is not None else None
    return print_events(home_of(opts.home), opts.json, since_s, follow=not opts.no_follow)


def cmd_fetch(opts) -> int:
    from visor.releases import fetch_command
    return fetch_command(home_of(opts.home, runtime=False), opts.tag)


def cmd_check(opts) -> int:
    from visor.check import check_home_findings
    problems, warnings = check_home_findings(home_of(opts.home, runtime=False))
    for line in problems + warnings:         # warnings are printed too, but never change the exit code
        print(line)
    if not problems:
        print(f"{opts.home}: no problems found" + (f" ({len(warnings)} warnings)" if warnings else ""))
    return 1 if problems else 0


def cmd_version(opts) -> int:
    from visor.build_info import commit
    if opts.output == "json":
        print(json.dumps({"version": __version__, "hash": commit()}))
    else:
        print(f"visor {__version__} ({commit()})")
    return 0


def _home_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", required=True, help="the Visor home folder")


INIT_HELP = "create a new home folder"


def _init_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _home_arg(parser)
    parser.add_argument("--with-data-node", action="store_true", help="include a data node in the run-configs")
    parser.set_defaults(func=cmd_init)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visor", description="Runs a Vega node and carries it through upgrades.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _init_args(sub.add_parser("init", help=INIT_HELP))
    run = sub.add_parser("run", help="run the node binaries in the foreground")
    _home_arg(run)
    run.add_argument("--log-level", choices=LOG_LEVELS,
                     help="overrides logLevel of config.toml")
    run.set_defaults(func=cmd_run)
    status = sub.add_parser("status", help="show what the running daemon is doing")
    _home_arg(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=cmd_status)
    stop = sub.add_parser("stop", help="stop the node binaries and Visor (also what a dead daemon left)")
    _home_arg(stop)
    stop.add_argument("--unless-crashed", action="store_true",
                      help="do nothing when systemd's SERVICE_RESULT says the daemon crashed (ExecStopPost)")
    stop.set_defaults(func=cmd_stop)
    restart = sub.add_parser("restart", help="re-execute the daemon in place; the node binaries keep running")
    _home_arg(restart)
    restart.set_defaults(func=cmd_restart)
    events = sub.add_parser("events", help="print the recorded events, follow the event stream until interrupted")
    _home_arg(events)
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.add_argument("--since", metavar="DURATION",
                        help="first print the recorded events of the last DURATION (90s, 15m, 2h, 7d)")
    events.add_argument("--no-follow", action="store_true",
                        help="print the recorded events (all of them without --since) and exit")
    events.set_defaults(func=cmd_events)
    fetch = sub.add_parser("fetch", help="prepare the folder of a release ahead of its upgrade")
    _home_arg(fetch)
    fetch.add_argument("tag", help="release tag, e.g. v0.73.0")
    fetch.set_defaults(func=cmd_fetch)
    check = sub.add_parser("check", help="validate config.toml, every run-config and the binaries")
    _home_arg(check)
    check.set_defaults(func=cmd_check)
    version = sub.add_parser("version", help="print the version")
    version.add_argument("--output", choices=["human", "json"], default="human")
    version.set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    opts = (parser or build_parser()).parse_args(argv)
    try:
        code = opts.func(opts)
        sys.stdout.flush()                   # here, where a reader that left (`| head`) can be handled
        return code
    except BrokenPipeError:                  # the reader of our output has gone: nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # nor at exit's own flush
        return 0
    except VisorError as err:
        print(f"visor: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if not err.filename:
            raise                            # not about a file: a bug, with its traceback
        # a file of the home the commands' own checks do not name (H/.visor/lock a folder, ...)
        print(f"visor: {err.filename}: {err.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def init_main(argv: list[str] | None = None) -> int:
    """`visor-init`: the same as `visor init`, under its own name in its usage and errors."""
    return main(argv, _init_args(argparse.ArgumentParser(prog="visor-init", description=INIT_HELP)))
