"""Speech out over nexus serve, through the official ``openai`` client: ``/v1/audio/speech`` streamed
sentence by sentence (WAV with an unknown-length header, raw 24 kHz PCM, SSE events) and chat completions
with ``modalities: ["text", "audio"]`` (streamed: text deltas with each sentence's ``delta.audio``
interleaved; not streamed: ``message.audio``). The TTS is the podcast's tiny two-speaker VITS (random
weights: noise shaped by text); the LLM is a tiny Llama trained for a second to answer one question with
four sentences, so what is spoken is known. A synthesis held back by the test shows that the first
sentence's audio is out before the rest is made and that other requests are answered meanwhile."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import threading
import wave

import httpx
import openai
import pytest

from nexus_core.context import StepContext
from nexus_core.errors import InputError
from nexus_core.podcast.tts import TinyTTSConfig, run_tiny_tts
from nexus_core.serve import serve_in_thread
from nexus_core.serve.app import create_app
from nexus_core.serve.speech import SentenceSplitter, split_sentences, wav_header
from tests.serve.helpers import one_torch_thread  # noqa: F401 - autouse fixture

QUESTION = "Say something."
ANSWER = "Hello there. This is a spoken test! Does it work? Goodbye now."
SPEECH = "One small step. Then another one! Where does it end? Nobody knows."


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm

    root = tmp_path_factory.mktemp("speech-serve")
    run_tiny_tts(TinyTTSConfig(), inputs={}, out_uri=str(root / "tts"), ctx=StepContext.detached("tts"))
    llm = build_tiny_llm(root / "llm", [ANSWER, QUESTION] * 20,
                         TinyLLMConfig(vocab_size=300, hidden_size=32, intermediate_size=64))
    tok = AutoTokenizer.from_pretrained(llm)
    model = AutoModelForCausalLM.from_pretrained(llm)
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                     tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + tok(ANSWER, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    labels = ids.clone()
    labels[0, :len(p_ids)] = -100
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(300):  # memorise the one answer (about a second)
        loss = model(input_ids=ids, labels=labels).loss
        if loss.item() < 0.01:
            break
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(llm)
    return {"llm": str(llm), "tts": str(root / "tts")}


@pytest.fixture(scope="module")
def app(models: dict[str, str]):
    app = create_app({"tiny": models["llm"]}, tts={"vits": models["tts"]})
    yield app
    app.state.close()


@pytest.fixture(scope="module")
def server(app):
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key="none", max_retries=0)


def _ask(**kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 40,
            **kw}


def _wav(data: bytes) -> tuple[int, bytes]:
    with wave.open(io.BytesIO(data), "rb") as fh:
        assert fh.getnchannels() == 1 and fh.getsampwidth() == 2
        return fh.getframerate(), fh.readframes(fh.getnframes())


def test_sentences_are_cut_as_soon_as_they_end_and_the_same_when_fed_by_the_character():
    text = "Pi is 3.14, roughly. Really?! Yes…\nA list line\n\"Quoted.\" Then the rest"
    whole = split_sentences(text)
    assert whole == ["Pi is 3.14, roughly.", "Really?!", "Yes…", "A list line", "\"Quoted.\"", "Then the rest"]
    s = SentenceSplitter()
    streamed = [x for c in text for x in s.feed(c)]
    assert streamed == whole[:-1] and s.flush() == whole[-1:]  # the last one waits for the end
    long = SentenceSplitter(max_chars=20).feed("word " * 10)
    assert long and all(len(x) <= 20 for x in long)  # a run-on sentence is cut at white space


def test_wav_header_known_and_unknown_lengths_read_with_wave():
    pcm = bytes(range(200))
    assert _wav(wav_header(16000, 100) + pcm) == (16000, pcm)
    assert _wav(wav_header(24000) + pcm) == (24000, pcm)  # 0xFFFFFFFF: read to the end, as streamed


def test_speech_streams_a_wav_sentence_by_sentence_and_the_server_stays_responsive(app, server, client):
    tts = app.state.tts
    calls, gate, real = [], threading.Event(), tts.synthesize

    def held(text, *args):  # the real synthesis, the second and later sentences held until the test says
        calls.append(text)
        if len(calls) > 1:
            assert gate.wait(30)
        return real(text, *args)

    tts.synthesize = held
    try:
        chunks = []
        with client.audio.speech.with_streaming_response.create(model="vits", input=SPEECH, voice="ash",
                                                                response_format="wav") as resp:
            assert resp.headers["content-type"] == "audio/wav"
            it = resp.iter_bytes()
            while sum(len(c) for c in chunks) <= 44:  # the header, then the first sentence's samples
                chunks.append(next(it))
            # sentence 1 arrived; sentence 2 is held in its synthesis (or about to be), 3 and 4 not started
            assert calls[0] == "One small step." and len(calls) <= 2
            # a slow synthesis holds a worker thread, not the event loop: other requests are answered
            assert httpx.get(server.removesuffix("/v1") + "/health", timeout=5).status_code == 200
            answer = client.chat.completions.create(**_ask(max_tokens=8))
            assert ANSWER.startswith(answer.choices[0].message.content or "-")
            gate.set()
            chunks.extend(it)
    finally:
        tts.synthesize = real
        gate.set()
    assert calls == split_sentences(SPEECH) and len(chunks) >= 2
    rate, frames = _wav(b"".join(chunks))
    assert rate == 16000 and len(frames) > 4 * 2 * 64  # every sentence spoke (at least a frame each)


def test_speech_pcm_is_24khz_raw_and_sse_sends_deltas_then_usage(client, server):
    with client.audio.speech.with_streaming_response.create(model="vits", input=SPEECH, voice="alloy",
                                                            response_format="pcm") as resp:
        assert resp.headers["x-sample-rate"] == "24000"
        pcm = b"".join(resp.iter_bytes())
    assert pcm and len(pcm) % 2 == 0 and not pcm.startswith(b"RIFF")
    events = []
    with httpx.stream("POST", f"{server}/audio/speech", timeout=30,
                      json={"model": "vits", "input": SPEECH, "voice": "ash", "stream_format": "sse"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["speech.audio.delta"] * 5 + ["speech.audio.done"]  # header + 4
    assert _wav(b"".join(base64.b64decode(e["audio"]) for e in events[:-1]))[0] == 16000
    usage = events[-1]["usage"]
    assert usage["input_tokens"] > len(SPEECH) and usage["output_tokens"] > 0


def test_chat_stream_interleaves_each_sentences_audio_with_the_text(client):
    stream = client.chat.completions.create(**_ask(), stream=True, modalities=["text", "audio"],
                                            audio={"voice": "ash", "format": "wav"})
    order, text, audio = [], [], []
    for chunk in stream:
        ch = chunk.choices[0]
        delta = ch.delta.model_dump()
        if delta.get("content"):
            text.append(delta["content"])
            order.append("text")
        if delta.get("audio"):
            audio.append(delta["audio"])
            order.append(("audio", "".join(text)))
        if ch.finish_reason:
            order.append("finish")
    assert "".join(text) == ANSWER
    sentences = split_sentences(ANSWER)
    assert [a["transcript"] for a in audio] == sentences
    seen = [said for x in order if isinstance(x, tuple) for said in x[1:]]  # the text out before each audio
    for sentence, said in zip(sentences, seen, strict=True):
        assert said.startswith(ANSWER[:ANSWER.index(sentence) + len(sentence)])  # audio after its text
    assert order[-1] == "finish" and order.count("finish") == 1  # the finish after the last audio
    assert len({a["id"] for a in audio}) == 1 and "expires_at" in audio[0]
    rate, frames = _wav(b"".join(base64.b64decode(a["data"]) for a in audio))
    assert rate == 16000 and len(frames) > 0


def test_chat_without_stream_returns_the_whole_answer_spoken(client):
    r = client.chat.completions.create(**_ask(), modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    msg = r.choices[0].message
    assert msg.content == ANSWER and msg.audio is not None and msg.audio.transcript == ANSWER
    assert msg.audio.id.startswith("audio_") and msg.audio.expires_at > r.created
    raw = base64.b64decode(msg.audio.data)
    with wave.open(io.BytesIO(raw), "rb") as fh:
        assert fh.getnframes() * 2 == len(raw) - 44 > 0  # a complete WAV: true lengths in the header
    pcm = client.chat.completions.create(**_ask(), modalities=["text", "audio"],
                                         audio={"voice": "alloy", "format": "pcm16"}).choices[0].message.audio
    assert pcm is not None and len(base64.b64decode(pcm.data)) % 2 == 0 and not pcm.data.startswith("UklGR")


def test_two_streamed_audio_chats_at_once_both_complete(server):
    async def one(voice: str) -> tuple[str, int, str]:
        client = openai.AsyncOpenAI(base_url=server, api_key="none", max_retries=0)
        stream = await client.chat.completions.create(**_ask(), stream=True, modalities=["text", "audio"],
                                                      audio={"voice": voice, "format": "pcm16"})
        text, n_audio, finish = "", 0, ""
        async for chunk in stream:
            d = chunk.choices[0].delta.model_dump()
            text += d.get("content") or ""
            n_audio += bool(d.get("audio"))
            finish = chunk.choices[0].finish_reason or finish
        return text, n_audio, finish

    async def both() -> list:
        return await asyncio.wait_for(asyncio.gather(one("alloy"), one("ash")), 60)

    assert asyncio.run(both()) == [(ANSWER, 4, "stop")] * 2


@pytest.mark.parametrize(("path", "body", "status", "match"), [
    ("audio/speech", {"model": "vits", "input": "Hi.", "voice": "nova"}, 400, "unknown voice 'nova'.*alloy, ash"),
    ("audio/speech", {"model": "vits", "input": "Hi.", "voice": "ash", "response_format": "mp3"}, 400,
     "'mp3' is not supported"),
    ("audio/speech", {"model": "tts-1", "input": "Hi.", "voice": "ash"}, 404, "unknown tts model 'tts-1'"),
    ("audio/speech", {"model": "vits", "input": " ", "voice": "ash"}, 400, "input is empty"),
    ("audio/speech", {"model": "vits", "input": "Hi.", "voice": "ash", "instructions": "whisper"}, 400, "instructions"),
    ("audio/speech", {"model": "vits", "input": "x" * 4097, "voice": "ash"}, 400, "input"),
    ("chat/completions", _ask(modalities=["text", "audio"], audio={"voice": "nova", "format": "wav"}), 400,
     "unknown voice 'nova'"),
    ("chat/completions", _ask(modalities=["text", "audio"], audio={"voice": "ash", "format": "mp3"}), 400,
     "'mp3' is not supported"),
    ("chat/completions", _ask(modalities=["text", "audio"]), 400, r"audio: \{voice, format\}"),
    ("chat/completions", _ask(modalities=["audio"], audio={"voice": "ash", "format": "wav"}), 400, "text"),
])
def test_bad_speech_requests_get_a_clear_4xx(server, path, body, status, match):
    r = httpx.post(f"{server}/{path}", json=body, timeout=10)
    assert r.status_code == status
    assert re.search(match, r.json()["error"]["message"])


def test_without_a_tts_model_speech_is_refused_and_bad_tts_models_fail_at_load(models):
    app = create_app({"tiny": models["llm"]})
    try:
        with serve_in_thread(app) as url:
            for path, body in [("audio/speech", {"model": "vits", "input": "Hi.", "voice": "ash"}),
                               ("chat/completions", _ask(modalities=["text", "audio"],
                                                         audio={"voice": "ash", "format": "wav"}))]:
                r = httpx.post(f"{url}/{path}", json=body, timeout=10)
                assert r.status_code == 400 and "no text-to-speech model is loaded" in r.json()["error"]["message"]
            assert httpx.post(f"{url}/chat/completions", json=_ask(max_tokens=3), timeout=10).status_code == 200
    finally:
        app.state.close()
    with pytest.raises(InputError, match="'llama' model; the tts model must be a VITS"):
        create_app({}, tts={"x": models["llm"]})
    with pytest.raises(InputError, match=r"voice 'nova': speaker_id 5 does not fit .*0\.\.1"):
        create_app({}, tts={"x": models["tts"]}, tts_voices={"nova": 5})


def test_cli_and_serve_config_refuse_bad_tts_settings_before_loading_anything():
    from flows.cli import build_parser
    from nexus_core.errors import NexusError
    from nexus_core.serve.launch import ServeConfig, serve_models

    args = build_parser().parse_args(["serve", "tiny=/nowhere", "--tts", "v=/nowhere", "--tts-voice", "host"])
    with pytest.raises(NexusError, match="--tts-voice 'host': expected NAME=SPEAKER_ID"):
        args.func(args)
    with pytest.raises(NexusError, match="embedded engine only"):
        serve_models(ServeConfig(models={"a": "/nowhere"}, engine="vllm", tts={"v": "/nowhere"}))
