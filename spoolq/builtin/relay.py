"""The ``relay`` queue's script: deliver a message to a queue on another RQ or spoolq over
HTTP, RQ's way (rq-spec 5.2, RQ's ``default_scripts/relay/relay_script.rb``), in Python.

The message's ``dest`` is the far queue's URL (``http://host:port/q/<name>``). Steps, each
safe to repeat after a crash or a failed try:

1. **prep** on the far end (``POST <queue URL>/new_message``, form ``x_format=json``,
   ``mesg`` = the message's ``dest src count+1 max_count param1..4 post_run_webhook
   orig_msg_id`` as JSON, ``_method=prep``). The far id it answers is kept (written and
   fsynced) in ``relay_id`` in the message's ``job/`` directory, which stays with the
   message across tries, so a retry reuses it instead of making a second far message.
2. each attachment (``POST <far id>/attach/new``, multipart ``filedata``), streamed from
   the file in 1 MiB pieces, its md5 (computed on the way) checked against the far end's
   answer (``<md5>-Attached successfully``);
3. **commit** (``POST <far id>``, ``_method=commit``).

Then ``relayed <far full id>``. **Exactly once at the far end:** a retry that finds a
``relay_id`` asks the far end for that message's state first (``GET <far id>/state.json``,
a route RQ has too). Anything but ``prep`` means an earlier try committed it and only the
local finish was lost: the message ends ``relayed`` without sending anything again. A far
message that is not there any more (``cannot find message``, a 404) is made again; anything
else that fails asks to be run again after ``count² × 10`` s (RQ's backoff; the relay queue's
``env_vars`` ``RELAY_BACKOFF`` changes the 10), and the message goes to err once ``count``
passes 15.

**Credentials** for a far end that wants them (a spoolq with a token) come from
``<home>/relay-credentials.json`` (mode 0600), keyed by the far end's origin, never from the
message; they go to that origin only: every request goes to the dest's origin (the path of a
far id, not its host, is used) and a redirect is not followed.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import http.client
import json
import os
import re
import secrets
import signal
import stat
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TIMEOUT = 60.0
CHUNK = 1 << 20
KEYS = ("dest", "src", "count", "max_count", "param1", "param2", "param3", "param4", "post_run_webhook",
        "orig_msg_id")
ID_FILE = "relay_id"
CREDENTIALS_FILE = "relay-credentials.json"


class SoftFail(Exception):
    pass


class Gone(Exception):
    """The far message is not there any more: make a new one."""


class BadSetup(Exception):
    """Nothing a retry mends: a bad dest or a bad credentials file (the message goes to err)."""


def status(line: str) -> None:
    try:
        os.write(3, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
    except BrokenPipeError:
        pass  # the daemon died: this try runs again after its restart, and relay_id is kept
    print(f"{os.getpid()} - {time.strftime('%Y-%m-%d %H:%M:%S')} - {line}", flush=True)


def origin(url: str) -> str:
    """``scheme://host:port`` of ``url``, lower case, the port filled in."""
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError as e:  # a port out of range, a bad IPv6 literal
        raise BadSetup(f"not a usable URL: {url!r}: {e}") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise BadSetup(f"not an http(s) URL: {url!r}")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{u.scheme}://{host.lower()}:{port}"


def _read_private(path: Path) -> bytes:
    """``path``'s bytes; refused when others may read it or someone else owns it (as ssh).
    spoolq.credentials.read_file checks the same for the daemon's token; this script runs
    without the spoolq package (``python -IS``, builtin/__init__.script), so it keeps its own."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        why = "is a symbolic link" if e.errno == errno.ELOOP else f"cannot be read: {e.strerror}"
        raise BadSetup(f"{path} {why}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadSetup(f"{path} is not a regular file")
        if st.st_mode & 0o077:
            raise BadSetup(f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
        if st.st_uid not in (os.geteuid(), 0):
            raise BadSetup(f"{path} belongs to uid {st.st_uid}, not to this user")
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def auth_header(home: Path, dest: str) -> str | None:
    """The ``Authorization`` value for ``dest``'s origin from ``<home>/relay-credentials.json``
    (``{"<origin>": {"token": T} | {"token_file": PATH} | {"user": U, "password": P}}``),
    or None when the file or the origin's entry is absent."""
    path = home / CREDENTIALS_FILE
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        table = json.loads(_read_private(path))
    except ValueError as e:
        raise BadSetup(f"{path} is not valid JSON: {e}") from None
    if not isinstance(table, dict):
        raise BadSetup(f"{path} must hold a JSON object keyed by origin (http://host:port)")
    want = origin(dest)
    entry = next((v for k, v in table.items() if _origin_or_none(k) == want), None)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise BadSetup(f"{path}: the entry for {want} must be an object")
    token = entry.get("token")
    if isinstance(entry.get("token_file"), str):
        token = _read_private(Path(entry["token_file"])).decode("utf-8", "replace").strip()
    if isinstance(token, str) and token:
        value = f"Bearer {token}"
    elif isinstance(entry.get("user"), str) and isinstance(entry.get("password"), str):
        value = "Basic " + base64.b64encode(f"{entry['user']}:{entry['password']}".encode()).decode()
    else:
        raise BadSetup(f"{path}: the entry for {want} needs token, token_file, or user and password")
    if any(c in value for c in "\r\n\0"):
        raise BadSetup(f"{path}: the credential for {want} holds a line break")
    return value


def _origin_or_none(key: str) -> str | None:
    try:
        return origin(key)
    except BadSetup:
        return None


class Peer:
    """The far end: requests to its origin, with its credential, no redirect followed."""

    def __init__(self, queue_url: str, auth: str | None) -> None:
        self.origin = origin(queue_url)  # BadSetup for a URL that cannot be used
        u = urllib.parse.urlsplit(queue_url)
        cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        self.conn = cls(u.hostname or "", u.port, timeout=TIMEOUT)
        self.auth = auth
        self.reused = False  # the last answer said: a message made before for this relay key

    def close(self) -> None:
        self.conn.close()

    def request(self, method: str, url: str, body: Any = None, content_type: str | None = None,
                length: int | None = None, extra: dict[str, str] | None = None) -> tuple[int, bytes]:
        # The path only: requests (and the credential) go to the dest's origin even when the
        # far end names itself otherwise in its ids (a proxy, NAT, a wildcard address).
        u = urllib.parse.urlsplit(url)
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        headers = {"Connection": "keep-alive"}
        if content_type:
            headers["Content-Type"] = content_type
        if length is not None:
            headers["Content-Length"] = str(length)
        if self.auth:
            headers["Authorization"] = self.auth
        headers.update(extra or {})
        # No request is sent twice here: a POST whose answer was lost may have been done
        # (a commit, a prep), and only the state check of the next try may decide that.
        try:
            self.conn.request(method, path, body=body, headers=headers)
            res = self.conn.getresponse()
            self.reused = res.getheader("X-Spoolq-Reused") == "1"
            return res.status, res.read()
        except (OSError, http.client.HTTPException) as e:
            self.conn.close()
            raise SoftFail(f"could not talk to {self.origin}: {getattr(e, 'strerror', None) or e}") from None

    def json(self, method: str, url: str, body: Any = None, content_type: str | None = None,
             length: int | None = None, extra: dict[str, str] | None = None) -> Any:
        code, data = self.request(method, url, body, content_type, length, extra)
        if code == 404 and data.startswith(b"404 - Message ID not found"):
            raise Gone(url)
        if code != 200:
            raise SoftFail(f"HTTP {code} from {url}: {data[:200].decode('utf-8', 'replace')}")
        try:
            return json.loads(data)
        except ValueError:
            raise SoftFail(f"not JSON from {url}: {data[:200]!r}") from None

    def form(self, url: str, fields: dict[str, str], extra: dict[str, str] | None = None) -> Any:
        return self.json("POST", url, urllib.parse.urlencode(fields).encode(), "application/x-www-form-urlencoded",
                         extra=extra)

    def upload(self, url: str, fields: dict[str, str], path: Path) -> tuple[Any, str]:
        """POST ``path`` as multipart ``filedata``, streamed; (the answer, the file's md5)."""
        boundary = "spoolq" + secrets.token_hex(12)
        head = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                        for k, v in fields.items())
        name = path.name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        head += (f'--{boundary}\r\nContent-Disposition: form-data; name="filedata"; filename="{name}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        h = hashlib.md5()  # noqa: S324 - RQ's integrity check, not security
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size

            def body() -> Iterator[bytes]:
                yield head
                sent = 0
                while sent < size:
                    chunk = f.read(min(CHUNK, size - sent))
                    if not chunk:
                        raise SoftFail(f"{path.name} shrank while it was sent")
                    h.update(chunk)
                    sent += len(chunk)
                    yield chunk
                yield tail

            res = self.json("POST", url, body(), f"multipart/form-data; boundary={boundary}",
                            len(head) + size + len(tail))
        return res, h.hexdigest()


def _write_id(jobdir: Path, far: str) -> None:
    tmp = jobdir / (ID_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(far)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, jobdir / ID_FILE)
    fd = os.open(jobdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _attachments(msg_dir: Path) -> list[Path]:
    # Regular files only: a link in attach/ is not followed (spoolq never makes one there).
    attach = msg_dir / "attach"
    if attach.is_symlink() or not attach.is_dir():
        return []
    return sorted(p for p in attach.iterdir() if not p.is_symlink() and p.is_file() and not p.name.startswith("."))


def relay_key(msg: dict[str, Any]) -> str | None:
    """This message's key for the far end (``X-Spoolq-Relay-Key``): its queue, id and
    creation time, the same on every host of a shared store and on every try."""
    queue, msg_id = os.environ.get("SPOOLQ_QUEUE"), os.environ.get("SPOOLQ_MSG_ID")
    if not (queue and msg_id):
        return None
    return f"{queue}/{msg_id}@{msg.get('created_at', '')}"


def relay(msg_dir: Path, dest: str, jobdir: Path, home: Path) -> str:
    m = re.match(r"^(https?://[^/]+/q/[^/]+)", dest)
    if m is None:
        raise BadSetup(f"dest is not a queue URL: {dest!r}")
    queue_url = m.group(1)
    peer = Peer(queue_url, auth_header(home, queue_url))
    try:
        return _relay(peer, msg_dir, queue_url, jobdir)
    finally:
        peer.close()


def _far_state(peer: Peer, far: str) -> str:
    """The far message's state (``GET <far id>/state.json``); Gone when it has none."""
    try:
        res = peer.json("GET", far + "/state.json")
    except Gone:
        raise Gone(far) from None
    if not (isinstance(res, list) and res and isinstance(res[0], str)):
        raise SoftFail(f"unexpected state answer for {far}: {res!r}")
    return res[0]


def _relay(peer: Peer, msg_dir: Path, queue_url: str, jobdir: Path) -> str:
    id_file = jobdir / ID_FILE
    far = id_file.read_text().strip() if id_file.exists() else ""
    print(f"{os.getpid()} - attempting remote {queue_url}", flush=True)  # RQ's log line
    if far:
        state = _far_state(peer, far)
        if state != "prep":
            print(f"{os.getpid()} - {far} is already committed ({state}): not sent again", flush=True)
            return far
    else:
        msg = json.loads((msg_dir / "msg").read_text())
        msg["count"] = int(msg.get("count") or 0) + 1
        # The far message names the first of the chain (RQ keeps it in msg; spoolq gives it
        # to the script as RQ_ORIG_MSG_ID: this message's own full id when it is the first).
        msg["orig_msg_id"] = msg.get("orig_msg_id") or os.environ.get("RQ_ORIG_MSG_ID", "")
        mesg = {k: msg[k] for k in KEYS if k in msg}
        mesg["_method"] = "prep"
        key = relay_key(msg)
        res = peer.form(queue_url + "/new_message", {"x_format": "json", "mesg": json.dumps(mesg)},
                        extra={"X-Spoolq-Relay-Key": key} if key else None)
        if not (isinstance(res, list) and len(res) > 1 and res[0] == "ok" and isinstance(res[1], str)):
            raise SoftFail(f"could not queue the message: {res!r}")
        far = res[1]
        _write_id(jobdir, far)
        if peer.reused:  # a spoolq far end knew this message (another host of ours sent it)
            state = _far_state(peer, far)
            if state != "prep":
                print(f"{os.getpid()} - {far} was made and committed by an earlier try ({state})", flush=True)
                return far
        status(f"run prepared {far}")
    short = far.rstrip("/").rsplit("/", 1)[-1]
    for path in _attachments(msg_dir):
        res, md5 = peer.upload(far + "/attach/new", {"x_format": "json", "pathname": path.name, "msg_id": short},
                               path)
        if isinstance(res, list) and res[:2] == ["fail", "cannot find message"]:
            raise Gone(far)
        if not (isinstance(res, list) and res and res[0] == "ok"):
            raise SoftFail(f"could not attach {path.name}: {res!r}")
        said = res[1] if len(res) > 1 else None  # ["ok"] alone says no md5
        if said != f"{md5}-Attached successfully":
            raise SoftFail(f"md5 mismatch for {path.name}: {said!r}")
    res = peer.form(far, {"x_format": "json", "_method": "commit", "msg_id": short})
    if isinstance(res, list) and res[:2] == ["fail", "cannot find message"]:
        # RQ's answer to a commit of a committed message too (an earlier commit whose answer
        # was lost): only a far end that no longer has it makes it gone.
        if _far_state(peer, far) != "prep":
            return far
        raise Gone(far)
    if not (isinstance(res, list) and res and res[0] == "ok"):
        raise SoftFail(f"could not commit {far}: {res!r}")
    return far


def backoff() -> int:
    """Seconds per count² between tries: 10 (RQ's), or the relay queue's ``env_vars``
    ``RELAY_BACKOFF`` (0-3600)."""
    try:
        return max(0, min(3600, int(os.environ.get("RELAY_BACKOFF", "10"))))
    except ValueError:
        return 10


class OutOfTime(OSError):
    """The queue's timeout is near: give up this try (a retry later) rather than be killed
    by the daemon, which ends the message in err (audit: a slow far end)."""


def _out_of_time(signum: int, frame: object) -> None:
    raise OutOfTime("the far end is too slow: giving this try up before the queue's timeout")


def _give_up_before_the_timeout(timeout: str) -> None:
    """An alarm a little before the queue's timeout (``SPOOLQ_TIMEOUT``), again every second
    after (a connect's loop over addresses takes one OSError as one address's failure)."""
    try:
        secs = float(timeout)
    except ValueError:
        return
    if secs > 0:
        signal.signal(signal.SIGALRM, _out_of_time)
        # The last tenth of the time, at most a minute, is left for the kill not to come.
        signal.setitimer(signal.ITIMER_REAL, max(0.5, secs - min(60.0, secs / 10)), 1.0)


def main() -> int:
    count = int(os.environ.get("RQ_COUNT", "0") or 0)
    if count > 15:
        status("err RQ_COUNT > 15 FAIL")
        return 0
    dest = os.environ.get("RQ_DEST", "")
    print(f"{os.getpid()} - dest - {dest}", flush=True)
    if os.environ.get("RQ_FORCE_REMOTE") == "1":
        print(f"{os.getpid()} - FORCE REMOTE", flush=True)  # RQ's log line; its tests look for it
    msg_dir = Path(os.environ.get("SPOOLQ_MESSAGE_DIR", ".."))
    home = Path(os.environ.get("SPOOLQ_ROOT", "."))
    jobdir = Path.cwd()
    _give_up_before_the_timeout(os.environ.get("SPOOLQ_TIMEOUT", ""))
    try:
        try:
            far = relay(msg_dir, dest, jobdir, home)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)  # before any handler below runs
    except BadSetup as e:
        status(f"err {e}")
        return 0
    except Gone as e:
        (jobdir / ID_FILE).unlink(missing_ok=True)
        status(f"resend 0-Remote message [{e}] disappeared. Getting new id.")
        return 0
    except (SoftFail, OSError) as e:
        status(f"resend {count * count * backoff()}-{e}")
        return 0
    # relay_id stays: had the daemon died before it recorded this answer, the next try must
    # find the far message committed rather than make another.
    status(f"relayed {far}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
