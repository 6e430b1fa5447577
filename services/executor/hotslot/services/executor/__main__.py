"""`hotslot-executor` (also `python -m hotslot.services.executor`): runs an executor alone, with the flags of
`hotslot serve executor`. It needs only hotslot-core and this distribution, not the `hotslot` command."""
from __future__ import annotations

from hotslot.bootstrap.settings_command import service_main
from hotslot.services.executor.settings import ExecutorSettings


def main() -> None:
    service_main(ExecutorSettings, "hotslot.services.executor.wiring", "Run an executor (the same flags as `hotslot serve executor`).")


if __name__ == "__main__":
    main()
