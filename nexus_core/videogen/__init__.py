"""Video generation: an LLM drives Stable Video Diffusion through a trained projector (tiny SVD, precompute, train, render)."""
