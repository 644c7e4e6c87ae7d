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


def test_a_helpers_counters_are_added_once_and_a_bad_line_adds_nothing() -> None:
    """JobStats.apply: the difference between a helper's successive snapshots is added;
    a malformed snapshot raises before anything is added (serve --dispatchers)."""
    helper, main = JobStats(), JobStats()
    main.started("q")
    helper.started("q")
    helper.finished("q", "done", 0.01)
    first = helper.snapshot()
    main.apply(first, None)
    helper.started("q")
    helper.finished("q", "err", 2.0)
    second = helper.snapshot()
    main.apply(second, first)
    assert main.starts == {"q": 3} and main.outcomes == {("q", "done"): 1, ("q", "err"): 1}
    assert sum(main.buckets["q"]) == 2 and abs(main.sums["q"] - 2.01) < 1e-9
    bad = {**second, "starts": {"q": 9}, "buckets": {"q": [1, 2]}}
    before = (dict(main.starts), dict(main.outcomes), list(main.buckets["q"]))
    try:
        main.apply(bad, second)
    except ValueError:
        pass
    else:
        raise AssertionError("a histogram of the wrong width was taken")
    assert (main.starts, main.outcomes, main.buckets["q"]) == before
