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


# ------------------------------------------------------------ flow preflight (before any work)


def _flux_cfg(*overrides):
    return load_config(REPO / "configs/flux/tiny.yaml", FluxConfig, list(overrides))


def test_flow_preflight_reports_every_problem_at_once(tmp_path):
    from flows.flux import preflight

    cfg = _flux_cfg(f"data.source={tmp_path / 'missing'}", "train.resolution=30",
                    f"data.extra_sources=[{{source: {tmp_path / 'nope'}, repeats: 2}}]")
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    assert err.value.problems == [
        "train.resolution: 30 but precompute.resolution is 32 (training reads latents made at the precompute resolution)",
        f"data.source: {tmp_path / 'missing'} does not exist",
        f"data.extra_sources.0.source: {tmp_path / 'nope'} does not exist",
        "train.resolution: 30 is not a multiple of 4 (VAE x patch factor of the pipeline)"]  # tiny: VAE 2 x patch 2
    images = tmp_path / "imgs"
    images.mkdir()
    preflight(_flux_cfg(f"data.source={images}"))  # the tiny preset itself passes


def test_flow_preflight_reads_the_factor_from_the_pipelines_vae_config(tmp_path, monkeypatch):
    from flows.flux import preflight

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = tmp_path / "pipe"
    (pipe / "vae").mkdir(parents=True)
    (pipe / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))  # Klein: 16
    images = tmp_path / "imgs"
    images.mkdir()
    base = ["pipeline.tiny=null", f"pipeline.pretrained_model_name_or_path={pipe}", f"data.source={images}"]
    with pytest.raises(ConfigError) as err:
        preflight(_flux_cfg(*base, "train.resolution=40", "precompute.resolution=40", "model.dit=nobody/not-cached-xyz",
                            "prepare.buckets.enabled=true", "prepare.buckets.divisible=8", "prepare.buckets.step=8",
                            "prepare.size=40"))
    problems = err.value.problems
    assert problems[0].startswith("model.dit: nobody/not-cached-xyz cannot be loaded here")
    assert problems[1].startswith("prepare.buckets: ") and "not multiples of 16" in problems[1]
    assert problems[2:] == ["train.resolution: 40 is not a multiple of 16 (VAE x patch factor of the pipeline)",
                            "precompute.resolution: 40 is not a multiple of 16 (VAE x patch factor of the pipeline)"]
    preflight(_flux_cfg(*base, "train.resolution=48", "precompute.resolution=48"))
    with pytest.raises(ConfigError, match=r"pipeline.pretrained_model_name_or_path: .*gone cannot be loaded here"):
        preflight(_flux_cfg(*base[:1], f"pipeline.pretrained_model_name_or_path={tmp_path / 'gone'}", base[2]))


def test_precomputed_data_dir_skips_data_checks_but_must_be_a_precompute(tmp_path):
    from flows.flux import preflight

    with pytest.raises(ConfigError) as err:
        preflight(_flux_cfg(f"precomputed_data_dir={tmp_path}", "data.source=null", "precompute.resolution=64"))
    assert err.value.problems == [f"precomputed_data_dir: {tmp_path} is not a flux precompute artifact (no flux_meta.json)"]


def test_extra_sources_belong_in_the_data_section(tmp_path):
    with pytest.raises(ConfigError, match="prepare.extra_sources: set data.extra_sources"):
        _flux_cfg(f"prepare.extra_sources=[{{source: {tmp_path}}}]")


@pytest.mark.slow
def test_cli_preflight_fails_with_one_error_line_before_any_step(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "NEXUS_DATA": str(tmp_path / "data"), "NEXUS_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "flux", "configs/flux/tiny.yaml",
                          f"data.source={tmp_path / 'missing'}", "train.resolution=30"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: invalid config:"], out.stderr[-2000:]
    assert f"data.source: {tmp_path / 'missing'} does not exist" in out.stderr
    assert "train.resolution: 30 is not a multiple of 4" in out.stderr and "Traceback" not in out.stderr
    assert not list((tmp_path / "data").rglob("manifest.json"))  # not even the tiny pipeline was built
