"""Model references: artifact spec, local dir, hub id through the HF cache (offline), with errors that
say which kind of reference failed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nexus_core.artifacts import raw_ref
from nexus_core.errors import InputError
from nexus_core.models.io import check_model_dir, load_causal_lm, resolve_model

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llm: Path) -> Path:
    """A Hugging Face cache laid out as ``huggingface_hub`` writes it, holding ``nexus-test/tiny-llm``."""
    cache = tmp_path / "hub"
    repo = cache / "models--nexus-test--tiny-llm"
    snapshot = repo / "snapshots" / SHA
    shutil.copytree(tiny_llm, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_resolves_through_the_cache_and_loads(hf_cache):
    ref = resolve_model("nexus-test/tiny-llm")
    assert ref.digest == f"hf:nexus-test/tiny-llm@{SHA}"  # the hub revision is the model's identity
    assert ref.kind == "model" and Path(ref.uri).name == SHA
    model, tokenizer = load_causal_lm(ref.uri)
    ids = tokenizer("What is two plus two?", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def test_hub_id_not_cached_offline_says_so(hf_cache):
    with pytest.raises(InputError, match=r"hub id.*not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve_model("Qwen/Qwen2.5-0.5B")


def test_missing_path_is_reported_as_a_path_not_a_dataset(tmp_path):
    with pytest.raises(InputError) as err:
        resolve_model(str(tmp_path / "nope" / "model"))
    assert "no such file or directory" in str(err.value) and str(tmp_path) in str(err.value)
    assert "dataset" not in str(err.value)


def test_local_dir_and_artifact_spec(tiny_llm, tmp_path, data_root):
    ref = resolve_model(str(tiny_llm))
    assert ref.digest == raw_ref(tiny_llm).digest and ref.kind == "model"
    with pytest.raises(InputError, match="not a Hugging Face model directory"):
        resolve_model(str(tmp_path))
    with pytest.raises(InputError, match="not in the Hugging Face cache.*nor is it a known artifact"):
        resolve_model("models/never_built@v3")


def test_check_model_dir_wants_weights(tmp_path, tiny_llm):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(tiny_llm / "config.json", d / "config.json")
    with pytest.raises(InputError, match="without weights"):
        check_model_dir(d)
