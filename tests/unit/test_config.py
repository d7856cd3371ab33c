from pathlib import Path

import pytest
from pydantic import Field

from nexus_core.config import (
    ConfigPath,
    FlowConfig,
    NexusModel,
    PathOrName,
    config_hash,
    load_config,
    parse_overrides,
    redact,
    repo_root,
    runtime_field,
)
from nexus_core.errors import ConfigError


class Inner(NexusModel):
    size: int = Field(default=1, description="a size")
    name: str = Field(default="x", description="a name")


class Outer(NexusModel):
    lr: float = Field(default=0.1, description="learning rate")
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


# --- one loader for files and deployment parameters; paths relative to the repository root ---------------


class Paths(NexusModel):
    rules: ConfigPath = Field(default="rules.yaml", validate_default=True, description="a file")
    sources: list[ConfigPath] = Field(default_factory=list, description="files")
    model: PathOrName | None = Field(default=None, description="a directory or an artifact name")
    workers: int = runtime_field(1, "runtime knob, not in cache keys")


class Flow(FlowConfig):
    lr: float = Field(default=0.1, description="learning rate")
    inner: Inner = Field(default_factory=Inner, description="inner")
    paths: Paths = Field(default_factory=Paths, description="paths")


def test_nested_extends_are_relative_to_the_file_that_names_them(tmp_path):
    write(tmp_path / "configs" / "parts" / "inner.yaml", "size: 5\nname: part\n")
    write(tmp_path / "configs" / "base.yaml", "lr: 0.5\n")
    run = write(tmp_path / "configs" / "runs" / "run.yaml",
                "extends: ../base.yaml\ninner:\n  extends: ../parts/inner.yaml\n  size: 6\n")
    cfg = load_config(run, Flow)
    assert (cfg.lr, cfg.inner.size, cfg.inner.name) == (0.5, 6, "part")
    assert cfg.extends is None  # merged in and cleared: nothing left to resolve again


def test_config_paths_resolve_against_the_root_holding_configs_whatever_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "models" / "m1").mkdir(parents=True)
    path = write(tmp_path / "configs" / "a" / "run.yaml",
                 "paths:\n  sources: [data/x.jsonl, /abs/y.jsonl, s3://bucket/z.jsonl]\n  model: models/m1\n")
    monkeypatch.chdir(write(tmp_path / "elsewhere" / "f", "").parent)
    cfg = load_config(path, Flow)
    assert cfg.paths.sources == [str(tmp_path / "data/x.jsonl"), "/abs/y.jsonl", "s3://bucket/z.jsonl"]
    assert cfg.paths.rules == str(tmp_path / "rules.yaml")  # a relative default is resolved too
    assert cfg.paths.model == str(tmp_path / "models/m1")  # PathOrName: it exists, so it is a path
    assert load_config(path, Flow, ["paths.model=tiny_base@v2"]).paths.model == "tiny_base@v2"  # a name


def test_config_paths_are_written_relative_to_the_repo_so_cache_keys_travel(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    rel = Paths(sources=["data/raw/x.jsonl"], workers=1)
    absolute = Paths(sources=[str(repo_root() / "data/raw/x.jsonl")], workers=4)
    assert rel.sources == absolute.sources == [str(repo_root() / "data/raw/x.jsonl")]
    assert rel.model_dump(mode="json")["sources"] == ["data/raw/x.jsonl"]
    assert config_hash(rel, runtime=False) == config_hash(absolute, runtime=False)
    assert config_hash(rel) != config_hash(absolute)  # `workers` counts unless runtime=False


def test_deployment_parameters_go_through_the_same_loader(tmp_path, monkeypatch):
    """A ``cfg`` parameter like prefect.yaml's: extends (from the repo root), overrides, ${VAR:-default}."""
    preset = write(tmp_path / "configs" / "presets" / "p.yaml",
                   "extends: base.yaml\ninner: {name: '${NEXUS_TEST_UNSET_VAR:-from-default}'}\n")
    write(tmp_path / "configs" / "presets" / "base.yaml", "lr: 0.25\n")
    monkeypatch.setenv("NEXUS_REPO", str(tmp_path))
    monkeypatch.chdir(write(tmp_path / "elsewhere" / "f", "").parent)
    params = {"extends": str(preset.relative_to(tmp_path)), "overrides": ["inner.size=4"],
              "paths": {"sources": ["${NEXUS_TEST_DIR:-data}/a.jsonl"]}}
    cfg = Flow.model_validate(params)
    assert (cfg.lr, cfg.inner.name, cfg.inner.size) == (0.25, "from-default", 4)
    assert cfg.paths.sources == [str(tmp_path / "data" / "a.jsonl")]
    monkeypatch.setenv("NEXUS_TEST_UNSET_VAR", "from-env")
    assert Flow.model_validate(params).inner.name == "from-env"
    with pytest.raises(ConfigError, match=r"inner.name: environment variable \$\{NEXUS_SURELY_UNSET_VAR\}"):
        Flow.model_validate({"inner": {"name": "${NEXUS_SURELY_UNSET_VAR}"}})
    with pytest.raises(ConfigError, match="file not found"):
        Flow.model_validate({"extends": "configs/presets/missing.yaml"})


# --- no secrets at rest: redact covers every secret-looking name; configs may not hold keys ---------------


@pytest.mark.parametrize("key", ["api_token", "aws_secret_access_key", "private_key", "authorization", "Authorization",
                                 "secret_key", "passwd", "api-key", "API_KEY", "openai_api_key", "openaiApiKey",
                                 "hf_token", "password", "token", "client-secret"])
def test_redact_covers_secret_names(key):
    assert redact({"a": {key: "value-1"}}) == {"a": {key: "***"}}


@pytest.mark.parametrize("key", ["api_key_env", "max_tokens", "tokenizer", "cache_key", "caption_key", "top_logprobs",
                                 "secretary", "keyword"])
def test_redact_keeps_ordinary_names(key):
    assert redact({key: "value-1"}) == {key: "value-1"}


def test_redact_hides_the_value_of_a_secret_env_var_whatever_the_key(monkeypatch):
    monkeypatch.setenv("NEXUS_TEST_SERVICE_TOKEN", "abc-0123456789-xyz")
    assert redact({"note": "abc-0123456789-xyz", "other": ["x abc-0123456789-xyz y"], "n": 1}) == \
        {"note": "***", "other": ["x *** y"], "n": 1}


class Teacherish(NexusModel):
    api_key_env: str | None = Field(default=None, description="variable holding the key")
    model: str = Field(default="m", description="a model")


class WithTeacher(FlowConfig):
    teacher: Teacherish = Field(default_factory=Teacherish, description="teacher")


@pytest.mark.parametrize("line,key", [("teacher: {api_key: sk-abc123456789}", "teacher.api_key"),
                                      ("teacher: {Api-Key: plain-value-123}", "teacher.Api-Key"),
                                      ("teacher: {password: hunter2hunter2}", "teacher.password"),
                                      ("teacher: {aws_secret_access_key: x}", "teacher.aws_secret_access_key"),
                                      ("token: 'abc-value-123'", "token"),
                                      ("teacher: {api_key: '${NEXUS_TEST_PLANTED_KEY}'}", "teacher.api_key")])
def test_a_key_in_yaml_is_refused_naming_file_and_key_not_value(tmp_path, monkeypatch, line, key):
    monkeypatch.setenv("NEXUS_TEST_PLANTED_KEY", "planted-value-42")
    cfg = write(tmp_path / "configs" / "c.yaml", line + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg, WithTeacher)
    msg = str(info.value)
    assert str(cfg) in msg and f"- {key}: looks like a secret" in msg and "api_key_env" in msg
    for value in ("sk-abc123456789", "plain-value-123", "hunter2hunter2", "abc-value-123", "planted-value-42"):
        assert value not in msg


def test_api_key_env_names_a_variable_and_is_allowed(tmp_path):
    cfg = write(tmp_path / "configs" / "c.yaml", "teacher: {api_key_env: OPENAI_API_KEY}\n")
    assert load_config(cfg, WithTeacher).teacher.api_key_env == "OPENAI_API_KEY"


def test_a_key_in_deployment_parameters_or_their_preset_is_refused(tmp_path, monkeypatch):
    preset = write(tmp_path / "configs" / "presets" / "p.yaml", "teacher: {secret_key: from-the-preset-99}\n")
    monkeypatch.setenv("NEXUS_REPO", str(tmp_path))
    with pytest.raises(ConfigError, match=r"teacher\.secret_key: looks like a secret") as info:
        WithTeacher.model_validate({"extends": str(preset.relative_to(tmp_path))})
    assert "from-the-preset-99" not in str(info.value)
    with pytest.raises(ConfigError, match=r"teacher\.api_key: looks like a secret") as info:
        WithTeacher.model_validate({"overrides": ["teacher.api_key=sk-override-123456"]})
    assert "sk-override-123456" not in str(info.value)
