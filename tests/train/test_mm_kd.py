"""Knowledge distillation in mm_sft on tiny composed (omni) models: with alpha=0 it is plain mm_sft,
with alpha>0 the student's KL to the frozen teacher drops, a teacher with another processor is refused
before any work (both named), and the teacher joins the cache key and the manifest's inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.cachekey import step_key
from nexus_core.errors import InputError
from nexus_core.runner import run_step
from nexus_core.train.mm_kd import MMKDSettings, mm_kd_loss
from nexus_core.train.mm_train import MMAlignConfig, MMSFTConfig, run_mm_train
from nexus_core.train.omni import OmniConfig, run_omni

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "raw" / "omni" / "instruct.jsonl"
FAST = {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "checkpoint": {"save_steps": 2}}


@pytest.fixture(scope="module")
def student(tiny_llm) -> ArtifactRef:
    """The shared tiny LLM composed with a tiny SigLIP tower, its projector aligned."""
    omni = run_step(run_omni, OmniConfig(vision="tiny"), name="kd_omni", inputs={"model": raw_ref(tiny_llm)}).ref
    assert omni is not None
    ref = run_step(run_mm_train, MMAlignConfig(**FAST), name="kd_align",
                   inputs={"model": omni, "data": raw_ref(REPO / "data" / "raw" / "omni" / "captions.jsonl")}).ref
    assert ref is not None
    return ref


@pytest.fixture(scope="module")
def plain(student) -> tuple[ArtifactRef, dict[str, float]]:
    """Plain mm_sft (full) of the student: the alpha=0 reference and the teacher of the KD runs."""
    r = run_step(run_mm_train, MMSFTConfig(finetune="full", **{**FAST, "max_steps": 4}), name="kd_plain",
                 inputs={"model": student, "data": raw_ref(DATA)})
    assert r.ref is not None
    return r.ref, r.metrics


def _kl(student_dir: Path, teacher_dir: Path) -> float:
    """T²·KL(teacher ‖ student) over the assistant tokens of the whole data set, one batch."""
    import polars as pl
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from nexus_core.train.mm_data import MMCollator, encode_mm, mm_records

    proc = AutoProcessor.from_pretrained(str(student_dir))
    s = AutoModelForImageTextToText.from_pretrained(str(student_dir)).eval()
    t = AutoModelForImageTextToText.from_pretrained(str(teacher_dir)).eval()
    records, _ = mm_records(pl.read_ndjson(DATA), str(DATA), DATA.parent)
    rows = [encode_mm(proc.tokenizer, r, int(s.config.image_seq_length), 512) for r in records]
    batch = MMCollator(proc.image_processor, proc.tokenizer.pad_token_id)(rows)
    labels = batch.pop("labels")
    with torch.no_grad():
        return float(mm_kd_loss(MMKDSettings(alpha=1.0, temperature=1.0), s(**batch).logits, labels,
                                t(**batch).logits))


def test_alpha_zero_is_plain_mm_sft(student, plain):
    ref, metrics = plain
    cfg = MMSFTConfig(finetune="full", kd=MMKDSettings(alpha=0.0), **{**FAST, "max_steps": 4})
    r = run_step(run_mm_train, cfg, name="kd_alpha0", inputs={"model": student, "data": raw_ref(DATA),
                                                              "teacher": ref})
    assert r.metrics["train_loss"] == pytest.approx(metrics["train_loss"], rel=1e-4)
    from safetensors.torch import load_file

    a, b = load_file(str(ref.path / "model.safetensors")), load_file(str(r.ref.path / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_kd_moves_the_student_toward_the_teacher_and_the_teacher_is_an_input(student, plain):
    teacher, _ = plain
    before = _kl(student.path, teacher.path)
    cfg = MMSFTConfig(finetune="full", kd=MMKDSettings(alpha=1.0, temperature=1.0), **{**FAST, "max_steps": 4})
    inputs = {"model": student, "data": raw_ref(DATA), "teacher": teacher}
    r = run_step(run_mm_train, cfg, name="kd_lora", inputs=inputs)
    assert r.ref is not None and r.metrics["param_delta"] > 0
    after = _kl(r.ref.path, teacher.path)
    assert before > 0.05 and after < 0.5 * before, (before, after)
    # the teacher joins the cache key (another teacher or none: another key) and the manifest's inputs
    keys = {step_key(run_mm_train, cfg, inputs), step_key(run_mm_train, cfg, {**inputs, "teacher": student}),
            step_key(run_mm_train, cfg.model_copy(update={"kd": None}), {**inputs, "teacher": None})}
    assert len(keys) == 3
    manifest = json.loads((r.ref.path / "manifest.json").read_text())
    assert "teacher" in json.dumps(manifest["inputs"]) and teacher.digest in json.dumps(manifest["inputs"])


def test_a_teacher_with_another_processor_is_refused_before_work(student, tiny_llm, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    import nexus_core.train.mm_train as mm_train

    monkeypatch.setattr(mm_train, "run_stage", lambda *a, **k: pytest.fail("trained despite a bad teacher"))
    cfg = MMSFTConfig(kd=MMKDSettings(), **FAST)
    # another tower size: 4 tokens per image instead of 16
    small = run_step(run_omni, OmniConfig(vision="tiny", tiny_vision={"image_size": 16}), name="kd_omni_small",
                     inputs={"model": raw_ref(tiny_llm)}).ref
    assert small is not None
    with pytest.raises(InputError, match=r"image_seq_length 4 vs 16") as exc:
        run_step(run_mm_train, cfg, name="kd_bad", inputs={"model": student, "data": raw_ref(DATA),
                                                           "teacher": small})
    assert str(small.path) in str(exc.value) and str(student.path) in str(exc.value)
    # another vocabulary: one added token
    other = tmp_path / "other"
    shutil.copytree(student.path, other)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_tokens(["<extra_kd_token>"])
    tok.save_pretrained(str(other))
    with pytest.raises(InputError, match=r"differ \(teacher vs student: vocab \d+ vs \d+ tokens.*extra_kd_token"):
        run_step(run_mm_train, cfg, name="kd_bad", inputs={"model": student, "data": raw_ref(DATA),
                                                           "teacher": raw_ref(other)})
    with pytest.raises(InputError, match="missing input 'teacher'"):
        run_step(run_mm_train, cfg, name="kd_bad", inputs={"model": student, "data": raw_ref(DATA)})
    with pytest.raises(InputError, match="a 'teacher' input but no kd settings"):
        run_step(run_mm_train, MMSFTConfig(**FAST), name="kd_bad",
                 inputs={"model": student, "data": raw_ref(DATA), "teacher": student})


def test_kd_settings_refuse_stored_features_and_the_flow_pairs_kd_with_a_teacher():
    from pydantic import ValidationError

    from flows.llm_train import LLMTrainConfig

    with pytest.raises(ValidationError, match="the teacher runs its own tower on the raw media"):
        MMSFTConfig(kd=MMKDSettings(), precomputed=True)
    stage = {"name": "vqa", "dataset": "d", "train": {"method": "mm_sft", "kd": {"alpha": 0.5}}}
    with pytest.raises(ValidationError, match="mm_sft distils with both train.kd and teacher"):
        LLMTrainConfig(datasets={"d": "x.jsonl"}, stages=[stage])
    ok = LLMTrainConfig(datasets={"d": "x.jsonl"}, stages=[{**stage, "teacher": "base"}])
    assert ok.stages[0].train.kd == MMKDSettings(alpha=0.5)


def test_sigusr1_pauses_and_sigusr2_checkpoints_a_kd_stage(student, plain, tmp_path, monkeypatch):
    """mm stages (kd too) train under the text stages' controller: control.fit with its signal handlers."""
    import os
    import signal
    import threading

    from transformers import TrainerCallback

    import nexus_core.train.control as control
    from nexus_core.checkpoints import COMPLETE_MARKER
    from nexus_core.context import StepContext
    from nexus_core.train.mm_train import _train

    class Signaller(TrainerCallback):  # what an operator does with kill -USR1 / -USR2 <pid>
        def on_step_end(self, args, state, cb, **kwargs):  # noqa: ANN001, ANN201
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGUSR1)
                threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR1)).start()
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGUSR2)
            return cb

    real_fit = control.fit

    def fit(trainer, cfg, ctx):  # noqa: ANN001, ANN202
        trainer.add_callback(Signaller())
        return real_fit(trainer, cfg, ctx)

    monkeypatch.setattr(control, "fit", fit)
    ctx = StepContext.detached("mm_sft", tmp_path / "work")
    cfg = MMSFTConfig(finetune="lora", kd=MMKDSettings(), **{**FAST, "max_steps": 3, "checkpoint": {"save_steps": 100}})
    m = _train(cfg, {"model": student, "data": raw_ref(DATA), "teacher": plain[0]}, str(tmp_path / "out"), ctx)
    assert m["pauses"] == 1 and m["emergency_saves"] == 1 and m["global_step"] == 3
    assert (tmp_path / "work" / "checkpoints" / "checkpoint-2" / COMPLETE_MARKER).is_file()


def test_audio_kd_trains_on_clip_features_and_a_vision_teacher_is_refused(student, tiny_llm):
    def audio_omni(seed: int) -> ArtifactRef:
        ref = run_step(run_omni, OmniConfig(vision="none", audio="tiny", seed=seed), name=f"kd_audio_{seed}",
                       inputs={"model": raw_ref(tiny_llm)}).ref
        assert ref is not None
        return ref

    audio, teacher = audio_omni(0), audio_omni(1)  # same processor, another projector
    data = raw_ref(REPO / "data" / "raw" / "omni" / "audio_instruct.jsonl")
    cfg = MMSFTConfig(finetune="lora", kd=MMKDSettings(alpha=0.5), **FAST)
    r = run_step(run_mm_train, cfg, name="kd_audio", inputs={"model": audio, "data": data, "teacher": teacher})
    assert r.ref is not None and r.metrics["param_delta"] > 0 and r.metrics["train_loss"] > 0
    with pytest.raises(InputError, match=r"model_type 'llava' vs 'qwen2_audio'"):
        run_step(run_mm_train, cfg, name="kd_audio_bad", inputs={"model": audio, "data": data, "teacher": student})
