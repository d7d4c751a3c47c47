"""Errors a user can cause: one line that names the input and the fix."""


class XlsubError(Exception):
    """Bad user input. Entry points print the message and exit non-zero, without a traceback."""
