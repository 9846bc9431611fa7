"""How the command line reports bad input and failed runs: one ``error:`` line and an exit status."""

import sys


class UsageError(Exception):
    """Bad input, reported as one ``error:`` line and exit status 2, before any worker starts."""


def fail(message: str, status: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)
