"""The hardening audit's attacks on the HTTP side, each replayed (issue 7, items 1-7).

Most run against the app in process; the ones about sockets, headers on the wire and the
daemon's token file run against a real server thread or the real ``spoolq serve``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import fs
from daemon_util import serve_fixture
from fastapi.testclient import TestClient
from http_helpers import AUTH, SPOOLQ, TOKEN, daemon, free_port

import spoolq
from spoolq.http import auth
from spoolq.http.app import create_app
from spoolq.http.server import start_http
from spoolq.model import RetryPolicy, State
from spoolq.store.base import AttachmentSource

API = "/api/v1"
LOCAL = "http://127.0.0.1:3333"
EVIL = {"name": "x", "script": "/etc/hostname", "exec_prefix": 'sh -c "id > /tmp/out"'}


@pytest.fixture
def client(root: Path) -> spoolq.Client:
    c = spoolq.open(root)
    c.create_queue("work", script="/bin/true")
    return c


@pytest.fixture
def serve(root: Path) -> Iterator[Any]:
    yield from serve_fixture(root)


def anon(client: spoolq.Client, level: str = "rq", **kw: Any) -> TestClient:
    """The app as any local process reaches it: loopback, no credentials."""
    return TestClient(create_app(client, TOKEN, anonymous=level, **kw), base_url=LOCAL)


# -- 1. changing what a queue executes needs the token, on loopback too ------------------------
def test_no_queue_changes_without_the_token(client: spoolq.Client) -> None:
    http = anon(client)
    before = client.queue_config("work").to_dict()
    attempts = [
        ("POST", f"{API}/queues", EVIL),
        ("PATCH", f"{API}/queues/work/config", {"exec_prefix": 'sh -c "id > /tmp/out"'}),
        ("PATCH", f"{API}/queues/work/config", {"env_vars": {"LD_PRELOAD": "/tmp/evil.so"}}),
        ("PATCH", f"{API}/queues/work/config", {"env_vars": {"BASH_ENV": "/tmp/x", "PATH": "/tmp"}}),
        ("PATCH", f"{API}/queues/work/config", {"script": "/bin/sh"}),
        ("PATCH", f"{API}/queues/work/config", {"kind": "script"}),
        ("DELETE", f"{API}/queues/work?force=true", None),
        ("POST", f"{API}/queues/work/pause", None),
    ]
    for method, url, body in attempts:
        r = http.request(method, url, json=body)
        assert r.status_code == 401, (method, url, r.status_code, r.text)
        assert r.json()["error"]["code"] == "unauthorized"
    # The UI's forms are refused too (a browser is sent to sign in), before the form is read.
    http.cookies.set("spoolq_csrf", "c" * 40)
    r = http.post("/ui/new_queue", data={"name": "x", "script": "/etc/hostname", "csrf": "c" * 40},
                  headers={"Accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    r = http.post("/ui/q/work", data={"action": "config", "config": json.dumps({"exec_prefix": "sh -c id"})})
    assert r.status_code == 401
    assert client.queues() == ["work"] and client.queue_config("work").to_dict() == before
    assert client.admin_state("work") == "UP"
    # With the token all of it works.
    r = http.post(f"{API}/queues", json={"name": "y", "script": "/bin/true"}, headers=AUTH)
    assert r.status_code == 201


def test_anonymous_levels(client: spoolq.Client) -> None:
    mid = client.send("work", param1="a").msg_id
    rq_send = ("POST", "/q/work/new_message", {"data": {"mesg": "{}"}})
    api_send: tuple[str, str, dict[str, Any]] = ("POST", f"{API}/queues/work/messages", {"json": {}})
    read: tuple[str, str, dict[str, Any]] = ("GET", f"{API}/queues/work/messages/{mid}", {})
    create = ("POST", f"{API}/queues", {"json": {"name": "made", "script": "/bin/true"}})
    expected = {  # level -> allowed requests
        "none": set(),
        "read": {"read"},
        "rq": {"read", "rq_send"},
        "all": {"read", "rq_send", "api_send", "create"},
    }
    for level, allowed in expected.items():
        http = anon(client, level)
        for name, (method, url, kw) in {"rq_send": rq_send, "api_send": api_send, "read": read,
                                        "create": create}.items():
            r = http.request(method, url, **kw)
            if name in allowed:
                assert r.status_code < 400, (level, name, r.status_code, r.text)
            else:
                assert r.status_code == 401, (level, name, r.status_code, r.text)
        assert http.get("/healthz").status_code == 200, "public whatever the level"
    client.delete_queue("made", force=True)


def test_off_loopback_anonymous_gets_nothing(client: spoolq.Client) -> None:
    h = start_http(client, "0.0.0.0", free_port(), TOKEN, anonymous="all")
    try:
        url = f"http://127.0.0.1:{h.port}"
        assert httpx.get(url + "/healthz").status_code == 200
        assert httpx.get(url + f"{API}/queues").status_code == 401
        assert httpx.post(url + "/q/work/new_message", data={"mesg": "{}"}).status_code == 401
        assert httpx.get(url + f"{API}/queues", headers=AUTH).status_code == 200
    finally:
        h.stop()


def test_the_audit_repro_runs_nothing(tmp_path: Path) -> None:
    """The audit's exact attack against the real daemon: no token, a queue whose prefix runs
    ``id``, one message. Nothing may run; the daemon made a 0600 token file."""
    root = tmp_path / "spool"
    root.mkdir()
    out = tmp_path / "out"
    evil = dict(EVIL, exec_prefix=f'sh -c "id > {out}"')
    with daemon(root, free_port(), token=None) as url:
        token_file = root / "token"
        st = token_file.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
        token = token_file.read_text().strip()
        assert len(token) >= 32
        r = httpx.post(url + f"{API}/queues", json=evil)
        assert r.status_code == 401
        c = spoolq.open(root)
        c.create_queue("victim", script="/bin/true")
        r = httpx.patch(url + f"{API}/queues/victim/config", json={"exec_prefix": evil["exec_prefix"]})
        assert r.status_code == 401
        ok, full_id = httpx.post(url + "/q/victim/new_message", data={"mesg": "{}"}).json()
        assert ok == "ok", "RQ's message routes stay open on loopback"
        assert c.wait(full_id, 30).state == State.DONE
        assert not out.exists(), "the attacker's command ran"
        # The token holder can; the CLI reads the same file.
        r = httpx.get(url + f"{API}/queues", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        link = subprocess.run([SPOOLQ, "--root", str(root), "login-url"], capture_output=True, text=True,
                              timeout=30, env={k: v for k, v in os.environ.items() if k != "SPOOLQ_TOKEN"})
        assert link.returncode == 0, link.stderr
        assert link.stdout.startswith(url + "/login?code=")
        with httpx.Client() as browser:
            first = browser.get(link.stdout.strip(), follow_redirects=False)
            assert first.status_code == 303 and "spoolq_session" in first.cookies
            second = httpx.get(link.stdout.strip(), follow_redirects=False)
            assert second.status_code == 401, "a sign-in link works once"


@pytest.mark.skipif(os.geteuid() != 0, reason="root making a code for another user's daemon needs root")
def test_login_url_as_root_follows_no_link_swapped_in_for_the_login_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """root runs ``login-url`` for a daemon of another user, who owns the spool root and so
    can swap ``login/`` for a link to any directory between root's check and its use. The
    sweep of spent codes then listed and deleted the link's files, and the new code was
    made there, as root. Now everything is done through one fd on the checked directory."""
    from spoolq import credentials

    root = tmp_path / "spool"
    root.mkdir()
    os.chown(root, 12345, 12345)  # the daemon's user, not root
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.conf").write_text("keep me\n")
    real_listdir = os.listdir

    def swap_then_list(path: Any = ".") -> list[str]:
        # The daemon's user wins the race: login/ is moved aside and a link takes its place.
        login = root / "login"
        if login.is_dir() and not login.is_symlink():
            os.rename(login, root / "login.real")
            os.symlink(victim, login)
        return real_listdir(path)

    monkeypatch.setattr(credentials.os, "listdir", swap_then_list)
    code = credentials.mint_login_code(root, 600)
    monkeypatch.undo()
    assert (victim / "important.conf").read_text() == "keep me\n"
    assert real_listdir(victim) == ["important.conf"], "nothing made in the link's directory"
    made = root / "login.real" / credentials._code_name(code)
    assert made.is_file() and made.stat().st_uid == 12345


def test_login_url_sends_the_token_nowhere(tmp_path: Path) -> None:
    """While the daemon is down, another program holds its port: ``login-url`` must not hand
    it the token. The code is made on disk and works once the daemon is back."""
    root = tmp_path / "spool"
    root.mkdir()
    port = free_port()
    (root / "config.json").write_text(json.dumps({"host": "127.0.0.1", "port": port}))
    (root / "token").write_text(TOKEN + "\n")
    (root / "token").chmod(0o600)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", port))
    squatter.listen(8)
    squatter.settimeout(0.5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOOLQ_")}
    try:
        link = subprocess.run([SPOOLQ, "--root", str(root), "login-url", "--ttl", "600"], capture_output=True,
                              text=True, timeout=30, env=env)
        assert link.returncode == 0, link.stderr
        with pytest.raises(TimeoutError):
            squatter.accept()  # nobody called
    finally:
        squatter.close()
    url = link.stdout.strip()
    assert url.startswith(f"http://127.0.0.1:{port}/login?code=") and TOKEN not in url
    d = root / "login"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    with daemon(root, port):
        first = httpx.get(url, follow_redirects=False)
        assert first.status_code == 303 and "spoolq_session" in first.cookies
        assert httpx.get(url, follow_redirects=False).status_code == 401, "a sign-in link works once"
        # An expired code, and one in a directory others may write, sign nobody in.
        old = subprocess.run([SPOOLQ, "--root", str(root), "login-url", "--ttl", "0.001"], capture_output=True,
                             text=True, timeout=30, env=env).stdout.strip()
        assert httpx.get(old, follow_redirects=False).status_code == 401
        os.mkfifo(d / "fifo")  # debris in login/ must not hang the next login-url
        planted = subprocess.run([SPOOLQ, "--root", str(root), "login-url"], capture_output=True, text=True,
                                 timeout=30, env=env).stdout.strip()
        assert not (d / "fifo").exists()
        d.chmod(0o777)
        assert httpx.get(planted, follow_redirects=False).status_code == 401
        d.chmod(0o700)


def test_bad_serve_settings_are_clear_errors(tmp_path: Path) -> None:
    """An unknown SPOOLQ_ANONYMOUS, a FIFO as token file: one line and exit 2, no traceback, no hang."""
    root = tmp_path / "spool"
    fifo = tmp_path / "token.fifo"
    os.mkfifo(fifo)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SPOOLQ_")}
    for extra in ({"SPOOLQ_ANONYMOUS": "bogus"}, {"SPOOLQ_TOKEN_FILE": str(fifo)}):
        r = subprocess.run([SPOOLQ, "--root", str(root), "serve", "--port", str(free_port())],
                           env={**base, **extra}, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (extra, r.stderr)
        assert r.stderr.startswith("spoolq: "), r.stderr


def test_serve_prints_a_sign_in_link(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    root.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOOLQ_")}
    env["SPOOLQ_TOKEN"] = TOKEN
    proc = subprocess.Popen([SPOOLQ, "--root", str(root), "serve", "--port", str(port)], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = ""
        for line in proc.stderr:  # noqa: B007 - the line is used after the loop
            if "login?code=" in line:
                break
        link = line.split("sign in once with ", 1)[1].split()[0]
        r = httpx.get(link, follow_redirects=False)
        assert r.status_code == 303 and "spoolq_session" in r.cookies
        assert TOKEN not in line, "the token itself is never printed"
    finally:
        proc.terminate()
        proc.wait(30)


# -- 2. nothing is read before authentication; caps on what is read -----------------------------
def _raw(port: int, head: bytes, body: bytes = b"", read_timeout: float = 10.0) -> bytes:
    """Send a request head (and part of a body) on a raw socket; return the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(head + body)
        chunks = []
        try:
            while data := s.recv(65536):
                chunks.append(data)
                if b"\r\n\r\n" in b"".join(chunks) and b"content-length: 0" not in b"".join(chunks).lower():
                    joined = b"".join(chunks)
                    hdr, _, rest = joined.partition(b"\r\n\r\n")
                    for line in hdr.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:") and len(rest) >= int(line.split(b":")[1]):
                            return joined
        except TimeoutError:
            pass
        return b"".join(chunks)


@pytest.fixture
def server(client: spoolq.Client, tmp_path: Path) -> Any:
    h = start_http(client, "127.0.0.1", free_port(), TOKEN)
    yield h
    h.stop()


def _uploads(client: spoolq.Client) -> list[str]:
    d = Path(fs(client).root) / ".uploads"
    return os.listdir(d) if d.is_dir() else []


def test_login_refuses_big_bodies_before_reading_them(server: Any, client: spoolq.Client) -> None:
    # The audit: 400 fields of 2 MiB (RSS 163 -> 964 MB), a 1 GiB file part (886 MB spooled).
    boundary = b"xyz"
    head = (b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
            b"Content-Length: 1073741824\r\n\r\n")
    part = b"--" + boundary + b'\r\nContent-Disposition: form-data; name="f"; filename="a.bin"\r\n\r\n' + b"x" * 65536
    answer = _raw(server.port, head, part)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert _uploads(client) == [], "nothing of an unauthenticated body reaches the disk"
    # Without a Content-Length (chunked), the cap holds while it streams.
    chunk = b"a=" + b"b" * 8000
    head = (b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    answer = _raw(server.port, head, b"%x\r\n%s\r\n" % (len(chunk), chunk))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


@pytest.mark.parametrize("types", [("application/json", "multipart/form-data; boundary=x"),
                                   ("multipart/form-data; boundary=x", "application/json")])
def test_two_content_types_are_refused_before_the_body(server: Any, client: spoolq.Client,
                                                       types: tuple[str, str]) -> None:
    """The body cap went by the last Content-Type and RQ's ``new_message`` by the first: JSON
    first and multipart last sent an anonymous 300 MiB body into memory (audit: RSS 64 ->
    809 MB). A request with two types is refused before its body is read."""
    client.create_queue("q1", script="/bin/true")
    head = (f"POST /q/q1/new_message HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {types[0]}\r\n"
            f"Content-Type: {types[1]}\r\nContent-Length: 314572800\r\n\r\n").encode()
    answer = _raw(server.port, head, b" " * 65536)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"more than one Content-Type" in answer
    assert client.counts("q1")["que"] == 0


def test_protected_routes_refuse_before_the_body(server: Any, client: spoolq.Client) -> None:
    for path in (f"{API}/queues/work/messages", "/ui/q/work/new_message", f"{API}/queues"):
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 1073741824\r\n\r\n").encode()
        answer = _raw(server.port, head, b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; "
                      b"filename=\"a\"\r\n\r\n" + b"x" * 65536)
        assert answer.startswith(b"HTTP/1.1 401"), (path, answer[:200])
    assert _uploads(client) == []
    assert client.counts("work")["que"] == 0


def test_form_fields_are_capped(client: spoolq.Client) -> None:
    http = TestClient(create_app(client, TOKEN), base_url=LOCAL, headers=AUTH)
    many = [(f"f{i}", ("", b"x")) for i in range(101)]
    r = http.post("/q/work/new_message", files=many)
    assert r.status_code == 400 and "too many form parts" in r.text
    big = [("mesg", (None, b"{}")), *[(f"pad{i}", (None, b"x" * (512 * 1024))) for i in range(5)]]
    r = http.post("/q/work/new_message", files=big)
    assert r.status_code == 413, r.text
    hdr = http.post("/q/work/new_message", content=b"--b\r\nContent-Disposition: form-data; name=\"" + b"n" * 9000
                    + b"\"\r\n\r\nv\r\n--b--\r\n", headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert hdr.status_code == 400, hdr.text
    assert client.counts("work")["que"] == 0


def test_stalled_headers_and_bodies_are_cut_off(client: spoolq.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from spoolq.http import limits, protocol

    monkeypatch.setattr(protocol.GuardedH11Protocol, "header_timeout", 0.5)
    monkeypatch.setattr(limits, "BODY_IDLE_TIMEOUT", 0.5)
    h = start_http(client, "127.0.0.1", free_port(), TOKEN)
    try:
        for partial in (b"", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"):
            with socket.create_connection(("127.0.0.1", h.port), timeout=30) as s:
                s.sendall(partial)
                assert s.recv(100) == b"", "the server closed the connection"
        # A body that stops half-way gets 408 and the connection is closed.
        head = (f"POST {API}/queues/work/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        answer = _raw(h.port, head.encode(), b'{"param1": ', read_timeout=30)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        # Kept-alive connections still work.
        with httpx.Client(base_url=f"http://127.0.0.1:{h.port}") as c:
            assert c.get("/healthz").status_code == 200 and c.get("/healthz").status_code == 200
    finally:
        h.stop()


def test_trickled_bodies_are_cut_off(client: spoolq.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A byte at a time, never idle long enough for the idle timeout: 408 once the average
    rate stays under the floor past the grace period."""
    from spoolq.http import limits

    monkeypatch.setattr(limits, "BODY_GRACE", 0.3)
    monkeypatch.setattr(limits, "MIN_BODY_RATE", 1000.0)
    h = start_http(client, "127.0.0.1", free_port(), TOKEN)
    try:
        # 20 KB at once buys no licence to trickle: the rate is taken per window.
        head = (f"POST {API}/queues/work/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
                f"Content-Length: 100000\r\n\r\n")
        with socket.create_connection(("127.0.0.1", h.port), timeout=30) as s:
            s.sendall(head.encode() + b" " * 20_000)
            answer = b""
            deadline = time.monotonic() + 20
            while not answer and time.monotonic() < deadline:
                try:
                    s.sendall(b" ")
                except OSError:
                    break  # closed on us: the answer is waiting
                s.settimeout(0.1)
                try:
                    answer = s.recv(200)
                except TimeoutError:
                    continue
            answer = answer or s.recv(200)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert client.counts("work")["que"] == 0
    finally:
        h.stop()


# -- 3. /metrics labels come from a fixed set ---------------------------------------------------
def test_metrics_labels_are_bounded(server: Any) -> None:
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        for i in range(50):
            s.sendall(f"X{'M' * 2000}{i} /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            s.recv(4096)
    text = httpx.get(f"{server.url}/metrics").text
    lines = [ln for ln in text.splitlines() if ln.startswith("spoolq_http_requests_total{")]
    assert not any("MMMM" in ln for ln in lines), "a made-up method became a label"
    methods = {ln.split('method="')[1].split('"')[0] for ln in lines}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    assert any('route="/healthz"' in ln for ln in lines)
    assert len(text) < 20_000


# -- 4. symbolic links out of a message are never followed --------------------------------------
def test_symlinks_in_a_message_are_not_served(client: spoolq.Client, tmp_path: Path) -> None:
    http = TestClient(create_app(client, TOKEN), base_url=LOCAL)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    mid = client.send("work", param1="x").msg_id
    mdir = fs(client).message_dir("work", mid)
    (mdir / "attach").mkdir()
    (mdir / "attach" / "passwd.txt").symlink_to(secret)
    (mdir / "attach" / ".passwd.txt.json").write_text(json.dumps({"md5": "0", "size": 11}))
    (mdir / "job").mkdir()
    (mdir / "job" / "stdio.log").symlink_to(secret)
    (mdir / "job" / "other.log").symlink_to(secret)
    urls = [f"{API}/queues/work/messages/{mid}/attachments/passwd.txt", f"/q/work/{mid}/attach/passwd.txt",
            f"{API}/queues/work/messages/{mid}/log", f"/q/work/{mid}/log/stdio.log", f"/q/work/{mid}/log/other.log"]
    for url in urls:
        r = http.get(url)
        assert r.status_code == 404 and "root:x" not in r.text, (url, r.status_code, r.text)
    # A job/ directory that is itself a link, and a message directory swapped for a link.
    (mdir / "job" / "stdio.log").unlink()
    (mdir / "job" / "other.log").unlink()
    (mdir / "job").rmdir()
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "stdio.log").write_text("root:x:0:0\n")
    (mdir / "job").symlink_to(tmp_path / "fake")
    assert http.get(f"/q/work/{mid}/log/stdio.log").status_code == 404
    with http.stream("GET", f"{API}/queues/work/messages/{mid}/log/stream") as stream:
        assert stream.status_code == 200
    # Real files are still served.
    (mdir / "job").unlink()
    (mdir / "job").mkdir()
    (mdir / "job" / "stdio.log").write_text("fine\n")
    assert http.get(f"/q/work/{mid}/log/stdio.log").text == "fine\n"


def test_hard_links_in_a_message_are_not_served(client: spoolq.Client, root: Path, tmp_path: Path) -> None:
    """A script (or an archive it unpacks) hard-links the daemon's token into its message:
    a second link is refused like a symbolic one, except an attachment spoolq linked itself."""
    http = TestClient(create_app(client, TOKEN), base_url=LOCAL)
    secret = root / "token"
    secret.write_text("s3cret-token-value-xyz\n")
    secret.chmod(0o600)
    mid = client.send("work", param1="x").msg_id
    client.store.move("work", mid, State.QUE, State.DONE)  # final: the log stream ends
    mdir = fs(client).message_dir("work", mid)
    (mdir / "attach").mkdir()
    os.link(secret, mdir / "attach" / "t.txt")
    (mdir / "attach" / ".t.txt.json").write_text(json.dumps({"md5": "0", "size": 23}))
    (mdir / "job").mkdir()
    os.link(secret, mdir / "job" / "stdio.log")
    os.link(secret, mdir / "job" / "other.log")
    for url in (f"{API}/queues/work/messages/{mid}/attachments/t.txt", f"/q/work/{mid}/attach/t.txt",
                f"{API}/queues/work/messages/{mid}/log", f"/q/work/{mid}/log/stdio.log",
                f"/q/work/{mid}/log/other.log"):
        r = http.get(url)
        assert r.status_code == 404 and "s3cret" not in r.text, (url, r.status_code, r.text)
    with http.stream("GET", f"{API}/queues/work/messages/{mid}/log/stream") as stream:
        assert "s3cret" not in stream.read().decode()
    out = subprocess.run([SPOOLQ, "--root", str(root), "log", f"work/{mid}"], capture_output=True, text=True)
    assert "s3cret" not in out.stdout
    # What spoolq linked on request (send --link) is still served, though it has two links.
    mine = tmp_path / "mine.txt"
    mine.write_text("my data\n")
    linked = client.send("work", attachments=[AttachmentSource(path=str(mine), link=True)]).msg_id
    assert os.stat(mine).st_nlink == 2
    assert http.get(f"/q/work/{linked}/attach/mine.txt").text == "my data\n"


def test_clone_copies_no_link_a_script_left(client: spoolq.Client, root: Path) -> None:
    """A clone rebuilt attachments from their paths, following links: the copy then served
    the token as a plain file. Now it copies through the same no-link walk."""
    http = anon(client)
    _file(root / "token", TOKEN + "\n").chmod(0o600)
    mid = client.send("work", attachments=[_file(root.parent / "real.txt", "real\n")]).msg_id
    client.store.move("work", mid, State.QUE, State.DONE)
    adir = fs(client).message_dir("work", mid) / "attach"
    (adir / "sym.txt").symlink_to(root / "token")
    os.link(root / "token", adir / "hard.txt")
    ok, full = http.post(f"/q/work/{mid}/clone", data={"x_format": "json"}).json()
    assert ok == "ok", full
    new = full.rsplit("/", 1)[1]
    assert set(client.get(f"work/{new}").attachments) == {"real.txt"}
    for name in ("sym.txt", "hard.txt"):
        assert TOKEN not in http.get(f"/q/work/{new}/attach/{name}").text


def test_dup_copies_no_link_a_script_left(client: spoolq.Client, root: Path, tmp_path: Path, serve: Any) -> None:
    script = tmp_path / "leak.sh"
    script.write_text("#!/bin/bash\nln -s \"$SECRET\" ../attach/sym.txt\nln \"$SECRET\" ../attach/hard.txt\n"
                      "echo \"dup 0-X-other\" >&3\nread -r reply <&4\necho \"$reply\" > reply\n"
                      "echo \"done dup sent\" >&3\n")
    script.chmod(0o755)
    _file(root / "token", TOKEN + "\n").chmod(0o600)
    client.create_queue("leak", script=str(script), env_vars={"SECRET": str(root / "token")})
    client.create_queue("other", script="/bin/true")
    client.set_admin_state("other", "PAUSE")
    serve()
    r = client.send("leak", attachments=[_file(tmp_path / "real.txt", "real\n")])
    assert client.wait(r, 30).status == "done - dup sent"
    (dup,) = client.list("other", State.QUE).items
    assert set(dup.attachments) == {"real.txt"}
    assert {"sym.txt", "hard.txt"} <= set(client.get(r).attachments), "the script did plant both links"


def _file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_sockets_left_in_a_message_are_404s(client: spoolq.Client, tmp_path: Path) -> None:
    http = TestClient(create_app(client, TOKEN), base_url=LOCAL, headers=AUTH)
    mid = client.send("work").msg_id
    client.store.move("work", mid, State.QUE, State.DONE)
    mdir = fs(client).message_dir("work", mid)
    for sub, name in (("job", "stdio.log"), ("job", "agent.log"), ("attach", "sock")):
        (mdir / sub).mkdir(exist_ok=True)
        short = Path(tempfile.mkdtemp(dir="/tmp")) / "s"  # a socket's path has ~100 bytes at most
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(short))
        s.close()
        os.rename(short, mdir / sub / name)
    for url in (f"/q/work/{mid}/log/stdio.log", f"/q/work/{mid}/log/agent.log", f"/q/work/{mid}/attach/sock",
                f"{API}/queues/work/messages/{mid}/log"):
        assert http.get(url).status_code == 404, url
    out = subprocess.run([SPOOLQ, "--root", str(fs(client).root), "log", f"work/{mid}"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr


def test_a_linked_attach_directory_is_not_listed(client: spoolq.Client, tmp_path: Path) -> None:
    """``attach/`` made a symbolic link to /etc: the message's listing names nothing there."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "shadow").write_text("x" * 1234)
    mid = client.send("work").msg_id
    mdir = fs(client).message_dir("work", mid)
    (mdir / "attach").symlink_to(tmp_path / "etc")
    assert client.get(f"work/{mid}").attachments == {}
    (mdir / "attach").unlink()
    (mdir / "attach").mkdir()
    (mdir / "attach" / "l").symlink_to(tmp_path / "etc" / "shadow")
    assert client.get(f"work/{mid}").attachments["l"].size == 0


# -- 5. bad input is a 4xx, never a 500 ---------------------------------------------------------
def test_the_audits_500s_are_4xx(client: spoolq.Client) -> None:
    http = TestClient(create_app(client, TOKEN), base_url=LOCAL, headers=AUTH)
    mid = client.send("work").msg_id
    client.store.move("work", mid, State.QUE, State.RUN)
    log = fs(client).message_dir("work", mid) / "job"
    log.mkdir()
    (log / "stdio.log").write_text("hello\n")
    r = http.get("/q/work/done.json?limit=%C2%B2")  # RQ's to_i: no leading digit is 0, so none
    assert (r.status_code, r.json()) == (200, [])
    stream = f"{API}/queues/work/messages/{mid}/log/stream"
    for value in (b"\xb2", b"1" * 5000):
        with http.stream("GET", stream, headers=[(b"last-event-id", value)]) as r:
            assert r.status_code == 400, value[:10]
    for url in (f"{API}/queues/work/messages/{mid}/log", f"/q/work/{mid}/log/stdio.log"):
        r = http.get(url, headers={"Range": "bytes=" + "9" * 4301 + "-"})
        assert r.status_code == 416, (url, r.status_code)
        r = http.get(url, headers={"Range": "bytes=0-" + "9" * 4301})
        assert r.status_code == 206 and r.text == "hello\n"


# -- 6. retry parameters are bounded; the delay never overflows ---------------------------------
def test_retry_parameters_are_bounded(client: spoolq.Client) -> None:
    for bad in ({"base": 1e308, "factor": 1e308}, {"factor": 1e6}, {"max_delay": 1e12}, {"jitter": 5}):
        with pytest.raises(spoolq.errors.InvalidConfig):
            client.update_queue("work", retry=bad)
    policy = RetryPolicy(base=86400.0, factor=100.0, max_delay=30 * 86400.0, jitter=1.0)
    for count in (0, 1, 10, 1000, 2**31):
        assert 0 <= policy.delay(count, 0.999) <= 2 * 30 * 86400.0


# -- 7. the smaller items -----------------------------------------------------------------------
def test_headers_on_every_answer_and_csp_on_pages(client: spoolq.Client) -> None:
    http = anon(client, "read")
    page = http.get("/", headers={"Accept": "text/html"})
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    for r in (http.post(f"{API}/queues", json={}),  # 401 from the middleware
              TestClient(http.app, base_url="http://evil.example").get(f"{API}/queues"),  # 403
              http.post(f"{API}/queues", json={}, headers={"Origin": "http://evil.example"})):
        assert r.status_code in (401, 403), r.status_code
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"


def test_no_absolute_paths_leak(client: spoolq.Client, tmp_path: Path) -> None:
    http = TestClient(create_app(client, TOKEN), base_url=LOCAL, headers=AUTH)
    f = tmp_path / "a.txt"
    f.write_text("a")
    mid = client.send("work", attachments=[f]).msg_id
    root = str(fs(client).root)
    assert root not in http.get("/healthz").text
    for url in (f"{API}/queues/work/messages/{mid}", f"/q/work/{mid}.json"):
        body = http.get(url).json()
        assert body["_attachments"]["a.txt"]["path"].startswith("queue/work/que/"), body["_attachments"]
        assert root not in json.dumps(body), url
    listing = http.get(f"{API}/queues/work/messages").text
    assert root not in listing


def test_wrong_tokens_are_throttled(client: spoolq.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "FAILURE_DELAY", 0.0)  # the throttle, not the per-guess second, is tested
    http = anon(client)
    wrong = {"Authorization": "Bearer " + "w" * 32}
    codes = [http.get(f"{API}/queues", headers=wrong).status_code for _ in range(auth.FAILURES_ALLOWED)]
    assert set(codes) == {401}
    r = http.get(f"{API}/queues", headers=AUTH)
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0, \
        "once over the limit even a right guess is not evaluated"
    assert http.get(f"{API}/queues").status_code == 200, "anonymous reads are not credentials"


def test_the_second_audits_500s_are_4xx(client: spoolq.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers that are no URL, a form field given as a value and a list, an unreadable file."""
    http = TestClient(create_app(client, TOKEN), base_url=LOCAL, raise_server_exceptions=False)
    r = http.post(f"{API}/queues/work/messages", json={}, headers={"Origin": "http://["})
    assert r.status_code == 403 and r.headers["x-content-type-options"] == "nosniff"
    r = http.post(f"{API}/queues", json={"name": "y", "script": "/bin/true"}, follow_redirects=False,
                  headers={"Referer": "http://[::1", "Accept": "text/html", "Origin": "http://127.0.0.1:3333"})
    assert r.status_code == 401
    r = http.post("/q/work/new_queue", data={"a": "b"}, headers={"Referer": "http://[::1", "Accept": "text/html"},
                  follow_redirects=False)
    assert r.status_code in (303, 400, 401), r.status_code
    for form in ({"x_format": "html", "mesg[param1]": "a", "mesg[param1][]": "b"},
                 {"x_format": "html", "mesg[param1][]": "b", "mesg[param1]": "a"}):
        r = http.post("/q/work/new_message", data=form)
        assert r.status_code == 400 and "both as a value and as a list" in r.text, r.text
    mid = client.send("work").msg_id
    (fs(client).message_dir("work", mid) / "job").mkdir()
    (fs(client).message_dir("work", mid) / "job" / "stdio.log").write_text("x\n")
    real_open = os.open

    def unreadable(path: Any, *a: Any, **kw: Any) -> int:
        if path == "stdio.log":
            raise PermissionError(13, "Permission denied")  # chmod 000 does not stop root, this does
        return real_open(path, *a, **kw)

    monkeypatch.setattr("spoolq.store.fs.beneath.os.open", unreadable)
    r = http.get(f"/q/work/{mid}/log/stdio.log", headers=AUTH)
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    assert str(fs(client).root) not in r.text


def test_500s_and_busy_503s_carry_the_security_headers(client: spoolq.Client,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*a: Any, **kw: Any) -> Any:
        raise RuntimeError("a bug")

    http = TestClient(create_app(client, TOKEN), base_url=LOCAL, raise_server_exceptions=False)
    monkeypatch.setattr(client, "queue_config", broken)
    r = http.get(f"{API}/queues/work/config", headers=AUTH)
    assert r.status_code == 500 and r.headers["x-frame-options"] == "DENY"
    monkeypatch.undo()
    monkeypatch.setattr("spoolq.http.server.MAX_CONNECTIONS", 2)  # the held stream, and the one asking
    h = start_http(client, "127.0.0.1", free_port(), TOKEN)
    try:
        with httpx.Client(base_url=h.url, timeout=10) as a, a.stream("GET", f"{API}/events") as held:
            assert held.status_code == 200
            with httpx.Client(base_url=h.url, timeout=10) as b, httpx.Client(base_url=h.url, timeout=10) as c:
                b.get("/healthz")  # keeps its connection open (keep-alive)
                r = c.get("/healthz")
            assert r.status_code == 503 and r.headers["x-content-type-options"] == "nosniff", r.headers
            assert r.json()["error"]["code"] == "busy"
    finally:
        h.stop()


def test_anonymous_requests_store_no_files_where_none_belong(client: spoolq.Client,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """RQ's open routes take files only on attach/new, and only for a message in prep:
    elsewhere a file part is refused before a byte of it reaches the disk."""
    from spoolq.http import uploads

    made: list[str] = []
    real = uploads.tempfile.mkstemp

    def counting(*a: Any, **kw: Any) -> tuple[int, str]:
        fd, path = real(*a, **kw)
        made.append(path)
        return fd, path

    monkeypatch.setattr(uploads.tempfile, "mkstemp", counting)
    http = anon(client)
    mid = client.send("work").msg_id
    big = {"filedata": ("x.bin", b"\0" * 100_000)}
    for url in ("/q/work/new_message", f"/q/work/{mid}", f"/q/work/{mid}/clone", f"/q/work/{mid}/attach/x.bin",
                f"/q/work/{mid}/attach/new", "/q/work/20260101.0000.00.000.1/attach/new", "/q/nope/1/attach/new"):
        r = http.post(url, files=big, data={"_method": "delete", "x_format": "json"})
        assert r.status_code < 500, (url, r.status_code)
    assert made == [], "no upload was spooled"
    ok, full = http.post("/q/work/new_message", data={"mesg": json.dumps({"_method": "prep"})}).json()
    prep = full.rsplit("/", 1)[1]
    r = http.post(f"/q/work/{prep}/attach/new", files=big)
    assert r.json()[0] == "ok" and len(made) == 1, r.text


def test_anonymous_searches_are_bounded(client: spoolq.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from spoolq.http import api

    monkeypatch.setattr(api, "SEARCH_SCAN", 5)
    for i in range(10):
        client.send("work", param1=f"m{i}")
    url = f"{API}/queues/work/messages?filter=nomatch&scan=1000"
    assert anon(client).get(url).json()["scanned"] == 5
    assert anon(client).get(url, headers=AUTH).json()["scanned"] == 10


def test_a_rebinding_page_cannot_lock_out_local_scripts(client: spoolq.Client,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Guesses under a foreign Host (a DNS-rebinding page) count apart from this machine's
    own requests, and X-Forwarded-For cannot pick a fresh address (a real server)."""
    monkeypatch.setattr(auth, "FAILURE_DELAY", 0.0)
    h = start_http(client, "127.0.0.1", free_port(), TOKEN)
    try:
        with httpx.Client(base_url=h.url, timeout=10) as c:
            for i in range(auth.FAILURES_ALLOWED):
                r = c.get(f"{API}/queues", headers={"Authorization": "Bearer " + "w" * 32, "Host": f"evil{i}.example",
                                                    "X-Forwarded-For": f"10.0.0.{i}"})
                assert r.status_code == 401
            r = c.get(f"{API}/queues", headers={"Authorization": "Bearer " + "w" * 32, "Host": "new.example",
                                                "X-Forwarded-For": "10.9.9.9"})
            assert r.status_code == 429, "neither a new Host name nor X-Forwarded-For buys fresh guesses"
            assert c.get(f"{API}/queues", headers=AUTH).status_code == 200, "local scripts are not locked out"
    finally:
        h.stop()


def test_login_form_and_local_peers_share_the_throttle_keys(client: spoolq.Client,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrong tokens in the sign-in form under a rebound name do not lock out local scripts,
    and 127.0.0.2 is no fresh address for a local guesser."""
    monkeypatch.setattr(auth, "FAILURE_DELAY", 0.0)
    monkeypatch.setattr("spoolq.http.ui.FAILURE_DELAY", 0.0)
    h = start_http(client, "127.0.0.1", free_port(), TOKEN)
    try:
        evil = {"Host": f"rebound.example:{h.port}", "Origin": f"http://rebound.example:{h.port}",
                "Cookie": "spoolq_csrf=" + "c" * 40}
        with httpx.Client(base_url=h.url, timeout=10) as c:
            for _ in range(auth.FAILURES_ALLOWED + 1):
                c.post("/login", data={"token": "w" * 32, "csrf": "c" * 40}, headers=evil)
            assert c.get(f"{API}/queues", headers=AUTH).status_code == 200
            for _ in range(auth.FAILURES_ALLOWED):
                assert c.get(f"{API}/queues", headers={"Authorization": "Bearer " + "w" * 32}).status_code == 401
        other = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=h.url, timeout=10, transport=other) as c:
            assert c.get(f"{API}/queues", headers={"Authorization": "Bearer " + "w" * 32}).status_code == 429
    finally:
        h.stop()


def test_anonymous_bodies_in_memory_are_budgeted(client: spoolq.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stalled anonymous bodies held ~5 MiB each; all of them together get a budget (503
    past it), and a message route checks the message before it reads the body at all."""
    from spoolq.http import limits

    monkeypatch.setattr(limits, "ANON_BODY_BUDGET", 1000)
    h = start_http(client, "127.0.0.1", free_port(), TOKEN)
    try:
        # A clone of a message that does not exist: answered without waiting for the body.
        head = (b"POST /q/work/20260101.0000.00.000.1/clone HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000000\r\n\r\n")
        assert _raw(h.port, head, read_timeout=5).startswith(b"HTTP/1.1 404")
        stalled = socket.create_connection(("127.0.0.1", h.port), timeout=30)
        stalled.sendall(b"POST /q/work/new_message HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n" + b" " * 900)
        answers = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and 503 not in answers:
            r = httpx.post(h.url + "/q/work/new_message", content=json.dumps({"param1": "x" * 200}),
                           headers={"Content-Type": "application/json"})
            answers.append(r.status_code)
        assert answers[-1] == 503 and r.json()["error"]["code"] == "busy", answers
        assert httpx.post(h.url + "/q/work/new_message", content=b"{}", headers={
            "Content-Type": "application/json", **AUTH}).status_code == 200, "the token is not budgeted"
        stalled.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the budget comes back when the stalled body ends
            if httpx.post(h.url + "/q/work/new_message", content=b"{}",
                          headers={"Content-Type": "application/json"}).status_code == 200:
                break
        else:
            pytest.fail("the budget never came back")
    finally:
        h.stop()


def test_stream_subscribers_are_capped(client: spoolq.Client) -> None:
    h = start_http(client, "127.0.0.1", free_port(), TOKEN, max_streams=2, events_interval=0.05)
    try:
        with httpx.Client(base_url=h.url, timeout=10) as c, c.stream("GET", f"{API}/events") as a:
            assert a.status_code == 200
            r = c.get(f"{API}/events")
            assert r.status_code == 503, "the last slot is kept for callers with the token"
            with c.stream("GET", f"{API}/events", headers=AUTH) as b:
                assert b.status_code == 200
                r = c.get(f"{API}/events", headers=AUTH)
                assert r.status_code == 503 and r.headers["retry-after"]
        deadline = time.monotonic() + 10
        while h.app.state.ctx.streams.open and time.monotonic() < deadline:
            time.sleep(0.05)  # the server notices the closed streams at its next poll
        with httpx.Client(base_url=h.url, timeout=10) as c, c.stream("GET", f"{API}/events") as again:
            assert again.status_code == 200, "slots come back when streams end"
    finally:
        h.stop()


def test_client_disconnects_are_not_internal_errors(server: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="spoolq")
    aborted = [  # the audit aborted 20 logins and got 2,800 lines of tracebacks
        (b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
         b"Content-Length: 2000\r\n\r\ntoken=abc"),
        (b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
         b"Content-Length: 3000\r\n\r\n--xyz\r\nContent-Disposition: form-data; name=\"token\"\r\n\r\na"),
        (b"POST /q/work/new_message HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
         b"boundary=xyz\r\nContent-Length: 100000\r\n\r\n"
         b"--xyz\r\nContent-Disposition: form-data; name=\"mesg\"\r\n\r\n{"),
    ]
    for _ in range(3):
        for request in aborted:
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.sendall(request)
    time.sleep(0.5)  # let the server notice the aborted requests (nothing to wait on: it must stay quiet)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], \
        [r.getMessage() for r in caplog.records]


def test_openapi_names_patterns_and_405_allow(client: spoolq.Client) -> None:
    http = TestClient(create_app(client, TOKEN), base_url=LOCAL, headers=AUTH)
    doc = http.get(f"{API}/openapi.json").json()
    params = doc["paths"]["/api/v1/queues/{queue}/messages/{msg_id}"]["get"]["parameters"]
    by_name = {p["name"]: p["schema"] for p in params}
    assert by_name["queue"]["pattern"].startswith("^[A-Za-z0-9]")
    assert by_name["msg_id"]["pattern"].startswith("^[0-9]{8}")
    r = http.put(f"{API}/queues/work")
    assert r.status_code == 405
    assert {"GET", "DELETE"} <= {m.strip() for m in r.headers["allow"].split(",")}
