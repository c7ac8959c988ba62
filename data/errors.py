"""One error type for every expected failure, and the one way entry points report it.

Expected failures (bad input files, bad flag values, a missing data path, an
unwritable output directory) raise ``UserError`` with a one-line message that
names the offending file or value. Entry points wrap their ``main`` with
``run_cli`` so the user sees that line on stderr and a nonzero exit status,
never a traceback. Unexpected failures (bugs) still show their traceback.
"""
from __future__ import annotations

import sys
from typing import Callable

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """An expected failure caused by input, configuration or environment."""


class DataError(UserError):
    """A dataset source (archive, folder, image file, cache) is unusable."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None,
            prog: str = "") -> None:
    """Run ``main(argv)``; turn ``UserError`` into one stderr line and exit 2."""
    try:
        rc = main(argv)
    except UserError as e:
        msg = str(e).replace("\n", " ")
        print(f"error: {prog + ': ' if prog else ''}{msg}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(rc or 0)
