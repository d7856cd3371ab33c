"""bench.train_gpu: --cpu-smoke takes the GPU benchmark's code path (the SFT stage's trainer) on a cut-down
shape on CPU; without a GPU and without --cpu-smoke it exits saying no figures were taken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # never the real benchmark, even on a GPU machine
    return subprocess.run([sys.executable, "-m", "bench.train_gpu", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_without_a_gpu_it_says_no_figures_were_taken():
    proc = _run()
    assert proc.returncode != 0 and "needs a CUDA GPU (no figures taken)" in proc.stderr


def test_cpu_smoke_rows_for_master_weights_and_pure_bf16(tmp_path):
    out = tmp_path / "rows.json"
    proc = _run("--cpu-smoke", "--methods", "full,pure_bf16", "--layers", "1", "--vocab", "4096", "--seq", "128",
                "--batch", "2", "--steps", "3", "--warmup", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["full", "pure_bf16"], rows
    full, pure = rows
    # the default keeps fp32 master weights; pure_bf16 trains the bf16 weights themselves
    assert full["trainable_dtype"] == "float32" and pure["trainable_dtype"] == "bfloat16"
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["steps_timed"] == 2 and r["mfu"] is None  # CPU: no peak to divide by
        assert 0 < r["changed_frac_bf16"] <= 1
        assert r["matmul_params_m"] > 0
    assert "| method | GPU | seq × batch | tokens/s |" in proc.stdout and "| pure_bf16 | cpu | 128 × 2 |" in proc.stdout
