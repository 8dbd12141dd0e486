"""Exceptions with messages that name the setting to change."""


class NexusConfigError(ValueError):
    """A bad setting, found before any compute is spent. The message names the setting and the fix."""


class NexusNonFiniteError(RuntimeError):
    """Too many consecutive outer steps had NaN/Inf gradients (nexus.max_consecutive_skips)."""


class DataError(ValueError):
    """Missing, empty or too-small data, found before training starts."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (truncated, corrupted, or a ``latest`` naming nothing)."""
