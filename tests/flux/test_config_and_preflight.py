"""Every flux YAML validates; bad input fails with one clear message before training; nexus doctor."""

import json
from pathlib import Path

import pytest

from flows.flux import FluxConfig
from nexus_core.artifacts import ArtifactRef
from nexus_core.config import load_config
from nexus_core.doctor import check_config_models, format_report, run_doctor
from nexus_core.errors import ConfigError
from nexus_core.flux.device import cpu_has_native_bf16
from nexus_core.flux.train import TrainConfig, preflight

REPO = Path(__file__).resolve().parents[2]
YAMLS = sorted((REPO / "configs" / "flux").rglob("*.yaml"))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_flux_yaml_validates(path):
    cfg = load_config(path, FluxConfig)
    assert cfg.train.resolution == cfg.precompute.resolution  # latents are made at the trained size
    assert cfg.pipeline.tiny is not None or cfg.pipeline.pretrained_model_name_or_path


def test_run1_takes_precomputed_dir_and_output_dir_overrides(tmp_path):
    cfg = load_config(REPO / "configs/flux/klein4b/run1.yaml", FluxConfig,
                      [f"precomputed_data_dir={tmp_path}", f"output_dir={tmp_path / 'out'}"])
    assert cfg.precomputed_data_dir == str(tmp_path) and cfg.train.resume_from_checkpoint == "latest"
    assert cfg.train.lora.rank == 16 and cfg.name == "klein4b_run1"  # inherited from base.yaml


def test_missing_pipeline_path_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"pipeline.pretrained_model_name_or_path: missing"):
        load_config(REPO / "configs/flux/klein4b/run1.yaml", FluxConfig, ["pipeline.pretrained_model_name_or_path="])


def _precomputed(tmp_path, resolution=32, channels=16):
    root = tmp_path / "pre"
    root.mkdir()
    (root / "flux_meta.json").write_text(json.dumps({
        "resolution": resolution, "latent_column": f"latents_{resolution}", "latent_channels": channels,
        "latent_shape": [channels, resolution // 4, resolution // 4], "text_shape": [16, 48]}))
    return {"precomputed": ArtifactRef(uri=str(root), kind="dataset", name="pre", version=1, digest="x")}


def test_resolution_channels_and_odd_prior_batch_are_reported_together(tmp_path):
    cfg = TrainConfig(pretrained_model_name_or_path="some/pipe", resolution=64, latent_channels=128,
                      prior_preservation=True, batch_size=3, device="cpu")
    with pytest.raises(ConfigError) as err:
        preflight(cfg, _precomputed(tmp_path))
    msg = str(err.value)
    assert "train.resolution: 64" in msg and "latents_32" in msg
    assert "train.latent_channels: 128" in msg and "16 channels" in msg
    assert "train.batch_size: 3 is odd" in msg


def test_unloadable_pipeline_is_reported_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = TrainConfig(pretrained_model_name_or_path="nobody/not-cached-xyz", dit=str(tmp_path / "nope"),
                      resolution=32, device="cpu")
    with pytest.raises(ConfigError) as err:
        preflight(cfg, _precomputed(tmp_path))
    assert "pipeline.pretrained_model_name_or_path: nobody/not-cached-xyz cannot be loaded" in str(err.value)
    assert "model.dit: " in str(err.value)


def test_missing_pipeline_in_train_step(tmp_path):
    with pytest.raises(ConfigError, match="pipeline.pretrained_model_name_or_path: missing"):
        preflight(TrainConfig(resolution=32, device="cpu"), _precomputed(tmp_path))


def test_matching_config_passes_preflight(tmp_path):
    meta, pipe, device = preflight(TrainConfig(pretrained_model_name_or_path=str(tmp_path), resolution=32,
                                               latent_channels=16, device="cpu"), _precomputed(tmp_path))
    assert meta["latent_column"] == "latents_32" and pipe == str(tmp_path) and device == "cpu"


@pytest.mark.skipif(cpu_has_native_bf16(), reason="this CPU has native bf16")
def test_bf16_on_a_cpu_without_it_is_refused(tmp_path):
    cfg = TrainConfig(pretrained_model_name_or_path="p", resolution=32, mixed_precision="bf16", device="cpu")
    with pytest.raises(ConfigError, match=r"train.mixed_precision: bfloat16 is not supported on device 'cpu'"):
        preflight(cfg, _precomputed(tmp_path))


def test_doctor_checks_packages_disk_and_configured_models(tmp_path):
    checks = run_doctor(str(REPO / "configs/flux/tiny.yaml"), imports=False, min_free_gb=0.001)
    by = {c.name: c for c in checks}
    assert by["package diffusers"].ok and by["package diffusers"].detail.startswith("0.")
    assert by["disk"].ok and by["pipeline"].ok
    assert "accelerator" in by
    # a local dir that is not a pipeline, and a hub id that is not cached here, both fail
    bad = check_config_models({"pipeline": {"pretrained_model_name_or_path": str(tmp_path)},
                               "model": {"dit": "nobody/not-a-model-xyz"}})
    assert [c.ok for c in bad] == [False, False]
    assert "no model_index.json" in bad[0].detail and "not in the local HF cache" in bad[1].detail
    assert "problem(s)" in format_report(bad)


def test_nexus_doctor_cli_exit_code(capsys):
    from flows.cli import main

    rc = main(["doctor", str(REPO / "configs/flux/tiny.yaml"), "--min-free-gb", "1e9"])
    out = capsys.readouterr().out
    assert rc == 1 and "[FAIL] disk" in out and "[ok  ] pipeline" in out
