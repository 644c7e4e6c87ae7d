"""The web UI in a real browser (Debian's chromium, headless, via Playwright) against the
real ``spoolq serve``: create a queue, send a message with an attachment through the form,
watch its ANSI-coloured log stream in live while the job runs, see it finish, run it again;
then fail one and retry it. Screenshots go to test-artifacts/ (and, with
SPOOLQ_UPDATE_SCREENSHOTS=1, to docs/screenshots/ for the README).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_helpers import AUTH, SPOOLQ, TOKEN, daemon, free_port, have_daemon

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
DOCS_SHOTS = REPO / "docs" / "screenshots"

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
    pytest.mark.skipif(not have_daemon(), reason="spoolq serve is not available in this checkout"),
]

# A queue script: ANSI-coloured lines, slowly, one with markup in it; exit status from param1.
SCRIPT = r"""#!/bin/sh
n=${RQ_PARAM2:-12}
i=1
while [ "$i" -le "$n" ]; do
  printf '\033[1;34m[%02d]\033[0m \033[32mprocessing chunk %s\033[0m \033[33m%s%%\033[0m\n' "$i" "$i" $((i * 100 / n))
  [ "$i" -eq 2 ] && printf '\033[31mwarning:\033[0m a line with <script>alert("x")</script> stays text\n'
  sleep 0.4
  i=$((i + 1))
done
printf '\033[1;32mall done\033[0m\n'
exit ${RQ_PARAM1:-0}
"""


def shot(page: object, name: str, docs_name: str | None = None) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=False)  # type: ignore[attr-defined]
    if docs_name and os.environ.get("SPOOLQ_UPDATE_SCREENSHOTS") == "1":
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_SHOTS / docs_name)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The real daemon: (its URL, its root)."""
    root = tmp_path / "spool"
    root.mkdir()
    with daemon(root, free_port()) as url:
        yield url, root


def login_url(root: Path) -> str:
    """A one-time sign-in link from ``spoolq login-url``, as a user would get one."""
    env = {**os.environ, "SPOOLQ_TOKEN": TOKEN}
    r = subprocess.run([SPOOLQ, "--root", str(root), "login-url"], capture_output=True, text=True, env=env,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture
def page() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        ctx = browser.new_context(viewport={"width": 1360, "height": 900})
        pg = ctx.new_page()
        pg.set_default_timeout(30_000)
        pg.on("dialog", lambda d: d.accept())
        yield pg
        browser.close()


def test_live_log_in_the_browser(served: tuple[str, Path], page: object, tmp_path: Path) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    server, root = served
    csp_violations: list[str] = []
    page.on("console", lambda m: csp_violations.append(m.text) if "Content Security Policy" in m.text else None)
    # Anonymous on loopback: the UI reads, and says how to sign in.
    page.goto(server + "/")
    expect(page.locator(".read-only")).to_contain_text("sign in")
    # Sign in with the one-time link the CLI prints; a second use is refused.
    link = login_url(root)
    page.goto(link)
    expect(page).to_have_url(server + "/")
    expect(page.locator(".read-only")).to_have_count(0)
    expect(page.locator("text=Sign out")).to_be_visible()
    page.goto(link)
    expect(page.locator(".flash-error")).to_contain_text("used already")
    script = tmp_path / "colors.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    attachment = tmp_path / "report.csv"
    attachment.write_bytes(b"id,name\n" + b"".join(b"%d,row %d\n" % (i, i) for i in range(2000)))

    # Create the queue through the form.
    page.goto(server + "/new_queue")
    page.fill("input[name=name]", "colors")
    page.fill("input[name=script]", str(script))
    page.fill("input[name=num_workers]", "2")
    page.click("#new-queue-form button[type=submit]")
    expect(page).to_have_url(server + "/q/colors")
    expect(page.locator(".flash")).to_contain_text("queue colors created")

    # Send a message with an attachment through the form.
    page.click("text=+ New message")
    page.fill("input[name=param1]", "0")
    page.fill("textarea[name=params]", '{"customer": "acme", "batch": 7}')
    page.set_input_files("input[name=attachment]", str(attachment))
    page.click("#new-message-form button[type=submit]")
    expect(page.locator(".flash")).to_contain_text("stored")
    msg_url = page.url
    assert "/q/colors/" in msg_url

    # While it runs, coloured spans stream in.
    # (Locator assertions, not wait_for_function: the UI's CSP forbids the eval it uses.)
    expect(page.locator("#msg-state")).to_have_attribute("data-state", "run")
    expect(page.locator("#log span.ansi").nth(2)).to_be_attached()
    assert page.locator("#msg-state").get_attribute("data-state") == "run"
    assert page.locator("#live-dot").is_visible()
    green = page.locator("#log span.ansi", has_text="processing chunk 1").first
    assert green.evaluate("e => getComputedStyle(e).color") == "rgb(13, 188, 121)"
    shot(page, "message-live-log.png", "message-live-log.png")
    n_running = page.locator("#log span.ansi").count()
    expect(page.locator("#log span.ansi").nth(n_running)).to_be_attached()

    # A log line with markup is text, not markup.
    assert "<script>alert(\"x\")</script>" in (page.locator("#log").text_content() or "")
    assert page.locator("#log script").count() == 0

    # It reaches done; the page refreshes its actions; the attachment shows md5 and size.
    expect(page.locator("#msg-state")).to_have_attribute("data-state", "done")
    expect(page.locator("#log")).to_contain_text("all done")
    expect(page.locator("#clone-btn")).to_be_visible()
    md5 = hashlib.md5(attachment.read_bytes()).hexdigest()
    expect(page.locator("#attachments")).to_contain_text(md5)
    expect(page.locator("#attachments")).to_contain_text("report.csv")
    shot(page, "message-done.png")

    # Run it again from the UI: a clone with the same params and attachment.
    page.click("#clone-btn")
    expect(page.locator(".flash")).to_contain_text("cloned from")
    assert page.url != msg_url
    expect(page.locator("#attachments")).to_contain_text(md5)
    expect(page.locator("#msg-state")).to_have_attribute("data-state", "done", timeout=60_000)

    # A failing message: it ends in err, and Retry puts it back to work.
    page.goto(server + "/q/colors/new_message")
    page.fill("input[name=param1]", "3")
    page.fill("input[name=param2]", "2")
    page.click("#new-message-form button[type=submit]")
    expect(page.locator("#msg-state")).to_have_attribute("data-state", "err")
    expect(page.locator("#retry-btn")).to_be_visible()
    page.click("#retry-btn")
    expect(page.locator(".flash")).to_contain_text("retry: done")
    expect(page.locator("#history")).to_contain_text("retry")
    expect(page.locator("#msg-state")).to_have_attribute("data-state", "err", timeout=60_000)

    # The queue page lists them, newest first; search narrows to the one that failed.
    page.goto(server + "/q/colors?state=done")
    assert page.locator("#messages tbody tr").count() == 2
    page.goto(server + "/q/colors?state=err")
    page.fill("input[name=filter]", "acme")
    page.click(".search button")
    expect(page.locator(".empty")).to_contain_text("No err messages match")

    # The dashboard shows the counts.
    page.goto(server + "/")
    row = page.locator("tr[data-queue=colors]")
    expect(row.locator("[data-count=done]")).to_have_text("2")
    expect(row.locator("[data-count=err]")).to_have_text("1")
    shot(page, "dashboard.png")
    assert not csp_violations, f"the UI's own pages break its CSP: {csp_violations}"


def test_dashboard_counts_update_live(served: tuple[str, Path], page: object) -> None:
    """The dashboard follows /api/v1/events: counts change without a reload (read-only,
    anonymous on loopback: the events stream and the pages need no sign-in)."""
    import httpx
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    server, _ = served
    httpx.post(server + "/api/v1/queues", json={"name": "mail", "script": "/bin/true"},
               headers=AUTH).raise_for_status()
    httpx.post(server + "/api/v1/queues/mail/pause", headers=AUTH).raise_for_status()
    page.goto(server + "/")
    cell = page.locator("tr[data-queue=mail] [data-count=que]")
    expect(cell).to_have_text("0")
    page.evaluate("window.__marker = 1")
    for _ in range(3):
        httpx.post(server + "/api/v1/queues/mail/messages", json={"param1": "x"}, headers=AUTH).raise_for_status()
    expect(cell).to_have_text("3", timeout=15_000)
    assert page.evaluate("window.__marker") == 1, "updated in place, not by reloading"
    expect(page.locator("tr[data-queue=mail] [data-status]")).to_contain_text("PAUSE")
    page.goto(server + "/q/mail")
    tab = page.locator("[data-tab-count=que]")
    expect(tab).to_have_text("3")
    httpx.post(server + "/api/v1/queues/mail/messages", json={"param1": "y"}, headers=AUTH).raise_for_status()
    expect(tab).to_have_text("4", timeout=15_000)


def test_bulk_actions_in_the_browser(served: tuple[str, Path], page: object) -> None:
    """Bulk actions show their count before they act, run as operations with live
    progress, and end with a result that matches what is left (hardening issue, item 15)."""
    from playwright.sync_api import Page, expect

    import spoolq

    assert isinstance(page, Page)
    server, root = served
    client = spoolq.open(root)
    client.create_queue("bulk", script="/bin/true")
    client.set_admin_state("bulk", "PAUSE")
    client.send_many("bulk", [{"param1": f"m{i}", "params": {"kind": "drop" if i % 50 == 0 else "keep"}}
                              for i in range(500)])
    dialogs: list[str] = []
    page.on("dialog", lambda d: dialogs.append(d.message))
    page.goto(login_url(root))
    # With a search: the matches are counted first, then exactly those are deleted.
    page.goto(server + "/q/bulk?state=que&filter=kind%3Ddrop")
    expect(page.locator("#search-note")).to_contain_text("Searched 500 que messages")
    page.click("button:has-text('Delete matching')")
    expect(page.locator("#apply-form")).to_contain_text("10 que messages match.")
    page.click("#apply-form button")
    assert dialogs[-1] == "Delete these 10 messages? This cannot be undone."
    expect(page.locator("[data-op=status]")).to_have_text("done")
    expect(page.locator("[data-op=succeeded]")).to_have_text("10")
    expect(page.locator("[data-op=remaining]")).to_have_text("490")
    # Without a search the dialog names the count at once.
    page.goto(server + "/q/bulk?state=que")
    page.click("button:has-text('Delete all')")
    assert dialogs[-1] == "Delete all 490 messages in que? This cannot be undone."
    expect(page.locator("[data-op=status]")).to_have_text("done")
    expect(page.locator("[data-op=remaining]")).to_have_text("0")
    assert client.recount("bulk")["que"] == 0
    shot(page, "bulk-operation.png")


def test_pages_fit_a_phone(served: tuple[str, Path], page: object) -> None:
    """At 420 px nothing widens the page: wide tables scroll inside themselves; the run tab
    offers what can be done to running messages; the form explains coalesce and blocking."""
    from playwright.sync_api import Page, expect

    import spoolq

    assert isinstance(page, Page)
    server, root = served
    client = spoolq.open(root)
    for name in ("a-queue-with-a-rather-long-name", "mail"):
        client.create_queue(name, script="/bin/true")
        client.set_admin_state(name, "PAUSE")
        client.send(name, param1="x" * 200)
    page.set_viewport_size({"width": 420, "height": 800})
    page.goto(login_url(root))
    for path in ("/", "/q/mail", "/q/mail?state=que", "/new_queue", f"/q/mail/{client.list('mail').items[0].msg_id}"):
        page.goto(server + path)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 420, f"{path} is {width} px wide at a 420 px viewport"
    shot(page, "message-420px.png")
    page.goto(server + "/new_queue")
    expect(page.locator("#coalesce-help")).to_contain_text("done once")
    expect(page.locator("#blocking-help")).to_contain_text("Never two messages")
    # The run tab: no "All run:" with nothing after it.
    msg = client.list("mail").items[0].msg_id
    client.store.move("mail", msg, spoolq.model.State.QUE, spoolq.model.State.RUN)
    page.goto(server + "/q/mail?state=run")
    expect(page.locator("#bulk-form")).to_contain_text("Cancel all")
    page.goto(server + "/q/mail?state=done")
    expect(page.locator("#bulk-form")).to_have_count(0)


def test_rq_tailview_follows_a_growing_log_and_an_attachment(served: tuple[str, Path], page: object,
                                                            tmp_path: Path) -> None:
    """RQ's tailviewlog/tailview pages: the file read with Range requests as it grows,
    ANSI colours shown, until the message has ended."""
    from playwright.sync_api import Page, expect

    import spoolq

    assert isinstance(page, Page)
    server, root = served
    csp_violations: list[str] = []
    page.on("console", lambda m: csp_violations.append(m.text) if "Content Security Policy" in m.text else None)
    script = tmp_path / "colors.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    client = spoolq.open(root)
    client.create_queue("tail", script=str(script))
    mid = client.send("tail", param2="8").msg_id
    page.goto(f"{server}/q/tail/{mid}/tailviewlog/stdio.log")
    expect(page.locator("#tail span.ansi", has_text="processing chunk 1").first).to_be_attached()
    green = page.locator("#tail span.ansi", has_text="processing chunk 1").first
    assert green.evaluate("e => getComputedStyle(e).color") == "rgb(13, 188, 121)"
    expect(page.locator("#tail")).to_contain_text("all done", timeout=30_000)
    assert page.locator("#tail script").count() == 0  # markup in the log stays text
    expect(page.locator("#tail")).to_have_attribute("data-streaming", "0", timeout=30_000)
    # An attachment of a message in prep: shown as it is; a name it does not have is a 404.
    data = tmp_path / "data.txt"
    data.write_text("first line\n\x1b[31mred line\x1b[0m\n")
    held = client.prep("tail")
    client.attach(held, data)
    page.goto(f"{server}/q/tail/{held.msg_id}/tailview/data.txt")
    expect(page.locator("#tail span.ansi", has_text="red line")).to_be_attached()
    expect(page.locator("#tail")).to_contain_text("first line")
    r = page.request.get(f"{server}/q/tail/{held.msg_id}/tailview/nope.txt")
    assert r.status == 404 and "attachment 'nope.txt' not found" in r.text()
    r = page.request.get(f"{server}/q/tail/20200101.0000.00.000.1/tailviewlog/stdio.log")
    assert r.status == 404 and r.text() == "404 - Message ID not found"
    assert not csp_violations, csp_violations
