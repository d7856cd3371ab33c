"""bench.flux_gpu: the --tiny run takes the GPU benchmark's code path on CPU; without a GPU it says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # never the real benchmark, even on a GPU machine
    return subprocess.run([sys.executable, "-m", "bench.flux_gpu", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_tiny_run_prints_a_row_per_mode_and_resolution_and_a_table(tmp_path):
    out = tmp_path / "rows.json"
    proc = _run("--tiny", "--steps", "1", "--warmup", "0", "--resolutions", "32,64", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["mode"], r["resolution"]) for r in rows] == [("lora", 32), ("full", 32), ("lora", 64), ("full", 64)]
    assert json.loads(out.read_text()) == rows
    by = {(r["mode"], r["resolution"]): r for r in rows}
    assert [by["lora", 32]["image_tokens"], by["lora", 64]["image_tokens"]] == [4, 16]  # (px / 16)²
    for r in rows:
        assert r["s_per_step"] > 0 and r["text_tokens"] == 8 and r["gradient_checkpointing"] is True
        assert r["peak_memory_gb"] is None  # CPU: no CUDA peak
    lora, full = by["lora", 32], by["full", 32]
    # one double block (to_q, to_k, to_v, to_out.0) + one single block (to_qkv_mlp_proj, attn.to_out)
    assert lora["lora_modules"] == 6
    assert 0 < lora["trainable_params"] < full["trainable_params"] == full["params"]
    assert lora["optimizer"] == "torch AdamW, fp32" and "AdamW" in full["optimizer"]
    assert "| mode | px | image tokens | trainable params |" in proc.stdout
    assert "| full | 64 | 16 |" in proc.stdout


def test_without_a_gpu_it_says_so_in_one_line(monkeypatch):
    import torch

    from bench.flux_gpu import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:  # sys.exit(str): printed to stderr, exit status 1
        main([])
    assert exc.value.code == "bench.flux_gpu needs a CUDA GPU (no figures taken); --tiny runs the code path on CPU"
