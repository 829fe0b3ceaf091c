"""Exceptions that the CLI reports as one clear line (exit code 2) instead of a traceback."""


class AttnflowError(Exception):
    """Base of every user-facing error: bad data, unknown model, unusable checkpoint, unsupported model."""
