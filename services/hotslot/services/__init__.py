"""hotslot's services: registry, storage_cache, executor, router."""
