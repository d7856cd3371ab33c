"""Flux.2: prepare, precompute, train and tiny-pipeline steps, and their helpers (losses, MDS I/O, encoding)."""
