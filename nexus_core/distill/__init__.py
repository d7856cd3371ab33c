"""Distillation data: teacher inputs, collection, filters, review, regeneration, SFT packaging, and their helpers."""
