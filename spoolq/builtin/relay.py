"""The ``relay`` queue's script: deliver a message to a queue on another RQ or spoolq over
HTTP, RQ's way (rq-spec 5.2, RQ's ``default_scripts/relay/relay_script.rb``), in Python.

The message's ``dest`` is the far queue's URL (``http://host:port/q/<name>``). Steps, each
safe to repeat after a crash or a failed try:

1. **prep** on the far end (``POST <queue URL>/new_message``, form ``x_format=json``,
   ``mesg`` = the message's ``dest src count+1 max_count param1..4 post_run_webhook
   orig_msg_id`` as JSON, ``_method=prep``). The far id it answers is kept in ``relay_id``
   in the message's ``job/`` directory (it stays with the message across tries), so a
   retry reuses it instead of making a second far message.
2. each attachment (``POST <far id>/attach/new``, multipart ``filedata``), its md5 checked
   against the far end's answer (``<md5>-Attached successfully``);
3. **commit** (``POST <far id>``, ``_method=commit``).

Then ``relayed <far full id>``. A far message that disappeared (``cannot find message``)
is made again; anything else that fails asks to be run again after ``count² × 10`` s
(RQ's backoff), and the message goes to err once ``count`` passes 15.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

TIMEOUT = 60.0
KEYS = ("dest", "src", "count", "max_count", "param1", "param2", "param3", "param4", "post_run_webhook",
        "orig_msg_id")
ID_FILE = "relay_id"


class SoftFail(Exception):
    pass


class Gone(Exception):
    """The far message is not there any more: make a new one."""


def status(line: str) -> None:
    os.write(3, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
    print(f"{os.getpid()} - {time.strftime('%Y-%m-%d %H:%M:%S')} - {line}", flush=True)


def post(url: str, body: bytes, content_type: str) -> Any:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as res:  # noqa: S310 - http(s) only, checked
            data = res.read()
    except urllib.error.HTTPError as e:
        raise SoftFail(f"HTTP {e.code} from {url}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise SoftFail(f"could not connect to {url}: {getattr(e, 'reason', e)}") from None
    try:
        return json.loads(data)
    except ValueError:
        raise SoftFail(f"not JSON from {url}: {data[:200]!r}") from None


def form(url: str, fields: dict[str, str]) -> Any:
    return post(url, urllib.parse.urlencode(fields).encode(), "application/x-www-form-urlencoded")


def multipart(url: str, fields: dict[str, str], path: Path) -> Any:
    boundary = "spoolq" + secrets.token_hex(12)
    parts: list[bytes] = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    name = path.name.replace('"', "_")
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="filedata"; filename="{name}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode())
    body = b"".join(parts) + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return post(url, body, f"multipart/form-data; boundary={boundary}")


def md5_of(path: Path) -> str:
    h = hashlib.md5()  # noqa: S324 - RQ's integrity check, not security
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def relay(msg_dir: Path, dest: str, jobdir: Path) -> str:
    m = re.match(r"^(https?://[^/]+/q/[^/]+)", dest)
    if m is None:
        raise ValueError(f"dest is not a queue URL: {dest!r}")
    queue_url = m.group(1)
    id_file = jobdir / ID_FILE
    far = id_file.read_text().strip() if id_file.exists() else ""
    print(f"{os.getpid()} - attempting remote {queue_url}", flush=True)  # RQ's log line
    if not far:
        msg = json.loads((msg_dir / "msg").read_text())
        msg["count"] = int(msg.get("count") or 0) + 1
        # The far message names the first of the chain (RQ keeps it in msg; spoolq gives it
        # to the script as RQ_ORIG_MSG_ID: this message's own full id when it is the first).
        msg["orig_msg_id"] = msg.get("orig_msg_id") or os.environ.get("RQ_ORIG_MSG_ID", "")
        mesg = {k: msg[k] for k in KEYS if k in msg}
        mesg["_method"] = "prep"
        res = form(queue_url + "/new_message", {"x_format": "json", "mesg": json.dumps(mesg)})
        if not (isinstance(res, list) and res and res[0] == "ok" and len(res) > 1):
            raise SoftFail(f"could not queue the message: {res!r}")
        far = str(res[1])
        tmp = jobdir / (ID_FILE + ".tmp")
        tmp.write_text(far)
        os.replace(tmp, id_file)
        status(f"run prepared {far}")
    short = far.rstrip("/").rsplit("/", 1)[-1]
    attach = msg_dir / "attach"
    # Regular files only: a link in attach/ is not followed (spoolq never makes one there).
    for path in sorted(p for p in attach.iterdir() if not p.is_symlink() and p.is_file()
                       and not p.name.startswith(".")) if attach.is_dir() and not attach.is_symlink() else ():
        res = multipart(far + "/attach/new", {"x_format": "json", "pathname": path.name, "msg_id": short}, path)
        if isinstance(res, list) and res[:2] == ["fail", "cannot find message"]:
            raise Gone(far)
        if not (isinstance(res, list) and res and res[0] == "ok"):
            raise SoftFail(f"could not attach {path.name}: {res!r}")
        if res[1] != f"{md5_of(path)}-Attached successfully":
            raise SoftFail(f"md5 mismatch for {path.name}: {res[1]!r}")
    res = form(far, {"x_format": "json", "_method": "commit", "msg_id": short})
    if isinstance(res, list) and res[:2] == ["fail", "cannot find message"]:
        raise Gone(far)
    if not (isinstance(res, list) and res and res[0] == "ok"):
        raise SoftFail(f"could not commit {far}: {res!r}")
    return far


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
    jobdir = Path.cwd()
    try:
        far = relay(msg_dir, dest, jobdir)
    except ValueError as e:
        status(f"err {e}")
        return 0
    except Gone as e:
        (jobdir / ID_FILE).unlink(missing_ok=True)
        status(f"resend 0-Remote message [{e}] disappeared. Getting new id.")
        return 0
    except (SoftFail, OSError) as e:
        status(f"resend {count * count * 10}-{e}")
        return 0
    (jobdir / ID_FILE).unlink(missing_ok=True)
    status(f"relayed {far}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
