"""The one exception type that reaches the user as a one-line message.

Every stage raises :class:`UserError` for problems the user can fix (bad data, a
target this machine cannot run, a full disk ...). The CLI prints ``error: <message>``
and exits with :attr:`UserError.exit_code`; no traceback.
"""

from __future__ import annotations

import signal
import sys
import threading

_interrupted = threading.Event()

class UserError(Exception):
    """A problem with the user's input or machine, with the fix in the message.

    Args:
        message: one line: what is wrong, where, and how to fix it.
        exit_code: the process exit status the CLI uses (2: bad input).
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class CandidateError(UserError):
    """One candidate could not be built or measured (export error, out of memory, load error).

    A search records it as a failed trial with this message and carries on; a single
    ``autotune candidate`` run reports it and exits non-zero.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def handle_interrupts() -> None:
    """Make Ctrl-C (SIGINT) stop autotune however it was started, and never be lost.

    A shell starts a background job with SIGINT *ignored* (``cmd &`` in a script, CI
    runners); Python then raises no KeyboardInterrupt, and a search sent SIGINT ran on to
    the end and exited 0. This handler is installed whatever the inherited setting. It also
    remembers the interrupt, so one that a library swallows (inside a finalizer, or C code
    that clears Python errors) is raised again at the next :func:`check_interrupted`.
    """
    def on_sigint(signum, frame) -> None:
        _interrupted.set()
        raise KeyboardInterrupt

    default_hook = sys.unraisablehook

    def quiet_when_swallowed(unraisable) -> None:
        # A KeyboardInterrupt raised inside a finalizer (a weakref callback, __del__) cannot propagate; Python
        # would print it as "Exception ignored ... Traceback". It is remembered and raised again instead.
        if issubclass(unraisable.exc_type, KeyboardInterrupt) and _interrupted.is_set():
            return
        default_hook(unraisable)

    signal.signal(signal.SIGINT, on_sigint)
    sys.unraisablehook = quiet_when_swallowed


def interrupted() -> bool:
    """Whether SIGINT arrived since :func:`handle_interrupts`."""
    return _interrupted.is_set()


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if SIGINT arrived (called between stages)."""
    if _interrupted.is_set():
        raise KeyboardInterrupt
