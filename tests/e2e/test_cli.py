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


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_failing_run_prints_one_error_line_and_no_traceback(repo, tmp_path):
    """A bad input found inside a task: Prefect logs the failed task and flow runs, without tracebacks."""
    raw = tmp_path / "corpus.jsonl"
    raw.write_text("{not json\n")
    env = {"NEXUS_DATA": str(tmp_path / "data"), "NEXUS_HOME": str(tmp_path / "home")}
    args = ("run", "lifecycle", "configs/presets/tiny_base.yaml", f"corpus.sources=[{raw}]")
    out = nexus(*args, env=env, cwd=repo)
    assert out.returncode == 1
    assert _error_lines(out.stderr) == [f"error: {raw}:1: not valid JSON (Expecting property name enclosed in "
                                        "double quotes)"], out.stderr
    assert "Traceback" not in out.stderr and "Task run 'ingest" in out.stderr  # the failed task is still named

    debug = nexus(*args, "--debug", env=env, cwd=repo)
    assert debug.returncode == 1 and len(_error_lines(debug.stderr)) == 1
    assert "Traceback (most recent call last)" in debug.stderr


def test_a_bad_key_with_debug_shows_the_traceback(repo):
    out = nexus("--debug", "run", "lifecycle", "configs/presets/tiny_base.yaml", "base_model.tiny.colour=red",
                cwd=repo)
    assert out.returncode == 1 and "Traceback" in out.stderr
    assert _error_lines(out.stderr) == ["error: invalid config configs/presets/tiny_base.yaml:"]


def test_python_m_flow_failures_nexus_and_unexpected(repo, tmp_path):
    """``python -m`` entry point: a NexusError raised in a task is one line; an unexpected exception is one
    line naming its type, with its traceback saved to a file and shown only with --debug."""
    cfg = tmp_path / "fail.yaml"
    cfg.write_text("error: nexus\n")
    env = {"NEXUS_HOME": str(tmp_path / "home")}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "tests.support.failing_flow", str(cfg), *args],
                              capture_output=True, text=True, env={**os.environ, **env}, cwd=repo, timeout=600)

    out = run()
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert _error_lines(out.stderr) == ["error: /data/rows.jsonl:3: not valid JSON"], out.stderr

    out = run("error=unexpected")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    [line] = _error_lines(out.stderr)
    assert line.startswith("error: unexpected KeyError: 'missing'") and "--debug" in line
    assert "KeyError" in (tmp_path / "home" / "last_error.txt").read_text()

    out = run("error=unexpected", "--debug")
    assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr
    assert len(_error_lines(out.stderr)) == 1


def test_shipped_config_runs_from_another_directory(repo, tmp_path):
    """Relative paths in a shipped config (sources, prompt templates, filter rules, the recorded teacher) are
    relative to the repository root, not to the working directory."""
    env = {"NEXUS_DATA": str(tmp_path / "data"), "NEXUS_HOME": str(tmp_path / "home")}
    out = nexus("run", "distill", str(repo / "configs/distill/tiny.yaml"), env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "manifest.json" in out.stdout


def test_dry_run_checks_every_stage_of_the_lifecycle_and_writes_nothing(repo, tmp_path):
    """``--dry-run`` on the main job: the plan of every stage, nothing produced; a later stage's bad
    dataset (evaluate's, after distill and training) is found up front, naming the file and columns."""
    env = {"NEXUS_DATA": str(tmp_path / "data"), "NEXUS_HOME": str(tmp_path / "home")}
    out = nexus("run", "lifecycle", str(repo / "configs/presets/tiny.yaml"), "--dry-run", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dry run, nothing produced" in out.stdout
    for stage in ("distill.teacher_inputs", "train.1.", "evaluate.predict", "compress."):
        assert stage in out.stdout, out.stdout
    assert not (tmp_path / "data" / "processed").exists()

    bad = tmp_path / "val.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')
    out = nexus("run", "lifecycle", str(repo / "configs/presets/tiny.yaml"), f"evaluate.dataset={bad}",
                env=env, cwd=tmp_path)
    assert out.returncode == 1 and len(_error_lines(out.stderr)) == 1, out.stderr[-3000:]
    assert "val.jsonl" in out.stderr and "input/output" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "data" / "processed").exists()  # nothing ran, not even the corpus ingest
