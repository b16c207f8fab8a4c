"""The one exception type the CLI turns into a single `error: ...` line and exit code 1."""


class SegreproError(Exception):
    """A user-facing error: bad input, unknown ID, wrong config key. The message names the culprit."""
