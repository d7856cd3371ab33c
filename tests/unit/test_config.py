from pathlib import Path

import pytest
from pydantic import Field

from nexus_core.config import NexusModel, config_hash, load_config, parse_overrides, redact
from nexus_core.errors import ConfigError


class Inner(NexusModel):
    size: int = Field(1, description="a size")
    name: str = Field("x", description="a name")


class Outer(NexusModel):
    lr: float = Field(0.1, description="learning rate")
    inner: Inner = Field(default_factory=Inner, description="inner")
    tags: list[str] = Field(default_factory=list, description="tags")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_is_relative_to_the_file_and_deep_merges(tmp_path):
    write(tmp_path / "base" / "base.yaml", "lr: 0.5\ninner: {size: 3, name: base}\n")
    child = write(tmp_path / "runs" / "child.yaml", "extends: ../base/base.yaml\ninner: {size: 7}\n")
    cfg = load_config(child, Outer)
    assert cfg.lr == 0.5
    assert cfg.inner.size == 7
    assert cfg.inner.name == "base"  # kept from the parent: mappings merge key by key


def test_overrides_and_env_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXUS_TEST_NAME", "from-env")
    path = write(tmp_path / "c.yaml", "inner: {name: '${NEXUS_TEST_NAME}'}\ntags: ['${MISSING_VAR:-dflt}']\n")
    cfg = load_config(path, Outer, ["inner.size=9", "lr=2e-3"])
    assert cfg.inner.name == "from-env"
    assert cfg.tags == ["dflt"]
    assert cfg.inner.size == 9 and cfg.lr == pytest.approx(2e-3)


def test_every_problem_is_reported_with_file_and_dotted_key(tmp_path):
    path = write(tmp_path / "bad.yaml", "lr: fast\ninner: {size: big, colour: red}\nunknown: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, Outer)
    msg = str(info.value)
    assert str(path) in msg
    for key in ("lr:", "inner.size:", "inner.colour: unknown key", "unknown: unknown key"):
        assert key in msg
    assert len(info.value.problems) == 4


def test_missing_file_and_missing_env_are_named(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml", Outer)
    path = write(tmp_path / "e.yaml", "inner: {name: '${NEXUS_SURELY_UNSET_VAR}'}\n")
    with pytest.raises(ConfigError, match=r"inner.name: environment variable \$\{NEXUS_SURELY_UNSET_VAR\}"):
        load_config(path, Outer)


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml", Outer)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["lr"])


def test_hash_is_stable_and_sensitive():
    assert config_hash(Outer()) == config_hash(Outer())
    assert config_hash(Outer()) != config_hash(Outer(lr=0.2))


def test_redact_hides_secrets_but_not_token_counts():
    out = redact({"api_key": "sk-123", "max_tokens": 5, "nested": {"hf_token": "x", "tokenizer": "t"}})
    assert out == {"api_key": "***", "max_tokens": 5, "nested": {"hf_token": "***", "tokenizer": "t"}}
