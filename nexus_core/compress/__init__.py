"""Compression: prune, quantize, export, benchmark and release steps, and the model-file helpers they share."""
