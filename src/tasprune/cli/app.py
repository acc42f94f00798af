"""The ``tasprune`` parser, generated from the commands' tables, and the entry point that turns
every failure into one ``error:`` line and an exit code."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

from tasprune.cli.commands import (
    BENCH,
    DISTILL,
    EXPORT,
    REPORT,
    RUN,
    SEARCH,
    SWEEP,
    TRAIN,
    bench,
)
from tasprune.cli.flags import INPUTS, Command, given
from tasprune.cli.measure import FLOPS, LATENCY_TABLE, SPACE
from tasprune.errors import TaspruneError

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        TRAIN,
        FLOPS,
        SPACE,
        SEARCH,
        LATENCY_TABLE,
        DISTILL,
        RUN,
        SWEEP,
        REPORT,
        EXPORT,
        BENCH,
    )
}


def version() -> str:
    """The installed tasprune's version (package metadata)."""
    try:
        return metadata.version("tasprune")
    except metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, never installed
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """argparse with the package's error style: one ``error:`` line, exit code 2."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}. Fix: see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each flag generated from the one field it sets."""
    parser = _Parser(
        prog="tasprune",
        description="Network pruning via Transformable Architecture Search (TAS).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS.values():
        command.add_to(commands, argparse.RawDescriptionHelpFormatter)
    return parser


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at emit time (it may be replaced, e.g. by tests)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging(quiet: bool) -> None:
    log = logging.getLogger("tasprune")
    for h in [h for h in log.handlers if getattr(h, "_tasprune_cli", False)]:
        log.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    handler._tasprune_cli = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tasprune`` console script; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("TASPRUNE_DEBUG", "") not in ("", "0")
    if args_list[:1] == [BENCH.name]:
        # The benchmark parses its own flags, so `tasprune bench -h` shows them.
        _setup_logging(quiet=False)
        return _guarded(lambda: bench(args_list[1:]), debug)
    namespace = build_parser().parse_args(args_list)
    own = given(namespace, INPUTS)
    _setup_logging(bool(own.get("quiet")))
    command = COMMANDS[namespace.command]
    return _guarded(lambda: command(namespace), debug or bool(own.get("debug")))


def _guarded(command: Callable[[], int], debug: bool) -> int:
    """Run ``command``; every failure becomes one ``error:`` line (a traceback with debug)."""
    try:
        return command()
    except TaspruneError as err:
        if debug:
            raise
        print(
            f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as err:  # a write outside the atomic helpers: disk full, permissions, ...
        if debug:
            raise
        print(f"error: {_os_error_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug: still one line, the traceback behind --debug
        if debug:
            raise
        first = str(err).splitlines()[0] if str(err) else ""
        print(
            f"error: unexpected {type(err).__name__}: {first[:300]}. "
            "Fix: rerun with --debug and report the traceback",
            file=sys.stderr,
        )
        return 1


def _os_error_line(err: OSError) -> str:
    """One line for an OSError that reached the top: what failed, where, and a fix."""
    where = f" ({err.filename})" if err.filename else ""
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space or use another --out, then rerun the same command to resume"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "check the permissions of that path or use another --out"
    else:
        fix = "check that path, then rerun the same command"
    return f"{reason}{where}. Fix: {fix}"
