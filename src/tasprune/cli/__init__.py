"""``tasprune`` command line: thin sub-commands over the library's plain functions.

Every flag is generated from the one config field it sets (`tasprune.cli.flags`): a recipe
key such as ``teacher.train.epochs``, or a field of the command's own `Inputs`. Precedence of
settings: built-in defaults < ``--config`` recipe (a shipped recipe's name or a YAML file) <
``--set key=value`` < flags. The resolved recipe is written into the output folder. Every
failure ends the command with one ``error: ...`` line on stderr (a traceback only with
``--debug`` or ``TASPRUNE_DEBUG=1``): exit code 2 for a :class:`TaspruneError`, a bad flag or
an OS error (disk full, permissions), 1 for an unexpected exception (a bug: rerun with --debug
and report it); Ctrl-C exits 130 and the same command resumes. ``run``/``sweep``/``train``/
``search``/``distill``/``report`` hold their output folder's lock (:mod:`tasprune.lock`) for
their whole life.

- `flags`: the generator (a field -> a flag) and `Command`.
- `commands`: train, search, distill, run, sweep, report, export, bench.
- `measure`: flops, space, latency-table.
- `app`: the parser, `main` and the one-line errors.
"""

from tasprune.cli.app import COMMANDS, build_parser, main, version

__all__ = ["COMMANDS", "build_parser", "main", "version"]
