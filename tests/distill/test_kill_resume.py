"""Teacher collection SIGKILLed mid-run resumes from the response cache: no prompt asked twice, no row lost.

The real step runs in a child process against the OpenAI stub (real HTTP, real litellm); the test
polls the child's SQLite cache and kills it with SIGKILL once some, not all, responses are in. A
second run with the same NEXUS_HOME talks to a second stub, so each server's request log belongs to
exactly one run, whatever the killed run's last packets do.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from tests.support.distill_teacher import write_teacher_inputs
from tests.support.openai_stub import Reply, StubServer, echo_handler

pytestmark = pytest.mark.integration

ROWS = 200
BATCH = 32
CONCURRENCY = 4
KILL_AT = 40  # cached responses before the kill
LATENCY_S = 0.04  # per request: ~100 responses/s at 4 in flight, so the kill lands mid-run
REPO = Path(__file__).resolve().parents[2]


def _slow_echo(body: dict, n: int) -> Reply:
    reply = echo_handler(body, n)  # "Answer to: <prompt>"
    reply.delay_s = LATENCY_S
    return reply


def _child(inputs: Path, out: Path, url: str, home: Path, data: Path) -> subprocess.Popen:
    """The collect step in a child; its stdout and stderr go to files next to ``out`` (no pipe to fill)."""
    out.mkdir()
    env = {**os.environ, "NEXUS_HOME": str(home), "NEXUS_DATA": str(data)}
    with open(f"{out}.stdout", "w") as stdout, open(f"{out}.stderr", "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.support.collect_child", str(inputs), str(out), url,
             "--batch-size", str(BATCH), "--concurrency", str(CONCURRENCY)],
            cwd=REPO, env=env, stdout=stdout, stderr=stderr)


def _read_cache(db: Path) -> dict[str, str] | None:
    """key → response JSON text, through a read-only connection; None while the table does not exist yet."""
    if not db.exists():
        return None
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return dict(conn.execute("SELECT key, response FROM responses").fetchall())
    except sqlite3.OperationalError:  # created but the table not yet committed
        return None
    finally:
        conn.close()


def _count_cached(db: Path) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute("SELECT count(*) FROM responses").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def test_sigkill_mid_run_resumes_without_duplicate_or_lost_row(tmp_path: Path) -> None:
    home, data = tmp_path / "home", tmp_path / "data"
    prompts = [f"Question {i}: how does soil moisture change microbial respiration?" for i in range(ROWS)]
    inputs = write_teacher_inputs(tmp_path / "inputs", prompts, [f"r{i:03d}" for i in range(ROWS)])
    db = home / "llm_cache.sqlite"

    # ---- run 1: killed with SIGKILL once KILL_AT responses are committed
    with StubServer(_slow_echo) as first:
        proc = _child(inputs, tmp_path / "out1", first.url, home, data)
        try:
            deadline = time.monotonic() + 60  # generous: the child imports litellm on a busy box first
            while _count_cached(db) < KILL_AT:
                if proc.poll() is not None:
                    pytest.fail(f"collect child exited ({proc.returncode}) before the kill:\n"
                                f"{(tmp_path / 'out1.stderr').read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"only {_count_cached(db)} responses cached after 60 s")
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
    asked_first = first.prompts()  # once the server has stopped accepting connections

    # ---- the partial state: a readable cache of complete responses, some but not all rows
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    cache = _read_cache(db)
    assert cache is not None
    n_cached = len(cache)
    assert KILL_AT <= n_cached < ROWS, f"kill did not land mid-run: {n_cached} of {ROWS} cached"
    cached_answers = set()
    for text in cache.values():
        response = json.loads(text)  # raises on a truncated row
        cached_answers.add(response["choices"][0]["message"]["content"])
    cached_prompts = {a.removeprefix("Answer to: ") for a in cached_answers}
    assert len(cached_prompts) == n_cached and cached_prompts <= set(prompts)
    # the killed run asked each prompt once, everything cached was asked, and at most the
    # requests in flight at the kill were asked but never cached
    assert max(asked_first.values()) == 1
    assert cached_prompts <= set(asked_first)
    assert len(asked_first) - n_cached <= CONCURRENCY, (len(asked_first), n_cached)

    # ---- run 2: same NEXUS_HOME, fresh output, a second server
    with StubServer(_slow_echo) as second:
        proc = _child(inputs, tmp_path / "out2", second.url, home, data)
        proc.wait(timeout=120)
        assert proc.returncode == 0, (tmp_path / "out2.stderr").read_text()
    asked_second = second.prompts()
    result = json.loads((tmp_path / "out2.stdout").read_text().strip().splitlines()[-1])

    out = pl.read_parquet(tmp_path / "out2" / "data.parquet")
    assert out.height == ROWS
    assert sorted(out["row_id"].to_list()) == [f"r{i:03d}" for i in range(ROWS)]  # each row once
    assert out["status"].to_list() == ["ok"] * ROWS
    assert all(r == f"Answer to: {p}" for r, p in zip(out["response"], out["user_prompt"], strict=True))
    assert out["cached"].sum() == n_cached == result["cached"]
    assert result["ok"] == ROWS and result["failed"] == 0
    assert set(out.filter(pl.col("cached"))["cache_key"]) == set(cache)

    # no prompt answered and cached before the kill was asked again; the rest were asked exactly once
    assert max(asked_second.values()) == 1
    assert not cached_prompts & set(asked_second)
    assert set(asked_second) == set(prompts) - cached_prompts
    total = sum(asked_first.values()) + sum(asked_second.values())
    assert ROWS <= total <= ROWS + CONCURRENCY
    assert len(_read_cache(db) or {}) == ROWS
