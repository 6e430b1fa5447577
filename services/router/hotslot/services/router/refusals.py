"""The router's log of the requests it refuses with RESOURCE_EXHAUSTED: one WARNING per reason at most every
interval, saying how many more were refused for that reason since the last line, so an overload is visible to an
operator without flooding the log."""
from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_REFUSAL_LOG_INTERVAL_S = 10.0


class RefusalReason(enum.Enum):
    QUEUE_FULL = "router queue full"
    QUEUE_TIMEOUT = "no executor had room in time"
    EXECUTOR_REFUSED = "executor refused"


@dataclass
class _Logged:
    at: float
    suppressed: int = 0


class RefusalLog:
    def __init__(
        self, logger: logging.Logger, interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[RefusalReason, _Logged] = {}

    def refused(self, reason: RefusalReason, message: str, **extra: object) -> None:
        """Logs one refusal, or counts it when a line for `reason` was logged less than interval_s ago."""
        now = self._clock()
        last = self._last.get(reason)
        if last is not None and now - last.at < self.interval_s:
            last.suppressed += 1
            return
        more = ""
        if last is not None and last.suppressed:
            more = f" ({last.suppressed} more refused for this reason in the {now - last.at:.0f} s before)"
        self._logger.warning(
            "refused a request with RESOURCE_EXHAUSTED, %s: %s%s", reason.value, message, more,
            extra={"refusal_reason": reason.name, **extra},
        )
        self._last[reason] = _Logged(now)
