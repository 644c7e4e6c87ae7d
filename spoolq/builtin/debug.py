"""The ``debug`` queue's script (RQ's ``default_scripts/debug/run``): prints what a script
gets (its working directory, the message's files, the ``RQ_*`` and ``SPOOLQ_*`` variables,
the parameters) and ends ``done script completed happily``.

RQ printed the whole environment. A message's log is readable by anyone who may read the
queue (on loopback, anonymous requests by default), and the daemon's environment may hold
secrets (``PGPASSWORD``, cloud keys), so the other variables are listed by name only.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    out = sys.stdout
    out.write("----------- Current Working Directory ---------\n")
    out.write(os.getcwd() + "\n")
    msg_dir = os.environ.get("SPOOLQ_MESSAGE_DIR", "..")
    out.write("----------- Message directory ---------\n")
    for name in sorted(os.listdir(msg_dir)):
        out.write(f"{name}\n")
    out.write("----------- RQ env ---------\n")
    for k in sorted(os.environ):
        if k.startswith(("RQ_", "SPOOLQ_")):
            out.write(f"{k}={os.environ[k]}\n")
    out.write("----------- System env (names only: values may be secrets) ---------\n")
    out.write(" ".join(sorted(k for k in os.environ if not k.startswith(("RQ_", "SPOOLQ_")))) + "\n")
    out.write("-----------------------------\n")
    out.flush()
    os.write(3, b"done script completed happily\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
