"""Start-up recovery: nothing may stay in ``run/`` without a live daemon watching it.

A message in ``run/`` at start belongs to a daemon that died (we hold the root's lock, so
no other daemon is alive). Its script may still be running: the pid file names it with its
start time, so the whole process group is killed first, and only a process that is really
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

from ..errors import SpoolqError
from ..model import State
from ..runner.protocol import Outcome
from ..runner.spawn import kill_group, leftover_processes, read_pidfile, same_process
from ..store.fs.layout import message_path
from .finish import Finish
from .jobs import JobRunner, crash_outcome

log = logging.getLogger("spoolq.daemon")


@dataclass
class Recovered:
    requeued: int = 0
    failed: int = 0
    killed: int = 0
    held: int = 0  # the store refused the move: retried by the daemon


def recover_queue(runner: JobRunner, queue: str) -> Recovered:
    """Kill orphaned scripts of ``queue`` and move every ``run/`` message out of run."""
    rec = Recovered()
    for msg_id in list(runner.store.ids(queue, State.RUN)):
        try:
            _recover_one(runner, queue, msg_id, rec)
        except Exception:  # noqa: BLE001 - one message must not keep the others in run/
            log.exception("%s/%s: recovery failed; going on with the others", queue, msg_id)
    return rec


def _recover_one(runner: JobRunner, queue: str, msg_id: str, rec: Recovered) -> None:
    store = runner.store
    mdir = message_path(store.qdir(queue), State.RUN, msg_id)
    pf = read_pidfile(mdir)
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
    try:
        msg = store.get(queue, msg_id).message
    except SpoolqError as e:
        log.error("%s/%s: unreadable in run/: %s", queue, msg_id, e)
        return
    if (mdir / "cancel").exists():
        outcome = Outcome(State.ERR, "cancelled", msg.count)
    else:
        outcome = crash_outcome(msg, "was running when the daemon died")
    if not runner.finisher.settle(Finish(queue, msg, outcome, note="recovered")):
        rec.held += 1
    elif outcome.state == State.QUE:
        rec.requeued += 1
    else:
        rec.failed += 1
