"""Speech out over the OpenAI-compatible server: ``POST /v1/audio/speech`` and chat answers with audio.

The server loads one text-to-speech model (``create_app(tts={name: dir_or_hub_id})``, ``nexus serve
--tts``): a VITS checkpoint through ``transformers.VitsModel.from_pretrained`` (``kakao-enterprise/vits-vctk``,
``facebook/mms-tts-*``, or the tiny preset of :mod:`nexus_core.podcast.tts`). Voices are names mapped to
speaker ids; by default OpenAI's voice names in order (``alloy`` → 0, ``ash`` → 1, ...) for as many
speakers as the model has, ``alloy`` alone for a single-speaker model.

Text is split into sentences (:class:`SentenceSplitter`: a terminator followed by white space, a line
break, or ``MAX_SENTENCE_CHARS`` without either) and each sentence is synthesised on its own, in a worker
thread (never on the event loop; one synthesis at a time per model), and sent as soon as it is ready:

- ``/v1/audio/speech`` answers a chunked body: ``wav`` is a 16-bit mono header with unknown lengths
  (``0xFFFFFFFF``, as OpenAI streams it) followed by each sentence's samples at the model's rate;
  ``pcm`` is raw 16-bit little-endian samples at 24 kHz (OpenAI's documented rate; resampled);
  ``stream_format: sse`` sends ``speech.audio.delta`` events (base64) and a ``speech.audio.done`` event.
- Chat completions with ``modalities: ["text", "audio"]`` and ``audio: {voice, format: wav|pcm16}``:
  streamed, the text deltas flow as usual while every completed sentence is synthesised concurrently
  and sent as a ``delta.audio`` chunk ``{id, data, transcript}`` (the first per choice also carries
  ``expires_at``; for ``wav`` its data starts with the header, so one choice's data joined is a WAV);
  a choice's ``finish_reason`` comes after its last audio. Not streamed, ``message.audio`` holds
  ``{id, data, transcript, expires_at}`` with a complete WAV (true lengths) or PCM. Unlike OpenAI,
  ``content`` keeps the text too; the audio is not stored (its id cannot be referred to later).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import struct
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from math import gcd, prod
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from nexus_core.errors import InputError
from nexus_core.serve.app import APIError, Metrics

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
                 "marin", "cedar")
PCM_RATE = 24000  # OpenAI's raw PCM (speech ``pcm``, chat ``pcm16``) is 24 kHz 16-bit mono
MAX_INPUT_CHARS = 4096  # OpenAI's limit on /v1/audio/speech input
MAX_SENTENCE_CHARS = 300  # a run-on "sentence" is cut at white space so its audio does not wait for ever
AUDIO_TTL_S = 3600  # expires_at = created + this (nothing is stored; the field is part of the shape)


def wav_header(rate: int, frames: int | None = None) -> bytes:
    """A 44-byte 16-bit mono PCM WAV header; ``frames=None``: unknown length (0xFFFFFFFF), for streaming."""
    data = 0xFFFFFFFF if frames is None else frames * 2
    riff = 0xFFFFFFFF if frames is None else 36 + data
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", riff, b"WAVE", b"fmt ", 16, 1, 1, rate, rate * 2, 2, 16,
                       b"data", data)


class SentenceSplitter:
    """Cuts streamed text into sentences as soon as each is complete (``feed``), the rest at the end (``flush``)."""

    _END = re.compile(r"[.!?;…]+[\"')\]]*\s+|\n+")

    def __init__(self, max_chars: int = MAX_SENTENCE_CHARS):
        self.buf = ""
        self.max_chars = max_chars

    def feed(self, text: str) -> list[str]:
        """Append ``text``; return the sentences it completed (stripped, non-empty)."""
        self.buf += text
        out = []
        while True:
            m = self._END.search(self.buf)
            if m:
                cut = m.end()
            elif len(self.buf) > self.max_chars:
                space = self.buf.rfind(" ", 0, self.max_chars)
                cut = space + 1 if space > 0 else self.max_chars
            else:
                return out
            sentence, self.buf = self.buf[:cut].strip(), self.buf[cut:]
            if sentence:
                out.append(sentence)

    def flush(self) -> list[str]:
        """What is left (the last sentence, unterminated), as a list of zero or one."""
        rest, self.buf = self.buf.strip(), ""
        return [rest] if rest else []


def split_sentences(text: str) -> list[str]:
    """``text`` as :class:`SentenceSplitter` cuts it."""
    s = SentenceSplitter()
    return s.feed(text) + s.flush()


class TTS:
    """A VITS model and its tokenizer, voices by name, synthesising one sentence at a time."""

    def __init__(self, name: str, path: str, voices: dict[str, int | None] | None = None, device: str | None = None):
        import torch
        from transformers import AutoTokenizer, VitsModel

        self.name = name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            model: Any = VitsModel.from_pretrained(path)  # transformers' typing of .to() trips pyright
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise InputError(f"tts {path}: not a VITS model directory or hub id ({exc})") from exc
        self.model = model.eval().to(self.device)
        self.rate = int(model.config.sampling_rate)
        self.hop = prod(model.config.upsample_rates)  # waveform samples per spectrogram frame
        self.base_speaking_rate = float(model.speaking_rate)
        n = int(model.config.num_speakers)
        if voices is None:
            voices = {v: i for i, v in enumerate(OPENAI_VOICES[:n])} if n > 1 else {"alloy": None}
        for voice, sid in voices.items():
            if (sid is None) != (n <= 1) or (sid or 0) >= max(n, 1) or (sid or 0) < 0:
                raise InputError(f"tts voice {voice!r}: speaker_id {sid} does not fit {path} ({n} speaker(s)"
                                 f"{'; use none' if n <= 1 else f'; use 0..{n - 1}'})")
        if not voices:
            raise InputError(f"tts {path}: no voices")
        self.voices = dict(voices)
        self.lock = threading.Lock()

    def speaker(self, voice: Any, param: str) -> int | None:
        """The speaker id of an OpenAI ``voice`` (a name or ``{"id": name}``); 400 when unknown."""
        key = voice.get("id") if isinstance(voice, dict) else voice
        if not isinstance(key, str) or key not in self.voices:
            raise APIError(400, f"unknown voice {key!r} for tts model {self.name!r} (voices: "
                                f"{', '.join(self.voices)})", param=param, code="unknown_voice")
        return self.voices[key]

    def synthesize(self, text: str, speaker: int | None, speed: float = 1.0,
                   rate: int | None = None) -> tuple[bytes, int]:
        """16-bit little-endian PCM of ``text`` at ``rate`` (default: the model's), and the model's output
        frames. Text with nothing to say (no letter or digit) gives no samples. Blocking: call it from a
        worker thread."""
        import numpy as np
        import torch

        if not any(c.isalnum() for c in text):
            return b"", 0
        ids = self.tokenizer(text, return_tensors="pt")
        if ids["input_ids"].shape[-1] == 0:
            return b"", 0
        with self.lock:  # one model, one synthesis at a time (speaking_rate is per call)
            self.model.speaking_rate = self.base_speaking_rate * speed
            try:
                with torch.no_grad():
                    wave = self.model(**ids.to(self.device), speaker_id=speaker).waveform[0]
            finally:
                self.model.speaking_rate = self.base_speaking_rate
        samples = wave.float().cpu().numpy()
        frames = samples.size // self.hop
        if rate and rate != self.rate:
            from scipy.signal import resample_poly

            g = gcd(rate, self.rate)
            samples = resample_poly(samples, rate // g, self.rate // g)
        return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes(), frames


class SpeechRequest(BaseModel):
    """Body of ``POST /v1/audio/speech``."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="The served tts model's name")
    input: str = Field(max_length=MAX_INPUT_CHARS, description="Text to speak")
    voice: str | dict[str, Any] = Field(description="Voice name (or {id: name})")
    response_format: str = Field(default="wav", description="wav or pcm (OpenAI's default mp3 is not offered; "
                                 "omitted: wav)")
    speed: float = Field(default=1.0, ge=0.25, le=4.0, description="Speaking speed")
    stream_format: Literal["audio", "sse"] = Field(default="audio", description="audio: the bytes; sse: events")
    instructions: str | None = Field(default=None, description="Not supported (VITS takes no instructions)")


def _need_tts(tts: TTS | None, param: str) -> TTS:
    if tts is None:
        raise APIError(400, "no text-to-speech model is loaded on this server (start it with --tts DIR_OR_HUB_ID)",
                       param=param, code="tts_not_loaded")
    return tts


def add_speech_route(app: FastAPI, tts: TTS | None, parse: Callable[[Request, type[BaseModel]], Awaitable[Any]],
                     metrics: Metrics) -> None:
    """Register ``POST /v1/audio/speech`` on ``app`` (400 on every call when ``tts`` is None)."""

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        body: SpeechRequest = await parse(request, SpeechRequest)
        t = _need_tts(tts, "model")
        if body.model != t.name and body.model.split("/", 1)[-1] != t.name:
            raise APIError(404, f"unknown tts model {body.model!r} (served: {t.name})", code="model_not_found",
                           param="model")
        if body.response_format not in ("wav", "pcm"):
            raise APIError(400, f"response_format {body.response_format!r} is not supported; this server writes "
                                f"wav or pcm", param="response_format")
        if body.instructions:
            raise APIError(400, "instructions are not supported by this server's tts (VITS)", param="instructions")
        speaker = t.speaker(body.voice, "voice")
        sentences = split_sentences(body.input)
        if not sentences:
            raise APIError(400, "input is empty", param="input")
        rate = t.rate if body.response_format == "wav" else PCM_RATE
        tokens = len(t.tokenizer(body.input)["input_ids"])

        async def chunks() -> AsyncIterator[bytes]:
            if body.response_format == "wav":
                yield wav_header(rate)
            for s in sentences:
                pcm, _ = await run_in_threadpool(t.synthesize, s, speaker, body.speed, rate)
                if pcm:
                    yield pcm
            metrics.requests.labels("/v1/audio/speech", t.name, "200").inc()

        async def events() -> AsyncIterator[str]:
            frames = 0
            async for data in chunks():
                yield f"data: {json.dumps({'type': 'speech.audio.delta', 'audio': base64.b64encode(data).decode()})}\n\n"
                frames += len(data) // 2
            usage = {"input_tokens": tokens, "output_tokens": frames // t.hop, "total_tokens": tokens + frames // t.hop}
            yield f"data: {json.dumps({'type': 'speech.audio.done', 'usage': usage})}\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Sample-Rate": str(rate)}
        if body.stream_format == "sse":
            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        return StreamingResponse(chunks(), media_type="audio/wav" if body.response_format == "wav" else "audio/pcm",
                                 headers=headers)


class ChatAudio:
    """The audio half of one chat request: its model, speaker and format."""

    def __init__(self, tts: TTS, speaker: int | None, fmt: str):
        self.tts, self.speaker, self.fmt = tts, speaker, fmt
        self.rate = tts.rate if fmt == "wav" else PCM_RATE

    def render(self, text: str, created: int) -> dict[str, Any]:
        """``message.audio`` of a whole answer (blocking: call it from a worker thread)."""
        pcm = b"".join(self.tts.synthesize(s, self.speaker, 1.0, self.rate)[0] for s in split_sentences(text))
        data = wav_header(self.rate, len(pcm) // 2) + pcm if self.fmt == "wav" else pcm
        return {"id": f"audio_{uuid.uuid4().hex[:24]}", "data": base64.b64encode(data).decode(),
                "expires_at": created + AUDIO_TTL_S, "transcript": text}


def chat_audio(extra: dict[str, Any], tts: TTS | None) -> ChatAudio | None:
    """The audio output a chat request asks for (``modalities``, ``audio``), None for text only; 400 when
    it cannot be given (no tts model, unknown voice, another format)."""
    modalities = extra.get("modalities")
    if modalities is None:
        return None
    if not isinstance(modalities, list) or not modalities or any(m not in ("text", "audio") for m in modalities):
        raise APIError(400, f"modalities {modalities!r}: a list of 'text' and 'audio'", param="modalities")
    if "audio" not in modalities:
        return None
    if "text" not in modalities:
        raise APIError(400, "modalities: audio is spoken from the text, ask for [\"text\", \"audio\"]",
                       param="modalities")
    t = _need_tts(tts, "modalities")
    audio = extra.get("audio")
    if not isinstance(audio, dict) or "voice" not in audio or "format" not in audio:
        raise APIError(400, "audio output needs audio: {voice, format}", param="audio")
    if audio["format"] not in ("wav", "pcm16"):
        raise APIError(400, f"audio.format {audio['format']!r} is not supported; this server writes wav or pcm16",
                       param="audio.format")
    return ChatAudio(t, t.speaker(audio["voice"], "audio.voice"), audio["format"])


class AudioStreamer:
    """Speaks a streamed chat answer sentence by sentence while its text streams on.

    ``feed`` takes each text delta, ``finish`` a choice's ``("done", ...)`` engine event. One task
    synthesises the sentences in order (in a worker thread) and puts ``("audio", idx, delta)`` on the
    request's event queue as each is ready, then re-emits the done event as ``("spoken", ...)`` after
    the choice's last audio; a failure becomes an ``("error", message)`` event.
    """

    def __init__(self, spec: ChatAudio, choices: int, events: asyncio.Queue | None, created: int):
        assert events is not None  # set on every request before it is submitted
        self.spec, self.events, self.created = spec, events, created
        self.splitters = [SentenceSplitter() for _ in range(choices)]
        self.ids = [f"audio_{uuid.uuid4().hex[:24]}" for _ in range(choices)]
        self.started = [False] * choices
        self.jobs: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._work())

    def feed(self, idx: int, text: str) -> None:
        """A text delta of choice ``idx``."""
        for s in self.splitters[idx].feed(text):
            self.jobs.put_nowait((idx, s))

    def finish(self, event: tuple) -> None:
        """Choice ``event[1]`` is done: speak its rest, then pass the event on as ``spoken``."""
        idx = event[1]
        for s in self.splitters[idx].flush():
            self.jobs.put_nowait((idx, s))
        self.jobs.put_nowait((idx, ("spoken", *event[1:])))

    async def _work(self) -> None:
        spec = self.spec
        try:
            while True:
                idx, item = await self.jobs.get()
                if isinstance(item, tuple):
                    self.events.put_nowait(item)
                    continue
                pcm, _ = await run_in_threadpool(spec.tts.synthesize, item, spec.speaker, 1.0, spec.rate)
                delta: dict[str, Any] = {"id": self.ids[idx], "transcript": item}
                if not self.started[idx]:
                    self.started[idx] = True
                    delta["expires_at"] = self.created + AUDIO_TTL_S
                    if spec.fmt == "wav":
                        pcm = wav_header(spec.rate) + pcm
                delta["data"] = base64.b64encode(pcm).decode()
                self.events.put_nowait(("audio", idx, delta))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream ends with an error event instead of hanging
            self.events.put_nowait(("error", f"speech synthesis failed: {type(exc).__name__}: {exc}"))

    def close(self) -> None:
        """Stop synthesising (the client left or the answer is complete)."""
        self.task.cancel()


def load_tts(tts: dict[str, str] | None, voices: dict[str, int | None] | None,
             device: str | None) -> TTS | None:
    """The server's tts model from ``{served name: dir or hub id}`` (at most one), or None."""
    if not tts:
        if voices:
            raise InputError("tts voices given without a tts model")
        return None
    if len(tts) > 1:
        raise InputError(f"tts: one text-to-speech model per server, got {sorted(tts)}")
    (name, path), = tts.items()
    if Path(path).exists():
        from nexus_core.models.io import check_model_dir

        kind = json.loads((check_model_dir(path, "tts") / "config.json").read_text()).get("model_type")
        if kind != "vits":
            raise InputError(f"tts {path}: a {kind!r} model; the tts model must be a VITS (model_type vits)")
    return TTS(name, path, voices, device)
