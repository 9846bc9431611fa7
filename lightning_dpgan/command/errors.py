"""The one error the command line reports as one line and exit status 2."""


class UsageError(Exception):
    """Bad input, reported as one ``error:`` line and exit status 2, before any worker starts."""
