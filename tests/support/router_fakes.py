"""Fakes for the router's unit tests, shared by the files that need them."""
from __future__ import annotations

from collections.abc import Iterable

from hotslot.services.router.downstream import ExecutorClient, ExecutorConnector


class FakeConnector(ExecutorConnector):
    """Hands out the given executor clients (fakes with an `address`) by address."""

    def __init__(self, executors: Iterable[ExecutorClient]) -> None:
        self.executors = {executor.address: executor for executor in executors}  # type: ignore[attr-defined]

    def connect(self, address: str) -> ExecutorClient:
        return self.executors[address]
