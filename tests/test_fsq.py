"""fsq, the directory standard (seed 003; spec A.9 checks 1-19; docs/fsq.md): spoolq.fsq and
``spoolq fsq ...``, the real command in a subprocess. fsq's own tools against these
directories are tests/test_fsq_interop.py; the daemon's kind fsq is tests/test_fsq_daemon.py.
"""

from __future__ import annotations

import datetime
import errno
import os
import re
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import SPOOLQ

from spoolq import fsq
from spoolq import inotify as ino

NAME_RE = re.compile(r"^_(\d{14})_(\d+)_(\d+)_([^_]+)_(\d+)((?:_.*)?)$")


@pytest.fixture
def conf(tmp_path: Path) -> fsq.Conf:
    r = tmp_path / "fsq"
    r.mkdir()
    return fsq.Conf.from_env({}, root=str(r))


@pytest.fixture
def q(conf: fsq.Conf) -> str:
    fsq.install(conf, "q")
    return "q"


def run(conf: fsq.Conf, *args: str, input: bytes | None = None, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("FSQ_")}
    e.update(env or {})
    return subprocess.run([SPOOLQ, "fsq", "-r", conf.root, *args], input=input, env=e, capture_output=True,
                          timeout=timeout)


def listing(conf: fsq.Conf, queue: str, which: str) -> list[str]:
    return sorted(os.listdir(fsq.Paths(conf, queue).sub(which)))


# -- 1 install ------------------------------------------------------------------------------
def test_install_makes_exactly_the_four_directories_with_fsq_modes(conf: fsq.Conf) -> None:
    old = os.umask(0o077)
    try:
        fsq.install(conf, "a")
        fsq.install(conf, "b", down=True, triggered=True)
    finally:
        os.umask(old)
    a = Path(conf.root, "a")
    assert sorted(os.listdir(a)) == ["done", "fail", "queue", "tmp"]
    for d in [a, *a.iterdir()]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o2770  # the umask does not apply
    b = Path(conf.root, "b")
    assert sorted(os.listdir(b)) == ["done", "down", "fail", "queue", "tmp", "trigger-s"]
    assert stat.S_ISREG(os.lstat(b / "down").st_mode) and stat.S_IMODE(os.lstat(b / "down").st_mode) == 0o640
    assert stat.S_ISFIFO(os.lstat(b / "trigger-s").st_mode)
    assert [n for n in os.listdir(conf.root) if n.startswith(".")] == []


def test_install_over_a_queue_fails_and_shows_nothing_half_built(conf: fsq.Conf, q: str) -> None:
    fsq.enqueue(conf, q, b"x")
    seen: list[str] = []
    partial: list[tuple[str, list[str]]] = []
    stop = threading.Event()

    def watch() -> None:  # every name the root ever shows while installs run
        while not stop.is_set():
            for n in os.listdir(conf.root):
                if not n.startswith("."):
                    seen.append(n)
                    inside = os.listdir(Path(conf.root, n))
                    if not {"done", "fail", "queue", "tmp"} <= set(inside) or (n != "q" and "down" not in inside):
                        partial.append((n, inside))

    t = threading.Thread(target=watch)
    t.start()
    try:
        with pytest.raises(fsq.InstallError, match="queue exists: q"):
            fsq.install(conf, q)
        for i in range(30):
            fsq.install(conf, f"n{i}", down=True)
    finally:
        stop.set()
        t.join()
    assert partial == [] and len(set(seen)) > 1
    assert listing(conf, q, "queue") and [n for n in os.listdir(conf.root) if n.startswith(".")] == []
    r = run(conf, "install", "q")
    assert r.returncode == 111 and b"queue exists: q" in r.stderr
    assert run(conf, "install", "-i", "q").returncode == 0
    assert run(conf, "install", "--down", "z").returncode == 0  # long options work (fsq's did not)
    assert fsq.is_down(conf, "z")


@pytest.mark.parametrize("bad", ["..", ".", "foo/bar", "", "a\0b"])
def test_illegal_names_are_refused(conf: fsq.Conf, bad: str) -> None:
    with pytest.raises(fsq.PathError) as e:
        fsq.install(conf, bad)
    assert e.value.errno == errno.EINVAL


# -- 2, 3 enqueue, names, entropy -----------------------------------------------------------
def test_senqueue_makes_one_linked_item_and_leaves_tmp_empty(conf: fsq.Conf, q: str) -> None:
    before = datetime.datetime.now().replace(microsecond=0)
    item_id = fsq.enqueue(conf, q, b"data", ["args", "to", "enqueue"])
    m = NAME_RE.match(item_id)
    assert m, item_id
    assert before <= datetime.datetime.strptime(m.group(1), "%Y%m%d%H%M%S") <= datetime.datetime.now()
    assert int(m.group(3)) == os.getpid() and m.group(4) == fsq.HOSTNAME and m.group(5) == "0"
    assert item_id.endswith("_0_args_to_enqueue")
    assert listing(conf, q, "queue") == [item_id] and listing(conf, q, "tmp") == []
    assert Path(fsq.Paths(conf, q).item(item_id)).read_bytes() == b"data"
    assert stat.S_IMODE(os.stat(fsq.Paths(conf, q).item(item_id)).st_mode) == 0o640 & ~_umask()
    bare = fsq.enqueue(conf, q, b"")  # no arguments: the name ends with its tries
    assert bare.endswith(f"_{fsq.HOSTNAME}_0") and fsq.deconstruct(bare)[1][5:] == []


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


def test_entropy_counts_within_a_second_and_restarts_in_the_next(conf: fsq.Conf) -> None:
    t0 = datetime.datetime(2030, 1, 2, 3, 4, 5)
    names = [fsq.new_name(conf, [], now=t0) for _ in range(3)]
    assert [fsq.deconstruct(n)[1][1] for n in names] == ["0", "1", "2"]
    later = fsq.new_name(conf, [], now=t0 + datetime.timedelta(seconds=1))
    assert fsq.deconstruct(later)[1][1] == "0"


def test_enqueue_from_path_fd_file_pipe_and_fifo(conf: fsq.Conf, q: str, tmp_path: Path) -> None:
    payload = "ø".encode() * 1024
    src = tmp_path / "src"
    src.write_bytes(payload)
    ids = [fsq.enqueue(conf, q, str(src))]
    with open(src, "rb") as f:
        ids.append(fsq.enqueue(conf, q, f))
    fd = os.open(src, os.O_RDONLY)
    ids.append(fsq.enqueue(conf, q, fd))
    os.close(fd)
    r, w = os.pipe()
    def feed() -> None:
        os.write(w, payload)
        os.close(w)

    t = threading.Thread(target=feed)
    t.start()
    ids.append(fsq.enqueue(conf, q, r))
    t.join()
    os.close(r)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t = threading.Thread(target=lambda: fifo.write_bytes(payload))
    t.start()
    ids.append(fsq.enqueue(conf, q, str(fifo)))
    t.join()
    assert len(set(ids)) == 5
    for i in ids:
        assert Path(fsq.Paths(conf, q).item(i)).read_bytes() == payload


# -- 4, 5 encode, construct, deconstruct (fsq's own vectors, tests/encode.py, construct.py) ---
def test_escaping_vectors() -> None:
    assert fsq.encode("a_b") == "a%5fb" and fsq.encode("c/d") == "c%2fd" and fsq.encode("e%f") == "e%25f"
    assert fsq.encode("has space ø\n") == "has space ø\n"
    assert fsq.construct([]) == "_"
    assert fsq.construct(["x", "", "y_z"]) == "_x__y%5fz"
    assert fsq.deconstruct("_a%5fb_c%2Fd__e%25f") == ("_", ["a_b", "c/d", "", "e%f"])
    assert fsq.deconstruct(".x.y_z") == (".", ["x", "y_z"])
    assert fsq.deconstruct("_") == ("_", [])
    assert fsq.encode("abc", encoded=("a", "b")) == "%61%62c"
    for s in ("queue", "tmp_done", "%%", "ø%ø", "..", ".", "foo/bar", "_%_"):
        for enc, delim in (("%", "_"), ("^", ".")):
            assert fsq.decode(fsq.encode(s, delim, enc), enc) == s
            name = fsq.construct([s, s], delim, enc)
            assert fsq.deconstruct(name, enc) == (delim, [s, s])


@pytest.mark.parametrize("call", [
    lambda: fsq.decode("abc%"), lambda: fsq.decode("abc%f"), lambda: fsq.decode("%0xf8"),
    lambda: fsq.decode("%zz"), lambda: fsq.encode("x", "_", "_"), lambda: fsq.encode("x", "ø", "%"),
    lambda: fsq.encode("x", "__", "%"), lambda: fsq.encode("x", encoded=("ø",)),
    lambda: fsq.encode("x", "_", "ø"), lambda: fsq.encode("x", "_", "%%"),
    lambda: fsq.deconstruct("%abc"),
])
def test_encoding_errors(call: object) -> None:
    with pytest.raises(fsq.EncodeError):
        call()  # type: ignore[operator]


def test_empty_name_is_malformed() -> None:
    with pytest.raises(fsq.MalformedEntryError):
        fsq.deconstruct("")


# -- 6, 7 scan order, fields, locks ----------------------------------------------------------
def _put(conf: fsq.Conf, q: str, name: str, data: bytes = b"") -> None:
    Path(fsq.Paths(conf, q).item(name)).write_bytes(data)


def test_scan_yields_in_name_order_with_parsed_fields(conf: fsq.Conf, q: str) -> None:
    for e in ("2", "10", "1"):
        _put(conf, q, f"_20200101000000_{e}_7_h_3_x%5fy_z", e.encode())
    got = list(fsq.scan(conf, q, max_tries=0))
    assert [i.entropy for i in got] == ["10", "1", "2"]  # names sort as strings ('0' < '_'), as fsq's
    i = got[1]
    assert i.tries == 3 and i.arguments == ("x_y", "z") and i.pid == "7" and i.hostname == "h"
    assert i.enqueued_at == datetime.datetime(2020, 1, 1)
    assert i.item is not None and i.item.read() == b"1"
    for i in got:
        i.close()


def test_a_held_item_is_skipped_and_a_vanished_one_too(conf: fsq.Conf, q: str) -> None:
    a = fsq.enqueue(conf, q, b"a")
    b = fsq.enqueue(conf, q, b"b")
    first = fsq.scan(conf, q)
    held = next(first)
    assert held.id == a
    assert [i.id for i in fsq.scan(conf, q)] == [b]  # the second scanner does not see a
    names = iter([a, b])
    os.unlink(fsq.Paths(conf, q).item(b))
    assert fsq.take(conf, q, next(names)) is None  # held
    assert fsq.take(conf, q, next(names)) is None  # vanished: no error
    held.close()
    assert [i.id for i in fsq.scan(conf, q)] == [a]


def test_an_item_finished_while_waiting_for_its_lock_is_not_taken(conf: fsq.Conf, q: str) -> None:
    """The race fsq left open: opened by name, locked only after the holder finished it."""
    a = fsq.enqueue(conf, q, b"a")
    held = fsq.take(conf, q, a)
    assert held is not None
    path = fsq.Paths(conf, q).item(a)
    fd = os.open(path, os.O_RDONLY)  # a second scanner has it open, waiting for the lock
    held.success()
    Path(path).write_bytes(b"a new item under the same name")
    held.close()
    import fcntl
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # it would get the lock now...
    os.close(fd)
    item = fsq.take(conf, q, a)  # ...but take() re-checks the name against the inode
    assert item is not None and item.item is not None and item.item.read() == b"a new item under the same name"
    item.close()


# -- 8, 9, 10, 11 done, fail, tries, TTL ------------------------------------------------------
def test_done_and_fail_move_by_code(conf: fsq.Conf, q: str) -> None:
    for n in range(5):
        fsq.enqueue(conf, q, b"x", [str(n)])
    items = list(fsq.scan(conf, q, max_tries=0))
    ids = [i.id for i in items]
    items[0].success()
    items[1].done()
    items[2].fail()
    items[3].done(100)
    items[4].done(7)
    assert listing(conf, q, "done") == sorted(ids[:2])
    assert listing(conf, q, "fail") == sorted(ids[2:])
    it = fsq.take(conf, q, fsq.enqueue(conf, q, b"y"), max_tries=0)
    assert it is not None
    it.conf = it.conf.with_(max_tries=2)
    it.done(111)  # fail_tmp: back in queue/ with tries 1
    assert [fsq.deconstruct(n)[1][4] for n in listing(conf, q, "queue")] == ["1"]


def test_fail_tmp_counts_tries_in_the_name_then_fails(conf: fsq.Conf, q: str) -> None:
    item_id = fsq.enqueue(conf, q, b"x", ["r"])
    seen = []
    raised = []
    for _ in range(3):
        [item] = list(fsq.scan(conf, q, max_tries=3))
        seen.append(item.tries)
        try:
            item.fail_tmp(max_tries=3)
        except fsq.MaxTriesError as e:
            assert "failed permanently" in str(e)
            raised.append(item.tries)
            break
        finally:
            item.close()
    assert seen == [0, 1, 2] and raised == [2]  # the third fail_tmp fails it for good, and says so
    [failed] = listing(conf, q, "fail")
    assert fsq.deconstruct(failed)[1][4] == "2" and failed == fsq.outcome_name(item_id, 2)
    assert listing(conf, q, "queue") == []
    fsq.enqueue(conf, q, b"x")
    [item] = list(fsq.scan(conf, q))  # the default max_tries=1: the first fail_tmp is final
    with pytest.raises(fsq.MaxTriesError):
        item.fail_tmp()
    fsq.enqueue(conf, q, b"x")
    for _ in range(20):  # max_tries=0: forever
        [item] = list(fsq.scan(conf, q, max_tries=0))
        assert item.fail_tmp(max_tries=0)
        item.close()
    assert [fsq.deconstruct(n)[1][4] for n in listing(conf, q, "queue")] == ["20"]


def test_items_past_their_tries_or_ttl_go_to_fail_unseen(conf: fsq.Conf, q: str) -> None:
    _put(conf, q, "_20200101000000_0_1_h_5_tired")
    new = fsq.enqueue(conf, q, b"fresh")
    old = "_19990101000000_0_1_h_0_old"
    _put(conf, q, old)
    problems: list[tuple[str, fsq.FsqError]] = []
    got = [i.id for i in fsq.scan(conf, q, max_tries=5, ttl=3600, rejected=lambda n, e: problems.append((n, e)))]
    assert got == [new]  # the intended TTL: a fresh item runs (fsq's inverted test failed it)
    assert listing(conf, q, "fail") == sorted(["_20200101000000_0_1_h_5_tired", old])
    assert {type(e) for _, e in problems} == {fsq.MaxTriesError, fsq.TTLExpiredError}
    _put(conf, q, "_19990101000000_0_1_h_0_ancient")
    assert [i.id for i in fsq.scan(conf, q, max_tries=0, ttl=0)] == ["_19990101000000_0_1_h_0_ancient", new]


# -- 12 down, up ------------------------------------------------------------------------------
def test_down_stops_a_scan_and_up_resumes(conf: fsq.Conf, q: str) -> None:
    fsq.enqueue(conf, q, b"x")
    fsq.set_down(conf, q)
    with pytest.raises(fsq.DownError) as e:
        list(fsq.scan(conf, q))
    assert e.value.errno == errno.EAGAIN
    assert len(list(fsq.scan(conf, q, ignore_down=True))) == 1  # -i works (fsq's did not)
    fsq.set_up(conf, q)
    fsq.set_up(conf, q)  # already up: a no-op
    with pytest.raises(fsq.ConfigError):
        fsq.set_up(conf, "nosuch")
    assert len(list(fsq.scan(conf, q))) == 1
    assert run(conf, "down", q).returncode == 0 and fsq.is_down(conf, q)
    r = run(conf, "scan", q, "true")
    assert r.returncode == 111 and b"is down" in r.stderr
    assert run(conf, "up", q).returncode == 0 and not fsq.is_down(conf, q)
    assert run(conf, "up", "nosuch").returncode == 111


# -- 13 malformed and hostile entries ----------------------------------------------------------
def test_malformed_links_fifos_and_dirs_go_to_fail_and_the_scan_goes_on(conf: fsq.Conf, q: str,
                                                                       tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("not yours")
    qdir = Path(fsq.Paths(conf, q).sub("queue"))
    (qdir / "junkfile").write_text("x")
    os.symlink(secret, qdir / "_20200101000000_0_1_h_0_link")
    os.mkfifo(qdir / "_20200101000000_0_1_h_0_fifo")
    (qdir / "_20200101000000_0_1_h_0_dir").mkdir()
    good = fsq.enqueue(conf, q, b"fine", ["ok"])
    out = tmp_path / "out"
    r = run(conf, "scan", q, "sh", "-c", f'cat >> {out}; echo " $0 $*" >> {out}', "prog")
    assert r.returncode == 0, r.stderr
    assert out.read_text() == "fine prog ok\n"
    assert listing(conf, q, "done") == [good]
    assert listing(conf, q, "fail") == sorted(["junkfile", "_20200101000000_0_1_h_0_link",
                                               "_20200101000000_0_1_h_0_fifo", "_20200101000000_0_1_h_0_dir"])
    assert secret.read_text() == "not yours" and os.path.islink(Path(fsq.Paths(conf, q).sub("fail"),
                                                                      "_20200101000000_0_1_h_0_link"))
    assert b"invalid date string" in r.stderr


# -- 14 triggers -------------------------------------------------------------------------------
def test_trigger_pull_needs_a_listener_and_delivers_one_nul(conf: fsq.Conf, q: str) -> None:
    fsq.trigger(conf, q)
    with pytest.raises(fsq.TriggerPullError) as e:
        fsq.trigger_pull(conf, q)
    assert e.value.errno == errno.ENXIO and "No listener" in str(e.value)
    fsq.trigger_pull(conf, q, ignore_listener=True)
    fd = os.open(Path(conf.root, q, "trigger-s"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        fsq.trigger_pull(conf, q)
        assert os.read(fd, 10) == b"\0"
        r = run(conf, "enqueue", "-e", "-t", q, "woke")
        assert r.returncode == 0, r.stderr
        assert os.read(fd, 10) == b"\0"
    finally:
        os.close(fd)
    r = run(conf, "enqueue", "-e", "-t", q)  # no listener now: an error, after the item is in
    assert r.returncode == 111 and b"No listener" in r.stderr
    assert len(listing(conf, q, "queue")) == 2
    fsq.untrigger(conf, q)
    assert not os.path.exists(Path(conf.root, q, "trigger-s"))


# -- 15, 16 the scan command -------------------------------------------------------------------
PROG = """#!/bin/sh
{ printf '%s|' "$@"; echo; cat; echo; env | grep '^FSQ_ITEM_' | sort; } > "$OUT/$FSQ_ITEM_ID"
exit "$(cat "$OUT/code" 2>/dev/null || echo 0)"
"""


@pytest.fixture
def prog(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "out"
    out.mkdir()
    p = tmp_path / "prog.sh"
    p.write_text(PROG)
    p.chmod(0o755)
    return p, out


def test_scan_runs_prog_with_args_stdin_and_environment(conf: fsq.Conf, q: str, prog: tuple[Path, Path]) -> None:
    p, out = prog
    item_id = fsq.enqueue(conf, q, b"the content", ["x y", "a_b"])
    r = run(conf, "scan", "-v", q, str(p), "one", "two", env={"OUT": str(out)})
    assert r.returncode == 0, r.stderr
    got = (out / item_id).read_text().splitlines()
    assert got[0] == "one|two|x y|a_b|"
    assert got[1] == "the content"
    f = fsq.deconstruct(item_id)[1]
    assert got[2:] == sorted([f"FSQ_ITEM_ENQUEUED_AT={f[0]}", f"FSQ_ITEM_ENTROPY={f[1]}", f"FSQ_ITEM_HOSTNAME={f[3]}",
                              f"FSQ_ITEM_ID={item_id}", f"FSQ_ITEM_PID={f[2]}", "FSQ_ITEM_TRIES=0"])
    assert listing(conf, q, "done") == [item_id]
    assert f"working on {item_id} ...".encode() in r.stderr and f"{item_id}: succeeded".encode() in r.stderr


@pytest.mark.parametrize("code,where", [(0, "done"), (111, "queue"), (100, "fail"), (7, "fail")])
def test_scan_exit_codes(conf: fsq.Conf, q: str, prog: tuple[Path, Path], code: int, where: str) -> None:
    p, out = prog
    (out / "code").write_text(str(code))
    item_id = fsq.enqueue(conf, q, b"")
    r = run(conf, "scan", "-m", "3", q, str(p), env={"OUT": str(out)})
    assert r.returncode == 0, r.stderr
    names = listing(conf, q, where)
    assert names == [fsq.outcome_name(item_id, 1 if code == 111 else 0)]


def test_a_prog_killed_by_a_signal_fails_the_item_and_aborts_the_scan(conf: fsq.Conf, q: str,
                                                                       tmp_path: Path) -> None:
    a = fsq.enqueue(conf, q, b"")
    b = fsq.enqueue(conf, q, b"")
    r = run(conf, "scan", q, "sh", "-c", "kill -TERM $$")
    assert r.returncode == 111 and f"signal {signal.SIGTERM}".encode() in r.stderr
    assert listing(conf, q, "fail") == [a] and listing(conf, q, "queue") == [b]


def test_scan_options(conf: fsq.Conf, q: str, prog: tuple[Path, Path]) -> None:
    p, out = prog
    env = {"OUT": str(out)}
    ids = [fsq.enqueue(conf, q, b"") for _ in range(3)]
    assert run(conf, "scan", "-D", q, str(p), env=env).returncode == 0  # -D: nothing moves
    assert listing(conf, q, "queue") == sorted(ids) and len(os.listdir(out)) == 3
    (out / "code").write_text("111")
    assert run(conf, "scan", "-m", "2", q, str(p), env=env).returncode == 0
    assert [fsq.deconstruct(n)[1][4] for n in listing(conf, q, "queue")] == ["1", "1", "1"]
    assert run(conf, "scan", "-m", "2", q, str(p), env=env).returncode == 0  # 1 + 1 = 2: fail/
    assert listing(conf, q, "queue") == [] and len(listing(conf, q, "fail")) == 3
    _put(conf, q, "_20000101000000_0_1_h_0_old")
    (out / "code").write_text("0")
    assert run(conf, "scan", "-t", "60", q, str(p), env=env).returncode == 0
    assert "_20000101000000_0_1_h_0_old" in listing(conf, q, "fail")
    for _ in range(4):
        fsq.enqueue(conf, q, b"")
    t0 = time.monotonic()
    assert run(conf, "scan", "-r", "4", q, str(p), env=env).returncode == 0
    # 4 items at 4/s: three gaps of a quarter second at least (a lower bound, never a speed test)
    assert time.monotonic() - t0 >= 0.75
    assert len(listing(conf, q, "done")) == 4


# -- 17 enqueue command, list, usage -----------------------------------------------------------
def test_enqueue_command_and_usage_codes(conf: fsq.Conf, q: str, tmp_path: Path) -> None:
    r = run(conf, "enqueue", q, "a", input=b"from stdin")
    assert r.returncode == 0
    item_id = r.stdout.decode().strip()
    assert Path(fsq.Paths(conf, q).item(item_id)).read_bytes() == b"from stdin"
    assert fsq.deconstruct(item_id)[1][5:] == ["a"]
    f = tmp_path / "f"
    f.write_bytes(b"from file")
    i2 = run(conf, "enqueue", "-f", str(f), q).stdout.decode().strip()
    assert Path(fsq.Paths(conf, q).item(i2)).read_bytes() == b"from file"
    i3 = run(conf, "enqueue", "-e", q).stdout.decode().strip()
    assert Path(fsq.Paths(conf, q).item(i3)).read_bytes() == b""
    r = run(conf, "-l")
    assert r.returncode == 0 and all(v.encode() in r.stdout for v in ("install", "enqueue", "scan", "host-dist"))
    assert run(conf).returncode == 100
    assert run(conf, "scan").returncode == 100
    assert run(conf, "enqueue", "--bogus", q).returncode == 100
    assert run(conf, "enqueue", "-e", "nosuch").returncode == 111
    assert run(conf, "scan", "nosuch", "true").returncode == 111
    assert run(conf, "install", "a/b").returncode == 111


# -- 18 concurrent enqueues ----------------------------------------------------------------------
ENQUEUER = """
import os, sys
from spoolq import fsq
conf = fsq.Conf.from_env({}, root=sys.argv[1])
for i in range(10):
    fsq.enqueue(conf, "q", (b"%d-%d|" % (os.getpid(), i)) * 5000, [str(i)])
"""


def test_ten_processes_enqueue_a_hundred_whole_items(conf: fsq.Conf, q: str) -> None:
    qdir = fsq.Paths(conf, q).sub("queue")
    seen: dict[str, bytes] = {}
    with ino.Inotify() as watch:
        watch.add(qdir, ino.IN_CREATE | ino.IN_MOVED_TO)
        import sys
        procs = [subprocess.Popen([sys.executable, "-c", ENQUEUER, conf.root]) for _ in range(10)]
        while len(seen) < 100:
            for e in watch.wait(20):
                seen[e.name] = Path(qdir, e.name).read_bytes()  # read the moment it shows
            assert any(p.poll() is None for p in procs) or len(seen) <= len(os.listdir(qdir))
            if all(p.poll() is not None for p in procs) and len(seen) >= len(os.listdir(qdir)):
                break
        assert [p.wait() for p in procs] == [0] * 10
    assert len(seen) == 100 == len(listing(conf, q, "queue")) and listing(conf, q, "tmp") == []
    for name, data in seen.items():
        pid, i = data.split(b"|")[0].split(b"-")
        assert data == (b"%s-%s|" % (pid, i)) * 5000, f"{name} was seen partial"
        f = fsq.deconstruct(name)[1]
        assert f[2] == pid.decode() and f[5:] == [i.decode()]


# -- 19 host queues ------------------------------------------------------------------------------
def test_host_queues_and_host_dist(conf: fsq.Conf, q: str) -> None:
    assert run(conf, "add-host", "h1", q).returncode == 0
    assert run(conf, "add-host", "h2", q).returncode == 0
    for h in ("h1", "h2"):
        assert sorted(os.listdir(Path(conf.root, q, "hosts", h))) == ["done", "fail", "queue", "tmp"]
    assert fsq.hosts(conf, q) == ["h1", "h2"]
    ids = sorted(fsq.enqueue(conf, q, b"payload %d" % i, [str(i)]) for i in range(3))
    r = run(conf, "host-dist", q)
    assert r.returncode == 0, r.stderr
    assert listing(conf, q, "done") == ids and listing(conf, q, "queue") == []
    for h in ("h1", "h2"):
        assert sorted(os.listdir(fsq.Paths(conf, q, h).sub("queue"))) == ids
        assert Path(fsq.Paths(conf, q, h).item(ids[1])).read_bytes() == b"payload 1"
    p = fsq.Paths(conf, q, "h1")
    r = run(conf, "scan", "-A", "h1", q, "sh", "-c", 'test "$FSQ_ITEM_HOST" = h1')
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(p.sub("done"))) == ids
    assert run(conf, "down-host", "h2", q).returncode == 0 and fsq.is_down(conf, q, "h2")
    assert run(conf, "up-host", "h2", q).returncode == 0 and not fsq.is_down(conf, q, "h2")
    assert run(conf, "rm-host", "h2", q).returncode == 0 and fsq.hosts(conf, q) == ["h1"]
    assert run(conf, "rm-host", "h2", q).returncode == 111
    assert run(conf, "rm-host", "-f", "h2", q).returncode == 0


def test_done_and_fail_commands_and_stat(conf: fsq.Conf, q: str) -> None:
    a, b, c = (fsq.enqueue(conf, q, b"") for _ in range(3))
    assert run(conf, "done", q, a).returncode == 0
    r = run(conf, "fail", "-T", "-m", "5", q, b)
    assert r.returncode == 0 and r.stdout.decode().strip() == fsq.outcome_name(b, 1)
    assert run(conf, "fail", q, c).returncode == 0
    assert run(conf, "done", q, "nosuch").returncode == 111
    r = run(conf, "stat", q)
    assert r.stdout.decode().strip() == f"{q} queue=1 done=1 fail=1 tmp=0"


def test_constants_come_from_the_environment_when_read(tmp_path: Path) -> None:
    conf = fsq.Conf.from_env({"FSQ_ROOT": str(tmp_path), "FSQ_QUEUE": "pending", "FSQ_ITEM_MODE": "0600",
                              "FSQ_MAX_TRIES": "4", "FSQ_DELIMITER": ".", "FSQ_ENCODE": "^"})
    assert (conf.root, conf.queue, conf.item_mode, conf.max_tries) == (str(tmp_path), "pending", 0o600, 4)
    fsq.install(conf, "q")
    item_id = fsq.enqueue(conf, "q", b"x", ["a.b"])
    assert item_id.startswith(".") and item_id.endswith(".a^2eb")
    assert os.listdir(tmp_path / "q" / "pending") == [item_id]
    with pytest.raises(fsq.ConfigError):
        fsq.Conf.from_env({"FSQ_MAX_TRIES": "lots"})
    with pytest.raises(fsq.EncodeError):
        fsq.Conf.from_env({"FSQ_DELIMITER": "%"})


def test_a_taken_item_never_moves_through_a_done_dir_swapped_for_a_link(conf: fsq.Conf, q: str,
                                                                         tmp_path: Path) -> None:
    """What `spoolq fsq scan` does after running a program: the move is relative to the queue
    directory the item was taken from, each sub-directory opened without following links."""
    outside = tmp_path / "outside"
    outside.mkdir()
    item_id = fsq.enqueue(conf, q, b"x")
    item = fsq.take(conf, q, item_id)
    assert item is not None
    top = Path(conf.root, q)
    os.rename(top / "done", top / "done.old")
    os.symlink(outside, top / "done")
    with pytest.raises(fsq.WorkItemError):
        item.success()
    assert os.listdir(outside) == [] and listing(conf, q, "queue") == [item_id]
    os.unlink(top / "done")
    os.rename(top / "done.old", top / "done")
    item.fail_tmp(max_tries=0)  # within queue/, relative too
    item.success()
    item.close()
    assert listing(conf, q, "done") == [fsq.outcome_name(item_id, 1)]
