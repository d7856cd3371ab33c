"""Shared pieces of the LLM training stages (nexus_core/steps/train/): config, data, control, launch."""
