"""Start-up recovery: nothing may stay in run without a live daemon watching it.

``Store.reclaim`` hands back the attempts whose holder is gone (on the filesystem: every
message in ``run/`` at start, since we hold the root's lock and no other daemon is alive).
Its script may still be running: the runner the holder recorded names it with its start
time, so the whole process group is killed first, and only a process that is really
that script (same pid *and* same start time) is touched. Then the message goes back to
``que/`` with ``count`` incremented (at-least-once), or to ``err/`` if it was cancelled or
has used up ``max_count``.

One message never stops the others: whatever fails for one is logged, and a move the store
refuses (disk full, a damaged message directory) is held by the daemon and retried while it
runs (:mod:`.finish`), so no message waits for another restart.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

from ..model import State
from ..runner.protocol import Outcome
from ..runner.spawn import kill_group, leftover_processes, same_process
from ..store.leases import Attempt
from .finish import Finish
from .jobs import HOST, LEASE, JobRunner, crash_outcome

log = logging.getLogger("spoolq.daemon")


@dataclass
class Recovered:
    requeued: int = 0
    failed: int = 0
    killed: int = 0
    held: int = 0  # the store refused the move: retried by the daemon


def recover_queue(runner: JobRunner, queue: str) -> Recovered:
    """Kill orphaned scripts of ``queue`` and finish every attempt whose holder is gone."""
    rec = Recovered()
    for a in runner.store.reclaim(queue, owner=runner.owner, lease=LEASE):
        try:
            _recover_one(runner, a, rec)
        except Exception:  # noqa: BLE001 - one message must not keep the others in run/
            log.exception("%s/%s: recovery failed; going on with the others", queue, a.msg_id)
    return rec


def _runner_pid(a: Attempt) -> tuple[int, int] | None:
    """``(pid, spawned_ns)`` the gone holder recorded (``Store.heartbeat(runner=)``: "pid
    spawn_ns host"), if its script ran on this host: a pid of another machine means nothing here."""
    fields = (a.runner or "").split()
    if len(fields) > 2 and fields[2] != HOST:
        return None
    try:
        return int(fields[0]), int(fields[1])
    except (ValueError, IndexError):
        return None


def _recover_one(runner: JobRunner, a: Attempt, rec: Recovered) -> None:
    queue, msg_id = a.queue, a.msg_id
    pf = _runner_pid(a)
    if pf is not None and same_process(*pf):
        pid = pf[0]
        kill_group(pid, signal.SIGKILL)
        try:
            os.kill(pid, signal.SIGKILL)  # in case it left its group
        except OSError:
            pass
        rec.killed += 1
        log.warning("%s/%s: killed orphaned script pid %d (and its process group)", queue, msg_id, pid)
    elif pf is not None:
        # The script is gone (reaped by init) but may have left children behind.
        for pid in leftover_processes(pf[0], msg_id):
            try:
                os.kill(pid, signal.SIGKILL)
                rec.killed += 1
                log.warning("%s/%s: killed pid %d, left running by its exited script", queue, msg_id, pid)
            except OSError:
                pass
    if a.cancel_requested:
        outcome = Outcome(State.ERR, "cancelled", a.message.count)
    else:
        outcome = crash_outcome(a.message, "was running when the daemon died")
    if not runner.finisher.settle(Finish(a, outcome, note="recovered")):
        rec.held += 1
    elif outcome.state == State.QUE:
        rec.requeued += 1
    else:
        rec.failed += 1
