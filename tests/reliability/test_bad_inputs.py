"""Bad inputs: each gives one ``error:`` line naming the file and the key or line, a non-zero exit and
no manifest for the failing step; typed fields are strict (a number where text belongs is an error,
not the string "5").

The first half calls the functions that read each input; the ``slow`` half drives the ``nexus`` CLI in
a subprocess, as a user does.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nexus_core.config import ConfigError, load_config, validate
from nexus_core.errors import InputError

# ------------------------------------------------------------------ helpers


def nexus(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=cwd, timeout=600)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _env(tmp_path: Path) -> dict[str, str]:
    return {"NEXUS_DATA": str(tmp_path / "data"), "NEXUS_HOME": str(tmp_path / "home")}


def _manifests(tmp_path: Path, area: str | None = None) -> list[Path]:
    root = tmp_path / "data" / "processed"
    return sorted((root / area if area else root).rglob("manifest.json")) if root.exists() else []


def _fails_once(out: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The one error line of a failed run, checked to contain every needle (the file, the line or key)."""
    assert out.returncode != 0, out.stderr[-3000:]
    lines = _error_lines(out.stderr)
    assert len(lines) == 1, out.stderr[-3000:]
    text = out.stderr[out.stderr.index(lines[0]):]  # the error line and a ConfigError's problem lines under it
    for needle in needles:
        assert needle in text, (needle, text[:2000])
    assert "Traceback" not in out.stderr and not lines[0].startswith("error: unexpected"), out.stderr[-3000:]
    return text


def _jsonl_with_bad_byte_on_line_9(path: Path) -> Path:
    """Eight long valid lines (more than a text decoder's first chunk), then a latin-1 byte on line 9."""
    good = [f'{{"text": "row {i} {"x" * 2000}"}}\n'.encode() for i in range(8)]
    path.write_bytes(b"".join(good) + b'{"text": "caf\xe9"}\n' + b'{"text": "after"}\n')
    return path


def _truncated_model(tiny_llm: Path, where: Path) -> Path:
    model = where / "model"
    shutil.copytree(tiny_llm, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return model


# ------------------------------------------------------------------ the readers themselves


def test_malformed_rules_yaml_names_file_and_line(tmp_path):
    from nexus_core.distill.rules import load_rules

    rules = tmp_path / "filters.yaml"
    rules.write_text("min_chars: 10\naction_verbs: [a, b\ncitation_patterns: []\n")
    with pytest.raises(ConfigError) as info:
        load_rules(rules)
    assert info.value.source == str(rules)
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith("line 3: not valid YAML")
    assert "on line 2" in info.value.problems[0]  # where the unclosed list began
    rules.write_bytes(b"min_chars: 10\naction_verbs: [caf\xe9]\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_rules(rules)
    rules.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_rules(rules)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_non_utf8_byte_is_reported_on_its_own_line(tmp_path, suffix):
    from nexus_core.io import iter_jsonl, read_table

    plain = _jsonl_with_bad_byte_on_line_9(tmp_path / "plain.jsonl")
    path = tmp_path / f"rows{suffix}"
    if suffix == ".jsonl.gz":
        path.write_bytes(gzip.compress(plain.read_bytes()))
    elif suffix == ".jsonl.zst":
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    else:
        path = plain
    with pytest.raises(InputError, match=rf"^{path}:9: not valid UTF-8"):
        list(iter_jsonl(path))
    with pytest.raises(InputError, match=rf"^{path}:9: not valid UTF-8"):
        read_table(path)


def test_a_number_where_earlier_rows_have_text_is_named_by_line_and_key(tmp_path):
    from nexus_core.io import read_table

    path = tmp_path / "rows.jsonl"
    path.write_text('{"title": "a", "text": "x"}\n\n{"title": 5, "text": "y"}\n')
    with pytest.raises(InputError, match=rf"^{path}:3: title: expected a string \(as on line 1\), got a number: 5$"):
        read_table(path)
    path.write_text('{"n": 1, "t": null}\n{"n": 2.5, "t": "a"}\n{"n": null, "t": "b"}\n')  # ints, floats, nulls mix
    assert read_table(path)["n"].to_list() == [1.0, 2.5, None]


def test_teacher_inputs_refuse_a_number_for_a_text_field(tmp_path):
    from nexus_core.distill.inputs import _enhanced_records, _jsonl_records

    path = tmp_path / "src.jsonl"
    path.write_text('{"title": 5, "abstract": "a", "domain": "bio", "text": "Soil respiration rises."}\n')
    with pytest.raises(InputError, match=r"record 1: expected text field\(s\): title is int"):
        _jsonl_records(path)
    enhanced = tmp_path / "enhanced.json"
    enhanced.write_text('{"texts": [{"text": "Soil respiration rises.", "title": 5}]}')
    with pytest.raises(InputError, match=r"texts\[0\]: expected text field\(s\): title is int"):
        _enhanced_records(enhanced, "general")


def test_config_text_fields_refuse_numbers(tmp_path, repo):
    from flows.distill import DistillConfig

    cfg = tmp_path / "configs" / "bad.yaml"
    cfg.parent.mkdir()
    cfg.write_text(f"extends: {repo}/configs/distill/tiny.yaml\nname: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg, DistillConfig)
    assert info.value.source == str(cfg) and info.value.problems == ["name: Input should be a valid string"]
    from nexus_core.distill.prompts import TeacherConfig

    with pytest.raises(ConfigError, match="model: Input should be a valid string"):
        validate(TeacherConfig, {"model": 5})


def test_non_utf8_caption_is_a_skip_reason_naming_the_file(tmp_path):
    from PIL import Image

    from nexus_core.artifacts import raw_ref
    from nexus_core.flux.prepare import PrepareConfig, _items, sstk_entries

    for name in ("a", "b"):
        Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("a red square")
    (tmp_path / "b.txt").write_bytes(b"a red caf\xe9")
    items = _items(PrepareConfig(source="folder"), {"source": raw_ref(str(tmp_path))})
    assert [(p.name, cap, reason) for p, cap, _, reason in items] == [
        ("a.png", "a red square", ""),
        ("b.png", None, f"caption: {tmp_path / 'b.txt'}: not valid UTF-8 (unexpected end of data at byte 9)")]
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"a.png\n\ncaf\xe9.png\n")
    with pytest.raises(InputError, match=rf"^{listing}:3: not valid UTF-8"):
        sstk_entries(listing)


def test_truncated_safetensors_is_named_before_loading(tmp_path, tiny_llm):
    from nexus_core.models.io import check_model_dir, load_causal_lm, resolve_model

    model = _truncated_model(tiny_llm, tmp_path)
    expected = rf"^model {model / 'model.safetensors'}: unreadable safetensors file \(.*\)$"
    with pytest.raises(InputError, match=expected):
        check_model_dir(model)
    with pytest.raises(InputError, match=expected):
        resolve_model(str(model))
    with pytest.raises(InputError, match=expected):
        load_causal_lm(model)
    assert check_model_dir(tiny_llm) == tiny_llm  # a whole file passes


def test_model_loading_errors_become_one_input_error(tmp_path, tiny_llm):
    from nexus_core.models.io import load_causal_lm

    model = tmp_path / "model"
    shutil.copytree(tiny_llm, model)
    (model / "config.json").write_text("{not json")
    with pytest.raises(InputError, match=rf"^model {model}: cannot be loaded \(OSError: .*config.json"):
        load_causal_lm(model)


def test_oversized_config_names_its_biggest_key_before_prefect(tmp_path, repo):
    from flows.common import load_flow_config
    from flows.distill import DistillConfig

    cfg = tmp_path / "big.yaml"
    cfg.write_text(f"extends: {repo}/configs/distill/tiny.yaml\nname: {'x' * 600_000}\n")
    with pytest.raises(ConfigError) as info:
        load_flow_config(DistillConfig, str(cfg))
    assert info.value.source == str(cfg)
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith("name: 600,002 bytes as JSON")
    assert "524,288 bytes" in info.value.problems[0]
    cfg.write_text(f"extends: {repo}/configs/distill/tiny.yaml\nname: {'x' * 1000}\n")
    assert load_flow_config(DistillConfig, str(cfg)).name == "x" * 1000


# ------------------------------------------------------------------ the `nexus` command, as a user runs it


@pytest.mark.slow
def test_cli_malformed_rules_fail_before_the_first_stage(repo, tmp_path):
    rules = tmp_path / "filters.yaml"
    rules.write_text("min_chars: 10\naction_verbs: [a, b\ncitation_patterns: []\n")
    out = nexus("run", "distill", "configs/distill/tiny.yaml", f"filters.rules={rules}", env=_env(tmp_path), cwd=repo)
    _fails_once(out, f"error: invalid config {rules}:", "line 3: not valid YAML")
    assert _manifests(tmp_path) == []


@pytest.mark.slow
def test_cli_non_utf8_jsonl_names_line_9(repo, tmp_path):
    raw = _jsonl_with_bad_byte_on_line_9(tmp_path / "corpus.jsonl")
    out = nexus("run", "lifecycle", "configs/presets/tiny_base.yaml", f"corpus.sources=[{raw}]",
                env=_env(tmp_path), cwd=repo)
    _fails_once(out, f"error: {raw}:9: not valid UTF-8")
    assert _manifests(tmp_path) == []


@pytest.mark.slow
def test_cli_a_number_in_a_text_column_names_line_and_key(repo, tmp_path):
    raw = tmp_path / "corpus.jsonl"
    raw.write_text('{"title": "a", "text": "Soil respiration rises after rewetting."}\n'
                   '{"title": 5, "text": "Plants absorb carbon dioxide."}\n')
    out = nexus("run", "lifecycle", "configs/presets/tiny_base.yaml", f"corpus.sources=[{raw}]",
                env=_env(tmp_path), cwd=repo)
    _fails_once(out, f"error: {raw}:2: title: expected a string")
    assert _manifests(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("flow,config", [("evaluate", "configs/eval/tiny.yaml"),
                                         ("compress", "configs/compress/tiny.yaml")])
def test_cli_truncated_model_is_named(repo, tmp_path, tiny_llm, flow, config):
    model = _truncated_model(tiny_llm, tmp_path)
    out = nexus("run", flow, config, f"model={model}", env=_env(tmp_path), cwd=repo)
    _fails_once(out, f"error: model {model / 'model.safetensors'}: unreadable safetensors file")
    assert _manifests(tmp_path) == []


@pytest.mark.slow
def test_cli_oversized_config_value_is_a_config_error(repo, tmp_path):
    cfg = tmp_path / "big.yaml"
    cfg.write_text(f"extends: {repo}/configs/distill/tiny.yaml\nname: {'x' * 600_000}\n")
    out = nexus("run", "distill", str(cfg), env=_env(tmp_path), cwd=repo)
    _fails_once(out, f"error: invalid config {cfg}:", "name: 600,002 bytes as JSON", "524,288")
    assert "422" not in out.stderr
    assert _manifests(tmp_path) == []


@pytest.mark.slow
def test_cli_non_utf8_caption_names_the_caption_file(repo, tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(images / "a.png")
    (images / "a.txt").write_bytes(b"a red caf\xe9")
    out = nexus("run", "flux", "configs/flux/tiny.yaml", f"data.source={images}", env=_env(tmp_path), cwd=repo)
    _fails_once(out, f"error: flux prepare: caption: {images / 'a.txt'}: not valid UTF-8")
    assert _manifests(tmp_path, "flux") == []  # the tiny pipeline it builds first is a valid artifact
