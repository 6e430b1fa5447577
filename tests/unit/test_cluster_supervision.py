"""The restart policy of `hotslot up` on a fake clock: exponential backoff between restarts, a budget of restarts per
window after which a crash-looping service is not restarted, and a full budget again for a service that stayed up."""
from __future__ import annotations

import signal

import pytest

from hotslot.cluster.supervision import RestartBudget, RestartPolicy, describe_exit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_restart_within_the_window_waits_twice_as_long_up_to_the_maximum() -> None:
    clock = FakeClock()
    budget = RestartBudget(RestartPolicy(backoff_s=1, backoff_max_s=5, max_restarts=10, window_s=60), clock)
    delays = []
    for _ in range(5):
        delays.append(budget.next_delay())
        clock.now += 1
    assert delays == [1, 2, 4, 5, 5]


def test_a_service_that_keeps_crashing_is_not_restarted_beyond_its_budget() -> None:
    clock = FakeClock()
    budget = RestartBudget(RestartPolicy(backoff_s=1, backoff_max_s=30, max_restarts=3, window_s=60), clock)
    for _ in range(3):
        assert budget.next_delay() is not None
        clock.now += 5
    assert budget.next_delay() is None
    assert budget.next_delay() is None  # refusing does not count as a restart either


def test_restarts_older_than_the_window_no_longer_count() -> None:
    clock = FakeClock()
    budget = RestartBudget(RestartPolicy(backoff_s=1, backoff_max_s=30, max_restarts=2, window_s=60), clock)
    assert budget.next_delay() == 1
    clock.now += 30
    assert budget.next_delay() == 2
    clock.now += 31  # the first restart left the window
    assert budget.recent() == 1
    assert budget.next_delay() == 2
    clock.now += 61  # up for a whole window: back to the first backoff and a full budget
    assert budget.recent() == 0
    assert budget.next_delay() == 1


def test_a_budget_of_zero_restarts_stops_at_the_first_exit() -> None:
    budget = RestartBudget(RestartPolicy(max_restarts=0), FakeClock())
    assert budget.next_delay() is None


@pytest.mark.parametrize("kwargs", [{"backoff_s": -1}, {"backoff_s": 5, "backoff_max_s": 1}, {"window_s": 0},
                                    {"max_restarts": -1}])
def test_an_inconsistent_policy_is_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**kwargs)


def test_exits_are_described_by_code_or_signal() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(None) == "still running"
