"""Task runs carry the tags infra/concurrency.yaml limits: ``teacher:<provider>`` on teacher calls,
``judge`` on LLM judging, ``gpu`` on accelerator tasks of a shared machine — checked on task runs the
real (temporary) Prefect API recorded."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from prefect import flow
from prefect.client.orchestration import get_client

import tasks
from infra.concurrency import DEFAULT, LimitsConfig
from nexus_core.artifacts import ArtifactRef
from nexus_core.config import load_config
from nexus_core.distill.collect import CollectConfig
from nexus_core.distill.prompts import TeacherConfig
from nexus_core.evaluate.judge import JudgeConfig
from nexus_core.train.sft import SFTConfig
from tasks.distill_collect import teacher_collect
from tasks.evaluate_judge import evaluate_judge
from tasks.tags import NexusTask
from tasks.train_sft import train_sft

LIMITED = set(load_config(DEFAULT, LimitsConfig).tags)


def _teacher(**kw) -> CollectConfig:
    return CollectConfig(teacher=TeacherConfig(**kw))


@flow
def calls(missing: ArtifactRef) -> dict[str, str]:
    """Each task once on an input that does not exist: the run is created (with its tags), then fails
    its input check before any work."""
    collect, judge = teacher_collect.with_options(retries=0), evaluate_judge.with_options(retries=0)
    states = {
        "anthropic": collect(_teacher(model="anthropic/claude-x"), missing, name="t1", return_state=True),
        "loopback": collect(_teacher(model="openai/served", api_base="http://127.0.0.1:8000/v1"), missing,
                            name="t2", return_state=True),
        "offline": collect(_teacher(model="openai/x", offline=True), missing, name="t3", return_state=True),
        "judge": judge(JudgeConfig(kind="llm"), missing, return_state=True),
        "heuristic": judge(JudgeConfig(), missing, return_state=True),
        "sft": train_sft(SFTConfig(), missing, missing, return_state=True),
    }
    return {k: str(s.state_details.task_run_id) for k, s in states.items()}


def _tags(ids: dict[str, str]) -> dict[str, set[str]]:
    with get_client(sync_client=True) as client:
        return {k: set(client.read_task_run(v).tags) for k, v in ids.items()}  # pyright: ignore[reportArgumentType]


def test_task_runs_carry_the_limited_tags_that_apply(prefect_harness, tmp_path, monkeypatch):
    missing = ArtifactRef(uri=str(tmp_path / "missing"), kind="dataset", name="missing", version=1, digest="0" * 64)
    monkeypatch.delenv("NEXUS_PROVIDER", raising=False)
    tags = _tags(calls(missing))
    assert tags["anthropic"] & LIMITED == {"teacher:anthropic"}
    assert tags["loopback"] & LIMITED == {"teacher:local"}  # the project's own server on loopback
    assert tags["offline"] & LIMITED == set()               # recorded responses only: calls nothing
    assert tags["judge"] & LIMITED == {"judge"} and tags["heuristic"] & LIMITED == set()
    assert tags["sft"] & LIMITED == {"gpu"}
    assert all({"nexus"} <= t for t in tags.values()) and "evaluate" in tags["judge"]

    # on a per-run cloud GPU machine the box is not shared: no global `gpu` slot to wait for
    monkeypatch.setenv("NEXUS_PROVIDER", "runpod")
    assert _tags(calls(missing))["sft"] & LIMITED == set()


def test_every_task_is_a_nexus_task_and_accelerator_steps_are_gpu_tasks():
    found = {}
    for mod in pkgutil.iter_modules(tasks.__path__):
        module = importlib.import_module(f"tasks.{mod.name}")
        found.update({name: obj for name, obj in vars(module).items() if isinstance(obj, NexusTask)})
    gpu = {name for name, t in found.items() if t.gpu}
    assert {"train_sft", "train_cpt", "train_dpo", "train_orpo", "train_grpo", "train_kd", "train_reward",
            "flux_train", "evaluate_predict"} <= gpu
    assert not gpu & {"teacher_collect", "regenerate", "evaluate_judge", "ingest", "distill_filters"}
    assert {name for name, t in found.items() if t.call_tags} == {"teacher_collect", "regenerate", "evaluate_judge"}


@pytest.mark.parametrize("tag", ["teacher:openai", "teacher:anthropic", "teacher:local", "judge", "gpu"])
def test_concurrency_file_limits_the_tags_tasks_carry(tag):
    assert tag in LIMITED
