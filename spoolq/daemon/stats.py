"""What the daemon has run since it started, for ``/metrics``: starts, outcomes, durations.

Counters live in the daemon's memory (the HTTP server runs in the same process and reads
them from its thread); per-queue totals on disk are the counts cache.
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

from ..prometheus import label as _label

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
"""Upper bounds (seconds) of the script-duration histogram."""


class JobStats:
    """Thread-safe counters: fed by the daemon loop, read by the HTTP thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.starts: dict[str, int] = {}
        self.outcomes: dict[tuple[str, str], int] = {}
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self.script_errors: dict[str, int] = {}
        self.version = 0  # bumped by every change: a dispatch helper sends its counters when it moved

    def started(self, queue: str) -> None:
        with self._lock:
            self.starts[queue] = self.starts.get(queue, 0) + 1
            self.version += 1

    def script_error(self, queue: str) -> None:
        with self._lock:
            self.script_errors[queue] = self.script_errors.get(queue, 0) + 1
            self.version += 1

    def finished(self, queue: str, outcome: str, seconds: float) -> None:
        with self._lock:
            key = (queue, outcome)
            self.outcomes[key] = self.outcomes.get(key, 0) + 1
            self.version += 1
            b = self.buckets.get(queue)
            if b is None:
                b = self.buckets[queue] = [0] * (len(DURATION_BUCKETS) + 1)
            b[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1  # the first bound >= seconds, else +Inf
            self.sums[queue] = self.sums.get(queue, 0.0) + seconds

    def snapshot(self) -> dict[str, Any]:
        """Every counter, as JSON: what a dispatch helper sends its main process (helpers.py)."""
        with self._lock:
            return {"starts": dict(self.starts), "outcomes": [[q, o, n] for (q, o), n in self.outcomes.items()],
                    "buckets": {q: list(b) for q, b in self.buckets.items()}, "sums": dict(self.sums),
                    "script_errors": dict(self.script_errors)}

    def apply(self, snap: dict[str, Any], last: dict[str, Any] | None) -> None:
        """Add what ``snap`` (a helper's :meth:`snapshot`) has more than ``last``, the one
        before it from the same process: a helper's counters, added to the main process's.
        All or nothing: a malformed line raises before anything is added."""
        last = last or {}

        def ints(d: Any) -> dict[str, int]:
            return {str(q): int(n) for q, n in dict(d).items()}

        starts = _minus(ints(snap.get("starts", {})), ints(last.get("starts", {})))
        errors = _minus(ints(snap.get("script_errors", {})), ints(last.get("script_errors", {})))
        outcomes = _minus({(str(q), str(o)): int(n) for q, o, n in snap.get("outcomes", [])},
                          {(str(q), str(o)): int(n) for q, o, n in last.get("outcomes", [])})
        width = len(DURATION_BUCKETS) + 1
        before_b = {str(q): [int(n) for n in b] for q, b in dict(last.get("buckets", {})).items()}
        buckets = {}
        for q, b in dict(snap.get("buckets", {})).items():
            now_b, was = [int(n) for n in b], before_b.get(str(q)) or [0] * width
            if len(now_b) != width or len(was) != width:
                raise ValueError(f"a histogram of {len(now_b)} buckets, not {width}")
            buckets[str(q)] = [n - w for n, w in zip(now_b, was, strict=True)]
        sums = {str(q): float(x) - float(dict(last.get("sums", {})).get(q, 0.0))
                for q, x in dict(snap.get("sums", {})).items()}
        with self._lock:
            for mine, delta in ((self.starts, starts), (self.script_errors, errors)):
                for q, n in delta.items():
                    mine[q] = mine.get(q, 0) + n
            for key, n in outcomes.items():
                self.outcomes[key] = self.outcomes.get(key, 0) + n
            for q, d in buckets.items():
                mine_b = self.buckets.setdefault(q, [0] * width)
                for i, n in enumerate(d):
                    mine_b[i] += n
            for q, x in sums.items():
                self.sums[q] = self.sums.get(q, 0.0) + x

    def render(self) -> str:
        """Prometheus text: spoolq_job_starts_total, spoolq_job_outcomes_total,
        spoolq_job_duration_seconds (histogram), spoolq_script_errors_total."""
        with self._lock:
            starts = sorted(self.starts.items())
            outcomes = sorted(self.outcomes.items())
            buckets = {q: list(b) for q, b in sorted(self.buckets.items())}
            sums = dict(self.sums)
            errors = sorted(self.script_errors.items())
        lines = ["# HELP spoolq_job_starts_total Scripts started, per queue.",
                 "# TYPE spoolq_job_starts_total counter"]
        lines += [f'spoolq_job_starts_total{{queue="{_label(q)}"}} {n}' for q, n in starts]
        lines += ["# HELP spoolq_job_outcomes_total Attempts ended, per queue and the state they "
                  "left the message in (done, relayed, err, que = retry later).",
                  "# TYPE spoolq_job_outcomes_total counter"]
        lines += [f'spoolq_job_outcomes_total{{queue="{_label(q)}",outcome="{o}"}} {n}'
                  for (q, o), n in outcomes]
        lines += ["# HELP spoolq_job_duration_seconds Script run time, from spawn to exit.",
                  "# TYPE spoolq_job_duration_seconds histogram"]
        for q, b in buckets.items():
            ql = _label(q)
            total = 0
            for le, n in zip((*DURATION_BUCKETS, float("inf")), b, strict=True):
                total += n
                le_s = "+Inf" if le == float("inf") else f"{le:g}"
                lines.append(f'spoolq_job_duration_seconds_bucket{{queue="{ql}",le="{le_s}"}} {total}')
            lines.append(f'spoolq_job_duration_seconds_sum{{queue="{ql}"}} {sums.get(q, 0.0):.6f}')
            lines.append(f'spoolq_job_duration_seconds_count{{queue="{ql}"}} {total}')
        lines += ["# HELP spoolq_script_errors_total Times a queue's script could not be started.",
                  "# TYPE spoolq_script_errors_total counter"]
        lines += [f'spoolq_script_errors_total{{queue="{_label(q)}"}} {n}' for q, n in errors]
        return "\n".join(lines) + "\n"


def _minus(now: dict[Any, int], before: dict[Any, int]) -> dict[Any, int]:
    return {k: n - before.get(k, 0) for k, n in now.items()}
