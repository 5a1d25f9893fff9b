"""The command line's error type and its one-line rendering of any error.

Its own module so that the subcommands (``cli.py``, ``demo/``, ``eval/``) raise and print
errors without importing one another.
"""


class UsageError(Exception):
    """A mistake in the command line's arguments, found after parsing (e.g. across options).

    ``zspaprune`` prints the subcommand's usage and ``error: <message>`` (exit status 2); the
    message names the option (``--model PATH: ...``)."""


def one_line_error(error: BaseException) -> str:
    """``Type: first line of the message``, for quoting an error inside one line of text."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
