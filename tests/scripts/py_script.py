#!/usr/bin/env python3
"""An RQ queue script in Python: the same verbs as rq_script.sh, through os.fdopen(3)."""
import os
import sys

status = os.fdopen(int(os.environ["RQ_WRITE"]), "w", buffering=1)
reply = os.fdopen(int(os.environ["RQ_READ"]), "r")
p1, p2, p3 = (os.environ.get(f"RQ_PARAM{i}", "") for i in (1, 2, 3))
count = int(os.environ["RQ_COUNT"])
print(f"python script, count {count}, cwd {os.getcwd()}")
status.write("run python here\n")
if p1 == "done":
    status.write("done python done\n")
elif p1 == "err":
    status.write("err python err\n")
elif p1 == "resend":
    if count < int(p2 or "2"):
        status.write(f"resend 0-python retry {count}\n")
    else:
        status.write(f"done python after {count}\n")
elif p1 == "dup":
    status.write(f"dup 0-X-{p2}\n")
    line = reply.readline().strip()
    with open(p3, "w") as f:
        f.write(line + "\n")
    status.write("done python dup\n")
elif p1 == "attach":
    with open("../attach/" + p2) as f:
        status.write(f"done attachment says {f.read().strip()}\n")
elif p1 == "exit":
    sys.exit(int(p2))
else:
    status.write(f"err unknown {p1}\n")
