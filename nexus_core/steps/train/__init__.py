"""LLM training stages, one module per method: sft, cpt, dpo, orpo, grpo, reward, kd."""
