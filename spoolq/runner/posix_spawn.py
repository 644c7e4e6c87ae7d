"""glibc's ``posix_spawn`` through ctypes: a script started without holding the GIL.

``subprocess.Popen`` holds the GIL through its vfork and the child's exec (about half a
millisecond here), builds its arguments in Python, and adds an error pipe, a few dup2s and
two signal-mask calls per spawn. glibc's ``posix_spawn`` does the same work (clone with
CLONE_VFORK, exec errors returned as the result) from a single C call, which ctypes makes
with the GIL released, so the daemon's other threads run meanwhile. What Python's own
``os.posix_spawn`` lacks is the working directory: glibc has had
``posix_spawn_file_actions_addchdir_np`` since 2.29, and ``addclosefrom_np`` since 2.34.

:data:`AVAILABLE` is False where either is missing (another libc, an old glibc); the
caller then uses subprocess.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Mapping, Sequence

_BUF = 1024  # posix_spawn_file_actions_t is 80 bytes and posix_spawnattr_t 336 on x86-64 glibc

POSIX_SPAWN_SETSIGDEF = 0x04
POSIX_SPAWN_SETSIGMASK = 0x08
POSIX_SPAWN_SETSID = 0x80


def _load() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        for name in ("posix_spawn", "posix_spawn_file_actions_addchdir_np",
                     "posix_spawn_file_actions_addclosefrom_np", "posix_spawnattr_setsigmask"):
            getattr(libc, name)
    except (OSError, AttributeError):
        return None
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    libc.posix_spawn.argtypes = [ctypes.POINTER(ctypes.c_int), cp, vp, vp, vp, vp]
    for name in ("posix_spawn_file_actions_init", "posix_spawn_file_actions_destroy",
                 "posix_spawnattr_init", "posix_spawnattr_destroy", "sigemptyset", "sigfillset"):
        getattr(libc, name).argtypes = [vp]
    libc.posix_spawn_file_actions_adddup2.argtypes = [vp, ctypes.c_int, ctypes.c_int]
    libc.posix_spawn_file_actions_addchdir_np.argtypes = [vp, cp]
    libc.posix_spawn_file_actions_addclosefrom_np.argtypes = [vp, ctypes.c_int]
    libc.posix_spawnattr_setflags.argtypes = [vp, ctypes.c_short]
    libc.posix_spawnattr_setsigmask.argtypes = [vp, vp]
    libc.posix_spawnattr_setsigdefault.argtypes = [vp, vp]
    libc.sigaddset.argtypes = [vp, ctypes.c_int]
    return libc


_libc = _load()
AVAILABLE = _libc is not None and os.name == "posix"

# Signals the child gets at their default disposition. Handled ones are reset by exec
# anyway; SIGPIPE and SIGXFSZ are ignored by Python itself and would stay ignored, which
# subprocess undoes too (restore_signals).
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM,
                    signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


def env_block(env: Mapping[str, str]) -> list[bytes]:
    """``KEY=value`` entries, refusing what execve cannot carry, as subprocess does. Nothing
    is kept: a queue's constant part is encoded once by runner/spawn.py's ``QueueEnv``, and
    what is left per start is the message's own, never the same twice."""
    # One encode per entry (os.fsencode's codec encodes character by character, so the
    # whole entry encodes to its name's bytes, "=", its value's), one look for a NUL.
    # Anything wrong is said by the entry-by-entry way, as it always said it.
    try:
        out = [f"{k}={v}".encode(_FS_ENCODING, _FS_ERRORS) for k, v in env.items()]
    except UnicodeError:
        return _env_block_checked(env)
    if b"\0" in b"".join(out) or "=" in "".join(env):  # a NUL anywhere; "=" in a name
        return _env_block_checked(env)
    return out


def _env_block_checked(env: Mapping[str, str]) -> list[bytes]:
    """:func:`env_block` one name and value at a time: the first entry that cannot be
    passed raises (a NUL, a name with ``=``, what the encoding refuses)."""
    out = []
    for k, v in env.items():
        kb, vb = k.encode(_FS_ENCODING, _FS_ERRORS), v.encode(_FS_ENCODING, _FS_ERRORS)  # os.fsencode
        if b"\0" in kb or b"\0" in vb:
            raise ValueError("embedded null byte")
        if b"=" in kb:  # as subprocess refuses (an empty name it passes on)
            raise ValueError(f"illegal environment variable name {k!r}")
        out.append(kb + b"=" + vb)
    return out


def spawn(path: str, argv: Sequence[str], env: Sequence[bytes], *, cwd: str,
          fds: Sequence[tuple[int, int]]) -> int:
    """Start ``path`` with ``argv`` and the ``KEY=value`` entries of ``env`` in ``cwd``, in
    its own session, with the signal mask empty; ``fds`` are ``(parent fd, child fd)``
    pairs, every other fd from the highest child fd + 1 up is closed. Returns the pid;
    OSError (with the filename) if it cannot be started (exec errors included)."""
    assert _libc is not None
    libc = _libc
    args = [os.fsencode(a) for a in argv]
    if any(b"\0" in a for a in args) or b"\0" in os.fsencode(path) or "\0" in cwd:
        raise ValueError("embedded null byte")
    c_argv = (ctypes.c_char_p * (len(args) + 1))(*args, None)
    c_env = (ctypes.c_char_p * (len(env) + 1))(*env, None)
    attr = _attr()
    fa = ctypes.create_string_buffer(_BUF)
    pid = ctypes.c_int(0)
    if libc.posix_spawn_file_actions_init(fa) != 0:
        raise OSError(ctypes.get_errno(), "posix_spawn_file_actions_init failed")
    try:
        for src, dst in fds:
            _check(libc.posix_spawn_file_actions_adddup2(fa, src, dst))
        _check(libc.posix_spawn_file_actions_addchdir_np(fa, os.fsencode(cwd)))
        _check(libc.posix_spawn_file_actions_addclosefrom_np(fa, max(d for _, d in fds) + 1))
        err = libc.posix_spawn(ctypes.byref(pid), os.fsencode(path), fa, attr, c_argv, c_env)
    finally:
        libc.posix_spawn_file_actions_destroy(fa)
    if err != 0:
        raise OSError(err, os.strerror(err), path)
    return pid.value


_attr_buf: ctypes.Array[ctypes.c_char] | None = None


def _attr() -> ctypes.Array[ctypes.c_char]:
    """The spawn attributes, the same for every script (its own session, an empty signal
    mask, :data:`_DEFAULT_SIGNALS` reset): made once, as they were a fifth of this
    module's cost per spawn. ``posix_spawn`` only reads them, from any thread."""
    global _attr_buf
    if _attr_buf is not None:
        return _attr_buf
    assert _libc is not None
    libc = _libc
    attr = ctypes.create_string_buffer(_BUF)
    sigs = ctypes.create_string_buffer(128)
    if libc.posix_spawnattr_init(attr) != 0:
        raise OSError(ctypes.get_errno(), "posix_spawnattr_init failed")
    libc.sigemptyset(sigs)
    _check(libc.posix_spawnattr_setsigmask(attr, sigs))
    for s in _DEFAULT_SIGNALS:
        libc.sigaddset(sigs, int(s))
    _check(libc.posix_spawnattr_setsigdefault(attr, sigs))
    _check(libc.posix_spawnattr_setflags(attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK
                                         | POSIX_SPAWN_SETSIGDEF))
    _attr_buf = attr  # never destroyed: glibc's destroy frees nothing on Linux, and it lives as long
    return attr


def _check(rc: int) -> None:
    if rc != 0:
        raise OSError(rc, os.strerror(rc))
