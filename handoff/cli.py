"""The ``handoff`` command line.

``handoff simulate`` runs a local cluster of real node processes through a release; see
:mod:`handoff.simulate`. ``main(argv)`` returns the exit code instead of exiting, so it can
be called from tests; the console script passes it to :func:`sys.exit`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

from handoff import __version__
from handoff.simulate import DEFAULT_ENTRIES, DEFAULT_SECONDS, run_simulation, summary

__all__ = ("build_parser", "main")

# Exit codes: 0 success, 1 the command ran and failed, 2 usage error, 130 interrupted.
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

SIMULATE_DESCRIPTION = """\
Run a local cluster through a release, with real processes and real sockets.

Starts a DNS server on 127.0.0.1 and three node processes that discover each other
through it: node-a of the old release v1, holding a warm TTLCache, and node-b and node-c
of the new release v2 with empty ones, on 127.0.0.2, 127.0.0.3 and 127.0.0.4. Shows every
node-up as it happens, then stops node-a with SIGTERM as a deploy retires the old release:
node-a drains its cache to node-b and node-c (keys split between them), and the drain
report, the entries each new node now holds and the node-down the others see are shown.
Then it shuts everything down and prints a summary.

Exits 0 if every step happened within the time bound and no entry was lost, 1 (saying
what went wrong) otherwise. Needs the loopback addresses 127.0.0.2-4 (present on Linux).
"""


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``handoff`` command."""
    parser = argparse.ArgumentParser(
        prog="handoff",
        description="warm-handoff: keep in-memory state warm across rolling and blue-green "
        "deploys.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    simulate = commands.add_parser(
        "simulate",
        help="run a local cluster of node processes through a release",
        description=SIMULATE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    simulate.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (nodes, events with timings, seconds) instead of "
        "progress lines",
    )
    simulate.add_argument(
        "--seconds",
        type=_positive_seconds,
        default=DEFAULT_SECONDS,
        metavar="S",
        help=f"time bound for the whole run, shutdown excluded (default {DEFAULT_SECONDS:g})",
    )
    simulate.add_argument(
        "--entries",
        type=_entries,
        default=DEFAULT_ENTRIES,
        metavar="N",
        help=f"entries in the old node's cache (default {DEFAULT_ENTRIES})",
    )
    return parser


def _entries(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value <= 10_000_000:
        raise argparse.ArgumentTypeError(f"must be between 0 and 10000000, not {value}")
    return value


def _simulate(args: argparse.Namespace) -> int:
    def say(line: str) -> None:
        print(line, flush=True)

    result = run_simulation(
        seconds=args.seconds, entries=args.entries, say=None if args.json else say
    )
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        for line in summary(result):
            print(line)
    if not result.ok:
        print(f"handoff simulate: error: {result.error}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``handoff`` command with ``argv`` (default: ``sys.argv[1:]``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, --version and usage errors
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else EXIT_FAILED
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "simulate":
            return _simulate(args)
    except KeyboardInterrupt:
        print("handoff: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Output piped into a command that stopped reading (| head): not worth a traceback.
        # Python would report the failed flush of stdout at exit, so point it at devnull.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse checks


if __name__ == "__main__":
    sys.exit(main())
