"""model-registry: the catalogue of models with checksummed manifests."""
