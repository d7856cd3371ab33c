"""Image generation: an LLM's hidden states → projector → Flux.2 Klein conditioning. Unit tests of the
projector's shapes, layout and files, and one end-to-end run of the tiny recipe through the real flow."""

import json
from pathlib import Path

import pytest
import torch

from nexus_core.artifacts import ArtifactRef
from nexus_core.context import StepContext
from nexus_core.errors import ConfigError, InputError
from nexus_core.flux import projector as pj

REPO = Path(__file__).resolve().parents[2]


def _spec(**kw) -> pj.ProjectorSpec:
    return pj.ProjectorSpec(**{"llm_layers": [1, 2], "llm_hidden_size": 32, "hidden_size": 16,
                               "joint_attention_dim": 48, "max_sequence_length": 12, "chat_template": True, **kw})


def test_llm_features_and_projection_have_the_prompt_embeds_shape(tiny_llm):
    from nexus_core.models.io import load_causal_lm

    llm, tok = load_causal_lm(tiny_llm)
    spec = _spec()
    feats = pj.llm_features(llm, tok, ["a red square", "word " * 40], spec)  # the long prompt is truncated
    assert feats.shape == (2, 12, 2 * 32)
    torch.manual_seed(0)
    emb = pj.project(llm, tok, pj.build_projector(spec), spec, ["a red square"])
    assert emb.shape == (1, 12, 48) and emb.requires_grad  # the projector trains, the LLM does not
    assert not any(p.requires_grad and p.grad is not None for p in llm.parameters())
    assert tok.padding_side == "right"  # restored (the tiny tokenizer's own side)


def test_projected_embeddings_get_the_pipelines_text_ids():
    """Token l of the projected sequence sits at (t, h, w, l) = (0, 0, 0, l), as Klein's text encoder output does."""
    from diffusers import Flux2KleinPipeline

    ids = Flux2KleinPipeline._prepare_text_ids(torch.zeros(2, 12, 48))
    assert ids.shape == (2, 12, 4)
    assert torch.equal(ids[0], torch.stack([torch.zeros(12), torch.zeros(12), torch.zeros(12), torch.arange(12)], 1)
                       .long())


def test_projector_files_round_trip_and_a_non_projector_dir_is_refused(tmp_path):
    spec = _spec(llm={"uri": "models/x_v1", "digest": "d1"})
    proj = pj.build_projector(spec)
    pj.save_projector(tmp_path, proj, spec)
    loaded, spec2 = pj.load_projector(tmp_path)
    x = torch.randn(1, 12, spec.in_dim)
    assert spec2 == spec and torch.allclose(loaded(x), proj(x))
    with pytest.raises(InputError, match="not a projector artifact"):
        pj.load_projector(tmp_path / "nothing")


def test_layers_out_of_range_are_named(tiny_llm):
    from nexus_core.models.io import load_causal_lm

    llm, _ = load_causal_lm(tiny_llm)
    pj.check_layers(llm, [0, -1, 2], "projector.llm_layers")  # 2 layers: 3 hidden states
    with pytest.raises(ConfigError, match=r"projector.llm_layers: \[3\] out of range"):
        pj.check_layers(llm, [3], "projector.llm_layers")


def test_render_refuses_an_llm_the_projector_was_not_trained_with(tmp_path):
    from nexus_core.flux.projector_render import RenderConfig, run_projector_render

    pj.save_projector(tmp_path, pj.build_projector(_spec(llm={"uri": "a", "digest": "trained"})),
                      _spec(llm={"uri": "a", "digest": "trained"}))
    other = ArtifactRef(uri=str(tmp_path), kind="model", name="other", version=1, digest="other")
    with pytest.raises(InputError, match="not the LLM the projector"):
        run_projector_render(RenderConfig(prompts=["x"]), inputs={"projector": ArtifactRef(
            uri=str(tmp_path), kind="model", name="p", version=1, digest="p"), "llm": other},
            out_uri=str(tmp_path / "out"), ctx=StepContext.detached())


def test_config_needs_exactly_one_llm():
    from pydantic import ValidationError

    from flows.image_gen import ImageGenConfig

    base = {"pipeline": {"tiny": {}}, "data": {"source": "x"}, "render": {"prompts": ["p"]}}
    with pytest.raises(ValidationError, match="set exactly one of llm.model and llm.tiny"):
        ImageGenConfig.model_validate(base)
    with pytest.raises(ValidationError, match="set exactly one"):
        ImageGenConfig.model_validate({**base, "llm": {"model": "m", "tiny": {}}})
    assert ImageGenConfig.model_validate({**base, "llm": {"tiny": {}}}).llm.tiny is not None


@pytest.mark.integration
def test_tiny_recipe_renders_pngs_for_prompts_it_was_not_trained_on(prefect_harness, tmp_path):
    """configs/image_gen/tiny.yaml through the real flow: tiny pipeline + tiny LLM, generated images
    precomputed by the flux steps, projector trained (finite loss, weights moved), two new prompts drawn."""
    from PIL import Image

    from flows.image_gen import ImageGenConfig, image_gen
    from nexus_core.artifacts import read_manifest
    from nexus_core.config import load_config
    from nexus_core.flux.mds import open_dataset
    from nexus_core.flux.synthetic import make_shape_images

    images = make_shape_images(tmp_path / "imgs", 4, size=40)
    cfg = load_config(REPO / "configs/image_gen/tiny.yaml", ImageGenConfig,
                      [f"data.source={images}", "name=ig_e2e", "projector.max_steps=3"])
    result = image_gen(cfg)

    assert list(result.artifacts) == ["pipeline", "prepare", "precompute", "llm", "projector", "render"]
    train = read_manifest(result.artifacts["projector"].uri)
    assert train.inputs["llm"].digest == result.artifacts["llm"].digest
    assert train.inputs["precomputed"].digest == result.artifacts["precompute"].digest
    r = train.result
    assert r["global_step"] == 3 and torch.isfinite(torch.tensor(r["final_loss"])) and r["weight_change"] > 0
    root = result.artifacts["projector"].path
    spec = json.loads((root / pj.CONFIG).read_text())
    assert spec["llm"]["digest"] == result.artifacts["llm"].digest and spec["joint_attention_dim"] == 48
    row = open_dataset(result.artifacts["precompute"].path / "mds", tmp_path / "cache")[0]
    assert row["text_embeds"].shape == (spec["max_sequence_length"], spec["joint_attention_dim"])
    assert (row["text_ids"][:, 3] == range(spec["max_sequence_length"])).all()  # what the projected embeds get
    assert (root / "validation" / "step_000003_0.png").is_file()

    # a killed run (checkpoint at step 1 left in its work dir) re-run with more steps continues from it
    from nexus_core.flux.projector_train import run_projector_train

    inputs = {k: result.artifacts[k] for k in ("precompute", "llm", "pipeline")}
    inputs["precomputed"] = inputs.pop("precompute")
    short = cfg.projector.model_copy(update={"max_steps": 2, "checkpointing_steps": 1, "validation_prompts": []})
    ctx = StepContext.detached(work_dir=tmp_path / "work")
    assert run_projector_train(short, inputs=inputs, out_uri=str(tmp_path / "a"), ctx=ctx).start_step == 0
    resumed = run_projector_train(short.model_copy(update={"max_steps": 3}), inputs=inputs,
                                  out_uri=str(tmp_path / "b"), ctx=ctx)
    assert (resumed.start_step, resumed.global_step) == (1, 3)

    captions = set((root / pj.CAPTIONS).read_text().splitlines())
    assert captions == {(images / f"{i:04d}.txt").read_text() for i in range(4)}
    out = result.artifacts["render"].path
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in rows] == cfg.render.prompts and not captions & set(cfg.render.prompts)
    assert result.unseen_prompts == 2 and not any(x["in_training"] for x in rows)
    for x in rows:
        with Image.open(out / x["file"]) as im:
            assert im.format == "PNG" and im.size == (32, 32)
            assert len(set(im.convert("RGB").getdata())) > 1  # a drawing, not a blank
