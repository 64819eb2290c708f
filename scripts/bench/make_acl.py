#!/usr/bin/env python3
"""A 1,000-rule ACL for the cost check of issue 14 (scripts/bench/ab.sh --b-args
"--acl-file FILE"): the load generator's anonymous clients may read and write lt/#
except 19 denied topics, 240 users have four rules each, and 20 patterns with %c and %u
apply to every client.

    make_acl.py FILE
"""
import sys

lines = ["# anonymous clients (the load generator)", "topic readwrite lt/#"]
lines += [f"topic deny lt/denied/{i}" for i in range(19)]
for u in range(240):
    lines += [f"user device-{u}", f"topic readwrite devices/{u}/#", f"topic read fleet/{u % 16}/+/status",
              f"topic write telemetry/{u}/+", f"topic deny devices/{u}/admin/#"]
lines += [f"pattern readwrite clients/%c/{p}/#" for p in range(10)]
lines += [f"pattern read users/%u/inbox/{p}" for p in range(10)]
rules = sum(1 for l in lines if l.startswith(("topic", "pattern")))
assert rules == 1000, rules
with open(sys.argv[1], "w") as f:
    f.write("\n".join(lines) + "\n")
