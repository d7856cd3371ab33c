"""Collection over worker processes (teacher.processes > 1): order, shared cache, shared cost cap."""

from __future__ import annotations

import threading
import uuid

import polars as pl
import pytest

from nexus_core.artifacts import raw_ref
from nexus_core.context import StepContext
from nexus_core.distill.collect import CollectConfig, run_teacher_collect
from nexus_core.distill.prompts import TeacherConfig
from nexus_core.llm.client import LLMClient, LLMConfig, ResponseCache
from tests.support.distill_teacher import write_teacher_inputs
from tests.support.openai_stub import Reply, StubServer, chat_completion


def _table(tmp_path, n: int, tag: str):
    return raw_ref(write_teacher_inputs(tmp_path / "inputs", [f"{tag} question {i}" for i in range(n)]))


def _answer(body, n):
    return Reply(body=chat_completion("Answer to " + body["messages"][-1]["content"]))


def test_two_processes_keep_order_and_share_the_response_cache(tmp_path):
    tag = uuid.uuid4().hex[:8]  # the response cache is session-wide: keep these prompts our own
    ref = _table(tmp_path, 60, tag)
    with StubServer(_answer) as stub:
        teacher = TeacherConfig(model="openai/stub", api_base=stub.url, max_concurrency=4, processes=2)
        cfg = CollectConfig(teacher=teacher, batch_size=25)
        (tmp_path / "a").mkdir()
        first = run_teacher_collect(cfg, inputs={"teacher_inputs": ref}, out_uri=str(tmp_path / "a"),
                                    ctx=StepContext.detached())
        asked = len(stub.requests)
        (tmp_path / "b").mkdir()
        again = run_teacher_collect(cfg, inputs={"teacher_inputs": ref}, out_uri=str(tmp_path / "b"),
                                    ctx=StepContext.detached())
        asked_again = len(stub.requests) - asked
    df = pl.read_parquet(tmp_path / "a" / "data.parquet")
    assert first.ok == 60 and asked == 60
    assert df["row_id"].to_list() == [f"r{i}" for i in range(60)]  # input order across workers and batches
    assert all(r == f"Answer to {p}" for r, p in zip(df["response"], df["user_prompt"], strict=True))
    assert again.cached == 60 and asked_again == 0  # every worker wrote to the one cache


@pytest.mark.parametrize("processes", [1, 2])
def test_cost_cap_holds_for_the_whole_pool(tmp_path, processes):
    tag = uuid.uuid4().hex[:8]
    ref = _table(tmp_path, 120, tag)
    live, peak, lock = [0], [0], threading.Lock()

    def counted(body, n):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        try:
            return Reply(body=chat_completion("An answer.", prompt_tokens=1000, completion_tokens=1000), delay_s=0.02)
        finally:
            with lock:
                live[0] -= 1

    with StubServer(counted) as stub:
        # a priced model behind the stub, so litellm.completion_cost prices every answer the same
        probe = LLMClient(LLMConfig(model="openai/gpt-4o-mini", api_base=stub.url, cache=False),
                          ResponseCache(enabled=False))
        probe.map_sync([[{"role": "user", "content": f"{tag} probe"}]])
        each = probe.spent_usd
        teacher = TeacherConfig(model="openai/gpt-4o-mini", api_base=stub.url, max_concurrency=4, processes=processes,
                                max_cost_usd=10 * each, cache=False)
        (tmp_path / "out").mkdir()
        res = run_teacher_collect(CollectConfig(teacher=teacher, batch_size=40), inputs={"teacher_inputs": ref},
                                  out_uri=str(tmp_path / "out"), ctx=StepContext.detached())
    assert each > 0
    assert res.stopped_for_cost and res.skipped > 0 and res.ok + res.skipped == 120
    # the cap is shared: at most the requests already in flight (max_concurrency) run past it
    assert 10 <= res.ok <= 10 + 4
    assert res.cost.usd <= 14 * each + 1e-12
    assert peak[0] <= 4  # max_concurrency is split between the workers, not multiplied
    df = pl.read_parquet(tmp_path / "out" / "data.parquet")
    assert df.filter(pl.col("status") == "skipped")["error"].str.contains("cost cap").all()
