"""Audio input on tiny models built from config (real from_pretrained, real Trainer, real spine): WAV
decoding and resampling, the Qwen2-Audio composite loading with plain transformers and generating,
alignment training only the projector, LoRA instruction tuning, bad clips named by row, and modality
validation for audio data."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.errors import InputError
from nexus_core.runner import run_step
from nexus_core.train.audio import AudioSpec, load_audio, read_wav
from nexus_core.train.audio_data import audio_records, encode_audio_mm
from nexus_core.train.encoders import encoder_spec
from nexus_core.train.mm_train import MMAlignConfig, MMSFTConfig, run_mm_train
from nexus_core.train.modalities import detect_modalities
from nexus_core.train.omni import OmniConfig, run_omni
from tests.support.omni_audio import tone, write_wav

REPO = Path(__file__).resolve().parents[2]
OMNI_DATA = REPO / "data" / "raw" / "omni"
FAST = {"max_steps": 2, "batch_size": 3, "learning_rate": 1e-2, "checkpoint": {"save_steps": 2}}
SPEC = AudioSpec(sampling_rate=16000, max_seconds=2.0)


@pytest.fixture(scope="module")
def audio_omni(tiny_llm) -> ArtifactRef:
    """The shared tiny LLM composed with a tiny Whisper encoder (the Qwen2-Audio sibling)."""
    r = run_step(run_omni, OmniConfig(vision="none", audio="tiny"), name="t_audio_omni",
                 inputs={"model": raw_ref(tiny_llm)})
    assert r.ref is not None and r.architecture == "Qwen2AudioForConditionalGeneration" and r.audio_tokens == 50
    return r.ref


def _weights(path: Path, part: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path / "model.safetensors")).items() if k.startswith(part)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_wav_decoding_widths_channels_and_resampling(tmp_path):
    sine = tone(440, 0.25, 8000)
    for width in (1, 2, 4):
        data, rate = read_wav(write_wav(tmp_path / f"w{width}.wav", sine, width=width))
        assert rate == 8000 and np.abs(data - sine).max() < 0.01 * (2 if width == 1 else 1)
    stereo = np.stack([sine, -sine], axis=1).reshape(-1)  # the channels cancel when averaged
    data, _ = read_wav(write_wav(tmp_path / "st.wav", stereo, channels=2))
    assert len(data) == len(sine) and np.abs(data).max() < 1e-3
    buf = (tmp_path / "w2.wav").read_bytes()
    up = load_audio(io.BytesIO(buf).getvalue(), SPEC)  # bytes, as the server gets them
    assert len(up) == 2 * len(sine)
    spectrum = np.abs(np.fft.rfft(up))
    assert abs(np.argmax(spectrum) * 16000 / len(up) - 440) < 10  # still a 440 Hz tone at 16 kHz
    with pytest.raises(ValueError, match="wrong sample rate: 8000 Hz; the encoder takes 16000 Hz"):
        load_audio(buf, AudioSpec(16000, 2.0, resample=False))
    with pytest.raises(ValueError, match=r"too long: 0.25 s > 0.1 s"):
        load_audio(buf, AudioSpec(16000, 0.1))
    with pytest.raises(ValueError, match="cannot be read as a PCM WAV"):
        load_audio(b"RIFF not a wav", SPEC)


def test_omni_config_composes_vision_or_audio_not_both():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="sibling classes"):
        OmniConfig(audio="tiny")
    with pytest.raises(ValidationError, match="nothing to compose"):
        OmniConfig(vision="none")
    assert OmniConfig(vision="none", audio="default").audio_spec() == "openai/whisper-large-v3-turbo"
    assert encoder_spec("tiny", "audio_input") == "tiny"


def test_audio_composite_loads_with_plain_transformers_keeps_the_llm_and_generates(audio_omni, tiny_llm):
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoProcessor,
        Qwen2AudioForConditionalGeneration,
    )

    path = str(audio_omni.path)
    assert detect_modalities(path) == ["text", "audio"]
    model = Qwen2AudioForConditionalGeneration.from_pretrained(path)
    assert type(AutoModelForSeq2SeqLM.from_pretrained(path)).__name__ == "Qwen2AudioForConditionalGeneration"
    proc = AutoProcessor.from_pretrained(path)
    assert type(proc).__name__ == "Qwen2AudioProcessor" and proc.feature_extractor.sampling_rate == 16000
    llm = AutoModelForCausalLM.from_pretrained(str(tiny_llm))
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(model.language_model.get_submodule(q).weight, llm.get_submodule(q).weight)
    chat = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Is it high or low?"}]}]
    clip = load_audio(OMNI_DATA / "audio" / "high_1760.wav", SPEC)
    enc = proc(text=[proc.apply_chat_template(chat, add_generation_prompt=True)], audio=[clip],
               sampling_rate=16000, return_tensors="pt")
    n_audio = int((enc["input_ids"] == model.config.audio_token_index).sum())
    assert n_audio == 12  # 0.5 s: 50 frames → 25 after the stride-2 conv → 12 after pooling
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3
    # the training encoder makes exactly the processor's tokens, loss on the answer only
    record = {"messages": [*chat, {"role": "assistant", "content": "High."}],
              "audios": [str(OMNI_DATA / "audio" / "high_1760.wav")]}
    mine = encode_audio_mm(proc, record, SPEC, 512)
    full = proc(text=[proc.apply_chat_template(record["messages"])], audio=[clip], sampling_rate=16000)
    assert mine["input_ids"] == list(full["input_ids"][0])
    answer = [t for t, lab in zip(mine["input_ids"], mine["labels"], strict=True) if lab != -100]
    assert proc.tokenizer.decode(answer).startswith("High.")


def test_align_trains_only_the_projector_then_lora_sft_the_llm_and_projector(audio_omni):
    from transformers import AutoProcessor

    r = run_step(run_mm_train, MMAlignConfig(**FAST), name="t_audio_align",
                 inputs={"model": audio_omni, "data": raw_ref(OMNI_DATA / "audio_captions.jsonl")})
    assert r.ref is not None and r.metrics["param_delta"] > 0
    before, after = audio_omni.path, r.ref.path
    assert not _same(_weights(before, "multi_modal_projector"), _weights(after, "multi_modal_projector"))
    assert _same(_weights(before, "language_model"), _weights(after, "language_model"))
    assert _same(_weights(before, "audio_tower"), _weights(after, "audio_tower"))
    s = run_step(run_mm_train, MMSFTConfig(finetune="lora", **FAST), name="t_audio_sft",
                 inputs={"model": r.ref, "data": raw_ref(OMNI_DATA / "audio_instruct.jsonl")})
    assert s.ref is not None
    tuned = s.ref.path
    assert not _same(_weights(after, "language_model"), _weights(tuned, "language_model"))  # LoRA merged
    assert not _same(_weights(after, "multi_modal_projector"), _weights(tuned, "multi_modal_projector"))
    assert _same(_weights(after, "audio_tower"), _weights(tuned, "audio_tower"))
    adapter = json.loads((tuned / "adapter" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["multi_modal_projector"]
    assert adapter["target_modules"].startswith(r"^language_model\.model\.")
    assert AutoProcessor.from_pretrained(str(tuned)).audio_token == "<|AUDIO|>"


def _rows(tmp_path: Path, audios: list[list[str]], messages: list[list[dict]] | None = None) -> Path:
    write_wav(tmp_path / "ok.wav", tone(880, 0.5, 16000), rate=16000)
    write_wav(tmp_path / "slow.wav", tone(880, 0.5, 8000))
    write_wav(tmp_path / "long.wav", tone(880, 3.0, 16000), rate=16000)
    (tmp_path / "broken.wav").write_bytes(b"not a wav")
    chat = [{"role": "user", "content": "High or low?"}, {"role": "assistant", "content": "High."}]
    rows = [{"messages": messages[i] if messages else chat, "audios": a} for i, a in enumerate(audios)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("bad", "spec", "message"), [
    ("missing.wav", SPEC, r"row 1: audio 'missing.wav' .* does not exist"),
    ("broken.wav", SPEC, r"row 1: audio 'broken.wav' .* cannot be read as a PCM WAV"),
    ("long.wav", SPEC, r"row 1: audio 'long.wav' .* is too long: 3.00 s > 2 s"),
    ("slow.wav", AudioSpec(16000, 2.0, resample=False), r"row 1: audio 'slow.wav' .* wrong sample rate: 8000 Hz"),
])
def test_bad_clips_name_the_row_or_are_a_counted_skip(tmp_path, bad, spec, message):
    path = _rows(tmp_path, [["ok.wav"], [bad], ["slow.wav"]])
    df = pl.read_ndjson(path)
    with pytest.raises(InputError, match=message):
        audio_records(df, str(path), tmp_path, spec)
    records, skipped = audio_records(df, str(path), tmp_path, spec, max_skipped=0.7)
    assert skipped == (2 if bad == "slow.wav" else 1) and len(records) == 3 - skipped
    assert records[0]["messages"][0]["content"][0] == {"type": "audio"}  # no placeholder: the clip goes first


def test_placeholder_counts_and_foreign_media_name_the_row(tmp_path):
    two = [{"role": "user", "content": "<audio><audio>Same?"}, {"role": "assistant", "content": "Yes."}]
    path = _rows(tmp_path, [["ok.wav"]], [two])
    with pytest.raises(InputError, match=r"row 0: has 2 <audio> placeholder\(s\) for 1 audio clip"):
        audio_records(pl.read_ndjson(path), str(path), tmp_path, SPEC)
    img = tmp_path / "img.jsonl"
    img.write_text(json.dumps({"messages": two, "audios": ["ok.wav"], "images": ["x.png"]}) + "\n")
    with pytest.raises(InputError, match="row 0: has images/videos but the audio model takes audio and text only"):
        audio_records(pl.read_ndjson(img), str(img), tmp_path, SPEC)


def test_audio_data_on_a_model_without_audio_stops_before_work(tiny_llm):
    with pytest.raises(InputError, match="modality validation failed: the data needs audio"):
        run_step(run_mm_train, MMAlignConfig(**FAST), name="t_audio_text_only",
                 inputs={"model": raw_ref(tiny_llm), "data": raw_ref(OMNI_DATA / "audio_captions.jsonl")})


def test_image_data_on_the_audio_model_stops_before_work(audio_omni):
    with pytest.raises(InputError, match="modality validation failed: the data needs vision but model .* takes "
                                         "text, audio only"):
        run_step(run_mm_train, MMAlignConfig(**FAST), name="t_audio_images",
                 inputs={"model": audio_omni, "data": raw_ref(OMNI_DATA / "captions.jsonl")})
