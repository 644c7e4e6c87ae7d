"""The one exception tree of spoolq.

Every error a user can cause or meet derives from :class:`SpoolqError`. Each class
carries a stable machine-readable ``code``. The mapping to CLI exit codes lives in
``spoolq.cli.exitcodes`` and the mapping to HTTP statuses in ``spoolq.http`` (one
place each); nothing else decides those numbers.
"""

from __future__ import annotations


class SpoolqError(Exception):
    """Base of every error spoolq raises on purpose."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(SpoolqError):
    """The caller gave something spoolq cannot accept (bad name, bad JSON, bad value)."""

    code = "invalid_input"


class InvalidName(InvalidInput):
    """A queue, message or attachment name that is not allowed (it would be used in a path)."""

    code = "invalid_name"


class InvalidMessage(InvalidInput):
    """A message whose fields do not validate."""

    code = "invalid_message"


class InvalidConfig(InvalidInput):
    """A queue configuration that does not validate."""

    code = "invalid_config"


class TooLarge(InvalidInput):
    """A payload above a documented size limit."""

    code = "too_large"


class NotFound(SpoolqError):
    """Something named does not exist."""

    code = "not_found"


class QueueNotFound(NotFound):
    code = "queue_not_found"


class MessageNotFound(NotFound):
    code = "message_not_found"


class AttachmentNotFound(NotFound):
    code = "attachment_not_found"


class LogNotFound(NotFound):
    code = "log_not_found"


class Conflict(SpoolqError):
    """The request clashes with the current state (exists already, wrong state...)."""

    code = "conflict"


class QueueExists(Conflict):
    code = "queue_exists"


class WrongState(Conflict):
    """The message is not in a state that allows the requested action."""

    code = "wrong_state"


class LeaseLost(WrongState):
    """The attempt is no longer the message's current one: its lease ran out and another
    daemon took the message over (fenced out), or the message left run."""

    code = "lease_lost"


class QueueDown(SpoolqError):
    """The queue's admin state is DOWN: it refuses new messages."""

    code = "queue_down"


class StorageError(SpoolqError):
    """The storage failed underneath us (disk full, I/O error). Nothing partial is left."""

    code = "storage_error"


class DiskFull(StorageError):
    code = "disk_full"


class CorruptMessage(StorageError):
    """A message's files on disk cannot be read (hand-edited, truncated). It is set aside."""

    code = "corrupt_message"


class SchemaMismatch(StorageError):
    """The database's schema is not the one this spoolq uses: ``spoolq db migrate`` brings an
    older one up to date; a newer one needs a newer spoolq."""

    code = "schema_mismatch"


class ScriptError(SpoolqError):
    """A queue's script cannot be started (missing, not executable, bad interpreter)."""

    code = "script_error"


class ScriptUnusable(ScriptError):
    """The daemon could not start a queue's script: the message that tried is in err and
    the queue is held in SCRIPTERROR until the script can run."""

    code = "script_unusable"


class DaemonRunning(SpoolqError):
    """Another daemon already holds this spool root."""

    code = "daemon_running"


class WaitTimeout(SpoolqError):
    """``wait`` ran out of time before the message reached a final state."""

    code = "timeout"


class Unauthorized(SpoolqError):
    code = "unauthorized"


class Unavailable(SpoolqError):
    """Something the command needs is not available: a port in use, an unwritable root."""

    code = "unavailable"


class AddressInUse(Unavailable):
    """The HTTP listen address could not be bound."""

    code = "address_in_use"
