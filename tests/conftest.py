"""Test-wide isolation: every test session gets its own NEXUS_HOME and data root."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="nexus-tests-"))
# Set before any nexus/prefect import so Prefect, MLflow and the catalog all land in the temp dir.
os.environ["NEXUS_HOME"] = str(_SESSION_DIR / "home")
os.environ["NEXUS_DATA"] = str(_SESSION_DIR / "data")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("NEXUS_CATALOG_URL", None)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nexus_core.settings import configure_environment  # noqa: E402

configure_environment()

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty data root for one test."""
    root = tmp_path / "data"
    monkeypatch.setenv("NEXUS_DATA", str(root))
    return root


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root."""
    return REPO


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (with its own SQLite database) shared by all flow and task tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


TINY_TEXTS = [
    "What is two plus two? Four.", "Name a primary colour. Red.", "What gas do plants absorb? Carbon dioxide.",
    "Which planet is largest? Jupiter.", "What is ice made of? Frozen water.", "How many legs has a spider? Eight.",
    "What is the capital of France? Paris.", "Which metal is liquid at room temperature? Mercury.",
    "Soil respiration rises after rewetting. We measure and compare samples.",
    "I do not know. <think> </think> Answer: 0 1 2 3 4 5 6 7 8 9",
] * 4


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> Path:
    """The shared tiny model of the test suite: a Llama with a BPE tokenizer trained on ``TINY_TEXTS``,
    saved with ``save_pretrained`` so every consumer loads it through the real ``from_pretrained`` path.
    Treat it as read-only (session-scoped)."""
    from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm

    out = tmp_path_factory.mktemp("tiny-llm") / "model"
    return build_tiny_llm(out, TINY_TEXTS, TinyLLMConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                                         num_attention_heads=4, num_key_value_heads=2))
