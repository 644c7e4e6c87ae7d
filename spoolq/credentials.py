"""The HTTP token of a spool root: where it comes from, and how it is kept.

Whoever holds the token can change what a queue executes, i.e. run commands as the
daemon's user (docs/security.md). So it is read from a file or the environment, never from
the command line (``ps`` shows argv to every user), it is at least
:data:`MIN_TOKEN_BYTES` long, and the file that holds it is readable by its owner only.

Sources, first match wins:

1. ``SPOOLQ_TOKEN`` in the environment;
2. a file named by ``serve --token-file`` (or ``SPOOLQ_TOKEN_FILE``);
3. ``<root>/token``, which the daemon creates at its first start (mode 0600, 32 random
   bytes, URL-safe base64) when nothing else is configured, as Jupyter does.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import stat
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from . import durable
from .errors import InvalidInput

log = logging.getLogger("spoolq")

MIN_TOKEN_BYTES = 16
TOKEN_FILE = "token"


class AccessLevel(StrEnum):
    """What an HTTP request without credentials may do on a loopback server
    (``serve --anonymous``), in rising order; see spoolq.http.auth."""

    NONE = "none"  # public paths only
    READ = "read"  # every GET and HEAD: pages, JSON, logs, attachments, metrics
    RQ = "rq"  # read + RQ's message routes (new_message, commit, delete, clone, run_now, attach)
    ALL = "all"  # everything, queue creation and config included (RQ's model: --trust-loopback)


class TokenError(InvalidInput):
    """A configured token cannot be used (too short, unreadable, readable by others)."""

    code = "bad_token"


@dataclass(frozen=True)
class Token:
    """A token and where it came from (``env``, a file path, or ``generated``: made at this
    start because none existed; ``ephemeral``: made, but the root could not keep it)."""

    value: str
    source: str

    def __repr__(self) -> str:  # never print the secret by accident
        return f"Token(source={self.source!r})"


def check_value(value: str, where: str) -> str:
    """The token with surrounding whitespace stripped; TokenError when it is too short or
    holds characters an HTTP header cannot carry."""
    v = value.strip()
    if len(v.encode()) < MIN_TOKEN_BYTES:
        raise TokenError(f"the token from {where} is {len(v.encode())} bytes; at least {MIN_TOKEN_BYTES} "
                         "are required (make one with: head -c 32 /dev/urandom | base64)")
    if not v.isascii() or any(c.isspace() or not c.isprintable() for c in v):
        raise TokenError(f"the token from {where} must be printable ASCII without spaces")
    return v


def read_file(path: Path) -> str:
    """The token kept in ``path``. Refused when others may read the file (like ssh's keys)
    or when someone other than this user (or root) owns it."""
    try:
        # O_NONBLOCK: a FIFO named as the token file must not hang the start (refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise TokenError(f"token file {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise TokenError(f"token file {path} is a symbolic link; name the file itself") from None
        raise TokenError(f"cannot read token file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TokenError(f"token file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise TokenError(f"token file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                             f"chmod 600 {path}")
        if st.st_uid not in (os.geteuid(), 0):
            raise TokenError(f"token file {path} belongs to uid {st.st_uid}, not to this user")
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise TokenError(f"token file {path} is not text") from None
    return check_value(text, str(path))


def configured(root: str | os.PathLike[str], token_file: str | None = None) -> Token | None:
    """The token from the environment, ``token_file`` or ``<root>/token``; None if none exists."""
    env = os.environ.get("SPOOLQ_TOKEN")
    if env:
        return Token(check_value(env, "SPOOLQ_TOKEN"), "env")
    named = token_file or os.environ.get("SPOOLQ_TOKEN_FILE")
    if named:
        return Token(read_file(Path(named)), named)
    path = Path(root) / TOKEN_FILE
    if path.exists() or path.is_symlink():
        return Token(read_file(path), str(path))
    return None


def load_or_create(root: str | os.PathLike[str], token_file: str | None = None) -> Token:
    """The configured token, or a new one written to ``<root>/token`` (0600).

    When the root cannot keep it (read-only, disk full) the daemon still starts, with a
    token for this run only, and says so: on a full disk it must still serve reads.
    """
    found = configured(root, token_file)
    if found is not None:
        return found
    value = secrets.token_urlsafe(32)
    path = Path(root) / TOKEN_FILE
    try:
        _write_new(path, value)
    except FileExistsError:
        return Token(read_file(path), str(path))  # another process made it first
    except OSError as e:
        log.warning("cannot write %s (%s): using a token for this run only; the CLI cannot read it",
                    path, e.strerror or e)
        return Token(value, "ephemeral")
    log.warning("created %s (mode 0600): the HTTP token; whoever reads it can run commands as this user",
                path)
    return Token(value, "generated")


def _write_new(path: Path, value: str) -> None:
    """Create ``path`` holding ``value`` with mode 0600, durably, failing if it exists.

    Written under a temporary name and linked into place, so no reader ever sees a partial
    token and a racing creator gets FileExistsError instead of overwriting."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            durable.write_all(fd, (value + "\n").encode())
            durable.fsync_fd(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
        durable.fsync_dir(path.parent)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


# -- one-time sign-in codes minted on disk (``spoolq login-url``) ------------------------------
LOGIN_DIR = "login"
"""``<root>/login/``: one file per unspent sign-in code, named by the code's sha256, holding its
expiry (Unix time). Mode 0700, like the token: writing here is as good as holding the token."""
MAX_LOGIN_FILES = 1000


class LoginDirError(TokenError):
    """``<root>/login`` is not a private directory of this user."""


def login_dir(root: str | os.PathLike[str]) -> Path:
    return Path(root) / LOGIN_DIR


def _open_private_dir(d: Path, *, create: bool, owner: int | None = None) -> int | None:
    """An fd on ``d``, opened without following a link, once it is known to be a directory
    of ``owner`` (default: this user) that nobody else may write or read; None if it does
    not exist. Everything done in it goes through this fd: the root directory belongs to
    the daemon's user, who could otherwise swap ``d`` for a link between a check and a use
    by root (``spoolq login-url`` run as root for a daemon of another user)."""
    euid = os.geteuid()
    uid = euid if owner is None else owner
    made = False
    if create:
        try:
            os.mkdir(d, 0o700)
            made = True
        except FileExistsError:
            pass
    try:
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise LoginDirError(f"{d} must be a directory of uid {uid} with mode 0700 (it is not a "
                            "directory: a link or a file is in its place)") from None
    try:
        if made and euid == 0 and uid != 0:
            # root making the first code for a daemon that runs as another user: the
            # directory and its files must be that user's, or the daemon refuses them.
            os.fchown(dfd, uid, -1)
        st = os.fstat(dfd)
        if st.st_uid != uid or st.st_mode & 0o077:
            raise LoginDirError(f"{d} must be a directory of uid {uid} with mode 0700 "
                                f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")
    except BaseException:
        os.close(dfd)
        raise
    return dfd


def _code_name(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def mint_login_code(root: str | os.PathLike[str], ttl: float) -> str:
    """A new one-time sign-in code, valid ``ttl`` seconds, that the root's daemon redeems.

    The CLI makes it on disk, so asking for a link sends the token nowhere: a program that
    took the daemon's port while it was down learns nothing."""
    d = login_dir(root)
    owner = os.stat(root).st_uid
    dfd = _open_private_dir(d, create=True, owner=owner if os.geteuid() == 0 else None)
    if dfd is None:  # removed between the mkdir and the open
        raise LoginDirError(f"{d} vanished while a sign-in code was made; try again")
    try:
        return _mint_in(dfd, owner, ttl)
    finally:
        os.close(dfd)


def _mint_in(dfd: int, owner: int, ttl: float) -> str:
    """:func:`mint_login_code` in the login directory ``dfd``."""
    now = time.time()
    names = sorted(os.listdir(dfd))
    for n in names:  # spent or expired codes go; the directory stays small
        try:
            fd = os.open(n, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            try:
                expired = not stat.S_ISREG(os.fstat(fd).st_mode) or float(os.read(fd, 64) or 0) < now
            finally:
                os.close(fd)
        except (OSError, ValueError):
            expired = True
        if expired or len(names) > MAX_LOGIN_FILES:
            try:
                os.unlink(n, dir_fd=dfd)
            except OSError:
                pass
    code = secrets.token_urlsafe(32)
    fd = os.open(_code_name(code), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=dfd)
    try:
        if os.geteuid() == 0 and owner != 0:
            os.fchown(fd, owner, -1)
        durable.write_all(fd, f"{now + ttl:.3f}\n".encode())
    finally:
        os.close(fd)
    return code


def redeem_login_code(root: str | os.PathLike[str], code: str) -> bool:
    """True once for a code :func:`mint_login_code` made that has not expired; spent either way."""
    d = login_dir(root)
    try:
        dfd = _open_private_dir(d, create=False)
    except LoginDirError as e:
        log.warning("sign-in codes refused: %s", e)
        return False
    except OSError:
        return False
    if dfd is None:
        return False
    try:
        return _redeem_in(dfd, code)
    finally:
        os.close(dfd)


def _redeem_in(dfd: int, code: str) -> bool:
    """:func:`redeem_login_code` in the login directory ``dfd``."""
    name = _code_name(code)
    claimed = f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        # The one redeemer that wins the rename spends it.
        os.rename(name, claimed, src_dir_fd=dfd, dst_dir_fd=dfd)
    except OSError:
        return False
    try:
        fd = os.open(claimed, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                return False
            expiry = float(os.read(fd, 64) or 0)
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return False
    finally:
        try:
            os.unlink(claimed, dir_fd=dfd)
        except OSError:
            pass
    return expiry >= time.time()
