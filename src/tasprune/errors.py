"""Errors that end a command with one clear line (problem + fix), never a traceback."""

from __future__ import annotations


class TaspruneError(Exception):
    """Base class: a user-facing problem with its fix, as two fields.

    ``TaspruneError(problem, fix)``, or one message ``"problem. Fix: fix"`` (split into the
    two fields). ``str(err)`` is the one line the CLI prints after ``error:``; callers that
    render errors their own way (a notebook, a web UI) read ``err.problem`` and ``err.fix``.
    """

    def __init__(self, problem: str = "", fix: str | None = None) -> None:
        if fix is None and " Fix: " in problem:
            problem, fix = problem.split(" Fix: ", 1)
            problem = problem.rstrip()
        self.problem = problem.rstrip(".") if fix is not None else problem
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.fix is None:
            return self.problem
        return f"{self.problem}. Fix: {self.fix}"

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:
        return type(self), (self.problem, self.fix)


class ConfigError(TaspruneError):
    """A recipe or flag is malformed, mistyped or out of range."""


class ShapeError(TaspruneError):
    """A Shape does not fit the model it is used with."""


class DataError(TaspruneError):
    """A data folder or file is missing, unreadable, truncated or does not fit the model."""


class CheckpointError(TaspruneError):
    """A checkpoint is missing, corrupted, unsafe or belongs to another model."""


class BudgetError(TaspruneError):
    """A FLOPs/params budget cannot be met by the search space."""


class TrainingError(TaspruneError):
    """Training diverged (NaN/Inf loss) or cannot continue."""


class ExportError(TaspruneError):
    """An export failed, does not reproduce the PyTorch network, or (int8) predicts grossly
    unlike it."""


class RunInUseError(TaspruneError):
    """Another process is writing to the same run folder (its lock is held)."""
