"""storage-cache: the per-node, content-addressed copy of model files in front of the shared backing store."""
