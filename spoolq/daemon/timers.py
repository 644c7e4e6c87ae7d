"""Timers: RQ's ``timers/<name>.json``, a message sent every ``period`` seconds (or on a cron
schedule), fired by the daemon and persisted so that a restart neither fires a tick twice
nor skips one (docs/timers.md).

A timer file (a file or RQ's symlink; the name is a queue-like name)::

    {"period": 86400, "msg": {"dest": "cleaner", "param1": "ALLQUEUES"}}
    {"cron": "*/15 8-18 * * 1-5", "msg": {"dest": "report", "params": {"kind": "hourly"}}}

Each tick is sent in two steps around the state file ``<home>/timers/.state.json``
(fsync'd): the tick's intent is recorded, the message is created in ``prep``, its id is
recorded, it is committed, and the tick is recorded as done. A start that finds an intent
commits the message it names (or, with no id recorded yet, sends the tick): a tick is sent
once. A message left in ``prep`` by a crash between its creation and the record of its
id never runs (``spoolq ls Q --state prep`` shows it, ``src`` names the timer).

Ticks missed while no daemon ran are sent once, at the start (not once per missed tick). A
DOWN destination refuses the tick: it is logged and skipped. A PAUSEd one queues it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import durable, filestamp
from ..builtin import target_queue
from ..errors import InvalidInput, QueueDown, QueueNotFound, SpoolqError, StorageError
from ..filestamp import Stamp
from ..ids import QUEUE_NAME_RE
from ..model import Message, State
from ..store.base import Store

log = logging.getLogger("spoolq.daemon")

TIMERS_DIR = "timers"
STATE_FILE = ".state.json"
RESCAN = 10.0
"""Seconds between looks at the timers directory (a SIGHUP looks at once)."""
MSG_KEYS = ("dest", "src", "param1", "param2", "param3", "param4", "params", "max_count", "post_run_webhook")


# -- cron --------------------------------------------------------------------------------------
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))


@dataclass(frozen=True)
class Cron:
    """A five-field cron expression (minute hour day-of-month month day-of-week, local
    time): ``*``, numbers, ``a-b``, lists and ``/step``; day-of-week 0 and 7 are Sunday.
    When both day fields are restricted a day matches either (as cron does)."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, text: str) -> Cron:
        parts = text.split()
        if len(parts) != 5:
            raise ValueError(f"a cron expression has 5 fields (minute hour day month weekday), got {text!r}")
        sets = [_cron_field(p, name, lo, hi) for p, (name, lo, hi) in zip(parts, _FIELDS, strict=True)]
        weekdays = frozenset(d % 7 for d in sets[4])
        return cls(frozenset(sets[0]), frozenset(sets[1]), frozenset(sets[2]), frozenset(sets[3]), weekdays,
                   parts[2] == "*", parts[4] == "*")

    def _day_ok(self, t: time.struct_time) -> bool:
        dom = t.tm_mday in self.days
        dow = (t.tm_wday + 1) % 7 in self.weekdays  # struct_time: Monday = 0
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow

    def next_after(self, after: float) -> float:
        """The first matching minute strictly after ``after`` (epoch seconds, local time).
        Across daylight saving as cron does: a local time the clock shows twice (the hour put
        back) matches the first time only, and one it skips (the hour put forward) matches
        at the jump (audit: 01:30 fired twice in November, 02:30 not at all in March)."""
        t = (math.floor(after / 60) + 1) * 60.0
        limit = after + 5 * 366 * 86400
        while t < limit:
            lt = time.localtime(t)
            if self._skipped_over(t, lt):
                return t
            if lt.tm_mon not in self.months or not self._day_ok(lt):
                t = _next_midnight(lt)
            elif lt.tm_hour not in self.hours:
                t += (60 - lt.tm_min) * 60
            elif lt.tm_min not in self.minutes or _shown_before(t, lt):
                t += 60
            else:
                return t
        raise ValueError("the cron expression never matches")

    def _skipped_over(self, t: float, lt: time.struct_time) -> bool:
        """Did the clock jump forward onto ``t`` over a local time that matches?"""
        before = time.localtime(t - 60)
        was, now = before.tm_hour * 60 + before.tm_min, lt.tm_hour * 60 + lt.tm_min
        if (now - was) % 1440 <= 1 or lt.tm_mon not in self.months or not self._day_ok(lt):
            return False
        return any(m // 60 in self.hours and m % 60 in self.minutes for m in range(was + 1, now))


def _shown_before(t: float, lt: time.struct_time) -> bool:
    """Is ``t`` the second time the clock shows this local time (the hour put back)?"""
    if lt.tm_isdst != 0:
        return False
    earlier = time.localtime(t - 3600)
    return earlier.tm_isdst > 0 and (earlier.tm_hour, earlier.tm_min) == (lt.tm_hour, lt.tm_min)


def _next_midnight(lt: time.struct_time) -> float:
    return time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday + 1, 0, 0, 0, 0, 0, -1))


def _cron_field(text: str, name: str, lo: int, hi: int) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"(\*|\d+(?:-\d+)?)(?:/(\d+))?", part)
        if m is None:
            raise ValueError(f"cron {name}: cannot read {part!r}")
        rng, step = m.group(1), int(m.group(2) or 1)
        if rng == "*":
            a, b = lo, hi
        elif "-" in rng:
            a, b = (int(x) for x in rng.split("-"))
        else:
            a = b = int(rng)
            if m.group(2):
                b = hi
        if not (lo <= a <= b <= hi) or step < 1:
            raise ValueError(f"cron {name}: {part!r} is outside {lo}-{hi}")
        out.update(range(a, b + 1, step))
    return out


# -- timers ------------------------------------------------------------------------------------
@dataclass
class Timer:
    name: str
    msg: dict[str, Any]
    period: float | None = None
    cron: Cron | None = None
    stamp: Stamp = (0, 0, 0)  # of the file it was read from (filestamp.py)
    settled: bool = True  # the file had settled when read: its stamp vouches for it

    def same_as(self, other: Timer) -> bool:
        return (self.msg, self.period, self.cron) == (other.msg, other.period, other.cron)

    def next_after(self, last: float | None, now: float) -> float:
        """When the tick after ``last`` is due (a new timer with a period: now, as RQ's)."""
        if self.cron is not None:
            return self.cron.next_after(last if last is not None else now)
        assert self.period is not None
        return now if last is None else last + self.period


def load_timer(path: Path) -> Timer:
    """A timer file; ValueError saying what is wrong."""
    name = path.name[:-len(".json")]
    if not QUEUE_NAME_RE.match(name):
        raise ValueError(f"invalid timer name {name!r}")
    st = os.stat(path)
    stamp, settled = filestamp.stamp(st)
    if st.st_size > 64 * 1024:
        raise ValueError("over 64 KiB")
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    unknown = set(data) - {"period", "cron", "msg"}
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} (known: period, cron, msg)")
    msg = data.get("msg")
    if not isinstance(msg, dict) or not isinstance(msg.get("dest"), str) or not msg["dest"]:
        raise ValueError('"msg" must be an object with a "dest"')
    msg = {k: v for k, v in msg.items() if k in MSG_KEYS}
    Message.from_dict(msg)  # validated now, not at the first tick
    dest = msg["dest"]
    if not dest.startswith("http") and not QUEUE_NAME_RE.match(dest.strip("/").removeprefix("q/")):
        # As builtin.target_queue reads it; else every tick said so again (audit).
        raise ValueError(f'"msg": "dest" {dest!r} names no queue (a queue name, q/NAME, or an http URL)')
    period, cron = data.get("period"), data.get("cron")
    if (period is None) == (cron is None):
        raise ValueError('give one of "period" (seconds) or "cron"')
    if cron is not None:
        if not isinstance(cron, str):
            raise ValueError('"cron" must be a string of five fields')
        parsed = Cron.parse(cron)
        parsed.next_after(time.time())  # ValueError now for one that never matches (30 February)
        return Timer(name, msg, cron=parsed, stamp=stamp, settled=settled)
    if isinstance(period, bool) or not isinstance(period, (int, float)) or not 1 <= period <= 10 * 366 * 86400:
        raise ValueError('"period" must be a number of seconds, at least 1')
    return Timer(name, msg, period=float(period), stamp=stamp, settled=settled)


class Timers:
    """The daemon's timers: :meth:`tick` sends what is due and says when to look again."""

    def __init__(self, store: Store, home: Path, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.dir = home / TIMERS_DIR
        self.clock = clock
        self.timers: dict[str, Timer] = {}
        self.bad: dict[str, Stamp] = {}  # name -> stamp of a file reported unusable
        self.next_scan = 0.0
        self.state: dict[str, dict[str, Any]] = self._read_state()
        self._resume()

    # -- the state file --------------------------------------------------------------------
    def _read_state(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads((self.dir / STATE_FILE).read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.error("timers: cannot read %s (%s): every timer starts afresh", self.dir / STATE_FILE, e)
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}

    def _save(self) -> None:
        durable.write_replace(self.dir / STATE_FILE, json.dumps(self.state, sort_keys=True).encode(), sync=True)

    def _resume(self) -> None:
        """Finish the ticks a dead daemon was sending."""
        for name in list(self.state):
            try:
                self._finish_prepared(name)
            except (OSError, SpoolqError) as e:
                log.error("timer %s: cannot finish the tick a dead daemon prepared: %s", name, e)

    def _finish_prepared(self, name: str) -> bool:
        """A tick whose message was created (in prep) but not yet committed: commit it.
        True if there was one. An intent without a message id is left: the tick is still
        due (its ``last`` was not moved on), so the next :meth:`tick` sends it."""
        st = self.state.get(name, {})
        ref = st.get("msg")
        if st.get("firing") is None or not (isinstance(ref, list) and len(ref) == 2):
            return False
        try:
            self.store.commit(ref[0], ref[1])
            log.warning("timer %s: committed its prepared tick %s/%s", name, *ref)
        except StorageError:
            raise  # the disk refused: tried again at the next tick
        except SpoolqError as e:  # deleted, moved on, its queue gone
            log.warning("timer %s: its prepared tick %s/%s is gone: %s", name, ref[0], ref[1], e)
        self._done(name, float(st["firing"]))
        return True

    def _done(self, name: str, at: float) -> None:
        st = self.state.setdefault(name, {})
        st.update(last=at, firing=None, msg=None)
        self._save()

    # -- scanning --------------------------------------------------------------------------
    def scan(self) -> None:
        self.next_scan = time.monotonic() + RESCAN
        try:
            names = sorted(n for n in os.listdir(self.dir) if n.endswith(".json") and not n.startswith("."))
        except FileNotFoundError:
            names = []
        except OSError as e:
            log.error("timers: cannot read %s: %s", self.dir, e)
            return
        seen = set()
        for fname in names:
            name = fname[:-len(".json")]
            seen.add(name)
            path = self.dir / fname
            try:
                stamp, settled = filestamp.stamp(os.stat(path))
            except OSError:
                continue
            cur = self.timers.get(name)
            if (cur is not None and cur.stamp == stamp and cur.settled) or self.bad.get(name) == stamp:
                continue
            try:
                new = self.timers[name] = load_timer(path)
                if cur is None or not new.same_as(cur):
                    log.info("timer %s: %s", name, "changed" if cur else "loaded")
                self.bad.pop(name, None)
            except (OSError, ValueError, RecursionError, SpoolqError) as e:  # one bad file stops no other
                if settled:
                    self.bad[name] = stamp  # else looked at again at the next scan
                self.timers.pop(name, None)
                log.error("timer %s: unusable, not firing it: %s", name, e)
        for gone in set(self.timers) - seen:
            log.info("timer %s: removed", gone)
            del self.timers[gone]

    # -- firing ----------------------------------------------------------------------------
    def due(self, name: str, now: float) -> float:
        t = self.timers[name]
        st = self.state.get(name, {})
        last = st.get("last")
        if isinstance(last, (int, float)) and last > now:
            # A last tick in the future: the clock was stepped back since (or was ahead when
            # it was recorded). Counted from now, once, or the timer would say nothing for
            # as long as the clock was off (audit: an hour for a 60 s timer).
            log.warning("timer %s: its last tick is %.0f s in the future (the clock went back?): "
                        "counting from now", name, last - now)
            st["last"] = last = now
        return t.next_after(float(last) if isinstance(last, (int, float)) else None, now)

    def tick(self) -> float:
        """Send every due tick; returns the monotonic time to call again."""
        if time.monotonic() >= self.next_scan:
            self.scan()
        now = self.clock()
        wake = self.next_scan
        for name in list(self.timers):
            try:
                at = self.due(name, now)
            except ValueError as e:
                log.error("timer %s: %s", name, e)
                continue
            if at <= now:
                self._fire(name, now, self._tick_time(name, at, now))
                try:
                    at = self.due(name, now)
                except ValueError:
                    continue
            wake = min(wake, time.monotonic() + max(0.0, at - now))
        return wake

    def _tick_time(self, name: str, at: float, now: float) -> float:
        """What to record as the tick sent: its scheduled time while on schedule (no drift),
        ``now`` when ticks were missed (they are sent once, not once each)."""
        t = self.timers[name]
        if t.period is not None and now - at < t.period:
            return at
        return now

    def _fire(self, name: str, now: float, tick: float) -> None:
        try:
            if self._finish_prepared(name):  # an earlier try got as far as the message
                return
        except (OSError, SpoolqError) as e:
            log.error("timer %s: cannot send the tick now: %s", name, e)
            return
        t = self.timers[name]
        dest = t.msg["dest"]
        try:
            queue = target_queue(self.store, self.dir.parent, dest)
        except (OSError, SpoolqError) as e:
            log.error("timer %s: cannot create the relay queue: %s", name, e)
            return
        data = {**t.msg, "src": t.msg.get("src") or f"timer:{name}"}
        st = self.state.setdefault(name, {})
        try:
            st.update(firing=tick, msg=None)
            self._save()  # the intent: a crash from here on sends this tick at the next start
            m = self.store.create(queue, Message.from_dict(data), state=State.PREP)
            st["msg"] = [queue, m.msg_id]
            self._save()
            self.store.commit(queue, m.msg_id)
        except (QueueDown, QueueNotFound, InvalidInput) as e:
            log.error("timer %s: tick at %s not sent: %s", name, time.strftime("%H:%M:%S", time.localtime(now)), e)
        except (OSError, SpoolqError) as e:
            # The disk refused: the tick stays due (its intent is recorded) and is tried
            # again at the next look.
            log.error("timer %s: cannot send the tick now: %s", name, e)
            return
        else:
            log.info("timer %s: sent %s/%s", name, queue, m.msg_id)
        try:
            self._done(name, tick)
        except OSError as e:
            log.error("timer %s: cannot record the tick: %s", name, e)
