"""Exceptions with messages a user can act on.

Every error names the thing that is wrong: the file, the value or the site.
The command line turns them into one-line messages without a traceback.
"""


class AMLPError(Exception):
    """Base class for every error the product raises on purpose."""


class ConfigError(AMLPError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class DataError(AMLPError, ValueError):
    """A dataset or one of its files cannot be used; the message names the file."""


class CheckpointError(AMLPError, RuntimeError):
    """A checkpoint is missing, corrupt or does not match the requested model."""


class TrainingError(AMLPError, FloatingPointError):
    """Training cannot go on (its loss is not finite): raised before the step that would spoil the weights."""
