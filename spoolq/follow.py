"""Waiting on one message, on any store: ``wait`` (until it is final) and ``log -f``.

The store wakes us (``Store.watch_message``: inotify on the filesystem); a slow re-check
every :data:`BACKSTOP` seconds covers an event that was missed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import BinaryIO

from .errors import LogNotFound
from .model import MessageView
from .store.base import Store

BACKSTOP = 5.0
"""Seconds between re-checks while waiting, in case an event was missed."""


def wait_final(store: Store, queue: str, msg_id: str, timeout: float | None,
               clock: Callable[[], float] = time.monotonic) -> MessageView | None:
    """Block until the message is done, relayed or err; None if ``timeout`` passes first."""
    deadline = None if timeout is None else clock() + timeout
    with store.watch_message(queue, msg_id) as watch:  # armed before the first look
        while True:
            view = store.get(queue, msg_id)
            if view.state.final:
                return view
            left = None if deadline is None else deadline - clock()
            if left is not None and left <= 0:
                return None
            watch.wait(BACKSTOP if left is None else min(BACKSTOP, left))


def follow_log(store: Store, queue: str, msg_id: str, out: BinaryIO, *, follow: bool) -> MessageView:
    """Copy the message's ``job/stdio.log`` to ``out``; with ``follow``, keep copying new output
    until the message reaches a final state. Returns the message as last seen."""
    f: BinaryIO | None = None
    with store.watch_message(queue, msg_id, log=True) as watch:
        try:
            while True:
                view = store.get(queue, msg_id)
                if f is None:
                    try:  # never through a link a script left (store/fs/beneath.py); kept open across moves
                        f = store.open_log(queue, msg_id)
                    except LogNotFound:
                        f = None
                if f is not None:
                    _copy(f, out)
                if not follow or view.state.final:
                    if f is not None:
                        _copy(f, out)
                    return view
                watch.wait(BACKSTOP)
        finally:
            if f is not None:
                f.close()


def _copy(f: BinaryIO, out: BinaryIO) -> None:
    while chunk := f.read(65536):
        out.write(chunk)
    out.flush()
