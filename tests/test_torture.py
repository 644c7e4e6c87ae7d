"""Torture: thousands of messages with random outcomes while the daemon is SIGKILLed and
restarted again and again. At the end every message is in exactly one final state, none is
lost, and only messages that were running at a kill (their history says "recovered") ran
more often than their script's own logic asks for."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

from daemon_util import Served, script, stop_all, wait_for

import spoolq
from spoolq.model import State
from spoolq.store.fs.layout import iter_entries

N_MESSAGES = 2400
N_KILLS = 20
EXPECTED = {"done": "done", "err": "err", "perm": "err", "temp": "done", "resend": "done", "noverb": "done"}
# Count increments the script itself asks for (exit 111 twice; resend once).
DESIGNED_COUNT = {"done": 0, "err": 0, "perm": 0, "temp": 2, "resend": 1, "noverb": 0}


def test_sigkill_torture(client: spoolq.Client, root: Path, tmp_path: Path) -> None:
    rnd = random.Random(1234)
    client.create_queue("t", script=script("torture.sh"), num_workers=4, max_count=1000,
                        retry={"base": 0.01, "factor": 1.0, "jitter": 0})
    runlog = tmp_path / "runs.log"
    runlog.touch()
    kinds = [rnd.choice(list(EXPECTED)) for _ in range(N_MESSAGES)]
    batches = [kinds[i::4] for i in range(4)]
    served: list[Served] = []
    t0 = time.monotonic()
    try:
        for k in range(N_KILLS):
            if k % 5 == 0 and batches:
                client.send_many("t", [{"param1": kind, "param2": str(runlog)} for kind in batches.pop()])
            s = Served(root).start()
            served.append(s)
            time.sleep(rnd.uniform(0.1, 0.7))
            s.kill()
        final = Served(root).start()
        served.append(final)
        wait_for(lambda: _unfinished(client) == 0, 150, "every message to finish")
        assert final.stop(timeout=30) == 0
    finally:
        stop_all(served)
    elapsed = time.monotonic() - t0

    by_state: dict[str, list[str]] = {}
    seen: Counter[str] = Counter()
    qdir = root / "queue" / "t"
    for st in State:
        for msg_id, _, _ in iter_entries(qdir, st):
            by_state.setdefault(str(st), []).append(msg_id)
            seen[msg_id] += 1
    assert sum(seen.values()) == N_MESSAGES, {k: len(v) for k, v in by_state.items()}
    assert all(n == 1 for n in seen.values()), "a message is in two states"
    assert not by_state.get("que") and not by_state.get("run") and not by_state.get("prep")

    starts: Counter[str] = Counter(line.split()[1] for line in runlog.read_text().splitlines() if line)
    ran_twice = extra_runs = 0
    for msg_id in seen:
        view = client.get(spoolq.MessageRef("t", msg_id))
        kind = view.message.param1
        assert str(view.state) == EXPECTED[kind], (msg_id, kind, view.status)
        recovered = sum(1 for h in view.message.history if h.get("note") == "recovered")
        n = starts[msg_id]
        if recovered == 0:
            assert view.message.count == DESIGNED_COUNT[kind], (msg_id, kind, view.message.count)
            assert n == DESIGNED_COUNT[kind] + 1, (msg_id, kind, n)
        else:
            # Every recovery added one to count; a kill before the script started adds no run.
            assert view.message.count >= DESIGNED_COUNT[kind], (msg_id, kind)
            assert n <= view.message.count + 1, (msg_id, kind, n, view.message.count)
            extra = n - (DESIGNED_COUNT[kind] + 1)
            if extra > 0:
                ran_twice += 1
                extra_runs += extra
    print(f"\ntorture: {N_MESSAGES} messages, {N_KILLS} SIGKILLs, {sum(starts.values())} script runs, "
          f"{ran_twice} messages re-ran after a kill ({extra_runs} extra runs), {elapsed:.1f} s")


def _unfinished(client: spoolq.Client) -> int:
    c = client.counts("t")
    return c["prep"] + c["que"] + c["run"]
