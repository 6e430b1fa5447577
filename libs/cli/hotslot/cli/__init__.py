"""The `hotslot` command line."""
