"""One error type for every expected failure, and the one way entry points report it.

Expected failures (bad input files, bad flag values, a missing data path, an
unwritable output directory) raise ``UserError`` with a one-line message that
names the offending file or value. Entry points wrap their ``main`` with
``run_cli`` so the user sees that line on stderr and a nonzero exit status,
never a traceback. Unexpected failures (bugs) still show their traceback.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """An expected failure caused by input, configuration or environment."""


class DataError(UserError):
    """A dataset source (archive, folder, image file, cache) is unusable."""


def project_version() -> str:
    """The installed distribution's version (pyproject's), for every command's --version."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("cifake-detector")
    except PackageNotFoundError:  # run from a checkout that was never pip-installed
        return "unknown (not installed with pip)"


def one_line(text: str) -> str:
    """``text`` with every non-printable character escaped as Python would (a newline
    becomes the two characters ``\\n``): a file name may contain a newline, and one
    message must stay one line (callers and scripts read the last line) while still
    naming the file recognisably."""
    if text.isprintable():
        return text
    # repr escapes exactly the characters str.isprintable() rejects
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _install_interrupt_handlers() -> None:
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not in the main thread (e.g. called from a test harness thread)
        pass


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None,
            prog: str = "") -> None:
    """Run ``main(argv)``; turn ``UserError`` into one stderr line and exit 2.

    Ctrl-C (SIGINT) and SIGTERM both raise KeyboardInterrupt, which the training
    loops turn into "last completed epoch saved, resume with ...". SIGINT's handler
    is installed explicitly because a process started in the background by a
    non-interactive shell (``cmd &``, some CI runners) inherits SIGINT *ignored*, and
    Python then never raises KeyboardInterrupt: the run could not be stopped cleanly.
    """
    _install_interrupt_handlers()
    try:
        rc = main(argv)
    except UserError as e:
        msg = one_line(str(e))
        print(f"error: {prog + ': ' if prog else ''}{msg}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # the reader of standard output went away (``| head``): say so once, exit nonzero
        # (not everything was delivered), and point stdout at /dev/null so that Python's
        # flush at exit does not add a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"error: {prog + ': ' if prog else ''}standard output was closed before "
              f"everything was written", file=sys.stderr)
        sys.exit(1)
    sys.exit(rc or 0)
