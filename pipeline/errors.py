"""Errors a user can act on. The CLI prints their message alone, without a traceback."""


class StageError(RuntimeError):
    """A stage cannot proceed for a reason in its inputs (bad files, too many failures, ...)."""
