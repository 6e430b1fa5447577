"""`hotslot-storage-cache` (also `python -m hotslot.services.storage_cache`): runs the storage-cache alone, with the flags of
`hotslot serve storage-cache`. It needs only hotslot-core and this distribution, not the `hotslot` command."""
from __future__ import annotations

from hotslot.bootstrap.settings_command import service_main
from hotslot.services.storage_cache.settings import StorageCacheSettings


def main() -> None:
    service_main(StorageCacheSettings, "hotslot.services.storage_cache.wiring", "Run the storage-cache (the same flags as `hotslot serve storage-cache`).")


if __name__ == "__main__":
    main()
