"""Errors shared by every stage."""


class UserFacingError(RuntimeError):
    """An operational failure whose message says what to do; the CLI prints it without a traceback."""
