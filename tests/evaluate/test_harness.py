"""Standard tasks beside the rubric: lm-evaluation-harness task files with local data, run offline by the
real library on a real tiny model. Task files are checked before anything runs (a hub dataset is refused,
every file they read is hashed into the cache key); the scores equal what the model itself says: each
choice's log-likelihood (acc, acc_norm) and its greedy answers (exact match after the task's filters)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml

from nexus_core.artifacts import raw_ref
from nexus_core.contract import plan_problems
from nexus_core.errors import InputError
from nexus_core.evaluate.harness import HarnessConfig, harness_files, read_task_file, run_harness, task_files
from nexus_core.io import iter_jsonl, read_table, write_jsonl
from nexus_core.runner import run_step

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "configs/eval/harness"
PROMPT = "Question: {{question}}\nAnswer:"


def _task(path: Path, **cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_task_files_are_checked_and_every_file_they_read_is_listed(tmp_path):
    shipped = HarnessConfig(tasks=[str(SHIPPED / "tiny_science_mc.yaml"), str(SHIPPED / "tiny_science_qa.yaml")])
    assert [f.name for f in harness_files(shipped)] == ["tiny_science_mc.yaml", "tiny_science_mc.jsonl",
                                                        "tiny_science_qa.yaml", "tiny_science_qa.jsonl"]
    # include + !function + data_files relative to the task file (not the working directory)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/docs.jsonl").write_text('{"q": "x", "a": "y"}\n')
    (tmp_path / "utils.py").write_text("def doc_to_text(doc):\n    return doc['q']\n")
    (tmp_path / "_common.yaml").write_text("output_type: generate_until\ndoc_to_text: !function utils.doc_to_text\n")
    task = tmp_path / "mine.yaml"
    task.write_text("include: _common.yaml\ntask: mine\ndataset_path: json\n"
                    "dataset_kwargs: {data_files: {test: data/docs.jsonl}}\ntest_split: test\ndoc_to_target: a\n")
    cfg = read_task_file(task)
    assert cfg["output_type"] == "generate_until" and cfg["doc_to_text"] == "!function utils.doc_to_text"
    assert set(task_files(task)) == {task, tmp_path / "_common.yaml", tmp_path / "utils.py",
                                     tmp_path / "data/docs.jsonl"}

    hub = _task(tmp_path / "hub.yaml", task="hub", dataset_path="cais/mmlu", output_type="multiple_choice")
    with pytest.raises(InputError, match="not local; evaluation runs offline"):
        read_task_file(hub)
    group = _task(tmp_path / "group.yaml", group="g", task=["a", "b"])
    with pytest.raises(InputError, match="must name one task"):
        read_task_file(group)
    missing = _task(tmp_path / "missing.yaml", task="missing", dataset_path="json",
                    dataset_kwargs={"data_files": {"test": "nowhere.jsonl"}})
    problems = plan_problems(run_harness, HarnessConfig(tasks=[str(missing), str(hub)]), {}, "harness")
    assert len(problems) == 1 and "file not found" in problems[0] and "nowhere.jsonl" in problems[0]
    assert "cais/mmlu" in problems[0]  # every task's problem at once
    problems = plan_problems(run_harness, HarnessConfig(tasks=[str(task), str(task)]), {}, "harness")
    assert any("task 'mine' is defined twice" in p for p in problems), problems


def _loglik(model, tok, context: str, continuation: str) -> float:
    """Summed log-probability of ``continuation`` after ``context``, split the way the harness splits it
    (trailing spaces of the context move to the continuation; the pair is encoded whole, then split)."""
    import torch

    n = len(context) - len(context.rstrip())
    context, continuation = context[:len(context) - n], context[len(context) - n:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx_len = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    return float(logp.gather(1, ids[0, 1:, None])[ctx_len - 1:].sum())


def _greedy(model, tok, prompt: str, max_new: int) -> str:
    import torch

    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _until(text: str) -> str:
    return re.split(r"\n|Question:", text)[0]


@pytest.mark.slow
def test_the_harness_scores_what_the_model_says(tiny_llm, data_root, tmp_path):
    from nexus_core.models.io import load_causal_lm

    model, tok = load_causal_lm(tiny_llm)
    mc = tmp_path / "mc.yaml"
    shutil.copy(SHIPPED / "tiny_science_mc.yaml", mc)
    shutil.copy(SHIPPED / "tiny_science_mc.jsonl", tmp_path / "tiny_science_mc.jsonl")
    # generation targets: the model's own greedy answer (cut at the stop sequences) for half the
    # questions, one it never gives for the other half: exact match must be exactly 1/2 if the harness
    # generated what the model does (a random model answers in punctuation: no filter, exact strings)
    questions = [d["question"] for d in iter_jsonl(SHIPPED / "tiny_science_qa.jsonl")]
    said = [_until(_greedy(model, tok, f"Question: {q}\nAnswer:", 8)) for q in questions]
    assert all(said), said
    docs = [{"question": q, "answer": s if i % 2 == 0 else "Zyzzyva"} for i, (q, s) in enumerate(zip(questions, said, strict=True))]
    write_jsonl(docs, tmp_path / "qa.jsonl")
    qa_cfg = {k: v for k, v in yaml.safe_load((SHIPPED / "tiny_science_qa.yaml").read_text()).items()
              if k not in {"filter_list", "metric_list"}}
    qa = _task(tmp_path / "qa.yaml", **{**qa_cfg, "task": "own_answers", "doc_to_target": "answer",
                                        "dataset_kwargs": {"data_files": {"test": "qa.jsonl"}},
                                        "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                                                         "higher_is_better": True}]})

    cfg = HarnessConfig(tasks=[str(mc), str(qa)], batch_size=4)
    result = run_step(run_harness, cfg, name="harness_check", inputs={"model": raw_ref(tiny_llm)})
    out = result.ref.path

    # multiple choice: acc / acc_norm from the model's log-likelihood of each choice, computed here
    mc_docs = list(iter_jsonl(SHIPPED / "tiny_science_mc.jsonl"))
    acc, acc_norm = [], []
    samples = [s for s in iter_jsonl(out / "samples.jsonl") if s["task"] == "nexus_tiny_science_mc"]
    for doc in mc_docs:
        lls = [_loglik(model, tok, f"Question: {doc['question']}\nAnswer:", f" {c}") for c in doc["choices"]]
        theirs = next(s for s in samples if s["doc"]["id"] == doc["id"])
        assert [r[0] for r in theirs["filtered_resps"]] == pytest.approx(lls, abs=1e-3)
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["answer"]))
        normed = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]
        acc_norm.append(float(max(range(len(lls)), key=normed.__getitem__) == doc["answer"]))
    n = len(mc_docs)
    stderr = lambda xs: math.sqrt(sum((x - sum(xs) / n) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)  # noqa: E731
    assert result.tasks["nexus_tiny_science_mc"] == pytest.approx({"acc": sum(acc) / n, "acc_norm": sum(acc_norm) / n})
    assert result.n == {"nexus_tiny_science_mc": n, "own_answers": len(docs)}
    summary = json.loads((out / "harness.json").read_text())
    assert summary["library"].startswith("lm_eval 0.4.")
    mc_metrics = summary["tasks"]["nexus_tiny_science_mc"]["metrics"]
    assert mc_metrics["acc"]["stderr"] == pytest.approx(stderr(acc))
    assert mc_metrics["acc_norm"]["stderr"] == pytest.approx(stderr(acc_norm))
    assert summary["tasks"]["nexus_tiny_science_mc"]["output_type"] == "multiple_choice"

    # generation: the harness's greedy answers are the model's, so exactly the planted half match
    assert result.tasks["own_answers"] == {"exact_match": 0.5}
    gen = summary["tasks"]["own_answers"]
    assert gen["output_type"] == "generate_until" and gen["metrics"]["exact_match"]["stderr"] > 0
    table = read_table(out / "data.parquet")
    assert set(zip(table["task"], table["metric"], table["filter"], strict=True)) == {
        ("nexus_tiny_science_mc", "acc", "none"), ("nexus_tiny_science_mc", "acc_norm", "none"),
        ("own_answers", "exact_match", "none")}
    assert result.metrics["harness.own_answers.exact_match"] == 0.5

    # cached by content: the same files and model reuse it; editing a data file misses
    assert run_step(run_harness, cfg, name="harness_check", inputs={"model": raw_ref(tiny_llm)}).reused
    write_jsonl(docs[:4], tmp_path / "qa.jsonl")
    again = run_step(run_harness, cfg, name="harness_check", inputs={"model": raw_ref(tiny_llm)})
    assert not again.reused and again.n["own_answers"] == 4
