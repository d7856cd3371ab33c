"""Chat requests with OpenAI ``image_url`` content parts (data URIs) on a tiny composed (omni) model:
the server's greedy answer and its first token's log-probability are what plain transformers gives for
that image, also when two requests with different images are prefilled in one batch (their
log-probabilities differ, so swapped images would show); text-only models and bad images get a 400."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import httpx
import pytest

from nexus_core.serve import serve_in_thread
from nexus_core.serve.app import create_app
from tests.serve.helpers import one_torch_thread  # noqa: F401 - autouse fixture

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "data" / "raw" / "omni" / "images"
TEXTS = ["a red square", "a blue circle", "what colour is the shape", "describe the image"] * 10


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm
    from nexus_core.train.encoders import TinyVisionConfig, build_tiny_vision
    from nexus_core.train.omni import OmniConfig, compose

    root = tmp_path_factory.mktemp("omni-serve")
    llm = build_tiny_llm(root / "llm", TEXTS, TinyLLMConfig(vocab_size=300, hidden_size=32, intermediate_size=64))
    vision = build_tiny_vision(root / "vision", TinyVisionConfig())
    compose(OmniConfig(vision="tiny"), llm, vision, root / "omni")
    return {"omni": str(root / "omni"), "text": str(llm)}


@pytest.fixture(scope="module")
def server(models: dict[str, str]):
    app = create_app(models, batch_wait_s=0.2)  # long enough for two concurrent requests to prefill together
    with serve_in_thread(app) as url:
        yield url
    app.state.close()


def _uri(name: str) -> str:
    return "data:image/png;base64," + base64.b64encode((IMAGES / name).read_bytes()).decode()


def _chat(model: str, image_url: dict | str, text: str = "What colour is the shape?") -> dict:
    return {"model": model, "max_tokens": 6, "temperature": 0, "logprobs": True, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": image_url}, {"type": "text", "text": text}]}]}


def _reference(path: str, name: str) -> tuple[str, float]:
    """What plain transformers generates for this image (greedy, 6 tokens), and the first token's logprob."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path)
    proc = AutoProcessor.from_pretrained(path)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    enc = proc(text=[proc.apply_chat_template(chat, add_generation_prompt=True)],
               images=[Image.open(IMAGES / name).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
        first = torch.log_softmax(model(**enc).logits[0, -1].float(), -1).max()
    return proc.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True), float(first)


def test_image_requests_answer_as_generate_does_alone_and_batched(server: str, models: dict[str, str]) -> None:
    names = ["red_square.png", "blue_circle.png"]

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return list(await asyncio.gather(*(client.post(f"{server}/chat/completions",
                                                           json=_chat("omni", {"url": _uri(n)})) for n in names)))

    refs = [_reference(models["omni"], n) for n in names]
    assert refs[0][1] != pytest.approx(refs[1][1], abs=1e-6)  # the images make a difference
    for resp, (text, logprob) in zip(asyncio.run(both()), refs, strict=True):
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        assert choice["message"]["content"] == text
        assert choice["logprobs"]["content"][0]["logprob"] == pytest.approx(logprob, abs=1e-4)
        assert resp.json()["usage"]["prompt_tokens"] > 16  # the image's 16 tokens are in the prompt
    metrics = httpx.get(server.removesuffix("/v1") + "/metrics").text  # both rows decoded in one batch
    assert 'nexus_serve_batch_rows_bucket{le="1.0",model="omni"} 0.0' in metrics
    alone = httpx.post(f"{server}/chat/completions", json=_chat("omni", {"url": _uri(names[1])}), timeout=60)
    assert alone.json()["choices"][0]["logprobs"]["content"][0]["logprob"] == pytest.approx(refs[1][1], abs=1e-4)


def test_text_only_requests_still_work_on_an_image_model(server: str) -> None:
    resp = httpx.post(f"{server}/chat/completions", timeout=60, json={
        "model": "omni", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "a red"}]})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(("model", "image_url", "message"), [
    ("text", {"url": _uri("red_square.png")}, "this model takes text only"),
    ("omni", {"url": "https://example.com/cat.png"}, "http(s) image_url parts are off"),
    ("omni", {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}, "the image cannot be decoded"),
])
def test_bad_image_parts_are_a_400_naming_the_part(server: str, model: str, image_url: dict, message: str) -> None:
    resp = httpx.post(f"{server}/chat/completions", json=_chat(model, image_url), timeout=60)
    assert resp.status_code == 400
    assert message in resp.json()["error"]["message"] and "messages[0].content[0]" in resp.json()["error"]["message"]
