"""The one exception type for mistakes a user can make (bad flags, files, prompts, runs).

The CLI turns it into a single line on stderr and exit status 2.
"""


class PicoError(Exception):
    """A user-facing error: its message is printed as one line, exit status 2."""
