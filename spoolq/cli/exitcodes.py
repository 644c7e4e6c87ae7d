"""The one place that maps spoolq's errors to process exit codes (docs/exit-codes.md)."""

from __future__ import annotations

from .. import errors

OK = 0
FAILURE = 1  # an unexpected internal error
USAGE = 2  # bad arguments or invalid input (argparse uses 2 too)
NOT_FOUND = 3
CONFLICT = 4  # exists already, or the message is in the wrong state for the action
QUEUE_DOWN = 5
STORAGE = 6  # disk full, I/O error, corrupt files
TIMEOUT = 7  # `wait` gave up
DAEMON_RUNNING = 8  # `serve`: another daemon holds this root
MESSAGE_FAILED = 9  # `wait`: the message ended in err
UNAUTHORIZED = 10
UNAVAILABLE = 11  # `serve`: the port is in use, the root cannot be written

_BY_CLASS: list[tuple[type[errors.SpoolqError], int]] = [
    (errors.InvalidInput, USAGE),
    (errors.NotFound, NOT_FOUND),
    (errors.Conflict, CONFLICT),
    (errors.QueueDown, QUEUE_DOWN),
    (errors.StorageError, STORAGE),
    (errors.WaitTimeout, TIMEOUT),
    (errors.DaemonRunning, DAEMON_RUNNING),
    (errors.Unauthorized, UNAUTHORIZED),
    (errors.Unavailable, UNAVAILABLE),
]


def exit_code_for(exc: BaseException) -> int:
    for cls, code in _BY_CLASS:
        if isinstance(exc, cls):
            return code
    return FAILURE
