"""Flux.2 steps: prepare (images + captions → MDS), precompute (latents + text embeddings), train."""
