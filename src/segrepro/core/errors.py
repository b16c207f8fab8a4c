"""The one exception type the CLI turns into a single `error: ...` line and exit code 1."""


class SegreproError(Exception):
    """A user-facing error: bad input, unknown ID, wrong config key. The message names the culprit."""


def one_line(text) -> str:
    """`text` with its line breaks and runs of spaces folded, for an error message (a library's
    message may span lines)."""
    return " ".join(str(text).split())
