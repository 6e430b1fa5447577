"""When `hotslot up` restarts a service that exited: exponential backoff between restarts, and a budget of restarts
per time window beyond which the service counts as crash-looping and the cluster stops. Pure policy on a clock
passed in, so it is tested without processes or waiting."""
from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 1.0
    """Wait before the first restart of a service; doubles with each further restart inside the window."""
    backoff_max_s: float = 30.0
    """Longest wait before a restart."""
    max_restarts: int = 5
    """Restarts of one service allowed within window_s; one more exit and the cluster stops."""
    window_s: float = 60.0
    """The window the restart budget counts over; a service that stays up this long is back to a full budget and
    the first backoff."""

    def __post_init__(self) -> None:
        if self.backoff_s < 0 or self.backoff_max_s < self.backoff_s:
            raise ValueError("need 0 <= backoff_s <= backoff_max_s")
        if self.max_restarts < 0 or self.window_s <= 0:
            raise ValueError("need max_restarts >= 0 and window_s > 0")


class RestartBudget:
    """One service's recent restarts under a RestartPolicy."""

    def __init__(self, policy: RestartPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._restarts: deque[float] = deque()

    def recent(self) -> int:
        """Restarts within the last window_s."""
        horizon = self._clock() - self.policy.window_s
        while self._restarts and self._restarts[0] <= horizon:
            self._restarts.popleft()
        return len(self._restarts)

    def next_delay(self) -> float | None:
        """After an exit: seconds to wait before restarting (the restart is counted now), or None when the service
        has used its budget (max_restarts within window_s) and must not be restarted."""
        recent = self.recent()
        if recent >= self.policy.max_restarts:
            return None
        self._restarts.append(self._clock())
        return min(self.policy.backoff_s * 2**recent, self.policy.backoff_max_s)


def describe_exit(returncode: int | None) -> str:
    """'exit code 3' or 'killed by SIGKILL' (a negative return code is the signal that ended the process)."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"
