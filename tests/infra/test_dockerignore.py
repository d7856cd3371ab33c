"""Docker images carry no local state or secrets: `.dockerignore` keeps them out of the build context."""

from __future__ import annotations

import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for these simple patterns: a path is out when it or one of its parents matches."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/"))
               or fnmatch.fnmatch(p.rsplit("/", 1)[-1], pat.removeprefix("**/"))
               for p in prefixes for pat in patterns)


def test_state_caches_and_secrets_stay_out_of_the_image():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in [".venv/bin/python", ".nexus/llm_cache.sqlite", ".nexus/mlflow.db", "data/processed/distill/x_v1/a",
                 ".env", ".env.local", "deploy/prod.env", ".streamlit/secrets.toml", ".git/config",
                 "nexus_core/__pycache__/x.pyc", "keys/server.pem"]:
        assert _ignored(path, patterns), path
    for path in ["nexus_core/runner.py", "configs/presets/tiny.yaml", "data/raw/scientific/abstracts.jsonl",
                 ".streamlit/config.toml", "pyproject.toml", "constraints.txt"]:
        assert not _ignored(path, patterns), path  # the code and its small shipped data still go in
