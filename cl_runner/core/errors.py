"""Errors a user can fix: raised where the bad value is first seen, printed as one line by the CLI."""


class UserError(Exception):
    """Bad input (config, data, model, paths): the CLI prints the message on one line and exits 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config key has a value that is out of range, contradictory or of the wrong kind."""


class DataError(UserError):
    """A task's data is missing, malformed or does not match its config."""


class ModelError(UserError):
    """A model or tokenizer cannot be loaded as a causal LM."""


class DiskFullError(UserError):
    """No space left (ENOSPC) or quota exceeded (EDQUOT) while writing a checkpoint or a result file: the run
    stops with exit 5; once space is freed, ``cl-run resume=DIR`` continues from the newest checkpoint."""

    exit_code = 5


class CheckpointMismatch(UserError):
    """An intact checkpoint does not fit the run's config.yaml (edited since the checkpoint was written)."""
