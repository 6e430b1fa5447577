"""`hotslot-registry` (also `python -m hotslot.services.registry`): runs the model-registry alone, with the flags of
`hotslot serve registry`. It needs only hotslot-core and this distribution, not the `hotslot` command."""
from __future__ import annotations

from hotslot.bootstrap.settings_command import service_main
from hotslot.services.registry.settings import RegistrySettings


def main() -> None:
    service_main(RegistrySettings, "hotslot.services.registry.wiring", "Run the model-registry (the same flags as `hotslot serve registry`).")


if __name__ == "__main__":
    main()
