"""The command line every plugin built on :func:`plugvisor.run` shares with the Rust plugins:
``<program> [<plugin-name>] --connect <socket path> [tuning flags]``. Bad usage prints one clear
message and exits 64 (``EX_USAGE``); ``--help`` and ``--version`` print and exit 0."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, NoReturn, Optional

from .host import Exit, HostOptions
from .log import FORMATS

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def parse_duration(s: str) -> float:
    """Seconds from ``250ms``, ``30s``, ``5m``, ``1h`` or a bare number of seconds."""
    m = re.fullmatch(r"\s*(\d+)(ms|s|m|h)?\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"`{s.strip()}` is not a duration like 250ms, 30s, 5m")
    n, unit = int(m.group(1)), m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]


def _count(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{s}` is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"`{s}` must not be negative")
    return n


class UsageError(Exception):
    """Bad command line: the message says what to change (exit 64)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser (also what ``--help`` prints)."""
    p = _Parser(
        prog=prog,
        description="Runs one plugvisor plugin, fed by the front over a Unix socket.",
        epilog="Exit codes: 0 clean exit (Shutdown or the front closed the socket), "
               "78 refused by the front or invalid config, 64 bad usage, 1 other errors.",
    )
    p.add_argument("plugin", nargs="?", help="the plugin's name in the front's config "
                   "(default: the plugin's own name)")
    p.add_argument("--connect", metavar="PATH", default=os.environ.get("PLUGVISOR_CONNECT"),
                   help="the front's socket for this plugin (env PLUGVISOR_CONNECT)")
    p.add_argument("--log-format", choices=FORMATS,
                   default=os.environ.get("PLUGVISOR_LOG_FORMAT", "auto"),
                   help="journald when JOURNAL_STREAM is set (auto), else text or JSON on stderr "
                        "(env PLUGVISOR_LOG_FORMAT)")
    p.add_argument("--as", dest="as_name", metavar="NAME",
                   help="run under this configured name: Hello carries it and the plugin's "
                        "namespace plugvisor.<plugin> is reported as plugvisor.<NAME>")
    p.add_argument("--list", action="store_true", help="list this program's plugin and exit")
    p.add_argument("--workers", type=_count, metavar="N",
                   help="worker threads running hooks (default: number of CPUs)")
    p.add_argument("--idle-timeout", type=parse_duration, default=300.0, metavar="DURATION",
                   help="forget a stream that saw no event for this long and never ended (5m)")
    p.add_argument("--stuck-after", type=parse_duration, default=5.0, metavar="DURATION",
                   help="report a lane as stuck in Pong once one event has run this long (5s)")
    p.add_argument("--lane-queue-events", type=_count, default=4096, metavar="N",
                   help="most events queued per stream (4096)")
    p.add_argument("--lane-queue-bytes", type=_count, default=16 * 1024 * 1024, metavar="BYTES",
                   help="most body bytes queued per stream (16 MiB)")
    p.add_argument("--term-grace", type=parse_duration, default=5.0, metavar="DURATION",
                   help="on SIGTERM/SIGINT, let queued events finish for this long (5s)")
    p.add_argument("--connect-wait", type=parse_duration, default=0.0, metavar="DURATION",
                   help="keep retrying this long while the front's socket is missing (0s)")
    p.add_argument("--version", action="version", version=_version())
    return p


def _version() -> str:
    from . import __version__
    return f"plugvisor (Python SDK) {__version__}"


def host_options(args: argparse.Namespace, own_name: str) -> HostOptions:
    """The host options for a plugin whose own name is ``own_name``; raises
    :class:`UsageError` for a missing ``--connect`` or a bad name."""
    name = args.plugin or own_name
    configured = args.as_name or name
    for what, n in (("plugin name", name), ("--as", configured)):
        if not _NAME.match(n):
            raise UsageError(f"{what} `{n}`: a plugin name uses letters, digits, `-` and `_`")
    if not args.connect:
        raise UsageError(f"missing --connect <socket path> (the front's socket for plugin "
                         f"`{configured}`)")
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    if workers == 0:
        raise UsageError("--workers must be at least 1")
    return HostOptions(
        plugin=configured,
        runs=name if configured != name else None,
        connect=args.connect,
        workers=workers,
        idle_timeout=args.idle_timeout,
        stuck_after=args.stuck_after,
        lane_queue_events=max(args.lane_queue_events, 1),
        lane_queue_bytes=args.lane_queue_bytes,
        term_grace=args.term_grace,
        connect_wait=args.connect_wait,
        log_format=args.log_format,
    )


def parse(argv: List[str], own_name: str, prog: Optional[str] = None) -> HostOptions:
    """Parses ``argv`` (without the program name) for a plugin named ``own_name``. ``--list``
    prints and exits 0; bad usage prints one line and exits 64."""
    try:
        args = parser(prog).parse_args(argv)
        if args.list:
            print(f"{args.plugin or own_name}\tthis program's plugin")
            sys.exit(Exit.CLEAN)
        return host_options(args, own_name)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(Exit.USAGE)
