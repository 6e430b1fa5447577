"""`hotslot-router` (also `python -m hotslot.services.router`): runs the router, the public entry point alone, with the flags of
`hotslot serve router`. It needs only hotslot-core and this distribution, not the `hotslot` command."""
from __future__ import annotations

from hotslot.bootstrap.settings_command import service_main
from hotslot.services.router.settings import RouterSettings


def main() -> None:
    service_main(RouterSettings, "hotslot.services.router.wiring", "Run the router, the public entry point (the same flags as `hotslot serve router`).")


if __name__ == "__main__":
    main()
