"""``nexus doctor``: is this machine ready to run Nexus (and a given flux config)?

Checks installed dependencies (and that ``streaming`` really imports: a CPU-only torch wheel without a
matching torchvision breaks it), the accelerator (CUDA, bf16), free disk space under the
data root, and that the models a config names resolve: a local directory with the right marker file,
or a hub id already in the local Hugging Face cache (no network is used).
"""

from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from nexus_core.settings import data_root

PACKAGES = ("torch", "transformers", "diffusers", "peft", "accelerate", "trl", "mosaicml-streaming",
            "prefect", "mlflow", "litellm", "polars", "pyarrow", "safetensors")


@dataclass
class Check:
    """One line of the doctor's report."""

    name: str
    ok: bool
    detail: str
    required: bool = True


def check_packages(packages: tuple[str, ...] = PACKAGES) -> list[Check]:
    """Installed version of each package (missing → failed check)."""
    out = []
    for pkg in packages:
        try:
            out.append(Check(f"package {pkg}", True, metadata.version(pkg)))
        except metadata.PackageNotFoundError:
            out.append(Check(f"package {pkg}", False, "not installed"))
    return out


def check_imports(modules: tuple[str, ...] = ("streaming", "diffusers")) -> list[Check]:
    """Import the modules whose import is known to break on bad wheels."""
    out = []
    for mod in modules:
        try:
            importlib.import_module(mod)
            out.append(Check(f"import {mod}", True, "ok"))
        except Exception as exc:  # noqa: BLE001 - any import failure is the finding
            out.append(Check(f"import {mod}", False, f"{type(exc).__name__}: {exc}"[:300]))
    return out


def check_accelerator() -> list[Check]:
    """CUDA visibility, device names and bf16 support (CPU-only is a warning, not a failure)."""
    import torch

    from nexus_core.flux.device import cpu_has_native_bf16

    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return [Check("accelerator", True, f"cuda x{torch.cuda.device_count()}: {names}"),
                Check("bf16", torch.cuda.is_bf16_supported(), "cuda bf16 supported"
                      if torch.cuda.is_bf16_supported() else "no bf16: use mixed_precision=fp16 or no", False)]
    return [Check("accelerator", False, "no CUDA device: CPU only (tiny presets run; real training will not)",
                  required=False),
            Check("bf16", cpu_has_native_bf16(), "CPU has native bf16" if cpu_has_native_bf16()
                  else "CPU lacks native bf16: use float32 / mixed_precision=no", False)]


def check_disk(path: Path | None = None, min_free_gb: float = 5.0) -> Check:
    """Free space where artifacts are written."""
    path = path or data_root()
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 1e9
    return Check("disk", free >= min_free_gb, f"{free:.1f} GB free under {path} (need >= {min_free_gb} GB)")


def resolve_model(ref: str, marker: str = "model_index.json") -> tuple[bool, str]:
    """Whether ``ref`` (a local dir or hub id) can be loaded here without a network."""
    p = Path(ref)
    if p.exists():
        if (p / marker).is_file() or (p / "config.json").is_file() or (p / "transformer" / "config.json").is_file():
            return True, f"local directory {p}"
        return False, f"{p} exists but has no {marker} or config.json"
    if ref.count("/") != 1 or ref.startswith((".", "/")):
        return False, f"{ref}: no such local path"
    try:
        from huggingface_hub import try_to_load_from_cache

        for name in (marker, "config.json"):
            hit = try_to_load_from_cache(ref, name)
            if isinstance(hit, str):
                return True, f"hub id {ref} in the local HF cache"
    except Exception as exc:  # noqa: BLE001
        return False, f"{ref}: cache lookup failed: {exc}"
    return False, f"hub id {ref} not in the local HF cache (download it where the hub is reachable)"


def check_config_models(cfg: dict[str, Any]) -> list[Check]:
    """The models a flux config names: pipeline, DiT, distillation teacher."""
    out = []
    if "pipeline" not in cfg:  # not a flux config: nothing of ours to resolve
        return [Check("pipeline", True, "config names no flux pipeline", required=False)]
    pipe = (cfg.get("pipeline") or {})
    if pipe.get("tiny") is not None:
        out.append(Check("pipeline", True, "tiny pipeline built from config"))
    elif pipe.get("pretrained_model_name_or_path"):
        ok, detail = resolve_model(pipe["pretrained_model_name_or_path"])
        out.append(Check("pipeline", ok, detail))
    else:
        out.append(Check("pipeline", False, "pipeline.pretrained_model_name_or_path: missing"))
    for key, value in (("model.dit", (cfg.get("model") or {}).get("dit")),
                       ("train.teacher_dit", (cfg.get("train") or {}).get("teacher_dit"))):
        if value:
            ok, detail = resolve_model(value, "config.json")
            out.append(Check(key, ok, detail))
    return out


def run_doctor(config: str | None = None, overrides: list[str] | tuple[str, ...] = (), *,
               imports: bool = True, min_free_gb: float = 5.0) -> list[Check]:
    """Every check; ``config`` (a flux YAML, with extends and overrides) adds its models."""
    checks = check_packages() + (check_imports() if imports else []) + check_accelerator()
    checks.append(check_disk(min_free_gb=min_free_gb))
    if config:
        from nexus_core.config import load_data

        checks += check_config_models(load_data(config, list(overrides)))  # the one loader: extends, ${VAR}
    return checks


def format_report(checks: list[Check]) -> str:
    """Human-readable report: one line per check."""
    lines = []
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        lines.append(f"[{mark}] {c.name:<28} {c.detail}")
    failed = [c for c in checks if c.required and not c.ok]
    lines.append(f"\n{len(failed)} problem(s)" if failed else "\nall required checks passed")
    return "\n".join(lines)
