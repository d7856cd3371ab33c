"""Flux.2 helpers shared by the flux steps: losses and weightings, MDS shard I/O, latent packing."""
