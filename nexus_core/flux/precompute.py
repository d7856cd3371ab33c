"""Precompute: prepared MDS (images + captions) → MDS of ``caption``, ``latents_<resolution>``,
``text_embeds`` and ``text_ids``, so training never runs the VAE or the text encoder.

Batched, with ``model_dtype`` for the encoders and ``save_dtype`` for what is stored. Rows are
processed in *shard groups* of ``group_size`` rows, each written to its own MDS directory in the
step's work dir (``ctx.work_dir``, keyed by the cache key); an interrupted run resumes at the first
unfinished group. When all groups are done they are moved into the artifact and joined in a
``flat`` or ``nested`` layout, with every shard's sha256 recorded. ``flux_meta.json`` holds the
latent shape, text shape, dtypes, the VAE's batch-norm statistics and the per-channel latent
statistics of this dataset (for normalisation at training time).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from nexus_core.artifacts import ArtifactRef, atomic_write_json
from nexus_core.config import NexusModel, PathOrName, runtime_field
from nexus_core.context import StepContext
from nexus_core.contract import directory, step
from nexus_core.errors import ConfigError, InputError
from nexus_core.flux import encode
from nexus_core.flux.device import check_dtype, resolve_device
from nexus_core.flux.mds import iter_samples, merge_groups, read_index, verify_shards, write_mds
from nexus_core.io import write_parquet
from nexus_core.runner import StepResult

META = "flux_meta.json"


class PrecomputeConfig(NexusModel):
    """How to encode the prepared images and captions."""

    pretrained_model_name_or_path: PathOrName | None = Field(
        default=None, description="Pipeline holding the VAE and text encoder (a 'pipeline' input overrides it)")
    resolution: int = Field(default=512, ge=8, description="Square image side fed to the VAE; latents_<resolution>")
    batch_size: int = Field(default=8, ge=1, description="Images/captions encoded per forward pass")
    model_dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Encoder compute dtype")
    save_dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float16", description="Dtype stored in shards")
    max_sequence_length: int = Field(default=512, ge=4, description="Tokens per caption (padded/truncated)")
    text_encoder_out_layers: list[int] = Field(default=[9, 18, 27], description="Text encoder hidden states stacked")
    layout: Literal["flat", "nested"] = Field(default="nested", description="Shards in one folder or one per group")
    group_size: int = Field(default=256, ge=1, description="Rows per shard group (the unit of resumption)")
    shard_size_limit: int = Field(default=1 << 26, ge=1024, description="Bytes per MDS shard")
    device: str = Field(default="auto", description="auto | cpu | cuda[:N]")
    # runtime: a run stopped by it publishes nothing, and the re-run without it must find the same work dir
    max_groups: int | None = runtime_field(None, "Stop after this many groups (testing resumption)", ge=1)


class PrecomputeResult(StepResult):
    """What was encoded."""

    latent_shape: list[int]
    text_shape: list[int]
    groups: int
    resumed_groups: int
    shards: int
    images_per_second: float


def _stats(lat: Any) -> dict[str, list[float]]:  # a torch.Tensor (torch is imported lazily)
    x = lat.double().transpose(0, 1).reshape(lat.shape[1], -1)
    return {"sum": x.sum(1).tolist(), "sumsq": (x * x).sum(1).tolist(), "count": [x.shape[1]] * x.shape[0]}


@step(area="flux",
      inputs={"prepared": directory(description="The prepare step's artifact (mds/ of image, caption, subset)"),
              "pipeline": directory(optional=True, description="Pipeline holding the VAE and text encoder")})
def run_precompute(cfg: PrecomputeConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                   ctx: StepContext) -> PrecomputeResult:
    """Encode every prepared row once; write shards by group (resumable) and the latent statistics."""
    import torch

    from nexus_core.models.flux_tiny import load_flux_pipeline

    path = str(inputs["pipeline"].path) if "pipeline" in inputs else cfg.pretrained_model_name_or_path
    if not path:
        raise ConfigError(["pipeline.pretrained_model_name_or_path: missing (VAE and text encoder come from it)"])
    device = resolve_device(cfg.device)
    check_dtype(device, cfg.model_dtype, "precompute.model_dtype")
    pipe = load_flux_pipeline(path, dtype=cfg.model_dtype).to(device)
    multiple = pipe.vae_scale_factor * 2
    if cfg.resolution % multiple:
        raise ConfigError([f"precompute.resolution: {cfg.resolution} is not a multiple of {multiple} (VAE x patch)"])
    if max(cfg.text_encoder_out_layers) > pipe.text_encoder.config.num_hidden_layers:
        raise ConfigError([f"precompute.text_encoder_out_layers: {cfg.text_encoder_out_layers} exceed the text "
                           f"encoder's {pipe.text_encoder.config.num_hidden_layers} layers"])

    prepared = inputs["prepared"].path / "mds"
    work = ctx.work_dir  # unfinished groups survive a killed run here; the runner removes it once published
    total = sum(shard["samples"] for shard in read_index(prepared)["shards"])
    # a fresh cache per attempt: streaming refuses a local dir another live dataset still holds
    samples = iter_samples(prepared, tempfile.mkdtemp(prefix="cache-", dir=work))
    rcol = f"latents_{cfg.resolution}"
    columns = {"caption": "str", "subset": "str", rcol: "ndarray", "text_embeds": "ndarray", "text_ids": "ndarray"}
    groups, resumed, encoded, seconds = [], 0, 0, 0.0
    lat_shape: list[int] = []
    txt_shape: list[int] = []
    table = []
    done = False
    while not done:
        chunk = []
        for s in samples:
            chunk.append(s)
            if len(chunk) == cfg.group_size:
                break
        done = len(chunk) < cfg.group_size
        if not chunk:
            break
        name = f"groups/{len(groups):05d}"
        gdir = work / name
        table += [{"caption": s["caption"], "subset": s["subset"], "group": len(groups)} for s in chunk]
        if (gdir / "shard_hashes.json").is_file() and (gdir / "stats.json").is_file():
            resumed += 1  # finished by an earlier attempt
            groups.append(name)
            ctx.progress(len(table), total, f"{len(table)}/{total} rows ({len(groups)} groups, {resumed} resumed)")
            continue
        if cfg.max_groups is not None and len(groups) >= cfg.max_groups:
            raise InputError(f"flux precompute: stopped after max_groups={cfg.max_groups}; re-run to resume")
        shutil.rmtree(gdir, ignore_errors=True)  # a half-written group from a crash
        rows, lats = [], []
        t0 = time.perf_counter()
        for i in range(0, len(chunk), cfg.batch_size):
            batch = chunk[i:i + cfg.batch_size]
            pixels = encode.images_to_tensor([s["image"] for s in batch], cfg.resolution).to(device, pipe.vae.dtype)
            lat = encode.encode_images(pipe, pixels).float().cpu()
            emb, ids = encode.encode_prompts(pipe, [s["caption"] for s in batch], cfg.max_sequence_length,
                                             cfg.text_encoder_out_layers)
            lats.append(lat)
            for j, s in enumerate(batch):
                rows.append({"caption": s["caption"], "subset": s["subset"],
                             rcol: encode.to_storage(lat[j], cfg.save_dtype),
                             "text_embeds": encode.to_storage(emb[j].float(), cfg.save_dtype),
                             "text_ids": ids[j].cpu().numpy().astype("int32")})
            at = len(table) - len(chunk) + len(rows)  # within a group too: a group can take minutes on a GPU
            if at < len(table):  # the group's last batch is reported once the group is written
                ctx.progress(at, total, f"{at}/{total} rows (group {len(groups) + 1}, {resumed} resumed)")
        seconds += time.perf_counter() - t0
        encoded += len(chunk)
        lat_shape, txt_shape = list(lats[0].shape[1:]), list(rows[0]["text_embeds"].shape)
        write_mds(gdir, columns, rows, size_limit=cfg.shard_size_limit)
        atomic_write_json(gdir / "stats.json", _stats(torch.cat(lats)))
        groups.append(name)
        ctx.progress(len(table), total, f"{len(table)}/{total} rows ({len(groups)} groups, {resumed} resumed)")

    if not groups:
        raise InputError(f"{prepared}: prepared dataset is empty")
    stats = [json.loads((work / g / "stats.json").read_text()) for g in groups]
    count = sum(s["count"][0] for s in stats)
    mean = [sum(s["sum"][c] for s in stats) / count for c in range(len(stats[0]["sum"]))]
    var = [max(sum(s["sumsq"][c] for s in stats) / count - mean[c] ** 2, 0.0) for c in range(len(mean))]
    out = Path(out_uri)
    (out / "mds" / "groups").mkdir(parents=True)
    for g in groups:
        shutil.move(str(work / g), str(out / "mds" / g))
        (out / "mds" / g / "stats.json").unlink()
    shards = merge_groups(out / "mds", groups, cfg.layout)
    verify_shards(out / "mds")
    if not lat_shape:  # every group came from an earlier attempt: read one row for the shapes
        first = next(iter_samples(out / "mds", tempfile.mkdtemp(prefix="cache-", dir=work)))
        lat_shape, txt_shape = list(first[rcol].shape), list(first["text_embeds"].shape)
    bn = pipe.vae.bn
    meta = {
        "resolution": cfg.resolution, "latent_column": rcol, "latent_shape": lat_shape,
        "latent_channels": lat_shape[0], "text_shape": txt_shape, "save_dtype": cfg.save_dtype,
        "text_encoder_out_layers": cfg.text_encoder_out_layers, "max_sequence_length": cfg.max_sequence_length,
        "vae_bn_mean": bn.running_mean.float().tolist(), "vae_bn_var": bn.running_var.float().tolist(),
        "vae_bn_eps": pipe.vae.config.batch_norm_eps, "dataset_mean": mean, "dataset_var": var,
        "rows": len(table), "layout": cfg.layout, "pipeline": str(path),
    }
    atomic_write_json(out / META, meta)
    import polars as pl

    write_parquet(pl.DataFrame(table), out / "data.parquet")
    ips = encoded / seconds if seconds else 0.0
    return PrecomputeResult(rows=len(table), latent_shape=lat_shape, text_shape=txt_shape, groups=len(groups),
                            resumed_groups=resumed, shards=shards, images_per_second=ips,
                            metrics={"images_per_second": ips, "groups": len(groups), "resumed_groups": resumed})
