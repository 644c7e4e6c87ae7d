"""The daemon serving fsq queue directories (kind fsq; spec A; docs/fsq.md): items put in
``queue/`` by anyone become messages that run in parallel with fsq-scan's contract, and come
back into ``done/`` or ``fail/``. A real daemon (``spoolq serve``), real scripts."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_util import Served, wait_for

import spoolq
from spoolq import fsq
from spoolq.model import State

RECORD = """#!/bin/sh
# one line per run: the item id, its arguments, its stdin, FSQ_ITEM_TRIES; then wait for
# $HOLD (if set) to exist, and exit with the code in $OUT/code.<first arg> (default 0)
line="$FSQ_ITEM_ID|$*|$(cat)|$FSQ_ITEM_TRIES|$FSQ_ITEM_ENQUEUED_AT"
echo "$line" >> "$OUT/runs"
touch "$OUT/running.$$"
if [ -n "$HOLD" ]; then
  n=0; while [ ! -e "$HOLD" ] && [ $n -lt 600 ]; do sleep 0.05; n=$((n+1)); done
fi
rm -f "$OUT/running.$$"
exit "$(cat "$OUT/code.$1" 2>/dev/null || echo 0)"
"""


@pytest.fixture
def fsq_root(tmp_path: Path) -> Path:
    r = tmp_path / "fsq"
    r.mkdir()
    return r


@pytest.fixture
def conf(fsq_root: Path) -> fsq.Conf:
    return fsq.Conf.from_env({}, root=str(fsq_root))


@pytest.fixture
def out(tmp_path: Path) -> Path:
    o = tmp_path / "out"
    o.mkdir()
    return o


@pytest.fixture
def prog(tmp_path: Path) -> Path:
    p = tmp_path / "record.sh"
    p.write_text(RECORD)
    p.chmod(0o755)
    return p


@pytest.fixture
def daemon(root: Path, out: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(*extra: str, hold: Path | None = None) -> Served:
        env = {"OUT": str(out), **({"HOLD": str(hold)} if hold else {})}
        s = Served(root, "--no-builtin-queues", "--grace", "1", *extra, env=env).start()
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc is not None and s.proc.poll() is None:
            s.stop()


def make_queue(client: spoolq.Client, conf: fsq.Conf, prog: Path, name: str = "jobs", **kw: object) -> str:
    fsq.install(conf, name, triggered=True)
    client.create_queue(name, kind="fsq", script=str(prog), fsq_dir=os.path.join(conf.root, name),
                        **{"num_workers": 2, "retry": {"base": 0.05, "factor": 1, "jitter": 0}, **kw})
    return name


def listing(conf: fsq.Conf, q: str, which: str) -> list[str]:
    return sorted(os.listdir(fsq.Paths(conf, q).sub(which)))


def runs(out: Path) -> list[list[str]]:
    p = out / "runs"
    return [line.split("|") for line in p.read_text().splitlines()] if p.exists() else []


def test_items_from_fsq_tools_run_in_parallel_with_fsq_contract(client: spoolq.Client, conf: fsq.Conf,
                                                                 prog: Path, out: Path, daemon: Callable[..., Served],
                                                                 tmp_path: Path) -> None:
    q = make_queue(client, conf, prog, num_workers=3)
    hold = tmp_path / "go"
    daemon(hold=hold)
    ids = [fsq.enqueue(conf, q, f"body {i}".encode(), ["arg one", f"n_{i}"]) for i in range(6)]
    # three run at once: each waits for `go`, so three at a time are seen running together
    wait_for(lambda: len(list(out.glob("running.*"))) == 3, what="three items running at once")
    hold.touch()
    wait_for(lambda: len(listing(conf, q, "done")) == 6, what="six items in done/")
    assert listing(conf, q, "done") == sorted(ids) and listing(conf, q, "queue") == []
    got = {r[0]: r for r in runs(out)}
    assert sorted(got) == sorted(ids)
    for i, item_id in enumerate(ids):
        f = fsq.deconstruct(item_id)[1]
        assert got[item_id][1:] == [f"arg one n_{i}", f"body {i}", "0", f[0]]
    wait_for(lambda: client.counts(q).get("done") == 6, what="counts")
    view = client.list(q, State.DONE, limit=10).items[0]
    assert view.message.src == "fsq" and view.message.param1 == "arg one"
    assert view.message.params["fsq"]["dir"] == os.path.join(conf.root, q)


def test_exit_codes_retries_and_failures_reach_fsq_dirs(client: spoolq.Client, conf: fsq.Conf, prog: Path,
                                                         out: Path, daemon: Callable[..., Served]) -> None:
    q = make_queue(client, conf, prog, max_count=3)
    (out / "code.perm").write_text("100")
    (out / "code.never").write_text("111")
    perm = fsq.enqueue(conf, q, b"", ["perm"])
    never = fsq.enqueue(conf, q, b"", ["never"])
    daemon()
    wait_for(lambda: len(listing(conf, q, "fail")) == 2, what="two items in fail/")
    # a temporary failure is retried with the queue's backoff (count + 1 each time), until
    # max_count; the item is named with its tries, as fsq's fail_tmp names it
    assert listing(conf, q, "fail") == sorted([perm, fsq.outcome_name(never, 2)])
    assert [r[3] for r in runs(out) if r[0] == never] == ["0", "1", "2"]
    assert [r[3] for r in runs(out) if r[0] == perm] == ["0"]
    (out / "code.never").write_text("0")
    later = fsq.enqueue(conf, q, b"", ["never"])  # ("never" now succeeds)
    wait_for(lambda: listing(conf, q, "done") == [later], what="done/")
    wait_for(lambda: client.counts(q).get("err") == 2, what="err counted")


def test_fsq_down_stops_taking_and_up_resumes(client: spoolq.Client, conf: fsq.Conf, prog: Path, out: Path,
                                              daemon: Callable[..., Served]) -> None:
    q = make_queue(client, conf, prog)
    daemon()
    first = fsq.enqueue(conf, q, b"")
    wait_for(lambda: listing(conf, q, "done") == [first], what="the first item done")
    fsq.set_down(conf, q)
    waiting = fsq.enqueue(conf, q, b"")
    time.sleep(0.5)  # a negative: nothing may happen while the fsq queue is down
    assert listing(conf, q, "queue") == [waiting]
    fsq.set_up(conf, q)
    wait_for(lambda: waiting in listing(conf, q, "done"), what="taken once up")


def test_takes_stop_at_the_window_so_queue_dir_shows_the_backlog(client: spoolq.Client, conf: fsq.Conf, prog: Path,
                                                                 out: Path, daemon: Callable[..., Served],
                                                                 tmp_path: Path) -> None:
    q = make_queue(client, conf, prog, num_workers=1)
    hold = tmp_path / "go"
    ids = [fsq.enqueue(conf, q, b"", [str(i)]) for i in range(60)]
    daemon(hold=hold)
    # one take of a window (16), then none while more than half of it waits
    wait_for(lambda: client.counts(q).get("que", 0) == 15 and client.counts(q).get("run", 0) == 1,
             what="a full window")
    assert len(listing(conf, q, "queue")) == 60 - 16
    hold.touch()
    wait_for(lambda: len(listing(conf, q, "done")) == 60, timeout=60, what="all done")
    # one worker: fsq-scan's order, by name (within a second entropy sorts as text: 0, 1, 10...)
    assert [r[0] for r in runs(out)] == sorted(ids)


def test_fsq_scan_beside_the_daemon_never_runs_an_item_twice(client: spoolq.Client, conf: fsq.Conf, prog: Path,
                                                             out: Path, daemon: Callable[..., Served]) -> None:
    import subprocess

    from conftest import SPOOLQ
    q = make_queue(client, conf, prog, num_workers=2)
    ids = [fsq.enqueue(conf, q, b"", [str(i)]) for i in range(200)]
    daemon()
    env = {**os.environ, "OUT": str(out)}
    for _ in range(3):  # fsq's own kind of scanner, working the same directory meanwhile
        subprocess.run([SPOOLQ, "fsq", "-r", conf.root, "scan", q, str(prog)], env=env, check=True,
                       capture_output=True, timeout=120)
    wait_for(lambda: len(listing(conf, q, "done")) == 200, timeout=60, what="all done")
    seen = [r[0] for r in runs(out)]
    assert sorted(seen) == sorted(ids), "an item ran twice or never"


def test_hostile_entries_go_to_fail_and_the_trigger_has_a_listener(client: spoolq.Client, conf: fsq.Conf,
                                                                   prog: Path, out: Path, tmp_path: Path,
                                                                   daemon: Callable[..., Served]) -> None:
    q = make_queue(client, conf, prog)
    secret = tmp_path / "secret"
    secret.write_text("secret")
    qdir = Path(fsq.Paths(conf, q).sub("queue"))
    os.symlink(secret, qdir / "_20200101000000_0_1_h_0_link")
    os.mkfifo(qdir / "_20200101000000_0_1_h_0_fifo")
    (qdir / "junk").write_text("")
    daemon()
    wait_for(lambda: len(listing(conf, q, "fail")) == 3, what="three in fail/")
    assert runs(out) == []
    # the daemon holds trigger-s open: fsq's `enqueue -t` finds a listener (it fails without one)
    fsq.trigger_pull(conf, q)
    item = fsq.enqueue(conf, q, b"x", ["t"])
    fsq.trigger_pull(conf, q)
    wait_for(lambda: listing(conf, q, "done") == [item], what="done")


def test_a_take_a_crash_interrupted_is_finished_at_start(client: spoolq.Client, conf: fsq.Conf, prog: Path,
                                                          out: Path, root: Path, daemon: Callable[..., Served]) -> None:
    """What a crash leaves in the middle of takes: a prep whose item was held (crash between
    the hold and the commit: the start-up sweep commits it), a prep whose item is still in
    queue/ (crash before the hold: the item is taken again), the held item of a message
    deleted meanwhile (into fail/, named by the message's id: never deleted); then a
    finished message whose item is still held (its outcome's rename, not fsync'd, lost in a
    power cut): moved at the next start, not run again."""
    from spoolq.model import Message
    q = make_queue(client, conf, prog)
    fsq_dir = os.path.join(conf.root, q)
    ids = [fsq.enqueue(conf, q, b"", [a]) for a in ("held", "again", "deleted")]
    made = client.store.create_many(q, [Message(src="fsq", params={"fsq": {"dir": fsq_dir, "id": i}}) for i in ids],
                                    state=State.PREP)
    with fsq.Held(fsq_dir, q, create=True) as h:
        first, third = fsq.take_at(h, ids[0]), fsq.take_at(h, ids[2])
        assert first is not None and third is not None
        items = [first, third]
        assert h.hold([(first, made[0].msg_id), (third, made[2].msg_id)])[0] == {made[0].msg_id,
                                                                                  made[2].msg_id}
        for i in items:
            i.close()
    client.store.delete(q, made[2].msg_id)
    s = daemon()
    wait_for(lambda: len(listing(conf, q, "done")) == 2, what="two done")
    assert sorted(r[0] for r in runs(out)) == sorted(ids[:2]) == listing(conf, q, "done")
    assert os.listdir(Path(fsq_dir, fsq.HOLD, q)) == [] and listing(conf, q, "fail") == [made[2].msg_id]
    wait_for(lambda: client.counts(q).get("done") == 2, what="counts")
    assert client.counts(q).get("prep") == 1  # the orphan prep of `again`: the cleaner's
    s.stop()
    os.rename(Path(fsq_dir, "done", ids[0]), Path(fsq_dir, fsq.HOLD, q, made[0].msg_id))  # the lost rename
    daemon()
    wait_for(lambda: len(listing(conf, q, "done")) == 2, what="moved again")
    assert os.listdir(Path(fsq_dir, fsq.HOLD, q)) == [] and len(runs(out)) == 2


def test_the_hold_directory_must_be_the_daemons_alone(client: spoolq.Client, conf: fsq.Conf, prog: Path,
                                                      out: Path, tmp_path: Path, daemon: Callable[..., Served]) -> None:
    q = make_queue(client, conf, prog)
    hold = Path(conf.root, q, fsq.HOLD)
    other = tmp_path / "elsewhere"
    other.mkdir()
    os.symlink(other, hold)  # a link planted where the hold goes: never followed
    item = fsq.enqueue(conf, q, b"", ["x"])
    s = daemon()
    wait_for(lambda: "cannot serve" in s.log(), what="the refusal in the log")
    assert listing(conf, q, "queue") == [item] and os.listdir(other) == []
    os.unlink(hold)
    hold.mkdir(mode=0o777)
    os.chmod(hold, 0o777)  # writable by others: refused too
    with pytest.raises(fsq.ConfigError):
        fsq.Held(os.path.join(conf.root, q), q, create=True).close()
    os.chmod(hold, 0o700)
    wait_for(lambda: listing(conf, q, "done") == [item], timeout=30, what="served once the hold is sound")


@pytest.mark.slow
def test_daemon_kills_lose_no_item(client: spoolq.Client, conf: fsq.Conf, prog: Path, out: Path,
                                   daemon: Callable[..., Served]) -> None:
    """SIGKILL the daemon over and over while it takes and runs items: every item ends in
    done/ exactly once, none stays in queue/ (a run cut short runs again: at least once)."""
    n = int(os.environ.get("SPOOLQ_FSQ_CHAOS_N", "400"))
    q = make_queue(client, conf, prog, num_workers=4)
    ids = [fsq.enqueue(conf, q, b"", [str(i)]) for i in range(n)]
    rnd = random.Random(os.environ.get("SPOOLQ_CHAOS_SEED", "fsq"))
    kills = 0
    while len(listing(conf, q, "done")) < n and kills < 12:
        s = daemon()
        time.sleep(rnd.uniform(0.05, 0.4))
        s.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        s.proc.wait(10)  # type: ignore[union-attr]
        kills += 1
    daemon()
    wait_for(lambda: len(listing(conf, q, "done")) == n, timeout=120, what="every item done")
    # an attempt a kill cut short counts as a try, as spoolq counts it: the name in done/ may
    # carry tries 1 or more; the item is the same (every other field)
    assert sorted(fsq.outcome_name(i, 0) for i in listing(conf, q, "done")) == sorted(ids)
    assert listing(conf, q, "queue") == []
    assert listing(conf, q, "fail") == []
    assert set(r[0] for r in runs(out)) == set(ids)
    wait_for(lambda: client.counts(q).get("done") == n, what="counts")


def test_the_ui_says_which_fsq_directory_a_queue_takes(client: spoolq.Client, conf: fsq.Conf, prog: Path) -> None:
    from fastapi.testclient import TestClient
    from http_helpers import AUTH, TOKEN

    from spoolq.http.app import create_app
    q = make_queue(client, conf, prog)
    http = TestClient(create_app(client, TOKEN), base_url="http://127.0.0.1", headers=AUTH)
    page = http.get(f"/q/{q}").text
    assert 'id="kind-note"' in page and "Kind <b>fsq</b>" in page and os.path.join(conf.root, q) in page
    assert http.get(f"/api/v1/queues/{q}").json()["config"]["fsq_dir"] == os.path.join(conf.root, q)


# -- the audit's attacks: a group that may write the fsq directory may not lead the daemon out of it
def test_a_done_or_fail_dir_swapped_for_a_link_leads_nothing_out(client: spoolq.Client, conf: fsq.Conf, prog: Path,
                                                                  out: Path, tmp_path: Path,
                                                                  daemon: Callable[..., Served]) -> None:
    q = make_queue(client, conf, prog)
    outside = tmp_path / "rootonly"
    outside.mkdir(mode=0o700)
    top = Path(conf.root, q)
    s = daemon()
    first = fsq.enqueue(conf, q, b"", ["warm"])
    wait_for(lambda: listing(conf, q, "done") == [first], what="the first item done")
    for d in ("done", "fail"):
        os.rename(top / d, top / f"{d}.old")
        os.symlink(outside, top / d)
    (top / "queue" / "junk").write_text("* * * * * root /tmp/evil\n")
    item = fsq.enqueue(conf, q, b"* * * * * root /tmp/evil\n", ["payload"])
    # the refusal: from a take, or (if a take met the moment between the two steps of the
    # swap and let the queue go) from serving it again
    wait_for(lambda: "Not a directory" in s.log(), timeout=15, what="the refusal")
    assert os.listdir(outside) == [] and sorted(os.listdir(top / "queue")) == sorted(["junk", item])
    assert sorted(os.listdir(top / "done.old")) == [first] and len(runs(out)) == 1


def test_a_queue_dir_swapped_for_a_link_is_not_followed(client: spoolq.Client, conf: fsq.Conf, prog: Path, out: Path,
                                                        tmp_path: Path, daemon: Callable[..., Served]) -> None:
    q = make_queue(client, conf, prog)
    outside = tmp_path / "rootonly"
    outside.mkdir(mode=0o700)
    secret = outside / "_20260101000000_0_1_h_0_x"
    secret.write_text("TOP SECRET")
    top = Path(conf.root, q)
    s = daemon()
    first = fsq.enqueue(conf, q, b"", ["warm"])
    wait_for(lambda: listing(conf, q, "done") == [first], what="the first item done")
    os.rename(top / "queue", top / "queue.old")
    os.symlink(outside, top / "queue")
    fsq.trigger_pull(conf, q, ignore_listener=True)  # wake it (if the swap let it go, the refresh comes)
    wait_for(lambda: "Not a directory" in s.log(), timeout=15, what="the refusal")
    assert secret.read_text() == "TOP SECRET" and [r[0] for r in runs(out)] == [first]
    assert listing(conf, q, "done") == [first]


def test_an_item_swapped_after_its_lock_goes_to_fail_not_held(conf: fsq.Conf, tmp_path: Path) -> None:
    fsq.install(conf, "q")
    item_id = fsq.enqueue(conf, "q", b"mine", ["x"])
    secret = tmp_path / "secret"
    secret.write_text("not yours")
    fsq_dir = os.path.join(conf.root, "q")
    with fsq.Held(fsq_dir, "q", create=True) as h:
        item = fsq.take_at(h, item_id)
        assert item is not None
        path = Path(fsq_dir, "queue", item_id)
        os.rename(path, tmp_path / "moved-away")
        os.symlink(secret, path)  # the swap, between the lock and the hold
        moved, problems = h.hold([(item, "20260101.0000.00.000.1")])
        item.close()
        assert moved == set() and "replaced" in problems[0]
        assert os.path.islink(Path(fsq_dir, "fail", item_id)) and os.listdir(Path(fsq_dir, fsq.HOLD, "q")) == []
        with pytest.raises(FileNotFoundError):
            h.open("20260101.0000.00.000.1")


def test_tries_fields_python2_would_refuse_fail_and_others_keep_their_text(client: spoolq.Client, conf: fsq.Conf,
                                                                          prog: Path, out: Path,
                                                                          daemon: Callable[..., Served]) -> None:
    q = make_queue(client, conf, prog)
    qdir = Path(conf.root, q, "queue")
    for n in ("_20260101000000_0_1_h_1%5f0_lax", "_20260101000000_0_1_h_ 2_space", "_20260101000000_0_1_h_00_kept"):
        (qdir / n).write_text("")
    daemon()
    wait_for(lambda: len(listing(conf, q, "fail")) == 2 and len(listing(conf, q, "done")) == 1, what="all three")
    assert listing(conf, q, "done") == ["_20260101000000_0_1_h_00_kept"]  # byte for byte


def test_a_trigger_made_anew_gets_a_listener(client: spoolq.Client, conf: fsq.Conf, prog: Path, out: Path,
                                             daemon: Callable[..., Served]) -> None:
    q = make_queue(client, conf, prog)
    daemon()
    wait_for(lambda: _pull(conf, q), what="a listener")
    trig = Path(conf.root, q, "trigger-s")
    trig.unlink()
    os.mkfifo(trig)
    wait_for(lambda: _pull(conf, q), timeout=15, what="a listener on the new trigger-s")


def _pull(conf: fsq.Conf, q: str) -> bool:
    try:
        fsq.trigger_pull(conf, q)
    except fsq.TriggerPullError:
        return False
    return True


# -- the second audit (of the hold design)
def test_a_message_naming_other_items_reads_and_moves_nothing(client: spoolq.Client, conf: fsq.Conf, prog: Path,
                                                               out: Path, tmp_path: Path,
                                                               daemon: Callable[..., Served]) -> None:
    """params.fsq is the message's, and anyone who may send may write it: only the item the
    intake held under the message's own id is ever read or moved."""
    q = make_queue(client, conf, prog)
    private = fsq.Conf.from_env({}, root=str(tmp_path / "private"))
    os.mkdir(private.root, 0o700)
    fsq.install(private, "secretq")
    secret_id = fsq.enqueue(private, "secretq", b"SECRET", ["y"])
    os.rename(Path(private.root, "secretq", "queue", secret_id), Path(private.root, "secretq", "done", secret_id))
    daemon()
    mine = fsq.enqueue(conf, q, b"", ["mine"])
    wait_for(lambda: listing(conf, q, "done") == [mine], what="an item of the queue's own done")
    forged = [client.send(q, params={"fsq": {"dir": os.path.join(private.root, "secretq"), "id": secret_id}}),
              client.send(q, params={"fsq": {"dir": os.path.join(conf.root, q), "id": mine}})]
    wait_for(lambda: all(client.get(f"{q}/{m.msg_id}").state.final for m in forged), what="both ended")
    assert [r[0] for r in runs(out)] == [mine]  # neither ran: nothing was read
    assert os.listdir(Path(private.root, "secretq", "done")) == [secret_id]
    assert not os.path.exists(Path(private.root, "secretq", fsq.HOLD))
    assert listing(conf, q, "done") == [mine] and listing(conf, q, "fail") == []


def test_two_queues_on_one_directory_lose_nothing_across_a_restart(client: spoolq.Client, conf: fsq.Conf,
                                                                    prog: Path, out: Path, tmp_path: Path,
                                                                    daemon: Callable[..., Served]) -> None:
    q = make_queue(client, conf, prog)
    client.create_queue("jobs2", kind="fsq", script=str(prog), fsq_dir=os.path.join(conf.root, q))
    hold = tmp_path / "go"
    ids = [fsq.enqueue(conf, q, b"", [str(i)]) for i in range(40)]
    s = daemon(hold=hold)
    wait_for(lambda: len(list(out.glob("running.*"))) == 3, what="both queues running")
    assert {d.name for d in Path(conf.root, q, fsq.HOLD).iterdir()} == {q, "jobs2"}
    s.stop(signal.SIGKILL)
    hold.touch()
    daemon()
    wait_for(lambda: len(listing(conf, q, "done")) == 40, timeout=30, what="all done")
    assert sorted(fsq.outcome_name(i, 0) for i in listing(conf, q, "done")) == sorted(ids)
    assert listing(conf, q, "fail") == []


def test_names_that_cannot_be_messages_go_to_fail_not_away(client: spoolq.Client, conf: fsq.Conf, prog: Path,
                                                           out: Path, daemon: Callable[..., Served]) -> None:
    q = make_queue(client, conf, prog)
    qdir = Path(conf.root, q, "queue")
    bad = ["_20260101000000_0_1_h_0_a%00b", "_20260101000000_0_1_h_99999999999999999999_big"]
    for n in bad:
        (qdir / n).write_text("")
    (Path(conf.root, q, "fail") / "~").mkdir()
    (qdir / "~").write_text("")  # cannot move into fail/ (a directory there): must not block the rest
    daemon()
    good = fsq.enqueue(conf, q, b"", ["good"])
    wait_for(lambda: listing(conf, q, "done") == [good], what="the good item, past the poison")
    wait_for(lambda: sorted(bad) == [n for n in listing(conf, q, "fail") if n != "~"], what="the bad ones in fail/")
    assert listing(conf, q, "queue") == ["~"]


def test_items_in_backoff_do_not_stall_the_intake(client: spoolq.Client, conf: fsq.Conf, prog: Path, out: Path,
                                                  daemon: Callable[..., Served]) -> None:
    q = make_queue(client, conf, prog, num_workers=1, retry={"base": 300, "factor": 1, "jitter": 0})
    (out / "code.never").write_text("111")
    for i in range(17):  # more than half the window, all waiting out a 300 s backoff after one try
        fsq.enqueue(conf, q, b"", ["never", str(i)])
    daemon()
    wait_for(lambda: len([r for r in runs(out) if r[1].startswith("never")]) == 17, timeout=30, what="one try each")
    good = fsq.enqueue(conf, q, b"", ["good"])
    wait_for(lambda: listing(conf, q, "done") == [good], timeout=30, what="the good item, past the backoffs")


def test_a_cancelled_queued_message_gives_its_item_to_fail(client: spoolq.Client, conf: fsq.Conf, prog: Path,
                                                           out: Path, tmp_path: Path,
                                                           daemon: Callable[..., Served]) -> None:
    q = make_queue(client, conf, prog, num_workers=1)
    hold = tmp_path / "go"
    first = fsq.enqueue(conf, q, b"", ["first"])
    second = fsq.enqueue(conf, q, b"", ["second"])
    daemon(hold=hold)
    wait_for(lambda: client.counts(q).get("run") == 1 and client.counts(q).get("que") == 1, what="one waiting")
    [waiting] = client.list(q, State.QUE, limit=10).items
    client.cancel(f"{q}/{waiting.msg_id}")
    wait_for(lambda: listing(conf, q, "fail") == [second], timeout=15, what="the cancelled item in fail/")
    hold.touch()
    wait_for(lambda: listing(conf, q, "done") == [first], what="the first done")


def test_the_intake_hears_the_daemons_per_message_events_only_while_it_serves(client: spoolq.Client,
                                                                             conf: fsq.Conf, prog: Path,
                                                                             root: Path) -> None:
    """Every `spoolq serve` runs the fsq intake. With no fsq queue it must not subscribe to
    the daemon's per-message events: the daemon would build and push two per message, and
    wake this thread for each (fork-per-message ran 0.82x as fast, persistent workers 0.6x)."""
    from spoolq.daemon.fsqintake import FsqIntake
    from spoolq.events import EventBus

    bus = EventBus()
    client.create_queue("plain", script=str(prog))
    intake = FsqIntake(root, client=client, bus=bus)
    intake.start()
    try:
        wait_for(lambda: intake._refresh_due > 0, 5, "its first look at the queues")
        assert bus.listening and not bus.wants("state") and bus.wants("queue_change")
        make_queue(client, conf, prog)
        bus.publish({"event": "queue_change", "queue": "jobs", "change": "created"})
        wait_for(lambda: bus.wants("state") and bus.wants("admin"), 5, "the intake listening to its queue's events")
        client.delete_queue("jobs", force=True)
        bus.publish({"event": "queue_change", "queue": "jobs", "change": "deleted"})
        wait_for(lambda: not bus.wants("state"), 5, "the intake deaf to per-message events again")
    finally:
        intake.stop()
    assert not bus.listening


def test_event_subscriptions_by_kind() -> None:
    from spoolq.events import EventBus

    bus = EventBus()
    assert not bus.wants("state")
    some = bus.subscribe(kinds={"admin"})
    every = bus.subscribe()
    assert bus.wants("state") and bus.wants("admin")
    bus.publish({"event": "state", "queue": "q"})
    bus.publish({"event": "admin", "queue": "q"})
    assert [e["event"] for e in some.drain()] == ["admin"]
    assert [e["event"] for e in every.drain()] == ["state", "admin"]
    every.close()
    assert not bus.wants("state") and bus.wants("admin")
    some.close()
    assert not bus.wants("admin") and not bus.listening


def test_a_trigger_it_may_read_but_not_write_is_not_held(client: spoolq.Client, conf: fsq.Conf, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """fsq makes ``trigger-s`` mode 0640: a daemon in its group may open it for reading, not
    for writing. It held the read end alone, and once an ``enqueue -t`` hung up, the read
    end was at EOF for ever: 100 % CPU (audit, with the daemon's DAC override dropped). As
    root here, the refused open is stood in for; the trigger is then not held at all (the
    safety poll finds the items), and the read end is not left open."""
    from spoolq.daemon import fsqintake
    from spoolq.daemon.fsqintake import FsqIntake

    q = make_queue(client, conf, tmp_path / "prog")
    s = fsqintake.Served(client.queue_config(q))
    intake = FsqIntake(tmp_path, client=client)
    real_open = os.open
    before = set(os.listdir("/proc/self/fd"))

    def refuse_write(path: Any, flags: int, *a: Any, **k: Any) -> int:
        if str(path).startswith("/proc/self/fd/") and flags & os.O_WRONLY:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(fsqintake.os, "open", refuse_write)
    intake._open_trigger(s)
    monkeypatch.undo()
    assert s.trigger_fd is None and s.trigger_wfd is None
    assert set(os.listdir("/proc/self/fd")) <= before | {str(n) for n in range(3)}


def test_the_intake_thread_outlives_a_failed_look_at_the_queues(client: spoolq.Client, conf: fsq.Conf,
                                                                tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Its look at the queues caught only spoolq's errors: an OSError (EMFILE, in the
    audit's flood of connections) ended the thread, and fsq queues went unserved until a
    restart. It is tried again at the next poll."""
    from spoolq.daemon import fsqintake
    from spoolq.daemon.fsqintake import FsqIntake

    q = make_queue(client, conf, tmp_path / "prog")
    monkeypatch.setattr(fsqintake, "SAFETY_POLL", 0.2)
    intake = FsqIntake(tmp_path, client=client)
    real = client.store.queues
    failed: list[int] = []

    def queues_once_failing() -> Any:
        if not failed:
            failed.append(1)
            raise OSError(24, "Too many open files")
        return real()

    monkeypatch.setattr(client.store, "queues", queues_once_failing)
    intake.start()
    try:
        wait_for(lambda: q in intake.served, 10, "the queue served after the failed look")
        assert failed and intake._thread is not None and intake._thread.is_alive()
    finally:
        intake.stop()


def test_the_fsq_dir_of_a_queue_holding_items_cannot_change(client: spoolq.Client, conf: fsq.Conf,
                                                              tmp_path: Path) -> None:
    """Its messages' items are held in the old directory: after a change of fsq_dir the
    finish no longer found them, every message went to err and the items stayed held for
    ever (audit). The change is refused while the queue holds messages."""
    from spoolq.errors import Conflict
    from spoolq.model import Message

    q = make_queue(client, conf, tmp_path / "prog")
    fsq.install(conf, "other", triggered=True)
    m = client.store.create(q, Message.from_dict({"param1": "an item's"}))
    with pytest.raises(Conflict, match="still holds items"):
        client.update_queue(q, fsq_dir=os.path.join(conf.root, "other"))
    with pytest.raises(Conflict, match="still holds items"):
        client.update_queue(q, kind="script", fsq_dir="")
    client.update_queue(q, num_workers=3)  # anything else may change
    client.delete(f"{q}/{m.msg_id}")
    client.update_queue(q, fsq_dir=os.path.join(conf.root, "other"))
    assert client.queue_config(q).fsq_dir == os.path.join(conf.root, "other")
