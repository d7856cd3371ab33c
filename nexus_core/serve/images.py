"""Image generation over the OpenAI-compatible server: ``POST /v1/images/generations``.

The server loads trained LLM → Flux.2 Klein projectors (``create_app(image_models={name: artifact})``,
``nexus serve --image-model [NAME=]ARTIFACT``): an image_gen train step's output (a directory, an artifact
spec ``NAME@vN`` or a store URI). Its ``projector_config.json`` names the LLM and the Klein pipeline it was
trained with; both are loaded from there (the LLM's digest must still match, as the render step requires),
the pipeline without its own text encoder (:func:`nexus_core.flux.projector.load_render_pipeline`).

A request follows OpenAI's images API: ``{model, prompt, n, size, response_format}`` with
``response_format: b64_json`` only (``url`` is refused: nothing is stored) and ``size`` ``WxH`` (or
``auto``: the pipeline's default) with both sides multiples of the pipeline's VAE x patch factor, at
most twice its default side. Extra fields: ``seed`` (same seed, same prompt, same settings: the same
PNG bytes; omitted: a random one), ``num_inference_steps``, ``guidance_scale`` and ``negative_prompt``
(defaults: the render step's). The answer is ``{created, data: [{b64_json}], size, output_format: png}``.

Rendering runs in a worker thread, never on the event loop, one render at a time per model (others
wait their turn); a render still waiting or sampling when the request timeout passes stops at its next
sampler step and the request gets 504.
"""

from __future__ import annotations

import base64
import io
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from nexus_core.errors import InputError
from nexus_core.serve.app import APIError, Metrics

MAX_N = 10  # OpenAI's limit on images per request
MAX_PROMPT_CHARS = 32000
ENDPOINT = "/v1/images/generations"


class _Timeout(Exception):
    pass


class ImageModel:
    """A projector with the LLM and Klein pipeline it was trained with, rendering one request at a time."""

    def __init__(self, name: str, where: str, device: str | None = None, dtype: str = "float32"):
        import torch

        from nexus_core.flux import projector as pj
        from nexus_core.io import resolve_ref
        from nexus_core.models.io import load_causal_lm, resolve_model

        role = f"image model {name}"
        root = resolve_ref(where, role).path
        self.name = name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        projector, self.spec = pj.load_projector(root)
        llm_uri, llm_digest = self.spec.llm.get("uri"), self.spec.llm.get("digest")
        if not llm_uri:
            raise InputError(f"{role}: {root / pj.CONFIG} names no LLM (llm.uri)")
        llm = resolve_model(str(llm_uri), f"{role} llm")
        if llm_digest and llm.digest != llm_digest:
            raise InputError(f"{role}: the LLM {llm_uri} now has digest {llm.digest}, not {llm_digest} the "
                             f"projector {root} was trained with")
        pipe_uri, pipe_digest = self.spec.pipeline.get("uri"), self.spec.pipeline.get("digest")
        if not pipe_uri:
            raise InputError(f"{role}: {root / pj.CONFIG} names no pipeline (pipeline.uri)")
        pipe_path = str(pipe_uri)
        if pipe_digest:  # an artifact (the tiny pipeline step's output): found in the store, checked
            ref = resolve_ref(pipe_path, f"{role} pipeline")
            if ref.digest != pipe_digest:
                raise InputError(f"{role}: the pipeline {pipe_uri} now has digest {ref.digest}, not {pipe_digest} "
                                 f"the projector {root} was trained with")
            pipe_path = str(ref.path)
        self.pipe = pj.load_render_pipeline(pipe_path, dtype).to(self.device)
        if self.pipe.transformer.config.joint_attention_dim != self.spec.joint_attention_dim:
            raise InputError(f"{role}: the projector writes {self.spec.joint_attention_dim}-wide embeddings but the "
                             f"DiT of {pipe_uri} reads {self.pipe.transformer.config.joint_attention_dim}")
        self.llm, self.tokenizer = load_causal_lm(llm.path, dtype=dtype)
        self.llm.to(self.device)
        self.projector = projector.to(self.device)
        self.factor = int(self.pipe.vae_scale_factor) * 2  # VAE downscale x the DiT's 2x2 patches
        self.default_side = int(self.pipe.default_sample_size) * int(self.pipe.vae_scale_factor)
        self.max_side = 2 * self.default_side
        self.created = int(time.time())
        self.lock = threading.Lock()

    def size(self, value: str | None) -> tuple[int, int]:
        """``(width, height)`` of an OpenAI ``size`` (``WxH`` or ``auto``); 400 when the pipeline cannot draw it."""
        if value in (None, "auto"):
            return self.default_side, self.default_side
        w, sep, h = str(value).partition("x")
        ok = sep and w.isdigit() and h.isdigit()
        if ok and all(self.factor <= int(s) <= self.max_side and int(s) % self.factor == 0 for s in (w, h)):
            return int(w), int(h)
        raise APIError(400, f"size {value!r} is not supported by image model {self.name!r}: WxH with both sides "
                            f"multiples of {self.factor} from {self.factor} to {self.max_side} (or auto: "
                            f"{self.default_side}x{self.default_side})", param="size", code="invalid_size")

    def generate(self, prompt: str, n: int, width: int, height: int, *, seed: int, steps: int, guidance_scale: float,
                 negative_prompt: str, deadline: float) -> list[bytes]:
        """PNG bytes of ``n`` images of ``prompt``. Blocking: call it from a worker thread. Raises
        ``_Timeout`` when ``deadline`` (``time.monotonic()``) passes before or while it renders."""
        import torch

        from nexus_core.flux import projector as pj

        if not self.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise _Timeout
        try:
            def stop_when_late(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
                if time.monotonic() > deadline:
                    raise _Timeout
                return {}

            dtype = self.pipe.transformer.dtype
            with torch.no_grad():
                emb = pj.project(self.llm, self.tokenizer, self.projector, self.spec, [prompt]).to(dtype)
                negative = pj.project(self.llm, self.tokenizer, self.projector, self.spec,
                                      [negative_prompt]).to(dtype) if guidance_scale > 1 else None
            images = self.pipe(prompt_embeds=emb, negative_prompt_embeds=negative,  # pyright: ignore[reportArgumentType] - diffusers mistypes it as str
                               height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
                               num_images_per_prompt=n, generator=torch.Generator().manual_seed(seed),
                               callback_on_step_end=stop_when_late).images
        finally:
            self.lock.release()
        out = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append(buf.getvalue())
        return out


class ImageRequest(BaseModel):
    """Body of ``POST /v1/images/generations`` (OpenAI's fields and this server's extras)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(max_length=MAX_PROMPT_CHARS, description="What to draw")
    model: str | None = Field(default=None, description="Served image model (omitted: the only one)")
    n: int | None = Field(default=None, ge=1, description="Images to draw (1 to 10)")
    size: str | None = Field(default=None, description="WxH or auto")
    response_format: str | None = Field(default=None, description="b64_json (url is not offered)")
    output_format: str | None = Field(default=None, description="png only")
    quality: str | None = Field(default=None, description="auto or standard only")
    style: str | None = Field(default=None, description="Not supported (DALL-E 3 only)")
    background: str | None = Field(default=None, description="auto or opaque only")
    stream: bool | None = Field(default=None, description="Not supported")
    user: str | None = Field(default=None, description="Accepted, not used")
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="Sampler seed (omitted: random)")
    num_inference_steps: int | None = Field(default=None, ge=1, le=1000, description="Sampler steps")
    guidance_scale: float | None = Field(default=None, ge=0, le=100, description="Classifier-free guidance (>1 on)")
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS, description="Negative prompt")


def _refuse(body: ImageRequest) -> None:
    allowed = {"response_format": (None, "b64_json"), "output_format": (None, "png"),
               "quality": (None, "auto", "standard"), "style": (None,), "background": (None, "auto", "opaque"),
               "stream": (None, False)}
    for key, ok in allowed.items():
        value = getattr(body, key)
        if value not in ok:
            why = "images are returned as b64_json; nothing is stored" if value == "url" else \
                f"this server accepts {', '.join(repr(x) for x in ok if x is not None) or 'nothing'}"
            raise APIError(400, f"{key} {value!r} is not supported ({why})", param=key)
    extra = sorted(body.model_extra or {})
    if extra:
        raise APIError(400, f"unknown field(s) {extra}", param=extra[0])


def add_image_route(app: FastAPI, models: dict[str, ImageModel],
                    parse: Callable[[Request, type[BaseModel]], Awaitable[Any]], metrics: Metrics,
                    request_timeout_s: float) -> None:
    """Register ``POST /v1/images/generations`` on ``app`` (400 on every call when ``models`` is empty)."""
    from nexus_core.flux.projector_render import RenderConfig

    defaults = RenderConfig.model_fields

    @app.post(ENDPOINT)
    async def generations(request: Request) -> dict[str, Any]:
        start = time.perf_counter()
        body: ImageRequest = await parse(request, ImageRequest)
        if not models:
            raise APIError(400, "no image model is loaded on this server (start it with --image-model ARTIFACT)",
                           param="model", code="image_model_not_loaded")
        name = body.model if body.model is not None else next(iter(models)) if len(models) == 1 else None
        m = models.get(name or "") or models.get((name or "").split("/", 1)[-1])
        if m is None:
            raise APIError(400, f"unknown image model {body.model!r} (served: {', '.join(models)})", param="model",
                           code="model_not_found")
        _refuse(body)
        n = body.n or 1
        if n > MAX_N:
            raise APIError(400, f"n {n} is too large (at most {MAX_N})", param="n")
        if not body.prompt.strip():
            raise APIError(400, "prompt is empty", param="prompt")
        width, height = m.size(body.size)
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        steps = body.num_inference_steps or defaults["num_inference_steps"].default
        guidance = body.guidance_scale if body.guidance_scale is not None else defaults["guidance_scale"].default
        negative = body.negative_prompt if body.negative_prompt is not None else defaults["negative_prompt"].default
        created = int(time.time())
        try:
            pngs = await run_in_threadpool(m.generate, body.prompt, n, width, height, seed=seed, steps=steps,
                                           guidance_scale=guidance, negative_prompt=negative,
                                           deadline=time.monotonic() + request_timeout_s)
        except _Timeout:  # counted by the app's APIError handler
            raise APIError(504, f"image generation took longer than {request_timeout_s:g}s", "timeout_error",
                           code="request_timeout") from None
        metrics.requests.labels(ENDPOINT, m.name, "200").inc()
        metrics.latency.labels(ENDPOINT, m.name).observe(time.perf_counter() - start)
        return {"created": created, "data": [{"b64_json": base64.b64encode(p).decode()} for p in pngs],
                "size": f"{width}x{height}", "output_format": "png"}


def load_image_models(specs: dict[str, str] | None, device: str | None, dtype: str = "float32") -> dict[str, ImageModel]:
    """The server's image models from ``{served name: projector artifact}``; a bad artifact fails here."""
    return {name: ImageModel(name, where, device, dtype) for name, where in (specs or {}).items()}


def describe(models: dict[str, ImageModel]) -> list[dict[str, Any]]:
    """``/v1/models`` entries of the image models."""
    return [{"id": n, "object": "model", "created": m.created, "owned_by": "nexus",
             "sizes": f"multiples of {m.factor} up to {m.max_side}"} for n, m in models.items()]

