"""`nexus data organize`: capability detection from a file's first rows, the plan, copy/move, no overwrite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from nexus_core.errors import InputError
from nexus_core.io import write_jsonl
from nexus_core.train.organize import apply, classify, organize_file, plan

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("row", "capability", "reason"), [
    ({"input": "q", "tools": [], "tool_calls": [{"name": "f"}], "thinking": "t"}, "tools", "key tool_calls"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}]}, "tools",
     "key messages[].tool_calls"),
    ({"input": "q", "thinking": "t", "output": "a"}, "thinking", "key thinking"),
    ({"messages": [{"role": "assistant", "content": "<think>t</think>a"}]}, "thinking", "<think> in the text"),
    ({"question": "q", "reasoning_content": "r", "answer": "a"}, "reasoning", "key reasoning_content"),
    ({"question": "q", "chain_of_thought": "c", "answer": "a"}, "cot", "key chain_of_thought"),
    ({"prompt": "p", "output": "o", "safety_category": "s"}, "safety", "key safety_category"),
    ({"input": "i", "output": "o", "over_refusal": True}, "anti_refusal", "key over_refusal"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "reasoning": "x"}, "preference", "columns chosen+rejected"),
    ({"messages": [], "images": ["a.png"]}, "vision-qa", "column images"),
    ({"messages": [], "images": ["a.png"], "videos": ["a.mp4"]}, "video-understanding", "column videos"),
    ({"messages": [], "audios": ["a.wav"]}, "audio-understanding", "column audios"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "sft", "column messages"),
    ({"prompt": "p", "completion": "c"}, "sft", "columns prompt+completion"),
    ({"input": "i", "output": "o", "meta": {}}, "sft", "columns input+output"),
    ({"prompt": "p", "answer": "3"}, "grpo", "column prompt"),
    ({"text": "plain"}, "cpt", "column text"),
])
def test_classify_names_the_capability_and_the_deciding_key(row, capability, reason):
    got, why = classify([row])
    assert got == capability
    assert why.startswith(reason)


def test_classify_unknown_lists_the_keys():
    assert classify([{"a": 1, "b": None}]) == (None, "no capability keys (has: a)")


def _tree(tmp_path: Path) -> Path:
    """A raw folder with one file per reader: JSONL, JSONL.zst, Parquet, JSON, plus unknown and corrupt files."""
    raw = tmp_path / "raw"
    write_jsonl([{"input": "q", "tool_calls": [{"name": "f"}]}], raw / "calls.jsonl")
    write_jsonl([{"text": "t"}], raw / "nested" / "corpus.jsonl.zst")
    pl.DataFrame({"prompt": [None, "p"], "chosen": ["c", "c"], "rejected": ["r", "r"]}).write_parquet(
        raw / "prefs.parquet")
    (raw / "chat.json").write_text(json.dumps([{"prompt": "p", "completion": "c"}]))
    (raw / "meta.json").write_text(json.dumps({"generated_at": "now"}))
    (raw / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    (raw / "broken.parquet").write_bytes(b"PAR1 not really")
    (raw / "notes.txt").write_text("not a data file")
    return raw


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_plan_detects_every_format_and_changes_nothing(tmp_path):
    raw, out = _tree(tmp_path), tmp_path / "datasets"
    before = _files(tmp_path)
    placements = plan(raw, out)
    assert _files(tmp_path) == before and not out.exists()  # a dry run is the plan alone
    got = {str(p.source.relative_to(raw)): (p.capability, p.status) for p in placements}
    assert got == {
        "calls.jsonl": ("tools", "copy"), "nested/corpus.jsonl.zst": ("cpt", "copy"),
        "prefs.parquet": ("preference", "copy"), "chat.json": ("sft", "copy"),
        "meta.json": (None, "unknown"), "broken.jsonl": (None, "unreadable"), "broken.parquet": (None, "unreadable"),
    }
    reasons = {p.source.name: p.reason for p in placements}
    assert "broken.jsonl:2: not valid JSON" in reasons["broken.jsonl"]
    assert "unreadable Parquet" in reasons["broken.parquet"]


def test_copy_keeps_sources_and_move_removes_them(tmp_path):
    raw, out = _tree(tmp_path), tmp_path / "datasets"
    calls = (raw / "calls.jsonl").read_bytes()
    apply(plan(raw, out))
    assert (out / "tools/calls.jsonl").read_bytes() == calls and (raw / "calls.jsonl").exists()
    assert (out / "cpt/corpus.jsonl.zst").is_file() and (out / "preference/prefs.parquet").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["cpt", "preference", "sft", "tools"]

    moved = apply(plan(raw, tmp_path / "moved", move=True))
    assert {p.status for p in moved if p.capability} == {"moved"}
    assert (tmp_path / "moved/tools/calls.jsonl").read_bytes() == calls
    assert not (raw / "calls.jsonl").exists() and not (raw / "prefs.parquet").exists()
    left = sorted(p.name for p in raw.rglob("*") if p.is_file())  # unknown and unreadable files stay
    assert left == ["broken.jsonl", "broken.parquet", "meta.json", "notes.txt"]


def test_never_overwrites(tmp_path):
    raw, out = _tree(tmp_path), tmp_path / "datasets"
    apply(plan(raw, out))
    again = {p.source.name: p.status for p in apply(plan(raw, out, move=True))}
    assert again["calls.jsonl"] == "present"  # same bytes already there: nothing to do, source kept
    assert (raw / "calls.jsonl").exists()

    (out / "tools/calls.jsonl").write_text("someone else's\n")
    (raw / "other").mkdir()
    write_jsonl([{"text": "different"}], raw / "other" / "corpus.jsonl.zst")  # same name, same capability
    placements = {str(p.source.relative_to(raw)): p for p in apply(plan(raw, out))}
    assert placements["calls.jsonl"].status == "conflict"
    assert str(out / "tools/calls.jsonl") in placements["calls.jsonl"].reason
    assert (out / "tools/calls.jsonl").read_text() == "someone else's\n"
    assert placements["nested/corpus.jsonl.zst"].status == "present"
    assert placements["other/corpus.jsonl.zst"].status == "conflict"
    with pytest.raises(InputError, match="exists; not overwritten"):
        organize_file(raw / "calls.jsonl", out)


def test_out_inside_dir_is_not_organized_again(tmp_path):
    raw = _tree(tmp_path)
    apply(plan(raw, raw / "datasets"))
    assert not any("datasets" in p.source.parts for p in plan(raw, raw / "datasets"))


def test_unreadable_dir_is_an_error(tmp_path):
    with pytest.raises(InputError, match="not a readable directory"):
        plan(tmp_path / "missing", tmp_path / "out")


def test_cli_prints_the_table_and_dry_run_changes_nothing(tmp_path):
    raw = _tree(tmp_path)
    before = _files(tmp_path)
    cmd = [sys.executable, "-m", "flows.cli", "data", "organize", str(raw), "--out", str(tmp_path / "ds")]
    dry = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert _files(tmp_path) == before
    line = next(ln for ln in dry.stdout.splitlines() if ln.startswith("calls.jsonl"))
    assert line.split()[1:] == ["tools", "copy", "key", "tool_calls"]
    assert "dry run, nothing changed: 4 copy, 1 unknown, 2 unreadable" in dry.stdout
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0 and "4 copied" in done.stdout
    assert (tmp_path / "ds/tools/calls.jsonl").is_file()
    bad = subprocess.run([*cmd[:5], str(tmp_path / "missing")], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 1 and "not a readable directory" in bad.stderr
