"""Exception types raised by clagent; each message says what was wrong and what to do."""

from __future__ import annotations


class CLError(Exception):
    """Base class of clagent's user-facing errors (the CLI prints them without a traceback)."""


class ConfigError(CLError, ValueError):
    """A configuration value, key or name is invalid."""


class DataError(CLError, ValueError):
    """Input data is missing, malformed or inconsistent with the stream."""


class CheckpointError(CLError, RuntimeError):
    """A checkpoint is missing, truncated, or from an incompatible format."""


class TrainingError(CLError, RuntimeError):
    """Training diverged (NaN/inf loss) or otherwise cannot continue."""
