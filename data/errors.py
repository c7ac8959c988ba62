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


def emit(text: str, end: str = "\n", err: bool = False, what: str = "the results") -> None:
    """One write to standard output (``err``: standard error), flushed at once. A closed,
    full or failing stream is a UserError (``what`` says what could not be written), never
    a silent loss or a line on the other stream; a reader of standard output that went
    away (``| head``) is BrokenPipeError, which ``run_cli`` reports."""
    stream, name = (sys.stderr, "standard error") if err else (sys.stdout, "standard output")
    what = "" if err else what + " "
    if stream is None:  # closed when the process started: print() would use stdout
        raise UserError(f"cannot write {what}to {name} (it is closed)")
    try:
        print(text, end=end, file=stream, flush=True)
    except BrokenPipeError:
        if not err:
            raise
        raise UserError(f"cannot write to {name} (its reader went away)") from None
    except (OSError, ValueError) as e:  # ValueError: a file object closed in this process
        raise UserError(f"cannot write {what}to {name} ({getattr(e, 'strerror', None) or e})") \
            from None


def _closed(stream) -> bool:
    """True for a standard stream that was closed when the process started (``>&-``:
    Python then sets it to None) or whose file descriptor is gone."""
    if stream is None:
        return True
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):  # an in-memory stream (a test's capture)
        return False
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def _report(line: str) -> None:
    """``line`` on standard error, if it can be written at all; otherwise the exit status
    says it alone (and standard error goes to /dev/null so that the exit flush is quiet)."""
    try:
        if sys.stderr is None:
            raise OSError("closed")
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        _discard(2)


def _discard(fd: int) -> None:
    """Point ``fd`` at /dev/null: what is still buffered for it is dropped at exit instead
    of failing again (a traceback, exit status 120)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    except OSError:
        pass


def _check_standard_streams(prog: str) -> None:
    """Refuse to start with standard output or standard error closed: results printed
    into nothing would be lost with exit 0, and error lines written where the closed stream
    was would land among the results."""
    closed = [name for name, stream in (("output", sys.stdout), ("error", sys.stderr))
              if _closed(stream)]
    if closed:
        _report(f"error: {prog + ': ' if prog else ''}standard {' and '.join(closed)} "
                f"{'is' if len(closed) == 1 else 'are'} closed, so nothing was run; "
                f"redirect it to a file or to /dev/null instead")
        sys.exit(EXIT_USER_ERROR)


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

    Standard output and standard error must be open (``>&-`` is refused before anything
    runs), and what ``main`` left buffered for standard output is flushed here, so a full
    disk behind it is an error line too, never lost output with exit 0.

    Ctrl-C (SIGINT) and SIGTERM both raise KeyboardInterrupt, which the training
    loops turn into "last completed epoch saved, resume with ...". SIGINT's handler
    is installed explicitly because a process started in the background by a
    non-interactive shell (``cmd &``, some CI runners) inherits SIGINT *ignored*, and
    Python then never raises KeyboardInterrupt: the run could not be stopped cleanly.
    """
    _check_standard_streams(prog)
    _install_interrupt_handlers()
    try:
        rc = main(argv)
        _flush_stdout()
    except UserError as e:
        _report(f"error: {prog + ': ' if prog else ''}{one_line(str(e))}")
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        _report("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # the reader of standard output went away (``| head``): say so once, exit nonzero
        # (not everything was delivered), and point stdout at /dev/null so that Python's
        # flush at exit does not add a traceback
        _discard(1)
        _report(f"error: {prog + ': ' if prog else ''}standard output was closed before "
                f"everything was written")
        sys.exit(1)
    sys.exit(rc or 0)


def _flush_stdout() -> None:
    """What is still buffered for standard output, written now: a full disk or a failing
    device behind it is an error line and a nonzero exit, not lost output with exit 0."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as e:
        _discard(1)
        raise UserError(f"cannot write to standard output "
                        f"({getattr(e, 'strerror', None) or e})") from None
