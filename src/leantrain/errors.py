"""Errors a user can cause. Each message names the problem and the fix, in one line.

The CLI prints `LeantrainError` messages without a traceback and exits non-zero; anything
else is a bug in leantrain and keeps its traceback.
"""


class LeantrainError(Exception):
    """An error the user can fix: bad config, bad data, missing files, damaged checkpoints."""


class ConfigError(LeantrainError):
    """A config key, type or value that is not allowed."""


class DataError(LeantrainError):
    """Input documents or a token dataset that cannot be used."""


class CheckpointError(LeantrainError):
    """A checkpoint or run directory that cannot be read or written."""
