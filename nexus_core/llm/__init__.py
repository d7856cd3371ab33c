"""The LLM client every teacher and judge call goes through (litellm), and its worker-process pool."""
