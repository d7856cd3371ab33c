"""Image generation over nexus serve (``POST /v1/images/generations``) through the official ``openai``
client. The image model is a real image_gen projector artifact made by the steps of the tiny recipe
(tiny Klein pipeline, prepare + precompute of 4 generated images, tiny Llama, 2 projector steps) through
the spine, so its ``projector_config.json`` names its LLM and pipeline by store URI and digest, as the
flow's output does. A pipeline held back by the test shows that renders take turns, /health is answered
meanwhile, and both requests complete."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import threading
import time

import httpx
import openai
import pytest

from nexus_core.errors import InputError, NexusError
from nexus_core.serve import serve_in_thread
from nexus_core.serve.app import create_app
from tests.serve.helpers import one_torch_thread, wait_for  # noqa: F401 - autouse fixture

REPO_CFG = "configs/image_gen/tiny.yaml"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, repo) -> dict[str, str]:
    """The tiny image_gen recipe's pipeline, LLM and trained projector, as store artifacts (~12 s)."""
    from flows.image_gen import ImageGenConfig
    from nexus_core.artifacts import raw_ref
    from nexus_core.config import load_config
    from nexus_core.flux.precompute import run_precompute
    from nexus_core.flux.prepare import run_prepare
    from nexus_core.flux.projector_train import run_projector_train
    from nexus_core.flux.synthetic import make_shape_images
    from nexus_core.flux.tiny_pipeline import TinyPipelineConfig, run_tiny_pipeline
    from nexus_core.runner import run_step
    from nexus_core.train.base_model import BaseModelConfig, run_base_model

    images = make_shape_images(tmp_path_factory.mktemp("igserve") / "imgs", 4, size=40)
    cfg = load_config(repo / REPO_CFG, ImageGenConfig,
                      [f"data.source={images}", "projector.max_steps=2", "projector.validation_prompts=[]"])
    pipe = run_step(run_tiny_pipeline, TinyPipelineConfig(tiny=cfg.pipeline.tiny), name="igserve_pipeline").ref
    prep = run_step(run_prepare, cfg.prepare, name="igserve_images",
                    inputs={"source": raw_ref(images), "pipeline": pipe}).ref
    pre = run_step(run_precompute, cfg.precompute, name="igserve_latents",
                   inputs={"prepared": prep, "pipeline": pipe}).ref
    llm = run_step(run_base_model, BaseModelConfig(source="tiny", tiny=cfg.llm.tiny, text_column="caption"),
                   name="igserve_llm", inputs={"corpus": pre}).ref
    proj = run_step(run_projector_train, cfg.projector, name="igserve_projector",
                    inputs={"precomputed": pre, "llm": llm, "pipeline": pipe}).ref
    assert proj is not None and llm is not None
    return {"projector": proj.uri, "projector_dir": str(proj.path), "llm": str(llm.path)}


@pytest.fixture(scope="module")
def app(artifacts):
    # the projector by store URI (what `nexus serve --image-model processed/models/..._v1` passes on)
    app = create_app({"tiny": artifacts["llm"]}, image_models={"painter": artifacts["projector"]})
    yield app
    app.state.close()


@pytest.fixture(scope="module")
def server(app):
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key="none", max_retries=0, timeout=60)


def _draw(client: openai.OpenAI, seed: int, **kw) -> list[bytes]:
    kw = {"model": "painter", "prompt": "a purple triangle", "size": "32x32", "response_format": "b64_json", **kw}
    res = client.images.generate(**kw, extra_body={"seed": seed, "num_inference_steps": 3})
    assert res.created > 0 and res.data
    return [base64.b64decode(d.b64_json or "") for d in res.data]


def _png(data: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    assert im.format == "PNG"
    return im


def test_pngs_at_the_asked_size_and_the_same_seed_gives_the_same_bytes(client):
    first = _draw(client, 1, n=2, size="48x32")
    assert len(first) == 2 and first[0] != first[1]  # two images of one prompt differ
    for data in first:
        im = _png(data)
        assert im.size == (48, 32)  # OpenAI's size is WIDTHxHEIGHT
        assert len(set(im.convert("RGB").getdata())) > 1  # a drawing, not a blank
    assert _draw(client, 1, n=2, size="48x32") == first
    assert _draw(client, 2, n=2, size="48x32") != first
    assert _draw(client, 1, n=1, size="48x32", prompt="a blue circle") != first[:1]  # the prompt matters
    assert client.models.list().data[-1].id == "painter"


def test_renders_take_turns_off_the_event_loop_and_health_answers_meanwhile(app, server, client):
    model = app.state.image_models["painter"]
    real, gate = model.pipe, threading.Event()
    calls, active, most = [], [0], [0]

    class Held:  # the real pipeline; the first call held until the test says
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, **kw):
            calls.append(kw["height"])
            active[0] += 1
            most[0] = max(most[0], active[0])
            try:
                if len(calls) == 1:
                    assert gate.wait(30)
                return real(**kw)
            finally:
                active[0] -= 1

    results: dict[int, list[bytes]] = {}
    errors: list[BaseException] = []

    def ask(seed: int) -> None:
        try:
            results[seed] = _draw(client, seed, size="32x32" if seed == 1 else "32x48")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    model.pipe = Held()
    try:
        threads = [threading.Thread(target=ask, args=(s,)) for s in (1, 2)]
        threads[0].start()
        wait_for(lambda: len(calls) == 1)
        threads[1].start()
        t0 = time.perf_counter()
        r = httpx.get(server.removesuffix("/v1") + "/health", timeout=5)
        assert r.status_code == 200 and time.perf_counter() - t0 < 2  # the event loop is free while it renders
        time.sleep(0.3)
        assert len(calls) == 1  # the second render waits for the first (one at a time per model)
        gate.set()
        for t in threads:
            t.join(60)
    finally:
        gate.set()
        model.pipe = real
    assert not errors and most[0] == 1 and sorted(calls) == [32, 48]
    assert _png(results[1][0]).size == (32, 32) and _png(results[2][0]).size == (32, 48)


def test_a_render_past_its_deadline_stops_and_frees_the_model(app):
    from nexus_core.serve.images import _Timeout

    model = app.state.image_models["painter"]
    kw = {"seed": 0, "steps": 3, "guidance_scale": 1.0, "negative_prompt": ""}
    with pytest.raises(_Timeout):
        model.generate("a red square", 1, 32, 32, deadline=time.monotonic() + 1e-4, **kw)
    assert not model.lock.locked()
    assert len(model.generate("a red square", 1, 32, 32, deadline=time.monotonic() + 60, **kw)) == 1


@pytest.mark.parametrize("body,match,param", [
    ({"model": "nobody", "prompt": "x"}, "unknown image model 'nobody'", "model"),
    ({"model": "painter", "prompt": "x", "size": "30x32"}, r"size '30x32' is not supported .* multiples of 4", "size"),
    ({"model": "painter", "prompt": "x", "size": "1024x1024"}, "from 4 to 512", "size"),
    ({"model": "painter", "prompt": "x", "size": "big"}, "size 'big'", "size"),
    ({"model": "painter", "prompt": "x", "n": 11}, "n 11 is too large", "n"),
    ({"model": "painter", "prompt": "x", "response_format": "url"}, "nothing is stored", "response_format"),
    ({"model": "painter", "prompt": "x", "output_format": "jpeg"}, "'jpeg' is not supported", "output_format"),
    ({"model": "painter", "prompt": "x", "sampler": "euler"}, r"unknown field\(s\) \['sampler'\]", "sampler"),
    ({"model": "painter", "prompt": "  "}, "prompt is empty", "prompt"),
])
def test_bad_image_requests_get_a_400_naming_the_parameter(server, body, match, param):
    r = httpx.post(f"{server}/images/generations", json=body, timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert re.search(match, err["message"]) and err["param"] == param


def test_without_an_image_model_it_is_refused_and_bad_artifacts_fail_at_load(artifacts, tmp_path):
    from nexus_core.serve.images import load_image_models

    app = create_app({"tiny": artifacts["llm"]})
    try:
        with serve_in_thread(app) as url:
            c = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
            with pytest.raises(openai.BadRequestError, match="no image model is loaded"):
                c.images.generate(model="painter", prompt="x", response_format="b64_json")
    finally:
        app.state.close()
    with pytest.raises(InputError, match="not a projector artifact"):
        load_image_models({"p": artifacts["llm"]}, "cpu")
    moved = tmp_path / "projector"
    shutil.copytree(artifacts["projector_dir"], moved)
    (moved / "manifest.json").unlink()  # a plain directory now: its own files are read
    spec = json.loads((moved / "projector_config.json").read_text())
    spec["llm"]["digest"] = "0" * 64
    (moved / "projector_config.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match="not 0{64} the projector .* was trained with"):
        load_image_models({"p": str(moved)}, "cpu")


def test_cli_passes_image_models_and_vllm_refuses_them(monkeypatch):
    from flows.cli import build_parser
    from nexus_core.serve import launch
    from nexus_core.serve.launch import ServeConfig, serve_models

    seen: list[ServeConfig] = []
    monkeypatch.setattr(launch, "serve_models", seen.append)
    args = build_parser().parse_args(["serve", "tiny=/nowhere", "--image-model", "ig_projector@v2",
                                      "--image-model", "art=/x/y", "--image-model", "processed/models/p_v1"])
    assert args.func(args) == 0
    assert seen[0].image_models == {"ig_projector": "ig_projector@v2", "art": "/x/y", "p_v1": "processed/models/p_v1"}
    with pytest.raises(NexusError, match="image_models: images are rendered by the embedded engine only"):
        serve_models(ServeConfig(models={"a": "/nowhere"}, engine="vllm", image_models={"p": "/nowhere"}))
