"""Library exceptions. The CLI turns any of these into one line on stderr and exit status 2."""

from __future__ import annotations


class PPLClusterError(Exception):
    """Base class for every error caused by user input (not by a bug)."""


class ConfigError(PPLClusterError, ValueError):
    """An invalid setting (unknown model, K < 2, non-positive epochs, ...)."""


class DataError(PPLClusterError, ValueError):
    """Missing, malformed or out-of-range data."""


class RunDirError(PPLClusterError):
    """A run directory that cannot be used as asked (non-empty without --resume/--overwrite)."""


class CheckpointError(PPLClusterError):
    """A checkpoint that is corrupt, foreign or does not match the configuration."""
