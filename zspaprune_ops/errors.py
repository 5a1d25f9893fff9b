"""The command line's error type and its one-line rendering of any error.

Its own module so that the subcommands (``cli.py``, ``demo/``, ``eval/``) raise and print
errors without importing one another.
"""


class UsageError(Exception):
    """A mistake in the command line's arguments, found after parsing (e.g. across options).

    ``zspaprune`` prints the subcommand's usage and ``error: <message>`` (exit status 2); the
    message names the option (``--model PATH: ...``)."""


def one_line_error(error: BaseException) -> str:
    """``Type: message's first paragraph on one line``, for quoting an error inside one line of
    text (libraries wrap long messages over several lines: keep the whole first sentence)."""
    paragraph = str(error).strip().split("\n\n", 1)[0]
    text = " ".join(paragraph.split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
