"""A model of the script target's last idea: would a process that spawns for the dispatch
loop (so that the loop never waits in ``posix_spawn``) run more scripts a second?

    .venv/bin/python docs/plans/spawner-model.py N A|B|C W1 W2

N runs of ``/bin/true ""``, two in flight. The loop spends W1 µs of CPU before each spawn
and W2 µs after each exit (spoolq's own work per message is ~550 µs on the test VM). A:
the loop spawns itself (glibc's ``posix_spawn``: it waits for the child's exec). B: a
forked spawner process spawns and reaps, and the loop only sends a byte and reads exits.
C: the loop spawns itself without waiting for the exec (nowait-spawn.c, built here with
gcc, called through ctypes; an exec error is read after the reap).
Not spoolq code: measurements recorded in dispatch-cpu.md.
"""

import ctypes
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

N = int(sys.argv[1])
MODE = sys.argv[2]
W1, W2 = float(sys.argv[3]) / 1e6, float(sys.argv[4]) / 1e6
INFLIGHT = 2
ARGV = ["/bin/true", ""]
ENV = dict(os.environ)


def work(sec: float) -> None:
    end = time.thread_time() + sec
    while time.thread_time() < end:
        pass


def spawning(spawn: Callable[[], tuple[int, Callable[[], None]]]) -> None:
    """The loop of modes A and C: ``spawn()`` starts one run and gives its pid and what to do
    once it is reaped."""
    running: dict[int, Callable[[], None]] = {}
    ep = select.epoll()
    started = done = 0
    while done < N:
        while started < N and len(running) < INFLIGHT:
            work(W1)
            pid, reaped = spawn()
            fd = os.pidfd_open(pid)
            running[fd] = reaped
            ep.register(fd, select.EPOLLIN)
            started += 1
        for fd, _ in ep.poll():
            ep.unregister(fd)
            os.waitid(os.P_PIDFD, fd, os.WEXITED)
            os.close(fd)
            running.pop(fd)()
            work(W2)
            done += 1


def inline() -> None:
    spawning(lambda: (os.posix_spawn(ARGV[0], ARGV, ENV), lambda: None))


def nowait() -> None:
    build = tempfile.mkdtemp()
    so = os.path.join(build, "nowait.so")
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", so,
                    os.path.join(os.path.dirname(os.path.abspath(__file__)), "nowait-spawn.c")], check=True)
    lib = ctypes.CDLL(so)
    vp = ctypes.c_void_p
    lib.spawn_nowait.argtypes = [ctypes.c_char_p, vp, vp, ctypes.POINTER(vp), ctypes.POINTER(ctypes.c_int), vp]
    lib.free_stack.argtypes = [vp]
    args = [a.encode() for a in ARGV]
    envb = [f"{k}={v}".encode() for k, v in ENV.items()]

    def spawn() -> tuple[int, Callable[[], None]]:
        c_argv = (ctypes.c_char_p * (len(args) + 1))(*args, None)
        c_env = (ctypes.c_char_p * (len(envb) + 1))(*envb, None)
        buf, stk, errr = ctypes.create_string_buffer(64), vp(), ctypes.c_int()
        pid = lib.spawn_nowait(args[0], c_argv, c_env, ctypes.byref(stk), ctypes.byref(errr), buf)
        if pid < 0:
            raise OSError(-pid, "clone")

        def reaped(keep: object = (c_argv, c_env, buf)) -> None:  # the child reads them until its exec
            err = os.read(errr.value, 4)
            os.close(errr.value)
            lib.free_stack(stk)
            if err:
                raise OSError(int.from_bytes(err, sys.byteorder), "exec")

        return pid, reaped

    spawning(spawn)


def spawner(sock: socket.socket) -> None:
    ep = select.epoll()
    ep.register(sock.fileno(), select.EPOLLIN)
    fds: dict[int, int] = {}
    while True:
        for fd, _ in ep.poll():
            if fd == sock.fileno():
                data = sock.recv(4096)
                if not data:
                    os._exit(0)
                for _ in range(len(data)):
                    pid = os.posix_spawn(ARGV[0], ARGV, ENV)
                    pfd = os.pidfd_open(pid)
                    fds[pfd] = pid
                    ep.register(pfd, select.EPOLLIN)
            else:
                ep.unregister(fd)
                os.waitid(os.P_PIDFD, fd, os.WEXITED)
                os.close(fd)
                sock.send(struct.pack("i", fds.pop(fd)))


def delegated() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.fork() == 0:
        a.close()
        spawner(b)
    b.close()
    inflight = started = done = 0
    buf = b""
    while done < N:
        while started < N and inflight < INFLIGHT:
            work(W1)
            a.send(b"s")
            inflight += 1
            started += 1
        buf += a.recv(4096)
        while len(buf) >= 4:
            buf = buf[4:]
            inflight -= 1
            work(W2)
            done += 1
    a.close()
    os.wait()


t0 = time.perf_counter()
c0 = os.times()
{"A": inline, "B": delegated, "C": nowait}[MODE]()
el = time.perf_counter() - t0
c1 = os.times()
cpu = (c1.user + c1.system - c0.user - c0.system) / N * 1e6
print(f"{MODE} W1={W1 * 1e6:.0f} W2={W2 * 1e6:.0f}: {N / el:.0f} msg/s, the loop's CPU {cpu:.0f} us/msg")
