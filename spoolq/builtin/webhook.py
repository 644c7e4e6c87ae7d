"""The ``webhook`` queue's script: POST a finished message's state to a URL (rq-spec 5.5).

A message that ends (done, relayed, err) with ``post_run_webhook`` URLs leaves one message
per URL in the local ``webhook`` queue: ``param1`` the URL, ``param2`` the message's final
state as JSON. This script sends it:

* to an RQ receiver (a URL ending in ``/new_message``), RQ's form: ``x_format=json`` and
  ``mesg`` = the message's ``src``, ``param1``..``param4``, ``orig_msg_id`` and ``dest`` (the
  URL's path without its last part), as RQ's own webhook script does;
* to any other URL, the state JSON itself (``Content-Type: application/json``).

A 2xx answer ends it ``done successful post <code>``. A redirect is not followed (it would
turn the POST into a GET to wherever it points). Anything else (another status, a
redirect, a refused connection, :data:`TIMEOUT` s without a byte, :data:`DEADLINE` s in
all) asks to be run again after
``count² × 60`` s, at most an hour (RQ's backoff), until the message's ``max_count`` puts it
in err. It is a Python program run once per message like any queue script.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

TIMEOUT = 30.0
"""Seconds the endpoint may stay silent (connect, or between bytes of its answer)."""
DEADLINE = 90.0
"""Seconds for the whole post: an endpoint that trickles its answer a byte at a time never
stays silent for :data:`TIMEOUT`, and the webhook queue has no timeout of its own."""
MAX_WAIT = 3600


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # urllib then raises HTTPError with the 3xx


def _past_deadline(signum: int, frame: object) -> None:
    raise TimeoutError(f"no complete answer within {DEADLINE:g} s")


def status(line: str) -> None:
    os.write(3, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
    print(f"{os.getpid()} - {time.strftime('%Y-%m-%d %H:%M:%S')} - {line}", flush=True)


def request(url: str, payload: str) -> urllib.request.Request:
    path = urllib.parse.urlsplit(url).path
    if path.rstrip("/").endswith("/new_message"):
        try:
            state = json.loads(payload)
        except ValueError:
            state = {}
        mesg = {k: state[k] for k in ("src", "param1", "param2", "param3", "param4", "orig_msg_id")
                if isinstance(state, dict) and k in state}
        mesg["dest"] = "/".join(path.rstrip("/").split("/")[:-1])
        body = urllib.parse.urlencode({"x_format": "json", "mesg": json.dumps(mesg)}).encode()
        return urllib.request.Request(url, data=body, method="POST",
                                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    return urllib.request.Request(url, data=payload.encode(), method="POST",
                                  headers={"Content-Type": "application/json"})


def main() -> int:
    url = os.environ.get("RQ_PARAM1", "")
    payload = os.environ.get("RQ_PARAM2", "")
    count = int(os.environ.get("RQ_COUNT", "0") or 0)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        status(f"err not an http(s) URL: {url!r}")
        return 0
    status(f"run Attempting post to url: {url}")
    why = ""
    opener = urllib.request.build_opener(_NoRedirect)
    signal.signal(signal.SIGALRM, _past_deadline)
    # Again every second past the deadline: the connect's loop over a name's addresses
    # takes a TimeoutError for one address's failure and tries the next.
    signal.setitimer(signal.ITIMER_REAL, DEADLINE, 1.0)
    try:
        try:
            with opener.open(request(url, payload), timeout=TIMEOUT) as res:
                code = res.status
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)  # before any handler below runs
    except urllib.error.HTTPError as e:
        code, why = e.code, f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        code, why = 0, f"could not connect to {url}: {getattr(e, 'reason', e)}"
    if 200 <= code < 300:
        status(f"done successful post {code}")
        return 0
    wait = min(MAX_WAIT, count * count * 60)
    status(f"resend {wait}-{why or f'HTTP {code}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
