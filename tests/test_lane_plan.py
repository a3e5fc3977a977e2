"""lane_plan.py: the deadline arithmetic, as properties on a virtual clock (no server, no sleeping)."""

from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from batch.lane_plan import (MARGIN_SECONDS, Outstanding, margin_for, may_submit, online_capacity, parse_deadline,
                             to_pull_back)

NOW = 1_800_000_000.0

batches = st.lists(st.builds(Outstanding, key=st.uuids().map(str), rows_owed=st.integers(0, 50_000),
                             cancellable=st.booleans(), submitted_at=st.floats(NOW - 86_400, NOW)),
                   max_size=30, unique_by=lambda b: b.key)


@given(batches, st.floats(0, 30_000), st.floats(0.1, 500), st.integers(0, 100_000))
def test_pulling_back_leaves_just_what_fits(owed: list[Outstanding], left: float, pace: float, backlog: int) -> None:
    """After the pull-back the rows still owed by batches fit the online lane's capacity (or every batch was
    pulled); dropping the last one pulled would not fit; batches that can be cancelled go first, newest first."""
    deadline = NOW + left
    pulled = to_pull_back(NOW, deadline, pace, backlog, owed)
    assert len(pulled) == len(set(pulled))
    by_key = {b.key: b for b in owed}
    capacity = online_capacity(NOW, deadline, pace, backlog)
    kept = sum(b.rows_owed for b in owed if b.key not in pulled)
    moved = sum(by_key[k].rows_owed for k in pulled)
    assert kept <= capacity - moved or len(pulled) == len(owed)
    if pulled:
        last = by_key[pulled[-1]]
        assert kept + last.rows_owed > capacity - (moved - last.rows_owed)  # just enough, no more
    order = [(not by_key[k].cancellable, -by_key[k].submitted_at) for k in pulled]
    assert order == sorted(order)


@given(st.floats(0, 100_000), st.floats(1, 100_000), st.integers(1, 100_000), st.floats(0.1, 500))
def test_a_batch_that_cannot_be_cancelled_needs_its_usual_time(left: float, expected: float, rows: int,
                                                             pace: float) -> None:
    """OpenRouter's batches cannot be cancelled: none is submitted later than its expected time before the
    deadline (and its margin), whatever the online lane could do."""
    ok = may_submit(NOW, NOW + left, cancellable=False, expected_seconds=expected, rows=rows, rows_per_second=pace)
    assert ok == (left - MARGIN_SECONDS >= expected)


@given(st.floats(0, 100_000), st.integers(1, 100_000), st.floats(0.1, 500))
def test_a_cancellable_batch_needs_online_room_to_fall_back_on(left: float, rows: int, pace: float) -> None:
    """An OpenAI batch may be submitted late, but only while the online lane could still take a share of it."""
    ok = may_submit(NOW, NOW + left, cancellable=True, expected_seconds=3600, rows=rows, rows_per_second=pace)
    assert not ok or online_capacity(NOW, NOW + left, pace, 0) >= rows * 0.25
    assert not may_submit(NOW, NOW + MARGIN_SECONDS, cancellable=True, expected_seconds=1, rows=rows,
                          rows_per_second=pace)


@given(st.floats(0, 10 * 86_400))
def test_the_margin_is_ten_seconds_or_a_twentieth_of_a_short_run(span: float) -> None:
    margin = margin_for(NOW + span, NOW)
    assert 0 <= margin <= MARGIN_SECONDS and margin <= span * 0.05 + 1e-6  # NOW + span rounds
    assert margin == MARGIN_SECONDS or span < 200


class TestParseDeadline:
    @pytest.mark.parametrize(("text", "seconds"), [("8h", 28_800), ("90m", 5_400), ("1h30m", 5_400), ("45s", 45),
                                                   ("0.5h", 1_800), (" 2h 15m ", 8_100)])
    def test_durations_count_from_now(self, text: str, seconds: float) -> None:
        assert parse_deadline(text, NOW) == NOW + seconds

    @given(st.floats(NOW, NOW + 365 * 86_400), st.integers(0, 23), st.integers(0, 59))
    def test_a_time_of_day_is_its_next_occurrence(self, now: float, hour: int, minute: int) -> None:
        at = parse_deadline(f"{hour:02d}:{minute:02d}", now)
        assert now < at <= now + 86_400 + 3_600  # a day at most (an hour more across a DST change)
        local = datetime.fromtimestamp(at)
        assert (local.hour, local.minute) == (hour, minute) or abs(at - now) > 82_000  # DST gap: moved an hour

    def test_iso_time(self) -> None:
        assert parse_deadline("2027-01-01T07:00:00+00:00", NOW) == datetime.fromisoformat(
            "2027-01-01T07:00:00+00:00").timestamp()

    @pytest.mark.parametrize("text", ["tomorrow", "25:00", "7am", "", "h"])
    def test_unreadable_says_what_is_accepted(self, text: str) -> None:
        with pytest.raises(ValueError, match="time of day|ISO time|duration"):
            parse_deadline(text, NOW)


@given(batches, st.floats(1, 30_000), st.floats(0.1, 500), st.floats(0.2, 900))
def test_batches_that_never_finish_are_pulled_back_in_time_between_polls(owed: list[Outstanding], left: float,
                                                                        pace: float, poll: float) -> None:
    """The pull-back is decided only at each poll: looking ahead one poll, rows of batches that never answer
    still finish online before the deadline's margin, whenever they could at the first poll (the bench's 10 m
    run once missed its deadline by pulling back one 30 s poll too late)."""
    assume(left / poll < 2000)  # polls in a run, for the test's speed
    deadline, margin = NOW + left, margin_for(NOW + left, NOW)
    if sum(b.rows_owed for b in owed) > online_capacity(NOW + poll, deadline, pace, 0, margin):
        return  # not feasible from the start: everything is pulled back at once
    t, backlog, pulled = NOW, 0.0, set()
    finished = NOW
    while t < deadline and len(pulled) < len(owed):
        waiting = [b for b in owed if b.key not in pulled]
        for key in to_pull_back(t, deadline, pace, int(backlog), waiting, margin, lookahead=poll):
            pulled.add(key)
            backlog += next(b.rows_owed for b in owed if b.key == key)
            finished = t + backlog / pace  # the online lane at its pace, from this poll on
        backlog = max(0.0, backlog - pace * poll)
        t += poll
    assert finished <= deadline - margin + 1 / pace
