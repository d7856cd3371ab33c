"""Running safely: a killed stage resumes from its checkpoint (also with another max_steps, isolate or
cooldown, or from an explicit resume_from) and its MLflow run reads KILLED; SIGUSR1 pauses/resumes;
SIGUSR2 saves; a 2-process data-parallel run on CPU (gloo) through accelerate launch."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading

import pytest
from transformers import TrainerCallback

from nexus_core import lineage
from nexus_core.artifacts import read_manifest
from nexus_core.cachekey import resume_key
from nexus_core.checkpoints import COMPLETE_MARKER
from nexus_core.context import StepContext
from nexus_core.errors import Killed
from nexus_core.runner import ATTEMPT_FILE, run_step, work_dir_for
from nexus_core.train.common import checkpoint_dir, last_checkpoint
from nexus_core.train.control import KILL_AT_STEP_ENV, fit
from nexus_core.train.sft import SFTConfig, build_trainer, run_sft


@pytest.mark.slow  # a child process that imports torch/trl: ~20-50 s on a shared 2-core machine
def test_killed_stage_resumes_from_its_checkpoint(tiny_model, refs, monkeypatch, caplog):
    # isolate: the stage trains in a child process, which SIGKILLs itself after step 3 (before its
    # checkpoint), exactly what an OOM-killer or a pre-empted node does.
    caplog.set_level(logging.INFO, logger="nexus")
    cfg = SFTConfig(finetune="lora", max_steps=5, batch_size=2, seed=11, isolate=True,
                    checkpoint={"save_steps": 2})
    inputs = {"model": tiny_model, "data": refs["sft"]}
    monkeypatch.setenv(KILL_AT_STEP_ENV, "3")
    with pytest.raises(Killed, match=r"exit -9"):
        run_step(run_sft, cfg, name="t_resume", inputs=inputs)
    # The runner's work dir for this step (keyed by its resume key) holds the child's checkpoints.
    work = work_dir_for("train", "t_resume", resume_key(run_sft, cfg, inputs))
    killed_run = json.loads((work / ATTEMPT_FILE).read_text())["mlflow_run_id"]
    assert lineage.client().get_run(killed_run).info.status == "KILLED"  # not left RUNNING, not FAILED
    child_pid = int((work / "train.pid").read_text())  # where an operator sends SIGUSR1/2
    assert child_pid != os.getpid()
    # The child's own log lines reach this process's log: its pid and work dir.
    assert f"training in pid {child_pid}, work dir {work}" in caplog.text
    ckpt = last_checkpoint(checkpoint_dir(work))
    assert ckpt is not None and ckpt.name == "checkpoint-2"
    monkeypatch.delenv(KILL_AT_STEP_ENV)
    # Another learning rate is another work dir: it starts over, unless told where to resume from.
    other = cfg.model_copy(update={"learning_rate": 1e-4, "isolate": False, "max_steps": 3, "resume_from": str(ckpt)})
    r = run_step(run_sft, other, name="t_resume_lr", inputs=inputs)
    assert (r.resumed_from_step, r.steps) == (2, 3)
    assert ckpt.is_dir()  # resume_from only reads the checkpoint
    # The re-run continues at step 2 (optimizer, scheduler, RNG restored by the trainer) instead of step 0,
    # although isolate, max_steps and the cooldown changed: they do not change what a checkpoint holds.
    caplog.clear()
    longer = cfg.model_copy(update={"isolate": False, "max_steps": 6,
                                    "control": cfg.control.model_copy(update={"cooldown_every": 100})})
    assert work_dir_for("train", "t_resume", resume_key(run_sft, longer, inputs)) == work
    r = run_step(run_sft, longer, name="t_resume", inputs=inputs)
    assert r.resumed_from_step == 2
    assert r.steps == 6
    assert r.metrics["param_delta"] > 0
    assert f"resuming from step 2 ({ckpt})" in caplog.text
    assert r.ref is not None
    run = lineage.client().get_run(read_manifest(r.ref.uri).mlflow_run_id)
    assert (run.info.status, run.data.tags["nexus.previous_attempt"]) == ("FINISHED", killed_run)
    assert not work.exists()  # published: the runner removed the checkpoints


def test_partial_checkpoint_is_ignored(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()  # killed mid-write: no trainer_state, no marker
    done = tmp_path / "checkpoint-2"
    done.mkdir()
    (done / "trainer_state.json").write_text("{}")
    (done / COMPLETE_MARKER).write_text("2")
    assert last_checkpoint(tmp_path) == done
    assert not (tmp_path / "checkpoint-4").exists()


class _Signaller(TrainerCallback):
    """Sends the controller's signals to this process at chosen steps, like an operator would."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # pause at the next boundary ...
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR1)).start()  # ... and resume later
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGUSR2)  # emergency checkpoint
        return control


def test_sigusr1_pauses_and_resumes_sigusr2_checkpoints(tiny_model, refs):
    cfg = SFTConfig(finetune="lora", max_steps=4, batch_size=2, seed=12, checkpoint={"save_steps": 100})
    inputs = {"model": tiny_model, "data": refs["sft"]}
    ctx = StepContext.detached()
    out = checkpoint_dir(ctx.work_dir)
    trainer = build_trainer(cfg, inputs, out)
    trainer.add_callback(_Signaller())  # runs before the controller's hook, so signals land this step
    metrics = fit(trainer, cfg, ctx)
    assert int((ctx.work_dir / "train.pid").read_text()) == os.getpid()
    assert metrics["pauses"] == 1
    assert metrics["emergency_saves"] == 1
    assert metrics["global_step"] == 4
    assert (out / "checkpoint-2" / COMPLETE_MARKER).is_file()  # save_steps=100: only SIGUSR2 made it
    assert signal.getsignal(signal.SIGUSR1) is not None  # handlers restored, process still alive


@pytest.mark.slow
def test_two_process_data_parallel_on_cpu(tiny_model, refs):
    cfg = SFTConfig(finetune="lora", max_steps=2, batch_size=2, seed=13, num_processes=2)
    r = run_step(run_sft, cfg, name="t_ddp", inputs={"model": tiny_model, "data": refs["sft"]})
    assert r.metrics["world_size"] == 2
    assert r.steps == 2
    assert (r.ref.path / "adapter" / "adapter_model.safetensors").is_file()


def test_gpu_temperature_guard_pauses_until_cool(monkeypatch):
    from transformers import TrainerControl, TrainerState

    from nexus_core.train import control as control_mod

    readings = iter([[91, 60], [70, 60]])  # NVML as a hot then cooled GPU reports it
    monkeypatch.setattr(control_mod, "gpu_temperatures", lambda: next(readings))
    controller = control_mod.TrainingController(SFTConfig(control={"gpu_check_every": 5}))
    state = TrainerState()
    state.global_step = 5
    controller.on_step_end(None, state, TrainerControl())
    assert controller.thermal_pauses == 1
    assert next(readings, None) is None  # it kept reading until the GPU was at or below the resume mark
