"""Starting hotslot services as real child processes in tests: the library's launcher, re-exported."""
from __future__ import annotations

from hotslot.cluster.process import (
    HOTSLOT,
    LISTENING,
    ServiceProcess,
    spawn_service,
    start_service,
    wait_ready,
    wait_serving,
)

__all__ = ["HOTSLOT", "LISTENING", "ServiceProcess", "spawn_service", "start_service", "wait_ready", "wait_serving"]
