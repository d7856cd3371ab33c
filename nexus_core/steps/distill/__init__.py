"""Distillation data pipeline steps: teacher inputs, collection, filters, review, regeneration, SFT packaging."""
