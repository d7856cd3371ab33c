"""Omni conversion and the multimodal stages on tiny models built from config (real from_pretrained,
real Trainer, real spine): the composed model loads with the Auto classes, alignment trains only the
projector, instruction tuning trains LoRA + projector, bad media names its row, and a stage on a model
without the data's modality stops before work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.errors import InputError
from nexus_core.runner import run_step
from nexus_core.train.encoders import encoder_spec, load_encoders
from nexus_core.train.mm_data import encode_mm, mm_records
from nexus_core.train.mm_train import MMAlignConfig, MMSFTConfig, run_mm_train
from nexus_core.train.modalities import (
    detect_modalities,
    modalities_of_config,
    modality_problems,
    needed_by_columns,
)
from nexus_core.train.omni import OmniConfig, run_omni

REPO = Path(__file__).resolve().parents[2]
OMNI_DATA = REPO / "data" / "raw" / "omni"
FAST = {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "checkpoint": {"save_steps": 2}}


@pytest.fixture(scope="module")
def omni(tiny_llm) -> ArtifactRef:
    """The shared tiny LLM composed with a tiny SigLIP tower."""
    r = run_step(run_omni, OmniConfig(vision="tiny"), name="t_omni", inputs={"model": raw_ref(tiny_llm)})
    assert r.ref is not None
    return r.ref


@pytest.fixture(scope="module")
def aligned(omni) -> ArtifactRef:
    r = run_step(run_mm_train, MMAlignConfig(**FAST), name="t_align",
                 inputs={"model": omni, "data": raw_ref(OMNI_DATA / "captions.jsonl")})
    assert r.ref is not None and r.metrics["param_delta"] > 0
    return r.ref


def _weights(path: Path, part: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path / "model.safetensors")).items() if part in k}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_detect_modalities_from_configs(tiny_llm):
    assert detect_modalities(tiny_llm) == ["text"]
    assert modalities_of_config({"model_type": "llava", "vision_config": {}, "image_token_index": 5}) == [
        "text", "vision"]
    assert modalities_of_config({"model_type": "qwen2_audio", "audio_config": {}}) == ["text", "audio"]
    thinker = {"thinker_config": {"vision_config": {}, "audio_config": {}, "video_token_index": 3}}
    assert modalities_of_config({"model_type": "qwen2_5_omni", **thinker}) == ["text", "vision", "video", "audio"]
    assert needed_by_columns(["messages", "images", "audios"]) == ["text", "vision", "audio"]
    assert modality_problems(["text"], ["text"], "m", "s") == []
    (line,) = modality_problems(["text", "vision"], ["text"], "model m", "stages.x")
    assert line.startswith("stages.x: modality validation failed: the data needs vision but model m takes text")


def test_shipped_encoders_file_names_roles_and_passes_references_through():
    enc = load_encoders()
    assert enc.encoders["vision"]["tiny"] == "tiny" and "default" in enc.encoders["audio_input"]
    assert encoder_spec("tiny", "vision") == "tiny"
    assert encoder_spec("/models/my-siglip", "vision") == "/models/my-siglip"


def test_composed_model_loads_with_auto_classes_and_keeps_the_llm(omni, tiny_llm):
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    path = omni.path
    assert detect_modalities(path) == ["text", "vision"]
    model = AutoModelForImageTextToText.from_pretrained(str(path))
    proc = AutoProcessor.from_pretrained(str(path))
    assert type(model).__name__ == "LlavaForConditionalGeneration" and type(proc).__name__ == "LlavaProcessor"
    llm = AutoModelForCausalLM.from_pretrained(str(tiny_llm))
    q = "layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.model.language_model.get_submodule(q.rsplit(".", 1)[0]).weight,
                       llm.model.get_submodule(q.rsplit(".", 1)[0]).weight)  # the LLM's weights, unchanged
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()  # tied
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = proc.apply_chat_template(chat, add_generation_prompt=True)
    image = Image.open(OMNI_DATA / "images" / "red_square.png")
    enc = proc(text=[text], images=[image], return_tensors="pt")
    image_id = model.config.image_token_index
    assert int((enc["input_ids"] == image_id).sum()) == model.config.image_seq_length == 16
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3
    # the training encoder makes exactly the processor's tokens
    record = {"messages": [*chat, {"role": "assistant", "content": "Red."}], "images": []}
    mine = encode_mm(proc.tokenizer, record, model.config.image_seq_length, 512)
    full = proc(text=[proc.apply_chat_template(record["messages"])], images=[image])["input_ids"][0]
    assert mine["input_ids"] == list(full)
    answer = [t for t, lab in zip(mine["input_ids"], mine["labels"], strict=True) if lab != -100]
    assert proc.tokenizer.decode(answer).startswith("Red.")  # the loss is on the assistant turn only


def test_omni_refuses_a_model_that_already_sees(omni):
    with pytest.raises(InputError, match="already takes text, vision"):
        run_step(run_omni, OmniConfig(vision="tiny"), name="t_omni_twice", inputs={"model": omni})


def test_align_trains_only_the_projector_then_lora_sft_trains_llm_and_projector(omni, aligned):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    before, after = omni.path, aligned.path
    assert not _same(_weights(before, "multi_modal_projector"), _weights(after, "multi_modal_projector"))
    assert _same(_weights(before, "language_model"), _weights(after, "language_model"))
    assert _same(_weights(before, "vision_tower"), _weights(after, "vision_tower"))
    r = run_step(run_mm_train, MMSFTConfig(finetune="lora", **FAST), name="t_mm_sft",
                 inputs={"model": aligned, "data": raw_ref(OMNI_DATA / "instruct.jsonl")})
    assert r.ref is not None
    tuned = r.ref.path
    assert not _same(_weights(after, "language_model"), _weights(tuned, "language_model"))  # LoRA merged
    assert not _same(_weights(after, "multi_modal_projector"), _weights(tuned, "multi_modal_projector"))
    assert _same(_weights(after, "vision_tower"), _weights(tuned, "vision_tower"))
    adapter = json.loads((tuned / "adapter" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["multi_modal_projector"] and "language_model" in adapter["target_modules"]
    assert type(AutoModelForImageTextToText.from_pretrained(str(tuned))).__name__ == "LlavaForConditionalGeneration"
    assert AutoProcessor.from_pretrained(str(tuned)).image_token == "<image>"


def test_a_stage_on_a_text_only_model_stops_before_work(tiny_llm, tmp_path):
    with pytest.raises(InputError, match="modality validation failed: the data needs vision"):
        run_step(run_mm_train, MMAlignConfig(**FAST), name="t_mm_text_only",
                 inputs={"model": raw_ref(tiny_llm), "data": raw_ref(OMNI_DATA / "captions.jsonl")})


def _rows(tmp_path: Path, images: list[list[str]], messages: list[list[dict]] | None = None) -> Path:
    shutil.copytree(OMNI_DATA / "images", tmp_path / "images")
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    chat = [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "Red."}]
    rows = [{"messages": (messages or [])[i] if messages else chat, "images": im} for i, im in enumerate(images)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_media_names_the_row_or_is_a_counted_skip(tmp_path):
    import polars as pl

    ok = ["images/red_square.png"]
    path = _rows(tmp_path, [ok, ["images/missing.png"], ok, ["images/broken.png"]])
    df = pl.read_ndjson(path)
    with pytest.raises(InputError, match=r"row 1: image 'images/missing.png' .* does not exist \(2 of 4 rows"):
        mm_records(df, str(path), tmp_path)
    corrupt = _rows(tmp_path / "c", [ok, ok, ok, ["images/broken.png"]])
    with pytest.raises(InputError, match=r"row 3: image 'images/broken.png'.*cannot be read \(Unidentified"):
        mm_records(pl.read_ndjson(corrupt), str(corrupt), tmp_path / "c")
    records, skipped = mm_records(df, str(path), tmp_path, max_skipped=0.5)
    assert skipped == 2 and len(records) == 2
    assert records[0]["messages"][0]["content"][0] == {"type": "image"}  # no placeholder: image goes first
    two = [{"role": "user", "content": "<image><image>Compare."}, {"role": "assistant", "content": "Same."}]
    path2 = _rows(tmp_path / "b", [ok], [two])
    with pytest.raises(InputError, match=r"row 0: has 2 <image> placeholder\(s\) for 1 image"):
        mm_records(pl.read_ndjson(path2), str(path2), tmp_path / "b")


def test_queue_modality_problems_follow_models_through_the_queue(tmp_path):
    from types import SimpleNamespace

    from nexus_core.train.modalities import queue_modality_problems

    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n')
    data = {"captions": raw_ref(OMNI_DATA / "captions.jsonl"), "chat": raw_ref(chat)}

    def stage(name: str, method: str, dataset: str) -> SimpleNamespace:
        return SimpleNamespace(name=name, model=None, dataset=dataset, train=SimpleNamespace(method=method))

    queue = [stage("align", "mm_align", "captions"), stage("vqa", "mm_sft", "captions")]
    assert queue_modality_problems(queue, ["text", "vision"], {}, data) == []
    text_base = queue_modality_problems(queue, ["text"], {}, data)
    assert [p.split(":")[0] for p in text_base] == ["stages.align", "stages.vqa"]
    assert "the data needs vision but the model of stage align takes text only" in text_base[1]
    (late,) = queue_modality_problems([*queue, stage("sft", "sft", "chat")], ["text", "vision"], {}, data)
    assert late.startswith("stages.sft: modality validation failed: sft trains text-only causal LMs but the "
                           "model of stage vqa takes text, vision")
    assert queue_modality_problems([stage("sft", "sft", "chat")], None, {}, data) == []  # unknown base


def test_mm_sft_resumes_from_its_checkpoint_in_the_work_dir(aligned, tmp_path):
    """A stage killed after a checkpoint continues from it (same work dir), LoRA adapters included."""
    from nexus_core.context import StepContext
    from nexus_core.train.mm_train import _train

    ctx = StepContext.detached("mm_sft", tmp_path / "work")
    inputs = {"model": aligned, "data": raw_ref(OMNI_DATA / "instruct.jsonl")}
    first = _train(MMSFTConfig(finetune="lora", **FAST), inputs, str(tmp_path / "out1"), ctx)
    again = _train(MMSFTConfig(finetune="lora", **{**FAST, "max_steps": 4}), inputs, str(tmp_path / "out2"), ctx)
    assert first["resumed_from_step"] == 0 and first["global_step"] == 2
    assert again["resumed_from_step"] == 2 and again["global_step"] == 4
    assert (tmp_path / "out2" / "adapter" / "adapter_config.json").is_file()


def test_mm_stage_configs_refuse_what_they_do_not_build():
    from pydantic import ValidationError

    for bad, message in [(dict(finetune="qlora"), "not built for the multimodal stages"),
                         (dict(chat_template="chatml"), "set chat_template on the omni section")]:
        with pytest.raises(ValidationError, match=message):
            MMSFTConfig(**bad)
    with pytest.raises(ValidationError, match="mm_align trains the projector's full weights"):
        MMAlignConfig(finetune="lora")
