"""Precompute: prepared MDS (images + captions) → MDS of ``caption, subset, bucket, dataset, repeats``,
``latents_<resolution>`` (+ ``latents_<resolution>_flip``, + ``mask``), ``text_embeds`` and ``text_ids``,
so training never runs the VAE or the text encoder.

Batched, with ``model_dtype`` for the encoders and ``save_dtype`` for what is stored. Each row is
encoded at its own size: its aspect-ratio bucket when prepare made buckets, else the square
``resolution`` (rows of one bucket are batched together; the shards keep the prepared order). Latents
are patchified, ``(4*C, H/f, W/f)`` with ``f`` = VAE scale x 2 (``latent_downscale`` in the meta), so
their shape differs between buckets (MDS ``ndarray`` columns of free shape). ``flip`` also stores the
latents of the horizontally flipped image (same shape), for random flips at training time. A prepared
``mask`` (white = train on it) is stored as float16 ``(H/f, W/f)``, average-pooled onto that latent
grid (the flipped latents' mask is ``mask[:, ::-1]``).

Rows are processed in *shard groups* of ``group_size`` rows, each written to its own MDS directory
in the step's work dir (``ctx.work_dir``, keyed by the cache key); an interrupted run resumes at the
first unfinished group. When all groups are done they are moved into the artifact and joined in a
``flat`` or ``nested`` layout, with every shard's sha256 recorded. ``flux_meta.json`` holds the
base latent shape, the buckets present, text shape, dtypes, the VAE's batch-norm statistics and the
per-channel latent statistics of this dataset (for normalisation at training time), ``has_mask``,
``has_flip``, and ``empty_prompt``: ``empty_prompt.safetensors`` holds ``text_embeds`` (save dtype) and
``text_ids`` (int32) of the empty caption, ``(L, D)`` and ``(L, 4)``, for caption dropout.
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
EMPTY_PROMPT = "empty_prompt.safetensors"


class PrecomputeConfig(NexusModel):
    """How to encode the prepared images and captions."""

    pretrained_model_name_or_path: PathOrName | None = Field(
        default=None, description="Pipeline holding the VAE and text encoder (a 'pipeline' input overrides it)")
    resolution: int = Field(default=512, ge=8, description="Square image side fed to the VAE (rows without a "
                            "bucket); names the latents_<resolution> column")
    flip: bool = Field(default=False, description="Also store the latents of the horizontally flipped image "
                       "(latents_<resolution>_flip)")
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
    buckets: list[list[int]]
    groups: int
    resumed_groups: int
    shards: int
    images_per_second: float


def _stats(lat: Any, acc: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Per-channel sum, sum of squares and count of ``lat`` (B, C, H, W), added to ``acc``."""
    x = lat.double().transpose(0, 1).reshape(lat.shape[1], -1)
    new = {"sum": x.sum(1).tolist(), "sumsq": (x * x).sum(1).tolist(), "count": [x.shape[1]] * x.shape[0]}
    if acc is None:
        return new
    return {k: [a + b for a, b in zip(acc[k], new[k], strict=True)] for k in new}


def _size(sample: dict[str, Any], resolution: int) -> tuple[int, int]:
    """(height, width) a prepared row is encoded at: its bucket, or the square resolution."""
    if "bucket" in sample:
        h, w = sample["bucket"].split("x")
        return int(h), int(w)
    return resolution, resolution


def _check_buckets(prepared: Path, factor: int) -> None:
    """Every bucket of the prepared table must be a multiple of the VAE x patch factor (before any work)."""
    table = prepared / "data.parquet"
    if not table.is_file():
        return
    import polars as pl

    df = pl.read_parquet(table)
    if "bucket" not in df.columns:
        return
    bad = sorted({b for b in df["bucket"].drop_nulls().to_list() if any(int(v) % factor for v in b.split("x"))})
    if bad:
        raise ConfigError([f"prepare.buckets: {', '.join(bad)} (height x width) not multiples of {factor}, the VAE x "
                           f"patch factor of this pipeline; set prepare.buckets.divisible={factor}"])


def _encode_group(cfg: PrecomputeConfig, pipe: Any, chunk: list[dict[str, Any]], rcol: str, factor: int,
                  progress: Any) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """Encode one group: rows of one size batched together, returned in the group's order, with stats."""
    sizes = [_size(s, cfg.resolution) for s in chunk]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        by_size.setdefault(size, []).append(i)
    rows: list[dict[str, Any]] = [{} for _ in chunk]
    stats = None
    done = 0
    for (h, w), idxs in by_size.items():
        if h % factor or w % factor:
            raise ConfigError([f"prepare.buckets: {h}x{w} is not a multiple of {factor} (VAE x patch)"])
        for b in range(0, len(idxs), cfg.batch_size):
            batch = [chunk[i] for i in idxs[b:b + cfg.batch_size]]
            pixels = encode.images_to_tensor([s["image"] for s in batch], (h, w)).to(pipe.vae.device, pipe.vae.dtype)
            lat = encode.encode_images(pipe, pixels).float().cpu()
            flipped = encode.encode_images(pipe, pixels.flip(-1)).float().cpu() if cfg.flip else None
            emb, ids = encode.encode_prompts(pipe, [s["caption"] for s in batch], cfg.max_sequence_length,
                                             cfg.text_encoder_out_layers)
            stats = _stats(lat, stats)
            for j, (i, s) in enumerate(zip(idxs[b:b + cfg.batch_size], batch, strict=True)):
                row = {"caption": s["caption"], "subset": s["subset"], "bucket": f"{h}x{w}",
                       "dataset": s.get("dataset", "main"), "repeats": int(s.get("repeats", 1)),
                       rcol: encode.to_storage(lat[j], cfg.save_dtype),
                       "text_embeds": encode.to_storage(emb[j].float(), cfg.save_dtype),
                       "text_ids": ids[j].cpu().numpy().astype("int32")}
                if flipped is not None:
                    row[f"{rcol}_flip"] = encode.to_storage(flipped[j], cfg.save_dtype)
                if "mask" in s:
                    row["mask"] = encode.mask_to_grid(s["mask"], (h, w), factor)
                rows[i] = row
            done += len(batch)
            progress(done)
    assert stats is not None  # a group is never empty
    return rows, stats


def _write_empty_prompt(cfg: PrecomputeConfig, pipe: Any, path: Path) -> list[int]:
    """Embeddings of the empty caption (caption dropout) → ``path``; return the text shape."""
    import torch
    from safetensors.torch import save_file

    emb, ids = encode.encode_prompts(pipe, [""], cfg.max_sequence_length, cfg.text_encoder_out_layers)
    save_file({"text_embeds": emb[0].float().to(getattr(torch, cfg.save_dtype)).contiguous().cpu(),
               "text_ids": ids[0].to(torch.int32).contiguous().cpu()}, str(path))
    return list(emb.shape[1:])


@step(area="flux",
      inputs={"prepared": directory(description="The prepare step's artifact (mds/ of image, caption, subset)"),
              "pipeline": directory(optional=True, description="Pipeline holding the VAE and text encoder")})
def run_precompute(cfg: PrecomputeConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                   ctx: StepContext) -> PrecomputeResult:
    """Encode every prepared row once; write shards by group (resumable) and the latent statistics."""
    from nexus_core.models.flux_tiny import load_flux_pipeline

    path = str(inputs["pipeline"].path) if "pipeline" in inputs else cfg.pretrained_model_name_or_path
    if not path:
        raise ConfigError(["pipeline.pretrained_model_name_or_path: missing (VAE and text encoder come from it)"])
    device = resolve_device(cfg.device)
    check_dtype(device, cfg.model_dtype, "precompute.model_dtype")
    pipe = load_flux_pipeline(path, dtype=cfg.model_dtype).to(device)
    factor = pipe.vae_scale_factor * 2
    if cfg.resolution % factor:
        raise ConfigError([f"precompute.resolution: {cfg.resolution} is not a multiple of {factor} (VAE x patch)"])
    if max(cfg.text_encoder_out_layers) > pipe.text_encoder.config.num_hidden_layers:
        raise ConfigError([f"precompute.text_encoder_out_layers: {cfg.text_encoder_out_layers} exceed the text "
                           f"encoder's {pipe.text_encoder.config.num_hidden_layers} layers"])

    prepared = inputs["prepared"].path / "mds"
    _check_buckets(inputs["prepared"].path, factor)
    work = ctx.work_dir  # unfinished groups survive a killed run here; the runner removes it once published
    index = read_index(prepared)
    total = sum(shard["samples"] for shard in index["shards"])
    has_mask = bool(index["shards"]) and "mask" in index["shards"][0]["column_names"]
    # a fresh cache per attempt: streaming refuses a local dir another live dataset still holds
    samples = iter_samples(prepared, tempfile.mkdtemp(prefix="cache-", dir=work))
    rcol = f"latents_{cfg.resolution}"
    columns = {"caption": "str", "subset": "str", "bucket": "str", "dataset": "str", "repeats": "int",
               rcol: "ndarray"}
    columns |= {f"{rcol}_flip": "ndarray"} if cfg.flip else {}
    columns |= {"mask": "ndarray"} if has_mask else {}
    columns |= {"text_embeds": "ndarray", "text_ids": "ndarray"}
    groups: list[str] = []
    resumed, encoded, seconds = 0, 0, 0.0
    table: list[dict[str, Any]] = []
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
        table += [{"caption": s["caption"], "subset": s["subset"], "group": len(groups),
                   "bucket": "{}x{}".format(*_size(s, cfg.resolution)), "dataset": s.get("dataset", "main"),
                   "repeats": int(s.get("repeats", 1))} for s in chunk]
        if (gdir / "shard_hashes.json").is_file() and (gdir / "stats.json").is_file():
            resumed += 1  # finished by an earlier attempt
            groups.append(name)
            ctx.progress(len(table), total, f"{len(table)}/{total} rows ({len(groups)} groups, {resumed} resumed)")
            continue
        if cfg.max_groups is not None and len(groups) >= cfg.max_groups:
            raise InputError(f"flux precompute: stopped after max_groups={cfg.max_groups}; re-run to resume")
        shutil.rmtree(gdir, ignore_errors=True)  # a half-written group from a crash
        t0 = time.perf_counter()
        first = len(table) - len(chunk)

        def progress(n: int, first: int = first, size: int = len(chunk), note: str = f"group {len(groups) + 1}, "
                     f"{resumed} resumed") -> None:  # within a group too: a group can take minutes on a GPU
            if n < size:  # the group's last batch is reported once the group is written
                ctx.progress(first + n, total, f"{first + n}/{total} rows ({note})")

        rows, stats = _encode_group(cfg, pipe, chunk, rcol, factor, progress)
        seconds += time.perf_counter() - t0
        encoded += len(chunk)
        write_mds(gdir, columns, rows, size_limit=cfg.shard_size_limit)
        atomic_write_json(gdir / "stats.json", stats)
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
    txt_shape = _write_empty_prompt(cfg, pipe, out / EMPTY_PROMPT)
    channels = len(mean)
    lat_shape = [channels, cfg.resolution // factor, cfg.resolution // factor]
    buckets = sorted({tuple(int(v) for v in r["bucket"].split("x")) for r in table})
    bn = pipe.vae.bn
    meta = {
        "resolution": cfg.resolution, "latent_column": rcol, "latent_shape": lat_shape,
        "latent_channels": channels, "latent_downscale": factor, "text_shape": txt_shape,
        "save_dtype": cfg.save_dtype, "text_encoder_out_layers": cfg.text_encoder_out_layers,
        "max_sequence_length": cfg.max_sequence_length,
        "vae_bn_mean": bn.running_mean.float().tolist(), "vae_bn_var": bn.running_var.float().tolist(),
        "vae_bn_eps": pipe.vae.config.batch_norm_eps, "dataset_mean": mean, "dataset_var": var,
        "rows": len(table), "layout": cfg.layout, "pipeline": str(path),
        "buckets": [list(b) for b in buckets], "has_mask": has_mask, "has_flip": cfg.flip,
        "empty_prompt": EMPTY_PROMPT,
    }
    atomic_write_json(out / META, meta)
    import polars as pl

    write_parquet(pl.DataFrame(table), out / "data.parquet")
    ips = encoded / seconds if seconds else 0.0
    return PrecomputeResult(rows=len(table), latent_shape=lat_shape, text_shape=txt_shape,
                            buckets=[list(b) for b in buckets], groups=len(groups), resumed_groups=resumed,
                            shards=shards, images_per_second=ips,
                            metrics={"images_per_second": ips, "groups": len(groups), "resumed_groups": resumed})
