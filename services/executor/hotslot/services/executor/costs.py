"""What an executor measures of itself for cost-based placement: device seconds per request as a fixed part plus a
part per work unit, and the cost of a load per source tier as a fixed part plus a part per GiB, each a least-squares
fit over the most recent samples. Also the estimates the queue policy admits overtakers on. No grpc, no torch."""
from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass

from .generation import GenerationParams
from .slots import Tier

GiB = 1024**3
# Samples each fit keeps: enough to average out a noisy neighbour, few enough to follow a change of load or clocks.
COST_WINDOW = 32
# Tiers a model is loaded from (ACTIVE and STANDBY are free).
LOAD_TIERS = (Tier.HOST, Tier.LOCAL_DISK, Tier.BACKING_STORE)
# Most seconds per GiB a load fit assumes while every load it saw was of one size (then fixed and per-GiB parts
# cannot be told apart): host memory to the device, the node's disk, the share (an NFS-like link). The router's
# defaults for an executor that measured nothing are the same.
ONE_SIZE_MAX_SECONDS_PER_GIB = {Tier.HOST: 0.5, Tier.LOCAL_DISK: 1.0, Tier.BACKING_STORE: 4.0}


def work_units(params: GenerationParams) -> float:
    """One unit is one denoising step of one 512x512 image (the contract's CostEstimates definition)."""
    return params.steps * params.width * params.height / 512**2 * params.num_images


@dataclass(frozen=True)
class Line:
    """seconds = fixed + per_unit * x, from `samples` measurements (0: no measurement, both values 0)."""

    fixed: float = 0.0
    per_unit: float = 0.0
    samples: int = 0

    def at(self, x: float) -> float:
        return self.fixed + self.per_unit * x


class LinearFit:
    """Least squares of seconds on size over the last `window` samples. With all sizes equal the two parts cannot
    be told apart: the fit is then a ratio through the origin, or, given `max_slope_when_one_size`, a slope of at
    most that and the rest fixed (a load of one small model size would otherwise price a model 100x larger at 100x
    the time, when most of a small load is its fixed part). A negative part is clamped to 0 and the other refit,
    since neither a load nor a request takes negative time."""

    def __init__(self, window: int = COST_WINDOW, max_slope_when_one_size: float | None = None) -> None:
        self._samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=window)
        self._line = Line()
        self._max_slope = max_slope_when_one_size

    def add(self, x: float, seconds: float) -> None:
        if x < 0 or seconds < 0:
            return
        self._samples.append((x, seconds))
        self._line = fit_line(self._samples, self._max_slope)

    @property
    def line(self) -> Line:
        return self._line


def fit_line(samples: Iterable[tuple[float, float]], max_slope_when_one_size: float | None = None) -> Line:
    points = list(samples)
    n = len(points)
    if n == 0:
        return Line()
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var_x = sum((x - mean_x) ** 2 for x, _ in points)
    if var_x <= 1e-12 * max(1.0, mean_x**2):
        if mean_x <= 0:
            return Line(mean_y, 0.0, n)
        slope = mean_y / mean_x
        if max_slope_when_one_size is not None and slope > max_slope_when_one_size:
            return Line(mean_y - max_slope_when_one_size * mean_x, max_slope_when_one_size, n)
        return Line(0.0, slope, n)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var_x
    fixed = mean_y - slope * mean_x
    if slope < 0:
        return Line(mean_y, 0.0, n)
    if fixed < 0:
        sum_xx = sum(x * x for x, _ in points)
        return Line(0.0, sum(x * y for x, y in points) / sum_xx, n)
    return Line(fixed, slope, n)


@dataclass(frozen=True)
class CostSnapshot:
    seconds_per_work_unit: float
    seconds_per_request: float
    backlog_seconds: float
    load_costs: dict[Tier, Line]  # per source tier; x in GiB
    default_steps: int
    default_width: int
    default_height: int


class CostModel:
    """Device time of pipeline calls (a batch is one call of its summed units) and load time per source tier.

    The first `warmup_calls` pipeline calls of the process are not counted: the first one pays torch's one-time
    set-up (thread pools, kernel selection; on CUDA, context and autotuning), 20x a later call on the test
    pipelines, and an estimate that counted it would refuse every overtake until many calls had diluted it."""

    def __init__(self, window: int = COST_WINDOW, warmup_calls: int = 1) -> None:
        self._service = LinearFit(window)
        self._loads = {tier: LinearFit(window, ONE_SIZE_MAX_SECONDS_PER_GIB[tier]) for tier in LOAD_TIERS}
        self._warmup_left = warmup_calls

    # -- measurements ------------------------------------------------------------------------------------
    def record_call(self, units: float, seconds: float) -> None:
        if self._warmup_left > 0:
            self._warmup_left -= 1
            return
        self._service.add(units, seconds)

    def record_load(self, from_tier: Tier, size_bytes: int, seconds: float) -> None:
        if from_tier in self._loads:
            self._loads[from_tier].add(size_bytes / GiB, seconds)

    # -- estimates ---------------------------------------------------------------------------------------
    @property
    def service(self) -> Line:
        return self._service.line

    def load(self, tier: Tier) -> Line:
        return self._loads[tier].line if tier in self._loads else Line()

    def call_seconds(self, params: Iterable[GenerationParams]) -> float | None:
        """Estimated device seconds of one pipeline call serving these requests; None before any call was
        measured (then nothing may overtake: its cost is unknown)."""
        line = self.service
        if not line.samples:
            return None
        return line.at(sum(work_units(p) for p in params))

    def load_seconds(self, tier: Tier | None, size_bytes: int) -> float:
        """Estimated seconds to make a model active from `tier`; 0 when held ready or never measured."""
        if tier is None or tier not in self._loads:
            return 0.0
        line = self.load(tier)
        return line.at(size_bytes / GiB) if line.samples else 0.0
