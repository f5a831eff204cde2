"""The one exception type that reaches the user as a one-line message.

Every stage raises :class:`UserError` for problems the user can fix (bad data, a
target this machine cannot run, a full disk ...). The CLI prints ``error: <message>``
and exits with :attr:`UserError.exit_code`; no traceback.
"""

from __future__ import annotations


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
