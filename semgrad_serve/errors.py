"""Errors that are the user's to fix: the CLI and the server print their message, never a traceback."""


class SemgradError(Exception):
    """A problem with the user's input, model or environment, with a message that says what to do."""


class ItemError(SemgradError):
    """One item of a batch cannot be scored; the other items are unaffected."""
