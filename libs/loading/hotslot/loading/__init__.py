"""Fast model loading: meta-device skeletons, large-read safetensors into shared memory, assignment without copies,
and the preloader subprocess that does the reading beside inference.

Nothing heavy is imported here on purpose: the preloader child imports `hotslot.loading.reader` and
`hotslot.loading.preloader`, and must not pay for diffusers/transformers through this package's `__init__`.
Import the submodules directly (`from hotslot.loading.pipeline_loader import load_pipeline`).
"""
