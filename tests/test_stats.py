"""The daemon's job counters (daemon/stats.py) behind ``/metrics``."""

from __future__ import annotations

from spoolq.daemon.stats import DURATION_BUCKETS, JobStats


def test_each_duration_lands_in_the_first_bucket_whose_bound_it_does_not_pass() -> None:
    """Prometheus' ``le``: a duration equal to a bound is counted in that bound's bucket."""
    durations = [0.0, *DURATION_BUCKETS, *(b * 1.0001 for b in DURATION_BUCKETS), 1e9]
    s = JobStats()
    for d in durations:
        s.finished("q", "done", d)
    want = [0] * (len(DURATION_BUCKETS) + 1)
    for d in durations:
        i = next((i for i, le in enumerate(DURATION_BUCKETS) if d <= le), len(DURATION_BUCKETS))
        want[i] += 1
    assert s.buckets["q"] == want
    text = s.render()
    assert f'spoolq_job_duration_seconds_bucket{{queue="q",le="+Inf"}} {len(durations)}' in text
    assert 'spoolq_job_duration_seconds_bucket{queue="q",le="0.005"} 2' in text  # 0.0 and 0.005
