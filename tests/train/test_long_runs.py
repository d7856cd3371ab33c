"""Long runs: the work dir is keyed only on what changes the result, a checkpoint is marked complete
before old ones are rotated out, an explicit ``resume_from`` is checked, and a killed run's MLflow
run does not stay RUNNING. (A real kill-and-resume through the runner: tests/train/test_control.py.)"""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest

from nexus_core import checkpoints, lineage
from nexus_core.artifacts import ArtifactRef
from nexus_core.cachekey import resume_key, step_key
from nexus_core.errors import Killed, StepError
from nexus_core.train.common import (
    checkpoint_dir,
    last_checkpoint,
    preflight,
    resume_checkpoint,
    trainer_kwargs,
)
from nexus_core.train.control import TrainingController, fit
from nexus_core.train.dpo import DPOConfig
from nexus_core.train.sft import SFTConfig, build_trainer, run_sft
from tests.unit.test_runner import BoomConfig, run_boom

MODEL = ArtifactRef(uri="/m", kind="model", name="m", version=1, digest="d-model")
DATA = ArtifactRef(uri="/d", kind="dataset", name="d", version=1, digest="d-data")


def _keys(**changes):
    cfg = SFTConfig(**changes)
    inputs = {"model": MODEL, "data": DATA}
    return resume_key(run_sft, cfg, inputs, code="c", files={}), step_key(run_sft, cfg, inputs, code="c", files={})


@pytest.mark.parametrize("change", [
    {"isolate": True}, {"num_processes": 2}, {"control": {"cooldown_every": 5, "cooldown_seconds": 1.0}},
    {"max_steps": 500}, {"epochs": 3.0}, {"logging_steps": 10}, {"checkpoint": {"save_steps": 7, "save_total_limit": 1}},
])
def test_resume_neutral_fields_keep_the_work_dir(change):
    base_resume, base_cache = _keys()
    resume, cache = _keys(**change)
    assert resume == base_resume  # a killed run re-started with this change finds its checkpoints
    runtime = set(change) & {"isolate", "control", "logging_steps"}
    assert (cache == base_cache) == bool(runtime)  # max_steps, num_processes...: still another artifact


@pytest.mark.parametrize("change", [
    {"learning_rate": 1e-5}, {"lora": {"r": 4}}, {"finetune": "full"}, {"batch_size": 2}, {"seed": 1},
    {"resume_from": "/elsewhere/checkpoint-4"},
])
def test_what_changes_the_result_changes_the_work_dir(change):
    assert _keys(**change)[0] != _keys()[0]


def test_without_resume_neutral_fields_the_work_dir_key_is_the_cache_key():
    # other steps keep their work dirs (flux precompute's unfinished groups)
    assert resume_key(run_boom, BoomConfig(n=3), {}) == step_key(run_boom, BoomConfig(n=3), {})


def test_data_model_method_and_code_change_the_work_dir():
    cfg = SFTConfig()
    key = resume_key(run_sft, cfg, {"model": MODEL, "data": DATA}, code="c", files={})
    other_data = DATA.model_copy(update={"digest": "d-data2"})
    assert resume_key(run_sft, cfg, {"model": MODEL, "data": other_data}, code="c", files={}) != key
    other_model = MODEL.model_copy(update={"digest": "d-model2"})
    assert resume_key(run_sft, cfg, {"model": other_model, "data": DATA}, code="c", files={}) != key
    assert resume_key(run_sft, cfg, {"model": MODEL, "data": DATA}, code="c2", files={}) != key
    from nexus_core.train.dpo import run_dpo

    assert resume_key(run_dpo, DPOConfig(), {"model": MODEL, "data": DATA}, code="c", files={}) != key


def _checkpoint(root, step, method="sft"):
    path = checkpoints.checkpoint_path(root, step)
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    return path


def test_marker_is_written_before_old_checkpoints_are_rotated_out(tmp_path, monkeypatch):
    """save_total_limit 1: a kill between rotation and marking must not leave zero checkpoints."""
    old = _checkpoint(tmp_path, 2)
    checkpoints.mark_complete(old, 2, "sft")
    new = _checkpoint(tmp_path, 4)
    seen = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **k):  # the moment of deletion: the newest must already be complete
        seen.append((str(path), checkpoints.marker(new)))
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", rmtree)
    controller = TrainingController(SFTConfig(checkpoint={"save_steps": 2, "save_total_limit": 1}))
    state = SimpleNamespace(is_world_process_zero=True, global_step=4, best_model_checkpoint=None)
    controller.on_save(SimpleNamespace(output_dir=str(tmp_path)), state, None)
    assert seen == [(str(old), {"step": 4, "method": "sft"})]
    assert [s for s, _ in checkpoints.complete(tmp_path)] == [4]
    # the Trainer's own rotation (which runs before the marking hook) is off
    assert trainer_kwargs(SFTConfig(checkpoint={"save_total_limit": 1}), tmp_path)["save_total_limit"] is None


def test_rotation_keeps_the_best_checkpoint(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoints.mark_complete(_checkpoint(tmp_path, step), step)
    removed = checkpoints.rotate(tmp_path, 2, keep=tmp_path / "checkpoint-1")
    assert sorted(p.name for p in removed) == ["checkpoint-2"]
    assert [s for s, _ in checkpoints.complete(tmp_path)] == [1, 3, 4]


def test_a_kill_during_rotation_keeps_a_resumable_checkpoint(tiny_model, refs, tmp_path, monkeypatch):
    """A real trainer with save_total_limit 1, killed right after it deletes the old checkpoint."""
    cfg = SFTConfig(finetune="lora", max_steps=3, batch_size=2, seed=21,
                    checkpoint={"save_steps": 1, "save_total_limit": 1})
    out = checkpoint_dir(tmp_path)
    trainer = build_trainer(cfg, {"model": tiny_model, "data": refs["sft"]}, out)
    real_rmtree = shutil.rmtree

    def killed(path, *a, **k):
        real_rmtree(path, *a, **k)
        raise KeyboardInterrupt(f"killed after deleting {path}")

    monkeypatch.setattr(shutil, "rmtree", killed)  # whoever rotates (the Trainer or the controller)
    with pytest.raises(KeyboardInterrupt, match="checkpoint-1"):
        fit(trainer, cfg)
    monkeypatch.undo()
    ckpt = last_checkpoint(out)
    assert ckpt is not None and ckpt.name == "checkpoint-2"  # the new one was complete before the old went
    assert checkpoints.marker(ckpt) == {"step": 2, "method": "sft"}


def test_resume_from_is_checked_and_names_the_key(tmp_path):
    with pytest.raises(StepError, match=r"resume_from: .*missing: no such checkpoint directory"):
        preflight(SFTConfig(resume_from=str(tmp_path / "missing")))
    partial = _checkpoint(tmp_path / "a", 3)  # no completion marker: a kill mid-write
    with pytest.raises(StepError, match=r"resume_from: .*checkpoint-3: not a complete training checkpoint"):
        preflight(SFTConfig(resume_from=str(partial)))
    assert partial.exists()  # another run's directory: checked, never cleaned up
    dpo = _checkpoint(tmp_path / "b", 5)
    checkpoints.mark_complete(dpo, 5, "dpo")
    with pytest.raises(StepError, match=r"resume_from: .*written by a dpo stage; this stage is sft"):
        preflight(SFTConfig(resume_from=str(dpo)))
    assert resume_checkpoint(DPOConfig(resume_from=str(dpo))) == dpo
    # a checkpoints dir or a stage's work dir: its newest complete checkpoint
    for step in (2, 6):
        checkpoints.mark_complete(_checkpoint(tmp_path / "w" / "checkpoints", step), step, "sft")
    _checkpoint(tmp_path / "w" / "checkpoints", 8)  # unfinished: skipped
    assert resume_checkpoint(SFTConfig(resume_from=str(tmp_path / "w"))).name == "checkpoint-6"
    assert (tmp_path / "w" / "checkpoints" / "checkpoint-8").exists()


def test_a_second_trainer_in_the_same_work_dir_is_refused_until_the_first_dies(tmp_path):
    """A training child that outlived its SIGKILLed parent still holds the work dir: the re-run must
    not resume from (and overwrite) the checkpoints it is writing."""
    import subprocess
    import sys

    from nexus_core.train.control import TRAIN_LOCK, work_dir_lock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid())); f.flush()\n"
        "print('locked', flush=True); time.sleep(120)"), str(tmp_path / TRAIN_LOCK)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(StepError, match=rf"another training process \(pid {holder.pid}\) is still running"):
            with work_dir_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with work_dir_lock(tmp_path):  # the kernel released the dead holder's lock
        assert (tmp_path / TRAIN_LOCK).read_text() == str(os.getpid())


def test_run_status_killed_for_signals_failed_for_errors():
    assert lineage.end_status(KeyboardInterrupt()) == "KILLED"
    assert lineage.end_status(Killed("sft: killed by signal 9")) == "KILLED"
    assert lineage.end_status(SystemExit(143)) == "KILLED"  # SIGTERM outside Prefect (runner.sigterm_exits)
    from prefect.exceptions import TerminationSignal

    assert lineage.end_status(TerminationSignal(15)) == "KILLED"  # SIGTERM inside a Prefect flow run
    assert lineage.end_status(StepError("bad")) == "FAILED"
    assert lineage.end_status(RuntimeError("boom")) == "FAILED"


def test_a_rerun_marks_its_predecessors_orphaned_run_killed(data_root):
    """The step's own process was SIGKILLed (no exception, no finally): the re-run of the same step
    finds the run in its work dir's attempt.json and marks it KILLED."""
    import subprocess
    import sys

    from nexus_core.runner import ATTEMPT_FILE, run_step, work_dir_for

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    c = lineage.client()
    orphan = c.create_run(lineage.experiment_id(), tags={"nexus.host": lineage.socket.gethostname(),
                                                         "nexus.pid": dead.stdout.strip()}).info.run_id
    work = work_dir_for("corpus", "orphan", resume_key(run_boom, BoomConfig(), {}))
    work.mkdir(parents=True)
    (work / ATTEMPT_FILE).write_text(json.dumps({"mlflow_run_id": orphan}))
    with pytest.raises(Exception, match="boom"):
        run_step(run_boom, BoomConfig(), name="orphan")
    before = c.get_run(orphan)
    assert before.info.status == "KILLED" and "nexus.crashed" in before.data.tags
    latest = json.loads((work / ATTEMPT_FILE).read_text())["mlflow_run_id"]
    after = c.get_run(latest)
    assert after.info.status == "FAILED" and after.data.tags["nexus.previous_attempt"] == orphan
