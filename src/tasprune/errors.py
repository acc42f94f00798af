"""Errors that end a command with one clear line (problem + fix), never a traceback."""

from __future__ import annotations


class TaspruneError(Exception):
    """Base class: a user-facing problem. ``str(err)`` is the one line the CLI prints."""


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


class RunInUseError(TaspruneError):
    """Another process is writing to the same run folder (its lock is held)."""
