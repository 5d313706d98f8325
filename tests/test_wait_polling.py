"""`farm submit --wait`, `farm show -f` and the clients' wait: the pause between polls grows with the time waited,
so a short job is seen ending at once and a long one costs a poll every `poll_seconds` (a fake clock, no sleeping)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from farm.schemas import FIRST_POLL_S, poll_until_finished


@pytest.fixture
def clock(monkeypatch):
    now = SimpleNamespace(t=1000.0, pauses=[])

    def sleep(seconds: float) -> None:
        now.pauses.append(seconds)
        now.t += seconds

    monkeypatch.setattr(time, "monotonic", lambda: now.t)
    monkeypatch.setattr(time, "sleep", sleep)
    return now


def job_ending_at(clock, seconds: float):
    end = clock.t + seconds
    return lambda job_id: SimpleNamespace(id=job_id, state="succeeded" if clock.t >= end else "running")


def test_a_short_job_is_seen_ending_within_a_tenth_of_its_time(clock):
    start = clock.t
    job = poll_until_finished(job_ending_at(clock, 1.01), "j", poll_seconds=0.5)
    assert job.state == "succeeded"
    assert clock.pauses[0] == FIRST_POLL_S
    assert clock.t - start <= 1.01 + 0.12  # seen about 0.1 s after its end (fixed 0.5 s pauses: 0.49 s after)


def test_a_long_wait_polls_every_poll_seconds_and_pauses_never_shrink(clock):
    updates = []
    poll_until_finished(job_ending_at(clock, 3600.0), "j", poll_seconds=0.5, on_update=updates.append)
    assert max(clock.pauses) == 0.5 and clock.pauses == sorted(clock.pauses)
    assert len(updates) < 3600 / 0.5 + 200  # about one poll every 0.5 s, plus the short ones at the start
    assert len(clock.pauses) == len(updates) - 1


def test_a_poll_interval_below_the_first_pause_is_kept(clock):
    poll_until_finished(job_ending_at(clock, 1.0), "j", poll_seconds=0.02)
    assert set(clock.pauses) == {0.02}


def test_the_timeout_still_applies(clock):
    with pytest.raises(TimeoutError, match="still running after 5 s"):
        poll_until_finished(job_ending_at(clock, 60.0), "j", timeout=5)
