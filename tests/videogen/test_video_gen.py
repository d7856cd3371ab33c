"""Video generation: an LLM's pooled hidden states → projector → Stable Video Diffusion conditioning.
Unit tests on a tiny SVD built from config (EDM against the scheduler, shapes, refusals, bad rows), and
one end-to-end run of the tiny recipe through the real flow."""

import json
from pathlib import Path

import pytest
import torch

from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.context import StepContext
from nexus_core.errors import ConfigError, InputError
from nexus_core.videogen import projector as pj
from nexus_core.videogen import svd
from nexus_core.videogen.precompute import VideoPrecomputeConfig, run_video_precompute

REPO = Path(__file__).resolve().parents[2]
GIFS = REPO / "data/raw/omni/videos"


def _ref(path: Path, digest: str, kind: str = "model") -> ArtifactRef:
    return ArtifactRef(uri=str(path), kind=kind, name=path.name, version=1, digest=digest)


@pytest.fixture(scope="module")
def tiny_svd(tmp_path_factory) -> Path:
    return svd.build_tiny_svd(tmp_path_factory.mktemp("svd") / "pipe", svd.TinySVDConfig())


def _spec(**kw) -> pj.VideoProjectorSpec:
    return pj.VideoProjectorSpec(**{
        "llm_layers": [1, 2], "llm_hidden_size": 32, "hidden_size": 16, "cross_attention_dim": 24,
        "latent_shape": [4, 8, 8], "first_frame": "predicted", "max_sequence_length": 12, "chat_template": True,
        "video": {"num_frames": 8, "height": 32, "width": 32, "fps": 10, "motion_bucket_id": 127,
                  "noise_aug_strength": 0.02}, **kw})


def test_edm_training_coefficients_are_the_schedulers(tiny_svd):
    """c_in, c_noise and the denoised sample (c_skip, c_out) equal what SVD's Euler scheduler does at sampling."""
    sch = svd.load_svd(str(tiny_svd), image_encoder=False).scheduler
    sch.set_timesteps(6)
    for i in range(6):
        sigma, t = sch.sigmas[i], sch.timesteps[i]
        c_skip, c_out, c_in, c_noise = svd.edm_coefficients(sigma)
        x, f = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 2, 4, 8, 8)
        sch._step_index = i
        assert torch.allclose(sch.scale_model_input(x, t), c_in * x)
        assert torch.allclose(c_noise, t)
        sch._step_index = i
        assert torch.allclose(sch.step(f, t, x).pred_original_sample, c_skip * x + c_out * f, atol=1e-5)


def test_projector_output_fits_the_unet_and_drives_it(tiny_svd, tiny_llm):
    from diffusers import UNetSpatioTemporalConditionModel

    from nexus_core.models.io import load_causal_lm

    unet = UNetSpatioTemporalConditionModel.from_pretrained(tiny_svd, subfolder="unet").requires_grad_(False)
    llm, tok = load_causal_lm(tiny_llm)
    spec = _spec(cross_attention_dim=unet.config["cross_attention_dim"])
    torch.manual_seed(0)
    proj = pj.build_projector(spec)
    embeds, frame = pj.project(llm, tok, proj, spec, ["a red square", "word " * 40])  # the long one is truncated
    assert embeds.shape == (2, 1, unet.config["cross_attention_dim"]) and frame.shape == (2, 4, 8, 8)
    assert embeds.requires_grad and not any(p.grad is not None for p in llm.parameters())
    # padding does not change a prompt's pooled features
    alone = pj.pooled_features(llm, tok, ["a red square"], spec)
    assert torch.allclose(pj.pooled_features(llm, tok, ["a red square", "a much longer prompt here"], spec)[0],
                          alone[0], atol=1e-4)
    x0 = torch.randn(2, 3, 4, 8, 8)
    loss = svd.edm_loss(unet, x0, frame, embeds, svd.time_ids(7, 127, 0.02, 2), torch.tensor([0.5, 3.0]),
                        torch.randn_like(x0))
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert all(p.grad is not None for p in proj.parameters()) and not any(p.grad is not None for p in unet.parameters())
    zeros = pj.build_projector(_spec(first_frame="zeros"))
    assert set(zeros.keys()) == {"embed"}
    assert not pj.project(llm, tok, zeros, _spec(first_frame="zeros"), ["x"])[1].any()


def test_precompute_names_the_bad_row(tiny_svd, tmp_path):
    cfg = VideoPrecomputeConfig(num_frames=8, height=32, width=32, device="cpu")
    pipe = _ref(tiny_svd, "svd")

    def run(lines: list[str]):  # noqa: ANN202
        src = tmp_path / "captions.jsonl"
        src.write_text("".join(line + "\n" for line in lines))
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        return run_video_precompute(cfg, inputs={"source": raw_ref(src), "pipeline": pipe}, out_uri=str(out),
                                    ctx=StepContext.detached())

    good = json.dumps({"video": str(GIFS / "red_left.gif"), "caption": "a red square moving left"})
    with pytest.raises(InputError, match=r"captions.jsonl:2: missing or empty 'caption'"):
        run([good, json.dumps({"video": str(GIFS / "red_left.gif")})])
    with pytest.raises(InputError, match=r"captions.jsonl:1: video .*nope.gif not found"):
        run([json.dumps({"video": "nope.gif", "caption": "x"})])
    with pytest.raises(InputError, match=r"captions.jsonl:2: not JSON"):
        run([good, "{oops"])
    from PIL import Image

    Image.new("RGB", (32, 32), "white").save(tmp_path / "still.gif")
    with pytest.raises(InputError, match=r"captions.jsonl:1: video .*still.gif has 1 frame\(s\), fewer than "
                                         r"num_frames=8"):
        run([json.dumps({"video": "still.gif", "caption": "x"})])
    (tmp_path / "broken.gif").write_bytes(b"GIF89a not really")
    with pytest.raises(InputError, match=r"captions.jsonl:1: video .*broken.gif is not readable"):
        run([json.dumps({"video": "broken.gif", "caption": "x"})])
    r = run([good])
    assert r.latent_shape == [4, 8, 8] and r.embed_dim == 24


def test_wrong_llm_or_pipeline_pairing_is_refused(tiny_svd, tmp_path):
    from nexus_core.videogen.render import VideoRenderConfig, run_video_render
    from nexus_core.videogen.train import VideoProjectorTrainConfig, run_video_projector_train

    spec = _spec(llm={"uri": "a", "digest": "trained"})
    pj.save_projector(tmp_path, pj.build_projector(spec), spec)
    proj, cfg = _ref(tmp_path, "p"), VideoRenderConfig(prompts=["x"], device="cpu")
    with pytest.raises(InputError, match=r"not the LLM the projector .*projector_config.json was trained with"):
        run_video_render(cfg, inputs={"projector": proj, "llm": _ref(tmp_path, "other"), "pipeline": _ref(tiny_svd, "s")},
                         out_uri=str(tmp_path / "o1"), ctx=StepContext.detached())
    other = svd.build_tiny_svd(tmp_path / "wide", svd.TinySVDConfig(cross_attention_dim=40))
    with pytest.raises(ConfigError, match=r"projector_config.json writes 24-wide embeddings .* reads 40"):
        run_video_render(cfg, inputs={"projector": proj, "llm": _ref(tmp_path, "trained"), "pipeline": _ref(other, "w")},
                         out_uri=str(tmp_path / "o2"), ctx=StepContext.detached())
    with pytest.raises(InputError, match=r"model_index.json: _class_name is 'Flux2KleinPipeline'"):
        (tmp_path / "flux").mkdir()
        (tmp_path / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
        svd.load_svd(str(tmp_path / "flux"))
    # latents precomputed with one pipeline, a UNet of another: named before training
    pre = tmp_path / "pre"
    run_video_precompute(VideoPrecomputeConfig(num_frames=8, height=32, width=32, device="cpu"),
                         inputs={"source": raw_ref(REPO / "data/raw/video_gen/tiny.jsonl"),
                                 "pipeline": _ref(tiny_svd, "s")}, out_uri=str(pre), ctx=StepContext.detached())
    with pytest.raises(InputError, match=r"video_meta.json: embeddings 24 wide .* reads 40"):
        run_video_projector_train(VideoProjectorTrainConfig(device="cpu"), inputs={
            "precomputed": _ref(pre, "pre", "dataset"), "llm": _ref(tmp_path, "l"), "pipeline": _ref(other, "w")},
            out_uri=str(tmp_path / "o3"), ctx=StepContext.detached())


@pytest.mark.integration
@pytest.mark.slow
def test_tiny_recipe_films_gifs_for_prompts_it_was_not_trained_on(prefect_harness, tmp_path):
    """configs/video_gen/tiny.yaml through the real flow: tiny SVD + tiny LLM, the shipped GIFs precomputed,
    projector trained (finite loss, weights moved), two new prompts filmed to GIF + PNG frames."""
    from PIL import Image

    from flows.video_gen import VideoGenConfig, video_gen
    from nexus_core.artifacts import read_manifest
    from nexus_core.config import load_config

    cfg = load_config(REPO / "configs/video_gen/tiny.yaml", VideoGenConfig, ["name=vg_e2e", "projector.max_steps=2"])
    result = video_gen(cfg)

    assert list(result.artifacts) == ["pipeline", "precompute", "llm", "projector", "render"]
    train = read_manifest(result.artifacts["projector"].uri)
    assert train.inputs["llm"].digest == result.artifacts["llm"].digest
    assert train.inputs["precomputed"].digest == result.artifacts["precompute"].digest
    r = train.result
    assert r["global_step"] == 2 and torch.isfinite(torch.tensor(r["final_loss"])) and r["weight_change"] > 0
    spec = json.loads((result.artifacts["projector"].path / pj.CONFIG).read_text())
    assert spec["llm"]["digest"] == result.artifacts["llm"].digest and spec["cross_attention_dim"] == 24
    captions = set((result.artifacts["projector"].path / pj.CAPTIONS).read_text().splitlines())
    assert captions == {"a red square moving left", "a red square moving right", "a blue square moving left",
                        "a blue square moving right"}

    out = result.artifacts["render"].path
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in rows] == cfg.render.prompts and not captions & set(cfg.render.prompts)
    assert result.unseen_prompts == 2 and result.rendered == 2 and not any(x["in_training"] for x in rows)
    for x in rows:
        with Image.open(out / x["file"]) as im:
            assert im.format == "GIF" and im.n_frames == 8 and im.size == (32, 32)
            assert im.info["duration"] == 100  # fps 10
        pngs = sorted((out / x["frames_dir"]).glob("*.png"))
        assert len(pngs) == 8
        with Image.open(pngs[0]) as im:
            assert len(set(im.convert("RGB").getdata())) > 1  # a drawing, not a blank


def test_training_learns_and_a_killed_run_resumes_from_its_checkpoint(tiny_svd, tiny_llm, tmp_path):
    """The heads move under the EDM loss; a run that left a checkpoint at step 1 continues from it."""
    from nexus_core.videogen.train import VideoProjectorTrainConfig, run_video_projector_train

    pre = tmp_path / "pre"
    run_video_precompute(VideoPrecomputeConfig(num_frames=8, height=32, width=32, device="cpu"),
                         inputs={"source": raw_ref(REPO / "data/raw/video_gen/tiny.jsonl"),
                                 "pipeline": _ref(tiny_svd, "s")}, out_uri=str(pre), ctx=StepContext.detached())
    inputs = {"precomputed": _ref(pre, "pre", "dataset"), "llm": _ref(tiny_llm, "l"), "pipeline": _ref(tiny_svd, "s")}
    cfg = VideoProjectorTrainConfig(llm_layers=[1, 2], hidden_size=16, max_steps=2, checkpointing_steps=1,
                                    learning_rate=1e-2, device="cpu")
    ctx = StepContext.detached(work_dir=tmp_path / "work")
    first = run_video_projector_train(cfg, inputs=inputs, out_uri=str(tmp_path / "a"), ctx=ctx)
    assert (first.start_step, first.global_step) == (0, 2) and first.weight_change > 0
    assert torch.isfinite(torch.tensor([first.final_loss, first.final_edm_loss])).all()
    resumed = run_video_projector_train(cfg.model_copy(update={"max_steps": 3}), inputs=inputs,
                                        out_uri=str(tmp_path / "b"), ctx=ctx)
    assert (resumed.start_step, resumed.global_step) == (1, 3)
    loaded, spec = pj.load_projector(tmp_path / "b")
    assert set(loaded.keys()) == {"embed", "frame"} and spec.latent_shape == [4, 8, 8]
