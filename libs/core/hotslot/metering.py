"""What the services' metrics objects share, without grpc (cores import it): histogram bucket bounds and a meter
that records nothing, for cores built without metrics (unit tests). The Prometheus endpoint and the gRPC metrics
are in hotslot.bootstrap.metrics."""
from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import metrics

# Bucket bounds (seconds) of every latency histogram: from a swap (microseconds) and a unary RPC (milliseconds) to a
# cold load from the share (minutes). The OpenTelemetry default bounds (0-10000) are meant for milliseconds.
SECONDS_BUCKETS: Sequence[float] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000,
)
# Bytes per second (storage-cache fills): 1 MiB/s to 16 GiB/s, doubling.
BANDWIDTH_BUCKETS: Sequence[float] = tuple(float(2**20 * 2**i) for i in range(15))


def no_meter() -> metrics.Meter:
    return metrics.NoOpMeterProvider().get_meter("hotslot")
