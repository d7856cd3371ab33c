"""LLM training: one step module per method (sft, cpt, dpo, orpo, grpo, reward, kd, base_model) and the pieces they share."""
