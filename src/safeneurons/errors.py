"""The one exception type users see: the CLI prints its message on one line and exits 2."""


class SafeneuronsError(Exception):
    """Bad input or an unavailable resource, with a message that names the bad value and what was expected."""
