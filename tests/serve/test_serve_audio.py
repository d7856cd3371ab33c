"""Chat requests with OpenAI ``input_audio`` content parts on a tiny audio composite (the Qwen2-Audio
sibling), through the official ``openai`` client: the server's greedy answer and first-token
log-probability are what plain transformers gives for that clip (8 kHz WAV, resampled to 16 kHz), also
when two requests with different clips are prefilled in one batch; a text-only model, bad base64, another
format and an undecodable clip get a 400 naming the part."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import httpx
import openai
import pytest

from nexus_core.serve import serve_in_thread
from nexus_core.serve.app import create_app
from tests.serve.helpers import one_torch_thread  # noqa: F401 - autouse fixture

REPO = Path(__file__).resolve().parents[2]
AUDIO = REPO / "data" / "raw" / "omni" / "audio"
TEXTS = ["a high tone", "a low tone", "is the sound high or low", "describe the sound"] * 10
QUESTION = "Is the sound high or low?"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm
    from nexus_core.train.audio import TinyAudioConfig, build_tiny_audio, compose_audio
    from nexus_core.train.omni import OmniConfig

    root = tmp_path_factory.mktemp("audio-serve")
    llm = build_tiny_llm(root / "llm", TEXTS, TinyLLMConfig(vocab_size=300, hidden_size=32, intermediate_size=64))
    audio = build_tiny_audio(root / "whisper", TinyAudioConfig())
    compose_audio(OmniConfig(vision="none", audio="tiny"), llm, audio, root / "omni")
    return {"omni": str(root / "omni"), "text": str(llm)}


@pytest.fixture(scope="module")
def server(models: dict[str, str]):
    app = create_app(models, batch_wait_s=0.2)  # long enough for two concurrent requests to prefill together
    with serve_in_thread(app) as url:
        yield url
    app.state.close()


def _part(name: str, fmt: str = "wav") -> dict:
    data = base64.b64encode((AUDIO / name).read_bytes()).decode()
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


def _messages(part: dict) -> list:
    return [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]


def _reference(path: str, name: str) -> tuple[str, float]:
    """What plain transformers generates for this clip (greedy, 6 tokens), and the first token's logprob."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoProcessor

    from nexus_core.train.audio import AudioSpec, load_audio

    model = AutoModelForSeq2SeqLM.from_pretrained(path)
    proc = AutoProcessor.from_pretrained(path)
    chat = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": QUESTION}]}]
    clip = load_audio(AUDIO / name, AudioSpec(16000, 30.0))
    enc = proc(text=[proc.apply_chat_template(chat, add_generation_prompt=True)], audio=[clip], sampling_rate=16000,
               return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
        first = torch.log_softmax(model(**enc).logits[0, -1].float(), -1).max()
    return proc.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True), float(first)


def test_audio_requests_answer_as_generate_does_alone_and_batched(server: str, models: dict[str, str]) -> None:
    names = ["high_1760.wav", "low_220.wav"]

    async def both() -> list:
        client = openai.AsyncOpenAI(base_url=server, api_key="none", max_retries=0)
        return list(await asyncio.gather(*(client.chat.completions.create(
            model="omni", messages=_messages(_part(n)), max_tokens=6, temperature=0, logprobs=True)  # type: ignore[arg-type]
            for n in names)))

    refs = [_reference(models["omni"], n) for n in names]
    assert refs[0][1] != pytest.approx(refs[1][1], abs=1e-6)  # the clips make a difference
    for resp, (text, logprob) in zip(asyncio.run(both()), refs, strict=True):
        choice = resp.choices[0]
        assert choice.message.content == text
        assert choice.logprobs.content[0].logprob == pytest.approx(logprob, abs=1e-4)
        assert resp.usage.prompt_tokens > 12  # the clip's 12 tokens are in the prompt
    metrics = httpx.get(server.removesuffix("/v1") + "/metrics").text  # both rows decoded in one batch
    assert 'nexus_serve_batch_rows_bucket{le="1.0",model="omni"} 0.0' in metrics
    client = openai.OpenAI(base_url=server, api_key="none", max_retries=0)
    alone = client.chat.completions.create(model="omni", messages=_messages(_part(names[1])), max_tokens=6,  # type: ignore[arg-type]
                                          temperature=0, logprobs=True)
    assert alone.choices[0].logprobs.content[0].logprob == pytest.approx(refs[1][1], abs=1e-4)
    text_only = client.chat.completions.create(model="omni", messages=[{"role": "user", "content": "a high"}],
                                               max_tokens=3, temperature=0)
    assert text_only.usage.completion_tokens >= 1


@pytest.mark.parametrize(("model", "part", "message"), [
    ("text", _part("low_220.wav"), "this model takes no audio"),
    ("omni", {"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}, "not valid base64"),
    ("omni", _part("low_220.wav", "mp3"), "input_audio format 'mp3' is not supported"),
    ("omni", {"type": "input_audio", "input_audio": {"data": "bm90IGEgd2F2", "format": "wav"}},
     "the audio cannot be read as a PCM WAV"),
    ("omni", {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "image parts are refused"),
])
def test_bad_audio_parts_are_a_400_naming_the_part(server: str, model: str, part: dict, message: str) -> None:
    client = openai.OpenAI(base_url=server, api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=_messages(part), max_tokens=3)  # type: ignore[arg-type]
    assert message in str(err.value) and "messages[0].content[0]" in str(err.value)
