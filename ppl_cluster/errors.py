"""Library exceptions. The CLI turns any of these into one line on stderr and exit status 2."""

from __future__ import annotations


class PPLClusterError(Exception):
    """Base class for every error caused by user input (not by a bug)."""


class ConfigError(PPLClusterError, ValueError):
    """An invalid setting (unknown model, K < 2, non-positive epochs, ...). ``setting`` names
    the setting at fault, when there is one, so that the CLI can name its flag instead."""

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class DataError(PPLClusterError, ValueError):
    """Missing, malformed or out-of-range data."""


class RunDirError(PPLClusterError):
    """A run directory that cannot be used as asked (non-empty without --resume/--overwrite)."""


class CheckpointError(PPLClusterError):
    """A checkpoint that is corrupt, foreign or does not match the configuration."""


class DivergedError(PPLClusterError):
    """Training turned to NaN or infinity; the last finite epoch stays in the checkpoint.
    The CLI exits with status 3 for it. ``setting`` names the learning rate in charge."""

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds exactly as Ctrl-C does."""
