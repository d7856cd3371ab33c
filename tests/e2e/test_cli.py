"""The ``nexus`` command end to end, as a user runs it: exit codes and messages."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def nexus(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=600)


def test_unknown_config_key_fails_before_any_work(repo, tmp_path):
    data = tmp_path / "data"
    out = nexus("run", "lifecycle", "configs/presets/tiny_base.yaml", "base_model.tiny.colour=red",
                env={"NEXUS_DATA": str(data)}, cwd=repo)
    assert out.returncode == 1
    assert "base_model.tiny.colour: unknown key" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (data / "processed").exists()


def test_wrong_type_and_unknown_flow(repo):
    out = nexus("run", "lifecycle", "configs/presets/tiny_base.yaml", "base_model.tiny.hidden_size=big", cwd=repo)
    assert out.returncode == 1 and "base_model.tiny.hidden_size" in out.stderr
    out = nexus("run", "nosuchflow", "configs/presets/tiny_base.yaml", cwd=repo)
    assert out.returncode == 1 and "unknown flow 'nosuchflow'" in out.stderr


def test_bad_jsonl_line_fails_with_line_number_and_keeps_earlier_versions(repo, tmp_path):
    data = tmp_path / "data"
    raw = tmp_path / "corpus.jsonl"
    good = json.dumps({"title": "t", "abstract": "a", "domain": "d", "text": "some text"})
    raw.write_text(good + "\n")
    env = {"NEXUS_DATA": str(data), "NEXUS_HOME": str(tmp_path / "home")}
    ok = nexus("run", "lifecycle", "configs/presets/tiny_base.yaml", f"corpus.sources=[{raw}]", env=env, cwd=repo)
    assert ok.returncode == 0, ok.stderr
    assert "manifest.json" in ok.stdout
    raw.write_text(good + "\n{not json\n")
    bad = nexus("run", "lifecycle", "configs/presets/tiny_base.yaml", f"corpus.sources=[{raw}]", env=env, cwd=repo)
    assert bad.returncode != 0
    assert f"{raw}:2: not valid JSON" in bad.stderr
    versions = sorted(p.name for p in (data / "processed" / "corpus").iterdir() if not p.name.startswith("."))
    assert versions == ["tiny_corpus_v1"]

    ls = nexus("data", "ls", env=env, cwd=repo)
    assert ls.returncode == 0 and "tiny_corpus" in ls.stdout and "tiny_base" in ls.stdout
    show = nexus("data", "show", "tiny_corpus@v1", env=env, cwd=repo)
    assert show.returncode == 0 and '"rows": 1' in show.stdout
    missing = nexus("data", "show", "tiny_corpus@v9", env=env, cwd=repo)
    assert missing.returncode == 1 and "no version v9" in missing.stderr
