"""Exceptions with messages that name the setting to change."""


class NexusConfigError(ValueError):
    """A bad setting, found before any compute is spent. The message names the setting and the fix."""


class NexusNonFiniteError(RuntimeError):
    """Too many consecutive outer steps had NaN/Inf gradients (nexus.max_consecutive_skips)."""


class DataError(ValueError):
    """Missing, empty or too-small data, found before training starts."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (truncated, corrupted, or a ``latest`` naming nothing)."""


class RunLockError(RuntimeError):
    """Another live run holds ``train.run_dir`` (its lock file names the pid and host)."""


class ReportedError(RuntimeError):
    """An input error a worker process reported (one line); the launching command prints it once."""


USER_ERRORS = (NexusConfigError, DataError, NexusNonFiniteError, CheckpointError, RunLockError, ReportedError)
"""Errors the CLI prints as one line, ``nexus-megatron: error: ...``, with exit status 2 (no traceback)."""
