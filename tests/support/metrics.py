"""Scraping a service's Prometheus endpoint in tests: one GET of /metrics, parsed from the text format."""
from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import ServiceProcess


class Scrape:
    """One scrape of a service's /metrics endpoint (the one it logged at start)."""

    def __init__(self, svc: ServiceProcess) -> None:
        assert svc.metrics_url.startswith("http://"), f"{svc.name} logged no metrics endpoint"
        with urllib.request.urlopen(svc.metrics_url, timeout=10) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            self.text = reply.read().decode()
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}

    def value(self, sample: str, **labels: str) -> float:
        """The sum of the samples named `sample` whose labels include `labels` (0 if none)."""
        return sum(s.value for f in self.families.values() for s in f.samples
                   if s.name == sample and labels.items() <= s.labels.items())

    def type_of(self, family: str) -> str:
        return self.families[family].type
