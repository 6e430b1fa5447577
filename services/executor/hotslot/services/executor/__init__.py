"""executor: runs inference on one device and keeps the hot-swap slot filled by a preloading subprocess."""
