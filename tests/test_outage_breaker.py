"""The circuit breaker, driven by an injected monotonic clock."""

from __future__ import annotations

import logging

import pytest

from tests.support import FakeClock
from viewmw.outage.breaker import BreakerState, CircuitBreaker


def make(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(
        failure_threshold=3, reset_seconds=1.0, max_reset_seconds=4.0, clock=clock
    )


def test_opens_after_a_run_of_failures_and_then_skips_redis(clock: FakeClock) -> None:
    breaker = make(clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
    assert [breaker.allow() for _ in range(100)] == [False] * 100


def test_a_success_resets_the_run(clock: FakeClock) -> None:
    breaker = make(clock)
    for _ in range(10):
        breaker.failure()
        breaker.failure()
        breaker.success()
    assert breaker.state is BreakerState.CLOSED


def test_one_probe_after_the_backoff_closes_it(clock: FakeClock) -> None:
    breaker = make(clock)
    for _ in range(3):
        breaker.failure()
    clock.advance(0.999)
    assert not breaker.allow()
    clock.advance(0.001)
    assert breaker.allow()  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()  # only one probe at a time
    breaker.success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()


def test_failed_probes_back_off_exponentially_up_to_the_cap(clock: FakeClock) -> None:
    breaker = make(clock)
    for _ in range(3):
        breaker.failure()
    waits = []
    for _ in range(5):
        waited = 0.0
        while not breaker.allow():
            clock.advance(0.5)
            waited += 0.5
        waits.append(waited)
        breaker.failure()
    assert waits == [1.0, 2.0, 4.0, 4.0, 4.0]


def test_state_changes_are_logged_once_each(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    breaker = make(clock)
    with caplog.at_level(logging.INFO, logger="viewmw"):
        for _ in range(50):
            if breaker.allow():
                breaker.failure()
        clock.advance(1.0)
        assert breaker.allow()
        breaker.success()
        for _ in range(50):
            assert breaker.allow()
            breaker.success()
    messages = [record.getMessage() for record in caplog.records]
    assert len([m for m in messages if "is failing" in m]) == 1
    assert len([m for m in messages if "answers again" in m]) == 1


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(reset_seconds=5, max_reset_seconds=1)


def test_trip_opens_at_once_and_counts_once(clock: FakeClock) -> None:
    breaker = make(clock)
    breaker.trip()
    assert breaker.state is BreakerState.OPEN and breaker.opened_count == 1
    assert not breaker.allow()
    clock.advance(1.0)
    assert breaker.allow()  # the probe after the back-off
    breaker.trip()  # a failed probe doubles the back-off
    clock.advance(1.5)
    assert not breaker.allow()
    clock.advance(0.5)
    assert breaker.allow()
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and breaker.opened_count == 2


def test_an_inconclusive_call_neither_opens_nor_closes_it(clock: FakeClock) -> None:
    breaker = make(clock)
    for _ in range(10):
        assert breaker.allow()
        breaker.inconclusive()
    assert breaker.state is BreakerState.CLOSED
    breaker.trip()
    clock.advance(1.0)
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.inconclusive()
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()  # the probe may be tried again
